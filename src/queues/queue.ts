/**
 * Queue: where tasks wait, runs are claimed, and resolutions are recorded.
 *
 * The rules every queue keeps (the conformance tests check them):
 *  - A run is claimed by one worker at a time, until `takenUntil`. The
 *    worker keeps it by calling `reclaim` before then (at about half the
 *    claim's length). Any caller may sweep expired claims; a swept run is
 *    resolved `exception/claim-expired`.
 *  - `resolve` succeeds once per run, and only for the worker that holds the
 *    current claim; every later or foreign report is refused with
 *    ClaimLostError, whose message says what happened to the run.
 *  - After `exception/worker-shutdown`, `claim-expired` or
 *    `intermittent-task`, a new run is scheduled while retries remain.
 *  - A task whose deadline passes is resolved `exception/deadline-exceeded`.
 *  - `cancel` resolves the current run `exception/canceled` at once; the
 *    worker holding it learns of it at its next reclaim (ClaimLostError
 *    with reason `canceled`), or sooner through `watchCancellation`.
 *  - Artifacts are stored per run; an upload needs the current claim when it
 *    starts, and can be read while it is still being written (live logs).
 * Every method may reject with QueueUnavailableError when the queue cannot be
 * reached; callers retry those.
 */
import type { Readable } from 'node:stream';
import type { Claim, Payload, RunRef, RunState, TaskDefinition, TaskId, TaskState } from '../model/task.js';
import type { ExceptionReason, Resolution } from '../model/resolution.js';

export interface ClaimWorkOptions {
  readonly workerId: string;
  /** Claim at most this many runs. */
  readonly count: number;
  /** Wait up to this long for work when none is pending (long poll); 0 returns at once. */
  readonly waitMs: number;
  /** Ends the wait early; resolves with what was claimed so far (usually nothing). */
  readonly signal?: AbortSignal;
}

export interface ArtifactMeta {
  /** Slash-separated, relative, without `..` segments: `public/logs/live.log`. */
  readonly name: string;
  readonly contentType: string;
  /** Milliseconds since the epoch; undefined keeps it as long as the task. */
  readonly expires?: number;
}

export interface ArtifactInfo extends ArtifactMeta {
  readonly taskId: TaskId;
  readonly runId: number;
  /** `streaming` while an upload is under way (a live log), then `complete`. */
  readonly state: 'streaming' | 'complete';
  readonly size: number;
  readonly created: number;
}

export interface RunStatus {
  readonly runId: number;
  readonly state: RunState;
  readonly reasonCreated: 'scheduled' | 'retry';
  readonly reasonResolved?: ExceptionReason | 'completed' | 'failed';
  readonly message?: string;
  readonly workerId?: string;
  readonly takenUntil?: number;
  readonly scheduled: number;
  readonly started?: number;
  readonly resolved?: number;
}

export interface TaskStatus {
  readonly taskId: TaskId;
  readonly state: TaskState;
  readonly payload: Payload;
  readonly created: number;
  readonly deadline: number;
  readonly retriesLeft: number;
  readonly runs: readonly RunStatus[];
}

export interface ListTasksOptions {
  readonly state?: TaskState;
  /** Newest first; at most this many. */
  readonly limit?: number;
}

export interface ReadArtifactOptions {
  /** Keep reading while the artifact is `streaming`, until it is complete or abandoned (uploadsAbandoned). */
  readonly follow?: boolean;
  readonly signal?: AbortSignal;
}

/**
 * Whether nobody will finish the run's streaming artifacts any more, so a
 * follower ends with what was written: the run has not been its worker's for
 * a claim's length (resolved, or its claim ran out, that long ago). A worker
 * uploads only while it holds the claim and learns that it lost it at its
 * next reclaim, within a claim's length; a worker that died never finishes.
 */
export function uploadsAbandoned(run: Pick<RunStatus, 'state' | 'takenUntil' | 'resolved'>, now: number, claimTimeoutMs: number): boolean {
  const lostAt = run.state === 'running' ? run.takenUntil : run.resolved;
  return lostAt !== undefined && lostAt + claimTimeoutMs <= now;
}

export interface Queue {
  submit(task: TaskDefinition): Promise<TaskId>;
  claimWork(options: ClaimWorkOptions): Promise<Claim[]>;
  /** Extends the claim; rejects with ClaimLostError when it is no longer the worker's. */
  reclaim(run: RunRef, workerId: string): Promise<{ takenUntil: number }>;
  /** Records how the run ended, exactly once; rejects with ClaimLostError otherwise. */
  resolve(run: RunRef, workerId: string, resolution: Resolution): Promise<void>;
  /** Resolves the task's current run `exception/canceled`; rejects with TaskStateError if already resolved. */
  cancel(taskId: TaskId): Promise<void>;
  /**
   * Calls `onCanceled` when one of the runs this worker holds is canceled,
   * ahead of the next reclaim. Returns a function that stops watching.
   */
  watchCancellation(run: RunRef, onCanceled: () => void): () => void;
  /**
   * Streams `source` into the artifact; needs the current claim to start.
   * Takes `source` over: a refused or failed upload destroys it. An
   * implementation runs its upload through takeOver (artifact-store.ts).
   */
  uploadArtifact(run: RunRef, workerId: string, meta: ArtifactMeta, source: Readable): Promise<ArtifactInfo>;
  readArtifact(run: RunRef, name: string, options?: ReadArtifactOptions): Promise<Readable>;
  listArtifacts(run: RunRef): Promise<ArtifactInfo[]>;
  task(taskId: TaskId): Promise<TaskStatus>;
  listTasks(options?: ListTasksOptions): Promise<TaskStatus[]>;
  /** Resolves expired claims and passed deadlines now; returns how many runs it resolved. */
  sweep(): Promise<number>;
  /**
   * The queue's clock, on which claims (takenUntil) and deadlines are measured: a worker times its
   * reclaims and reports by it. Without it, this machine's.
   */
  now?(): number;
  /** Releases connections and timers. Idempotent. */
  close(): Promise<void>;
}
