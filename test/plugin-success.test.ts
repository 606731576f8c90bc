/**
 * The success plugin: exit status 0 completes the run, anything else fails
 * it, and the payload's onExitStatus turns chosen codes into a retry
 * (exception/intermittent-task) or a cache purge. Runs go through the real
 * task runner with the mock engine; the last test runs a real worker.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { livelogPlugin } from '../src/plugins/livelog.js';
import { successPlugin } from '../src/plugins/success.js';
import type { Payload } from '../src/model/task.js';
import type { Plugin } from '../src/plugins/plugin.js';
import { startTaskRun } from '../src/testing/task-run.js';
import { resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';

async function resolutionOf(payload: Payload, options: { plugins?: readonly Plugin[]; retries?: number } = {}) {
  const run = await startTaskRun({ payload, plugins: options.plugins ?? [livelogPlugin(), successPlugin()], ...(options.retries !== undefined && { retries: options.retries }) });
  try {
    const output = await run.output;
    return { resolution: output.resolution, task: await run.queue.task(run.claim.taskId) };
  } finally {
    await run.close();
  }
}

t.test('exit status 0 completes the run', async (t) => {
  const { resolution } = await resolutionOf({ mock: { exitCode: 0 } });
  t.same(resolution, { state: 'completed' });
});

t.test('any other exit status fails the run, naming the code', async (t) => {
  const { resolution } = await resolutionOf({ mock: { exitCode: 3 } });
  t.equal(resolution?.state, 'failed');
  t.match(resolution?.message, /exited with code 3/);
});

t.test('a command killed by a signal, or one that could not start, fails', async (t) => {
  const killed = await resolutionOf({ mock: { exitSignal: 'SIGKILL' } });
  t.equal(killed.resolution?.state, 'failed');
  t.match(killed.resolution?.message, /killed by SIGKILL/);
  const unstarted = await resolutionOf({ mock: { startError: 'spawn nope ENOENT' } });
  t.equal(unstarted.resolution?.state, 'failed');
  t.match(unstarted.resolution?.message, /could not start: spawn nope ENOENT/);
});

t.test('onExitStatus.retry: a listed code resolves exception/intermittent-task and the queue runs the task again', async (t) => {
  const { resolution, task } = await resolutionOf({ mock: { exitCode: 75 }, onExitStatus: { retry: [75] } }, { retries: 1 });
  t.same(resolution, { state: 'exception', reason: 'intermittent-task', message: resolution?.state === 'exception' ? resolution.message : '' });
  t.match(resolution?.message, /exited with code 75.*onExitStatus\.retry/);
  t.same(runOutcomes(task), ['exception/intermittent-task', 'pending'], 'a new run waits');
  t.equal(task.state, 'pending');
});

t.test('onExitStatus.retry: a code not listed still fails, and 0 still completes', async (t) => {
  const other = await resolutionOf({ mock: { exitCode: 1 }, onExitStatus: { retry: [75] } });
  t.equal(other.resolution?.state, 'failed');
  const zero = await resolutionOf({ mock: { exitCode: 0 }, onExitStatus: { retry: [75] } });
  t.equal(zero.resolution?.state, 'completed');
});

t.test('onExitStatus.purgeCaches: a listed code purges the caches, and the verdict stays the code\'s', async (t) => {
  const purged: number[] = [];
  const plugin = successPlugin({ purgeCaches: (_options, code) => void purged.push(code) });
  const { resolution } = await resolutionOf({ mock: { exitCode: 4 }, onExitStatus: { purgeCaches: [4] } }, { plugins: [plugin] });
  t.equal(resolution?.state, 'failed');
  t.same(purged, [4]);
  const none = await resolutionOf({ mock: { exitCode: 5 }, onExitStatus: { purgeCaches: [4] } }, { plugins: [plugin] });
  t.equal(none.resolution?.state, 'failed');
  t.same(purged, [4], 'not for another code');
});

t.test('onExitStatus is checked against its schema: unknown keys and non-codes are malformed-payload', async (t) => {
  const { resolution } = await resolutionOf({ mock: {}, onExitStatus: { retry: ['x'], again: [1] } });
  t.equal(resolution?.state, 'exception');
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload');
  t.match(resolution?.message, /payload\.onExitStatus\.retry\[0\]/);
  t.match(resolution?.message, /payload\.onExitStatus\.again/);
});

t.test('without the success plugin the exit status still decides', async (t) => {
  t.equal((await resolutionOf({ mock: { exitCode: 0 } }, { plugins: [livelogPlugin()] })).resolution?.state, 'completed');
  t.equal((await resolutionOf({ mock: { exitCode: 2 }, }, { plugins: [livelogPlugin()] })).resolution?.state, 'failed');
});

t.test('a failed verdict of another plugin wins over the exit status', async (t) => {
  const veto: Plugin = { name: 'veto', newTask: () => ({ stopped: async () => ({ state: 'failed', message: 'vetoed' }) }) };
  const { resolution } = await resolutionOf({ mock: { exitCode: 0 } }, { plugins: [successPlugin(), veto] });
  t.same(resolution, { state: 'failed', message: 'vetoed' });
});

t.test('end to end: a worker retries a task whose exit code onExitStatus.retry lists', async (t) => {
  const cwd = t.testdir();
  // Each run has its own task directory: the mark of the first run lives beside the queue.
  const mark = join(cwd, 'ran-once');
  writeFileSync(join(cwd, 'flaky.json'), JSON.stringify({ command: `test -e ${mark} && exit 0; touch ${mark}; exit 75`, onExitStatus: { retry: [75] } }));
  const worker = startWorker(['--capacity', '1'], { cwd });
  t.teardown(async () => {
    worker.child.kill('SIGKILL');
    await worker.exited;
  });
  const id = await submit(['--retries', '1', '--payload', 'flaky.json'], { cwd });
  const task = await resolved(join(cwd, '.drover'), id);
  t.same(runOutcomes(task), ['exception/intermittent-task', 'completed']);
});
