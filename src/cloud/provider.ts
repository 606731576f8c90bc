/**
 * Provider: launches, lists and terminates cloud instances for drover
 * (`aws` on EC2, `gce` on Compute Engine). It is not a Host: an instance it
 * launches becomes, once it answers over SSH, one machine of an `ssh` host
 * (an SshHostEntry); instance-runtime.ts does that, driving the instance
 * machine (src/machines/instance.ts) with a provider.
 *
 * Every instance drover launches carries two tags (EC2) or labels (GCE):
 *   drover:session   the session (batch, fleet) it was launched for
 *   drover:owner     who launched it: `<hostname>/<pid>` (owner.ts)
 * which is how `list()` finds them and how the watchdog decides whether
 * one is a leftover. GCE label keys and values allow only lower-case
 * letters, digits, `-` and `_`: there the keys are `drover-session` and
 * `drover-owner`, and values are stored as `labelValue()` makes them; the
 * providers hand back the stored values, and callers compare through
 * `sameTagValue()`.
 *
 * Every method:
 *  - takes an AbortSignal and gives up when it aborts;
 *  - bounds each API call by a timeout and retries throttling and
 *    transient errors with backoff and jitter (retry.ts), a bounded number
 *    of times; other errors reject at once, as CloudError naming the call;
 *  - uses the SDK's default credential chain (environment, profile,
 *    instance role / application default credentials); credentials,
 *    user-data and request bodies are never logged.
 *
 * Terminating is idempotent: terminating an instance that is gone, or
 * already shutting down, succeeds.
 *
 * An instance the provider launched moments ago that the cloud does not
 * show yet (EC2's eventual consistency) is not gone: describe() reports it
 * pending, and terminate() fails (refused: false) rather than take it as
 * terminated, so that the caller tries again.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { DroverError } from '../model/errors.js';

export const SESSION_TAG = 'drover:session';
export const OWNER_TAG = 'drover:owner';
/**
 * The port the instance's sshd listens on, when it is not 22: set it in
 * `LaunchSpec.tags` (or by a launch template); the runtime reads it back
 * from the instance.
 */
export const SSH_PORT_TAG = 'drover:ssh-port';

export type ProviderName = 'aws' | 'gce';
export const PROVIDER_NAMES: readonly ProviderName[] = ['aws', 'gce'];

export interface LaunchSpec {
  /** EC2: an AMI id. GCE: a source image (`projects/debian-cloud/global/images/family/debian-12`). */
  readonly image: string;
  /** EC2: `t3.micro`. GCE: `e2-small` (the zone is the provider's). */
  readonly instanceType: string;
  /** EC2: a subnet id. GCE: a network (`global/networks/default`); optional on both. */
  readonly network?: string;
  /** EC2: the key pair name. GCE: an `ssh-keys` metadata line (`user:ssh-ed25519 AAAA...`). */
  readonly key?: string;
  /** Handed to the instance as it is (EC2 user-data, GCE `user-data` metadata). Never logged. */
  readonly userData?: string;
  /** Tags (labels) besides drover's own; drover's own win. */
  readonly tags?: Readonly<Record<string, string>>;
  /** drover:session. */
  readonly session: string;
  /** drover:owner. */
  readonly owner: string;
  /**
   * Makes the launch idempotent: a retried launch with the same token
   * creates no second instance (EC2 ClientToken; GCE instance name and requestId).
   */
  readonly token: string;
}

/** Where an instance is in its life, the same words for both clouds. */
export type InstanceState = 'pending' | 'running' | 'stopping' | 'stopped' | 'shutting-down' | 'terminated';

export interface CloudInstance {
  /** EC2 instance id; GCE instance name. */
  readonly id: string;
  readonly state: InstanceState;
  readonly publicIp?: string;
  readonly privateIp?: string;
  /** Every tag (label) on it, as stored. */
  readonly tags: Readonly<Record<string, string>>;
  /** drover:session, as stored; undefined on instances drover did not launch. */
  readonly session?: string;
  readonly owner?: string;
  /** From drover:ssh-port, when set. */
  readonly sshPort?: number;
  readonly launchedAt?: Date;
}

export interface CallOptions {
  readonly signal?: AbortSignal;
}

export interface Provider {
  readonly name: ProviderName;
  /** Where it launches, for people: `us-east-1`, `my-project/europe-west1-b`. */
  readonly where: string;
  /** Starts one instance; resolves once the cloud accepted it (it is usually still pending). */
  launch(spec: LaunchSpec, options?: CallOptions): Promise<CloudInstance>;
  /** The instance as it is now; undefined when the cloud no longer knows it (pending when launched here moments ago and not visible yet). */
  describe(id: string, options?: CallOptions): Promise<CloudInstance | undefined>;
  /**
   * Polls `describe` every `pollMs` until the instance runs and has an
   * address, and resolves with it. Rejects when it ends up stopped or
   * terminated instead, or when `signal` aborts (the machine's boot timeout).
   */
  waitUntilRunning(id: string, options: CallOptions & { readonly pollMs?: number }): Promise<CloudInstance>;
  /** Asks the cloud to terminate (delete) it; resolves once the request is accepted. Idempotent. */
  terminate(id: string, options?: CallOptions): Promise<void>;
  /** Every instance carrying drover:session, in any state but terminated; `session` narrows to one session. */
  list(options?: CallOptions & { readonly session?: string }): Promise<CloudInstance[]>;
  /** Releases the SDK client's connections; idempotent. */
  close(): void;
}

/** A cloud API call failed for good (after its retries), or an instance ended up where it should not. */
export class CloudError extends DroverError {
  /**
   * The cloud answered with a refusal that is not worth retrying (bad
   * image, no permission, quota): the call had no effect. False when the
   * calls ran out of attempts or time: then it may have had one.
   */
  readonly refused: boolean;
  constructor(message: string, options?: { cause?: unknown; refused?: boolean }) {
    super('DROVER_CLOUD', message, options);
    this.refused = options?.refused ?? false;
  }
}

/** A GCE label value from any string: lower case; what is not a letter, digit, `-` or `_` becomes `-`; at most 63 characters. */
export function labelValue(value: string): string {
  return value.toLowerCase().replace(/[^a-z0-9_-]/g, '-').slice(0, 63);
}

/** Whether a stored tag value stands for `value` (EC2 stores it as it is; GCE as labelValue()). */
export function sameTagValue(stored: string | undefined, value: string): boolean {
  return stored !== undefined && (stored === value || stored === labelValue(value));
}

export function parseSshPort(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d+$/.test(value)) return undefined;
  const port = Number(value);
  return port >= 1 && port <= 65535 ? port : undefined;
}

/** Polls until the instance runs and has an address; shared by both providers. */
export async function pollUntilRunning(provider: Provider, id: string, options: CallOptions & { readonly pollMs?: number }): Promise<CloudInstance> {
  const pollMs = options.pollMs ?? 2000;
  for (;;) {
    options.signal?.throwIfAborted();
    const instance = await provider.describe(id, options);
    if (instance === undefined) throw new CloudError(`${provider.name} instance ${id}: the cloud no longer knows it`);
    if (instance.state === 'running' && (instance.publicIp ?? instance.privateIp) !== undefined) return instance;
    if (instance.state !== 'pending') throw new CloudError(`${provider.name} instance ${id}: is ${instance.state}, not running`);
    await sleep(pollMs, undefined, options.signal === undefined ? {} : { signal: options.signal }).catch((error: unknown) => {
      throw options.signal?.aborted ? options.signal.reason : error;
    });
  }
}
