/**
 * `drover batch --provider` option errors: each is a usage error (exit 2)
 * that names what is wrong, before any cloud is asked.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { drover } from './helpers/drover.js';

t.test('bad --provider options are usage errors, named, before anything is launched', async (t) => {
  const cwd = t.testdir({});
  const cases: [string[], RegExp][] = [
    [['--provider', 'azure', '--split', '1'], /--provider must be aws or gce, not "azure"/],
    [['--provider', 'aws', '--split', '1', '--image', 'ami-1'], /--provider aws needs --instance-type and --image/],
    [['--provider', 'aws', '--instance-type', 't3.micro', '--image', 'ami-1'], /--provider aws needs --split N/],
    [['--provider', 'aws', '--hosts', 'a@127.0.0.1:22', '--split', '1'], /either --hosts or --provider/],
    [['--image', 'ami-1'], /--image is an option of --provider/],
  ];
  for (const [args, error] of cases) {
    const result = await drover(['batch', ...args, '--sessions', 'sessions', '--', 'true'], { cwd, input: 'x\n' });
    t.equal(result.code, EXIT.CONFIG, args.join(' '));
    t.match(result.stderr, error);
  }

  // The launch options come from a template and from DROVER_<OPTION> as the others do: here all but --split.
  writeFileSync(join(cwd, 'cloud.yaml'), 'provider: gce\nimage: projects/debian-cloud/global/images/family/debian-12\n');
  const templated = await drover(['batch', '--template', 'cloud.yaml', '--sessions', 'sessions', '--', 'true'], { cwd, input: 'x\n', env: { DROVER_INSTANCE_TYPE: 'e2-small' } });
  t.equal(templated.code, EXIT.CONFIG);
  t.match(templated.stderr, /--provider gce needs --split N/, 'provider and image from the template, the instance type from DROVER_INSTANCE_TYPE');
});
