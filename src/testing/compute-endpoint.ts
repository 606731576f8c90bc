/**
 * A loopback Compute Engine endpoint that speaks the Compute REST API v1 as
 * Google does: JSON resources under `/compute/v1/projects/P/zones/Z/...`,
 * zone operations, errors as `{ error: { code, message, errors: [{ reason }] } }`.
 * Point the real client at it (REST transport):
 *
 *     const gce = await startComputeEndpoint({ sshPorts: [sshd.port] });
 *     new InstancesClient({ fallback: true, apiEndpoint: '127.0.0.1', port: gce.port, protocol: 'http', scopes: [] })
 *
 * Methods: instances insert (requestId idempotency; a taken name is 409),
 * get, delete, list (filter on `labels.KEY:*`, `labels.KEY = "VALUE"`,
 * `status = S`, `name = N`, joined by AND or spaces; maxResults/pageToken);
 * zoneOperations get and wait. Requests must carry a Bearer token. An
 * instance is PROVISIONING, then RUNNING; deleting makes it STOPPING, then
 * it is gone (404). Operations are DONE `operationMs` after they start.
 * Faults: see cloud-endpoint.ts (a throttled call is 429 rateLimitExceeded;
 * failTerminate's code is an HTTP status, default 500; refuse's, default 403).
 */
import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { cloudEndpoint, FakeCloud, serveLoopback, type CloudEndpoint, type FakeCloudOptions, type FakeInstance, type FakeInstanceState } from './cloud-endpoint.js';

export interface ComputeEndpointOptions extends FakeCloudOptions {
  /** How long an operation runs before it is DONE; default 20 ms. */
  readonly operationMs?: number;
}

export interface ComputeEndpoint extends CloudEndpoint {
  /** The instances inserted so far (deleted ones too), with their state now. */
  instances(): (FakeInstance & { readonly state: FakeInstanceState; readonly project: string; readonly zone: string })[];
}

class ComputeFailure extends Error {
  constructor(readonly status: number, readonly reason: string, message: string) {
    super(message);
  }
}

const GRPC_STATUS: Record<number, string> = { 400: 'INVALID_ARGUMENT', 401: 'UNAUTHENTICATED', 403: 'PERMISSION_DENIED', 404: 'NOT_FOUND', 409: 'ALREADY_EXISTS', 429: 'RESOURCE_EXHAUSTED', 500: 'INTERNAL', 503: 'UNAVAILABLE' };
const STATUS: Record<FakeInstanceState, string> = { pending: 'PROVISIONING', running: 'RUNNING', 'shutting-down': 'STOPPING', terminated: 'TERMINATED' };

interface Operation {
  readonly id: string;
  readonly name: string;
  readonly project: string;
  readonly zone: string;
  readonly operationType: string;
  readonly target: string;
  readonly started: number;
  readonly requestId?: string;
}

type Term = (instance: FakeInstance) => boolean;

/** The filter subset drover and most tools use. */
function parseFilter(filter: string, stateOf: (instance: FakeInstance) => FakeInstanceState): Term {
  const terms: Term[] = [];
  const pattern = /([\w.-]+)\s*(=|!=|:)\s*("([^"]*)"|[^\s"()]+)/g;
  // What no term matched must be only spaces, parentheses and ANDs.
  if (filter.replace(pattern, ' ').replace(/\bAND\b|[()\s]/g, '') !== '') throw new ComputeFailure(400, 'invalid', `Invalid value for field 'filter': '${filter}'.`);
  for (const match of filter.matchAll(pattern)) {
    const [, field, op, raw, quoted] = match;
    const value = quoted ?? raw!;
    const get = (instance: FakeInstance): string | undefined => {
      if (field!.startsWith('labels.')) return instance.tags.get(field!.slice('labels.'.length));
      if (field === 'status') return STATUS[stateOf(instance)];
      if (field === 'name') return instance.id;
      throw new ComputeFailure(400, 'invalid', `Invalid value for field 'filter': '${filter}'. Unsupported field ${field!}.`);
    };
    if (op === ':') terms.push((instance) => (value === '*' ? get(instance) !== undefined : get(instance) === value));
    else if (op === '=') terms.push((instance) => get(instance) === value);
    else terms.push((instance) => get(instance) !== value);
  }
  return (instance) => terms.every((term) => term(instance));
}

export async function startComputeEndpoint(options: ComputeEndpointOptions = {}): Promise<ComputeEndpoint> {
  const cloud = new FakeCloud(options);
  const operationMs = options.operationMs ?? 20;
  const places = new Map<string, { project: string; zone: string; numericId: string; machineType: string; network: string }>();
  const operations = new Map<string, Operation>();
  const byRequestId = new Map<string, Operation>();

  const base = (project: string, zone: string) => `https://www.googleapis.com/compute/v1/projects/${project}/zones/${zone}`;
  /** A deleted instance is gone once it is terminated. */
  const visible = (instance: FakeInstance) => cloud.stateOf(instance) !== 'terminated';
  const find = (project: string, zone: string, name: string): FakeInstance => {
    const instance = cloud.get(name);
    const place = places.get(name);
    if (instance === undefined || !visible(instance) || place?.project !== project || place.zone !== zone) {
      throw new ComputeFailure(404, 'notFound', `The resource 'projects/${project}/zones/${zone}/instances/${name}' was not found`);
    }
    return instance;
  };
  const instanceJson = (instance: FakeInstance) => {
    const place = places.get(instance.id)!;
    const state = cloud.stateOf(instance);
    return {
      kind: 'compute#instance',
      id: place.numericId,
      creationTimestamp: new Date(instance.launchedAt).toISOString(),
      name: instance.id,
      machineType: place.machineType,
      status: STATUS[state],
      zone: base(place.project, place.zone),
      labels: Object.fromEntries(instance.tags),
      metadata: { kind: 'compute#metadata', items: instance.userData === undefined ? [] : [{ key: 'user-data', value: instance.userData }] },
      networkInterfaces: [{
        kind: 'compute#networkInterface',
        network: place.network,
        networkIP: instance.privateIp,
        name: 'nic0',
        accessConfigs: [{ kind: 'compute#accessConfig', type: 'ONE_TO_ONE_NAT', name: 'External NAT', ...(state === 'running' ? { natIP: instance.publicIp } : {}) }],
      }],
      selfLink: `${base(place.project, place.zone)}/instances/${instance.id}`,
    };
  };
  const operationJson = (operation: Operation) => {
    const done = cloud.now() >= operation.started + operationMs;
    return {
      kind: 'compute#operation',
      id: operation.id,
      name: operation.name,
      zone: base(operation.project, operation.zone),
      operationType: operation.operationType,
      targetLink: `${base(operation.project, operation.zone)}/instances/${operation.target}`,
      status: done ? 'DONE' : 'RUNNING',
      progress: done ? 100 : 0,
      insertTime: new Date(operation.started).toISOString(),
      startTime: new Date(operation.started).toISOString(),
      ...(done ? { endTime: new Date(operation.started + operationMs).toISOString() } : {}),
      selfLink: `${base(operation.project, operation.zone)}/operations/${operation.name}`,
    };
  };
  const startOperation = (project: string, zone: string, operationType: string, target: string, requestId: string | undefined): Operation => {
    const operation: Operation = {
      id: String(BigInt(`0x${randomBytes(7).toString('hex')}`)),
      name: `operation-${Date.now()}-${randomBytes(6).toString('hex')}`,
      project, zone, operationType, target, started: cloud.now(),
      ...(requestId ? { requestId } : {}),
    };
    operations.set(operation.name, operation);
    if (requestId) byRequestId.set(requestId, operation);
    return operation;
  };

  const { server, port } = await serveLoopback(async (request, body, response) => {
    const url = new URL(request.url ?? '/', 'http://127.0.0.1');
    const parts = /^\/compute\/v1\/projects\/([^/]+)\/zones\/([^/]+)\/(instances|operations)(?:\/([^/]+))?(\/wait)?$/.exec(url.pathname);
    const [, project = '', zone = '', collection, name, wait] = parts ?? [];
    const method = request.method ?? 'GET';
    const action = parts === null ? `${method} ${url.pathname}`
      : collection === 'operations' ? `zoneOperations.${wait ? 'wait' : 'get'}`
      : `instances.${name === undefined ? (method === 'POST' ? 'insert' : 'list') : method === 'DELETE' ? 'delete' : 'get'}`;
    await cloud.enter(action);
    const json = (response: ServerResponse, status: number, body: unknown) => {
      if (status < 300) cloud.record(action);
      response.writeHead(status, { 'content-type': 'application/json; charset=UTF-8' });
      response.end(JSON.stringify(body));
    };
    try {
      if (!/^Bearer \S+/.test(String(request.headers.authorization ?? ''))) throw new ComputeFailure(401, 'required', 'Request is missing required authentication credential.');
      if (parts === null) throw new ComputeFailure(404, 'notFound', `No such method: ${method} ${url.pathname}`);
      if (cloud.faults.take('throttle', action) !== undefined) throw new ComputeFailure(429, 'rateLimitExceeded', 'Rate Limit Exceeded');
      const refusal = cloud.faults.take('refuse', action);
      if (refusal !== undefined) throw new ComputeFailure(Number(refusal.code ?? '403'), 'forbidden', `injected fault: ${action} is refused`);
      const requestId = url.searchParams.get('requestId') ?? undefined;
      switch (action) {
        case 'instances.insert': {
          const again = requestId === undefined ? undefined : byRequestId.get(requestId);
          if (again !== undefined) return json(response, 200, operationJson(again));
          const resource = JSON.parse(body || '{}') as { name?: string; machineType?: string; labels?: Record<string, string>; metadata?: { items?: { key: string; value: string }[] }; disks?: { initializeParams?: { sourceImage?: string } }[]; networkInterfaces?: { network?: string }[] };
          if (!resource.name || !/^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$/.test(resource.name)) throw new ComputeFailure(400, 'invalid', `Invalid value for field 'resource.name': '${resource.name ?? ''}'.`);
          if (!resource.machineType) throw new ComputeFailure(400, 'required', 'Required field \'resource.machineType\' not specified');
          if (cloud.get(resource.name) !== undefined && visible(cloud.get(resource.name)!)) throw new ComputeFailure(409, 'alreadyExists', `The resource 'projects/${project}/zones/${zone}/instances/${resource.name}' already exists`);
          const metadata = new Map((resource.metadata?.items ?? []).map((item) => [item.key, item.value]));
          const image = resource.disks?.[0]?.initializeParams?.sourceImage ?? '';
          const network = resource.networkInterfaces?.[0]?.network ?? 'global/networks/default';
          const userData = metadata.get('user-data');
          const key = metadata.get('ssh-keys');
          cloud.launch(resource.name, {
            image, instanceType: resource.machineType.split('/').pop()!, network,
            tags: new Map(Object.entries(resource.labels ?? {})),
            ...(userData === undefined ? {} : { userData }),
            ...(key === undefined ? {} : { key }),
            ...(requestId === undefined ? {} : { token: requestId }),
          }, 'drover-ssh-port');
          places.set(resource.name, {
            project, zone, network,
            numericId: String(BigInt(`0x${randomBytes(7).toString('hex')}`)),
            machineType: `${base(project, zone)}/machineTypes/${resource.machineType.split('/').pop()!}`,
          });
          return json(response, 200, operationJson(startOperation(project, zone, 'insert', resource.name, requestId)));
        }
        case 'instances.get':
          return json(response, 200, instanceJson(find(project, zone, name!)));
        case 'instances.delete': {
          const again = requestId === undefined ? undefined : byRequestId.get(requestId);
          if (again !== undefined) return json(response, 200, operationJson(again));
          const instance = find(project, zone, name!);
          const fault = cloud.faults.take('failTerminate');
          if (fault !== undefined) {
            const status = Number(fault.code ?? '500');
            throw new ComputeFailure(status, status >= 500 ? 'backendError' : 'forbidden', `injected fault: delete fails with ${status}`);
          }
          cloud.terminate(instance);
          return json(response, 200, operationJson(startOperation(project, zone, 'delete', instance.id, requestId)));
        }
        case 'instances.list': {
          const filter = url.searchParams.get('filter');
          const keep = filter ? parseFilter(filter, (instance) => cloud.stateOf(instance)) : () => true;
          const found = cloud.all().filter((instance) => visible(instance) && places.get(instance.id)?.project === project && places.get(instance.id)?.zone === zone && keep(instance));
          const max = Number(url.searchParams.get('maxResults') ?? '500');
          const start = Number(url.searchParams.get('pageToken') ?? '0');
          const page = found.slice(start, start + max);
          return json(response, 200, {
            kind: 'compute#instanceList', id: `projects/${project}/zones/${zone}/instances`,
            items: page.map(instanceJson),
            ...(start + max < found.length ? { nextPageToken: String(start + max) } : {}),
            selfLink: `${base(project, zone)}/instances`,
          });
        }
        case 'zoneOperations.get':
        case 'zoneOperations.wait': {
          const operation = operations.get(name ?? '');
          if (operation === undefined || operation.project !== project || operation.zone !== zone) throw new ComputeFailure(404, 'notFound', `The resource 'projects/${project}/zones/${zone}/operations/${name ?? ''}' was not found`);
          // wait answers when the operation is DONE, or after at most 2 s (Google's: 2 minutes) with it still running.
          if (action === 'zoneOperations.wait') {
            const left = operation.started + operationMs - cloud.now();
            if (left > 0) await sleep(Math.min(left, 2000));
          }
          return json(response, 200, operationJson(operation));
        }
        default:
          throw new ComputeFailure(405, 'badRequest', `${method} is not allowed on ${url.pathname}`);
      }
    } catch (error) {
      if (!(error instanceof ComputeFailure)) throw error;
      cloud.record(action, error.reason);
      return json(response, error.status, {
        error: {
          code: error.status,
          message: error.message,
          errors: [{ message: error.message, domain: error.status === 429 ? 'usageLimits' : 'global', reason: error.reason }],
          ...(GRPC_STATUS[error.status] === undefined ? {} : { status: GRPC_STATUS[error.status] }),
        },
      });
    }
  });

  return {
    ...cloudEndpoint(cloud, server, port),
    instances: () => cloud.all().map((instance) => ({ ...instance, state: cloud.stateOf(instance), project: places.get(instance.id)!.project, zone: places.get(instance.id)!.zone })),
  };
}
