/**
 * drover's errors say how the task resolves (taskcluster-worker's idea):
 * a payload problem is `exception/malformed-payload` and lists every problem
 * at once; an internal error is `exception/internal-error` and says whether it
 * should stop the worker. Every error has a stable `code`; README's error table
 * lists them, and test/errors.test.ts checks that it does.
 */
import type { ExceptionReason, Resolution } from './resolution.js';
import type { RunRef } from './task.js';
import { runKey } from './task.js';

export class DroverError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** One problem with a payload, at a JSON path such as `payload.command[2]`. */
export interface PayloadProblem {
  readonly path: string;
  readonly message: string;
}

export class MalformedPayloadError extends DroverError {
  readonly problems: readonly PayloadProblem[];
  constructor(problems: readonly PayloadProblem[], options?: { cause?: unknown }) {
    const lines = problems.map((p) => `  - ${p.path}: ${p.message}`).join('\n');
    super('DROVER_MALFORMED_PAYLOAD', `malformed payload (${problems.length} problem${problems.length === 1 ? '' : 's'}):\n${lines}`, options);
    this.problems = problems;
  }
}

/** Something broke that is neither the task's nor the payload's fault. */
export class InternalError extends DroverError {
  /** Fatal errors stop the worker: it cannot be trusted to run more tasks. */
  readonly fatal: boolean;
  constructor(message: string, options?: { cause?: unknown; fatal?: boolean }) {
    super('DROVER_INTERNAL', message, options);
    this.fatal = options?.fatal ?? false;
  }
}

/** A needed resource (disk, host, cache) is not there; the task may succeed elsewhere. */
export class ResourceUnavailableError extends DroverError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('DROVER_RESOURCE_UNAVAILABLE', message, options);
  }
}

/** Bad configuration: a file, a flag or an environment variable; the CLI exits 2. */
export class ConfigError extends DroverError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('DROVER_CONFIG', message, options);
  }
}

/** The worker no longer holds this run: its claim expired, or the run was canceled or resolved. */
export class ClaimLostError extends DroverError {
  readonly run: RunRef;
  /** Why the run is no longer ours, as the queue knows it. */
  readonly reason: ExceptionReason | 'resolved';
  constructor(run: RunRef, reason: ExceptionReason | 'resolved', message: string) {
    super('DROVER_CLAIM_LOST', `run ${runKey(run)}: ${message}`);
    this.run = run;
    this.reason = reason;
  }
}

/** A task or run that does not exist, or cannot do what was asked (cancel a resolved task...). */
export class TaskStateError extends DroverError {
  constructor(message: string) {
    super('DROVER_TASK_STATE', message);
  }
}

/** The queue could not be reached or its storage failed; callers may retry. */
export class QueueUnavailableError extends DroverError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('DROVER_QUEUE_UNAVAILABLE', message, options);
  }
}

/** The resolution a run gets when `error` escapes a stage. */
export function resolutionForError(error: unknown): Resolution {
  if (error instanceof MalformedPayloadError) {
    return { state: 'exception', reason: 'malformed-payload', message: error.message };
  }
  if (error instanceof ResourceUnavailableError) {
    return { state: 'exception', reason: 'resource-unavailable', message: error.message };
  }
  return { state: 'exception', reason: 'internal-error', message: errorMessage(error) };
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Every error code, with the sentence README's error table uses. */
export const ERROR_CODES: Readonly<Record<string, string>> = {
  DROVER_MALFORMED_PAYLOAD: 'the payload does not match the engine or plugin schemas; resolves exception/malformed-payload',
  DROVER_INTERNAL: 'a bug or broken environment; resolves exception/internal-error, fatal ones stop the worker',
  DROVER_RESOURCE_UNAVAILABLE: 'a needed resource is missing; resolves exception/resource-unavailable',
  DROVER_CONFIG: 'bad configuration (file, flag or environment variable); the CLI exits 2',
  DROVER_CLAIM_LOST: 'the run is no longer held by this worker (expired, canceled or resolved)',
  DROVER_TASK_STATE: 'no such task or run, or the request does not fit its state',
  DROVER_QUEUE_UNAVAILABLE: 'the queue could not be reached; the caller retries',
};
