/**
 * A loopback EC2 endpoint that speaks the EC2 Query API as EC2 does (API
 * version 2016-11-15): form-encoded POSTs with `Action=...`, answered with
 * XML in the `http://ec2.amazonaws.com/doc/2016-11-15/` namespace, errors as
 * `<Response><Errors><Error><Code>`. Point the real SDK at it:
 *
 *     const ec2 = await startEc2Endpoint({ sshPorts: [sshd.port] });
 *     new EC2Client({ endpoint: ec2.url, region: 'us-east-1' })
 *
 * Actions: RunInstances (TagSpecifications, ClientToken idempotency),
 * DescribeInstances (InstanceId.N; filters instance-id, instance-state-name,
 * tag:KEY, tag-key; MaxResults/NextToken), TerminateInstances, CreateTags.
 * Requests must be signed (SigV4) with `accessKeyId` when it is given.
 * Faults (`faults`): throttling, instances that never start, failing
 * terminates, refused calls, slow answers; see cloud-endpoint.ts for the clock and the
 * addresses of the instances. `notFoundCalls` plays EC2's eventual
 * consistency: a new instance exists, but is unknown for a while to the
 * calls that name it.
 */
import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { cloudEndpoint, FakeCloud, serveLoopback, type CloudEndpoint, type FakeCloudOptions, type FakeInstance, type FakeInstanceState } from './cloud-endpoint.js';

const NAMESPACE = 'http://ec2.amazonaws.com/doc/2016-11-15/';
const STATE_CODES: Record<FakeInstanceState, number> = { pending: 0, running: 16, 'shutting-down': 32, terminated: 48 };
const OWNER_ID = '123456789012';

export interface Ec2EndpointOptions extends FakeCloudOptions {
  /** Refuse requests not signed with this access key id (AuthFailure). */
  readonly accessKeyId?: string;
  readonly availabilityZone?: string;
  /**
   * Each new instance is unknown (InvalidInstanceID.NotFound) to the first
   * `notFoundCalls` calls that name it (DescribeInstances by id,
   * TerminateInstances, CreateTags), and left out of filtered listings
   * meanwhile, as EC2's eventual consistency has it right after
   * RunInstances; it runs all the same. Default 0.
   */
  readonly notFoundCalls?: number;
}

export interface Ec2Endpoint extends CloudEndpoint {
  /** The instances launched so far, with their state now. */
  instances(): (FakeInstance & { readonly state: FakeInstanceState })[];
}

class Ec2Failure extends Error {
  constructor(readonly code: string, message: string, readonly status = 400) {
    super(message);
  }
}

export function xmlEscape(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

/** `Prefix.1.Name`, `Prefix.2.Name`, ... as long as they go on. */
function indexed(params: URLSearchParams, prefix: string): number[] {
  const found: number[] = [];
  for (let i = 1; params.has(`${prefix}.${i}`) || [...params.keys()].some((key) => key.startsWith(`${prefix}.${i}.`)); i++) found.push(i);
  return found;
}

function list(params: URLSearchParams, prefix: string): string[] {
  return indexed(params, prefix).map((i) => params.get(`${prefix}.${i}`) ?? '');
}

function tagsFrom(params: URLSearchParams, prefix: string): Map<string, string> {
  return new Map(indexed(params, prefix).map((i) => [params.get(`${prefix}.${i}.Key`) ?? '', params.get(`${prefix}.${i}.Value`) ?? '']));
}

/** EC2 filter values may hold `*` and `?` wildcards. */
function matches(pattern: string, value: string): boolean {
  const regex = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
  return regex.test(value);
}

export async function startEc2Endpoint(options: Ec2EndpointOptions = {}): Promise<Ec2Endpoint> {
  const cloud = new FakeCloud(options);
  const zone = options.availabilityZone ?? 'us-east-1a';
  const byToken = new Map<string, FakeInstance>();
  /** Calls naming it that are still to answer NotFound, by instance id (notFoundCalls). */
  const unseen = new Map<string, number>();

  const instanceXml = (instance: FakeInstance): string => {
    const state = cloud.stateOf(instance);
    const tags = [...instance.tags].map(([key, value]) => `<item><key>${xmlEscape(key)}</key><value>${xmlEscape(value)}</value></item>`).join('');
    const live = state === 'running' || state === 'pending';
    return '<item>' +
      `<instanceId>${instance.id}</instanceId><imageId>${xmlEscape(instance.image)}</imageId>` +
      `<instanceState><code>${STATE_CODES[state]}</code><name>${state}</name></instanceState>` +
      `<privateDnsName>${live ? `ip-${instance.privateIp.replace(/\./g, '-')}.ec2.internal` : ''}</privateDnsName><dnsName/>` +
      (instance.key === undefined ? '' : `<keyName>${xmlEscape(instance.key)}</keyName>`) +
      `<amiLaunchIndex>0</amiLaunchIndex><instanceType>${xmlEscape(instance.instanceType)}</instanceType>` +
      `<launchTime>${new Date(instance.launchedAt).toISOString()}</launchTime>` +
      `<placement><availabilityZone>${zone}</availabilityZone><tenancy>default</tenancy></placement>` +
      `<monitoring><state>disabled</state></monitoring>` +
      (instance.network === undefined ? '' : `<subnetId>${xmlEscape(instance.network)}</subnetId>`) +
      (live ? `<privateIpAddress>${instance.privateIp}</privateIpAddress>` : '') +
      (state === 'running' ? `<ipAddress>${instance.publicIp}</ipAddress>` : '') +
      `<architecture>x86_64</architecture><rootDeviceType>ebs</rootDeviceType>` +
      (instance.token === undefined ? '' : `<clientToken>${xmlEscape(instance.token)}</clientToken>`) +
      (tags === '' ? '' : `<tagSet>${tags}</tagSet>`) +
      '</item>';
  };
  const answer = (response: ServerResponse, action: string, inner: string) => {
    const requestId = randomBytes(16).toString('hex').replace(/^(.{8})(.{4})(.{4})(.{4})/, '$1-$2-$3-$4-');
    response.writeHead(200, { 'content-type': 'text/xml;charset=UTF-8' });
    response.end(`<?xml version="1.0" encoding="UTF-8"?>\n<${action}Response xmlns="${NAMESPACE}"><requestId>${requestId}</requestId>${inner}</${action}Response>`);
  };
  const known = (id: string): FakeInstance => {
    const instance = cloud.get(id);
    const hidden = unseen.get(id) ?? 0;
    if (hidden > 0) unseen.set(id, hidden - 1);
    if (instance === undefined || hidden > 0) throw new Ec2Failure('InvalidInstanceID.NotFound', `The instance ID '${id}' does not exist`);
    return instance;
  };

  const actions: Record<string, (params: URLSearchParams, response: ServerResponse) => void> = {
    RunInstances(params, response) {
      const image = params.get('ImageId');
      const instanceType = params.get('InstanceType') ?? 'm1.small';
      if (!image) throw new Ec2Failure('MissingParameter', 'The request must contain the parameter ImageId');
      const count = Number(params.get('MaxCount') ?? '1');
      if (count !== 1 || Number(params.get('MinCount') ?? '1') !== 1) throw new Ec2Failure('InvalidParameterValue', 'this endpoint launches one instance per request (MinCount = MaxCount = 1)');
      const token = params.get('ClientToken') ?? undefined;
      let instance = token === undefined ? undefined : byToken.get(token);
      if (instance === undefined) {
        const tags = new Map<string, string>();
        for (const i of indexed(params, 'TagSpecification')) {
          const type = params.get(`TagSpecification.${i}.ResourceType`);
          if (type !== 'instance') throw new Ec2Failure('InvalidParameterValue', `TagSpecification.${i}.ResourceType: ${type ?? '(none)'} is not supported here`);
          for (const [key, value] of tagsFrom(params, `TagSpecification.${i}.Tag`)) tags.set(key, value);
        }
        const userData = params.get('UserData');
        instance = cloud.launch(`i-${randomBytes(9).toString('hex').slice(0, 17)}`, {
          image,
          instanceType,
          tags,
          ...(params.get('SubnetId') ? { network: params.get('SubnetId')! } : {}),
          ...(params.get('KeyName') ? { key: params.get('KeyName')! } : {}),
          ...(userData ? { userData: Buffer.from(userData, 'base64').toString('utf8') } : {}),
          ...(token === undefined ? {} : { token }),
        }, 'drover:ssh-port');
        if (token !== undefined) byToken.set(token, instance);
        if ((options.notFoundCalls ?? 0) > 0) unseen.set(instance.id, options.notFoundCalls!);
      }
      answer(response, 'RunInstances', `<reservationId>r-${instance.id.slice(2)}</reservationId><ownerId>${OWNER_ID}</ownerId><groupSet/><instancesSet>${instanceXml(instance)}</instancesSet>`);
    },

    DescribeInstances(params, response) {
      const ids = list(params, 'InstanceId');
      for (const id of ids) known(id);
      let found = ids.length > 0 ? ids.map((id) => cloud.get(id)!) : cloud.all().filter((instance) => (unseen.get(instance.id) ?? 0) === 0);
      for (const i of indexed(params, 'Filter')) {
        const name = params.get(`Filter.${i}.Name`) ?? '';
        const values = list(params, `Filter.${i}.Value`);
        const value = (instance: FakeInstance): string[] => {
          if (name === 'instance-id') return [instance.id];
          if (name === 'instance-state-name') return [cloud.stateOf(instance)];
          if (name === 'tag-key') return [...instance.tags.keys()];
          if (name.startsWith('tag:')) return instance.tags.has(name.slice(4)) ? [instance.tags.get(name.slice(4))!] : [];
          throw new Ec2Failure('InvalidParameterValue', `The filter '${name}' is invalid`);
        };
        found = found.filter((instance) => value(instance).some((have) => values.some((pattern) => matches(pattern, have))));
      }
      const max = Number(params.get('MaxResults') ?? '1000');
      const start = Number(params.get('NextToken') ?? '0');
      const page = found.slice(start, start + max);
      const next = start + max < found.length ? `<nextToken>${start + max}</nextToken>` : '';
      const reservations = page.map((instance) => `<item><reservationId>r-${instance.id.slice(2)}</reservationId><ownerId>${OWNER_ID}</ownerId><groupSet/><instancesSet>${instanceXml(instance)}</instancesSet></item>`).join('');
      answer(response, 'DescribeInstances', `<reservationSet>${reservations}</reservationSet>${next}`);
    },

    TerminateInstances(params, response) {
      const ids = list(params, 'InstanceId');
      if (ids.length === 0) throw new Ec2Failure('MissingParameter', 'The request must contain the parameter InstanceId');
      const instances = ids.map(known);
      const fault = cloud.faults.take('failTerminate');
      if (fault !== undefined) {
        const code = fault.code ?? 'InternalError';
        throw new Ec2Failure(code, code === 'InternalError' ? 'An internal error has occurred' : `injected fault: ${code}`, code === 'InternalError' ? 500 : 400);
      }
      const items = instances.map((instance) => {
        const before = cloud.stateOf(instance);
        cloud.terminate(instance);
        const after = cloud.stateOf(instance);
        return `<item><instanceId>${instance.id}</instanceId><currentState><code>${STATE_CODES[after]}</code><name>${after}</name></currentState><previousState><code>${STATE_CODES[before]}</code><name>${before}</name></previousState></item>`;
      });
      answer(response, 'TerminateInstances', `<instancesSet>${items.join('')}</instancesSet>`);
    },

    CreateTags(params, response) {
      const ids = list(params, 'ResourceId');
      const tags = tagsFrom(params, 'Tag');
      const instances = ids.map(known);
      for (const instance of instances) for (const [key, value] of tags) instance.tags.set(key, value);
      answer(response, 'CreateTags', '<return>true</return>');
    },
  };

  const { server, port } = await serveLoopback(async (request, body, response) => {
    const params = new URLSearchParams(request.method === 'POST' ? body : (request.url ?? '').replace(/^[^?]*\??/, ''));
    const action = params.get('Action') ?? '';
    await cloud.enter(action);
    try {
      const credential = /Credential=([^/]+)\//.exec(String(request.headers.authorization ?? ''))?.[1];
      if (credential === undefined) throw new Ec2Failure('AuthFailure', 'AWS was not able to validate the provided access credentials', 401);
      if (options.accessKeyId !== undefined && credential !== options.accessKeyId) throw new Ec2Failure('AuthFailure', 'AWS was not able to validate the provided access credentials', 401);
      const handler = actions[action];
      if (handler === undefined) throw new Ec2Failure('InvalidAction', `The action ${action || '(none)'} is not valid for this web service.`);
      if (cloud.faults.take('throttle', action) !== undefined) throw new Ec2Failure('RequestLimitExceeded', 'Request limit exceeded.', 503);
      const refusal = cloud.faults.take('refuse', action);
      if (refusal !== undefined) throw new Ec2Failure(refusal.code ?? 'UnauthorizedOperation', `injected fault: ${action} is refused`, 403);
      handler(params, response);
      cloud.record(action);
    } catch (error) {
      if (!(error instanceof Ec2Failure)) throw error;
      cloud.record(action, error.code);
      response.writeHead(error.status, { 'content-type': 'text/xml;charset=UTF-8' });
      response.end(`<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>${error.code}</Code><Message>${xmlEscape(error.message)}</Message></Error></Errors><RequestID>${randomBytes(16).toString('hex')}</RequestID></Response>`);
    }
  });

  return { ...cloudEndpoint(cloud, server, port), instances: () => cloud.all().map((instance) => ({ ...instance, state: cloud.stateOf(instance) })) };
}
