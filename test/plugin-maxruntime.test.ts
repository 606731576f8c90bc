/**
 * The maxruntime plugin: the payload's `maxRunTime` is its property (no
 * engine declares it any more), and the limit reaches the task machine
 * through the plugins' `maxRunTimeMs` hook, the shortest one winning. On a
 * simulated clock with the mock engine, so no test sleeps.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import { SimulatedClock } from 'xstate';
import { MockEngine } from '../src/engines/mock.js';
import { ProcessEngine } from '../src/engines/process.js';
import { livelogPlugin } from '../src/plugins/livelog.js';
import { maxruntimePlugin } from '../src/plugins/maxruntime.js';
import type { Plugin } from '../src/plugins/plugin.js';
import { compilePayloadValidator } from '../src/runtime/schema.js';
import { startTaskRun } from '../src/testing/task-run.js';
import type { Payload } from '../src/model/task.js';

/**
 * Starts a hanging mock command and moves the machine's clock to just
 * before `limitMs`, then to it: the machine takes the MAX_RUN_TIME
 * transition synchronously, inside `increment`, so no test waits on time.
 */
async function stopsAt(t: Test, limitMs: number, payload: Payload, plugins: readonly Plugin[]) {
  const clock = new SimulatedClock();
  const engine = new MockEngine({ clock });
  const run = await startTaskRun({ payload: { mock: { hang: true }, ...payload }, engine, plugins, clock });
  t.teardown(() => run.close());
  await settle(() => engine.runs[0]?.state === 'started');
  clock.increment(limitMs - 1);
  t.same(run.actor.getSnapshot().value, { claimed: { running: 'executing' } }, `still running 1 ms before ${limitMs} ms`);
  clock.increment(1);
  t.not(JSON.stringify(run.actor.getSnapshot().value), JSON.stringify({ claimed: { running: 'executing' } }), `stopped at ${limitMs} ms`);
  const output = await run.output;
  t.ok(engine.runs[0]?.aborted, 'the command was aborted');
  return output;
}

/** Lets the run go on (real I/O: the task directory) until `done` holds, for at most 5 s of real time. */
async function settle(done: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !done(); i++) await sleep(10);
}

t.test('maxRunTime is the plugin\'s schema, not the engines\'', async (t) => {
  const schema = maxruntimePlugin().payloadSchema!;
  t.same(Object.keys(schema.properties), ['maxRunTime']);
  const validate = compilePayloadValidator(schema);
  t.doesNotThrow(() => validate({ maxRunTime: 30 }));
  for (const bad of [0, -4, 1.5, '30']) t.throws(() => validate({ maxRunTime: bad }), /payload\.maxRunTime/, JSON.stringify(bad));
  t.notOk('maxRunTime' in new ProcessEngine().payloadSchema.properties);
  t.notOk('maxRunTime' in new MockEngine().payloadSchema.properties);
});

t.test('without the plugin, a payload with maxRunTime is refused as an unknown field', async (t) => {
  const run = await startTaskRun({ payload: { mock: {}, maxRunTime: 5 }, plugins: [livelogPlugin()] });
  t.teardown(() => run.close());
  const { resolution } = await run.output;
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload');
  t.match(resolution?.message, 'payload.maxRunTime');
});

t.test('the command is stopped when maxRunTime passes on the machine\'s clock, and the run fails', async (t) => {
  const output = await stopsAt(t, 5000, { maxRunTime: 5 }, [maxruntimePlugin(), livelogPlugin()]);
  t.same(output.resolution, { state: 'failed', message: 'maxRunTime of 5 s exceeded' });
});

t.test('the shortest limit of all plugins applies', async (t) => {
  const strict: Plugin = { name: 'strict', newTask: () => ({ maxRunTimeMs: () => 2000 }) };
  const output = await stopsAt(t, 2000, { maxRunTime: 5 }, [maxruntimePlugin(), strict, livelogPlugin()]);
  t.same(output.resolution, { state: 'failed', message: 'maxRunTime of 2 s exceeded' });
});

t.test('without maxRunTime nothing stops the command', async (t) => {
  const clock = new SimulatedClock();
  const engine = new MockEngine({ clock });
  const run = await startTaskRun({ payload: { mock: { runFor: 3_600_000 } }, engine, plugins: [maxruntimePlugin(), livelogPlugin()], clock });
  t.teardown(() => run.close());
  await settle(() => engine.runs[0]?.state === 'started');
  clock.increment(3_600_000);
  t.same((await run.output).resolution, { state: 'completed' });
  t.equal(engine.runs[0]?.aborted, false);
});
