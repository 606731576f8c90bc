/**
 * The shipped plugin list lives in one place (shippedPlugins), and the
 * worker, the batch front-end and the test runner all take it from there.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { runBatch } from '../src/batch/run.js';
import { workerParts, workerPayloadSchema } from '../src/cli/worker-command.js';
import { shippedPlugins } from '../src/plugins/index.js';
import { loadConfig } from '../src/runtime/config.js';
import { startTaskRun } from '../src/testing/task-run.js';

const NAMES = ['success', 'env', 'maxruntime', 'artifacts', 'livelog'];

t.test('the list, in hook order; gc only with its settings', async (t) => {
  t.same(shippedPlugins().map((plugin) => plugin.name), NAMES);
  t.same(shippedPlugins({ gc: { workDir: t.testdir({}), requiredDiskSpaceMegabytes: 0 } }).map((plugin) => plugin.name), ['success', 'env', 'maxruntime', 'gc', 'artifacts', 'livelog']);
  const env = shippedPlugins({ taskEnv: { A: '1' }, secretTaskEnv: { S: 'hush' } }).find((plugin) => plugin.name === 'env');
  t.same(env?.secrets, ['hush'], 'the config reaches the env plugin');
});

t.test('drover worker runs the shipped plugins, and its payload schema is theirs with the engine\'s', async (t) => {
  const config = loadConfig({ env: { DROVER_SECRET_TASK_ENV: 'S=hush' } });
  const { plugins } = await workerParts(config, false);
  t.same(plugins.map((plugin) => plugin.name), ['success', 'env', 'maxruntime', 'gc', 'artifacts', 'livelog'], 'with gc: a worker keeps caches');
  t.same(plugins.find((plugin) => plugin.name === 'env')?.secrets, ['hush']);
  const schema = await workerPayloadSchema(config);
  for (const property of ['command', 'env', 'onExitStatus', 'maxRunTime', 'mounts', 'artifacts']) t.ok(property in schema.properties, property);
});

t.test('startTaskRun runs the shipped plugins by default', async (t) => {
  const run = await startTaskRun({ payload: { mock: {}, maxRunTime: 5, artifacts: [], onExitStatus: { retry: [75] } } });
  t.teardown(() => run.close());
  t.same((await run.output).resolution, { state: 'completed' }, 'every plugin\'s payload field is accepted');
});

t.test('drover batch runs the shipped plugins: jobs get TASK_ID from the env plugin, timeouts from maxruntime', async (t) => {
  const outcome = await runBatch(['echo "task=$TASK_ID"', 'sleep 20'], { split: 2, timeout: 1, sessionsDir: t.testdir({}), killGraceMs: 200 });
  t.same(outcome.jobs.map((job) => job.status), ['ok', 'timeout']);
  t.match(readFileSync(join(outcome.session.dir, 'output', '1.log'), 'utf8'), /task=\S+/);
});
