/**
 * The PostgreSQL queue's schema, as numbered migrations. Every start-up
 * (and `drover migrate`) applies the missing ones under an advisory lock, so
 * many workers starting at once apply each exactly once; a database newer
 * than this drover is refused rather than misread. Append, never edit.
 *
 * Times are bigint milliseconds from the queue's clock, never the server's
 * now() in SQL, so that tests can inject a clock; by default that clock is
 * the server's, read through its offset to the worker's (postgres.ts), so
 * every rule runs on one clock.
 */
import type pg from 'pg';
import { ConfigError } from '../model/errors.js';
import { ident } from './postgres-connection.js';

const STATES = `('pending', 'running', 'completed', 'failed', 'exception')`;

export const MIGRATIONS: readonly string[] = [
  `CREATE TABLE tasks (
     id           text PRIMARY KEY,
     payload      jsonb NOT NULL,
     state        text NOT NULL CHECK (state IN ${STATES}),
     created      bigint NOT NULL,
     deadline     bigint NOT NULL,
     retries_left integer NOT NULL CHECK (retries_left >= 0),
     seq          bigint GENERATED ALWAYS AS IDENTITY
   );
   CREATE INDEX tasks_by_created ON tasks (created DESC, seq DESC);
   CREATE INDEX tasks_by_state ON tasks (state, created DESC, seq DESC);
   CREATE INDEX tasks_open_by_deadline ON tasks (deadline) WHERE state IN ('pending', 'running');
   CREATE TABLE runs (
     task_id         text NOT NULL REFERENCES tasks (id),
     run_id          integer NOT NULL,
     state           text NOT NULL CHECK (state IN ${STATES}),
     reason_created  text NOT NULL CHECK (reason_created IN ('scheduled', 'retry')),
     reason_resolved text,
     message         text,
     worker_id       text,
     taken_until     bigint,
     scheduled       bigint NOT NULL,
     started         bigint,
     resolved        bigint,
     -- 'worker' when the holder reported it, 'queue' when swept or canceled: a retried report is only recognised as the worker's own.
     resolved_by     text CHECK (resolved_by IN ('worker', 'queue')),
     seq             bigint GENERATED ALWAYS AS IDENTITY,
     PRIMARY KEY (task_id, run_id)
   );
   CREATE INDEX runs_pending ON runs (scheduled, seq) WHERE state = 'pending';
   CREATE INDEX runs_running ON runs (taken_until) WHERE state = 'running';
   CREATE TABLE artifacts (
     task_id      text NOT NULL,
     run_id       integer NOT NULL,
     name         text NOT NULL,
     content_type text NOT NULL,
     expires      bigint,
     state        text NOT NULL CHECK (state IN ('streaming', 'complete')),
     size         bigint NOT NULL DEFAULT 0,
     created      bigint NOT NULL,
     -- Lets a retried upload start recognise the row its first attempt committed.
     upload_id    text NOT NULL,
     PRIMARY KEY (task_id, run_id, name),
     FOREIGN KEY (task_id, run_id) REFERENCES runs (task_id, run_id)
   );
   CREATE TABLE artifact_chunks (
     task_id  text NOT NULL,
     run_id   integer NOT NULL,
     name     text NOT NULL,
     "offset" bigint NOT NULL,
     data     bytea NOT NULL,
     PRIMARY KEY (task_id, run_id, name, "offset"),
     FOREIGN KEY (task_id, run_id, name) REFERENCES artifacts (task_id, run_id, name) ON DELETE CASCADE
   );
   -- Log chunks compress poorly in small pieces and are read back whole: skip compression.
   ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;`,
  // A claim writes only its run: a task that waits or runs is 'pending' in this table, and whether it runs is
  // its current run's state (as in the SQLite queue's migration 2). A claim then changes one row, not two, and
  // moves no task between the `state` indexes.
  `UPDATE tasks SET state = 'pending' WHERE state = 'running';
   DROP INDEX tasks_open_by_deadline;
   CREATE INDEX tasks_open_by_deadline ON tasks (deadline) WHERE state = 'pending';`,
];

/** A stable 64-bit key per schema for pg_advisory_lock: start-ups of different schemas do not wait for each other. */
const LOCK_SQL = `SELECT pg_advisory_lock(hashtextextended('drover-migrate:' || $1, 0))`;
const UNLOCK_SQL = `SELECT pg_advisory_unlock(hashtextextended('drover-migrate:' || $1, 0))`;

export interface MigrationResult {
  readonly from: number;
  readonly to: number;
}

/** Brings `schema` to the latest version; `client` is a connection of its own (the lock is per session). */
export async function migrate(client: pg.ClientBase, schema: string): Promise<MigrationResult> {
  await client.query(LOCK_SQL, [schema]);
  try {
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${ident(schema)}`);
    await client.query(`CREATE TABLE IF NOT EXISTS ${ident(schema)}.schema_migrations (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())`);
    const { rows } = await client.query<{ version: number | null }>(`SELECT max(version) AS version FROM ${ident(schema)}.schema_migrations`);
    const from = rows[0]?.version ?? 0;
    if (from > MIGRATIONS.length) {
      throw new ConfigError(`queue schema "${schema}" is at version ${from}, newer than this drover knows (${MIGRATIONS.length}); upgrade drover`);
    }
    for (let version = from + 1; version <= MIGRATIONS.length; version++) {
      // One transaction per migration: a failure leaves the schema at the last whole version.
      await client.query('BEGIN');
      try {
        await client.query(`SET LOCAL search_path TO ${ident(schema)}`);
        await client.query(MIGRATIONS[version - 1]!);
        await client.query(`INSERT INTO schema_migrations (version) VALUES ($1)`, [version]);
        await client.query('COMMIT');
      } catch (error) {
        await client.query('ROLLBACK').catch(() => undefined);
        throw error;
      }
    }
    return { from, to: MIGRATIONS.length };
  } finally {
    await client.query(UNLOCK_SQL, [schema]).catch(() => undefined);
  }
}
