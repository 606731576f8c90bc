/**
 * The plugin harness of drover/testing: a plugin run through whole task
 * lifecycles with the mock engine and an in-memory queue, on every path a
 * plugin author must handle, reports the hooks the plugin saw, the
 * resolution, the command's env, the artifacts and the log.
 */
import { Readable } from 'node:stream';
import t from 'tap';
import { LIVE_LOG_NAME, livelogPlugin } from '../src/plugins/livelog.js';
import type { Plugin, TaskPlugin } from '../src/plugins/plugin.js';
import { pluginFromModule } from '../src/testing/from-module.js';
import { pluginHarness, runPluginLifecycle } from '../src/testing/plugin-harness.js';
import { startTaskRun } from '../src/testing/task-run.js';

/** A plugin that sets an env var, uploads a note when the run ends, and counts boots and shutdowns. */
function notePlugin(events: string[] = []): Plugin {
  return {
    name: 'note',
    payloadSchema: { type: 'object', properties: { note: { type: 'string' } } },
    boot: async () => void events.push('boot'),
    shutdown: async () => void events.push('shutdown'),
    newTask: ({ claim, queue, workerId, payload, log }) => ({
      buildSandbox: async (builder) => {
        log.line('note: sandbox built');
        builder.setEnv('NOTE', String(payload['note'] ?? 'none'));
      },
      stopped: async () => undefined,
      finished: async (resolution) => {
        await queue.uploadArtifact(claim, workerId, { name: 'public/note.txt', contentType: 'text/plain' }, Readable.from([`${resolution.state} ${String(payload['note'])}`]));
      },
      exception: async (reason) => void events.push(`exception ${reason}`),
      dispose: async () => void events.push('dispose'),
    }),
  };
}

t.test('a completed run: hooks in contract order, env, artifacts, log; boot and shutdown around it', async (t) => {
  const events: string[] = [];
  const outcome = await runPluginLifecycle(notePlugin(events), { payload: { mock: { stdout: 'hello\n' }, note: 'hi' } });
  t.same(outcome.resolution, { state: 'completed' });
  t.same(outcome.hooks, ['newTask', 'buildSandbox', 'stopped', 'finished', 'dispose']);
  t.same(outcome.failures, []);
  t.equal(outcome.env?.['NOTE'], 'hi');
  t.same(outcome.artifacts, { 'public/note.txt': 'completed hi' });
  t.match(outcome.log, /hello\n/);
  t.match(outcome.log, /\[drover\] note: sandbox built/);
  t.equal(outcome.task.state, 'completed');
  t.same(events, ['boot', 'dispose', 'shutdown']);
});

t.test('a command that fails: failed, and the plugin still uploads', async (t) => {
  const outcome = await runPluginLifecycle(notePlugin(), { payload: { mock: { exitCode: 3 }, note: 'x' } });
  t.equal(outcome.resolution?.state, 'failed');
  t.same(outcome.artifacts, { 'public/note.txt': 'failed x' });
});

t.test('a malformed payload: exception/malformed-payload, the exception hook instead of the stages', async (t) => {
  const events: string[] = [];
  const outcome = await runPluginLifecycle(notePlugin(events), { payload: { mock: {}, note: 7 } });
  t.equal(outcome.resolution?.state, 'exception');
  t.match(outcome.resolution?.message, /payload\.note/);
  t.same(outcome.hooks, ['newTask', 'exception', 'dispose']);
  t.equal(outcome.env, undefined, 'the command was never prepared');
  t.ok(events.includes('exception malformed-payload'));
});

t.test('interrupts while the command runs: cancel, claim lost, worker shutdown', async (t) => {
  const harness = await pluginHarness(notePlugin());
  t.teardown(() => harness.close());
  const canceled = await harness.run({ payload: { mock: {} }, interrupt: 'cancel' });
  t.equal(canceled.unreported, 'canceled');
  t.equal(canceled.resolution, undefined);
  t.same(canceled.hooks, ['newTask', 'buildSandbox', 'dispose'], 'no stopped, finished or exception: the run is not ours to report');
  t.equal(canceled.task.runs[0]?.reasonResolved, 'canceled');
  t.ok(harness.engine.runs.at(-1)?.aborted, 'the command was stopped');

  const lost = await harness.run({ payload: { mock: {} }, interrupt: 'claim-lost' });
  t.equal(lost.unreported, 'claim-lost');
  t.same(lost.hooks, ['newTask', 'buildSandbox', 'dispose']);

  const shutdown = await harness.run({ payload: { mock: {} }, interrupt: 'shutdown' });
  t.equal(shutdown.resolution?.state === 'exception' && shutdown.resolution.reason, 'worker-shutdown');
  t.same(shutdown.hooks, ['newTask', 'buildSandbox', 'exception', 'dispose']);
  t.same(Object.keys(shutdown.artifacts), [], 'no note for an exception');
});

t.test('another plugin\'s hook throws: a clear resolution naming it, and this plugin is disposed', async (t) => {
  const prepare = await runPluginLifecycle(notePlugin(), { payload: { mock: {} }, throwIn: 'prepare' });
  t.equal(prepare.resolution?.state === 'exception' && prepare.resolution.reason, 'internal-error');
  t.match(prepare.resolution?.message, /plugin harness-faulty: prepare failed/);
  t.same(prepare.hooks, ['newTask', 'exception', 'dispose']);
  const finished = await runPluginLifecycle(notePlugin(), { payload: { mock: {} }, throwIn: 'finished' });
  t.match(finished.resolution?.message, /plugin harness-faulty: finished failed/);
  t.same(finished.hooks, ['newTask', 'buildSandbox', 'stopped', 'finished', 'dispose']);
  const newTask = await runPluginLifecycle(notePlugin(), { payload: { mock: {} }, throwIn: 'newTask' });
  t.match(newTask.resolution?.message, /plugin harness-faulty: newTask failed/);
  t.same(newTask.hooks, ['newTask', 'exception', 'dispose']);
});

t.test('the plugin\'s own hook throws: recorded as a failure, and the resolution names the plugin', async (t) => {
  const broken: Plugin = { name: 'broken', newTask: () => ({ buildSandbox: async () => { throw new Error('no disk'); }, dispose: async () => {} }) };
  const outcome = await runPluginLifecycle(broken, { payload: { mock: {} } });
  t.same(outcome.failures, [{ hook: 'buildSandbox', message: 'no disk' }]);
  t.match(outcome.resolution?.message, /plugin broken: buildSandbox failed: no disk/);
  t.same(outcome.hooks, ['newTask', 'buildSandbox', 'dispose']);
});

t.test('a plugin that breaks the hook contract: the run names it, and the other plugins still hear of it and are disposed', async (t) => {
  /** A well-behaved plugin that records its exception and dispose hooks. */
  const witness = (calls: string[]): Plugin => ({
    name: 'witness',
    newTask: () => ({ exception: async (reason) => void calls.push(`exception ${reason}`), dispose: async () => void calls.push('dispose') }),
  });
  const runWith = async (broken: Plugin, calls: string[]) => {
    const run = await startTaskRun({ payload: { mock: {} }, plugins: [livelogPlugin(), witness(calls), broken] });
    t.teardown(() => run.close());
    const output = await run.output;
    const log = (await run.queue.listArtifacts(run.claim)).find((artifact) => artifact.name === LIVE_LOG_NAME);
    return { output, log };
  };

  // A JavaScript plugin's newTask can return anything; one that returns no object is its own failure.
  const noHooks: string[] = [];
  const nothing = await runWith({ name: 'hookless', newTask: () => undefined as unknown as TaskPlugin }, noHooks);
  t.match(nothing.output.resolution, { state: 'exception', reason: 'internal-error', message: /^plugin hookless: newTask failed: it returned undefined, not an object of hooks/ });
  t.same(noHooks, ['exception internal-error', 'dispose']);
  t.equal(nothing.log?.state, 'complete', 'the live log is finished');

  // A hook whose getter throws counts as present: its call fails as any hook's would.
  const badGetter: string[] = [];
  const getter = await runWith({
    name: 'getter',
    newTask: () => ({
      get finished(): never {
        throw new Error('no finished hook today');
      },
    }),
  }, badGetter);
  t.match(getter.output.resolution, { state: 'exception', reason: 'internal-error', message: /^plugin getter: finished failed: no finished hook today/ });
  t.same(badGetter, ['dispose'], 'the command ran, so no exception hook; disposed all the same');
  t.equal(getter.log?.state, 'complete');
});

t.test('pluginFromModule makes a plugin as the worker does, refusing bad config and bad shapes', async (t) => {
  const module = {
    default: {
      configSchema: { type: 'object', properties: { level: { type: 'integer' } }, additionalProperties: false },
      createPlugin: (config: { level?: number }) => ({ name: `level-${config.level ?? 0}` }),
    },
  };
  t.equal((await pluginFromModule(module, { level: 2 })).name, 'level-2');
  const bad = await pluginFromModule(module, { level: 'high', extra: 1 }).catch((error: Error & { code?: string }) => error);
  t.equal((bad as { code?: string }).code, 'DROVER_CONFIG');
  t.match((bad as Error).message, /config\.level: must be integer/, 'every problem at once, at its path');
  t.match((bad as Error).message, /config\.extra: is not a known property/);
  await t.rejects(pluginFromModule({ default: { createEngine: () => ({}) } }), { message: /an engine module/ });
});
