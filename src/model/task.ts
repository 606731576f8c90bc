/** Domain types shared by queues, machines and the runtime. */
import { randomFillSync } from 'node:crypto';

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

/** Throws a RangeError that names `which` task when its retries or deadline make no sense; every queue checks this. */
export function assertTaskDefinition(task: TaskDefinition, which = 'task'): void {
  if (!Number.isInteger(task.retries) || task.retries < 0) throw new RangeError(`${which} retries must be a whole number >= 0, not ${task.retries}`);
  if (!Number.isFinite(task.deadline)) throw new RangeError(`${which} deadline must be a time in milliseconds, not ${task.deadline}`);
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

/** Random bytes drawn from the system's generator in blocks: a call per id cost 3 µs, a batch of 100,000 tasks 0.3 s. */
const pool = Buffer.alloc(4096);
let poolUsed = pool.length;
function randomPiece(size: number): Buffer {
  if (poolUsed + size > pool.length) {
    randomFillSync(pool);
    poolUsed = 0;
  }
  poolUsed += size;
  return pool.subarray(poolUsed - size, poolUsed);
}

/** 22 characters of URL-safe base64, like Taskcluster's slugids; the first is always a letter, so an id never looks like a flag. */
export function slugid(): TaskId {
  const bytes = Buffer.from(randomPiece(16));
  bytes[0] = bytes[0]! & 0x7f; // top six bits 0..31 encode as A-Z or a-f
  return bytes.toString('base64url');
}

/** `bytes` random bytes in hex: a run's cookie, which marks its processes. */
export function randomHex(bytes: number): string {
  return randomPiece(bytes).toString('hex');
}
