/**
 * What the PostgreSQL queue needs to know about connections: how to read a
 * queue URL (and show it without its password), which errors mean "the
 * server could not be reached" (so callers retry: QueueUnavailableError)
 * rather than "the request was wrong", and a retry loop with backoff for
 * writes that must not be lost.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { ConfigError, QueueUnavailableError, errorMessage } from '../model/errors.js';

/** The schema drover's tables live in unless the URL or options say otherwise. */
export const DEFAULT_SCHEMA = 'drover';

export interface QueueUrl {
  /** What `pg` connects with: the URL without drover's own parameters. */
  readonly connectionString: string;
  /** The URL with its password masked, for messages and logs. */
  readonly display: string;
  /** `?schema=NAME` in the URL, if given. */
  readonly schema?: string;
}

/** Reads `postgres://user[:password]@host[:port]/database[?schema=NAME]`; a ConfigError names what is wrong. */
export function parseQueueUrl(url: string): QueueUrl {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new ConfigError(`queue URL ${JSON.stringify(maskPassword(url))} is not a URL; expected postgres://USER@HOST:PORT/DATABASE`);
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    throw new ConfigError(`queue URL "${maskPassword(url)}" must start with postgres:// or postgresql://, not ${parsed.protocol}//`);
  }
  if (parsed.hostname === '' && !parsed.searchParams.has('host')) {
    throw new ConfigError(`queue URL "${maskPassword(url)}" names no host; expected postgres://USER@HOST:PORT/DATABASE`);
  }
  const schema = parsed.searchParams.get('schema') ?? undefined;
  parsed.searchParams.delete('schema');
  if (schema !== undefined) checkSchemaName(schema, `queue URL "${maskPassword(url)}"`);
  const connectionString = parsed.toString();
  return { connectionString, display: maskPassword(connectionString), ...(schema === undefined ? {} : { schema }) };
}

/**
 * Schema names go into SQL identifiers and NOTIFY channel names (at most 63
 * bytes with a suffix), so they are kept to plain lower-case words.
 */
export function checkSchemaName(schema: string, where: string): void {
  if (!/^[a-z_][a-z0-9_]{0,47}$/.test(schema)) {
    throw new ConfigError(`${where}: schema ${JSON.stringify(schema)} must be 1 to 48 lower-case letters, digits or _, starting with a letter or _`);
  }
}

function maskPassword(url: string): string {
  return url.replace(/^(postgres(?:ql)?:\/\/[^:/@]*:)[^@/]*@/, '$1***@');
}

const CONNECTION_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNABORTED',
  '57P01', // admin_shutdown: the server is restarting or stopping
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now: the server is starting up
  '53300', // too_many_connections
  '40001', // serialization_failure: try again
  '40P01', // deadlock_detected: try again
]);

/**
 * True when `error` says the server could not be reached or the connection
 * broke, so the same request may well succeed later. Class 08 is SQL's
 * "connection exception"; pg's own messages cover a socket closed under it.
 */
export function isTransient(error: unknown): boolean {
  if (error instanceof QueueUnavailableError) return true;
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && (CONNECTION_CODES.has(code) || code.startsWith('08'))) return true;
  const message = errorMessage(error);
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|Client has encountered a connection error|Query read timeout|not queryable|Client was closed/i.test(message);
}

/** Errors that no retry will fix at start-up: a wrong password, user or database. */
export function isConfigProblem(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('28') || code === '3D000' || code === 'ENOTFOUND');
}

/** Turns a transient failure into QueueUnavailableError (callers retry those); other errors pass through. */
export function asQueueError(error: unknown, url: QueueUrl): unknown {
  if (error instanceof QueueUnavailableError || !isTransient(error)) return error;
  return new QueueUnavailableError(`PostgreSQL queue at ${url.display}: ${errorMessage(error) || (error as { code?: string }).code || 'connection failed'}`, { cause: error });
}

export interface RetryOptions {
  /** Give up (rethrow the last error) after this long. */
  readonly forMs: number;
  readonly signal?: AbortSignal;
  /** Told of each failure before the pause; for logging. */
  readonly onRetry?: (error: unknown, attempt: number) => void;
}

/** Runs `fn` until it succeeds, retrying transient failures with a growing pause (100 ms .. 2 s). */
export async function retryTransient<T>(fn: () => Promise<T>, { forMs, signal, onRetry }: RetryOptions): Promise<T> {
  const giveUpAt = performance.now() + forMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      if (!isTransient(error) || performance.now() >= giveUpAt || signal?.aborted) throw error;
      onRetry?.(error, attempt);
      await sleep(Math.min(2_000, 100 * 2 ** attempt), undefined, signal ? { signal } : {}).catch(() => undefined);
    }
  }
}

/** pg returns bigint columns as strings; drover's bigints are milliseconds and sizes, which fit a double. */
export const pgTypes = {
  getTypeParser(oid: number, format?: 'text' | 'binary') {
    if (oid === pg.types.builtins.INT8 && format !== 'binary') return (value: string) => Number(value);
    return pg.types.getTypeParser(oid, format as 'text');
  },
} as unknown as pg.CustomTypesConfig;

/** Quotes an identifier that checkSchemaName already allowed. */
export function ident(name: string): string {
  return `"${name}"`;
}
