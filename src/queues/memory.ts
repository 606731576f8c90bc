/**
 * An in-memory queue: the Queue contract (queue.ts) with nothing stored,
 * for tests, for model-based replays, and for extension authors who need a
 * queue in theirs. It passes the queue conformance suite.
 *
 * Instances opened on one MemoryStore see the same tasks, as processes
 * sharing a database would (submit wakes the others' long polls, cancel
 * reaches their watchers). Claims and deadlines follow the injected clock;
 * long polls wait in real time. Time rules are applied lazily, as in the
 * SQLite queue: every operation that claims, reclaims, resolves, cancels or
 * uploads sweeps first.
 *
 * Hooks let a test make an operation wait, or fail, at a moment it
 * chooses: each runs before its operation takes effect; what it throws,
 * the operation throws (a ClaimLostError from `reclaim` is a lost claim, a
 * QueueUnavailableError an outage the caller retries).
 */
import { Readable } from 'node:stream';
import { InternalError, TaskStateError } from '../model/errors.js';
import { RETRYABLE_REASONS, type Resolution } from '../model/resolution.js';
import { assertTaskDefinition, runKey, slugid, type Claim, type Payload, type RunRef, type RunState, type TaskDefinition, type TaskId, type TaskState } from '../model/task.js';
import { uploadsAbandoned, type ArtifactInfo, type ArtifactMeta, type ClaimWorkOptions, type ListTasksOptions, type Queue, type ReadArtifactOptions, type RunStatus, type TaskStatus } from './queue.js';
import { artifactNameProblem, DEFAULT_CLAIM_TIMEOUT_MS } from './sqlite.js';
import { takeOver } from './artifact-store.js';
import { describeRun, iso, lostClaim } from './sql-rows.js';
import { Wakers } from './wakers.js';

export interface MemoryQueueHooks {
  claimWork?(options: ClaimWorkOptions): void | Promise<void>;
  reclaim?(run: RunRef, workerId: string): void | Promise<void>;
  resolve?(run: RunRef, workerId: string, resolution: Resolution): void | Promise<void>;
  uploadArtifact?(run: RunRef, workerId: string, meta: ArtifactMeta): void | Promise<void>;
  /** Synchronous, as watchCancellation is: throw to make it fail. */
  watchCancellation?(run: RunRef): void;
}

export interface MemoryQueueOptions {
  /** Shared with other instances to see the same tasks; a new one by default. */
  readonly store?: MemoryStore;
  readonly claimTimeoutMs?: number;
  /** The clock of claims and deadlines; tests inject one to move time. */
  readonly now?: () => number;
  readonly hooks?: MemoryQueueHooks;
}

interface ArtifactRecord {
  readonly meta: ArtifactMeta;
  readonly created: number;
  state: 'streaming' | 'complete';
  readonly chunks: Buffer[];
  size: number;
  removed: boolean;
}

interface RunRecord {
  readonly runId: number;
  /** Scheduling order among all runs: the oldest pending run is claimed first. */
  readonly order: number;
  state: RunState;
  readonly reasonCreated: 'scheduled' | 'retry';
  reasonResolved?: RunStatus['reasonResolved'];
  message?: string;
  workerId?: string;
  takenUntil?: number;
  readonly scheduled: number;
  started?: number;
  resolved?: number;
  readonly artifacts: Map<string, ArtifactRecord>;
}

interface TaskRecord {
  readonly taskId: TaskId;
  readonly order: number;
  readonly payload: string;
  state: TaskState;
  readonly created: number;
  readonly deadline: number;
  retriesLeft: number;
  readonly runs: RunRecord[];
}

interface Watcher {
  readonly run: RunRef;
  readonly onCanceled: () => void;
  readonly owner: MemoryQueue;
}

/** What instances of MemoryQueue share: the tasks, and who waits on them. */
export class MemoryStore {
  readonly tasks = new Map<TaskId, TaskRecord>();
  /** Long polls to wake on submit; artifact followers to wake on new bytes. */
  readonly wakers = new Wakers();
  readonly watchers = new Set<Watcher>();
  order = 0;

  wake(): void {
    this.wakers.wake();
  }
}

/** Exceptions the queue itself decides; a worker never reports them, so a repeat of one is not "the same report". */
const QUEUE_REASONS: ReadonlySet<string> = new Set(['canceled', 'claim-expired', 'deadline-exceeded']);
/** How often a follower that no new bytes woke looks whether its upload was abandoned (uploadsAbandoned). */
const ABANDONED_CHECK_MS = 200;

export class MemoryQueue implements Queue {
  readonly store: MemoryStore;
  readonly #claimTimeoutMs: number;
  /** The queue's clock (Queue.now). */
  readonly now: () => number;
  readonly #hooks: MemoryQueueHooks;
  /** Aborted by close: ends this instance's long polls and follows. */
  readonly #closing = new AbortController();

  constructor(options: MemoryQueueOptions = {}) {
    this.store = options.store ?? new MemoryStore();
    this.#claimTimeoutMs = options.claimTimeoutMs ?? DEFAULT_CLAIM_TIMEOUT_MS;
    this.now = options.now ?? Date.now;
    this.#hooks = options.hooks ?? {};
  }

  async submit(task: TaskDefinition): Promise<TaskId> {
    this.#assertOpen();
    assertTaskDefinition(task);
    const taskId = slugid();
    const now = this.now();
    // Stored as JSON, as a database would: later changes to the caller's object do not reach the queue.
    this.store.tasks.set(taskId, {
      taskId, order: this.store.order++, payload: JSON.stringify(task.payload), state: 'pending',
      created: now, deadline: task.deadline, retriesLeft: task.retries, runs: [this.#newRun(0, 'scheduled', now)],
    });
    this.store.wake();
    return taskId;
  }

  async claimWork(options: ClaimWorkOptions): Promise<Claim[]> {
    this.#assertOpen();
    await this.#hooks.claimWork?.(options);
    const giveUpAt = performance.now() + options.waitMs;
    for (;;) {
      const claims = this.#claimNow(options.workerId, options.count);
      const left = giveUpAt - performance.now();
      if (claims.length > 0 || left <= 0 || options.signal?.aborted || this.#closing.signal.aborted) return claims;
      await this.#pause(left, options.signal);
      if (this.#closing.signal.aborted || options.signal?.aborted) return [];
    }
  }

  async reclaim(run: RunRef, workerId: string): Promise<{ takenUntil: number }> {
    this.#assertOpen();
    await this.#hooks.reclaim?.(run, workerId);
    const now = this.#sweep();
    const record = this.#held(run, workerId, now);
    if (record === undefined) throw this.#lostClaim(run, workerId);
    record.takenUntil = now + this.#claimTimeoutMs;
    return { takenUntil: record.takenUntil };
  }

  async resolve(run: RunRef, workerId: string, resolution: Resolution): Promise<void> {
    this.#assertOpen();
    await this.#hooks.resolve?.(run, workerId, resolution);
    const now = this.#sweep();
    const record = this.#held(run, workerId, now);
    if (record === undefined) {
      // A worker that lost the answer to its report may send it again: acknowledge it, once applied.
      if (this.#sameReport(run, workerId, resolution)) return;
      throw this.#lostClaim(run, workerId);
    }
    this.#end(run, record, resolution, now);
  }

  async cancel(taskId: TaskId): Promise<void> {
    this.#assertOpen();
    const now = this.#sweep();
    const task = this.store.tasks.get(taskId);
    if (task === undefined) throw new TaskStateError(`cannot cancel task ${taskId}: there is no such task`);
    const current = task.runs.at(-1)!;
    if (task.state !== 'pending' && task.state !== 'running') {
      throw new TaskStateError(`cannot cancel task ${taskId}: it is already resolved ${describeRun(current)}`);
    }
    this.#end({ taskId, runId: current.runId }, current, { state: 'exception', reason: 'canceled', message: 'canceled by user' }, now);
  }

  watchCancellation(run: RunRef, onCanceled: () => void): () => void {
    this.#assertOpen();
    this.#hooks.watchCancellation?.(run);
    const watcher: Watcher = { run: { taskId: run.taskId, runId: run.runId }, onCanceled, owner: this };
    this.store.watchers.add(watcher);
    // Canceled already: say so, but not before the caller has its unwatch function.
    if (this.#record(run)?.reasonResolved === 'canceled') queueMicrotask(() => this.#notify(run));
    return () => void this.store.watchers.delete(watcher);
  }

  uploadArtifact(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    return takeOver(source, () => this.#upload(run, workerId, meta, source));
  }

  async #upload(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo> {
    this.#assertOpen();
    const problem = artifactNameProblem(meta.name);
    if (problem) throw new TaskStateError(`artifact name ${JSON.stringify(meta.name)} ${problem}`);
    await this.#hooks.uploadArtifact?.(run, workerId, meta);
    const now = this.#sweep();
    const record = this.#held(run, workerId, now);
    if (record === undefined) throw this.#lostClaim(run, workerId);
    for (const name of record.artifacts.keys()) {
      if (name === meta.name) throw new TaskStateError(`run ${runKey(run)} already has an artifact named "${meta.name}"`);
      if (name.startsWith(`${meta.name}/`) || meta.name.startsWith(`${name}/`)) {
        throw new TaskStateError(`artifact "${meta.name}" clashes with "${name}" of run ${runKey(run)}: one would have to be a directory of the other`);
      }
    }
    const artifact: ArtifactRecord = { meta: { ...meta }, created: now, state: 'streaming', chunks: [], size: 0, removed: false };
    record.artifacts.set(meta.name, artifact);
    try {
      for await (const chunk of source) {
        const bytes = Buffer.from(chunk as Buffer);
        artifact.chunks.push(bytes);
        artifact.size += bytes.length;
        this.store.wake();
      }
    } catch (error) {
      // A half-written artifact would pass for a whole one: drop it, so the caller can upload again.
      artifact.removed = true;
      record.artifacts.delete(meta.name);
      this.store.wake();
      throw error;
    }
    artifact.state = 'complete';
    this.store.wake();
    return artifactInfo(run, artifact);
  }

  async readArtifact(run: RunRef, name: string, options: ReadArtifactOptions = {}): Promise<Readable> {
    this.#assertOpen();
    const artifact = this.#artifact(run, name);
    if (!options.follow) return Readable.from(Buffer.concat(artifact.chunks), { objectMode: false });
    return Readable.from(this.#follow(run, artifact, options.signal), { objectMode: false });
  }

  async listArtifacts(run: RunRef): Promise<ArtifactInfo[]> {
    this.#assertOpen();
    const record = this.#record(run);
    if (record === undefined) throw new TaskStateError(`task ${run.taskId} has no run ${run.runId}`);
    return [...record.artifacts.values()]
      .sort((a, b) => a.created - b.created || (a.meta.name < b.meta.name ? -1 : 1))
      .map((artifact) => artifactInfo(run, artifact));
  }

  async task(taskId: TaskId): Promise<TaskStatus> {
    this.#assertOpen();
    const task = this.store.tasks.get(taskId);
    if (task === undefined) throw new TaskStateError(`there is no task ${taskId}`);
    return taskStatus(task);
  }

  async listTasks({ state, limit = 100 }: ListTasksOptions = {}): Promise<TaskStatus[]> {
    this.#assertOpen();
    return [...this.store.tasks.values()]
      .filter((task) => state === undefined || task.state === state)
      .sort((a, b) => b.created - a.created || b.order - a.order)
      .slice(0, Math.max(0, Math.floor(limit)))
      .map(taskStatus);
  }

  async sweep(): Promise<number> {
    this.#assertOpen();
    return this.#sweepAt(this.now());
  }

  async close(): Promise<void> {
    if (this.#closing.signal.aborted) return;
    this.#closing.abort();
    for (const watcher of [...this.store.watchers]) if (watcher.owner === this) this.store.watchers.delete(watcher);
    this.store.wake();
  }

  // ---- inside ------------------------------------------------------------

  #assertOpen(): void {
    if (this.#closing.signal.aborted) throw new InternalError('queue "memory" is closed');
  }

  #newRun(runId: number, reasonCreated: 'scheduled' | 'retry', now: number): RunRecord {
    return { runId, order: this.store.order++, state: 'pending', reasonCreated, scheduled: now, artifacts: new Map() };
  }

  #record(run: RunRef): RunRecord | undefined {
    return this.store.tasks.get(run.taskId)?.runs.find((record) => record.runId === run.runId);
  }

  /** The run, if `workerId` holds its claim at `now`. */
  #held(run: RunRef, workerId: string, now: number): RunRecord | undefined {
    const record = this.#record(run);
    return record?.state === 'running' && record.workerId === workerId && record.takenUntil! > now ? record : undefined;
  }

  #claimNow(workerId: string, count: number): Claim[] {
    if (count < 1) return [];
    const now = this.#sweep();
    const pending = [...this.store.tasks.values()]
      .flatMap((task) => task.runs.filter((run) => run.state === 'pending').map((run) => ({ task, run })))
      .sort((a, b) => a.run.scheduled - b.run.scheduled || a.run.order - b.run.order)
      .slice(0, Math.floor(count));
    return pending.map(({ task, run }): Claim => {
      run.state = 'running';
      run.workerId = workerId;
      run.started = now;
      run.takenUntil = now + this.#claimTimeoutMs;
      task.state = 'running';
      return {
        taskId: task.taskId, runId: run.runId, workerId, payload: JSON.parse(task.payload) as Payload,
        deadline: task.deadline, takenUntil: run.takenUntil, retriesLeft: task.retriesLeft,
      };
    });
  }

  /** Waits up to `ms` of real time, or less when work is submitted, the signal aborts or the queue closes. */
  #pause(ms: number, signal?: AbortSignal): Promise<void> {
    return this.store.wakers.pause(ms, signal, this.#closing.signal);
  }

  #sweep(): number {
    const now = this.now();
    this.#sweepAt(now);
    return now;
  }

  /** Deadlines first: a run past its task's deadline ends deadline-exceeded, not claim-expired and a retry. */
  #sweepAt(now: number): number {
    let swept = 0;
    for (const task of this.store.tasks.values()) {
      if ((task.state === 'pending' || task.state === 'running') && task.deadline <= now) {
        const current = task.runs.at(-1)!;
        const ref = { taskId: task.taskId, runId: current.runId };
        this.#end(ref, current, { state: 'exception', reason: 'deadline-exceeded', message: `task deadline passed at ${iso(task.deadline)}` }, now);
        swept++;
      }
    }
    for (const task of this.store.tasks.values()) {
      for (const run of task.runs) {
        if (run.state !== 'running' || run.takenUntil! > now) continue;
        const message = `claim expired at ${iso(run.takenUntil)}: worker ${run.workerId} did not reclaim the run in time`;
        this.#end({ taskId: task.taskId, runId: run.runId }, run, { state: 'exception', reason: 'claim-expired', message }, now);
        swept++;
      }
    }
    return swept;
  }

  /** Resolves an open run; its task follows, unless the exception earns a retry. */
  #end(ref: RunRef, run: RunRecord, resolution: Resolution, now: number): void {
    const task = this.store.tasks.get(ref.taskId)!;
    run.state = resolution.state;
    run.reasonResolved = resolution.state === 'exception' ? resolution.reason : resolution.state;
    run.message = resolution.message;
    run.resolved = now;
    const retry = resolution.state === 'exception' && RETRYABLE_REASONS.has(resolution.reason) && task.retriesLeft > 0;
    if (retry) {
      task.retriesLeft--;
      task.state = 'pending';
      task.runs.push(this.#newRun(run.runId + 1, 'retry', now));
      this.store.wake();
    } else {
      task.state = resolution.state;
    }
    if (run.reasonResolved === 'canceled') queueMicrotask(() => this.#notify(ref));
  }

  /** Calls, once, every watcher of a canceled run, on any instance of the store. */
  #notify(run: RunRef): void {
    for (const watcher of [...this.store.watchers]) {
      if (watcher.run.taskId !== run.taskId || watcher.run.runId !== run.runId || !this.store.watchers.has(watcher)) continue;
      this.store.watchers.delete(watcher);
      watcher.onCanceled();
    }
  }

  #sameReport(run: RunRef, workerId: string, resolution: Resolution): boolean {
    const record = this.#record(run);
    const reason = resolution.state === 'exception' ? resolution.reason : resolution.state;
    return record !== undefined && record.workerId === workerId && record.state === resolution.state && record.reasonResolved === reason
      && record.message === resolution.message && !QUEUE_REASONS.has(reason);
  }

  /** Why `workerId` does not hold `run`, in the words of the SQL queues. */
  #lostClaim(run: RunRef, workerId: string): Error {
    return lostClaim(this.#record(run), this.store.tasks.get(run.taskId)?.deadline, run, workerId);
  }

  #artifact(run: RunRef, name: string): ArtifactRecord {
    const artifact = this.#record(run)?.artifacts.get(name);
    if (artifact === undefined) throw new TaskStateError(`artifact "${name}" of task ${run.taskId} run ${run.runId} does not exist`);
    return artifact;
  }

  /** The artifact's bytes as they come, until it is complete, the signal aborts or the queue closes. */
  async *#follow(run: RunRef, artifact: ArtifactRecord, signal?: AbortSignal): AsyncGenerator<Buffer> {
    let next = 0;
    for (;;) {
      while (next < artifact.chunks.length) yield artifact.chunks[next++]!;
      if (artifact.removed) throw new TaskStateError(`artifact "${artifact.meta.name}" of task ${run.taskId} run ${run.runId} was removed while being read: its upload failed`);
      if (artifact.state === 'complete' || signal?.aborted || this.#closing.signal.aborted) return;
      const record = this.#record(run);
      if (record !== undefined && uploadsAbandoned(record, this.now(), this.#claimTimeoutMs)) return;
      // New bytes wake it at once; the pause bounds how late it sees that the upload was abandoned.
      await this.#pause(ABANDONED_CHECK_MS, signal);
    }
  }
}

function artifactInfo(run: RunRef, artifact: ArtifactRecord): ArtifactInfo {
  const { meta } = artifact;
  return {
    taskId: run.taskId, runId: run.runId, name: meta.name, contentType: meta.contentType,
    ...(meta.expires !== undefined && { expires: meta.expires }), state: artifact.state, size: artifact.size, created: artifact.created,
  };
}

function taskStatus(task: TaskRecord): TaskStatus {
  return {
    taskId: task.taskId, state: task.state, payload: JSON.parse(task.payload) as Payload, created: task.created,
    deadline: task.deadline, retriesLeft: task.retriesLeft,
    runs: task.runs.map((run): RunStatus => ({
      runId: run.runId, state: run.state, reasonCreated: run.reasonCreated, scheduled: run.scheduled,
      reasonResolved: run.reasonResolved, message: run.message, workerId: run.workerId, takenUntil: run.takenUntil,
      started: run.started, resolved: run.resolved,
    })),
  };
}
