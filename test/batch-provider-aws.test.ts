/**
 * `drover batch --provider aws` on the loopback EC2 endpoint, with real sshd
 * servers as the instances: see test/helpers/batch-provider.ts.
 */
import t from 'tap';
import { providerBatchTests } from './helpers/batch-provider.js';
import { requireSshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);
providerBatchTests(t, 'aws');
