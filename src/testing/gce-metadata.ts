/**
 * A Compute Engine metadata server on a loopback port, for tests of
 * drover's `gce` host and of your own configurations:
 *
 *   const metadata = await startGceMetadata({ attributes: { 'drover-config': 'capacity: 2\n' } });
 *   // drover worker --host gce --metadata-url <metadata.url>
 *   metadata.preempt();
 *
 * The wire protocol is Compute Engine's: every request needs
 * `Metadata-Flavor: Google` (403 without it, or with `X-Forwarded-For`);
 * answers carry `Metadata-Flavor: Google` and an `ETag`. Under
 * `/computeMetadata/v1/instance/`: `id`, `name`, `zone`, `machine-type`,
 * `hostname`, `attributes/` (a listing, or JSON with `?recursive=true`),
 * `attributes/KEY`, `preempted` (`FALSE`, `TRUE`) and `maintenance-event`
 * (`NONE`, `MIGRATE_ON_HOST_MAINTENANCE`, `TERMINATE_ON_HOST_MAINTENANCE`).
 * `?wait_for_change=true` hangs until the value changes, and answers at once
 * when `last_etag` is not the current ETag; `timeout_sec` bounds the wait
 * (then the unchanged value is answered).
 *
 * Faults: preemption, a maintenance event, failing and slow answers.
 */
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { startLoopbackServer } from './metadata-server.js';

export interface GceMetadataServerOptions {
  readonly id?: string;
  readonly name?: string;
  /** The zone's name: `us-central1-a`. */
  readonly zone?: string;
  readonly machineType?: string;
  readonly projectId?: string;
  readonly projectNumber?: string;
  /** Custom metadata of the instance (`instance/attributes/KEY`). */
  readonly attributes?: Readonly<Record<string, string>>;
}

export interface GceMetadataRequest {
  readonly path: string;
  readonly waitForChange: boolean;
  readonly status: number;
}

export type MaintenanceEvent = 'NONE' | 'MIGRATE_ON_HOST_MAINTENANCE' | 'TERMINATE_ON_HOST_MAINTENANCE';

export interface TestGceMetadata {
  /** `http://127.0.0.1:PORT`: the base URL to give as the metadata URL. */
  readonly url: string;
  /** Every answered request so far, in order. */
  readonly requests: readonly GceMetadataRequest[];
  /** How many `wait_for_change` requests are hanging now. */
  hanging(): number;
  /** `instance/preempted` becomes TRUE (waiting requests answer). */
  preempt(): void;
  /** `instance/maintenance-event` takes this value. */
  maintenanceEvent(event: MaintenanceEvent): void;
  /** Sets (or with undefined, removes) a custom attribute. */
  setAttribute(key: string, value: string | undefined): void;
  /** The next `count` requests (hanging ones included) answer `status` (default 503). */
  failRequests(count: number, status?: number): void;
  /** Every answer waits this long first (0: none). */
  setDelay(ms: number): void;
  close(): Promise<void>;
}

const PREFIX = '/computeMetadata/v1/';

function etagOf(value: string): string {
  return createHash('sha256').update(value).digest('hex').slice(0, 16);
}

export async function startGceMetadata(options: GceMetadataServerOptions = {}): Promise<TestGceMetadata> {
  const projectNumber = options.projectNumber ?? '123456789012';
  const projectId = options.projectId ?? 'test-project';
  const zone = options.zone ?? 'us-central1-a';
  const name = options.name ?? 'drover-test-1';
  const values = new Map<string, string>([
    ['instance/id', options.id ?? '4520031799277581759'],
    ['instance/name', name],
    ['instance/zone', `projects/${projectNumber}/zones/${zone}`],
    ['instance/machine-type', `projects/${projectNumber}/machineTypes/${options.machineType ?? 'e2-standard-4'}`],
    ['instance/hostname', `${name}.${zone}.c.${projectId}.internal`],
    ['instance/preempted', 'FALSE'],
    ['instance/maintenance-event', 'NONE'],
    ['project/project-id', projectId],
    ['project/numeric-project-id', projectNumber],
  ]);
  for (const [key, value] of Object.entries(options.attributes ?? {})) values.set(`instance/attributes/${key}`, value);
  /** Hanging requests, by path: each is called when its value changes (or the server fails them). */
  const waiters = new Map<string, Set<() => void>>();
  const requests: GceMetadataRequest[] = [];
  let failures = 0;
  let failureStatus = 503;

  const set = (key: string, value: string | undefined) => {
    if (values.get(key) === value) return;
    if (value === undefined) values.delete(key);
    else values.set(key, value);
    // Requests waiting on this value, or on a directory that holds it.
    for (const [path, pending] of waiters) {
      if (path === key || key.startsWith(path === '' || path.endsWith('/') ? path : `${path}/`)) for (const wake of [...pending]) wake();
    }
  };

  /** The value at a path: a leaf, or a directory's listing (or JSON, recursively). */
  const read = (key: string, recursive: boolean): { body: string; json: boolean } | undefined => {
    if (!key.endsWith('/') && !(recursive && key !== '')) return values.has(key) ? { body: values.get(key)!, json: false } : undefined;
    const dir = key === '' || key.endsWith('/') ? key : `${key}/`;
    const under = [...values.keys()].filter((k) => k.startsWith(dir));
    if (under.length === 0) return undefined;
    if (recursive) {
      const tree: Record<string, unknown> = {};
      for (const k of under) {
        const parts = k.slice(dir.length).split('/');
        let node = tree;
        for (const part of parts.slice(0, -1)) node = (node[part] ??= {}) as Record<string, unknown>;
        node[parts.at(-1)!] = values.get(k);
      }
      return { body: JSON.stringify(tree), json: true };
    }
    const entries = new Set(under.map((k) => {
      const rest = k.slice(dir.length);
      return rest.includes('/') ? rest.slice(0, rest.indexOf('/') + 1) : rest;
    }));
    return { body: [...entries].join('\n') + '\n', json: false };
  };

  const handle = (request: IncomingMessage, response: ServerResponse) => {
    const url = new URL(request.url ?? '/', 'http://metadata');
    const waitForChange = url.searchParams.get('wait_for_change') === 'true';
    const finish = (status: number, body: string, headers: Record<string, string> = {}) => {
      requests.push({ path: url.pathname, waitForChange, status });
      response.writeHead(status, { 'Metadata-Flavor': 'Google', 'Content-Type': 'application/text', ...headers });
      response.end(body);
    };
    if (request.headers['metadata-flavor'] !== 'Google' || request.headers['x-forwarded-for'] !== undefined) {
      return finish(403, 'Missing required header: Metadata-Flavor\n', { 'Content-Type': 'text/html' });
    }
    if (failures > 0) {
      failures--;
      return finish(failureStatus, 'Service unavailable\n');
    }
    if (request.method !== 'GET') return finish(405, 'Method not allowed\n');
    if (!url.pathname.startsWith(PREFIX)) return finish(404, 'Not found\n');
    const key = url.pathname.slice(PREFIX.length);
    const recursive = url.searchParams.get('recursive') === 'true';
    const reply = () => {
      const value = read(key, recursive);
      if (value === undefined) return finish(404, 'Not found\n');
      finish(200, value.body, { ETag: etagOf(value.body), ...(value.json ? { 'Content-Type': 'application/json' } : {}) });
    };
    const current = read(key, recursive);
    if (!waitForChange || current === undefined) return reply();
    const lastEtag = url.searchParams.get('last_etag');
    if (lastEtag !== null && lastEtag !== etagOf(current.body)) return reply();
    // Hang until the value changes, the wait times out, or the client leaves.
    const timeoutSec = Number(url.searchParams.get('timeout_sec') ?? NaN);
    const pending = waiters.get(key) ?? new Set<() => void>();
    waiters.set(key, pending);
    let timer: NodeJS.Timeout | undefined;
    const done = () => {
      pending.delete(wake);
      clearTimeout(timer);
    };
    const wake = () => {
      done();
      // A failure injected meanwhile fails the hanging request too.
      if (failures > 0) {
        failures--;
        return finish(failureStatus, 'Service unavailable\n');
      }
      reply();
    };
    pending.add(wake);
    if (Number.isFinite(timeoutSec) && timeoutSec > 0) timer = setTimeout(wake, timeoutSec * 1000);
    response.once('close', done);
  };

  const server = await startLoopbackServer(handle);
  return {
    url: server.url,
    requests,
    hanging: () => [...waiters.values()].reduce((sum, pending) => sum + pending.size, 0),
    preempt: () => set('instance/preempted', 'TRUE'),
    maintenanceEvent: (event) => set('instance/maintenance-event', event),
    setAttribute: (key, value) => set(`instance/attributes/${key}`, value),
    failRequests(count, status = 503) {
      failures = count;
      failureStatus = status;
    },
    setDelay: server.setDelay,
    close() {
      for (const pending of waiters.values()) pending.clear();
      return server.close();
    },
  };
}
