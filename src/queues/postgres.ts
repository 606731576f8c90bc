/**
 * The distributed queue: PostgreSQL keeps tasks, runs and artifacts for
 * many workers on many machines. It keeps the rules of queue.ts exactly as
 * the embedded SqliteQueue does (the conformance suite runs both); what
 * differs is how:
 *
 *  - A claim is ONE statement, writing only the run (a task that runs is
 *    pending in the tasks table): pending runs picked `FOR UPDATE SKIP LOCKED`,
 *    marked running and returned, so workers never wait on each other's
 *    rows and never get the same run.
 *  - Every report is a conditional update on task, run, worker, state and
 *    claim time; a late report from a worker that lost its claim changes
 *    nothing and is refused with ClaimLostError. A report repeated by the
 *    same worker with the same resolution (its first attempt committed, but
 *    the answer was lost with the connection) is acknowledged, not refused:
 *    reports are retried until acknowledged, and applied once.
 *  - The hot reports are one prepared statement each, found by primary
 *    key: a reclaim, and a resolution that schedules no retry (the run and
 *    its task in one CTE).
 *  - Time rules are applied lazily, as in SQLite: a report holds only while
 *    its claim and its task's deadline have not passed, so it needs no sweep
 *    to be right; a refused report sweeps before it says why. Claims sweep
 *    at most once per poll interval, and when they find nothing; `sweep()`
 *    and `cancel` sweep at once. Sweepers lock rows with SKIP LOCKED, so any
 *    number of workers may sweep at once and each run is swept once.
 *  - `submit` and a retry NOTIFY the work channel; waiting workers LISTEN
 *    on it and claim at once. Polling every `pollIntervalMs` remains as the
 *    fallback (a lost listener connection, expired claims nobody notified).
 *    `cancel` NOTIFYs the cancel channel, which feeds watchCancellation.
 *  - Connection failures become QueueUnavailableError, which the worker
 *    retries with backoff; the listener reconnects by itself.
 *
 * Channels and tables are per schema, so several queues share a database.
 */
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { ConfigError, InternalError, QueueUnavailableError, TaskStateError, errorMessage } from '../model/errors.js';
import { RETRYABLE_REASONS, type Resolution } from '../model/resolution.js';
import { assertTaskDefinition, runKey, slugid, type Claim, type RunRef, type TaskDefinition, type TaskId, type TaskState } from '../model/task.js';
import { artifactInfo, columns, describeRun, iso, lostClaim, runStatus, type ArtifactRow as SqlArtifactRow, type RunRow as SqlRunRow } from './sql-rows.js';
import { DirectoryArtifactStore, takeOver, type ArtifactKey, type ArtifactStore } from './artifact-store.js';
import { PostgresArtifactStore } from './postgres-artifact-store.js';
import {
  DEFAULT_SCHEMA, asQueueError, checkSchemaName, isConfigProblem, isTransient, parseQueueUrl, pgTypes, retryTransient, type QueueUrl,
} from './postgres-connection.js';
import { MIGRATIONS, migrate, type MigrationResult } from './postgres-migrations.js';
import { uploadsAbandoned, type ArtifactInfo, type ArtifactMeta, type ClaimWorkOptions, type ListTasksOptions, type Queue, type ReadArtifactOptions, type RunStatus, type TaskStatus } from './queue.js';
import { artifactNameProblem, DEFAULT_CLAIM_TIMEOUT_MS, DEFAULT_POLL_INTERVAL_MS } from './sqlite.js';
import { CancelWatchers, Wakers } from './wakers.js';

const FOLLOW_POLL_MS = 100;
/** How often a queue on the server's clock measures its offset to it again (clockOffset). */
const CLOCK_CHECK_MS = 60_000;
/** Cancellation arrives by NOTIFY; this poll only catches notifications lost while the listener was down. */
const MIN_CANCEL_POLL_MS = 1_000;
/** How long writes that must not be lost (an artifact's start and end) are retried while the server is away. */
const WRITE_RETRY_MS = 120_000;
/** A transaction that lost a deadlock or serialization race is run again this many times. */
const RACE_RETRIES = 3;

export interface PostgresQueueOptions {
  /** `postgres://user[:password]@host[:port]/database`; `?schema=NAME` picks the schema. */
  readonly url: string;
  /** The schema of drover's tables; overrides the URL's; default `drover`. */
  readonly schema?: string;
  readonly claimTimeoutMs?: number;
  /** How often a waiting claim looks for work when no notification came. */
  readonly pollIntervalMs?: number;
  /** Keep artifacts as files in this directory, shared by every worker and reader; default: in PostgreSQL. */
  readonly artifactDir?: string;
  /** Connections in the pool, besides the one that listens; default 10. */
  readonly poolSize?: number;
  /** Apply missing migrations when opening (default); false refuses a schema that is not up to date. */
  readonly migrate?: boolean;
  /**
   * The clock for claims and deadlines; tests inject one to skip time. By
   * default the server's: this machine's clock and its offset to the
   * server's, measured when the queue opens and every `clockCheckMs`, so
   * workers whose clocks disagree still agree on when a claim runs out.
   */
  readonly now?: () => number;
  /** How often the offset to the server's clock is measured again; default a minute. */
  readonly clockCheckMs?: number;
  /** Told each time a write meets an unreachable server and will be retried: for the worker's log. */
  readonly onRetry?: (error: unknown) => void;
}

interface TaskRow { id: string; payload: TaskStatus['payload']; state: TaskState; created: number; deadline: number; retries_left: number }
/** PostgreSQL's rows add who resolved a run (a repeated report is recognised by it) and the upload's id. */
interface RunRow extends SqlRunRow { resolved_by: 'worker' | 'queue' | null }
interface ArtifactRow extends SqlArtifactRow { upload_id: string }

const OPEN = `state IN ('pending', 'running')`;
/** An open task (pending or running): the tasks table says 'pending' for both (migration 2); whether it runs is its run's state. */
const TASK_OPEN = `state = 'pending'`;
/** A report's condition on run ($task, $run) by worker $worker at $now: it holds the claim, and neither the claim nor the task's deadline has passed. */
const held = (task: string, run: string, worker: string, now: string): string =>
  `task_id = ${task} AND run_id = ${run} AND state = 'running' AND worker_id = ${worker} AND taken_until > ${now}
   AND EXISTS (SELECT 1 FROM tasks WHERE id = ${task} AND deadline > ${now})`;
const RESOLVE_HELD = `UPDATE runs SET state = $1, reason_resolved = $2, message = $3, resolved = $4, resolved_by = 'worker'
                      WHERE ${held('$5', '$6', '$7', '$4')}`;
/** A resolution that schedules no retry, in one statement: the run, then its task (runs are locked before tasks everywhere). */
const RESOLVE_FINAL = {
  name: 'drover_resolve_final',
  text: `WITH resolved AS (${RESOLVE_HELD} RETURNING task_id)
         UPDATE tasks t SET state = $1 FROM resolved r WHERE t.id = r.task_id`,
};
const RECLAIM = { name: 'drover_reclaim', text: `UPDATE runs SET taken_until = $1 WHERE ${held('$2', '$3', '$4', '$5')}` };
const HOLDS = `SELECT 1 FROM runs WHERE ${held('$1', '$2', '$3', '$4')}`;
const RESOLVE_OPEN = `UPDATE runs SET state = $1, reason_resolved = $2, message = $3, resolved = $4, resolved_by = 'queue'
                      WHERE task_id = $5 AND run_id = $6 AND ${OPEN}`;
/**
 * The claim: one statement, so a run is picked, marked and returned atomically, and contenders skip each other's rows.
 * It writes the run only (migration 2): its task's row stays as it is.
 *
 * A named (prepared) statement per `count`, with the LIMIT written into its text: parsed and planned once per
 * connection, not per claim. After five runs PostgreSQL may switch to a generic plan, one that does not know the
 * parameters; a LIMIT given as a parameter then counted as unknown, and with a million pending runs such a plan
 * sorted them all (a claim took 200 ms, not 1). With the LIMIT in the text, the generic plan walks the pending index
 * in order and stops at `count` (test/queue-postgres-migration.test.ts checks the generic plan). Larger counts, which a
 * worker of very large capacity could ask for, are planned each time.
 */
const CLAIM_PREPARED_UP_TO = 64;
/** Exported for the test of its generic plan. */
export const claimStatement = (count: number): { name?: string; text: string } => ({
  ...(count <= CLAIM_PREPARED_UP_TO ? { name: `drover_claim_${count}` } : {}),
  text: `
  WITH picked AS (
    SELECT r.task_id, r.run_id FROM runs r JOIN tasks t ON t.id = r.task_id
    WHERE r.state = 'pending' AND t.deadline > $2
    ORDER BY r.scheduled, r.seq
    LIMIT ${count}
    FOR UPDATE OF r SKIP LOCKED
  ), started AS (
    UPDATE runs r SET state = 'running', worker_id = $1, started = $2, taken_until = $3
    FROM picked p WHERE r.task_id = p.task_id AND r.run_id = p.run_id AND r.state = 'pending'
    RETURNING r.task_id, r.run_id, r.scheduled, r.seq
  )
  SELECT s.task_id, s.run_id, t.payload, t.deadline, t.retries_left FROM started s JOIN tasks t ON t.id = s.task_id
  ORDER BY s.scheduled, s.seq`,
});
/** A cheap read that lets idle pollers skip the claim, and tells claims whether to sweep. */
const ANY_WORK = { text: `
  SELECT EXISTS (SELECT 1 FROM runs WHERE state = 'pending') AS pending,
         EXISTS (SELECT 1 FROM runs WHERE state = 'running' AND taken_until <= $1)
      OR EXISTS (SELECT 1 FROM tasks WHERE ${TASK_OPEN} AND deadline <= $1) AS due` };

export class PostgresQueue implements Queue {
  /** Connects, applies missing migrations (under an advisory lock) and returns the queue. */
  static async open(options: PostgresQueueOptions): Promise<PostgresQueue> {
    const url = parseQueueUrl(options.url);
    const schema = options.schema ?? url.schema ?? DEFAULT_SCHEMA;
    checkSchemaName(schema, 'queue schema');
    for (const [name, value] of [['claimTimeoutMs', options.claimTimeoutMs], ['pollIntervalMs', options.pollIntervalMs], ['poolSize', options.poolSize], ['clockCheckMs', options.clockCheckMs]] as const) {
      if (value !== undefined && !(Number.isFinite(value) && value > 0)) {
        throw new ConfigError(`queue option ${name} must be a positive number, not ${String(value)}`);
      }
    }
    const clientConfig: pg.ClientConfig = {
      connectionString: url.connectionString,
      // Every connection works in the queue's schema: the SQL below names tables without one.
      options: `-c search_path=${schema}`,
      types: pgTypes,
      keepAlive: true,
      connectionTimeoutMillis: 10_000,
      // A server that stops answering (a cut network) must not hang a worker: the query fails and is retried.
      query_timeout: 60_000,
      // Names the schema too, so an operator (or a test) can tell the queues' connections apart in pg_stat_activity.
      application_name: `drover ${schema}`,
    };
    const pool = new pg.Pool({ ...clientConfig, max: options.poolSize ?? 10, idleTimeoutMillis: 30_000 });
    // An idle connection that breaks (a server restart) is dropped by the pool; the next query opens another.
    pool.on('error', () => undefined);
    // A checked-out connection that breaks between queries would otherwise throw from an 'error' event nobody hears.
    pool.on('connect', (client) => client.on('error', () => undefined));
    let offset: number | undefined;
    try {
      const client = await pool.connect();
      let failed: Error | undefined;
      try {
        if (options.migrate === false) await checkVersion(client, schema);
        else await migrate(client, schema);
        if (options.now === undefined) offset = await clockOffset((text) => client.query<{ now: string }>(text));
      } catch (error) {
        failed = error as Error;
        throw error;
      } finally {
        client.release(failed !== undefined && isTransient(failed) ? failed : undefined);
      }
    } catch (error) {
      await pool.end().catch(() => undefined);
      throw openError(error, url, schema);
    }
    let store: ArtifactStore;
    try {
      store = options.artifactDir === undefined ? new PostgresArtifactStore(pool, url, options.onRetry) : new DirectoryArtifactStore(options.artifactDir);
    } catch (error) {
      await pool.end().catch(() => undefined);
      throw error;
    }
    return new PostgresQueue(pool, clientConfig, url, schema, store, options, offset ?? 0);
  }

  /** Applies missing migrations and closes: `drover migrate`. */
  static async migrate(options: Omit<PostgresQueueOptions, 'migrate'>): Promise<MigrationResult & { schema: string }> {
    const url = parseQueueUrl(options.url);
    const schema = options.schema ?? url.schema ?? DEFAULT_SCHEMA;
    checkSchemaName(schema, 'queue schema');
    const client = new pg.Client({ connectionString: url.connectionString, connectionTimeoutMillis: 10_000, types: pgTypes });
    client.on('error', () => undefined);
    try {
      await client.connect();
      return { ...(await migrate(client, schema)), schema };
    } catch (error) {
      throw openError(error, url, schema);
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  readonly schema: string;
  readonly url: QueueUrl;
  readonly artifactStore: ArtifactStore;
  private readonly pool: pg.Pool;
  private readonly clientConfig: pg.ClientConfig;
  private readonly claimTimeoutMs: number;
  private readonly pollIntervalMs: number;
  /** The queue's clock (Queue.now): the server's, unless one was injected. */
  readonly now: () => number;
  private readonly workChannel: string;
  private readonly cancelChannel: string;
  /** Long polls waiting on this instance; a work notification, `submit` and `close` wake them. */
  private readonly wakers = new Wakers();
  /** Queue-clock time before which claims need not look for expired claims and deadlines (once per poll interval). */
  private nextSweep = -Infinity;
  /** Whether this instance's last claim found nothing: then the next looks (a cheap read) before it claims. */
  private idle = true;
  private readonly watchers: CancelWatchers;
  private listener: pg.Client | undefined;
  private listening = false;
  private listenerFailures = 0;
  private listenerTimer: NodeJS.Timeout | undefined;
  /** The server's clock minus this machine's (clockOffset), when the queue runs on the server's clock. */
  private clockOffset: number;
  private readonly clockTimer: NodeJS.Timeout | undefined;
  private readonly closing = new AbortController();
  private closed: Promise<void> | undefined;

  private constructor(pool: pg.Pool, clientConfig: pg.ClientConfig, url: QueueUrl, schema: string, store: ArtifactStore, options: PostgresQueueOptions, offset: number) {
    this.pool = pool;
    this.clientConfig = clientConfig;
    this.url = url;
    this.schema = schema;
    this.artifactStore = store;
    this.claimTimeoutMs = options.claimTimeoutMs ?? DEFAULT_CLAIM_TIMEOUT_MS;
    this.pollIntervalMs = options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS;
    this.watchers = new CancelWatchers(Math.max(MIN_CANCEL_POLL_MS, this.pollIntervalMs), () => this.checkCancellations());
    this.clockOffset = offset;
    if (options.now !== undefined) this.now = options.now;
    else {
      this.now = () => Date.now() + this.clockOffset;
      this.clockTimer = setInterval(() => {
        clockOffset((text) => this.pool.query<{ now: string }>(text)).then((measured) => (this.clockOffset = measured), () => undefined);
      }, options.clockCheckMs ?? CLOCK_CHECK_MS);
      this.clockTimer.unref();
    }
    this.workChannel = `${schema}_work`;
    this.cancelChannel = `${schema}_cancel`;
  }

  /** Whether the LISTEN connection is up (notifications arrive); for status output and tests. */
  get isListening(): boolean {
    return this.listening;
  }

  async submit(task: TaskDefinition): Promise<TaskId> {
    assertTaskDefinition(task);
    const taskId = slugid();
    const now = this.now();
    // One statement: the task, its first run and the wake-up commit together.
    await this.query(
      `WITH task AS (
         INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES ($1, $2, 'pending', $3, $4, $5) RETURNING id
       ), run AS (
         INSERT INTO runs (task_id, run_id, state, reason_created, scheduled) SELECT id, 0, 'pending', 'scheduled', $3 FROM task
       )
       SELECT pg_notify($6, '')`,
      [taskId, JSON.stringify(task.payload), now, task.deadline, task.retries, this.workChannel],
    );
    this.wake();
    return taskId;
  }

  async claimWork({ workerId, count, waitMs, signal }: ClaimWorkOptions): Promise<Claim[]> {
    // Waiting is measured in real time: the injected clock rules claims and deadlines, not how long a caller blocks.
    this.assertOpen();
    const giveUpAt = performance.now() + waitMs;
    for (;;) {
      const seen = this.wakers.wakeups;
      const claims = await this.claimNow(workerId, count);
      const left = giveUpAt - performance.now();
      if (claims.length > 0 || left <= 0 || signal?.aborted) return claims;
      // Right before every wait, not once at the start: a reconnect timer that fired while this claim
      // was querying (nobody waiting at that moment) does not reconnect, and the claim would then
      // wait on polls alone. A listener that comes up wakes the waiters, who look again.
      this.listen();
      if (this.wakers.wakeups === seen) await this.wakers.pause(Math.min(left, this.pollIntervalMs), signal);
      if (this.closing.signal.aborted || signal?.aborted) return [];
    }
  }

  async reclaim(run: RunRef, workerId: string): Promise<{ takenUntil: number }> {
    const now = this.now();
    const takenUntil = now + this.claimTimeoutMs;
    const { rowCount } = await this.run(RECLAIM, [takenUntil, run.taskId, run.runId, workerId, now]);
    if (rowCount === 1) return { takenUntil };
    throw await this.transaction((client) => this.refusal(client, run, workerId));
  }

  async resolve(run: RunRef, workerId: string, resolution: Resolution): Promise<void> {
    const { state, reason, message } = columns(resolution);
    const values = [state, reason, message, this.now(), run.taskId, run.runId, workerId];
    const retryable = resolution.state === 'exception' && RETRYABLE_REASONS.has(resolution.reason);
    if (!retryable && (await this.run(RESOLVE_FINAL, values)).rowCount === 1) return;
    const refusal = await this.transaction(async (client) => {
      const now = this.now();
      const { rowCount } = await client.query(RESOLVE_HELD, [...values.slice(0, 3), now, ...values.slice(4)]);
      if (rowCount === 1) {
        await this.afterResolve(client, run, resolution, now);
        return undefined;
      }
      const row = await runRow(client, run);
      // The same report again: its first attempt committed but the answer was lost. Acknowledge it; change nothing.
      if (row?.resolved_by === 'worker' && row.worker_id === workerId && row.state === state && row.reason_resolved === reason && row.message === message) {
        return undefined;
      }
      return this.refusal(client, run, workerId);
    });
    if (refusal) throw refusal;
  }

  async cancel(taskId: TaskId): Promise<void> {
    const refusal = await this.transaction(async (client) => {
      const now = await this.sweepNow(client);
      const task = (await client.query<TaskRow>(`SELECT * FROM tasks WHERE id = $1`, [taskId])).rows[0];
      if (!task) return new TaskStateError(`cannot cancel task ${taskId}: there is no such task`);
      // Runs are locked before tasks everywhere (claim, resolve, sweep), so cancel takes the run first too.
      const current = (await client.query<RunRow>(`SELECT * FROM runs WHERE task_id = $1 ORDER BY run_id DESC LIMIT 1 FOR UPDATE`, [taskId])).rows[0]!;
      if (current.state !== 'pending' && current.state !== 'running') {
        // A retry may have been scheduled while we waited for the lock: then there is a newer run to cancel.
        const newer = await client.query(`SELECT 1 FROM runs WHERE task_id = $1 AND run_id > $2`, [taskId, current.run_id]);
        if (newer.rowCount) throw Object.assign(new Error('a newer run appeared'), { code: '40001' });
        return new TaskStateError(`cannot cancel task ${taskId}: it is already resolved ${describeRun(runStatus(current))}`);
      }
      const run = { taskId, runId: current.run_id };
      await this.end(client, run, { state: 'exception', reason: 'canceled', message: 'canceled by user' }, now);
      await client.query(`SELECT pg_notify($1, $2)`, [this.cancelChannel, runKey(run)]);
      return undefined;
    });
    if (refusal) throw refusal;
  }

  watchCancellation(run: RunRef, onCanceled: () => void): () => void {
    this.assertOpen();
    const unwatch = this.watchers.watch(run, onCanceled);
    this.listen();
    return unwatch;
  }

  uploadArtifact(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    return takeOver(source, () => this.upload(run, workerId, meta, source));
  }

  private async upload(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    const problem = artifactNameProblem(meta.name);
    if (problem) throw new TaskStateError(`artifact name ${JSON.stringify(meta.name)} ${problem}`);
    const key: ArtifactKey = { taskId: run.taskId, runId: run.runId, name: meta.name };
    const uploadId = randomBytes(12).toString('base64url');
    let created = 0;
    // Retried while the server is away: a live log starts with the run, and losing it would fail the task.
    const refusal = await this.retrying(() => this.transaction(async (client) => {
      const now = this.now();
      const existing = (await client.query<ArtifactRow>(
        `SELECT * FROM artifacts WHERE task_id = $1 AND run_id = $2 AND name = $3`, [key.taskId, key.runId, key.name],
      )).rows[0];
      if (existing?.upload_id === uploadId) {
        created = existing.created; // our own first attempt committed
        return undefined;
      }
      const holds = await client.query(HOLDS, [run.taskId, run.runId, workerId, now]);
      if (holds.rowCount === 0) return this.refusal(client, run, workerId);
      // The same name, or one that would need the other to be a directory (`a` and `a/b`).
      const clash = (await client.query<{ name: string }>(
        `SELECT name FROM artifacts WHERE task_id = $1 AND run_id = $2
           AND (name = $3 OR left(name, length($3) + 1) = $3 || '/' OR left($3, length(name) + 1) = name || '/') LIMIT 1`,
        [key.taskId, key.runId, key.name],
      )).rows[0];
      if (clash) {
        return new TaskStateError(clash.name === meta.name
          ? `run ${runKey(run)} already has an artifact named "${meta.name}"`
          : `artifact "${meta.name}" clashes with "${clash.name}" of run ${runKey(run)}: one would have to be a directory of the other`);
      }
      // The store's artifact exists before the row commits, so a reader that finds the row can always read it.
      await this.artifactStore.create(key);
      await client.query(
        `INSERT INTO artifacts (task_id, run_id, name, content_type, expires, state, size, created, upload_id) VALUES ($1, $2, $3, $4, $5, 'streaming', 0, $6, $7)`,
        [key.taskId, key.runId, key.name, meta.contentType, meta.expires ?? null, now, uploadId],
      );
      created = now;
      return undefined;
    }));
    if (refusal) throw refusal;
    let size: number;
    try {
      size = await this.artifactStore.write(key, source);
    } catch (error) {
      // A half-written artifact would pass for a whole one; drop it so the caller can upload again.
      await this.query(`DELETE FROM artifacts WHERE task_id = $1 AND run_id = $2 AND name = $3 AND upload_id = $4`, [key.taskId, key.runId, key.name, uploadId])
        .then(() => this.artifactStore.remove(key))
        .catch(() => undefined); // the source's error says more than a failed clean-up would
      throw error;
    }
    await this.retrying(() => this.query(
      `UPDATE artifacts SET state = 'complete', size = $1 WHERE task_id = $2 AND run_id = $3 AND name = $4`, [size, key.taskId, key.runId, key.name],
    ));
    return {
      taskId: run.taskId, runId: run.runId, name: meta.name, contentType: meta.contentType,
      ...(meta.expires === undefined ? {} : { expires: meta.expires }), state: 'complete', size, created,
    };
  }

  async readArtifact(run: RunRef, name: string, options: ReadArtifactOptions = {}): Promise<Readable> {
    await this.artifactRow(run, name);
    const key: ArtifactKey = { taskId: run.taskId, runId: run.runId, name };
    if (!options.follow) return Readable.from(this.artifactStore.read(key, 0), { objectMode: false });
    return Readable.from(this.follow(run, key, options.signal), { objectMode: false });
  }

  async listArtifacts(run: RunRef): Promise<ArtifactInfo[]> {
    const rows = await this.query<ArtifactRow>(`SELECT * FROM artifacts WHERE task_id = $1 AND run_id = $2 ORDER BY created, name`, [run.taskId, run.runId]);
    if (rows.length === 0 && (await this.query(`SELECT 1 FROM runs WHERE task_id = $1 AND run_id = $2`, [run.taskId, run.runId])).length === 0) {
      throw new TaskStateError(`task ${run.taskId} has no run ${run.runId}`);
    }
    return rows.map(artifactInfo);
  }

  async task(taskId: TaskId): Promise<TaskStatus> {
    const [status] = await this.snapshot(async (client) => {
      const { rows } = await client.query<TaskRow>(`SELECT * FROM tasks WHERE id = $1`, [taskId]);
      return this.statuses(client, rows);
    });
    if (!status) throw new TaskStateError(`there is no task ${taskId}`);
    return status;
  }

  async listTasks({ state, limit = 100 }: ListTasksOptions = {}): Promise<TaskStatus[]> {
    const max = Math.max(0, Math.floor(limit));
    const [sql, values] = listingQuery(state, max);
    return this.snapshot(async (client) => this.statuses(client, (await client.query<TaskRow>(sql, values)).rows));
  }

  async sweep(): Promise<number> {
    return this.transaction((client) => this.sweepAt(client, this.now()));
  }

  async close(): Promise<void> {
    this.closed ??= (async () => {
      this.closing.abort();
      this.wakers.wake();
      this.watchers.clear();
      clearTimeout(this.listenerTimer);
      clearInterval(this.clockTimer);
      const listener = this.listener;
      this.listener = undefined;
      this.listening = false;
      await listener?.end().catch(() => undefined);
      await this.artifactStore.close();
      await this.pool.end().catch(() => undefined);
    })();
    return this.closed;
  }

  /**
   * One attempt: claim up to `count` pending runs, oldest first. After a
   * claim that found nothing, and once per poll interval, it first looks
   * whether anything is pending or due, and sweeps when something is due.
   */
  private async claimNow(workerId: string, count: number): Promise<Claim[]> {
    if (count < 1) return [];
    if (this.idle || this.now() >= this.nextSweep) {
      const now = this.now();
      const [work] = (await this.run<{ pending: boolean; due: boolean }>(ANY_WORK, [now])).rows;
      if (work?.due) await this.sweep();
      else this.nextSweep = now + this.pollIntervalMs;
      if (!work?.pending && !work?.due) return [];
    }
    const now = this.now();
    const { rows } = await this.run<{ task_id: string; run_id: number; payload: Claim['payload']; deadline: number; retries_left: number }>(
      claimStatement(Math.floor(count)), [workerId, now, now + this.claimTimeoutMs],
    );
    this.idle = rows.length === 0;
    return rows.map((row) => ({
      taskId: row.task_id, runId: row.run_id, workerId, payload: row.payload,
      deadline: row.deadline, takenUntil: now + this.claimTimeoutMs, retriesLeft: row.retries_left,
    }));
  }

  private async sweepNow(client: pg.ClientBase): Promise<number> {
    const now = this.now();
    await this.sweepAt(client, now);
    return now;
  }

  /**
   * Resolves runs the clock has overtaken. Deadlines go first: a run past its
   * task's deadline ends `deadline-exceeded`, not `claim-expired` plus a retry
   * that could never run. SKIP LOCKED: a run another transaction is busy with
   * is left to it, so concurrent sweepers neither wait nor sweep twice.
   */
  private async sweepAt(client: pg.ClientBase, now: number): Promise<number> {
    this.nextSweep = now + this.pollIntervalMs;
    const overdue = (await client.query<{ task_id: string; run_id: number; deadline: number }>(
      `SELECT r.task_id, r.run_id, t.deadline FROM runs r JOIN tasks t ON t.id = r.task_id
       WHERE t.${TASK_OPEN} AND t.deadline <= $1 AND r.${OPEN} FOR UPDATE OF r SKIP LOCKED`, [now],
    )).rows;
    for (const row of overdue) {
      const message = `task deadline passed at ${iso(row.deadline)}`;
      await this.end(client, { taskId: row.task_id, runId: row.run_id }, { state: 'exception', reason: 'deadline-exceeded', message }, now);
    }
    const expired = (await client.query<{ task_id: string; run_id: number; worker_id: string; taken_until: number }>(
      `SELECT task_id, run_id, worker_id, taken_until FROM runs WHERE state = 'running' AND taken_until <= $1 FOR UPDATE SKIP LOCKED`, [now],
    )).rows;
    for (const row of expired) {
      const message = `claim expired at ${iso(row.taken_until)}: worker ${row.worker_id} did not reclaim the run in time`;
      await this.end(client, { taskId: row.task_id, runId: row.run_id }, { state: 'exception', reason: 'claim-expired', message }, now);
    }
    return overdue.length + expired.length;
  }

  /**
   * Why a report on `run` was refused. It sweeps first, so a claim or
   * deadline that passed unswept is resolved now and named as the reason.
   */
  private async refusal(client: pg.ClientBase, run: RunRef, workerId: string): Promise<Error> {
    await this.sweepNow(client);
    const row = await runRow(client, run);
    return lostClaim(row && runStatus(row), row?.deadline, run, workerId);
  }

  /** Resolves a pending or running run that no worker is reporting on: swept or canceled. */
  private async end(client: pg.ClientBase, run: RunRef, resolution: Resolution, now: number): Promise<void> {
    const { state, reason, message } = columns(resolution);
    await client.query(RESOLVE_OPEN, [state, reason, message, now, run.taskId, run.runId]);
    await this.afterResolve(client, run, resolution, now);
  }

  /** A resolved run's task follows it, unless the exception earns a retry: then run N+1 waits, and workers hear of it. */
  private async afterResolve(client: pg.ClientBase, run: RunRef, resolution: Resolution, now: number): Promise<void> {
    if (resolution.state === 'exception' && RETRYABLE_REASONS.has(resolution.reason)) {
      const { rowCount } = await client.query(`UPDATE tasks SET retries_left = retries_left - 1, state = 'pending' WHERE id = $1 AND retries_left > 0`, [run.taskId]);
      if (rowCount === 1) {
        await client.query(`INSERT INTO runs (task_id, run_id, state, reason_created, scheduled) VALUES ($1, $2, 'pending', 'retry', $3)`, [run.taskId, run.runId + 1, now]);
        await client.query(`SELECT pg_notify($1, '')`, [this.workChannel]);
        return;
      }
    }
    await client.query(`UPDATE tasks SET state = $1 WHERE id = $2`, [resolution.state, run.taskId]);
  }

  /**
   * Runs `fn` in a transaction on one pooled connection, opened by `begin`
   * (snapshot's is read-only, REPEATABLE READ). A refusal is
   * returned by `fn` (not thrown), so the sweep it did still commits; a lost
   * deadlock or serialization race runs it again; a broken connection is
   * discarded and reported as QueueUnavailableError.
   */
  private async transaction<T>(fn: (client: pg.PoolClient) => Promise<T>, begin = 'BEGIN'): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      this.assertOpen();
      let client: pg.PoolClient;
      try {
        client = await this.pool.connect();
      } catch (error) {
        throw this.failure(error);
      }
      let broken: Error | undefined;
      try {
        await client.query(begin);
        const result = await fn(client);
        await client.query('COMMIT');
        return result;
      } catch (error) {
        await client.query('ROLLBACK').catch((rollbackError: Error) => void (broken = rollbackError));
        const code = (error as { code?: string }).code;
        if ((code === '40001' || code === '40P01') && attempt < RACE_RETRIES && broken === undefined) continue;
        throw this.failure(error);
      } finally {
        client.release(broken);
      }
    }
  }

  /** Reads that see the queue as of one moment: a read-only REPEATABLE READ transaction. */
  private snapshot<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    return this.transaction(fn, 'BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
  }

  private async query<R extends pg.QueryResultRow>(sql: string, values: unknown[]): Promise<R[]> {
    return (await this.run<R>({ text: sql }, values)).rows;
  }

  /** One statement on a pooled connection; a `name` makes it a prepared statement, parsed once per connection. */
  private async run<R extends pg.QueryResultRow>(statement: { name?: string; text: string }, values: unknown[]): Promise<pg.QueryResult<R>> {
    this.assertOpen();
    try {
      return await this.pool.query<R>({ ...statement, values });
    } catch (error) {
      throw this.failure(error);
    }
  }

  /** Retries `fn` while the queue is unreachable, for writes whose loss would cost a task its log. */
  private retrying<T>(fn: () => Promise<T>): Promise<T> {
    return retryTransient(fn, { forMs: WRITE_RETRY_MS, signal: this.closing.signal });
  }

  private failure(error: unknown): unknown {
    if (this.closing.signal.aborted && !(error instanceof InternalError)) {
      return new InternalError(`queue ${this.url.display} (schema ${this.schema}) is closed`, { cause: error });
    }
    return asQueueError(error, this.url);
  }

  /** Starts the LISTEN connection if it is not up; it reconnects by itself until the queue closes. */
  private listen(): void {
    if (this.listener !== undefined || this.listenerTimer !== undefined || this.closing.signal.aborted) return;
    const client = new pg.Client(this.clientConfig);
    this.listener = client;
    const lost = () => {
      if (this.listener !== client) return;
      this.listener = undefined;
      this.listening = false;
      void client.end().catch(() => undefined);
      if (this.closing.signal.aborted) return;
      const delay = Math.min(5_000, 100 * 2 ** this.listenerFailures++);
      this.listenerTimer = setTimeout(() => {
        this.listenerTimer = undefined;
        if (this.wakers.size > 0 || this.watchers.size > 0) this.listen();
      }, delay).unref();
    };
    client.on('error', lost);
    client.on('end', lost);
    client.on('notification', (message) => {
      if (message.channel === this.workChannel) this.wake();
      else if (message.channel === this.cancelChannel) this.watchers.canceled(new Set([message.payload ?? '']));
    });
    client.connect()
      .then(() => client.query(`LISTEN "${this.workChannel}"; LISTEN "${this.cancelChannel}"`))
      .then(() => {
        if (this.listener !== client) return;
        this.listening = true;
        this.listenerFailures = 0;
        // Whatever was notified while nobody listened: look again now.
        this.wake();
        void this.checkCancellations();
      }, lost);
  }

  private wake(): void {
    this.wakers.wake();
  }

  /** The polling fallback: asks which watched runs were canceled, in one query. */
  private async checkCancellations(): Promise<void> {
    if (this.closing.signal.aborted || this.watchers.size === 0) return;
    const watched = this.watchers.runs();
    try {
      const rows = await this.query<{ task_id: string; run_id: number }>(
        `SELECT r.task_id, r.run_id FROM runs r JOIN unnest($1::text[], $2::int[]) AS w (task_id, run_id) ON r.task_id = w.task_id AND r.run_id = w.run_id
         WHERE r.state = 'exception' AND r.reason_resolved = 'canceled'`,
        [watched.map((run) => run.taskId), watched.map((run) => run.runId)],
      );
      this.watchers.canceled(new Set(rows.map((row) => runKey({ taskId: row.task_id, runId: row.run_id }))));
    } catch {
      // an unreachable server: the next tick or the listener's return tries again
    }
  }

  private async *follow(run: RunRef, key: ArtifactKey, signal?: AbortSignal): AsyncGenerator<Buffer> {
    const stop = signal ? AbortSignal.any([signal, this.closing.signal]) : this.closing.signal;
    let position = 0;
    while (!stop.aborted) {
      let progressed = false;
      for await (const chunk of this.artifactStore.read(key, position)) {
        position += chunk.length;
        progressed = true;
        yield chunk;
        if (stop.aborted) return;
      }
      if (progressed) continue;
      // Check completeness only after a read came up empty: the size is final once the row says `complete`.
      const row = await this.artifactRow(run, key.name, 'was removed while being read: its upload failed');
      if (row.state === 'complete' ? position >= row.size : await this.uploadsAbandoned(run)) return;
      await sleep(FOLLOW_POLL_MS, undefined, { signal: stop }).catch(() => undefined);
    }
  }

  private async uploadsAbandoned(run: RunRef): Promise<boolean> {
    const [row] = await this.query<RunRow>(`SELECT * FROM runs WHERE task_id = $1 AND run_id = $2`, [run.taskId, run.runId]);
    return row !== undefined && uploadsAbandoned(runStatus(row), this.now(), this.claimTimeoutMs);
  }

  private async artifactRow(run: RunRef, name: string, gone = 'does not exist'): Promise<ArtifactRow> {
    const rows = await this.query<ArtifactRow>(`SELECT * FROM artifacts WHERE task_id = $1 AND run_id = $2 AND name = $3`, [run.taskId, run.runId, name]);
    if (rows.length === 0) throw new TaskStateError(`artifact "${name}" of task ${run.taskId} run ${run.runId} ${gone}`);
    return rows[0]!;
  }

  /** The statuses of `tasks`, their runs read on `client`: inside `snapshot`, as of the tasks' rows. */
  private async statuses(client: pg.ClientBase, tasks: TaskRow[]): Promise<TaskStatus[]> {
    if (tasks.length === 0) return [];
    const { rows: runs } = await client.query<RunRow>(`SELECT * FROM runs WHERE task_id = ANY($1::text[]) ORDER BY task_id, run_id`, [tasks.map((task) => task.id)]);
    const byTask = new Map<string, RunStatus[]>();
    for (const row of runs) byTask.set(row.task_id, [...(byTask.get(row.task_id) ?? []), runStatus(row)]);
    return tasks.map((row) => {
      const runs = byTask.get(row.id) ?? [];
      const state = row.state === 'pending' && runs.at(-1)?.state === 'running' ? 'running' : row.state;
      return { taskId: row.id, state, payload: row.payload, created: row.created, deadline: row.deadline, retriesLeft: row.retries_left, runs };
    });
  }

  private assertOpen(): void {
    if (this.closing.signal.aborted) throw new InternalError(`queue ${this.url.display} (schema ${this.schema}) is closed`);
  }
}

/** The query of listTasks for `state`, newest first, at most `max` rows. */
function listingQuery(state: TaskState | undefined, max: number): [string, unknown[]] {
  switch (state) {
    case undefined:
      return [`SELECT * FROM tasks ORDER BY created DESC, seq DESC LIMIT $1`, [max]];
    // The tasks table says 'pending' for a task that waits and for one that runs (migration 2): its run tells them apart.
    case 'pending':
      return [`SELECT * FROM tasks t WHERE t.${TASK_OPEN} AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.task_id = t.id AND r.state = 'running')
               ORDER BY created DESC, seq DESC LIMIT $1`, [max]];
    case 'running':
      return [`SELECT t.* FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.state = 'running' ORDER BY t.created DESC, t.seq DESC LIMIT $1`, [max]];
    default:
      return [`SELECT * FROM tasks WHERE state = $1 ORDER BY created DESC, seq DESC LIMIT $2`, [state, max]];
  }
}

async function checkVersion(client: pg.ClientBase, schema: string): Promise<void> {
  const { rows } = await client.query<{ version: number | null }>(
    `SELECT CASE WHEN to_regclass($1) IS NULL THEN 0 ELSE (SELECT max(version) FROM schema_migrations) END AS version`, [`"${schema}".schema_migrations`],
  ).catch(() => ({ rows: [{ version: 0 }] }));
  const version = rows[0]?.version ?? 0;
  if (version !== MIGRATIONS.length) {
    throw new ConfigError(`queue schema "${schema}" is at version ${version}, this drover needs ${MIGRATIONS.length}: run \`drover migrate\``);
  }
}

/**
 * How far the server's clock is ahead of this machine's, in ms: halfway
 * through the shortest of three round trips. A queue that runs on the
 * server's clock reads it as this machine's clock plus this offset, measured
 * when it opens and every clockCheckMs after (a clock stepped by NTP is
 * followed within that), so every rule (claims, deadlines, sweeps) runs on
 * one clock however far the workers' own clocks are apart.
 */
async function clockOffset(query: (text: string) => Promise<pg.QueryResult<{ now: string }>>): Promise<number> {
  let best = { roundTrip: Infinity, offset: 0 };
  for (let i = 0; i < 3; i++) {
    const sent = Date.now();
    const { rows } = await query(`SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::text AS now`);
    const received = Date.now();
    if (received - sent < best.roundTrip) best = { roundTrip: received - sent, offset: Number(rows[0]!.now) - (sent + received) / 2 };
  }
  return Math.round(best.offset);
}

/** Why the queue could not be opened, said so that the user knows what to fix. */
function openError(error: unknown, url: QueueUrl, schema: string): Error {
  if (error instanceof ConfigError) return error;
  const detail = errorMessage(error) || String((error as { code?: string }).code ?? error);
  if (isConfigProblem(error)) return new ConfigError(`PostgreSQL queue at ${url.display}: ${detail}`, { cause: error });
  if (isTransient(error)) return new QueueUnavailableError(`cannot reach the PostgreSQL queue at ${url.display}: ${detail}`, { cause: error });
  return new ConfigError(`PostgreSQL queue at ${url.display}: cannot prepare schema "${schema}": ${detail}`, { cause: error });
}

async function runRow(client: pg.ClientBase, run: RunRef): Promise<(RunRow & { deadline: number }) | undefined> {
  const { rows } = await client.query<RunRow & { deadline: number }>(
    `SELECT r.*, t.deadline FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.task_id = $1 AND r.run_id = $2`, [run.taskId, run.runId],
  );
  return rows[0];
}
