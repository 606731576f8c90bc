/**
 * A batch on cloud instances (`drover batch --provider aws|gce`): a
 * BatchHostSource (hosts.ts) over an InstanceFleet (src/cloud/instance-runtime.ts).
 *
 * `open()` launches one instance per slot of the split, each with
 * capacity 1, and resolves once every one is ready (answers over SSH) or
 * has ended; the batch runs on the ready ones (it fails with
 * ResourceUnavailableError when none is). `close()` disposes the fleet:
 * every instance is terminated, each terminate call retried by the
 * instance machine; one that still leaks is handed to a watchdog, which
 * sweeps once more before close() returns (a fresh sweep, after any
 * under way), and is otherwise left to `drover instances --cleanup` (the
 * fleet's session is closed, so it is a leftover there). A launch of
 * unknown outcome (no instance id) gets that final sweep too: it finds an
 * instance the launch made by its tags. runSession calls close() on every
 * path: at the end, after an error, and after its signal aborted (Ctrl-C,
 * SIGTERM), also when that happens while the instances launch.
 *
 * A session records the launch parameters (`ProviderLaunch`, never
 * user-data or credentials), so that `--resume` launches fresh instances
 * like them.
 */
import { randomUUID } from 'node:crypto';
import { userInfo } from 'node:os';
import { InstanceFleet, type FleetOptions } from '../cloud/instance-runtime.js';
import type { Provider, ProviderName } from '../cloud/provider.js';
import type { SessionRegistry } from '../cloud/sessions.js';
import { Watchdog } from '../cloud/watchdog.js';
import { errorMessage, ResourceUnavailableError } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import type { SshConnectionOptions } from '../hosts/ssh-transport.js';
import type { BatchHostSource, BatchHostSet } from './hosts.js';

/** What a batch launches, as its session keeps it. */
export interface ProviderLaunch {
  readonly provider: ProviderName;
  readonly instanceType: string;
  readonly image: string;
  /** EC2 subnet id; GCE network. */
  readonly network?: string;
  /** EC2 key pair name; GCE `ssh-keys` line. */
  readonly key?: string;
  /** The image's login user. */
  readonly sshUser: string;
  /** The cloud settings given as batch options (`gce.zone`: ...), so that --resume launches in the same place. */
  readonly settings?: Readonly<Record<string, string>>;
}

export interface ProviderHostsOptions extends Omit<FleetOptions, 'session' | 'capacity' | 'logger'> {
  /** The fleet's drover:session tag; default `batch-<random>`. */
  readonly session?: string;
  /** Default: the batch's logger (its session.log). */
  readonly logger?: Logger;
}

/** The login user when none is given: EC2's images log in as ec2-user; on GCE, as gcloud does, this user. */
export function defaultSshUser(provider: ProviderName): string {
  return provider === 'aws' ? 'ec2-user' : userInfo().username;
}

/** One line for the parameter table and the session: what the batch runs on. */
export function describeLaunch(launch: ProviderLaunch, where: string): string {
  return `${launch.provider} (${where}): ${launch.instanceType} instances of ${launch.image}, one per slot`;
}

/** A host source that launches one instance per slot of the split and terminates them all at the end. */
export function providerHosts(options: ProviderHostsOptions): BatchHostSource & { readonly fleet: () => InstanceFleet | undefined } {
  const { provider, spec } = options;
  let fleet: InstanceFleet | undefined;
  let watchdog: Watchdog | undefined;
  let log: Logger | undefined;
  return {
    describe: () => describeLaunch({ provider: provider.name, instanceType: spec.instanceType, image: spec.image, sshUser: options.sshUser }, provider.where),
    fleet: () => fleet,
    async open({ split, signal, logger }): Promise<BatchHostSet> {
      log = options.logger ?? logger;
      watchdog = options.watchdog ?? new Watchdog({ providers: [provider], registry: options.registry, logger: log });
      // Our own watchdog sweeps now (what crashed batches left behind) and
      // every few minutes while the batch runs; one we are given is its owner's.
      if (options.watchdog === undefined) watchdog.start();
      const session = options.session ?? `batch-${randomUUID().slice(0, 8)}`;
      fleet = new InstanceFleet({ ...options, session, capacity: 1, watchdog, logger: log });
      log.info('launching instances', { provider: provider.name, where: provider.where, session, count: split });
      signal.throwIfAborted();
      let onAbort: (() => void) | undefined;
      const aborted = new Promise<never>((_, reject) => {
        onAbort = () => reject(new ResourceUnavailableError(`interrupted while ${split} ${provider.name} instances launched; they are terminated`));
        signal.addEventListener('abort', onAbort, { once: true });
      });
      let hosts: SshHostEntry[];
      try {
        hosts = await Promise.race([fleet.launch(split), aborted]);
      } finally {
        signal.removeEventListener('abort', onAbort!);
      }
      if (hosts.length === 0) throw new ResourceUnavailableError(`none of the ${split} ${provider.name} instances came up (see the session log for why)`);
      if (hosts.length < split) log.warn('some instances did not come up: the batch runs on the others', { ready: hosts.length, launched: split });
      return { hosts, connection: options.ssh };
    },
    async close(): Promise<void> {
      try {
        await closeFleet();
      } finally {
        if (options.watchdog === undefined) await watchdog?.stop();
      }
    },
  };

  async function closeFleet(): Promise<void> {
    if (fleet === undefined) return;
    const outputs = await fleet.dispose();
    log?.info('instances ended', { provider: provider.name, outcomes: outputs.map((o) => `${o.instanceId ?? '?'}: ${o.outcome}`).join(', ') });
    const unknownLaunches = outputs.filter((o) => o.outcome === 'leaked' && o.instanceId === undefined).length;
    if (watchdog === undefined || (watchdog.adopted().length === 0 && unknownLaunches === 0)) return;
    // One more try now, with the session closed: adopted instances, and whatever a launch of unknown
    // outcome made (a leftover by its tags). A sweep under way may have judged before either: it is
    // waited for, and a fresh one runs. What remains is a leftover for `drover instances --cleanup`.
    const sweep = await watchdog.freshSweep().catch((error: unknown) => ({ terminated: [], failed: [{ error: errorMessage(error) }] }));
    const left = watchdog.adopted();
    log?.info('final sweep', { provider: provider.name, terminated: sweep.terminated.map((r) => r.instance.id).join(', ') || '(none)', ...(unknownLaunches > 0 ? { launchesOfUnknownOutcome: unknownLaunches } : {}) });
    if (sweep.failed.length > 0 || left.length > 0) {
      log?.error('instances are left running: run drover instances --cleanup', {
        provider: provider.name,
        ...(left.length > 0 ? { adopted: left.join(', ') } : {}),
        ...(sweep.failed.length > 0 ? { failed: sweep.failed.map((f) => f.error).join('; ') } : {}),
      });
    }
  }
}

/**
 * The CLI's source: a provider made from the settings (cloud settings
 * aws.* / gce.*), and the open-session registry that `drover instances`
 * reads too (openCloudSessions in src/cli/instances.ts).
 */
export function launchSource(provider: Provider, launch: ProviderLaunch, registry: SessionRegistry, ssh: SshConnectionOptions, session: string): BatchHostSource {
  return providerHosts({
    provider,
    spec: { image: launch.image, instanceType: launch.instanceType, ...(launch.network === undefined ? {} : { network: launch.network }), ...(launch.key === undefined ? {} : { key: launch.key }) },
    sshUser: launch.sshUser,
    ssh,
    session,
    registry,
  });
}
