/**
 * Regression: a maxRunTime the task machine's timer cannot keep. Node's
 * setTimeout (xstate's `after`) turns a delay above 2^31-1 ms (about 24.8
 * days) into 1 ms, so such a limit used to stop the command at once and
 * resolve the run `failed`; a JavaScript plugin's limit of null became
 * Math.min(null) = 0, with the same end. Real commands (the process engine),
 * real time: the command must run to its end, or the run must say what was
 * wrong and where.
 */
import t, { type Test } from 'tap';
import { ProcessEngine } from '../src/engines/process.js';
import { livelogPlugin } from '../src/plugins/livelog.js';
import { MAX_RUN_TIME_SECONDS, maxruntimePlugin } from '../src/plugins/maxruntime.js';
import { MAX_RUN_TIME_LIMIT_MS, type Plugin } from '../src/plugins/plugin.js';
import { startTaskRun } from '../src/testing/task-run.js';
import type { Payload } from '../src/model/task.js';

/** A command that runs for 300 ms, long enough that a limit taken for 1 ms would stop it. */
const COMMAND = ['sh', '-c', 'sleep 0.3; echo ran to its end'];

async function resolve(t: Test, payload: Payload, plugins: readonly Plugin[]) {
  const run = await startTaskRun({ payload, engine: new ProcessEngine({ killGraceMs: 200 }), plugins: [...plugins, livelogPlugin()] });
  t.teardown(() => run.close());
  return (await run.output).resolution;
}

t.test('the limit is the timer\'s: 2147483 s', async (t) => {
  t.equal(MAX_RUN_TIME_SECONDS, 2_147_483);
  t.ok(MAX_RUN_TIME_SECONDS * 1000 <= MAX_RUN_TIME_LIMIT_MS && (MAX_RUN_TIME_SECONDS + 1) * 1000 > MAX_RUN_TIME_LIMIT_MS);
});

t.test('a maxRunTime past the limit is a malformed payload naming the field and the limit', async (t) => {
  const resolution = await resolve(t, { command: COMMAND, maxRunTime: MAX_RUN_TIME_SECONDS + 1 }, [maxruntimePlugin()]);
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload', 'not failed by a timer that fired at once');
  t.match(resolution?.message, `payload.maxRunTime: must be <= ${MAX_RUN_TIME_SECONDS}`);
});

t.test('a maxRunTime of a year is refused too, not taken for 1 ms', async (t) => {
  const resolution = await resolve(t, { command: COMMAND, maxRunTime: 365 * 24 * 3600 }, [maxruntimePlugin()]);
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload');
  t.match(resolution?.message, 'payload.maxRunTime');
});

t.test('the longest maxRunTime allowed lets the command run to its end', async (t) => {
  const resolution = await resolve(t, { command: COMMAND, maxRunTime: MAX_RUN_TIME_SECONDS }, [maxruntimePlugin()]);
  t.same(resolution, { state: 'completed' });
});

t.test('a plugin\'s limit that is not a number of ms in 1..2^31-1 fails the run naming the plugin', async (t) => {
  const limits: [unknown, string][] = [
    [null, 'null'],
    [0, '0'],
    [MAX_RUN_TIME_LIMIT_MS + 1, String(MAX_RUN_TIME_LIMIT_MS + 1)],
    [Infinity, 'Infinity'],
    [Number.NaN, 'NaN'],
    ['5000', '"5000"'],
  ];
  for (const [limit, shown] of limits) {
    const sloppy: Plugin = { name: 'sloppy', newTask: () => ({ maxRunTimeMs: () => limit as number }) };
    const resolution = await resolve(t, { command: COMMAND }, [sloppy]);
    t.same(resolution, {
      state: 'exception',
      reason: 'internal-error',
      message: `plugin sloppy: maxRunTimeMs failed: it gave ${shown}, not a number of milliseconds in 1..${MAX_RUN_TIME_LIMIT_MS}`,
    }, `a limit of ${shown}`);
  }
});

t.test('a plugin\'s limit of 2^31-1 ms lets the command run to its end', async (t) => {
  const generous: Plugin = { name: 'generous', newTask: () => ({ maxRunTimeMs: () => MAX_RUN_TIME_LIMIT_MS }) };
  t.same(await resolve(t, { command: COMMAND }, [generous]), { state: 'completed' });
});
