/**
 * Retry with exponential backoff and full jitter, for calls to services that
 * fail transiently (cloud metadata servers, cloud APIs that throttle).
 *
 * `retry(call, options)` runs `call` until it resolves, the error is not
 * retryable, the attempts are used up or `signal` is aborted; it rejects with
 * the last error (or the abort reason). The pause before attempt n+1 is a
 * random duration in [0, min(maxDelayMs, baseDelayMs * 2^(n-1))] (AWS's
 * "full jitter"), so many clients that failed together do not retry together.
 */
import { setTimeout as sleep } from 'node:timers/promises';

export interface RetryOptions {
  /** How many times `call` runs at most (the first try included); at least 1. */
  readonly attempts: number;
  /** The ceiling of the first pause. */
  readonly baseDelayMs: number;
  /** No pause is longer than this. */
  readonly maxDelayMs: number;
  /** Stops retrying (and a pause) at once; the promise rejects with the signal's reason. */
  readonly signal?: AbortSignal;
  /** Whether an error is worth another try; default: every error is. */
  readonly retryable?: (error: unknown) => boolean;
  /** Told before each pause: which attempt failed (1-based), with what, and how long the pause is. */
  readonly onRetry?: (error: unknown, attempt: number, delayMs: number) => void;
  /** A number in [0, 1); Math.random by default (tests pass a fixed one). */
  readonly random?: () => number;
}

/** The pause after failed attempt `attempt` (1-based). */
export function backoffDelay(attempt: number, options: Pick<RetryOptions, 'baseDelayMs' | 'maxDelayMs' | 'random'>): number {
  const ceiling = Math.min(options.maxDelayMs, options.baseDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.floor((options.random ?? Math.random)() * ceiling);
}

export async function retry<T>(call: (attempt: number) => Promise<T>, options: RetryOptions): Promise<T> {
  const attempts = Math.max(1, Math.floor(options.attempts));
  for (let attempt = 1; ; attempt++) {
    options.signal?.throwIfAborted();
    try {
      return await call(attempt);
    } catch (error) {
      if (options.signal?.aborted) throw options.signal.reason;
      if (attempt >= attempts || !(options.retryable?.(error) ?? true)) throw error;
      const delayMs = backoffDelay(attempt, options);
      options.onRetry?.(error, attempt, delayMs);
      await sleep(delayMs, undefined, options.signal ? { signal: options.signal } : {}).catch(() => {
        throw options.signal!.reason;
      });
    }
  }
}
