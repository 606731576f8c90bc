/**
 * Many workers on one PostgreSQL queue: 4 worker processes drain 1000
 * tasks; every task resolves, each in exactly one run, and no run is
 * claimed twice (each command appends its task and run to one ledger file,
 * so a run done twice shows up twice).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { PostgresQueue } from '../src/queues/postgres.js';
import { startWorker } from './helpers/drover.js';
import { allTasks, freshSchema, PG_URL } from './helpers/postgres.js';

const TASKS = 1000;

t.test(`4 workers, ${TASKS} tasks: every task resolved, each run exactly once`, { timeout: 120_000 }, async (t) => {
  const cwd = t.testdir({});
  const schema = freshSchema(t);
  const ledger = join(cwd, 'ledger');
  const queue = await PostgresQueue.open({ url: PG_URL, schema, poolSize: 4 });
  t.teardown(() => queue.close());
  const deadline = Date.now() + 3_600_000;
  const ids = new Set<string>();
  // Half before the workers start, half while they run: the second half reaches them by NOTIFY.
  const submitMany = async (from: number, to: number) => {
    for (let i = from; i < to; i += 50) {
      const batch = Array.from({ length: Math.min(50, to - i) }, () =>
        queue.submit({ payload: { command: `echo "$TASK_ID $RUN_ID" >> ${ledger}` }, deadline, retries: 2 }));
      for (const id of await Promise.all(batch)) ids.add(id);
    }
  };
  await submitMany(0, TASKS / 2);

  const started = performance.now();
  const env = { DROVER_QUEUE: PG_URL, DROVER_QUEUE_SCHEMA: schema, DROVER_POLL_WAIT: '2', DROVER_POLL_INTERVAL: '0.5' };
  const workers = [1, 2, 3, 4].map((n) =>
    startWorker(['--capacity', '6', '--worker-id', `w${n}`, '--work-dir', `work-${n}`, '--idle-timeout', '2', '--log-level', 'warn'], { cwd, env }));
  t.teardown(() => workers.forEach((w) => w.child.kill('SIGKILL')));
  await submitMany(TASKS / 2, TASKS);
  const codes = await Promise.all(workers.map((w) => w.exited));
  const seconds = (performance.now() - started) / 1000;
  t.same(codes, [3, 3, 3, 3], 'every worker ran out of work and stopped on its idle timeout', { logs: workers.map((w) => w.log().slice(-2000)) });
  t.comment(`${TASKS} tasks on 4 workers in ${seconds.toFixed(1)} s (including 2 s idle timeout): ${(TASKS / seconds).toFixed(0)} tasks/s`);

  const lines = readFileSync(ledger, 'utf8').trim().split('\n');
  t.equal(lines.length, TASKS, 'the ledger has one line per task');
  t.same(new Set(lines.map((line) => line.split(' ')[0])), ids, 'and every task once');
  t.ok(lines.every((line) => line.endsWith(' 0')), 'all in their first run');

  const tasks = await allTasks(PG_URL, schema);
  t.equal(tasks.length, TASKS);
  const unusual = tasks.filter((task) => task.state !== 'completed' || task.runs.length !== 1 || task.runs[0]!.state !== 'completed');
  t.same(unusual.map((task) => ({ taskId: task.taskId, runs: task.runs.map((r) => `${r.state}/${r.reasonResolved}`) })), [], 'every task completed in exactly one run');
  const perWorker = new Map<string, number>();
  for (const task of tasks) perWorker.set(task.runs[0]!.workerId!, (perWorker.get(task.runs[0]!.workerId!) ?? 0) + 1);
  t.equal(perWorker.size, 4, `every worker took tasks: ${[...perWorker].map(([w, n]) => `${w} ${n}`).join(', ')}`);
  const [sample] = tasks;
  const log = await queue.readArtifact({ taskId: sample!.taskId, runId: 0 }, 'public/logs/live.log');
  let text = '';
  for await (const chunk of log) text += String(chunk);
  t.match(text, 'resolved completed', 'logs are stored in PostgreSQL and readable');
});
