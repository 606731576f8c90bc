/**
 * A worker that is told to stop, and one that dies: no task is lost, none
 * is completed twice, and nothing of a dead worker's tasks survives its
 * next start.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { groupPids } from '../src/hosts/proc.js';
import { eventually, readTask, resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';

/** A task that hangs on its first run and completes on the next, telling each run apart by a marker file. */
function hangsOnce(dir: string, name: string): string {
  const marker = join(dir, `${name}.marker`);
  return `echo $$ > ${join(dir, `${name}.pid`)}; if [ -e ${marker} ]; then echo second run; else touch ${marker}; sleep 1000 & sleep 1000; wait; fi`;
}

function pidFrom(file: string): Promise<number> {
  return eventually(`${file} to be written`, () => existsSync(file) && Number(readFileSync(file, 'utf8').trim()) > 0 && Number(readFileSync(file, 'utf8').trim()));
}

t.test('SIGTERM mid-task: the run resolves exception/worker-shutdown and another worker completes the task', async (t) => {
  const cwd = t.testdir({});
  const id = await submit(['--', hangsOnce(cwd, 'job')], { cwd });
  const first = startWorker(['--shutdown-grace', '0.5', '--worker-id', 'first'], { cwd });
  const pgid = await pidFrom(join(cwd, 'job.pid'));
  first.child.kill('SIGTERM');
  t.equal(await first.exited, 4, 'exit code 4 says: stopped by a signal', { log: first.log() });
  t.match(first.log(), /shutting down gracefully/);
  t.same(groupPids(pgid), [], 'the aborted run left no process');

  const second = startWorker(['--once', '--worker-id', 'second'], { cwd });
  t.equal(await second.exited, 0, 'exit code 0', { log: second.log() });
  const task = await readTask(join(cwd, '.drover'), id);
  t.same(runOutcomes(task), ['exception/worker-shutdown', 'completed']);
  t.same(task.runs.map((run) => run.workerId), ['first', 'second']);
});

t.test('SIGTERM lets a task that ends within the grace period complete', async (t) => {
  const cwd = t.testdir({});
  const id = await submit(['--', `echo $$ > ${join(cwd, 'short.pid')}; sleep 0.5; echo done`], { cwd });
  const worker = startWorker(['--shutdown-grace', '20'], { cwd });
  await pidFrom(join(cwd, 'short.pid'));
  worker.child.kill('SIGTERM');
  t.equal(await worker.exited, 4);
  t.same(runOutcomes(await readTask(join(cwd, '.drover'), id)), ['completed']);
});

t.test('a second SIGTERM aborts running tasks without waiting for the grace period', async (t) => {
  const cwd = t.testdir({});
  const id = await submit(['--', hangsOnce(cwd, 'job')], { cwd });
  const worker = startWorker(['--shutdown-grace', '600'], { cwd });
  await pidFrom(join(cwd, 'job.pid'));
  worker.child.kill('SIGTERM');
  await eventually('the worker to start shutting down', () => worker.log().includes('shutting down gracefully'));
  worker.child.kill('SIGTERM');
  t.equal(await worker.exited, 4, 'exit code 4', { log: worker.log() });
  t.same(runOutcomes(await readTask(join(cwd, '.drover'), id)).slice(0, 1), ['exception/worker-shutdown']);
});

t.test('kill -9 mid-task: its agent stops the task, the claim expires, another worker re-runs the task, and the restarted worker reaps the leftovers', async (t) => {
  const cwd = t.testdir({});
  const env = { DROVER_CLAIM_TIMEOUT: '2' };
  const id = await submit(['--', hangsOnce(cwd, 'job')], { cwd, env });
  const doomed = startWorker(['--work-dir', 'doomed-work', '--worker-id', 'doomed'], { cwd, env });
  const pgid = await pidFrom(join(cwd, 'job.pid'));
  const taskDir = join(cwd, 'doomed-work', 'tasks', `${id}-0`);
  t.ok(existsSync(taskDir), 'the task directory exists while it runs');
  doomed.child.kill('SIGKILL');
  await doomed.exited;
  // The agent that started them sees the worker gone and stops them (SIGTERM), so they do not run on beside the re-run.
  // (When the agent dies with the worker, the restarted worker's journal reaps them: crash-journal.test.ts.)
  await eventually('the dead worker\'s agent to stop its task processes', () => groupPids(pgid).length === 0);

  const rescuer = startWorker(['--work-dir', 'rescuer-work', '--worker-id', 'rescuer', '--number-of-tasks-to-run', '1'], { cwd, env });
  t.equal(await rescuer.exited, 0, 'exit code 0', { log: rescuer.log() });
  const task = await resolved(join(cwd, '.drover'), id);
  t.same(runOutcomes(task), ['exception/claim-expired', 'completed'], 'run 0 expired, run 1 completed');
  t.same(task.runs.map((run) => run.workerId), ['doomed', 'rescuer']);

  t.ok(existsSync(taskDir), 'until the dead worker starts again, its task directory is there');
  const restarted = startWorker(['--work-dir', 'doomed-work', '--worker-id', 'doomed', '--once'], { cwd, env });
  t.equal(await restarted.exited, 0, 'exit code 0', { log: restarted.log() });
  t.same(groupPids(pgid), [], 'no process of the dead run is back');
  t.notOk(existsSync(taskDir), 'the orphaned task directory is gone');
  t.same(readdirSync(join(cwd, 'doomed-work', 'journal')), [], 'the crash journal is empty');
  t.same(runOutcomes(await readTask(join(cwd, '.drover'), id)), ['exception/claim-expired', 'completed'], 'nothing ran twice');
});
