/**
 * What only the PostgreSQL queue has (the shared rules are in the
 * conformance suite): migrations under an advisory lock, and connections
 * that break under it.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { ConfigError, QueueUnavailableError } from '../src/model/errors.js';
import { PostgresQueue } from '../src/queues/postgres.js';
import { MIGRATIONS } from '../src/queues/postgres-migrations.js';
import { runNodeScript } from './helpers/node-script.js';
import { freshSchema, openQueue, PG_URL, sql } from './helpers/postgres.js';

t.test('migrations', async (t) => {
  t.test('many workers starting at once apply each migration once', async (t) => {
    const schema = freshSchema(t);
    const queues = await Promise.all(Array.from({ length: 6 }, () => PostgresQueue.open({ url: PG_URL, schema, poolSize: 1 })));
    await Promise.all(queues.map((queue) => queue.close()));
    const rows = await sql<{ version: number }>(`SELECT version FROM "${schema}".schema_migrations ORDER BY version`);
    t.same(rows.map((row) => row.version), MIGRATIONS.map((_, i) => i + 1));
  });

  t.test('migrate alone, then a queue that must not migrate opens', async (t) => {
    const schema = freshSchema(t);
    await t.rejects(PostgresQueue.open({ url: PG_URL, schema, migrate: false }), { name: 'ConfigError', message: new RegExp(`version 0, this drover needs ${MIGRATIONS.length}: run \`drover migrate\``) });
    t.same(await PostgresQueue.migrate({ url: PG_URL, schema }), { from: 0, to: MIGRATIONS.length, schema });
    t.same(await PostgresQueue.migrate({ url: PG_URL, schema }), { from: MIGRATIONS.length, to: MIGRATIONS.length, schema });
    await (await openQueue(t, { schema, migrate: false })).close();
  });

  t.test('a schema newer than this drover is refused', async (t) => {
    const schema = freshSchema(t);
    await PostgresQueue.migrate({ url: PG_URL, schema });
    await sql(`INSERT INTO "${schema}".schema_migrations (version) VALUES ($1)`, [MIGRATIONS.length + 1]);
    const error = await PostgresQueue.open({ url: PG_URL, schema }).catch((e: unknown) => e);
    t.type(error, ConfigError);
    t.match(error, { message: `queue schema "${schema}" is at version ${MIGRATIONS.length + 1}, newer than this drover knows (${MIGRATIONS.length}); upgrade drover` });
  });

  t.test('bad names and URLs are ConfigErrors that say what is wrong, without the password', async (t) => {
    await t.rejects(PostgresQueue.open({ url: PG_URL, schema: 'Robert"; DROP' }), { name: 'ConfigError', message: /schema "Robert\\"; DROP" must be 1 to 48 lower-case/ });
    await t.rejects(PostgresQueue.open({ url: 'http://x/y' }), { name: 'ConfigError', message: /must start with postgres:\/\// });
    const error = await PostgresQueue.open({ url: 'postgres://me:s3cret@127.0.0.1:1/db' }).catch((e: unknown) => e);
    t.type(error, QueueUnavailableError);
    t.match(error, { message: 'cannot reach the PostgreSQL queue at postgres://me:***@127.0.0.1:1/db' });
    t.notMatch((error as Error).message, 's3cret');
  });
});

t.test('task() and listTasks() read a task\'s row and its runs as of one moment', async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const other = await openQueue(t, { schema });
  const taskId = await queue.submit({ payload: {}, deadline: Date.now() + 60_000, retries: 0 });
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  // Another worker ends the run between the read of the task's row and that of its runs, whether those
  // are read on the pool or on a client of it.
  type Query = (...args: unknown[]) => Promise<unknown>;
  const pool = (queue as unknown as { pool: { query: Query; connect: (...args: unknown[]) => Promise<{ query: Query }> } }).pool;
  let between: (() => Promise<void>) | undefined;
  const hooked = (query: Query): Query => async (...args) => {
    const text = typeof args[0] === 'string' ? args[0] : (args[0] as { text?: string } | undefined)?.text;
    const hook = text?.startsWith('SELECT * FROM runs') ? between : undefined;
    if (hook) between = undefined;
    await hook?.();
    return query(...args);
  };
  const { query, connect } = pool;
  pool.query = hooked(query.bind(pool));
  const wrapped = new WeakSet<object>();
  pool.connect = async (...args: unknown[]) => {
    if (args.length > 0) return connect.apply(pool, args); // pool.query's own callback-style connect
    const client = await connect.call(pool);
    if (!wrapped.has(client)) {
      wrapped.add(client);
      client.query = hooked(client.query.bind(client));
    }
    return client;
  };
  t.teardown(() => void Object.assign(pool, { query, connect }));

  between = () => other.resolve(claim!, 'A', { state: 'failed' });
  const status = await queue.task(taskId);
  t.equal(status.state, 'running', 'as the row was read');
  t.same(status.runs.map((run) => run.state), ['running'], 'and its runs with it');
  t.equal((await queue.task(taskId)).state, 'failed', 'the next read sees the end');

  const second = await queue.submit({ payload: {}, deadline: Date.now() + 60_000, retries: 0 });
  const [secondClaim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  between = () => other.resolve(secondClaim!, 'A', { state: 'completed' });
  const [listed] = await queue.listTasks({ state: 'running' });
  t.match(listed, { taskId: second, state: 'running', runs: [{ state: 'running' }] });
});

t.test('connections cut by the server', async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema, pollIntervalMs: 60_000 });
  const [first] = await Promise.all([queue.claimWork({ workerId: 'A', count: 1, waitMs: 3_000 }), sleep(100).then(() => queue.submit({ payload: {}, deadline: Date.now() + 60_000, retries: 0 }))]);
  t.equal(first.length, 1, 'claimed by notification');
  t.ok(queue.isListening, 'the listener is up');
  const cut = await sql<{ n: number }>(
    `SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`, [`drover ${schema}`],
  );
  t.ok(cut[0]!.n >= 2, `cut ${cut[0]!.n} connections (the pool's and the listener's)`);
  await sleep(50);

  // Every call either works on a new connection or says the queue is unavailable, never anything else.
  const outcome = await queue.task(first[0]!.taskId).then(() => 'ok', (error: unknown) => error);
  t.ok(outcome === 'ok' || outcome instanceof QueueUnavailableError, `after the cut: ${String(outcome)}`);
  await queue.resolve(first[0]!, 'A', { state: 'completed' }).catch(async (error: unknown) => {
    t.type(error, QueueUnavailableError);
    await queue.resolve(first[0]!, 'A', { state: 'completed' });
  });
  t.match(await queue.task(first[0]!.taskId), { state: 'completed' });

  // The listener comes back by itself, and wakes a waiting claim at once again.
  const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 10_000 });
  const listening = Date.now() + 10_000;
  while (!queue.isListening && Date.now() < listening) await sleep(50);
  t.ok(queue.isListening, 'the listener reconnected');
  const started = performance.now();
  const id = await queue.submit({ payload: {}, deadline: Date.now() + 60_000, retries: 0 });
  t.same((await claiming).map((claim) => claim.taskId), [id]);
  t.ok(performance.now() - started < 3_000, 'woken by notification, not by the 60 s poll');
});

// A worker whose clock is off (a VM resumed without NTP) must not judge other workers' claims by it.
const hasFaketime = spawnSync('faketime', ['-f', '+0s', 'true'], { stdio: 'ignore' }).status === 0;
/** libfaketime itself, for a clock that a test steps while the process runs (faketime's wrapper fixes it at start). */
const libfaketime = ['/usr/lib', '/usr/lib64'].flatMap((dir) => {
  try {
    return readdirSync(dir).map((arch) => join(dir, arch, 'faketime', 'libfaketime.so.1'));
  } catch {
    return [];
  }
}).find((path) => existsSync(path));
t.test('workers whose clocks are 40 s apart agree on when a claim runs out: the server\'s clock', { skip: hasFaketime || process.env['CI'] ? false : 'faketime is not installed' }, async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const ids = [await queue.submit({ payload: {}, deadline: Date.now() + 3_600_000, retries: 1 }), await queue.submit({ payload: {}, deadline: Date.now() + 3_600_000, retries: 1 })];
  const [mine] = await queue.claimWork({ workerId: 'here', count: 1, waitMs: 0 });
  const source = pathToFileURL(fileURLToPath(new URL('../src/queues/postgres.ts', import.meta.url))).href;
  // Another worker, on a machine whose clock is 40 s ahead: it sweeps (as every claim does), then claims.
  const script = [
    `const { PostgresQueue } = await import(${JSON.stringify(source)});`,
    `const queue = await PostgresQueue.open({ url: ${JSON.stringify(PG_URL)}, schema: ${JSON.stringify(schema)}, poolSize: 1 });`,
    'const swept = await queue.sweep();',
    "const [claim] = await queue.claimWork({ workerId: 'ahead', count: 1, waitMs: 0 });",
    'console.log(JSON.stringify({ swept, takenUntil: claim.takenUntil, itsClock: Date.now() }));',
    'await queue.close();',
  ].join('\n');
  const { stdout, stderr, status } = await runNodeScript(script, 30_000, ['faketime', '-f', '+40s']);
  t.equal(status, 0, stderr);
  const ahead = JSON.parse(stdout) as { swept: number; takenUntil: number; itsClock: number };
  t.ok(ahead.itsClock - Date.now() > 30_000, 'its own clock is ahead');
  t.equal(ahead.swept, 0, 'it did not take this worker\'s 30 s claim for expired');
  t.same(await queue.reclaim({ taskId: mine!.taskId, runId: mine!.runId }, 'here').then(() => 'held'), 'held', 'the claim is still ours');
  const left = ahead.takenUntil - Date.now();
  t.ok(left > 20_000 && left <= 30_000, `its claim runs out 30 s from now by the server's clock, not 70 s (${left} ms)`);
  t.equal(await queue.sweep(), 0, 'and this worker does not sweep it');
  t.same((await queue.task(ids[1]!)).runs.map((run) => run.state), ['running']);
});

t.test('a worker\'s clock stepped while it runs is followed within clockCheckMs', { skip: libfaketime || process.env['CI'] ? false : 'libfaketime is not installed' }, async (t) => {
  const schema = freshSchema(t);
  const dir = t.testdir({ 'clock.txt': '+0s\n' });
  const source = pathToFileURL(fileURLToPath(new URL('../src/queues/postgres.ts', import.meta.url))).href;
  // The skew of the queue's clock against the server's, read on a connection of its own.
  const script = [
    `const { PostgresQueue } = await import(${JSON.stringify(source)});`,
    "const { writeFileSync } = await import('node:fs');",
    "const pg = (await import('pg')).default;",
    `const server = new pg.Client({ connectionString: ${JSON.stringify(PG_URL)} });`,
    'await server.connect();',
    "const skew = async (queue) => queue.now() - Number((await server.query('SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::text AS now')).rows[0].now);",
    `const queue = await PostgresQueue.open({ url: ${JSON.stringify(PG_URL)}, schema: ${JSON.stringify(schema)}, poolSize: 1, clockCheckMs: 100 });`,
    'const before = await skew(queue);',
    'const beforeStep = Date.now();',
    `writeFileSync(${JSON.stringify(join(dir, 'clock.txt'))}, '+40s\\n'); // NTP steps this machine's clock 40 s ahead`,
    'const steppedBy = Date.now() - beforeStep;',
    'await new Promise((resolve) => setTimeout(resolve, 1000));',
    'console.log(JSON.stringify({ before, after: await skew(queue), steppedBy }));',
    'await queue.close();',
    'await server.end();',
  ].join('\n');
  const env = ['env', `LD_PRELOAD=${libfaketime}`, `FAKETIME_TIMESTAMP_FILE=${join(dir, 'clock.txt')}`, 'FAKETIME_NO_CACHE=1', 'FAKETIME_DONT_FAKE_MONOTONIC=1'];
  const { stdout, stderr, status } = await runNodeScript(script, 30_000, env);
  t.equal(status, 0, stderr);
  const { before, after, steppedBy } = JSON.parse(stdout) as { before: number; after: number; steppedBy: number };
  t.ok(Math.abs(before) < 1000, `on the server's clock at first (${before} ms)`);
  t.ok(steppedBy > 30_000, `its own clock jumped (${steppedBy} ms)`);
  t.ok(Math.abs(after) < 1000, `and again after this machine's clock was stepped 40 s (${after} ms)`);
});
