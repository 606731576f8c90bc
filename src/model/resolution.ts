/**
 * How a run ends. The words are Taskcluster's, so its users feel at home:
 * a run is `completed` or `failed` by the task's own doing, or resolved as
 * an `exception` with a reason when something other than the task went wrong.
 */
export const EXCEPTION_REASONS = [
  'malformed-payload',
  'worker-shutdown',
  'internal-error',
  'resource-unavailable',
  'canceled',
  'claim-expired',
  'deadline-exceeded',
  'intermittent-task',
] as const;

export type ExceptionReason = (typeof EXCEPTION_REASONS)[number];

export type Resolution =
  | { readonly state: 'completed'; readonly message?: string }
  | { readonly state: 'failed'; readonly message?: string }
  | { readonly state: 'exception'; readonly reason: ExceptionReason; readonly message?: string };

export type ResolvedState = Resolution['state'];

/** Exception reasons after which the queue schedules another run while retries remain. */
export const RETRYABLE_REASONS: ReadonlySet<ExceptionReason> = new Set([
  'worker-shutdown',
  'claim-expired',
  'intermittent-task',
]);

export function isExceptionReason(value: unknown): value is ExceptionReason {
  return typeof value === 'string' && (EXCEPTION_REASONS as readonly string[]).includes(value);
}

/** `completed`, `failed`, or `exception/<reason>`: how resolutions are shown to people. */
export function describeResolution(resolution: Resolution): string {
  return resolution.state === 'exception' ? `exception/${resolution.reason}` : resolution.state;
}
