/**
 * A fleet: the instances one session launches on one provider, each
 * driven by its own instance machine (src/machines/instance.ts), whose
 * actors are provided here:
 *
 *   launch       provider.launch, with drover's tags and a fresh token
 *   waitRunning  provider.waitUntilRunning; the SSH address is
 *                `sshUser@<public ip, else private ip>:<drover:ssh-port tag, else sshPort, else 22>`
 *   probeSsh     an SSH connection running `true`, tried every
 *                probeIntervalMs until it works (the machine's sshTimeout
 *                bounds it)
 *   terminate    provider.terminate
 *
 * A ready instance is an SSH host entry (`hosts()`), labelled
 * `instance=<id>`; batch --provider will hand them to the `ssh` host and
 * send TASK_STARTED / TASK_FINISHED as it places runs. `dispose()` sends
 * DISPOSE to every machine and resolves once all have ended; the leaked
 * ones with an id are handed to the watchdog, and an instance that a launch
 * of unknown outcome may have made is a leftover of the session once it
 * closes (the owner's final sweep, providerHosts', finds it by its tags).
 * The session is open in the registry
 * from before the first launch until every machine ended, so a crash at
 * any point leaves instances the watchdog recognises as leftovers.
 */
import { createHash, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { createActor, fromPromise, toPromise, type Actor } from 'xstate';
import { instanceMachine, type InstanceInput, type InstanceOutput, type LaunchFailure } from '../machines/instance.js';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import { SshTransport, type SshConnectionOptions } from '../hosts/ssh-transport.js';
import { CloudError, type CloudInstance, type LaunchSpec, type Provider } from './provider.js';
import { ownerId, type SessionRegistry } from './sessions.js';
import type { Watchdog } from './watchdog.js';

export const DEFAULT_INSTANCE_TIMING: InstanceInput = {
  bootTimeoutMs: 600_000,
  sshTimeoutMs: 300_000,
  drainTimeoutMs: 30_000,
  // About two hours of retries at the 5-minute cap, as cloudtask does.
  terminateAttempts: 30,
  terminateBackoffMs: 5000,
  terminateMaxBackoffMs: 300_000,
};

export interface FleetOptions {
  readonly provider: Provider;
  /** What to launch; drover adds its session and owner tags and a launch token. */
  readonly spec: Omit<LaunchSpec, 'session' | 'owner' | 'token'>;
  readonly session: string;
  /** Default: this process (`<hostname>/<pid>`). */
  readonly owner?: string;
  /** The login user of the image (`ec2-user`, `ubuntu`, ...). */
  readonly sshUser: string;
  /** When the instance has no drover:ssh-port tag; default 22. */
  readonly sshPort?: number;
  /** Connect to the private address even when there is a public one. */
  readonly privateAddress?: boolean;
  /** Keys, known_hosts and host key policy for the probe (and for the hosts it makes). */
  readonly ssh: SshConnectionOptions;
  /** Tasks at once on each instance's host entry; default: the ssh host's default. */
  readonly capacity?: number;
  readonly timing?: Partial<InstanceInput>;
  /** How often waitRunning asks the cloud; default 2000 ms. */
  readonly pollMs?: number;
  /** Pause between SSH probes; default 2000 ms. */
  readonly probeIntervalMs?: number;
  readonly registry: SessionRegistry;
  /** Takes the instances that leak; without one they are only logged (and found by a later `drover instances --cleanup`). */
  readonly watchdog?: Watchdog;
  readonly logger?: Logger;
}

interface Member {
  readonly actor: Actor<typeof instanceMachine>;
  readonly done: Promise<InstanceOutput>;
}

export class InstanceFleet {
  readonly #options: FleetOptions;
  readonly #members: Member[] = [];
  readonly #ready = new Map<Member, { id: string; address: string }>();
  #opened = false;
  #disposed: Promise<InstanceOutput[]> | undefined;

  constructor(options: FleetOptions) {
    this.#options = options;
  }

  /**
   * Launches `count` instances and resolves once each is ready or has
   * ended (failed to boot or answer; it is then terminated), with the
   * host entries of the ready ones.
   */
  async launch(count: number): Promise<SshHostEntry[]> {
    if (this.#disposed !== undefined) throw new CloudError('the fleet is disposed: it launches nothing more');
    if (!this.#opened) {
      this.#options.registry.open({ session: this.#options.session, owner: this.#owner, provider: this.#options.provider.name });
      this.#opened = true;
    }
    const started = Array.from({ length: count }, () => this.#start());
    await Promise.all(started.map((member) => new Promise<void>((resolve) => {
      const check = () => {
        const snapshot = member.actor.getSnapshot();
        if (snapshot.status !== 'active' || snapshot.matches('ready')) {
          subscription.unsubscribe();
          resolve();
        }
      };
      const subscription = member.actor.subscribe({ next: check, error: () => resolve(), complete: () => resolve() });
      check();
    })));
    return this.hosts();
  }

  /** The ready instances, as SSH host entries. */
  hosts(): SshHostEntry[] {
    return [...this.#ready.values()].map(({ id, address }) => ({
      address,
      labels: [`instance=${id}`],
      ...(this.#options.capacity === undefined ? {} : { capacity: this.#options.capacity }),
    }));
  }

  /** Every machine's state now, for logs and tests: `i-0abc: ready`. */
  states(): { id: string | undefined; state: string }[] {
    return this.#members.map(({ actor }) => {
      const snapshot = actor.getSnapshot();
      return { id: snapshot.context.instanceId, state: typeof snapshot.value === 'string' ? snapshot.value : JSON.stringify(snapshot.value) };
    });
  }

  /** Tells the machine of the instance behind `address` that a task started or finished there. */
  taskStarted(address: string): void {
    this.#memberAt(address)?.actor.send({ type: 'TASK_STARTED' });
  }

  taskFinished(address: string): void {
    this.#memberAt(address)?.actor.send({ type: 'TASK_FINISHED' });
  }

  /** Takes one instance out: it is terminated once idle. Resolves with how it ended. */
  scaleIn(address: string): Promise<InstanceOutput> | undefined {
    const member = this.#memberAt(address);
    if (member === undefined) return undefined;
    this.#ready.delete(member);
    member.actor.send({ type: 'SCALE_IN' });
    return member.done;
  }

  /**
   * Terminates every instance (after a drain bounded by drainTimeout),
   * hands the leaked ones to the watchdog, closes the session; resolves
   * with how each ended. Idempotent.
   */
  dispose(): Promise<InstanceOutput[]> {
    this.#disposed ??= (async () => {
      this.#ready.clear();
      for (const member of this.#members) member.actor.send({ type: 'DISPOSE' });
      const outputs = await Promise.all(this.#members.map((member) => member.done));
      const leaked = outputs.filter((output) => output.outcome === 'leaked');
      const { watchdog, provider, session, logger } = this.#options;
      for (const output of leaked) {
        if (output.instanceId === undefined) {
          logger?.error('a launch of unknown outcome may have made an instance: once the session is closed, a watchdog sweep or drover instances --cleanup finds it by its tags as a leftover', { provider: provider.name, session, reason: output.reason });
        } else if (watchdog !== undefined) {
          watchdog.adopt(provider, output.instanceId);
          logger?.error('instance leaked: handed to the watchdog, whose sweeps go on terminating it', { provider: provider.name, instance: output.instanceId, session, reason: output.reason });
        } else {
          logger?.error('instance leaked, and there is no watchdog: run drover instances --cleanup', { provider: provider.name, instance: output.instanceId, session, reason: output.reason });
        }
      }
      // With the session closed, the watchdog (and `drover instances --cleanup`) treats whatever is left of it as a leftover.
      if (this.#opened) this.#options.registry.close(this.#options.session);
      return outputs;
    })();
    return this.#disposed;
  }

  get #owner(): string {
    return this.#options.owner ?? ownerId();
  }

  #memberAt(address: string): Member | undefined {
    return [...this.#ready].find(([, ready]) => ready.address === address)?.[0];
  }

  #addressOf(instance: CloudInstance): string {
    const ip = this.#options.privateAddress ? instance.privateIp : (instance.publicIp ?? instance.privateIp);
    if (ip === undefined) throw new CloudError(`${this.#options.provider.name} instance ${instance.id}: runs without an address`);
    return `${this.#options.sshUser}@${ip}:${instance.sshPort ?? this.#options.sshPort ?? 22}`;
  }

  #start(): Member {
    const { provider, spec, session, logger } = this.#options;
    const token = `drover-${createHash('sha256').update(`${session}/${randomUUID()}`).digest('hex').slice(0, 40)}`;
    const machine = instanceMachine.provide({
      actors: {
        launch: fromPromise(async ({ signal }) => {
          try {
            const instance = await provider.launch({ ...spec, session, owner: this.#owner, token }, { signal });
            return { id: instance.id };
          } catch (error) {
            throw Object.assign(error instanceof Error ? error : new Error(String(error)), { nothingLaunched: error instanceof CloudError && error.refused } satisfies LaunchFailure);
          }
        }),
        waitRunning: fromPromise(async ({ input, signal }) => {
          const instance = await provider.waitUntilRunning(input.id, { signal, ...(this.#options.pollMs === undefined ? {} : { pollMs: this.#options.pollMs }) });
          return { id: instance.id, address: this.#addressOf(instance) };
        }),
        probeSsh: fromPromise(async ({ input, signal }) => {
          await probeSsh(input.address, this.#options.ssh, this.#options.probeIntervalMs ?? 2000, signal, logger);
        }),
        terminate: fromPromise(async ({ input, signal }) => {
          await provider.terminate(input.id, { signal });
        }),
      },
    });
    const actor = createActor(machine, { input: { ...DEFAULT_INSTANCE_TIMING, ...this.#options.timing } });
    const member: Member = { actor, done: toPromise(actor) as Promise<InstanceOutput> };
    let last = '';
    actor.subscribe((snapshot) => {
      const state = typeof snapshot.value === 'string' ? snapshot.value : Object.entries(snapshot.value).map(([k, v]) => `${k}.${String(v)}`).join();
      if (state === last) return;
      last = state;
      logger?.info('instance', { provider: provider.name, session, instance: snapshot.context.instanceId, state, ...(snapshot.context.reason ? { reason: snapshot.context.reason } : {}) });
      if (state === 'ready' && !this.#disposed) this.#ready.set(member, { id: snapshot.context.instanceId!, address: snapshot.context.address! });
      if (state !== 'ready') this.#ready.delete(member);
    });
    this.#members.push(member);
    actor.start();
    return member;
  }
}

/** Resolves once `address` runs `true` over SSH; tries every `intervalMs` until `signal` aborts. */
export async function probeSsh(address: string, ssh: SshConnectionOptions, intervalMs: number, signal: AbortSignal, logger?: Logger): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    signal.throwIfAborted();
    const transport = new SshTransport({ ...ssh, address, connectTimeoutMs: Math.min(ssh.connectTimeoutMs ?? 10_000, 10_000) });
    try {
      const { exitCode, stderr } = await transport.run('true');
      if (exitCode === 0) return;
      logger?.debug('ssh probe: the command failed', { host: address, attempt, exitCode, stderr: stderr.trim() });
    } catch (error) {
      logger?.debug('ssh probe: no answer yet', { host: address, attempt, error: errorMessage(error) });
    } finally {
      await transport.close().catch(() => {});
    }
    await sleep(intervalMs, undefined, { signal });
  }
}
