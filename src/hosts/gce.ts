/**
 * The `gce` host: drover running on a Compute Engine instance. Tasks run on
 * this machine (as with `hardware`); the metadata server (every call with
 * `Metadata-Flavor: Google`) gives the instance's identity and its
 * `drover-config` attribute (drover settings under the local ones), and
 * `instance/preempted` and `instance/maintenance-event` are watched with
 * hanging GETs (`wait_for_change`, `last_etag`): a preemption or a
 * terminating maintenance becomes a graceful shutdown that ends before the
 * instance goes.
 *
 * The metadata server is reached with node's fetch; gcp-metadata is not
 * needed for it.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage } from '../model/errors.js';
import type { HostIdentity } from './host.js';
import {
  InstanceHost, LINK_LOCAL_METADATA_URL, MetadataStatusError, metadataCall,
  type InstanceConfig, type InstanceMetadata,
} from './metadata.js';
import { backoffDelay, type RetryOptions } from './retry.js';

/** A preempted instance is stopped 30 s after the notice. */
export const PREEMPTION_NOTICE_MS = 30_000;
/** A terminating host maintenance is announced 60 s ahead. */
export const MAINTENANCE_NOTICE_MS = 60_000;
/** The default attribute that holds drover's settings. */
export const DEFAULT_CONFIG_ATTRIBUTE = 'drover-config';

export interface GceMetadataOptions {
  /** The metadata server's base URL; default the link-local `http://169.254.169.254`. */
  readonly url?: string;
  /** Each ordinary call's timeout; default 2 s. */
  readonly timeoutMs?: number;
  /** How long one hanging GET waits for a change (`timeout_sec`); default 60 s. */
  readonly waitS?: number;
  /** The instance attribute that holds drover's settings; default `drover-config`. */
  readonly configAttribute?: string;
  /** How failing calls are retried (see retry.ts); default METADATA_RETRY. */
  readonly retry?: Partial<RetryOptions>;
}

/** A value and its ETag, as the metadata server answers it. */
interface Tagged {
  readonly value: string;
  readonly etag: string | null;
}

/** Compute Engine's metadata server. */
export class GceMetadata implements InstanceMetadata {
  readonly url: string;
  readonly #timeoutMs: number;
  readonly #waitS: number;
  readonly #configAttribute: string;
  readonly #retry: Partial<RetryOptions>;

  constructor(options: GceMetadataOptions = {}) {
    this.url = (options.url || LINK_LOCAL_METADATA_URL).replace(/\/+$/, '');
    this.#timeoutMs = options.timeoutMs ?? 2000;
    this.#waitS = Math.max(1, Math.floor(options.waitS ?? 60));
    this.#configAttribute = options.configAttribute || DEFAULT_CONFIG_ATTRIBUTE;
    this.#retry = options.retry ?? {};
  }

  /**
   * The value at `path` under `/computeMetadata/v1/`, or undefined (404).
   * With `lastEtag`, a hanging GET: it answers when the value's ETag is no
   * longer `lastEtag`, or after `waitS` with the value unchanged.
   */
  async get(path: string, signal: AbortSignal, lastEtag?: string | null): Promise<Tagged | undefined> {
    const waiting = lastEtag !== undefined;
    const query = waiting ? `?wait_for_change=true&timeout_sec=${this.#waitS}${lastEtag === null ? '' : `&last_etag=${encodeURIComponent(lastEtag)}`}` : '';
    const url = `${this.url}/computeMetadata/v1/${path}`;
    const response = await metadataCall(url + query, {
      headers: { 'Metadata-Flavor': 'Google' },
      // A hanging GET is allowed its wait, and then an ordinary call's time.
      timeoutMs: this.#timeoutMs + (waiting ? this.#waitS * 1000 : 0),
      signal,
    }, { retry: this.#retry });
    if (response.status === 404) return undefined;
    if (response.status !== 200) throw new MetadataStatusError(`GET ${url}`, response.status);
    return { value: response.body, etag: response.headers.get('etag') };
  }

  async identity({ signal }: { signal: AbortSignal }): Promise<HostIdentity> {
    const read = async (path: string) => {
      const tagged = await this.get(`instance/${path}`, signal);
      if (tagged === undefined) throw new MetadataStatusError(`GET ${this.url}/computeMetadata/v1/instance/${path}`, 404);
      return tagged.value.trim();
    };
    const [instanceId, name, zonePath, typePath, hostname] = await Promise.all([read('id'), read('name'), read('zone'), read('machine-type'), read('hostname')]);
    // `projects/123/zones/us-central1-a` -> `us-central1-a`, in region `us-central1`.
    const zone = zonePath.split('/').pop()!;
    return {
      hostname,
      facts: { cloud: 'gce', instanceId, name, machineType: typePath.split('/').pop()!, zone, region: zone.replace(/-[a-z]$/, '') },
    };
  }

  /** The settings attribute (`drover-config`), unless the instance has none. */
  async userConfig(signal: AbortSignal): Promise<InstanceConfig | undefined> {
    const tagged = await this.get(`instance/attributes/${encodeURIComponent(this.#configAttribute)}`, signal);
    if (tagged === undefined || tagged.value.trim() === '') return undefined;
    return { source: `the instance attribute ${this.#configAttribute}`, text: tagged.value };
  }

  /** Watches `preempted` and `maintenance-event` at once; the first notice stops both. */
  async watch({ signal, logger, onNotice }: Parameters<InstanceMetadata['watch']>[0]): Promise<void> {
    const stop = new AbortController();
    const both = AbortSignal.any([signal, stop.signal]);
    const watchValue = async (path: string, react: (value: string) => void) => {
      let etag: string | null | undefined; // undefined: read the value first, without waiting
      let failures = 0;
      while (!both.aborted) {
        try {
          const tagged = await this.get(path, both, etag);
          if (failures > 0) logger.info(`${path} can be read again`);
          failures = 0;
          // Both values always exist on Compute Engine; a 404 is retried like any failure, never in a tight loop.
          if (tagged === undefined) throw new MetadataStatusError(`GET ${this.url}/computeMetadata/v1/${path}`, 404);
          etag = tagged.etag;
          react(tagged.value.trim());
        } catch (error) {
          if (both.aborted) return;
          if (failures === 0) logger.warn(`cannot watch ${path}; still trying`, { error: errorMessage(error) });
          failures++;
          etag = undefined;
          await sleep(backoffDelay(failures, { baseDelayMs: 1000, maxDelayMs: 30_000 }), undefined, { signal: both }).catch(() => undefined);
        }
      }
    };
    const notice = (message: string, noticeMs: number) => {
      stop.abort();
      onNotice({ message, goneAt: Date.now() + noticeMs });
    };
    await Promise.all([
      watchValue('instance/preempted', (value) => {
        if (value === 'TRUE') notice('preemption: Compute Engine is stopping the instance', PREEMPTION_NOTICE_MS);
      }),
      watchValue('instance/maintenance-event', (value) => {
        if (value.startsWith('TERMINATE')) notice(`host maintenance: ${value}`, MAINTENANCE_NOTICE_MS);
        else if (value !== 'NONE') logger.info('host maintenance: the instance is live-migrated and keeps running', { event: value });
      }),
    ]);
  }
}

export interface GceHostOptions extends GceMetadataOptions {
  readonly workDir: string;
}

/** This Compute Engine instance: tasks run here; a preemption or terminating maintenance shuts the worker down in time. */
export class GceHost extends InstanceHost {
  constructor(options: GceHostOptions) {
    super('gce', new GceMetadata(options), options);
  }
}
