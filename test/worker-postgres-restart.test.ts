/**
 * The PostgreSQL server restarts while workers run tasks (on a throw-away
 * server of this test's own, never the shared one): the workers keep their
 * running tasks, retry what failed, and every task completes with its
 * resolution recorded exactly once.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { PostgresQueue } from '../src/queues/postgres.js';
import type { TaskStatus } from '../src/queues/queue.js';
import { eventually, runOutcomes, startWorker } from './helpers/drover.js';
import { startThrowawayServer } from './helpers/postgres.js';

const TASKS = 60;

t.test('PostgreSQL restarted mid-run: every task completes, each resolution recorded once', { timeout: 90_000 }, async (t) => {
  const server = await startThrowawayServer(t);
  const cwd = t.testdir({});
  const ledger = join(cwd, 'ledger');
  const queue = await PostgresQueue.open({ url: server.url, poolSize: 2 });
  t.teardown(() => queue.close());
  const ids = new Set<string>();
  for (let i = 0; i < TASKS; i++) {
    ids.add(await queue.submit({ payload: { command: `sleep 0.4; echo "$TASK_ID $RUN_ID" >> ${ledger}` }, deadline: Date.now() + 3_600_000, retries: 2 }));
  }
  // Claims long enough to outlast the restart: a run that expired would be a second run, not the fault this test is after.
  const env = { DROVER_QUEUE: server.url, DROVER_CLAIM_TIMEOUT: '15', DROVER_POLL_WAIT: '1' };
  const workers = [1, 2].map((n) => startWorker(['--capacity', '4', '--worker-id', `w${n}`, '--work-dir', `work-${n}`], { cwd, env }));
  t.teardown(() => workers.forEach((w) => w.child.kill('SIGKILL')));

  const lines = () => (existsSync(ledger) ? readFileSync(ledger, 'utf8').trim().split('\n').length : 0);
  await eventually('a few tasks to complete', () => lines() >= 10, 30_000);
  const running = (await queue.listTasks({ state: 'running', limit: 1_000 })).length;
  t.ok(running > 0, `${running} tasks were running when the server went down`);
  // Down for 2 s: long enough that reports, reclaims and log writes surely fail and must be retried.
  await server.restart(2_000);
  t.comment(`restarted after ${lines()} of ${TASKS} tasks`);

  const tasks = await eventually('every task to resolve', async () => {
    const all = await queue.listTasks({ limit: 1_000 }).catch(() => [] as TaskStatus[]); // the first query may meet a dead connection
    return all.length === TASKS && all.every((s) => s.state !== 'pending' && s.state !== 'running') ? all : undefined;
  }, 60_000);
  for (const worker of workers) worker.child.kill('SIGTERM');
  t.same(await Promise.all(workers.map((w) => w.exited)), [4, 4], 'both workers were still alive and stopped on SIGTERM');

  const logs = workers.map((w) => w.log()).join('\n');
  t.match(logs, /retrying/, 'the workers met the outage and retried', { logs: logs.slice(-3000) });
  const odd = tasks.filter((s) => runOutcomes(s).join() !== 'completed');
  t.same(odd.map((s) => ({ taskId: s.taskId, runs: runOutcomes(s) })), [], 'every task completed in one run: no claim was lost, no report applied twice');
  const ledgerLines = readFileSync(ledger, 'utf8').trim().split('\n');
  t.equal(ledgerLines.length, TASKS, 'each command ran once');
  t.same(new Set(ledgerLines.map((line) => line.split(' ')[0])), ids);
  for (const s of tasks.slice(0, 10)) {
    const log = await queue.readArtifact({ taskId: s.taskId, runId: 0 }, 'public/logs/live.log');
    let text = '';
    for await (const chunk of log) text += String(chunk);
    t.match(text, /claimed run 0[\s\S]*resolved completed/, `${s.taskId}: its live log is whole`);
  }
});
