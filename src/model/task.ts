/** Domain types shared by queues, machines and the runtime. */

export type TaskId = string;

/** A payload is the task's JSON object; engines and plugins validate their parts of it. */
export type Payload = Readonly<Record<string, unknown>>;

export type TaskState = 'pending' | 'running' | 'completed' | 'failed' | 'exception';
export type RunState = TaskState;

export interface TaskDefinition {
  readonly payload: Payload;
  /** Milliseconds since the epoch after which the task is resolved `exception/deadline-exceeded`. */
  readonly deadline: number;
  /** How many more runs may be scheduled after retryable exceptions. */
  readonly retries: number;
}

/** Identifies one run of one task: the unit a worker claims, reclaims and resolves. */
export interface RunRef {
  readonly taskId: TaskId;
  readonly runId: number;
}

/** What a worker holds after claiming: the run, its payload and its lease. */
export interface Claim extends RunRef {
  readonly workerId: string;
  readonly payload: Payload;
  readonly deadline: number;
  /** The lease ends at this time (ms since epoch) unless it is reclaimed first. */
  readonly takenUntil: number;
  readonly retriesLeft: number;
}

export function runKey(run: RunRef): string {
  return `${run.taskId}/${run.runId}`;
}

/** How a run's command ended. */
export interface RunResult {
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly durationMs: number;
  /** Why the command could not start, when it could not (exitCode is then 127). */
  readonly startError?: string;
}
