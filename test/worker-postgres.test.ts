/**
 * The drover command against a PostgreSQL queue, as a user runs it: every
 * command works with --queue URL (or DROVER_QUEUE); a cancel reaches the
 * worker that runs the task; and a worker killed with -9 mid-run loses its
 * runs to the claim timeout, after which another worker completes them.
 */
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import t from 'tap';
import { DROVER, drover, eventually, runOutcomes, startWorker, submit, userEnv } from './helpers/drover.js';
import { allTasks, freshSchema, PG_URL } from './helpers/postgres.js';
import { PostgresQueue } from '../src/queues/postgres.js';
import { MIGRATIONS } from '../src/queues/postgres-migrations.js';

async function task(schema: string, taskId: string) {
  const queue = await PostgresQueue.open({ url: PG_URL, schema, poolSize: 1 });
  try {
    return await queue.task(taskId);
  } finally {
    await queue.close();
  }
}

t.test('every command works against PostgreSQL', async (t) => {
  const cwd = t.testdir({});
  const schema = freshSchema(t);
  const flags = ['--queue', PG_URL, '--queue-schema', schema];
  // A long claim: the first reclaim comes 60 s after the claim, so a cancel
  // seen within 30 s of being sent (a margin for a loaded machine) came by notification.
  const env = { DROVER_QUEUE: PG_URL, DROVER_QUEUE_SCHEMA: schema, DROVER_CLAIM_TIMEOUT: '120' };

  const migrated = await drover(['migrate', ...flags], { cwd });
  t.equal(migrated.code, 0, migrated.stderr);
  t.match(migrated.stdout, `schema "${schema}" migrated from version 0 to ${MIGRATIONS.length}`);
  t.match((await drover(['migrate', ...flags], { cwd })).stdout, 'is up to date', 'a second migrate has nothing to do');

  const quick = await submit([...flags, '--', 'echo', 'hello from postgres'], { cwd });
  const slow = await submit(['--', 'for i in 1 2 3; do echo tick $i; sleep 0.3; done'], { cwd, env });
  const doomed = await submit(['--', 'sleep 600'], { cwd, env });
  const listed = await drover(['tasks', '--json', ...flags], { cwd });
  t.same(JSON.parse(listed.stdout).map((s: { taskId: string }) => s.taskId), [doomed, slow, quick], 'tasks lists newest first');

  const worker = startWorker(['--capacity', '3', '--worker-id', 'pg-worker'], { cwd, env });
  t.teardown(() => void worker.child.kill('SIGKILL'));
  await eventually('the slow task to start', async () => (await drover(['logs', slow], { cwd, env })).stdout.includes('tick 1'));
  const followed = await drover(['logs', slow, '-f', ...flags], { cwd });
  t.equal(followed.code, 0, followed.stderr);
  t.match(followed.stdout, /tick 1\ntick 2\ntick 3\n[\s\S]*resolved completed\n$/, 'logs -f follows the live log to its end');

  await eventually('the doomed task to run', async () => (await task(schema, doomed)).state === 'running');
  const started = Date.now();
  const canceled = await drover(['cancel', doomed, ...flags], { cwd });
  t.equal(canceled.code, 0, canceled.stderr);
  await eventually('the worker to stop the canceled command', async () => (await drover(['logs', doomed, ...flags], { cwd })).stdout.includes('stopping the command'), 30_000);
  t.ok(Date.now() - started < 30_000, `the worker heard of the cancel in ${Date.now() - started} ms, before any reclaim`);
  t.match(await task(schema, doomed), { state: 'exception', runs: [{ reasonResolved: 'canceled' }] });
  const again = await drover(['cancel', doomed, ...flags], { cwd });
  t.equal(again.code, 1, 'canceling a resolved task fails');
  t.match(again.stderr, 'already resolved exception/canceled');

  await eventually('the quick task to complete', async () => (await task(schema, quick)).state === 'completed');
  const shown = await drover(['task', quick, ...flags], { cwd });
  t.match(shown.stdout, /state\s+completed/);
  t.match(shown.stdout, /worker\s+pg-worker/);
  t.match(shown.stdout, /artifact\s+public\/logs\/live\.log/);
  t.match((await drover(['logs', quick, ...flags], { cwd })).stdout, 'hello from postgres\n');
  const saved = await drover(['artifact', quick, 'public/logs/live.log', '-o', 'live.log', ...flags], { cwd });
  t.equal(saved.code, 0, saved.stderr);
  t.match(readFileSync(join(cwd, 'live.log'), 'utf8'), 'hello from postgres');

  worker.child.kill('SIGTERM');
  t.equal(await worker.exited, 4);
  t.same((await allTasks(PG_URL, schema)).map((s) => s.state).sort(), ['completed', 'completed', 'exception']);
});

t.test('start-up errors name the queue: unreachable exits 1, a bad URL or missing database exits 2', async (t) => {
  const cwd = t.testdir({});
  const unreachable = await drover(['worker', '--once', '--queue', 'postgres://someone:hunter2@127.0.0.1:1/test'], { cwd });
  t.equal(unreachable.code, 1);
  t.match(unreachable.stderr, 'cannot reach the PostgreSQL queue at postgres://someone:***@127.0.0.1:1/test');
  t.notMatch(unreachable.stderr, 'hunter2', 'the password stays out of messages');
  const badUrl = await drover(['tasks', '--queue', 'mysql://db/test'], { cwd });
  t.equal(badUrl.code, 2);
  t.match(badUrl.stderr, 'option --queue: must be a PostgreSQL URL');
  const noDatabase = await drover(['tasks'], { cwd, env: { DROVER_QUEUE: PG_URL.replace(/\/[^/]*$/, '/no_such_database_here') } });
  t.equal(noDatabase.code, 2);
  t.match(noDatabase.stderr, 'database "no_such_database_here" does not exist');
  const contradiction = await drover(['tasks', '--queue-type', 'sqlite', '--queue', PG_URL], { cwd });
  t.equal(contradiction.code, 2);
  t.match(contradiction.stderr, 'queue.type is sqlite, but queue.url is set');
});

t.test('kill -9 of a worker mid-run: its runs expire and another worker completes them', { timeout: 60_000 }, async (t) => {
  const cwd = t.testdir({});
  const schema = freshSchema(t);
  const ledger = join(cwd, 'ledger');
  const env = { DROVER_QUEUE: PG_URL, DROVER_QUEUE_SCHEMA: schema, DROVER_CLAIM_TIMEOUT: '2' };
  const ids: string[] = [];
  for (let i = 0; i < 12; i++) ids.push(await submit(['--', `sleep 1; echo "$TASK_ID $RUN_ID" >> ${ledger}`], { cwd, env }));

  const doomed = startWorker(['--capacity', '4', '--worker-id', 'doomed', '--work-dir', 'doomed-work'], { cwd, env });
  await eventually('the doomed worker to hold 4 runs', async () =>
    (await allTasks(PG_URL, schema)).filter((s) => s.state === 'running' && s.runs.at(-1)?.workerId === 'doomed').length === 4);
  doomed.child.kill('SIGKILL');
  await doomed.exited;
  const killedAt = Date.now();

  const rescuer = startWorker(['--capacity', '4', '--worker-id', 'rescuer', '--work-dir', 'rescuer-work'], { cwd, env });
  t.teardown(() => void rescuer.child.kill('SIGKILL'));
  const tasks = await eventually('every task to resolve', async () => {
    const all = await allTasks(PG_URL, schema);
    return all.every((s) => s.state !== 'pending' && s.state !== 'running') ? all : undefined;
  }, 45_000);
  rescuer.child.kill('SIGTERM');
  await rescuer.exited;

  const rescued = tasks.filter((s) => s.runs.length > 1);
  t.equal(rescued.length, 4, 'the 4 runs the dead worker held were run again');
  for (const s of rescued) {
    t.same(runOutcomes(s), ['exception/claim-expired', 'completed'], `${s.taskId}: expired, then completed`);
    t.same(s.runs.map((r) => r.workerId), ['doomed', 'rescuer']);
    t.ok(s.runs[1]!.scheduled - killedAt > -1_000, 'the retry was scheduled after the kill');
  }
  t.ok(tasks.every((s) => s.state === 'completed'), 'every task completed');
  // Each completed run appears in the ledger exactly once (the dead worker's orphans may add lines for its expired runs).
  const lines = readFileSync(ledger, 'utf8').trim().split('\n');
  for (const s of tasks) {
    const completedRun = s.runs.findIndex((r) => r.state === 'completed');
    t.equal(lines.filter((line) => line === `${s.taskId} ${completedRun}`).length, 1, `${s.taskId} run ${completedRun} ran once`);
  }
});

t.test('a worker whose clock is 40 s behind the server\'s renews its claims in time', { skip: spawnSync('faketime', ['-f', '+0s', 'true']).status === 0 || process.env['CI'] ? false : 'faketime is not installed' }, async (t) => {
  const cwd = t.testdir({});
  const schema = freshSchema(t);
  const env = { DROVER_QUEUE: PG_URL, DROVER_QUEUE_SCHEMA: schema, DROVER_CLAIM_TIMEOUT: '2' };
  // Outlives two claims: timed by the worker's own clock, its first reclaim would come 21 s after the claim ran out.
  const id = await submit(['--', 'sleep 5'], { cwd, env });
  const worker = spawn('faketime', ['-f', '-40s', process.execPath, DROVER, 'worker', '--once'], { cwd, env: userEnv(env), stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  worker.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  t.teardown(() => void worker.kill('SIGKILL'));
  const [code] = (await Promise.race([once(worker, 'exit'), sleep(30_000, undefined, { ref: false }).then(() => ['timed out'])])) as [number | string];
  t.equal(code, 0, stderr);
  t.same(runOutcomes(await task(schema, id)), ['completed']);
});
