/**
 * Queues: how fast drover's two queues hand out and take back runs, with
 * nothing else in the way (no engine, no machine, no host).
 *
 * Throughput: N worker processes (bench/queue-worker.mjs) each loop
 * claimWork({ count: 1, waitMs: 0 }) -> resolve(completed) until the queue
 * is empty; N = 1, 4, 8. The floor runs in the same number of processes on
 * the same storage, with one write per claim and one per resolve, as a worker
 * must (the run happens between them): for SQLite, one `BEGIN IMMEDIATE`
 * transaction per claim and one per resolve on a minimal table (with the
 * queue's own pragmas), and for comparison the same statements with claim
 * and resolve in ONE transaction; for PostgreSQL, one `UPDATE ... FOR UPDATE
 * SKIP LOCKED ... RETURNING id` per claim plus one UPDATE per resolve. Every run starts on a fresh database
 * (a new SQLite directory, a new PostgreSQL schema dropped afterwards), and
 * only the drain is timed: the processes have started and connected before
 * the clock starts.
 *
 * Latency: single claimWork calls (each followed by an untimed resolve)
 * against 1k, 100k and 1M pending tasks (quick: 1k and 100k), filled in bulk
 * straight into the queue's tables by fillPendingTasks(); the claims take
 * turns across the sizes, as floor and drover runs take turns above.
 *
 * PostgreSQL: the suite's own server (bench/postgres.mjs, started by run.mjs),
 * or the fallback it names; when it cannot be reached, its rows say so and
 * the rest still runs.
 */
import { fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import pg from 'pg';
import { summary } from './lib.mjs';

const WORKER = fileURLToPath(new URL('queue-worker.mjs', import.meta.url));
const CONCURRENCY = [1, 4, 8];
/** Claims timed per latency case, after a few untimed ones. */
const LATENCY_SAMPLES = 200;
const LATENCY_WARMUP = 10;
/** The longest any one throughput run may take before it is called a failure (the loops are bounded too). */
const RUN_TIMEOUT_MS = 120_000;
/** What a bulk-filled task carries: a small, realistic payload. */
const FILL_PAYLOAD = JSON.stringify({ command: ['true'] });

/**
 * `before`: the root of another build of drover (`npm run bench -- --before DIR`); its queues get rows
 * of their own ("before"), measured in turn with the floor and this build, so a change is seen in one run.
 */
export async function queues({ root, scratch, reps, quick, before, pg: server }) {
  const PG_URL = server.url;
  /** What runs in each round, in turn; `onetx` (SQLite only) is the floor's claim and resolve in one transaction. */
  const kindsOf = (name) => [...(name === 'sqlite' ? ['floor', 'onetx'] : ['floor']), 'drover', ...(before ? ['before'] : [])];
  const isFloor = (kind) => kind === 'floor' || kind === 'onetx';
  const rootOf = (kind) => (kind === 'before' ? before : root);
  started = performance.now();
  const { SqliteQueue } = await import(join(root, 'dist/queues/sqlite.js'));
  const { PostgresQueue } = await import(join(root, 'dist/queues/postgres.js'));
  // The build whose queue a run measures also creates its schema: an older build refuses a newer schema.
  const queuesOf = async (kind) => kind === 'before'
    ? { SqliteQueue: (await import(join(before, 'dist/queues/sqlite.js'))).SqliteQueue, PostgresQueue: (await import(join(before, 'dist/queues/postgres.js'))).PostgresQueue }
    : { SqliteQueue, PostgresQueue };
  const { parseQueueUrl } = await import(join(root, 'dist/queues/postgres-connection.js'));
  const pgDisplay = parseQueueUrl(PG_URL).display;
  const pgProblem = await unreachable(PG_URL);
  if (pgProblem) progress(`PostgreSQL at ${pgDisplay} is unreachable (${pgProblem}): its rows will say so`);
  // Runs drained per case, so that each case lasts about a second or more (less in quick mode) at the rates
  // seen on 2 cores. Every kind of a backend drains as many: a drain's rate depends on its length (code
  // warming up, processes starting and ending out of step), so rates of different lengths do not compare.
  // Until 2026-12-02 drover drained a fifth of the floor's runs (bench/ANALYSIS.md has the measurements).
  const claims = { sqlite: quick ? 8000 : 20000, postgres: quick ? 600 : 2000 };
  const sizes = quick ? [1_000, 100_000] : [1_000, 100_000, 1_000_000];

  const backends = {
    sqlite: {
      label: 'SQLite',
      setUp: async (kind, count) => {
        const dir = mkdtempSync(join(scratch, 'queue-'));
        if (!isFloor(kind)) {
          await (await queuesOf(kind)).SqliteQueue.open({ dir }).close();
          await fillPendingTasks({ kind: 'sqlite', dir }, count);
        } else {
          fillSqliteFloor(dir, count);
        }
        return { config: { dir }, tearDown: async () => rmSync(dir, { recursive: true, force: true }) };
      },
      openQueue: (config) => SqliteQueue.open(config),
    },
    postgres: {
      label: 'PostgreSQL',
      setUp: async (kind, count) => {
        const schema = `bench_${process.pid}_${randomBytes(4).toString('hex')}`;
        const tearDown = () => dropSchema(PG_URL, schema);
        try {
          if (kind !== 'floor') {
            await (await (await queuesOf(kind)).PostgresQueue.open({ url: PG_URL, schema, poolSize: 1 })).close();
            await fillPendingTasks({ kind: 'postgres', url: PG_URL, schema }, count);
          } else {
            await fillPostgresFloor(PG_URL, schema, count);
          }
        } catch (error) {
          await tearDown();
          throw error;
        }
        return { config: { url: PG_URL, schema }, tearDown };
      },
      openQueue: (config) => PostgresQueue.open({ ...config, poolSize: 2 }),
    },
  };

  const benchmarks = [];
  for (const [name, backend] of Object.entries(backends)) {
    const problem = name === 'postgres' ? pgProblem : undefined;
    const rows = [];
    const targets = [];
    try {
      if (problem) throw new Error(`PostgreSQL unreachable at ${pgDisplay}: ${problem}`);
      const KINDS = kindsOf(name);
      for (const workers of CONCURRENCY) {
        const once = async (kind) => {
          const as = kind === 'before' ? 'drover' : kind;
          const count = claims[name];
          const { config, tearDown } = await backend.setUp(kind, count);
          try {
            return count / (await drain({ kind: `${as}-${name}`, root: rootOf(kind), config, workers, count }));
          } finally {
            await tearDown();
          }
        };
        progress(`${backend.label}, ${workers} worker process${workers === 1 ? '' : 'es'}: ${claims[name]} claims each`);
        // Floor and drover take turns, so a load that comes and goes on the machine falls on both alike.
        // Quick mode warms up once per queue rather than once per case, to stay within its time.
        if (!quick || workers === CONCURRENCY[0]) for (const kind of KINDS) await once(kind);
        const values = Object.fromEntries(KINDS.map((kind) => [kind, []]));
        for (let i = 0; i < reps; i++) for (const kind of KINDS) values[kind].push(await once(kind));
        const measured = Object.fromEntries(KINDS.map((kind) => [kind, summary(values[kind])]));
        const ratio = measured.drover.median / measured.floor.median;
        const processes = `${workers} process${workers === 1 ? '' : 'es'}`;
        for (const kind of KINDS) {
          const s = measured[kind];
          const label = { before: `drover before (${before})`, onetx: 'floor in one transaction' }[kind] ?? kind;
          rows.push({ name: `${label}, ${processes}`, ...s, ratio: s.median / measured.floor.median, extra: `${(1000 / s.median).toFixed(3)} ms` });
        }
        targets.push({ text: `within 2x of the raw floor with ${processes} (at least 0.5 of its claims/s)`, met: ratio >= 0.5, measured: `${ratio.toFixed(2)} of the floor` });
      }
    } catch (error) {
      rows.push(notMeasured(`${backend.label}: not measured`, error));
      targets.push({ text: 'within 2x of the raw floor at each concurrency', met: false, measured: `not measured: ${firstLine(error)}` });
    }
    benchmarks.push({
      title: `Queues: ${backend.label} claim+resolve throughput`,
      description: `${claims[name]} pending runs (for the floor and for drover alike) drained by 1, 4 and 8 worker processes, each looping \`claimWork({ count: 1, waitMs: 0 })\` -> \`resolve(completed)\` on drover's ${backend.label} queue until it is empty; no engine, no machine. `
        + (name === 'sqlite'
          ? 'Floor: raw better-sqlite3 in as many processes, on a minimal table with a partial index on pending rows, with the queue\'s pragmas (WAL, synchronous=NORMAL, busy_timeout): one `BEGIN IMMEDIATE` transaction per claim (select the oldest pending row, mark it running) and one per resolve (mark it done), as a worker must write them (its run happens in between) and as the PostgreSQL floor does. "Floor in one transaction" runs the same statements with claim and resolve in ONE transaction, which no worker can do; it is shown for comparison (reports before 2026-12-02 used it as the floor).'
          : `Floor: raw \`pg\` in as many processes, one \`UPDATE t SET state='running' WHERE id = (SELECT id FROM t WHERE state='pending' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id\` per claim plus one UPDATE per resolve, on a minimal table with a partial index on pending rows. Server: ${server.about}; each run in a fresh schema, analyzed after the fill, dropped afterwards.`)
        + ` Processes start and connect before the clock starts; floor and drover runs alternate, after a warm-up of each${quick ? ' (quick mode: only before the first concurrency)' : ''}. Last column: wall time per claim+resolve at that rate.`,
      unit: 'claims/s',
      extraHeader: 'per claim+resolve',
      rows,
      targets,
    });
  }

  const rows = [];
  const targets = [];
  for (const [name, backend] of Object.entries(backends)) {
    const problem = name === 'postgres' ? pgProblem : undefined;
    try {
      if (problem) throw new Error(`PostgreSQL unreachable at ${pgDisplay}: ${problem}`);
      const bySize = {};
      // Every size is filled and opened first; then the claims take turns across the sizes, so a load
      // that comes and goes on the machine falls on each alike.
      const queuesBySize = [];
      try {
        for (const pending of sizes) {
          progress(`${backend.label}: filling a queue with ${short(pending)} pending tasks`);
          const fillStart = performance.now();
          const { config, tearDown } = await backend.setUp('drover', pending);
          const entry = { pending, tearDown, fillSeconds: (performance.now() - fillStart) / 1000 };
          queuesBySize.push(entry);
          entry.queue = await backend.openQueue(config);
        }
        progress(`${backend.label}: claim latency`);
        const samples = await claimLatency(queuesBySize.map((q) => q.queue));
        for (const [i, { pending, fillSeconds }] of queuesBySize.entries()) bySize[pending] = { ...summary(samples[i].map((ms) => ms * 1000)), fillSeconds };
      } finally {
        for (const { queue, tearDown } of queuesBySize) {
          await queue?.close();
          await tearDown();
        }
      }
      const base = bySize[sizes[0]];
      for (const pending of sizes) {
        const s = bySize[pending];
        const p90 = s.values.toSorted((a, b) => a - b)[Math.floor(s.values.length * 0.9)];
        rows.push({ name: `${backend.label}, ${short(pending)} pending`, ...s, ratio: s.median / base.median, extra: `p90 ${p90.toFixed(0)} µs; filled in ${s.fillSeconds.toFixed(1)} s` });
      }
      const largest = sizes[sizes.length - 1];
      const ratio = bySize[largest].median / base.median;
      targets.push({ text: `${backend.label}: claim latency at ${short(largest)} pending within 1.5x of that at 1k`, met: ratio <= 1.5, measured: `${ratio.toFixed(2)}x` });
    } catch (error) {
      rows.push(notMeasured(`${backend.label}: not measured`, error));
      targets.push({ text: `${backend.label}: claim latency at ${short(sizes[sizes.length - 1])} pending within 1.5x of that at 1k`, met: false, measured: `not measured: ${firstLine(error)}` });
    }
  }
  benchmarks.push({
    title: 'Queues: claim latency by pending tasks',
    description: `One \`claimWork({ count: 1, waitMs: 0 })\` at a time, from one process, against ${sizes.map(short).join(', ')} pending tasks (bulk-inserted straight into the queue's tables; PostgreSQL's analyzed afterwards, as autovacuum would); ${LATENCY_WARMUP} untimed claims, then the median of ${LATENCY_SAMPLES} timed ones, each followed by an untimed resolve, taking turns across the sizes. Spread = fastest..slowest claim; ratio = against the same queue with 1k pending.`,
    unit: 'µs per claim',
    extraHeader: 'p90; fill time',
    rows,
    targets,
  });
  progress('done');
  return benchmarks;
}

/** Forks `workers` queue-worker.mjs processes, starts them together once all are ready, and resolves with the seconds until the last finished. */
async function drain({ kind, root, config, workers, count }) {
  const children = [];
  try {
    const ready = [];
    const done = [];
    for (let i = 0; i < workers; i++) {
      const child = fork(WORKER, [JSON.stringify({ kind, root, ...config, workerId: `bench-${i}`, limit: count })], {
        stdio: ['ignore', 'inherit', 'pipe', 'ipc'],
        execArgv: (process.env.DROVER_BENCH_WORKER_ARGS ?? '').split(' ').filter(Boolean),
      });
      children.push(child);
      let stderr = '';
      child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-2000)));
      const exited = new Promise((_, reject) => child.once('exit', (code, signal) => reject(new Error(`${kind} worker ${i} exited (${code ?? signal}) before it was done: ${stderr.trim()}`))));
      exited.catch(() => {});
      ready.push(Promise.race([message(child, 'ready'), exited]));
      done.push(Promise.race([message(child, 'done'), exited]));
    }
    await withTimeout(Promise.all(ready), RUN_TIMEOUT_MS, `${kind}: workers not ready`);
    const start = performance.now();
    for (const child of children) child.send('go');
    const reports = await withTimeout(Promise.all(done), RUN_TIMEOUT_MS, `${kind}: drain not finished`);
    const seconds = (performance.now() - start) / 1000;
    const total = reports.reduce((sum, r) => sum + r.count, 0);
    if (total !== count) throw new Error(`${kind} with ${workers} workers claimed ${total} runs, not ${count}`);
    return seconds;
  } finally {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

/** Times single claims (each resolved untimed) on each queue in turn; in milliseconds, one list per queue. */
async function claimLatency(queues) {
  const workerId = 'bench-latency';
  const samples = queues.map(() => []);
  for (let i = 0; i < LATENCY_WARMUP + LATENCY_SAMPLES; i++) {
    for (const [q, queue] of queues.entries()) {
      const start = performance.now();
      const [claim] = await queue.claimWork({ workerId, count: 1, waitMs: 0 });
      const ms = performance.now() - start;
      if (claim === undefined) throw new Error('the queue ran out of pending tasks');
      await queue.resolve(claim, workerId, { state: 'completed' });
      if (i >= LATENCY_WARMUP) samples[q].push(ms);
    }
  }
  return samples;
}

/**
 * THE ONE PLACE COUPLED TO THE QUEUES' SCHEMAS: fills a freshly migrated
 * drover queue with `count` pending tasks (each with its pending run 0) in
 * one bulk INSERT per table, one transaction, far faster than `submit`.
 * It writes the columns of src/queues/sqlite.ts's MIGRATIONS (up to version 7,
 * `PRAGMA user_version`) and src/queues/postgres-migrations.ts's (up to version 2,
 * `schema_migrations`), and refuses any other schema version: when a
 * migration is added, check the INSERTs below and add its version to KNOWN_VERSIONS.
 */
async function fillPendingTasks(target, count) {
  // Later migrations changed indexes, what a running task's row says (both queues' 2) and added
  // artifacts.file (SQLite's 4), when a completed task's row is written (SQLite's 5), the runs' indexes (SQLite's 6) and where small artifacts are kept (SQLite's 7),
  // not how a pending task is written.
  const KNOWN_VERSIONS = { sqlite: [1, 2, 3, 4, 5, 6, 7], postgres: [1, 2] }[target.kind];
  const now = Date.now();
  const deadline = now + 24 * 3_600_000;
  const stale = (version) => new Error(`bench/queues.mjs fillPendingTasks knows queue schema versions ${KNOWN_VERSIONS.join(', ')}, this ${target.kind} queue is at ${version}: update it`);
  if (target.kind === 'sqlite') {
    const db = new Database(join(target.dir, 'queue.db'));
    try {
      const version = db.pragma('user_version', { simple: true });
      if (!KNOWN_VERSIONS.includes(version)) throw stale(version);
      const series = `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < @count)`;
      db.transaction(() => {
        db.prepare(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left)
                    ${series} SELECT printf('bench%017d', i), @payload, 'pending', @now, @deadline, 0 FROM n`).run({ count, payload: FILL_PAYLOAD, now, deadline });
        db.prepare(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled)
                    ${series} SELECT printf('bench%017d', i), 0, 'pending', 'scheduled', @now FROM n`).run({ count, now });
      }).immediate();
    } finally {
      db.close();
    }
    return;
  }
  await withClient(target.url, target.schema, async (client) => {
    const { rows } = await client.query(`SELECT max(version) AS version FROM schema_migrations`);
    if (!KNOWN_VERSIONS.includes(rows[0].version)) throw stale(rows[0].version);
    await client.query('BEGIN');
    await client.query(`INSERT INTO tasks (id, payload, state, created, deadline, retries_left)
                        SELECT 'bench' || lpad(i::text, 17, '0'), $1::jsonb, 'pending', $2, $3, 0 FROM generate_series(1, $4::int) i`, [FILL_PAYLOAD, now, deadline, count]);
    await client.query(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled)
                        SELECT 'bench' || lpad(i::text, 17, '0'), 0, 'pending', 'scheduled', $1 FROM generate_series(1, $2::int) i`, [now, count]);
    await client.query('COMMIT');
    // The server may run without autovacuum (as in CI); a live queue of this size would have been analyzed.
    await client.query('ANALYZE tasks');
    await client.query('ANALYZE runs');
  });
}

/** The SQLite floor's minimal table, with `count` pending rows. */
function fillSqliteFloor(dir, count) {
  const db = new Database(join(dir, 'floor.db'));
  try {
    db.pragma('journal_mode = WAL');
    db.exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT NOT NULL);
             CREATE INDEX t_pending ON t (id) WHERE state = 'pending';`);
    db.prepare(`INSERT INTO t (id, state) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) SELECT i, 'pending' FROM n`).run(count);
  } finally {
    db.close();
  }
}

/** The PostgreSQL floor's minimal table in a new schema, with `count` pending rows. */
async function fillPostgresFloor(url, schema, count) {
  await withClient(url, undefined, async (client) => {
    await client.query(`CREATE SCHEMA "${schema}"`);
    await client.query(`SET search_path TO "${schema}"`);
    await client.query(`CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, state text NOT NULL)`);
    await client.query(`CREATE INDEX t_pending ON t (id) WHERE state = 'pending'`);
    await client.query(`INSERT INTO t (state) SELECT 'pending' FROM generate_series(1, $1::int)`, [count]);
    await client.query('ANALYZE t');
  });
}

async function withClient(url, schema, fn) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000, ...(schema ? { options: `-c search_path=${schema}` } : {}) });
  client.on('error', () => {});
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

async function dropSchema(url, schema) {
  await withClient(url, undefined, (client) => client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
}

/** Why PostgreSQL cannot be used, or undefined when a query goes through. */
async function unreachable(url) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000 });
  client.on('error', () => {});
  try {
    await client.connect();
    await client.query('SELECT 1');
    return undefined;
  } catch (error) {
    return firstLine(error) || error.code || 'connection failed';
  } finally {
    await client.end().catch(() => {});
  }
}

function message(child, key) {
  return new Promise((resolve) => child.on('message', (m) => m?.[key] && resolve(m)));
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${ms / 1000} s`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

function notMeasured(name, error) {
  progress(`${name}: ${firstLine(error)}`);
  return { name, median: NaN, min: NaN, max: NaN, ratio: NaN, extra: firstLine(error) };
}

function firstLine(error) {
  return String(error?.message ?? error).split('\n')[0];
}

function short(n) {
  return n >= 1_000_000 ? `${n / 1_000_000}M` : n >= 1000 ? `${n / 1000}k` : String(n);
}

let started = performance.now();
function progress(line) {
  process.stderr.write(`bench queues [${((performance.now() - started) / 1000).toFixed(0)} s]: ${line}\n`);
}
