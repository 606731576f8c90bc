#!/usr/bin/env node
/**
 * One worker process of the queue benchmark (bench/queues.mjs forks it with
 * an IPC channel). It opens its queue, says `ready`, waits for `go`, then
 * claims and resolves one run at a time until the queue has nothing left,
 * and reports how many it did: `{ done, count, ms }`.
 *
 * Kinds:
 *   drover-sqlite    SqliteQueue: claimWork({ count: 1, waitMs: 0 }) -> resolve(completed)
 *   drover-postgres  PostgresQueue: the same
 *   floor-sqlite     raw better-sqlite3 on a minimal table: ONE `BEGIN IMMEDIATE` transaction per
 *                    claim (select the oldest pending row, mark it running), then one per resolve
 *                    (one UPDATE: mark it done), as the PostgreSQL floor does
 *   onetx-sqlite     the same statements, claim and resolve in ONE transaction (no work between
 *                    them: not what a worker can do, shown for comparison)
 *   floor-postgres   raw pg: one `UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING id` per claim,
 *                    one UPDATE per resolve
 *
 * Usage: node queue-worker.mjs '{"kind":..., "root":..., "dir"|"url"+"schema":..., "workerId":..., "limit":N}'
 * `limit` bounds the loop: a worker never does more than that many claims.
 */
import { join } from 'node:path';

const config = JSON.parse(process.argv[2] ?? '{}');
const limit = Number(config.limit);
if (!process.send || !Number.isInteger(limit) || limit < 1) {
  process.stderr.write('queue-worker.mjs: run by bench/queues.mjs (fork with IPC), with a JSON config that has a limit\n');
  process.exit(2);
}

const worker = await open(config);
process.send({ ready: true });
await new Promise((resolve) => process.once('message', resolve));
const start = performance.now();
let count = 0;
try {
  while (count < limit && (await worker.once())) count++;
  process.send({ done: true, count, ms: performance.now() - start });
} finally {
  await worker.close();
}
process.disconnect();

/** Opens the queue (or raw connection) named by `kind`; `once()` claims and resolves one run, false when there was none. */
async function open({ kind, root, dir, url, schema, workerId }) {
  switch (kind) {
    case 'drover-sqlite':
    case 'drover-postgres': {
      const queue = kind === 'drover-sqlite'
        ? (await import(join(root, 'dist/queues/sqlite.js'))).SqliteQueue.open({ dir })
        : await (await import(join(root, 'dist/queues/postgres.js'))).PostgresQueue.open({ url, schema, poolSize: 2 });
      return {
        async once() {
          const [claim] = await queue.claimWork({ workerId, count: 1, waitMs: 0 });
          if (claim === undefined) return false;
          await queue.resolve(claim, workerId, { state: 'completed' });
          return true;
        },
        close: () => queue.close(),
      };
    }
    case 'floor-sqlite':
    case 'onetx-sqlite': {
      const { default: Database } = await import('better-sqlite3');
      const db = new Database(join(dir, 'floor.db'));
      // The embedded queue's own settings, so the floor pays for the same durability and locking.
      db.pragma('busy_timeout = 10000');
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = NORMAL');
      const oldest = db.prepare(`SELECT id FROM t WHERE state = 'pending' ORDER BY id LIMIT 1`).pluck();
      const mark = db.prepare(`UPDATE t SET state = ? WHERE id = ?`);
      const takeOldest = () => {
        const id = oldest.get();
        if (id !== undefined) mark.run('running', id);
        return id;
      };
      const claim = db.transaction(takeOldest);
      if (kind === 'onetx-sqlite') {
        // takeOldest itself, not the claim transaction: nested in this one, that would add a SAVEPOINT and its RELEASE.
        const claimAndResolve = db.transaction(() => {
          const id = takeOldest();
          if (id === undefined) return false;
          mark.run('done', id);
          return true;
        });
        return { once: async () => claimAndResolve.immediate(), close: async () => db.close() };
      }
      // Its own IMMEDIATE transaction, as drover's are: an autocommit UPDATE that found its snapshot stale
      // would fail with SQLITE_BUSY_SNAPSHOT rather than wait.
      const resolve = db.transaction((id) => mark.run('done', id));
      return {
        async once() {
          const id = claim.immediate();
          if (id === undefined) return false;
          resolve.immediate(id);
          return true;
        },
        close: async () => db.close(),
      };
    }
    case 'floor-postgres': {
      const { default: pg } = await import('pg');
      const client = new pg.Client({ connectionString: url, options: `-c search_path=${schema}` });
      await client.connect();
      const claim = {
        name: 'claim',
        text: `UPDATE t SET state = 'running' WHERE id = (SELECT id FROM t WHERE state = 'pending' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id`,
      };
      return {
        async once() {
          const { rows } = await client.query(claim);
          if (rows.length === 0) return false;
          await client.query({ name: 'resolve', text: `UPDATE t SET state = 'done' WHERE id = $1`, values: [rows[0].id] });
          return true;
        },
        close: () => client.end(),
      };
    }
    default:
      throw new Error(`queue-worker.mjs: unknown kind ${JSON.stringify(kind)}`);
  }
}
