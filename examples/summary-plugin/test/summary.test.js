// The summary plugin, tested as any extension author would: with nothing
// but drover's public test kit. Each test runs the plugin through a whole
// task lifecycle on drover's real task runner, with the mock engine
// scripted by the payload's `mock` (exit code, output, files left behind).
import t from 'tap';
import { pluginFromModule, pluginHarness, runPluginLifecycle } from 'drover/testing';
import * as summaryModule from '../src/index.js';

const summary = (config = {}) => pluginFromModule(summaryModule, config);
const SUMMARY = 'public/summary.json';

t.test('a completed run: the summary has the resolution, the exit code, the labels and the command\'s own JSON', async (t) => {
  const plugin = await summary({ labels: { pool: 'builders', branch: 'default' } });
  const outcome = await runPluginLifecycle(plugin, {
    payload: { mock: { files: { 'drover-summary.json': '{"tests": 12}' } }, summary: { labels: { branch: 'main' } } },
  });
  t.same(outcome.resolution, { state: 'completed' });
  const kept = JSON.parse(outcome.artifacts[SUMMARY]);
  t.match(kept, {
    taskId: outcome.claim.taskId,
    runId: 0,
    resolution: { state: 'completed' },
    exitCode: 0,
    signal: null,
    labels: { pool: 'builders', branch: 'main' },
    command: { tests: 12 },
  });
  t.type(kept.durationMs, 'number');
  t.match(outcome.env.SUMMARY_FILE, /\/drover-summary\.json$/, 'the command is told where its JSON goes');
  t.match(outcome.log, /summary: kept as public\/summary\.json/);
});

t.test('a failed command is summarized too; without a file of the command\'s there is no `command`', async (t) => {
  const outcome = await runPluginLifecycle(await summary(), { payload: { mock: { exitCode: 3 } } });
  t.equal(outcome.resolution.state, 'failed');
  const kept = JSON.parse(outcome.artifacts[SUMMARY]);
  t.equal(kept.exitCode, 3);
  t.equal(kept.resolution.state, 'failed');
  t.notOk('command' in kept);
});

t.test('a command file that is not JSON is noted, not fatal', async (t) => {
  const outcome = await runPluginLifecycle(await summary(), { payload: { mock: { files: { 'drover-summary.json': 'tests: 12' } } } });
  t.equal(outcome.resolution.state, 'completed');
  t.match(JSON.parse(outcome.artifacts[SUMMARY]).command.error, /not JSON/);
});

t.test('a malformed payload: the summary says exception/malformed-payload', async (t) => {
  const outcome = await runPluginLifecycle(await summary({ labels: { pool: 'builders' } }), { payload: { mock: {}, summary: { labels: { branch: 7 } } } });
  t.equal(outcome.resolution.reason, 'malformed-payload');
  t.match(outcome.resolution.message, /payload\.summary\.labels\.branch/);
  t.same(outcome.hooks, ['newTask', 'exception']);
  const kept = JSON.parse(outcome.artifacts[SUMMARY]);
  t.same(kept.resolution, { state: 'exception', reason: 'malformed-payload' });
  t.same(kept.labels, { pool: 'builders' }, 'only valid labels');
});

t.test('another plugin fails: the summary says exception/internal-error', async (t) => {
  const outcome = await runPluginLifecycle(await summary(), { payload: { mock: {} }, throwIn: 'prepare' });
  t.equal(outcome.resolution.reason, 'internal-error');
  t.same(JSON.parse(outcome.artifacts[SUMMARY]).resolution, { state: 'exception', reason: 'internal-error' });
});

t.test('canceled, claim lost: the run is no longer ours, so nothing is uploaded; shutdown is summarized', async (t) => {
  const harness = await pluginHarness(await summary());
  t.teardown(() => harness.close());
  for (const interrupt of ['cancel', 'claim-lost']) {
    const outcome = await harness.run({ payload: { mock: {} }, interrupt });
    t.equal(outcome.resolution, undefined, interrupt);
    t.same(outcome.artifacts, {}, `${interrupt}: no summary`);
    t.same(outcome.hooks, ['newTask', 'buildSandbox'], `${interrupt}: neither finished nor exception`);
  }
  const shutdown = await harness.run({ payload: { mock: {} }, interrupt: 'shutdown' });
  t.same(JSON.parse(shutdown.artifacts[SUMMARY]).resolution, { state: 'exception', reason: 'worker-shutdown' });
});

t.test('config: checked against the module\'s configSchema, every problem at once', async (t) => {
  t.equal((await summary({ name: 'public/run.json' })).name, 'summary');
  const outcome = await runPluginLifecycle(await summary({ name: 'public/run.json' }), { payload: { mock: {} } });
  t.ok(outcome.artifacts['public/run.json'], 'the configured artifact name');
  await t.rejects(summary({ name: '/abs.txt', colour: 'red' }), { code: 'DROVER_CONFIG', message: /config\.name: must match pattern[\s\S]*config\.colour: is not a known property|config\.colour: is not a known property[\s\S]*config\.name: must match pattern/ });
});
