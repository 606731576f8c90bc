/**
 * The `aws` provider: EC2 instances through @aws-sdk/client-ec2.
 *
 * Credentials and region come from the SDK's default chains (AWS_* and
 * the shared config files, SSO, the instance role), unless the options
 * give them; `endpoint` points the client elsewhere (a VPC endpoint, or the
 * loopback endpoint of drover/testing). The SDK's own retries are off:
 * every call goes through withRetry, so that throttling and transient
 * errors are retried one way, with jitter, and counted.
 *
 * EC2 is eventually consistent: right after RunInstances, a call naming the
 * new id may answer InvalidInstanceID.NotFound though the instance exists
 * and will run. For an id this provider launched less than
 * `visibilityGraceMs` ago, NotFound therefore means "not visible yet", not
 * "gone": describe() reports it pending, as the launch did (so
 * waitUntilRunning goes on polling, within the caller's boot timeout), and
 * terminate() retries, then fails, so that its caller tries again. Once the
 * grace is over, NotFound means gone (EC2 shows a terminated instance for
 * about an hour, so a launched one is not unknown for long).
 */
import { DescribeInstancesCommand, EC2Client, RunInstancesCommand, TerminateInstancesCommand, type EC2ClientConfig, type Instance, type Filter } from '@aws-sdk/client-ec2';
import type { Logger } from '../runtime/logger.js';
import { CloudError, OWNER_TAG, SESSION_TAG, SSH_PORT_TAG, parseSshPort, pollUntilRunning, type CallOptions, type CloudInstance, type InstanceState, type LaunchSpec, type Provider } from './provider.js';
import { cloudCall, DEFAULT_RETRY, type RetryPolicy } from './retry.js';

export interface AwsProviderOptions {
  /** Default: the SDK's (AWS_REGION, the profile's region). */
  readonly region?: string;
  /** Default: EC2's own endpoint for the region. */
  readonly endpoint?: string;
  /** Default: the SDK's credential chain. */
  readonly credentials?: EC2ClientConfig['credentials'];
  readonly retry?: RetryPolicy;
  readonly logger?: Logger;
  /** How long after its launch an instance that EC2 says it does not know is taken as not visible yet; default 300000 ms. */
  readonly visibilityGraceMs?: number;
}

export const DEFAULT_VISIBILITY_GRACE_MS = 300_000;

const THROTTLING = new Set(['RequestLimitExceeded', 'Throttling', 'ThrottlingException', 'EC2ThrottledException', 'RequestThrottled', 'TooManyRequestsException', 'PriorRequestNotComplete', 'SlowDown']);
const TRANSIENT = new Set(['InternalError', 'InternalFailure', 'ServiceUnavailable', 'Unavailable', 'RequestTimeout', 'RequestTimeoutException', 'TimeoutError']);
const NETWORK = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);

/** Throttling, EC2's internal errors, 5xx answers and dropped connections are worth another attempt. */
export function isTransientAwsError(error: unknown): boolean {
  const e = error as { name?: string; code?: string; $metadata?: { httpStatusCode?: number }; cause?: unknown };
  if (e === null || typeof e !== 'object') return false;
  if (e.name === 'AbortError') return false;
  const status = e.$metadata?.httpStatusCode ?? 0;
  return THROTTLING.has(e.name ?? '') || TRANSIENT.has(e.name ?? '') || NETWORK.has(e.code ?? '') || status === 429 || status >= 500 ||
    (e.cause !== undefined && e.cause !== error && isTransientAwsError(e.cause));
}

/** EC2's answer for an instance id it does not know (or, right after its launch, does not show yet). */
export function isInstanceNotFound(error: unknown): boolean {
  const e = error as { name?: string; cause?: unknown } | null;
  if (e === null || typeof e !== 'object') return false;
  return e.name === 'InvalidInstanceID.NotFound' || (e.cause !== undefined && e.cause !== error && isInstanceNotFound(e.cause));
}

const STATES: Record<string, InstanceState> = {
  pending: 'pending', running: 'running', stopping: 'stopping', stopped: 'stopped', 'shutting-down': 'shutting-down', terminated: 'terminated',
};

function toInstance(instance: Instance): CloudInstance {
  const tags = Object.fromEntries((instance.Tags ?? []).map((tag) => [tag.Key ?? '', tag.Value ?? '']));
  const sshPort = parseSshPort(tags[SSH_PORT_TAG]);
  return {
    id: instance.InstanceId ?? '',
    state: STATES[instance.State?.Name ?? ''] ?? 'pending',
    ...(instance.PublicIpAddress ? { publicIp: instance.PublicIpAddress } : {}),
    ...(instance.PrivateIpAddress ? { privateIp: instance.PrivateIpAddress } : {}),
    tags,
    ...(tags[SESSION_TAG] === undefined ? {} : { session: tags[SESSION_TAG] }),
    ...(tags[OWNER_TAG] === undefined ? {} : { owner: tags[OWNER_TAG] }),
    ...(sshPort === undefined ? {} : { sshPort }),
    ...(instance.LaunchTime ? { launchedAt: instance.LaunchTime } : {}),
  };
}

export class AwsProvider implements Provider {
  readonly name = 'aws' as const;
  readonly where: string;
  readonly #client: EC2Client;
  readonly #retry: RetryPolicy;
  readonly #logger: Logger | undefined;
  readonly #visibilityGraceMs: number;
  /** Instances launched here within the visibility grace: when, and what RunInstances answered. */
  readonly #launched = new Map<string, { readonly at: number; readonly instance: CloudInstance }>();

  constructor(options: AwsProviderOptions = {}) {
    this.#client = new EC2Client({
      maxAttempts: 1,
      ...(options.region ? { region: options.region } : {}),
      ...(options.endpoint ? { endpoint: options.endpoint } : {}),
      ...(options.credentials ? { credentials: options.credentials } : {}),
    });
    this.where = options.region ?? process.env['AWS_REGION'] ?? process.env['AWS_DEFAULT_REGION'] ?? 'the default region';
    this.#retry = options.retry ?? DEFAULT_RETRY;
    this.#logger = options.logger;
    this.#visibilityGraceMs = options.visibilityGraceMs ?? DEFAULT_VISIBILITY_GRACE_MS;
  }

  /** The launch of `id`, when it was launched here within the visibility grace (older ones are forgotten). */
  #recentLaunch(id: string): { readonly at: number; readonly instance: CloudInstance } | undefined {
    const now = Date.now();
    for (const [known, launch] of this.#launched) if (now - launch.at >= this.#visibilityGraceMs) this.#launched.delete(known);
    return this.#launched.get(id);
  }

  /** One EC2 call, retried while its error is transient (or `alsoRetry` says it is worth another try). */
  #call<T>(what: string, call: (signal: AbortSignal) => Promise<T>, options: CallOptions, alsoRetry?: (error: unknown) => boolean): Promise<T> {
    const transient = alsoRetry === undefined ? isTransientAwsError : (error: unknown) => isTransientAwsError(error) || alsoRetry(error);
    return cloudCall(`ec2:${what}`, call, { policy: this.#retry, transient, signal: options.signal, logger: this.#logger });
  }

  async launch(spec: LaunchSpec, options: CallOptions = {}): Promise<CloudInstance> {
    const tags = { ...spec.tags, [SESSION_TAG]: spec.session, [OWNER_TAG]: spec.owner };
    const output = await this.#call('RunInstances', (abortSignal) => this.#client.send(new RunInstancesCommand({
      ImageId: spec.image,
      InstanceType: spec.instanceType as never,
      MinCount: 1,
      MaxCount: 1,
      ClientToken: spec.token,
      ...(spec.network ? { SubnetId: spec.network } : {}),
      ...(spec.key ? { KeyName: spec.key } : {}),
      ...(spec.userData ? { UserData: Buffer.from(spec.userData, 'utf8').toString('base64') } : {}),
      TagSpecifications: [{ ResourceType: 'instance', Tags: Object.entries(tags).map(([Key, Value]) => ({ Key, Value })) }],
    }), { abortSignal }), options);
    const instance = output.Instances?.[0];
    if (instance?.InstanceId === undefined) throw new CloudError('ec2:RunInstances answered without an instance');
    const launched = toInstance(instance);
    this.#launched.set(launched.id, { at: Date.now(), instance: launched });
    return launched;
  }

  async describe(id: string, options: CallOptions = {}): Promise<CloudInstance | undefined> {
    try {
      const found = await this.#describe({ InstanceIds: [id] }, options);
      return found[0];
    } catch (error) {
      if (!isInstanceNotFound(error)) throw error;
      const launch = this.#recentLaunch(id);
      if (launch === undefined) return undefined;
      // Launched here moments ago: EC2 does not show it yet, but it exists.
      this.#logger?.debug('ec2: a new instance is not visible yet; taken as pending', { instance: id, sinceLaunchMs: Date.now() - launch.at });
      return { ...launch.instance, state: 'pending' };
    }
  }

  waitUntilRunning(id: string, options: CallOptions & { readonly pollMs?: number }): Promise<CloudInstance> {
    return pollUntilRunning(this, id, options);
  }

  async terminate(id: string, options: CallOptions = {}): Promise<void> {
    // A NotFound for an instance launched here moments ago is retried like a transient error: it is not visible yet.
    const notVisibleYet = (error: unknown) => isInstanceNotFound(error) && this.#recentLaunch(id) !== undefined;
    try {
      await this.#call('TerminateInstances', (abortSignal) => this.#client.send(new TerminateInstancesCommand({ InstanceIds: [id] }), { abortSignal }), options, notVisibleYet);
    } catch (error) {
      if (!isInstanceNotFound(error)) throw error;
      const launch = this.#recentLaunch(id);
      // Gone already: what terminating asks for.
      if (launch === undefined) return;
      throw new CloudError(`ec2:TerminateInstances: instance ${id}, launched ${Math.round((Date.now() - launch.at) / 1000)} s ago, is not visible yet (InvalidInstanceID.NotFound, EC2's eventual consistency): it may be running; try again`, { cause: error });
    }
  }

  async list(options: CallOptions & { readonly session?: string } = {}): Promise<CloudInstance[]> {
    const filters: Filter[] = [
      options.session === undefined ? { Name: 'tag-key', Values: [SESSION_TAG] } : { Name: `tag:${SESSION_TAG}`, Values: [options.session] },
      { Name: 'instance-state-name', Values: ['pending', 'running', 'stopping', 'stopped', 'shutting-down'] },
    ];
    return this.#describe({ Filters: filters }, options);
  }

  async #describe(input: { InstanceIds?: string[]; Filters?: Filter[] }, options: CallOptions): Promise<CloudInstance[]> {
    const found: CloudInstance[] = [];
    let nextToken: string | undefined;
    for (let page = 0; page < 1000; page++) {
      const token = nextToken;
      const output = await this.#call('DescribeInstances', (abortSignal) => this.#client.send(new DescribeInstancesCommand({
        ...input,
        ...(input.InstanceIds ? {} : { MaxResults: 1000 }),
        ...(token === undefined ? {} : { NextToken: token }),
      }), { abortSignal }), options);
      for (const reservation of output.Reservations ?? []) for (const instance of reservation.Instances ?? []) found.push(toInstance(instance));
      nextToken = output.NextToken;
      if (!nextToken) break;
    }
    return found;
  }

  /** Closes the SDK's connections. */
  close(): void {
    this.#client.destroy();
  }
}
