/**
 * The PostgreSQL queue's migration 2 and the claim it allows: a claim
 * writes only its run (a running task is 'pending' in the tasks table,
 * running by its current run), and the claim is a prepared statement whose
 * generic plan walks the pending index. A schema written by migration 1,
 * with a task in each state, opens, is migrated, and reports, lists and
 * resolves every task as before.
 */
import pg from 'pg';
import t from 'tap';
import { claimStatement } from '../src/queues/postgres.js';
import { MIGRATIONS } from '../src/queues/postgres-migrations.js';
import { freshSchema, openQueue, PG_URL } from './helpers/postgres.js';
import { seededTasksReadAsBefore } from './helpers/migrated-tasks.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const HOUR = 3_600_000;

async function withClient<T>(schema: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: PG_URL, options: `-c search_path=${schema}` });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

t.test('a version 1 schema is migrated: running, pending and resolved tasks keep their states', async (t) => {
  const schema = freshSchema(t);
  await withClient(schema, async (client) => {
    await client.query(`CREATE SCHEMA "${schema}"`);
    await client.query(`CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())`);
    await client.query(MIGRATIONS[0]!);
    await client.query(`INSERT INTO schema_migrations (version) VALUES (1)`);
    const task = `INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES ($1, '{}', $2, $3, $4, 0)`;
    const run = `INSERT INTO runs (task_id, run_id, state, reason_created, scheduled, worker_id, taken_until, started, resolved, reason_resolved, resolved_by)
                 VALUES ($1, 0, $2, 'scheduled', $3, $4, $5, $6, $7, $8, $9)`;
    // What migration 1's queue wrote: a claimed task said 'running' in both tables.
    await client.query(task, ['running1', 'running', START, START + HOUR]);
    await client.query(run, ['running1', 'running', START, 'A', START + 30_000, START, null, null, null]);
    await client.query(task, ['pending2', 'pending', START + 1, START + HOUR]);
    await client.query(run, ['pending2', 'pending', START + 1, null, null, null, null, null, null]);
    await client.query(task, ['complete3', 'completed', START + 2, START + HOUR]);
    await client.query(run, ['complete3', 'completed', START + 2, 'A', START + 30_000, START + 2, START + 3, 'completed', 'worker']);
  });

  const clock = { now: START + 10 };
  const queue = await openQueue(t, { schema, now: () => clock.now });
  const taskRows = () => withClient(schema, async (client) => (await client.query<{ id: string; state: string }>(`SELECT id, state FROM tasks ORDER BY id`)).rows);
  await withClient(schema, async (client) => {
    t.same((await client.query(`SELECT max(version) AS version FROM schema_migrations`)).rows, [{ version: MIGRATIONS.length }], 'migrated to the latest version');
  });
  t.same((await taskRows()).filter((row) => row.state === 'running'), [], "no task row says 'running' any more");

  await seededTasksReadAsBefore(t, queue);
  t.same((await queue.listTasks()).map((s) => [s.taskId, s.state]), [['complete3', 'completed'], ['pending2', 'pending'], ['running1', 'running']]);

  // The claim made before the migration is still held, and resolves as before.
  await queue.resolve({ taskId: 'running1', runId: 0 }, 'A', { state: 'completed' });
  t.match(await queue.task('running1'), { state: 'completed' });
  const [claim] = await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 });
  t.match(claim, { taskId: 'pending2', runId: 0 });
  t.same((await taskRows()).find((row) => row.id === 'pending2'), { id: 'pending2', state: 'pending' }, "the claim did not write the task's row");
  t.match(await queue.task('pending2'), { state: 'running' });
  t.same((await queue.listTasks({ state: 'running' })).map((s) => s.taskId), ['pending2'], 'a claimed task lists as running');
  t.same((await queue.listTasks({ state: 'pending' })).map((s) => s.taskId), [], 'and not as pending');
});

t.test("the claim's generic plan walks the pending index and stops at its count", async (t) => {
  // A prepared statement runs on a generic plan after five executions. With the LIMIT a parameter, that plan
  // knew no limit and sorted every pending run (200 ms a claim at 1M pending). 20k runs are enough to show it.
  const schema = freshSchema(t);
  await (await openQueue(t, { schema })).close();
  await withClient(schema, async (client) => {
    const now = Date.now();
    await client.query(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left)
                        SELECT 'plan' || i, '{}', 'pending', $1, $2, 0 FROM generate_series(1, 20000) i`, [now, now + HOUR]);
    await client.query(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled) SELECT 'plan' || i, 0, 'pending', 'scheduled', $1 FROM generate_series(1, 20000) i`, [now]);
    await client.query(`ANALYZE tasks; ANALYZE runs`);
    await client.query(`SET plan_cache_mode = force_generic_plan`);
    for (const count of [1, 8]) {
      await client.query(`PREPARE claim_${count} (text, bigint, bigint) AS ${claimStatement(count).text}`);
      const plan = (await client.query<{ 'QUERY PLAN': string }>(`EXPLAIN EXECUTE claim_${count} ('w', ${now}, ${now + 60_000})`)).rows.map((row) => row['QUERY PLAN']).join('\n');
      t.match(plan, /Index Scan using runs_pending on runs/, `count ${count}: the pending index, in order`);
      t.notMatch(plan, /Seq Scan on runs|Sort Key: r\.scheduled/, `count ${count}: no scan or sort of every pending run`);
    }
  });
});
