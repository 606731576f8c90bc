/** drover/testing: the conformance kits and fakes drover exports to extension authors. */
export { queueConformance, type MakeQueue, type QueueFixture } from './queue-conformance.js';
export { findSshd, startSshd, TEST_SSH_USER, type StartSshdOptions, type TestSshd } from './sshd.js';
