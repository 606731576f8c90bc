/**
 * The `aws` host: drover running on an EC2 instance. Tasks run on this
 * machine (as with `hardware`); the instance metadata service (IMDSv2: a
 * session token first, then every call carries it) gives the instance's
 * identity and its user-data (drover settings under the local ones), and is
 * polled for a spot interruption notice, which becomes a graceful shutdown
 * that ends before the instance goes.
 *
 * The metadata service is reached with node's fetch; the AWS SDK is not
 * needed for it.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../runtime/logger.js';
import { errorMessage } from '../model/errors.js';
import type { HostIdentity } from './host.js';
import {
  InstanceHost, LINK_LOCAL_METADATA_URL, MetadataStatusError, metadataCall,
  type InstanceConfig, type InstanceMetadata, type InterruptionNotice,
} from './metadata.js';
import type { RetryOptions } from './retry.js';

/** How long a spot instance has after its interruption notice, when the notice does not say (AWS: two minutes). */
export const SPOT_NOTICE_MS = 120_000;
/** How user-data for cloud-init alone begins (cloud-init's formats). */
const NOT_SETTINGS = /^(#!|#include|#cloud-boothook|#part-handler|#upstart-job|#cloud-config-archive|Content-Type:|MIME-Version:)/i;
/** The first byte of gzip's magic number: compressed user-data. */
const GZIP_FIRST_BYTE = 0x1f;
/** The longest session token IMDSv2 hands out. */
const MAX_TOKEN_TTL_S = 21_600;

export interface Ec2MetadataOptions {
  /** The metadata service's base URL; default the link-local `http://169.254.169.254`. */
  readonly url?: string;
  /** Each call's timeout; default 2 s. */
  readonly timeoutMs?: number;
  /** The session token's lifetime, 1 to 21600 s (the default); a new one is fetched before it runs out. */
  readonly tokenTtlS?: number;
  /** How often the spot interruption notice is looked for; default 5 s. */
  readonly spotPollMs?: number;
  /** How failing calls are retried (see retry.ts); default METADATA_RETRY. */
  readonly retry?: Partial<RetryOptions>;
}

/** EC2's instance metadata service, through IMDSv2. */
export class Ec2Metadata implements InstanceMetadata {
  readonly url: string;
  readonly #timeoutMs: number;
  readonly #tokenTtlS: number;
  readonly #spotPollMs: number;
  readonly #retry: Partial<RetryOptions>;
  #token: { readonly value: string; readonly refreshAt: number } | undefined;
  #pendingToken: Promise<string> | undefined;

  constructor(options: Ec2MetadataOptions = {}) {
    this.url = (options.url || LINK_LOCAL_METADATA_URL).replace(/\/+$/, '');
    this.#timeoutMs = options.timeoutMs ?? 2000;
    this.#tokenTtlS = Math.min(MAX_TOKEN_TTL_S, Math.max(1, Math.floor(options.tokenTtlS ?? MAX_TOKEN_TTL_S)));
    this.#spotPollMs = options.spotPollMs ?? 5000;
    this.#retry = options.retry ?? {};
  }

  /**
   * The body at `path` (`/latest/meta-data/instance-id`), or undefined when it
   * is not there (404). A 401 means the token expired early: one new token,
   * one more try.
   */
  async get(path: string, signal: AbortSignal): Promise<string | undefined> {
    for (let tries = 1; ; tries++) {
      const token = await this.#sessionToken(signal);
      const response = await metadataCall(this.url + path, { headers: { 'X-aws-ec2-metadata-token': token }, timeoutMs: this.#timeoutMs, signal }, { retry: this.#retry });
      if (response.status === 200) return response.body;
      if (response.status === 404) return undefined;
      if (response.status === 401 && tries === 1) {
        this.#token = undefined;
        continue;
      }
      throw new MetadataStatusError(`GET ${this.url}${path}`, response.status);
    }
  }

  /** The token in hand, or a new one when it is due for renewal (a quarter of its life, at most a minute, before it ends). */
  #sessionToken(signal: AbortSignal): Promise<string> {
    if (this.#token !== undefined && Date.now() < this.#token.refreshAt) return Promise.resolve(this.#token.value);
    this.#pendingToken ??= this.#newToken(signal).finally(() => (this.#pendingToken = undefined));
    return this.#pendingToken;
  }

  async #newToken(signal: AbortSignal): Promise<string> {
    const asked = Date.now();
    const url = `${this.url}/latest/api/token`;
    const response = await metadataCall(url, {
      method: 'PUT',
      headers: { 'X-aws-ec2-metadata-token-ttl-seconds': String(this.#tokenTtlS) },
      timeoutMs: this.#timeoutMs,
      signal,
    }, { retry: this.#retry });
    if (response.status !== 200 || response.body === '') throw new MetadataStatusError(`PUT ${url} (IMDSv2 session token)`, response.status);
    const lifeMs = this.#tokenTtlS * 1000;
    this.#token = { value: response.body, refreshAt: asked + lifeMs - Math.min(60_000, lifeMs / 4) };
    return response.body;
  }

  async identity({ signal }: { signal: AbortSignal }): Promise<HostIdentity> {
    const read = async (path: string) => {
      const value = await this.get(`/latest/meta-data/${path}`, signal);
      if (value === undefined) throw new MetadataStatusError(`GET ${this.url}/latest/meta-data/${path}`, 404);
      return value.trim();
    };
    const [instanceId, instanceType, zone, hostname] = await Promise.all([
      read('instance-id'), read('instance-type'), read('placement/availability-zone'), read('local-hostname'),
    ]);
    // placement/region is newer than the zone; older instances derive it (us-east-1a -> us-east-1).
    const region = (await this.get('/latest/meta-data/placement/region', signal))?.trim() || zone.replace(/[a-z]$/, '');
    return { hostname, facts: { cloud: 'aws', instanceId, instanceType, zone, region } };
  }

  /**
   * The user-data, unless there is none or it is for cloud-init only: a
   * script, a MIME multi-part or compressed document, an include list...
   * (`#cloud-config` is YAML, and drover reads its `drover` section.)
   */
  async userConfig(signal: AbortSignal): Promise<InstanceConfig | undefined> {
    const text = await this.get('/latest/user-data', signal);
    if (text === undefined || text.trim() === '' || NOT_SETTINGS.test(text) || text.charCodeAt(0) === GZIP_FIRST_BYTE) return undefined;
    return { source: 'the instance\'s user-data', text };
  }

  /** Polls `spot/instance-action`: 404 while the instance is safe, `{"action":..., "time":...}` once it is not. */
  async watch({ signal, logger, onNotice }: Parameters<InstanceMetadata['watch']>[0]): Promise<void> {
    let failing = false;
    while (!signal.aborted) {
      try {
        const body = await this.get('/latest/meta-data/spot/instance-action', signal);
        if (body !== undefined) {
          onNotice(spotNotice(body, logger));
          return;
        }
        if (failing) logger.info('the spot interruption notice can be read again');
        failing = false;
      } catch (error) {
        if (signal.aborted) return;
        if (!failing) logger.warn('cannot read the spot interruption notice; still trying', { error: errorMessage(error) });
        failing = true;
      }
      await sleep(this.#spotPollMs, undefined, { signal }).catch(() => undefined);
    }
  }
}

/** A notice whose time cannot be read still stops the worker, within the two minutes AWS promises. */
function spotNotice(body: string, logger: Logger): InterruptionNotice {
  let action = 'terminate';
  let goneAt = NaN;
  try {
    const notice = JSON.parse(body) as { action?: unknown; time?: unknown };
    if (typeof notice.action === 'string') action = notice.action;
    if (typeof notice.time === 'string') goneAt = Date.parse(notice.time);
  } catch {
    // Handled below, as a notice without a time.
  }
  if (!Number.isFinite(goneAt)) {
    logger.warn('the spot interruption notice has no readable time; assuming two minutes from now');
    goneAt = Date.now() + SPOT_NOTICE_MS;
  }
  return { message: `spot interruption: the instance will ${action} at ${new Date(goneAt).toISOString()}`, goneAt };
}

export interface AwsHostOptions extends Ec2MetadataOptions {
  readonly workDir: string;
}

/** This EC2 instance: tasks run here; its spot interruption notice shuts the worker down in time. */
export class AwsHost extends InstanceHost {
  constructor(options: AwsHostOptions) {
    super('aws', new Ec2Metadata(options), options);
  }
}
