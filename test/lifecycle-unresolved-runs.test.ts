/**
 * Regression: a run that ends without a resolution from this worker (the
 * task was canceled, the claim was lost, the queue refused the report) left
 * no trace in the worker's log: the refused report was rethrown unlogged,
 * a lost claim or a cancel logged nothing, and the worker machine dropped
 * the task's output. Now the run's cleanup says so once, naming the task,
 * the run and the reason. A real worker in this process: the embedded
 * queue, this machine's host, real commands.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import type { Plugin } from '../src/plugins/plugin.js';
import { createLogger } from '../src/runtime/logger.js';
import { eventually } from './helpers/drover.js';
import { localWorker } from './helpers/worker.js';

function worker(t: Test, options: { claimTimeoutMs: number; plugins?: readonly Plugin[] }) {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => lines.push(line) });
  const { worker: running, queue } = localWorker(t, t.testdir({}), { ...options, logger, workerId: 'unresolved-worker', pollWaitMs: 100 });
  return { worker: running, lines, queue };
}

/** The worker's lines about the run's end without a resolution, for one task. */
function unresolvedLines(lines: readonly string[], taskId: string): string[] {
  return lines.filter((line) => line.includes('the run ends unresolved') && line.includes(`taskId=${taskId}`));
}

t.test('a canceled run: warned once, with the task, the run and the reason', async (t) => {
  const { lines, queue } = worker(t, { claimTimeoutMs: 10_000 });
  const id = await queue.submit({ payload: { command: 'sleep 30' }, deadline: Date.now() + 60_000, retries: 0 });
  await eventually('the command to run', async () => (await queue.task(id)).state === 'running' && lines.some((line) => line.includes('claimed')));
  await queue.cancel(id);
  const [line] = await eventually('the log to say the run ends unresolved', () => unresolvedLines(lines, id).length > 0 && unresolvedLines(lines, id));
  t.match(line, new RegExp(`warn\\s+the run ends unresolved: the task was canceled taskId=${id} runId=0 reason=canceled`));
  await sleep(300);
  t.equal(unresolvedLines(lines, id).length, 1, 'once');
});

t.test('a run whose claim is lost (the deadline passed): warned once, with the queue\'s reason', async (t) => {
  const { worker: w, lines, queue } = worker(t, { claimTimeoutMs: 3000 });
  // The task must be claimed before its deadline: the worker's boot is not to count against it.
  await eventually('the worker to be claiming', () => w.state() === 'claiming.polling');
  const id = await queue.submit({ payload: { command: 'sleep 30' }, deadline: Date.now() + 5000, retries: 0 });
  const [line] = await eventually('the log to say the run ends unresolved', () => unresolvedLines(lines, id).length > 0 && unresolvedLines(lines, id));
  t.match(line, new RegExp(`warn\\s+the run ends unresolved: the claim was lost taskId=${id} runId=0 reason=claim-lost detail=".*deadline passed`));
  await sleep(300);
  t.equal(unresolvedLines(lines, id).length, 1, 'once');
});

t.test('a run whose report the queue refuses: an error, once, with the refused resolution and the queue\'s answer', async (t) => {
  // The command ends at once; a slow upload (a plugin's finished hook) lasts until the task's deadline has
  // passed, however soon the task was claimed. The claim is long, so no reclaim notices the loss first: the
  // report does.
  let deadline = 0;
  const slowUpload: Plugin = { name: 'slow-upload', newTask: () => ({ finished: () => sleep(Math.max(0, deadline - Date.now()) + 500) }) };
  const { worker: w, lines, queue } = worker(t, { claimTimeoutMs: 60_000, plugins: [slowUpload] });
  // The task must be claimed before its deadline: the worker's boot is not to count against it.
  await eventually('the worker to be claiming', () => w.state() === 'claiming.polling');
  deadline = Date.now() + 5000;
  const id = await queue.submit({ payload: { command: 'true' }, deadline, retries: 0 });
  const [line] = await eventually('the log to say the run ends unresolved', () => unresolvedLines(lines, id).length > 0 && unresolvedLines(lines, id));
  t.match(line, new RegExp(`error\\s+the run ends unresolved: the queue refused its resolution taskId=${id} runId=0 reason=report-refused resolution=completed detail="the queue refused the report: .*deadline`));
  await sleep(300);
  t.equal(unresolvedLines(lines, id).length, 1, 'once');
});

t.test('a run the queue takes the resolution of says nothing of the kind', async (t) => {
  const { lines, queue } = worker(t, { claimTimeoutMs: 10_000 });
  const id = await queue.submit({ payload: { command: 'true' }, deadline: Date.now() + 60_000, retries: 0 });
  await eventually('the task to complete', async () => (await queue.task(id)).state === 'completed');
  await sleep(300);
  t.same(unresolvedLines(lines, id), []);
});
