/**
 * What the `aws` and `gce` hosts share: HTTP calls to an instance metadata
 * server (each with a timeout, transient failures retried with backoff), and
 * InstanceHost, which runs tasks on this machine like the `hardware` host
 * (it holds one) and adds the instance's identity and the watch for the
 * notice that the instance is being taken away.
 *
 * Metadata responses can hold secrets (user-data): nothing here logs a
 * response body or a request header.
 */
import type { Logger } from '../runtime/logger.js';
import { errorMessage } from '../model/errors.js';
import type { Host, HostBootOptions, HostIdentity } from './host.js';
import { HardwareHost } from './local.js';
import type { CrashJournal } from './journal.js';
import type { Transport } from './transport.js';
import { retry, type RetryOptions } from './retry.js';

/** The link-local address of both EC2's and Compute Engine's metadata servers. */
export const LINK_LOCAL_METADATA_URL = 'http://169.254.169.254';

export interface MetadataRequest {
  readonly method?: 'GET' | 'PUT';
  readonly headers?: Readonly<Record<string, string>>;
  /** The whole call, body included, must end within this. */
  readonly timeoutMs: number;
  readonly signal?: AbortSignal;
}

export interface MetadataResponse {
  readonly status: number;
  readonly headers: Headers;
  readonly body: string;
}

/** A metadata server answered with a status the caller cannot use. */
export class MetadataStatusError extends Error {
  readonly status: number;
  constructor(what: string, status: number) {
    super(`${what}: HTTP ${status}`);
    this.name = 'MetadataStatusError';
    this.status = status;
  }
}

/** A metadata call that did not answer in time. */
export class MetadataTimeoutError extends Error {
  constructor(what: string, timeoutMs: number) {
    super(`${what}: no answer within ${timeoutMs} ms`);
    this.name = 'MetadataTimeoutError';
  }
}

/** Worth another try: no answer, a broken connection, throttling (429) or a server error (5xx). */
export function isTransient(error: unknown): boolean {
  if (error instanceof MetadataStatusError) return error.status === 429 || error.status >= 500;
  return error instanceof MetadataTimeoutError || error instanceof TypeError; // fetch's network errors are TypeErrors
}

/** How metadata calls are retried unless a caller says otherwise: about 3 s in all. */
export const METADATA_RETRY: Pick<RetryOptions, 'attempts' | 'baseDelayMs' | 'maxDelayMs'> = { attempts: 5, baseDelayMs: 200, maxDelayMs: 2000 };

/**
 * One HTTP call with a timeout; 429 and 5xx answers are thrown as
 * MetadataStatusError, every other status is the caller's to read.
 */
export async function metadataFetch(url: string, request: MetadataRequest): Promise<MetadataResponse> {
  const method = request.method ?? 'GET';
  const what = `${method} ${url}`;
  const timeout = AbortSignal.timeout(request.timeoutMs);
  const signal = request.signal ? AbortSignal.any([request.signal, timeout]) : timeout;
  try {
    const response = await fetch(url, { method, headers: { ...request.headers }, signal, redirect: 'error' });
    const body = await response.text();
    if (response.status === 429 || response.status >= 500) throw new MetadataStatusError(what, response.status);
    return { status: response.status, headers: response.headers, body };
  } catch (error) {
    if (request.signal?.aborted) throw request.signal.reason;
    if (timeout.aborted) throw new MetadataTimeoutError(what, request.timeoutMs);
    if (error instanceof TypeError) throw new TypeError(`${what}: ${errorMessage(error.cause ?? error)}`, { cause: error });
    throw error;
  }
}

/** metadataFetch, retried with backoff while it fails transiently. */
export function metadataCall(url: string, request: MetadataRequest, options: { logger?: Logger; retry?: Partial<RetryOptions> } = {}): Promise<MetadataResponse> {
  return retry(() => metadataFetch(url, request), {
    ...METADATA_RETRY,
    retryable: isTransient,
    ...(request.signal ? { signal: request.signal } : {}),
    ...(options.logger ? { onRetry: (error: unknown, attempt: number) => options.logger!.debug('metadata call failed; retrying', { attempt, error: errorMessage(error) }) } : {}),
    ...options.retry,
  });
}

/** The instance is about to be taken away. */
export interface InterruptionNotice {
  /** Why, for the worker's log and exit message: `spot interruption: terminate at ...`. */
  readonly message: string;
  /** When the instance goes (epoch ms). */
  readonly goneAt: number;
}

/** One cloud's metadata server, as InstanceHost and the config need it. */
export interface InstanceMetadata {
  /** Its base URL, for messages. */
  readonly url: string;
  /** The settings document the instance was launched with, or undefined when it has none. */
  userConfig(signal: AbortSignal): Promise<InstanceConfig | undefined>;
  /** The instance's name and facts (id, type, zone, region). */
  identity(options: { readonly signal: AbortSignal; readonly logger: Logger }): Promise<HostIdentity>;
  /**
   * Watches for an interruption until `signal` is aborted, and calls `onNotice`
   * at most once. Resolves when it stops; never rejects (it logs and retries).
   */
  watch(options: { readonly signal: AbortSignal; readonly logger: Logger; readonly onNotice: (notice: InterruptionNotice) => void }): Promise<void>;
}

export interface InstanceHostOptions {
  /** The worker's work directory (task directories and the crash journal). */
  readonly workDir: string;
}

/** This machine, a cloud instance: HardwareHost's tasks, the instance's identity and its interruption notices. */
export class InstanceHost implements Host {
  readonly name: string;
  readonly #metadata: InstanceMetadata;
  readonly #hardware: HardwareHost;
  readonly #shutdown = new AbortController();
  /** Stops the watch (and any metadata call in flight) on dispose. */
  readonly #stop = new AbortController();
  #watching: Promise<void> | undefined;
  #deadline: number | undefined;

  constructor(name: string, metadata: InstanceMetadata, options: InstanceHostOptions) {
    this.name = name;
    this.#metadata = metadata;
    this.#hardware = new HardwareHost(options);
  }

  get shutdown(): AbortSignal {
    return this.#shutdown.signal;
  }

  get shutdownDeadline(): number | undefined {
    return this.#deadline;
  }

  get journal(): CrashJournal {
    return this.#hardware.journal;
  }

  async boot(options: HostBootOptions): Promise<HostIdentity> {
    const signal = AbortSignal.any([options.signal, this.#stop.signal]);
    const machine = await this.#hardware.boot(options);
    const instance = await this.#metadata.identity({ signal, logger: options.logger });
    this.#watching = this.#metadata.watch({
      signal: this.#stop.signal,
      logger: options.logger,
      onNotice: (notice) => {
        if (this.#shutdown.signal.aborted) return;
        options.logger.warn('the instance is being taken away; shutting down', { reason: notice.message, goneAt: new Date(notice.goneAt).toISOString() });
        this.#deadline = notice.goneAt;
        this.#shutdown.abort(notice.message);
      },
    });
    return { hostname: instance.hostname, facts: { ...machine.facts, ...instance.facts } };
  }

  transport(): Transport {
    return this.#hardware.transport();
  }

  async dispose(): Promise<void> {
    this.#stop.abort(new Error(`host ${this.name} disposed`));
    await this.#watching;
    await this.#hardware.dispose();
  }
}

/** A settings document (YAML or JSON) handed to the instance at launch, and where it came from, for messages. */
export interface InstanceConfig {
  readonly source: string;
  readonly text: string;
}
