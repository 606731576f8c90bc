/**
 * Calls to a cloud API: each attempt has a timeout, and the errors the
 * provider calls transient (throttling, 5xx, a dropped connection, a
 * timed-out attempt) are retried with src/hosts/retry.ts (exponential
 * backoff with full jitter, a bounded number of attempts). Anything else
 * is thrown at once. The caller's signal stops it all, including a pause.
 */
import { retry } from '../hosts/retry.js';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import { CloudError } from './provider.js';

export interface RetryPolicy {
  /** Attempts in all, the first included; at least 1. */
  readonly attempts: number;
  /** Bound of the first pause; doubles with each attempt. */
  readonly baseDelayMs: number;
  /** No pause is longer than this. */
  readonly maxDelayMs: number;
  /** One attempt may take this long before it is abandoned (and counts as transient). */
  readonly timeoutMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 6, baseDelayMs: 200, maxDelayMs: 20_000, timeoutMs: 30_000 };

export interface CloudRetryOptions {
  readonly policy: RetryPolicy;
  /** What is worth another attempt. */
  readonly transient: (error: unknown) => boolean;
  /** The call's name, for errors and the retry notice: `ec2:RunInstances`. */
  readonly what: string;
  readonly signal?: AbortSignal;
  /** Told before each pause; a logger's warn, typically. Errors are passed as they are: say only their message. */
  readonly onRetry?: (notice: { readonly what: string; readonly attempt: number; readonly delayMs: number; readonly error: unknown }) => void;
  /** Uniform in [0, 1); Math.random by default (tests fix it). */
  readonly random?: () => number;
}

/** An attempt ran out of time. */
export class CallTimeoutError extends Error {
  constructor(what: string, ms: number) {
    super(`${what}: no answer within ${ms} ms`);
    this.name = 'CallTimeoutError';
  }
}

/**
 * Runs `call` until it succeeds, fails for good, or the attempts are used
 * up (then the last error is thrown), with the shared backoff of
 * src/hosts/retry.ts. `call` gets a signal that aborts when the attempt
 * times out or the caller's signal aborts; it should pass it on to the SDK
 * so the request is really dropped.
 */
export function withRetry<T>(call: (signal: AbortSignal) => Promise<T>, options: CloudRetryOptions): Promise<T> {
  const { policy, signal } = options;
  return retry(() => attempt(call, options), {
    attempts: policy.attempts,
    baseDelayMs: policy.baseDelayMs,
    maxDelayMs: policy.maxDelayMs,
    retryable: (error) => error instanceof CallTimeoutError || options.transient(error),
    onRetry: (error, attempt, delayMs) => options.onRetry?.({ what: options.what, attempt, delayMs, error }),
    ...(signal === undefined ? {} : { signal }),
    ...(options.random === undefined ? {} : { random: options.random }),
  });
}

/** One attempt, abandoned (CallTimeoutError) after the policy's timeout. */
async function attempt<T>(call: (signal: AbortSignal) => Promise<T>, options: CloudRetryOptions): Promise<T> {
  const { policy, signal } = options;
  const controller = new AbortController();
  const abort = () => controller.abort(signal?.reason);
  signal?.addEventListener('abort', abort, { once: true });
  let timer: NodeJS.Timeout | undefined;
  try {
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const error = new CallTimeoutError(options.what, policy.timeoutMs);
        controller.abort(error);
        reject(error);
      }, policy.timeoutMs);
    });
    return await Promise.race([call(controller.signal), timedOut]);
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener('abort', abort);
  }
}

/**
 * A provider's API call: withRetry, with each retry logged (the error's
 * message only), and the final failure as a CloudError naming the call,
 * `refused` when the cloud said no for good (so the call had no effect).
 */
export function cloudCall<T>(what: string, call: (signal: AbortSignal) => Promise<T>, options: { readonly policy: RetryPolicy; readonly transient: (error: unknown) => boolean; readonly signal?: AbortSignal | undefined; readonly logger?: Logger | undefined }): Promise<T> {
  return withRetry(call, {
    what,
    policy: options.policy,
    transient: options.transient,
    ...(options.signal ? { signal: options.signal } : {}),
    onRetry: ({ attempt, delayMs, error }) => options.logger?.warn('cloud call failed; retrying', { call: what, attempt, delayMs, error: errorMessage(error) }),
  }).catch((error: unknown) => {
    if (options.signal?.aborted) throw error;
    throw new CloudError(`${what} failed: ${errorMessage(error)}`, { cause: error, refused: !(error instanceof CallTimeoutError) && !options.transient(error) });
  });
}
