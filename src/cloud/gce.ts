/**
 * The `gce` provider: Compute Engine instances through @google-cloud/compute
 * (REST transport), in one project and zone.
 *
 * Credentials are Google's application default credentials: the file in
 * GOOGLE_APPLICATION_CREDENTIALS, gcloud's, or the metadata server's on
 * GCE. With a service account key the client signs its own JWTs and asks
 * no token server; `scopes: []` keeps it so when `endpoint` points the
 * client elsewhere (the client would otherwise ask for OAuth scopes, and
 * trade the key for a token with Google first).
 *
 * An instance's name is derived from the launch token (`drover-` and 20
 * hex digits of its hash), and the insert carries a requestId from it too,
 * so a retried launch makes no second instance. Labels are drover's tags
 * as GCE allows them (provider.ts). Inserts and deletes wait for their
 * zone operation, so an operation that fails is seen as the call failing.
 * Once an insert was accepted, only its operation's own failure means that
 * no instance was made: any other failure after it (waiting for the
 * operation, reading the instance back) leaves the launch's outcome
 * unknown, never refused, whatever the failed call answered.
 * gax's own retries are off: withRetry does them.
 */
import { createHash } from 'node:crypto';
import type { protos } from '@google-cloud/compute';
// The two clients alone: the package's index loads all of its hundred-odd clients, which costs seconds per command.
import { InstancesClient } from '@google-cloud/compute/build/src/v1/instances_client.js';
import { ZoneOperationsClient } from '@google-cloud/compute/build/src/v1/zone_operations_client.js';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import { CloudError, OWNER_TAG, SESSION_TAG, SSH_PORT_TAG, labelValue, parseSshPort, pollUntilRunning, type CallOptions, type CloudInstance, type InstanceState, type LaunchSpec, type Provider } from './provider.js';
import { cloudCall, DEFAULT_RETRY, type RetryPolicy } from './retry.js';

type GceInstance = protos.google.cloud.compute.v1.IInstance;

/** A zone operation that ended with errors: the change it was for was not made (an insert made no instance). */
class OperationFailedError extends CloudError {}
type GceOperation = protos.google.cloud.compute.v1.IOperation;

export interface GceProviderOptions {
  /** Default: the credentials' project. */
  readonly project?: string;
  readonly zone: string;
  /** `http://127.0.0.1:8080` or `https://compute.example.com`; default Compute Engine's own. */
  readonly endpoint?: string;
  readonly retry?: RetryPolicy;
  readonly logger?: Logger;
}

// Errors come as HTTP statuses (gaxios' `status`, or `code`), or as gRPC codes from gax's own decoding.
const TRANSIENT_HTTP = new Set([429, 500, 502, 503, 504]);
const TRANSIENT_GRPC = new Set([4 /* DEADLINE_EXCEEDED */, 8 /* RESOURCE_EXHAUSTED */, 10 /* ABORTED */, 13 /* INTERNAL */, 14 /* UNAVAILABLE */]);
const NETWORK = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);

/** The HTTP status or gRPC code of an error from the client, or of its cause (CloudError). */
function statusOf(error: unknown): number | undefined {
  const e = error as { status?: unknown; code?: unknown; cause?: unknown } | null;
  if (e === null || typeof e !== 'object') return undefined;
  if (typeof e.status === 'number') return e.status;
  if (typeof e.code === 'number') return e.code;
  return e.cause !== undefined && e.cause !== error ? statusOf(e.cause) : undefined;
}

const isNotFound = (error: unknown) => statusOf(error) === 404 || statusOf(error) === 5;
const isAlreadyThere = (error: unknown) => statusOf(error) === 409 || statusOf(error) === 6;

/** Rate limits, 5xx answers, timeouts and dropped connections are worth another attempt. */
export function isTransientGceError(error: unknown): boolean {
  const e = error as { code?: unknown; message?: string; cause?: unknown };
  if (e === null || typeof e !== 'object') return false;
  const status = statusOf(error);
  if (status !== undefined && (status >= 100 ? TRANSIENT_HTTP.has(status) : TRANSIENT_GRPC.has(status))) return true;
  if (typeof e.code === 'string' && NETWORK.has(e.code)) return true;
  // GCE also answers 403 for rate limits (userRateLimitExceeded).
  if (/rateLimitExceeded/i.test(e.message ?? '')) return true;
  return e.cause !== undefined && e.cause !== error && isTransientGceError(e.cause);
}

const STATES: Record<string, InstanceState> = {
  PROVISIONING: 'pending', STAGING: 'pending', REPAIRING: 'pending', RUNNING: 'running',
  STOPPING: 'stopping', SUSPENDING: 'stopping', SUSPENDED: 'stopped', TERMINATED: 'stopped',
};

function toInstance(instance: GceInstance): CloudInstance {
  const tags: Record<string, string> = { ...(instance.labels ?? {}) };
  const nic = instance.networkInterfaces?.[0];
  const publicIp = nic?.accessConfigs?.find((config) => config.natIP)?.natIP;
  const sshPort = parseSshPort(tags[labelValue(SSH_PORT_TAG)]);
  const session = tags[labelValue(SESSION_TAG)];
  const owner = tags[labelValue(OWNER_TAG)];
  return {
    id: instance.name ?? '',
    state: STATES[instance.status ?? ''] ?? 'pending',
    ...(publicIp ? { publicIp } : {}),
    ...(nic?.networkIP ? { privateIp: nic.networkIP } : {}),
    tags,
    ...(session === undefined ? {} : { session }),
    ...(owner === undefined ? {} : { owner }),
    ...(sshPort === undefined ? {} : { sshPort }),
    ...(instance.creationTimestamp ? { launchedAt: new Date(instance.creationTimestamp) } : {}),
  };
}

/** A UUID (requestId) and an instance name, both derived from the launch token. */
function fromToken(token: string): { name: string; requestId: string } {
  const hash = createHash('sha256').update(token).digest('hex');
  return { name: `drover-${hash.slice(0, 20)}`, requestId: `${hash.slice(0, 8)}-${hash.slice(8, 12)}-4${hash.slice(13, 16)}-8${hash.slice(17, 20)}-${hash.slice(20, 32)}` };
}

export class GceProvider implements Provider {
  readonly name = 'gce' as const;
  readonly #instances: InstancesClient;
  readonly #operations: ZoneOperationsClient;
  readonly #zone: string;
  #project: string | undefined;
  readonly #retry: RetryPolicy;
  readonly #logger: Logger | undefined;

  constructor(options: GceProviderOptions) {
    const endpoint = options.endpoint === undefined ? undefined : new URL(options.endpoint);
    const clientOptions = endpoint === undefined ? {} : {
      apiEndpoint: endpoint.hostname,
      port: Number(endpoint.port || (endpoint.protocol === 'http:' ? 80 : 443)),
      protocol: endpoint.protocol.replace(/:$/, ''),
      scopes: [] as string[],
    };
    this.#instances = new InstancesClient({ fallback: true, ...clientOptions });
    this.#operations = new ZoneOperationsClient({ fallback: true, ...clientOptions });
    this.#zone = options.zone;
    this.#project = options.project;
    this.#retry = options.retry ?? DEFAULT_RETRY;
    this.#logger = options.logger;
  }

  get where(): string {
    return `${this.#project ?? '(default project)'}/${this.#zone}`;
  }

  /** The project (asked of the credentials once, when not given) and the zone. */
  async #place(options: CallOptions): Promise<{ project: string; zone: string }> {
    this.#project ??= await this.#call('getProjectId', () => this.#instances.getProjectId(), options);
    return { project: this.#project, zone: this.#zone };
  }

  /** gax's per-call options: our timeout, none of its retries. */
  get #gax() {
    return { timeout: this.#retry.timeoutMs, retry: { retryCodes: [] } };
  }

  #call<T>(what: string, call: () => Promise<T>, options: CallOptions): Promise<T> {
    return cloudCall(`compute:${what}`, call, { policy: this.#retry, transient: isTransientGceError, signal: options.signal, logger: this.#logger });
  }

  /** Waits for a zone operation to be DONE; rejects with its error when it failed. */
  async #settle(what: string, operation: GceOperation, options: CallOptions): Promise<void> {
    const place = await this.#place(options);
    let current = operation;
    for (let round = 0; current.status !== 'DONE'; round++) {
      if (round >= 1000) throw new CloudError(`compute:${what}: operation ${current.name ?? '?'} is still ${current.status ?? '?'}`);
      options.signal?.throwIfAborted();
      [current] = await this.#call('zoneOperations.wait', () => this.#operations.wait({ ...place, operation: current.name ?? '' }, this.#gax), options);
    }
    const errors = current.error?.errors ?? [];
    if (errors.length > 0) {
      const problem = errors.map((e) => `${e.code ?? '?'}: ${e.message ?? ''}`).join('; ');
      throw new OperationFailedError(`compute:${what}: operation ${current.name ?? '?'} failed: ${problem}`, { cause: Object.assign(new Error(problem), { code: errors[0]?.code }), refused: true });
    }
  }

  async launch(spec: LaunchSpec, options: CallOptions = {}): Promise<CloudInstance> {
    const place = await this.#place(options);
    const { name, requestId } = fromToken(spec.token);
    const labels: Record<string, string> = {};
    for (const [key, value] of Object.entries({ ...spec.tags, [SESSION_TAG]: spec.session, [OWNER_TAG]: spec.owner })) labels[labelValue(key)] = labelValue(value);
    const metadata = [
      ...(spec.key ? [{ key: 'ssh-keys', value: spec.key }] : []),
      ...(spec.userData ? [{ key: 'user-data', value: spec.userData }] : []),
    ];
    const resource: GceInstance = {
      name,
      machineType: `zones/${place.zone}/machineTypes/${spec.instanceType}`,
      labels,
      ...(metadata.length > 0 ? { metadata: { items: metadata } } : {}),
      disks: [{ boot: true, autoDelete: true, initializeParams: { sourceImage: spec.image } }],
      networkInterfaces: [{ network: spec.network ?? 'global/networks/default', accessConfigs: [{ name: 'External NAT', type: 'ONE_TO_ONE_NAT' }] }],
    };
    let accepted = false;
    try {
      const [operation] = await this.#call('instances.insert', () => this.#instances.insert({ ...place, requestId, instanceResource: resource }, this.#gax), options);
      accepted = true;
      await this.#settle('instances.insert', (operation as { latestResponse: GceOperation }).latestResponse, options);
    } catch (error) {
      // A 409: an earlier attempt of this very launch made it, it is the instance asked for.
      if (!isAlreadyThere(error)) {
        // Refused before it was accepted, or its operation failed: no instance was made.
        if (!accepted || error instanceof OperationFailedError) throw error;
        throw this.#madeMaybe(name, error, options);
      }
    }
    let instance: CloudInstance | undefined;
    try {
      instance = await this.describe(name, options);
    } catch (error) {
      throw this.#madeMaybe(name, error, options);
    }
    if (instance === undefined) throw new CloudError(`compute:instances.insert: instance ${name} was created, then could not be found`);
    return instance;
  }

  /**
   * A failure after instances.insert was accepted: the instance may exist
   * (or be on its way), so it is no refusal, whatever the call that failed
   * (a 403 on zoneOperations.wait, say) answered; the error names it.
   */
  #madeMaybe(name: string, error: unknown, options: CallOptions): unknown {
    if (options.signal?.aborted) return error;
    return new CloudError(`compute:instances.insert: instance ${name} was accepted, then ${errorMessage(error)}; it may exist`, { cause: error, refused: false });
  }

  async describe(id: string, options: CallOptions = {}): Promise<CloudInstance | undefined> {
    const place = await this.#place(options);
    try {
      const [instance] = await this.#call('instances.get', () => this.#instances.get({ ...place, instance: id }, this.#gax), options);
      return toInstance(instance);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw error;
    }
  }

  waitUntilRunning(id: string, options: CallOptions & { readonly pollMs?: number }): Promise<CloudInstance> {
    return pollUntilRunning(this, id, options);
  }

  async terminate(id: string, options: CallOptions = {}): Promise<void> {
    const place = await this.#place(options);
    try {
      const [operation] = await this.#call('instances.delete', () => this.#instances.delete({ ...place, instance: id }, this.#gax), options);
      await this.#settle('instances.delete', (operation as { latestResponse: GceOperation }).latestResponse, options);
    } catch (error) {
      if (isNotFound(error)) return;
      throw error;
    }
  }

  async list(options: CallOptions & { readonly session?: string } = {}): Promise<CloudInstance[]> {
    const place = await this.#place(options);
    const key = labelValue(SESSION_TAG);
    const filter = options.session === undefined ? `labels.${key}:*` : `labels.${key} = "${labelValue(options.session)}"`;
    const found: CloudInstance[] = [];
    let pageToken: string | undefined;
    for (let page = 0; page < 1000; page++) {
      const token = pageToken;
      const [items, , response] = await this.#call('instances.list', () => this.#instances.list({ ...place, filter, maxResults: 500, ...(token ? { pageToken: token } : {}) }, { ...this.#gax, autoPaginate: false }), options);
      for (const item of items) found.push(toInstance(item));
      pageToken = (response as { nextPageToken?: string } | undefined)?.nextPageToken ?? undefined;
      if (!pageToken) break;
    }
    return found;
  }

  close(): void {
    void this.#instances.close().catch(() => {});
    void this.#operations.close().catch(() => {});
  }
}
