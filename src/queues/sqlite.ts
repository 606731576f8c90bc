/**
 * The embedded queue: one SQLite file that every worker process on a machine
 * shares, with artifacts as plain files beside it.
 *
 * Layout: `<dir>/queue.db` and `<dir>/artifacts/<shard>/<file>`: one file per
 * artifact, in one of a few shard directories (see artifactFile), and the
 * artifact's row records its file.
 * Each write is one `BEGIN IMMEDIATE` transaction, so two processes never
 * interleave a read-then-write (claiming the same run twice, say); WAL lets
 * readers carry on while one process writes. Time-based rules (expired
 * claims, passed deadlines) are applied lazily, and what a worker is told
 * never depends on whether some sweeper has run yet: every report (reclaim,
 * resolve, upload) is a conditional write that holds only while the claim
 * and the task's deadline have not passed, and a refused report sweeps
 * before it says why. Claims sweep at most once per poll interval (and
 * whenever they find nothing to claim), and never hand out a run whose
 * deadline has passed; `sweep()` and `cancel` sweep at once.
 */
import { createHash } from 'node:crypto';
import { accessSync, constants, createReadStream, existsSync, mkdirSync, ReadStream, rmSync } from 'node:fs';
import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import { takeOver, writeArtifactFile } from './artifact-store.js';
import { CancelWatchers, Wakers } from './wakers.js';
import { artifactInfo, columns, describeRun, iso, lostClaim, runStatus, type ArtifactRow, type RunRow } from './sql-rows.js';
import { ConfigError, errorMessage, InternalError, QueueUnavailableError, TaskStateError } from '../model/errors.js';
import { RETRYABLE_REASONS, type Resolution } from '../model/resolution.js';
import { assertTaskDefinition, runKey, slugid, type Claim, type RunRef, type TaskDefinition, type TaskId, type TaskState } from '../model/task.js';
import { uploadsAbandoned, type ArtifactInfo, type ArtifactMeta, type ClaimWorkOptions, type ListTasksOptions, type Queue, type ReadArtifactOptions, type TaskStatus } from './queue.js';

export const DEFAULT_CLAIM_TIMEOUT_MS = 30_000;
export const DEFAULT_POLL_INTERVAL_MS = 200;
const FOLLOW_POLL_MS = 100;
/**
 * An artifact whose upload ends within DEFAULT_INLINE_WAIT_MS having given at most this much is kept in its
 * row (migration 7): a short task's live log makes no file. Creating, writing and closing one cost more than
 * all else a live log does (bench/ANALYSIS.md, Local tasks), and a file per task fills a disk's inodes.
 */
export const INLINE_MAX_BYTES = 64 * 1024;
/** How long a follower of a live log may wait for its first bytes: about as long as other CI agents' log uploads lag. */
export const DEFAULT_INLINE_WAIT_MS = 1000;
/** How long a statement, or opening the queue, waits for another process's lock. */
const BUSY_TIMEOUT_MS = 10_000;
const MIN_WATCH_INTERVAL_MS = 100;

export interface SqliteQueueOptions {
  readonly dir: string;
  readonly claimTimeoutMs?: number;
  readonly pollIntervalMs?: number;
  /** The clock for claims and deadlines; tests inject one to skip time. */
  readonly now?: () => number;
  /**
   * How long an upload's first bytes are held to see whether the artifact is small enough to keep in
   * its row (INLINE_MAX_BYTES) rather than in a file; DEFAULT_INLINE_WAIT_MS when not given, 0 for a
   * file always. Readers of a streaming artifact see its bytes only once they are in a file.
   */
  readonly inlineWaitMs?: number;
}

/** Schema migrations; `PRAGMA user_version` counts how many were applied. Append, never edit. */
export const MIGRATIONS: readonly string[] = [
  `CREATE TABLE tasks (
     id           TEXT PRIMARY KEY,
     payload      TEXT NOT NULL,
     state        TEXT NOT NULL CHECK (state IN ('pending', 'running', 'completed', 'failed', 'exception')),
     created      INTEGER NOT NULL,
     deadline     INTEGER NOT NULL,
     retries_left INTEGER NOT NULL CHECK (retries_left >= 0)
   );
   CREATE INDEX tasks_by_created ON tasks (created);
   CREATE INDEX tasks_by_state ON tasks (state, created);
   CREATE INDEX tasks_by_state_deadline ON tasks (state, deadline);
   CREATE TABLE runs (
     task_id         TEXT NOT NULL REFERENCES tasks (id),
     run_id          INTEGER NOT NULL,
     state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'completed', 'failed', 'exception')),
     reason_created  TEXT NOT NULL CHECK (reason_created IN ('scheduled', 'retry')),
     reason_resolved TEXT,
     message         TEXT,
     worker_id       TEXT,
     taken_until     INTEGER,
     scheduled       INTEGER NOT NULL,
     started         INTEGER,
     resolved        INTEGER,
     PRIMARY KEY (task_id, run_id)
   );
   CREATE INDEX runs_pending ON runs (scheduled) WHERE state = 'pending';
   CREATE INDEX runs_running ON runs (taken_until) WHERE state = 'running';
   CREATE TABLE artifacts (
     task_id      TEXT NOT NULL,
     run_id       INTEGER NOT NULL,
     name         TEXT NOT NULL,
     content_type TEXT NOT NULL,
     expires      INTEGER,
     state        TEXT NOT NULL CHECK (state IN ('streaming', 'complete')),
     size         INTEGER NOT NULL DEFAULT 0,
     created      INTEGER NOT NULL,
     PRIMARY KEY (task_id, run_id, name),
     FOREIGN KEY (task_id, run_id) REFERENCES runs (task_id, run_id)
   );`,
  // A claim writes only its run: a task that waits or runs is 'pending' in this table, and whether it
  // runs is its current run's state. Three fewer pages per claim, two per resolution.
  `UPDATE tasks SET state = 'pending' WHERE state = 'running';
   DROP INDEX tasks_by_state_deadline;
   CREATE INDEX tasks_open_by_deadline ON tasks (deadline) WHERE state = 'pending';`,
  // A completed task writes no state index: its (state, created) entry moved across the index on every
  // resolution, two pages of the nine a claim+resolve wrote. Failed and exception tasks (the ones users look
  // for) keep an index, entered once; listing pending or completed tasks walks tasks_by_created.
  `DROP INDEX tasks_by_state;
   CREATE INDEX tasks_unsuccessful ON tasks (state, created) WHERE state IN ('failed', 'exception');`,
  // Where each artifact's file is, under <dir>/artifacts (artifactFile). Rows from before have none: their
  // files are where the drover of their time put them (legacyArtifactFiles).
  `ALTER TABLE artifacts ADD COLUMN file TEXT;`,
  // A completion writes only its run: the task's row keeps saying 'pending' (and stays in
  // tasks_open_by_deadline) until the deadline sweep writes 'completed', in batches, after its deadline;
  // until then the task's state is its last run's (taskState). Two fewer pages per resolution. No rows
  // change; the version stops older drovers from opening the queue. One that had it open before the
  // migration would take such a task for an open one, and its sweep or cancel would write 'exception' over
  // it: the trigger ignores a write of any other final state over a task whose last run completed.
  `CREATE TRIGGER tasks_keep_completed BEFORE UPDATE OF state ON tasks
   WHEN OLD.state = 'pending' AND NEW.state NOT IN ('pending', 'completed')
     AND (SELECT state FROM runs WHERE task_id = OLD.id ORDER BY run_id DESC LIMIT 1) = 'completed'
   BEGIN SELECT RAISE(IGNORE); END;`,
  // One index of open runs instead of one of pending and one of running runs: running entries first (by
  // claim expiry), then pending ones (by schedule). A claim takes the first pending entry and puts its run
  // at the end of the running ones, which is the same place: one index page where two were written.
  `DROP INDEX runs_pending;
   DROP INDEX runs_running;
   UPDATE runs SET taken_until = NULL WHERE state = 'pending' AND taken_until IS NOT NULL;
   CREATE INDEX runs_open ON runs (state DESC, taken_until, scheduled) WHERE state IN ('pending', 'running');`,
  // A small artifact's bytes, kept in its row instead of a file (INLINE_MAX_BYTES); NULL for one in a file.
  `ALTER TABLE artifacts ADD COLUMN content BLOB;`,
];

/** Reasons only the queue gives (sweep, cancel): never a worker's own report. */
const QUEUE_REASONS: ReadonlySet<string> = new Set(['canceled', 'claim-expired', 'deadline-exceeded']);
/**
 * An open run. Also what lets a query on runs use the index of open runs (migration 6): SQLite uses a
 * partial index only for a query whose WHERE contains the index's own condition.
 */
const OPEN = `state IN ('pending', 'running')`;
/**
 * A task whose row is not final: open (pending or running, migration 2), or completed and not yet swept
 * (migration 5). Its state is its last run's.
 */
const TASK_OPEN = `state = 'pending'`;
/** The state of task `t`'s last run: for a row that says 'pending', the task's own state. */
const LAST_RUN_STATE = `(SELECT state FROM runs WHERE task_id = t.id ORDER BY run_id DESC LIMIT 1)`;
/** Most task rows one sweep makes final, so that a sweep after a burst of completions holds the lock briefly. */
export const SWEEP_BATCH = 1000;
/** A report's condition: the worker holds the run's claim, and neither the claim nor the task's deadline has passed. */
const HELD = `state = 'running' AND worker_id = @workerId AND taken_until > @now
              AND (SELECT deadline FROM tasks WHERE id = @taskId) > @now`;
/** Tasks whose row is not final and whose deadline passed, with their last run (overdueTasks). */
const OVERDUE = `SELECT t.id AS taskId, t.deadline, r.run_id AS runId, r.state
                 FROM tasks t JOIN runs r ON r.task_id = t.id AND r.run_id = (SELECT max(run_id) FROM runs WHERE task_id = t.id)
                 WHERE t.${TASK_OPEN} AND t.deadline <= @now`;
const SQL = {
  insertTask: `INSERT INTO tasks (id, payload, state, created, deadline, retries_left) VALUES (?, ?, 'pending', ?, ?, ?)`,
  insertRun: `INSERT INTO runs (task_id, run_id, state, reason_created, scheduled) VALUES (?, ?, 'pending', ?, ?)`,
  setTaskState: `UPDATE tasks SET state = ? WHERE id = ?`,
  useRetry: `UPDATE tasks SET retries_left = retries_left - 1, state = 'pending' WHERE id = ? AND retries_left > 0`,
  // A cheap read that lets idle pollers skip taking the write lock.
  anyWork: `SELECT EXISTS (SELECT 1 FROM runs WHERE state = 'pending' AND ${OPEN})
              OR EXISTS (SELECT 1 FROM runs WHERE state = 'running' AND ${OPEN} AND taken_until <= @now)
              OR EXISTS (SELECT 1 FROM tasks WHERE ${TASK_OPEN} AND deadline <= @now) AS yes`,
  startRun: `UPDATE runs SET state = 'running', worker_id = ?, started = ?, taken_until = ? WHERE task_id = ? AND run_id = ?`,
  holds: `SELECT 1 FROM runs WHERE task_id = @taskId AND run_id = @runId AND ${HELD}`,
  extendClaim: `UPDATE runs SET taken_until = @takenUntil WHERE task_id = @taskId AND run_id = @runId AND ${HELD}`,
  resolveHeld: `UPDATE runs SET state = @state, reason_resolved = @reason, message = @message, resolved = @now
                WHERE task_id = @taskId AND run_id = @runId AND ${HELD}`,
  resolveOpen: `UPDATE runs SET state = @state, reason_resolved = @reason, message = @message, resolved = @now
                WHERE task_id = @taskId AND run_id = @runId AND ${OPEN}`,
  // Tasks whose row is not final and whose deadline passed, with their last run: an open one is overdue,
  // a completed one is only now written down.
  overdueTasks: `${OVERDUE} LIMIT ${SWEEP_BATCH}`,
  // One of them, whether or not a batch would hold it: the task a report or a cancel is about.
  overdueTask: `${OVERDUE} AND t.id = @taskId`,
  // A claim that expired after its task's deadline is left to the deadline sweep: the deadline wins.
  expiredClaims: `SELECT task_id AS taskId, run_id AS runId, worker_id, taken_until FROM runs
                  WHERE state = 'running' AND ${OPEN} AND taken_until <= @now AND (SELECT deadline FROM tasks WHERE id = runs.task_id) > @now`,
  task: `SELECT * FROM tasks WHERE id = ?`,
  tasks: `SELECT * FROM tasks ORDER BY created DESC, rowid DESC LIMIT ?`,
  tasksCompleted: `SELECT * FROM tasks t WHERE t.state = 'completed' OR (t.${TASK_OPEN} AND ${LAST_RUN_STATE} = 'completed')
                   ORDER BY created DESC, rowid DESC LIMIT ?`,
  // The literal IN lets SQLite use the partial index tasks_unsuccessful for a state bound as a parameter.
  tasksUnsuccessful: `SELECT * FROM tasks WHERE state = ? AND state IN ('failed', 'exception') ORDER BY created DESC, rowid DESC LIMIT ?`,
  tasksPending: `SELECT * FROM tasks t WHERE t.${TASK_OPEN} AND ${LAST_RUN_STATE} = 'pending' ORDER BY created DESC, rowid DESC LIMIT ?`,
  tasksRunning: `SELECT t.* FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.state = 'running' AND r.${OPEN} ORDER BY t.created DESC, t.rowid DESC LIMIT ?`,
  run: `SELECT r.*, t.deadline FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.task_id = ? AND r.run_id = ?`,
  runs: `SELECT * FROM runs WHERE task_id = ? ORDER BY run_id`,
  currentRun: `SELECT * FROM runs WHERE task_id = ? ORDER BY run_id DESC LIMIT 1`,
  // One query for every watched run: the watch list goes in as a JSON array of [taskId, runId].
  canceledAmong: `SELECT r.task_id, r.run_id FROM json_each(?) w JOIN runs r ON r.task_id = w.value ->> 0 AND r.run_id = w.value ->> 1
                  WHERE r.state = 'exception' AND r.reason_resolved = 'canceled'`,
  artifact: `SELECT * FROM artifacts WHERE task_id = ? AND run_id = ? AND name = ?`,
  // Not the content: a listing needs none.
  artifacts: `SELECT task_id, run_id, name, content_type, expires, state, size, created FROM artifacts WHERE task_id = ? AND run_id = ? ORDER BY created, name`,
  // The same name, or one that would need the other to be a directory (`a` and `a/b`).
  artifactClash: `SELECT name FROM artifacts WHERE task_id = @taskId AND run_id = @runId AND (name = @name
                    OR substr(name, 1, length(@name) + 1) = @name || '/' OR substr(@name, 1, length(name) + 1) = name || '/')`,
  insertArtifact: `INSERT INTO artifacts (task_id, run_id, name, content_type, expires, state, size, created, file) VALUES (?, ?, ?, ?, ?, 'streaming', 0, ?, ?)`,
  completeArtifact: `UPDATE artifacts SET state = 'complete', size = ? WHERE task_id = ? AND run_id = ? AND name = ?`,
  completeInline: `UPDATE artifacts SET state = 'complete', size = ?, content = ? WHERE task_id = ? AND run_id = ? AND name = ?`,
  deleteArtifact: `DELETE FROM artifacts WHERE task_id = ? AND run_id = ? AND name = ?`,
} as const;

/**
 * The oldest `count` runs waiting to be claimed, in scheduling order (rowid breaks ties between runs
 * scheduled in the same millisecond). The count is written into the SQL, not bound: SQLite prepares a
 * statement with a bound LIMIT again on every run (measured: 37 against 7 µs for this query alone).
 */
function pendingRunsSql(count: number): string {
  return `SELECT r.task_id, r.run_id, t.payload, t.deadline, t.retries_left FROM runs r JOIN tasks t ON t.id = r.task_id
          WHERE r.state = 'pending' AND r.${OPEN} AND r.taken_until IS NULL AND t.deadline > ? ORDER BY r.scheduled, r.rowid LIMIT ${count}`;
}
/** Claim statements kept, one per count asked for: a worker asks for at most its capacity. */
const MAX_CLAIM_STATEMENTS = 64;

/** An artifact's whole row: its bytes too when it is small (migration 7). */
interface StoredArtifactRow extends ArtifactRow { file: string | null; content: Buffer | null }
interface TaskRow { id: string; payload: string; state: TaskState; created: number; deadline: number; retries_left: number }
/** A task of OVERDUE, with its last run. */
interface OverdueRow { taskId: string; runId: number; deadline: number; state: TaskState }

export class SqliteQueue implements Queue {
  static open(options: SqliteQueueOptions): SqliteQueue {
    const dir = resolvePath(options.dir);
    try {
      mkdirSync(join(dir, 'artifacts'), { recursive: true });
    } catch (error) {
      throw new ConfigError(`queue directory "${dir}" cannot be created: ${errorMessage(error)}`, { cause: error });
    }
    try {
      accessSync(dir, constants.W_OK);
    } catch (error) {
      throw new ConfigError(`queue directory "${dir}" is not writable: ${errorMessage(error)}`, { cause: error });
    }
    for (const [name, value] of [['claimTimeoutMs', options.claimTimeoutMs], ['pollIntervalMs', options.pollIntervalMs]] as const) {
      if (value !== undefined && !(Number.isFinite(value) && value > 0)) {
        throw new ConfigError(`queue option ${name} must be a positive number of milliseconds, not ${String(value)}`);
      }
    }
    if (options.inlineWaitMs !== undefined && !(Number.isFinite(options.inlineWaitMs) && options.inlineWaitMs >= 0)) {
      throw new ConfigError(`queue option inlineWaitMs must be a number of milliseconds >= 0, not ${String(options.inlineWaitMs)}`);
    }
    const file = join(dir, 'queue.db');
    let db: Database.Database | undefined;
    try {
      db = new Database(file);
      db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
      useWal(db);
      db.pragma('synchronous = NORMAL');
      db.pragma('foreign_keys = ON');
      migrate(db, file);
      return new SqliteQueue(db, dir, options);
    } catch (error) {
      db?.close();
      if (error instanceof ConfigError) throw error;
      throw new ConfigError(`queue database "${file}" cannot be opened: ${errorMessage(error)}`, { cause: error });
    }
  }

  readonly dir: string;
  private readonly db: Database.Database;
  private readonly s: { readonly [K in keyof typeof SQL]: Database.Statement };
  /** pendingRunsSql's statements by count. */
  private readonly claimStatements = new Map<number, Database.Statement>();
  private readonly claimTimeoutMs: number;
  private readonly pollIntervalMs: number;
  private readonly inlineWaitMs: number;
  /** The queue's clock (Queue.now). */
  readonly now: () => number;
  /** Long polls waiting on this instance; `submit` and `close` wake them. */
  private readonly wakers = new Wakers();
  /** One transaction wrapper for every write: `fn` runs inside it. */
  private readonly transaction: Database.Transaction<(fn: () => unknown) => unknown>;
  /** Queue-clock time before which claims need not sweep (one sweep per poll interval). */
  private nextSweep = -Infinity;
  /** Whether the last sweep's batch of passed deadlines was full (SWEEP_BATCH): more may be waiting. */
  private overdueLeft = false;
  /** Whether this instance's last claim found nothing: then the next looks (a read) before it takes the write lock. */
  private idle = true;
  private readonly watchers: CancelWatchers;
  /** Aborted by `close`, to end followers' waits at once. */
  private readonly closing = new AbortController();
  private closed = false;

  private constructor(db: Database.Database, dir: string, options: SqliteQueueOptions) {
    this.db = db;
    this.dir = dir;
    this.claimTimeoutMs = options.claimTimeoutMs ?? DEFAULT_CLAIM_TIMEOUT_MS;
    this.pollIntervalMs = options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS;
    this.inlineWaitMs = options.inlineWaitMs ?? DEFAULT_INLINE_WAIT_MS;
    this.watchers = new CancelWatchers(Math.max(MIN_WATCH_INTERVAL_MS, this.pollIntervalMs), () => this.checkCancellations());
    this.now = options.now ?? Date.now;
    this.s = Object.fromEntries(Object.entries(SQL).map(([key, sql]) => [key, db.prepare(sql)])) as SqliteQueue['s'];
    this.transaction = db.transaction((fn: () => unknown) => fn());
  }

  async submit(task: TaskDefinition): Promise<TaskId> {
    return (await this.submitMany([task]))[0]!;
  }

  /**
   * Submits the tasks in one transaction, in order: all of them or, if one is invalid, none. A batch
   * of jobs submits this way; one transaction per task cost 0.1-0.2 ms each.
   */
  async submitMany(tasks: readonly TaskDefinition[]): Promise<TaskId[]> {
    tasks.forEach((task, i) => assertTaskDefinition(task, tasks.length === 1 ? 'task' : `task ${i + 1} of ${tasks.length}:`));
    const taskIds = tasks.map(() => slugid());
    this.write(() => {
      const now = this.now();
      tasks.forEach((task, i) => {
        this.s.insertTask.run(taskIds[i], JSON.stringify(task.payload), now, task.deadline, task.retries);
        this.s.insertRun.run(taskIds[i], 0, 'scheduled', now);
      });
    });
    if (tasks.length > 0) this.wakers.wake();
    return taskIds;
  }

  async claimWork({ workerId, count, waitMs, signal }: ClaimWorkOptions): Promise<Claim[]> {
    // Waiting is measured in real time: the injected clock rules claims and deadlines, not how long a caller blocks.
    this.assertOpen();
    const giveUpAt = performance.now() + waitMs;
    for (;;) {
      const claims = this.claimNow(workerId, count);
      const left = giveUpAt - performance.now();
      if (claims.length > 0 || left <= 0 || signal?.aborted) return claims;
      await this.wakers.pause(Math.min(left, this.pollIntervalMs), signal);
      if (this.closed || signal?.aborted) return [];
    }
  }

  async reclaim(run: RunRef, workerId: string): Promise<{ takenUntil: number }> {
    const outcome = this.write(() => {
      const now = this.now();
      const takenUntil = now + this.claimTimeoutMs;
      const { changes } = this.s.extendClaim.run({ takenUntil, taskId: run.taskId, runId: run.runId, workerId, now });
      return changes === 1 ? { takenUntil } : this.refusal(run, workerId, now);
    });
    if (outcome instanceof Error) throw outcome;
    return outcome;
  }

  async resolve(run: RunRef, workerId: string, resolution: Resolution): Promise<void> {
    const refusal = this.write(() => {
      const now = this.now();
      const { changes } = this.s.resolveHeld.run({ taskId: run.taskId, runId: run.runId, ...columns(resolution), workerId, now });
      if (changes === 0) return this.sameReport(run, workerId, resolution) ? undefined : this.refusal(run, workerId, now);
      this.afterResolve(run, resolution, now);
      return undefined;
    });
    if (refusal) throw refusal;
  }

  async cancel(taskId: TaskId): Promise<void> {
    const refusal = this.write(() => {
      const now = this.sweepNow(taskId);
      const task = this.s.task.get(taskId) as TaskRow | undefined;
      if (!task) return new TaskStateError(`cannot cancel task ${taskId}: there is no such task`);
      const current = this.s.currentRun.get(taskId) as RunRow;
      const state = taskState(task, current);
      if (state !== 'pending' && state !== 'running') {
        return new TaskStateError(`cannot cancel task ${taskId}: it is already resolved ${describeRun(runStatus(current))}`);
      }
      this.end({ taskId, runId: current.run_id }, { state: 'exception', reason: 'canceled', message: 'canceled by user' }, now);
      return undefined;
    });
    if (refusal) throw refusal;
    // Watchers on this instance need not wait for the next tick.
    if (this.watchers.size > 0) queueMicrotask(() => this.checkCancellations());
  }

  watchCancellation(run: RunRef, onCanceled: () => void): () => void {
    this.assertOpen();
    return this.watchers.watch(run, onCanceled);
  }

  uploadArtifact(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    return takeOver(source, () => this.upload(run, workerId, meta, source));
  }

  private async upload(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    const problem = artifactNameProblem(meta.name);
    if (problem) throw new TaskStateError(`artifact name ${JSON.stringify(meta.name)} ${problem}`);
    const file = artifactFile(run, meta.name);
    const path = join(this.dir, 'artifacts', file);
    const key = [run.taskId, run.runId, meta.name] as const;
    const refusal = this.write(() => {
      const now = this.now();
      if (this.s.holds.get({ taskId: run.taskId, runId: run.runId, workerId, now }) === undefined) return this.refusal(run, workerId, now);
      const clash = this.s.artifactClash.get({ taskId: run.taskId, runId: run.runId, name: meta.name }) as { name: string } | undefined;
      if (clash) {
        return new TaskStateError(clash.name === meta.name
          ? `run ${runKey(run)} already has an artifact named "${meta.name}"`
          : `artifact "${meta.name}" clashes with "${clash.name}" of run ${runKey(run)}: one would have to be a directory of the other`);
      }
      this.s.insertArtifact.run(...key, meta.contentType, meta.expires ?? null, now, file);
      return undefined;
    });
    if (refusal) throw refusal;
    try {
      // A local file is left whole to writeArtifactFile, which may copy it with `cat`; other sources are
      // held a moment first, and one that ends small stays in the row.
      const held = source instanceof ReadStream || this.inlineWaitMs === 0 ? undefined : await hold(source, INLINE_MAX_BYTES, this.inlineWaitMs);
      if (held?.ended) {
        this.write(() => this.s.completeInline.run(held.bytes.length, held.bytes, ...key));
        return artifactInfo(this.artifactRow(run, meta.name));
      }
      // The row comes first, so the artifact is there as soon as this is called; its file follows, made off
      // the event loop and outside the write lock (a file's creation is a metadata transaction, costly on
      // some filesystems). Until it exists, a reader of the streaming row reads nothing yet.
      // Our own handle, opened now: a stream left to open the file itself could re-create it after a failed
      // upload removed it.
      const size = await writeArtifactFile(path, await createFile(path), source, held?.bytes);
      // Inside the try: a row left `streaming` when this write fails would hold its followers for ever.
      this.write(() => this.s.completeArtifact.run(size, ...key));
    } catch (error) {
      // A half-written artifact would pass for a whole one; drop it so the caller can upload again.
      try {
        this.write(() => this.s.deleteArtifact.run(...key));
        rmSync(path, { force: true });
      } catch {
        // the source's error says more than a failed clean-up would
      }
      throw error;
    }
    return artifactInfo(this.artifactRow(run, meta.name));
  }

  async readArtifact(run: RunRef, name: string, options: ReadArtifactOptions = {}): Promise<Readable> {
    const row = this.artifactRow(run, name);
    if (row.content !== null) return Readable.from([row.content], { objectMode: false });
    const path = this.fileOf(row);
    if (options.follow) return Readable.from(this.follow(run, name, path, options.signal), { objectMode: false });
    // A streaming artifact's file is made just after its row (uploadArtifact): not there yet, nothing is written yet.
    if (row.state === 'streaming' && !existsSync(path)) return Readable.from([]);
    return createReadStream(path);
  }

  async listArtifacts(run: RunRef): Promise<ArtifactInfo[]> {
    const rows = this.read(() => this.s.artifacts.all(run.taskId, run.runId) as ArtifactRow[]);
    if (rows.length === 0 && this.read(() => this.s.run.get(run.taskId, run.runId)) === undefined) {
      throw new TaskStateError(`task ${run.taskId} has no run ${run.runId}`);
    }
    return rows.map(artifactInfo);
  }

  async task(taskId: TaskId): Promise<TaskStatus> {
    const status = this.snapshot(() => {
      const row = this.s.task.get(taskId) as TaskRow | undefined;
      return row && this.status(row);
    });
    if (!status) throw new TaskStateError(`there is no task ${taskId}`);
    return status;
  }

  async listTasks({ state, limit = 100 }: ListTasksOptions = {}): Promise<TaskStatus[]> {
    const max = Math.max(0, Math.floor(limit));
    return this.snapshot(() => this.listed(state, max).map((row) => this.status(row)));
  }

  /** The rows of listTasks for `state`, newest first, at most `max`. */
  private listed(state: TaskState | undefined, max: number): TaskRow[] {
    switch (state) {
      case undefined: return this.s.tasks.all(max) as TaskRow[];
      case 'pending': return this.s.tasksPending.all(max) as TaskRow[];
      case 'running': return this.s.tasksRunning.all(max) as TaskRow[];
      case 'completed': return this.s.tasksCompleted.all(max) as TaskRow[];
      case 'failed': case 'exception': return this.s.tasksUnsuccessful.all(state, max) as TaskRow[];
    }
  }

  async sweep(): Promise<number> {
    // Batch after batch, each its own transaction, until passed deadlines are all taken (sweepAt).
    let ended = 0;
    do ended += this.write(() => this.sweepAt(this.now()));
    while (this.overdueLeft);
    return ended;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing.abort();
    this.wakers.wake();
    this.watchers.clear();
    this.db.close();
  }

  /**
   * Claims up to `count` pending runs, oldest first, in one transaction. It
   * sweeps first once per poll interval, and again when it finds nothing
   * (an expired claim may be waiting for its retry run).
   */
  private claimNow(workerId: string, count: number): Claim[] {
    if (count < 1) return [];
    // Idle pollers look before they take the write lock, so they do not queue behind busy writers.
    if (this.idle && !this.read(() => (this.s.anyWork.get({ now: this.now() }) as { yes: number }).yes)) return [];
    const claims = this.write(() => {
      const now = this.now();
      const swept = now >= this.nextSweep || now + this.pollIntervalMs < this.nextSweep;
      if (swept) this.sweepAt(now);
      const takenUntil = now + this.claimTimeoutMs;
      type PendingRow = { task_id: string; run_id: number; payload: string; deadline: number; retries_left: number };
      const pendingRuns = this.pendingRuns(Math.floor(count));
      let pending = pendingRuns.all(now) as PendingRow[];
      if (pending.length === 0 && !swept && this.sweepAt(now) > 0) pending = pendingRuns.all(now) as PendingRow[];
      return pending.map((row): Claim => {
        this.s.startRun.run(workerId, now, takenUntil, row.task_id, row.run_id);
        return {
          taskId: row.task_id, runId: row.run_id, workerId, payload: JSON.parse(row.payload) as Claim['payload'],
          deadline: row.deadline, takenUntil, retriesLeft: row.retries_left,
        };
      });
    });
    this.idle = claims.length === 0;
    return claims;
  }

  private pendingRuns(count: number): Database.Statement {
    let statement = this.claimStatements.get(count);
    if (statement === undefined) {
      if (this.claimStatements.size >= MAX_CLAIM_STATEMENTS) this.claimStatements.clear();
      statement = this.db.prepare(pendingRunsSql(count));
      this.claimStatements.set(count, statement);
    }
    return statement;
  }

  private sweepNow(taskId: TaskId): number {
    const now = this.now();
    this.sweepAt(now, taskId);
    return now;
  }

  /**
   * Resolves runs the clock has overtaken. Deadlines go first: a run past its
   * task's deadline ends `deadline-exceeded`, not `claim-expired` plus a retry
   * that could never run. Passed deadlines are taken SWEEP_BATCH at a time,
   * and `taskId`'s first, whatever the batch holds: a report or a cancel on
   * it is answered as if every sweep had run. Call inside a write transaction.
   */
  private sweepAt(now: number, taskId?: TaskId): number {
    this.nextSweep = now + this.pollIntervalMs;
    // The task's own first: the batch, read after it, then no longer holds it.
    let ended = taskId === undefined ? 0 : this.endOverdue(this.s.overdueTask.all({ now, taskId }) as OverdueRow[], now);
    const batch = this.s.overdueTasks.all({ now }) as OverdueRow[];
    this.overdueLeft = batch.length === SWEEP_BATCH;
    ended += this.endOverdue(batch, now);
    const expired = this.s.expiredClaims.all({ now }) as { taskId: string; runId: number; worker_id: string; taken_until: number }[];
    for (const run of expired) {
      const message = `claim expired at ${iso(run.taken_until)}: worker ${run.worker_id} did not reclaim the run in time`;
      this.end(run, { state: 'exception', reason: 'claim-expired', message }, now);
    }
    return ended + expired.length;
  }

  /** Ends the open tasks among `overdue` `deadline-exceeded` and writes the completed ones' rows; returns how many runs it ended. */
  private endOverdue(overdue: OverdueRow[], now: number): number {
    let ended = 0;
    for (const run of overdue) {
      if (run.state === 'pending' || run.state === 'running') {
        this.end(run, { state: 'exception', reason: 'deadline-exceeded', message: `task deadline passed at ${iso(run.deadline)}` }, now);
        ended++;
      } else {
        this.s.setTaskState.run(run.state, run.taskId);
      }
    }
    return ended;
  }

  /** Resolves a pending or running run that no worker is reporting on: swept or canceled. */
  private end(run: RunRef, resolution: Resolution, now: number): void {
    this.s.resolveOpen.run({ taskId: run.taskId, runId: run.runId, ...columns(resolution), now });
    this.afterResolve(run, resolution, now);
  }

  /**
   * A resolved run's task follows it, unless the exception earns a retry: then run N+1 waits. A
   * completed task's row is left for the deadline sweep (migration 5): its state is its last run's.
   */
  private afterResolve(run: RunRef, resolution: Resolution, now: number): void {
    const retry = resolution.state === 'exception' && RETRYABLE_REASONS.has(resolution.reason) && this.s.useRetry.run(run.taskId).changes === 1;
    if (retry) this.s.insertRun.run(run.taskId, run.runId + 1, 'retry', now);
    else if (resolution.state !== 'completed') this.s.setTaskState.run(resolution.state, run.taskId);
  }

  /**
   * Whether `workerId` already resolved `run` just so: a report retried after
   * its answer was lost is acknowledged, not refused (the conformance suite
   * asks every queue for this). Runs the queue itself resolved (swept,
   * canceled) carry reasons no worker reports, so they never match.
   */
  private sameReport(run: RunRef, workerId: string, resolution: Resolution): boolean {
    const row = this.s.run.get(run.taskId, run.runId) as RunRow | undefined;
    const { state, reason, message } = columns(resolution);
    return row !== undefined && row.worker_id === workerId && row.state === state && row.reason_resolved === reason && row.message === message
      && !QUEUE_REASONS.has(reason);
  }

  /**
   * Why a report on `run` was refused, as an error to throw once the
   * transaction has committed. It sweeps first, so a claim or deadline that
   * passed unswept is resolved now and named as the reason.
   */
  private refusal(run: RunRef, workerId: string, now: number): Error {
    this.sweepAt(now, run.taskId);
    return this.lostClaim(run, workerId);
  }

  /** Why `workerId` does not hold `run`, as an error to throw once the transaction has committed. */
  private lostClaim(run: RunRef, workerId: string): Error {
    const row = this.s.run.get(run.taskId, run.runId) as (RunRow & { deadline: number }) | undefined;
    return lostClaim(row && runStatus(row), row?.deadline, run, workerId);
  }

  private checkCancellations(): void {
    if (this.closed || this.watchers.size === 0) return;
    let canceled: Set<string>;
    try {
      const watched = this.watchers.runs().map((run) => [run.taskId, run.runId]);
      const rows = this.s.canceledAmong.all(JSON.stringify(watched)) as { task_id: string; run_id: number }[];
      canceled = new Set(rows.map((row) => runKey({ taskId: row.task_id, runId: row.run_id })));
    } catch {
      return; // a busy or failing database: try again on the next tick
    }
    this.watchers.canceled(canceled);
  }

  private async *follow(run: RunRef, name: string, path: string, signal?: AbortSignal): AsyncGenerator<Buffer> {
    const stop = signal ? AbortSignal.any([signal, this.closing.signal]) : this.closing.signal;
    let file: FileHandle | undefined;
    // A streaming artifact's file is made just after its row (uploadArtifact): wait for it while the row says streaming.
    while (file === undefined) {
      try {
        file = await open(path, 'r');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
        if (signal?.aborted) return;
        const row = this.artifactRow(run, name, 'was removed while being read: its upload failed');
        if (row.content !== null) {
          yield row.content;
          return;
        }
        // A row says complete only once its file is there: then the upload finished after that open, so open again.
        if (row.state !== 'streaming') file = await open(path, 'r');
        else if (this.uploadsAbandoned(run)) return;
        else await sleep(FOLLOW_POLL_MS, undefined, { signal: stop }).catch(() => undefined);
      }
    }
    try {
      let position = 0;
      while (!signal?.aborted) {
        const chunk = Buffer.allocUnsafe(64 * 1024);
        const { bytesRead } = await file.read(chunk, 0, chunk.length, position);
        if (bytesRead > 0) {
          position += bytesRead;
          yield chunk.subarray(0, bytesRead);
          continue;
        }
        // Check completeness only after a read came up empty: the size is final once the row says `complete`.
        const row = this.artifactRow(run, name, 'was removed while being read: its upload failed');
        if (row.state === 'complete' ? position >= row.size : this.uploadsAbandoned(run)) return;
        await sleep(FOLLOW_POLL_MS, undefined, { signal: stop }).catch(() => undefined);
      }
    } finally {
      await file.close();
    }
  }

  private uploadsAbandoned(run: RunRef): boolean {
    const row = this.read(() => this.s.run.get(run.taskId, run.runId) as RunRow | undefined);
    return row !== undefined && uploadsAbandoned(runStatus(row), this.now(), this.claimTimeoutMs);
  }

  private artifactRow(run: RunRef, name: string, gone = 'does not exist'): StoredArtifactRow {
    const row = this.read(() => this.s.artifact.get(run.taskId, run.runId, name) as StoredArtifactRow | undefined);
    if (!row) throw new TaskStateError(`artifact "${name}" of task ${run.taskId} run ${run.runId} ${gone}`);
    return row;
  }

  /** Where an artifact uploaded now is stored: `<dir>/artifacts/` and artifactFile(). */
  artifactPath(run: RunRef, name: string): string {
    return join(this.dir, 'artifacts', artifactFile(run, name));
  }

  /** The file of an artifact's row: the one it records, or for a row from before migration 4, the one its drover used. */
  private fileOf(row: StoredArtifactRow): string {
    if (row.file) return join(this.dir, 'artifacts', row.file);
    const candidates = legacyArtifactFiles({ taskId: row.task_id, runId: row.run_id }, row.name).map((file) => join(this.dir, 'artifacts', file));
    return candidates.find((path) => existsSync(path)) ?? candidates[0]!;
  }

  /** A task's status from its row; call inside `snapshot`, so that its runs are read as of the row. */
  private status(row: TaskRow): TaskStatus {
    const runs = this.s.runs.all(row.id) as RunRow[];
    const state = taskState(row, runs.at(-1));
    return {
      taskId: row.id, state, payload: JSON.parse(row.payload) as TaskStatus['payload'],
      created: row.created, deadline: row.deadline, retriesLeft: row.retries_left, runs: runs.map(runStatus),
    };
  }

  private assertOpen(): void {
    if (this.closed) throw new InternalError(`queue "${this.dir}" is closed`);
  }

  /** Runs `fn` against the database, turning storage failures into QueueUnavailableError (callers retry those). */
  private read<T>(fn: () => T): T {
    this.assertOpen();
    try {
      return fn();
    } catch (error) {
      if (error instanceof Database.SqliteError) {
        throw new QueueUnavailableError(`queue database "${join(this.dir, 'queue.db')}": ${error.message}`, { cause: error });
      }
      throw error;
    }
  }

  private write<T>(fn: () => T): T {
    return this.read(() => this.transaction.immediate(fn) as T);
  }

  /** Runs `fn`'s reads in one read transaction: all of them see the queue as of one moment (WAL). */
  private snapshot<T>(fn: () => T): T {
    return this.read(() => this.transaction.deferred(fn) as T);
  }
}

/**
 * A task's state: its row's, once final; for a row that says 'pending', its last run's (running, or
 * completed and not yet swept: migrations 2 and 5).
 */
function taskState(row: TaskRow, last: RunRow | undefined): TaskState {
  return row.state === 'pending' && (last?.state === 'running' || last?.state === 'completed') ? last.state : row.state;
}

/**
 * Switches the database to WAL, waiting for other processes as busy_timeout would. SQLite's busy
 * handler does not cover this switch: the pragma reads the header under a read lock, then takes the
 * write lock, and a reader that wants to become a writer gets SQLITE_BUSY at once (waiting could
 * deadlock). Two processes that open a new queue at the same moment, a worker and a submit, meet
 * exactly there; so the pragma is tried again, with its read lock let go in between.
 */
function useWal(db: Database.Database): void {
  const giveUpAt = performance.now() + BUSY_TIMEOUT_MS;
  for (let pauseMs = 1; ; pauseMs = Math.min(2 * pauseMs, 50)) {
    try {
      db.pragma('journal_mode = WAL');
      return;
    } catch (error) {
      const busy = error instanceof Database.SqliteError && error.code.startsWith('SQLITE_BUSY');
      if (!busy || performance.now() >= giveUpAt) throw error;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, pauseMs);
    }
  }
}

function migrate(db: Database.Database, file: string): void {
  db.transaction(() => {
    const version = db.pragma('user_version', { simple: true }) as number;
    if (version > MIGRATIONS.length) {
      throw new ConfigError(`queue database "${file}" has schema version ${version}, newer than this drover knows (${MIGRATIONS.length}); upgrade drover`);
    }
    for (const sql of MIGRATIONS.slice(version)) db.exec(sql);
    if (version < MIGRATIONS.length) db.pragma(`user_version = ${MIGRATIONS.length}`);
  }).immediate();
}

/** What is wrong with an artifact name, or undefined when it is fine. */
export function artifactNameProblem(name: string): string | undefined {
  if (typeof name !== 'string' || name === '') return 'is empty';
  if (name.includes('\\')) return 'contains a backslash; separate parts with "/"';
  if (name.includes('\0')) return 'contains a NUL character';
  if (name.startsWith('/')) return 'is absolute; artifact names are relative';
  if (name.split('/').some((part) => part === '' || part === '.' || part === '..')) return 'has an empty, "." or ".." part';
  return undefined;
}

/** Longest file name most filesystems take, in bytes. */
const MAX_FILE_NAME = 255;

/**
 * An artifact's file under `<dir>/artifacts`: `<shard>/<taskId>.<runId>.<name, URL-encoded>`, the shard
 * being the task id's first character (slugids: one of 32). Every directory is a mkdir some task pays
 * for, on the event loop, and on some filesystems a mkdir costs milliseconds; so there are a few shard
 * directories, made once, and no directory per task, run or name part. A slugid has no `.`, and an
 * encoded name no `/`, so different artifacts never share a file; a name too long for one file name
 * goes by its SHA-256 (`#`, which encoding never leaves, marks it).
 */
export function artifactFile(run: RunRef, name: string): string {
  const prefix = `${run.taskId}.${run.runId}.`;
  const encoded = encodeURIComponent(name);
  const base = Buffer.byteLength(prefix + encoded) <= MAX_FILE_NAME ? prefix + encoded : `${prefix}#${createHash('sha256').update(name).digest('hex')}`;
  return join(run.taskId.slice(0, 1), base);
}

/** Where drovers before schema version 4 put an artifact's file, newest layout first: `<taskId>/<runId>-<encoded name>`, then `<taskId>/<runId>/<name>`. */
function legacyArtifactFiles(run: RunRef, name: string): string[] {
  return [join(run.taskId, `${run.runId}-${encodeURIComponent(name)}`), join(run.taskId, String(run.runId), ...name.split('/'))];
}

/**
 * What the paused `source` gives until it ends, or gives more than `max` bytes, or `waitMs` passes,
 * and whether it ended (having given at most `max`, then). It is paused again after: what it gives next
 * waits for the next reader. Read as 'data', as a pipe reads, so that another listener of the same
 * stream sees each chunk once. A source that fails rejects with its error.
 */
function hold(source: Readable, max: number, waitMs: number): Promise<{ bytes: Buffer; ended: boolean }> {
  const chunks: Buffer[] = [];
  let size = 0;
  return new Promise((resolve, reject) => {
    if (source.readableEnded) return resolve({ bytes: Buffer.alloc(0), ended: true });
    const done = (ended: boolean) => settle(() => resolve({ bytes: Buffer.concat(chunks), ended }));
    const settle = (outcome: () => void) => {
      clearTimeout(timer);
      source.pause();
      source.off('data', take).off('end', ended).off('error', failed);
      outcome();
    };
    const ended = () => done(true);
    const failed = (error: unknown) => settle(() => reject(error));
    const take = (chunk: unknown) => {
      const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer);
      chunks.push(bytes);
      size += bytes.length;
      if (size > max) done(false);
    };
    const timer = setTimeout(() => done(false), waitMs);
    source.on('data', take).once('end', ended).once('error', failed).resume();
  });
}

/**
 * Creates (or empties) an artifact's file for writing. Its shard directory is made only when missing: once
 * per shard and queue, not once per artifact.
 */
async function createFile(path: string): Promise<FileHandle> {
  try {
    try {
      return await open(path, 'w');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      await mkdir(dirname(path), { recursive: true });
      return await open(path, 'w');
    }
  } catch (error) {
    throw new QueueUnavailableError(`cannot create artifact file "${path}": ${errorMessage(error)}`, { cause: error });
  }
}
