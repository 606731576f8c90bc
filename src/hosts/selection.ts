/**
 * Host selection over a set of machines: which one runs the next task.
 *
 * Strategies (`selection`):
 *   random        any machine with a free slot, uniformly
 *   round-robin   the next machine with a free slot, in order
 *   least-loaded  the machine running the fewest tasks of the same script
 *                 name (geto's rule), then the fewest tasks at all
 * Every strategy respects each machine's `capacity` and each script name's
 * `maxConcurrent` per machine, and skips machines that are down.
 *
 * Health: a machine is marked down when its connection is lost or cannot be
 * made, or a command cannot be started on it; every slot held there is then
 * told (`lost`). Each such failure is a strike; `strikes` failures in a row
 * retire the machine for the rest of the pool's life. A down machine is
 * probed again after `probationMs`, and comes back when the probe works.
 */
import { ConfigError, ResourceUnavailableError, errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import type { Transport } from './transport.js';

export type SelectionStrategy = 'random' | 'round-robin' | 'least-loaded';
export const SELECTION_STRATEGIES: readonly SelectionStrategy[] = ['random', 'round-robin', 'least-loaded'];

export interface MachineSpec<T extends Transport> {
  /** The machine's name in logs: `user@name:port`. */
  readonly address: string;
  readonly transport: T;
  /** Tasks at once; at least 1. */
  readonly capacity: number;
  readonly labels?: readonly string[];
}

export type MachineState = 'up' | 'down' | 'retired';

export interface MachineStatus {
  readonly address: string;
  readonly state: MachineState;
  readonly running: number;
  readonly capacity: number;
  readonly strikes: number;
  readonly labels: readonly string[];
  /** Why it is down or retired. */
  readonly error?: string;
}

export interface SlotRequest {
  readonly name?: string;
  readonly maxConcurrent?: number;
  readonly labels?: readonly string[];
  /** Only this machine (by address); else the strategy picks. */
  readonly address?: string;
  /** Overrides the pool's strategy for this request. */
  readonly strategy?: SelectionStrategy;
  readonly signal?: AbortSignal;
}

export interface Slot<T extends Transport> {
  readonly address: string;
  readonly transport: T;
  /** Aborted with an Error when the machine goes down while the slot is held. */
  readonly lost: AbortSignal;
  /** Gives the slot back; idempotent. */
  release(): void;
}

export interface MachinePoolOptions {
  readonly strategy?: SelectionStrategy;
  /** Failures in a row that retire a machine; default 3. */
  readonly strikes?: number;
  /** How long a down machine rests before it is probed again; default 30000 ms. */
  readonly probationMs?: number;
  /** How often down machines are looked at; default 1000 ms. */
  readonly checkIntervalMs?: number;
  /** Checks a machine: resolves when it works. */
  readonly probe: (transport: Transport) => Promise<void>;
  readonly logger?: Logger;
  readonly random?: () => number;
}

interface Machine<T extends Transport> {
  readonly spec: MachineSpec<T>;
  readonly labels: readonly string[];
  state: MachineState;
  strikes: number;
  downSince: number;
  error?: string;
  probing: boolean;
  readonly byName: Map<string, number>;
  readonly slots: Set<AbortController>;
}

/**
 * Picks among machines that can take the request; undefined when none can.
 * `cursor` is the round-robin position, advanced past the pick.
 */
export function pickMachine<M extends { readonly running: number; readonly capacity: number; byName(name: string): number }>(
  strategy: SelectionStrategy,
  candidates: readonly M[],
  name: string | undefined,
  cursor: { value: number },
  random: () => number = Math.random,
): M | undefined {
  if (candidates.length === 0) return undefined;
  if (strategy === 'random') return candidates[Math.floor(random() * candidates.length)];
  // Start from the cursor so ties (and round-robin) rotate through the machines.
  const start = cursor.value % candidates.length;
  const ordered = [...candidates.slice(start), ...candidates.slice(0, start)];
  let pick = ordered[0]!;
  if (strategy === 'least-loaded') {
    const load = (m: M) => [name === undefined ? 0 : m.byName(name), m.running / m.capacity] as const;
    for (const candidate of ordered) {
      const [a, b] = load(candidate);
      const [bestA, bestB] = load(pick);
      if (a < bestA || (a === bestA && b < bestB)) pick = candidate;
    }
  }
  cursor.value = candidates.indexOf(pick) + 1;
  return pick;
}

export class MachinePool<T extends Transport> {
  readonly #machines: Machine<T>[];
  readonly #options: MachinePoolOptions;
  readonly #waiters = new Set<() => void>();
  readonly #cursor = { value: 0 };
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(specs: readonly MachineSpec<T>[], options: MachinePoolOptions) {
    const seen = new Set<string>();
    for (const spec of specs) {
      if (seen.has(spec.address)) throw new ConfigError(`host ${spec.address} is listed twice`);
      seen.add(spec.address);
      if (!Number.isInteger(spec.capacity) || spec.capacity < 1) throw new ConfigError(`host ${spec.address}: capacity must be a whole number of at least 1`);
    }
    this.#machines = specs.map((spec) => ({ spec, labels: spec.labels ?? [], state: 'up', strikes: 0, downSince: 0, probing: false, byName: new Map(), slots: new Set() }));
    this.#options = options;
  }

  /** Sum of every machine's capacity. */
  get capacity(): number {
    return this.#machines.reduce((sum, m) => sum + m.spec.capacity, 0);
  }

  status(): MachineStatus[] {
    return this.#machines.map((m) => ({
      address: m.spec.address,
      state: m.state,
      running: m.slots.size,
      capacity: m.spec.capacity,
      strikes: m.strikes,
      labels: m.labels,
      ...(m.error === undefined ? {} : { error: m.error }),
    }));
  }

  machines(): readonly MachineSpec<T>[] {
    return this.#machines.map((m) => m.spec);
  }

  /**
   * Probes every machine once, at once; those that fail are marked down. Starts the probation timer,
   * unless the pool was closed meanwhile (a worker that stopped while it booted): a closed pool probes no more.
   */
  async start(): Promise<void> {
    await Promise.all(this.#machines.map((m) => this.#probe(m)));
    if (this.#closed || this.#timer !== undefined) return;
    this.#timer = setInterval(() => this.#recheck(), this.#options.checkIntervalMs ?? 1000);
    this.#timer.unref();
  }

  /** Takes a slot; waits while every eligible machine is full; rejects with ResourceUnavailableError when none is up. */
  async acquire(request: SlotRequest = {}): Promise<Slot<T>> {
    for (;;) {
      request.signal?.throwIfAborted();
      if (this.#closed) throw new ResourceUnavailableError('the host pool is closed');
      const matching = this.#machines.filter((m) => (request.address === undefined || m.spec.address === request.address) && (request.labels ?? []).every((label) => m.labels.includes(label)));
      if (matching.length === 0) {
        throw new ResourceUnavailableError(request.address !== undefined ? `no host ${request.address} in the pool` : `no host has the labels ${(request.labels ?? []).join(', ')}`);
      }
      const live = matching.filter((m) => m.state === 'up');
      if (live.length === 0) {
        throw new ResourceUnavailableError(`no host is up: ${matching.map((m) => `${m.spec.address} is ${m.state}${m.error ? ` (${m.error})` : ''}`).join('; ')}`);
      }
      const name = request.name;
      const free = live.filter((m) => m.slots.size < m.spec.capacity && (name === undefined || request.maxConcurrent === undefined || (m.byName.get(name) ?? 0) < request.maxConcurrent));
      const views = free.map((m) => ({ machine: m, running: m.slots.size, capacity: m.spec.capacity, byName: (n: string) => m.byName.get(n) ?? 0 }));
      const pick = pickMachine(request.strategy ?? this.#options.strategy ?? 'least-loaded', views, name, this.#cursor, this.#options.random);
      if (pick !== undefined) return this.#take(pick.machine, name);
      await this.#wait(request.signal);
    }
  }

  #take(machine: Machine<T>, name: string | undefined): Slot<T> {
    const lost = new AbortController();
    machine.slots.add(lost);
    if (name !== undefined) machine.byName.set(name, (machine.byName.get(name) ?? 0) + 1);
    let released = false;
    return {
      address: machine.spec.address,
      transport: machine.spec.transport,
      lost: lost.signal,
      release: () => {
        if (released) return;
        released = true;
        machine.slots.delete(lost);
        if (name !== undefined) {
          const left = (machine.byName.get(name) ?? 1) - 1;
          if (left === 0) machine.byName.delete(name);
          else machine.byName.set(name, left);
        }
        this.#wake();
      },
    };
  }

  /** A machine failed (lost connection, a command that could not start): it is down, and its slots are told. */
  markDown(address: string, error: unknown): void {
    const machine = this.#machines.find((m) => m.spec.address === address);
    if (machine === undefined || machine.state === 'retired') return;
    this.#strike(machine, error);
  }

  /** A command started on the machine: its strikes start over. */
  markWorking(address: string): void {
    const machine = this.#machines.find((m) => m.spec.address === address);
    if (machine !== undefined && machine.state === 'up') machine.strikes = 0;
  }

  #strike(machine: Machine<T>, error: unknown): void {
    const message = errorMessage(error);
    const wasUp = machine.state === 'up';
    machine.strikes++;
    machine.error = message;
    machine.downSince = Date.now();
    const limit = this.#options.strikes ?? 3;
    machine.state = machine.strikes >= limit ? 'retired' : 'down';
    const logger = this.#options.logger;
    if (machine.state === 'retired') logger?.error('host retired for the rest of this run', { host: machine.spec.address, strikes: machine.strikes, error: message });
    else if (wasUp) logger?.warn('host down', { host: machine.spec.address, strikes: machine.strikes, error: message });
    else logger?.warn('host still down', { host: machine.spec.address, strikes: machine.strikes, error: message });
    const reason = new Error(`host ${machine.spec.address} went down: ${message}`);
    for (const slot of machine.slots) slot.abort(reason);
    // Waiters may now have nowhere to go: let them see it and reject.
    this.#wake();
  }

  async #probe(machine: Machine<T>): Promise<void> {
    if (machine.probing) return;
    machine.probing = true;
    try {
      await this.#options.probe(machine.spec.transport);
      if (machine.state !== 'up') this.#options.logger?.info('host is back', { host: machine.spec.address });
      machine.state = 'up';
      machine.error = undefined;
      this.#wake();
    } catch (error) {
      if (machine.state !== 'retired') this.#strike(machine, error);
    } finally {
      machine.probing = false;
    }
  }

  #recheck(): void {
    const probation = this.#options.probationMs ?? 30_000;
    for (const machine of this.#machines) {
      if (machine.state === 'down' && Date.now() - machine.downSince >= probation) void this.#probe(machine);
    }
  }

  #wait(signal: AbortSignal | undefined): Promise<void> {
    return new Promise((resolve, reject) => {
      const wake = () => {
        signal?.removeEventListener('abort', onAbort);
        this.#waiters.delete(wake);
        resolve();
      };
      const onAbort = () => {
        this.#waiters.delete(wake);
        reject(signal!.reason);
      };
      this.#waiters.add(wake);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  #wake(): void {
    for (const wake of [...this.#waiters]) wake();
  }

  close(): void {
    this.#closed = true;
    clearInterval(this.#timer);
    this.#wake();
  }
}
