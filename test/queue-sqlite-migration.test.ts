/**
 * The SQLite queue's migrations. 2: claims stop writing their task's row (a
 * running task is 'pending' in the tasks table, running by its current
 * run). A queue written by migration 1, with a task in each state, opens,
 * is migrated, and reports, lists and resolves every task as before. 3: the
 * (state, created) index goes; resolved tasks still list by state. 4: each
 * artifact's row records its file; artifacts stored by older drovers, in
 * either of their layouts, stay readable. 5: a completion leaves its task's
 * row to the deadline sweep (no rows change). 6: one index of open runs
 * replaces the pending and running ones; the claim made before it is still
 * held and the pending run is claimed through it (the version 1 test runs
 * every migration).
 */
import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import Database from 'better-sqlite3';
import { MIGRATIONS, SqliteQueue } from '../src/queues/sqlite.js';
import { seededTasksReadAsBefore } from './helpers/migrated-tasks.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const HOUR = 3_600_000;

t.test('a version 1 queue is migrated: running, pending and resolved tasks keep their states', async (t) => {
  const dir = t.testdir();
  const db = new Database(join(dir, 'queue.db'));
  db.exec(MIGRATIONS[0]!);
  db.pragma('user_version = 1');
  const task = db.prepare(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES (?, '{}', ?, ?, ?, 0)`);
  const run = db.prepare(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled, worker_id, taken_until, started, resolved, reason_resolved)
                          VALUES (?, 0, ?, 'scheduled', ?, ?, ?, ?, ?, ?)`);
  // What migration 1's queue wrote: a claimed task said 'running' in both tables.
  task.run('running1', 'running', START, START + HOUR);
  run.run('running1', 'running', START, 'A', START + 30_000, START, null, null);
  task.run('pending2', 'pending', START + 1, START + HOUR);
  run.run('pending2', 'pending', START + 1, null, null, null, null, null);
  task.run('complete3', 'completed', START + 2, START + HOUR);
  run.run('complete3', 'completed', START + 2, 'A', START + 30_000, START + 2, START + 3, 'completed');
  db.close();

  const clock = { now: START + 10 };
  const queue = SqliteQueue.open({ dir, now: () => clock.now });
  t.teardown(() => queue.close());
  const check = new Database(join(dir, 'queue.db'), { readonly: true });
  t.teardown(() => check.close());
  t.equal(check.pragma('user_version', { simple: true }), MIGRATIONS.length, 'migrated to the latest version');
  t.same(check.prepare(`SELECT id FROM tasks WHERE state = 'running'`).all(), [], "no task row says 'running' any more");
  t.same(check.prepare(`SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' AND sql IS NOT NULL`).pluck().all(), ['runs_open']);

  await seededTasksReadAsBefore(t, queue);

  // The claim made before the migration is still held, and resolves as before.
  await queue.resolve({ taskId: 'running1', runId: 0 }, 'A', { state: 'completed' });
  t.match(await queue.task('running1'), { state: 'completed' });
  const [claim] = await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 });
  t.match(claim, { taskId: 'pending2', runId: 0 });
  t.same((await queue.listTasks({ state: 'running' })).map((s) => s.taskId), ['pending2'], 'a claimed task lists as running');
  t.same((await queue.listTasks({ state: 'pending' })).map((s) => s.taskId), [], 'and not as pending');
});

t.test('a version 2 queue is migrated to 3: the (state, created) index goes, resolved tasks still list by state', async (t) => {
  const dir = t.testdir();
  const db = new Database(join(dir, 'queue.db'));
  db.exec(MIGRATIONS[0]!);
  db.exec(MIGRATIONS[1]!);
  db.pragma('user_version = 2');
  const task = db.prepare(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES (?, '{}', ?, ?, ?, 0)`);
  const run = db.prepare(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled, worker_id, started, resolved, reason_resolved)
                          VALUES (?, 0, ?, 'scheduled', ?, 'A', ?, ?, ?)`);
  for (const [i, state, reason] of [[0, 'failed', 'failed'], [1, 'exception', 'malformed-payload'], [2, 'completed', 'completed'], [3, 'failed', 'failed']] as const) {
    task.run(`${state}${i}`, state, START + i, START + HOUR);
    run.run(`${state}${i}`, state, START + i, START + i, START + i, reason);
  }
  db.close();

  const queue = SqliteQueue.open({ dir, now: () => START + 10 });
  t.teardown(() => queue.close());
  const check = new Database(join(dir, 'queue.db'), { readonly: true });
  t.teardown(() => check.close());
  const indexes = (check.prepare(`SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'tasks' AND sql IS NOT NULL ORDER BY name`).pluck().all());
  t.same(indexes, ['tasks_by_created', 'tasks_open_by_deadline', 'tasks_unsuccessful']);
  t.same((await queue.listTasks({ state: 'failed' })).map((s) => s.taskId), ['failed3', 'failed0']);
  t.same((await queue.listTasks({ state: 'exception' })).map((s) => s.taskId), ['exception1']);
  t.same((await queue.listTasks({ state: 'completed' })).map((s) => s.taskId), ['completed2']);
});

t.test('a version 3 queue is migrated to 4: artifacts in both older layouts stay readable, new ones go in shards', async (t) => {
  const dir = t.testdir();
  const db = new Database(join(dir, 'queue.db'));
  for (const sql of MIGRATIONS.slice(0, 3)) db.exec(sql);
  db.pragma('user_version = 3');
  db.prepare(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES ('task1', '{}', 'pending', ?, ?, 0)`).run(START, START + HOUR);
  db.prepare(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled, worker_id, taken_until, started)
              VALUES ('task1', 0, 'running', 'scheduled', ?, 'A', ?, ?)`).run(START, START + 30_000, START);
  const artifact = db.prepare(`INSERT INTO artifacts (task_id, run_id, name, content_type, state, size, created) VALUES ('task1', 0, ?, 'text/plain', 'complete', ?, ?)`);
  // The layout of drovers before the flat files: a directory per task, run and name part.
  const nested = join(dir, 'artifacts', 'task1', '0', 'public', 'logs', 'live.log');
  // And the flat one that followed: a directory per task, a file per run and name.
  const flat = join(dir, 'artifacts', 'task1', `0-${encodeURIComponent('public/result.txt')}`);
  for (const [file, name, content] of [[nested, 'public/logs/live.log', 'nested log'], [flat, 'public/result.txt', 'flat result']] as const) {
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, content);
    artifact.run(name, content.length, START);
  }
  db.close();

  const queue = SqliteQueue.open({ dir, now: () => START + 10 });
  t.teardown(() => queue.close());
  const run = { taskId: 'task1', runId: 0 };
  t.same((await queue.listArtifacts(run)).map((a) => a.name), ['public/logs/live.log', 'public/result.txt']);
  t.equal(await text(await queue.readArtifact(run, 'public/logs/live.log')), 'nested log');
  t.equal(await text(await queue.readArtifact(run, 'public/result.txt', { follow: true })), 'flat result', 'followed too');

  // The claim made before the migration uploads on; its new artifact goes in the new layout, and names still may not clash.
  await queue.uploadArtifact(run, 'A', { name: 'public/new.txt', contentType: 'text/plain' }, Readable.from(['new']));
  t.equal(queue.artifactPath(run, 'public/new.txt'), join(dir, 'artifacts', 't', `task1.0.${encodeURIComponent('public/new.txt')}`));
  t.equal(await text(await queue.readArtifact(run, 'public/new.txt')), 'new');
  await t.rejects(queue.uploadArtifact(run, 'A', { name: 'public/logs', contentType: 'text/plain' }, Readable.from(['x'])), { name: 'TaskStateError', message: /clashes with/ });
});

async function text(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks).toString();
}

t.test('migration 5: a drover of an older version that still has the queue open cannot end a completed task again', async (t) => {
  const dir = t.testdir();
  const clock = { now: START };
  const queue = SqliteQueue.open({ dir, now: () => clock.now });
  t.teardown(() => queue.close());
  const done = await queue.submit({ payload: {}, deadline: START + 1_000, retries: 0 });
  const failing = await queue.submit({ payload: {}, deadline: START + 1_000, retries: 0 });
  for (const resolution of [{ state: 'completed' }, { state: 'failed' }] as const) {
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await queue.resolve(claim!, 'A', resolution);
  }
  // What a version 4 drover's deadline sweep or cancel writes for a task whose row still says 'pending'.
  const old = new Database(join(dir, 'queue.db'));
  t.teardown(() => old.close());
  const setTaskState = old.prepare(`UPDATE tasks SET state = ? WHERE id = ?`);
  setTaskState.run('exception', done);
  t.equal((old.prepare(`SELECT state FROM tasks WHERE id = ?`).get(done) as { state: string }).state, 'pending', 'the write was ignored');
  t.match(await queue.task(done), { state: 'completed' });
  // The trigger lets every other write through: the sweep's 'completed', a failure's own state.
  clock.now += 2_000;
  await queue.sweep();
  t.equal((old.prepare(`SELECT state FROM tasks WHERE id = ?`).get(done) as { state: string }).state, 'completed');
  t.match(await queue.task(failing), { state: 'failed' });
});
