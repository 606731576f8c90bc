/**
 * What the loopback EC2 and Compute Engine endpoints share (ec2-endpoint.ts,
 * compute-endpoint.ts): a small fake cloud of instances whose state follows
 * a clock, the faults a test can inject, the log of calls, and the HTTP
 * server on 127.0.0.1. The endpoints translate their wire protocol to it.
 *
 * An instance is `pending` for `bootMs` after its launch, then `running`
 * (unless a neverStart fault holds it pending for ever); a terminate makes
 * it `shutting-down` for `shutdownMs`, then `terminated`. Time is read from
 * `clock` (Date.now by default), when asked: no timers run.
 *
 * Each launched instance gets `publicIp` (127.0.0.1 by default) as its
 * public address and, when the test gave `sshPorts`, the next of them as
 * its `drover:ssh-port` tag (label), so that a loopback sshd stands in for
 * each instance while drover reads the address as it would a real one.
 */
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export type FakeInstanceState = 'pending' | 'running' | 'shutting-down' | 'terminated';

export interface FakeInstance {
  readonly id: string;
  readonly image: string;
  readonly instanceType: string;
  readonly network?: string;
  readonly key?: string;
  readonly userData?: string;
  readonly tags: Map<string, string>;
  readonly launchedAt: number;
  /** When it runs; undefined: never (a neverStart fault). */
  readonly runningAt: number | undefined;
  terminatedAt?: number;
  readonly publicIp: string;
  readonly privateIp: string;
  /** The idempotency token it was launched with. */
  readonly token?: string;
}

export interface FakeCloudOptions {
  /** How long an instance is pending; default 50 ms. */
  readonly bootMs?: number;
  /** How long it is shutting down after a terminate; default 50 ms. */
  readonly shutdownMs?: number;
  readonly clock?: () => number;
  /** The public address of every instance; default 127.0.0.1. */
  readonly publicIp?: string;
  /** Given to the launched instances in order, as their ssh-port tag; then none. */
  readonly sshPorts?: readonly number[];
}

/** One call the endpoint answered, in order. */
export interface CallRecord {
  /** `RunInstances`, `instances.insert`, ... */
  readonly action: string;
  readonly at: number;
  /** The error code it answered with, if it failed. */
  readonly error?: string;
}

type FaultKind = 'throttle' | 'neverStart' | 'failTerminate' | 'slow' | 'refuse';
interface Fault {
  readonly kind: FaultKind;
  remaining: number;
  readonly action?: string;
  readonly code?: string;
  readonly ms?: number;
}

/** Faults a test injects; each is used up by the calls (launches) it hits. */
export class CloudFaults {
  readonly #faults: Fault[] = [];

  /** The next `count` calls (of `action`, or any) answer as throttled: EC2 RequestLimitExceeded, GCE 429 rateLimitExceeded. */
  throttle(count: number, options: { readonly action?: string } = {}): this {
    this.#faults.push({ kind: 'throttle', remaining: count, ...options });
    return this;
  }

  /** The next `count` launched instances stay pending for ever. */
  neverStart(count = 1): this {
    this.#faults.push({ kind: 'neverStart', remaining: count });
    return this;
  }

  /**
   * The next `count` terminate calls fail with `code`: an EC2 error code
   * (default InternalError, HTTP 500) or, on GCE, an HTTP status (default 500).
   */
  failTerminate(count: number, options: { readonly code?: string } = {}): this {
    this.#faults.push({ kind: 'failTerminate', remaining: count, ...options });
    return this;
  }

  /**
   * The next `count` calls of `action` are refused for good, as a missing
   * permission is: EC2 answers `code` (default UnauthorizedOperation, HTTP
   * 403); GCE the HTTP status `code` (default 403, forbidden).
   */
  refuse(count: number, options: { readonly action: string; readonly code?: string }): this {
    this.#faults.push({ kind: 'refuse', remaining: count, ...options });
    return this;
  }

  /** The next `count` calls (of `action`, or any) answer only after `ms`. */
  slow(ms: number, options: { readonly action?: string; readonly count?: number } = {}): this {
    this.#faults.push({ kind: 'slow', remaining: options.count ?? Number.POSITIVE_INFINITY, ms, ...(options.action === undefined ? {} : { action: options.action }) });
    return this;
  }

  /** Drops every fault not used up yet. */
  clear(): void {
    this.#faults.length = 0;
  }

  /** Uses up one fault of `kind` that applies to `action`; undefined when none does. */
  take(kind: FaultKind, action?: string): Fault | undefined {
    const fault = this.#faults.find((f) => f.kind === kind && f.remaining > 0 && (f.action === undefined || f.action === action));
    if (fault !== undefined) fault.remaining--;
    return fault;
  }
}

export class FakeCloud {
  readonly faults = new CloudFaults();
  readonly calls: CallRecord[] = [];
  readonly #arrived = new Map<string, number>();
  readonly #instances = new Map<string, FakeInstance>();
  readonly #options: FakeCloudOptions;
  readonly #sshPorts: number[];
  #launched = 0;

  constructor(options: FakeCloudOptions = {}) {
    this.#options = options;
    this.#sshPorts = [...(options.sshPorts ?? [])];
  }

  now(): number {
    return (this.#options.clock ?? Date.now)();
  }

  stateOf(instance: FakeInstance): FakeInstanceState {
    const now = this.now();
    if (instance.terminatedAt !== undefined) return now >= instance.terminatedAt + (this.#options.shutdownMs ?? 50) ? 'terminated' : 'shutting-down';
    return instance.runningAt !== undefined && now >= instance.runningAt ? 'running' : 'pending';
  }

  /** Every instance ever launched, in launch order. */
  all(): FakeInstance[] {
    return [...this.#instances.values()];
  }

  get(id: string): FakeInstance | undefined {
    return this.#instances.get(id);
  }

  /** The instances not terminated yet (shutting-down ones included). */
  alive(): FakeInstance[] {
    return this.all().filter((instance) => this.stateOf(instance) !== 'terminated');
  }

  launch(id: string, spec: { image: string; instanceType: string; network?: string; key?: string; userData?: string; tags: Map<string, string>; token?: string }, sshPortTag: string): FakeInstance {
    const now = this.now();
    const neverStarts = this.faults.take('neverStart') !== undefined;
    const port = this.#sshPorts.shift();
    const tags = new Map(spec.tags);
    if (port !== undefined) tags.set(sshPortTag, String(port));
    this.#launched++;
    const instance: FakeInstance = {
      ...spec,
      id,
      tags,
      launchedAt: now,
      runningAt: neverStarts ? undefined : now + (this.#options.bootMs ?? 50),
      publicIp: this.#options.publicIp ?? '127.0.0.1',
      privateIp: `10.0.${Math.floor(this.#launched / 250)}.${(this.#launched % 250) + 1}`,
    };
    this.#instances.set(id, instance);
    return instance;
  }

  /** Starts shutting it down (a second terminate changes nothing). */
  terminate(instance: FakeInstance): void {
    instance.terminatedAt ??= this.now();
  }

  /** Counts a call as arrived, and waits when a slow fault applies to it. */
  async enter(action: string): Promise<void> {
    this.#arrived.set(action, (this.#arrived.get(action) ?? 0) + 1);
    const slow = this.faults.take('slow', action);
    if (slow?.ms !== undefined) await sleep(slow.ms);
  }

  record(action: string, error?: string): void {
    this.calls.push({ action, at: this.now(), ...(error === undefined ? {} : { error }) });
  }

  /** How many calls of `action` were answered (failed ones included). */
  count(action: string): number {
    return this.calls.filter((call) => call.action === action).length;
  }

  /** How many calls of `action` reached the endpoint, answered or not yet (a slow fault may hold them). */
  arrived(action: string): number {
    return this.#arrived.get(action) ?? 0;
  }
}

/** What both endpoints give a test. */
export interface CloudEndpoint {
  /** `http://127.0.0.1:PORT`: the client's endpoint. */
  readonly url: string;
  readonly port: number;
  readonly faults: CloudFaults;
  /** Every call answered, in order. */
  readonly calls: readonly CallRecord[];
  /** How many calls of this action (`RunInstances`, `instances.insert`, ...) were answered, failed ones included. */
  count(action: string): number;
  /**
   * How many calls of this action reached the endpoint, answered or not:
   * a call a slow fault holds counts here at once, and in count() once it
   * is answered. A test waits on it to know that a client has got as far
   * as sending that call.
   */
  arrived(action: string): number;
  /** Instances not yet terminated (deleted). */
  alive(): FakeInstance[];
  close(): Promise<void>;
}

export function cloudEndpoint(cloud: FakeCloud, server: Server, port: number): CloudEndpoint {
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    faults: cloud.faults,
    calls: cloud.calls,
    count: (action) => cloud.count(action),
    arrived: (action) => cloud.arrived(action),
    alive: () => cloud.alive(),
    close: () => closeServer(server),
  };
}

/** An HTTP server on 127.0.0.1 (port 0: a free one) that hands each request with its body to `handle`. */
export async function serveLoopback(handle: (request: IncomingMessage, body: string, response: ServerResponse) => Promise<void>, port = 0): Promise<{ server: Server; port: number }> {
  const server = createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on('data', (chunk: Buffer) => chunks.push(chunk));
    request.on('end', () => {
      handle(request, Buffer.concat(chunks).toString('utf8'), response).catch((error: unknown) => {
        if (!response.headersSent) response.writeHead(500, { 'content-type': 'text/plain' });
        response.end(String(error));
      });
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('the endpoint has no port');
  return { server, port: address.port };
}

/** Closes the server and every connection still open (keep-alive ones included). */
export function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/**
 * Environment variables that give the AWS and Google SDKs throw-away
 * credentials and keep their default chains from looking anywhere else
 * (no profile files, no instance metadata): an access key pair for AWS,
 * and for Google a service account key file, written into `dir`, with a
 * fresh RSA key (the client signs its own JWTs with it; no token server is
 * asked). Merge them into process.env, or a child's environment.
 */
export function dummyCloudCredentials(dir: string): Record<string, string> {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048, privateKeyEncoding: { type: 'pkcs8', format: 'pem' }, publicKeyEncoding: { type: 'spki', format: 'pem' } });
  const keyFile = join(dir, 'gce-service-account.json');
  writeFileSync(keyFile, JSON.stringify({
    type: 'service_account',
    project_id: 'drover-test',
    private_key_id: randomBytes(20).toString('hex'),
    private_key: privateKey,
    client_email: 'drover-test@drover-test.iam.gserviceaccount.com',
    client_id: '100000000000000000000',
  }), { mode: 0o600 });
  return {
    AWS_ACCESS_KEY_ID: 'AKIADROVERTEST000000',
    AWS_SECRET_ACCESS_KEY: `drover-test-secret-${randomBytes(12).toString('hex')}`,
    AWS_REGION: 'us-east-1',
    AWS_EC2_METADATA_DISABLED: 'true',
    AWS_CONFIG_FILE: join(dir, 'no-aws-config'),
    AWS_SHARED_CREDENTIALS_FILE: join(dir, 'no-aws-credentials'),
    GOOGLE_APPLICATION_CREDENTIALS: keyFile,
    GOOGLE_CLOUD_PROJECT: 'drover-test',
  };
}
