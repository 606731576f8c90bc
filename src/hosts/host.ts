/**
 * Host: a machine tasks run on, reached through a transport, with a life of its own.
 *
 * Lifecycle, driven by the worker machine:
 *  1. `boot()` once, in the worker's `booting` state: learn identity and
 *     config, start watching for shutdown notices, reap what a crashed
 *     predecessor left behind. A rejection stops the worker (exit code 70).
 *  2. `transport()` for every task, any number of times, concurrently.
 *  3. `dispose()` once, last thing in `shuttingDown`; idempotent; it must
 *     not throw for things already gone.
 *
 * `shutdown` is aborted when the host itself wants the worker gone (spot
 * interruption, preemption, a local signal); the worker then shuts down
 * gracefully, with `shutdown.reason` as the reason. When the machine goes
 * away at a known time, the host sets `shutdownDeadline` before it aborts
 * `shutdown`, and the worker aborts the tasks still running early enough to
 * report them and upload their logs before then.
 */
import type { Claim } from '../model/task.js';
import type { Logger } from '../runtime/logger.js';
import type { Transport } from './transport.js';

export interface HostBootOptions {
  readonly logger: Logger;
  readonly signal: AbortSignal;
}

export interface HostIdentity {
  /** Stable name of the machine, used in worker ids and logs. */
  readonly hostname: string;
  /** Extra facts shown in `drover task`: instance type, region, ... */
  readonly facts: Readonly<Record<string, string>>;
}

export interface Host {
  readonly name: string;
  boot(options: HostBootOptions): Promise<HostIdentity>;
  /** Aborted (with a reason string) when the host asks the worker to stop. */
  readonly shutdown: AbortSignal;
  /** When the machine goes away (epoch ms), if `shutdown` was aborted for a reason that says so. */
  readonly shutdownDeadline?: number | undefined;
  transport(): Transport;
  /**
   * Hosts that stand for several machines (`ssh`) choose one per run. The
   * runtime calls it in `loading`, after the payload is validated and before
   * the task directory is made, and releases the placement last thing in
   * `cleanup`, on every path. It waits (bounded by `signal`) while every
   * live machine is full; it rejects with ResourceUnavailableError when no
   * machine is up at all. Hosts without it run every task through
   * `transport()` under the worker's work directory.
   */
  place?(request: PlacementRequest): Promise<Placement>;
  /**
   * Where the runtime records, before a sandbox starts, what a run will
   * leave behind, so that a worker starting after a crash can reap it
   * (see CrashJournal). Hosts whose tasks cannot outlive the worker omit it.
   */
  readonly journal?: RunJournal;
  dispose(): Promise<void>;
}

export interface RunJournal {
  begin(entry: { readonly cookie: string; readonly runKey: string; readonly taskDir: string }): void;
  end(cookie: string): void;
}

export interface PlacementRequest {
  readonly claim: Claim;
  /** The task's script name: `least-loaded` balances by it, and `maxConcurrent` counts it. */
  readonly name?: string;
  /** At most this many runs of `name` at once on one machine. */
  readonly maxConcurrent?: number;
  /** Only machines that carry every one of these labels. */
  readonly labels?: readonly string[];
  readonly signal: AbortSignal;
}

/** One run's slot on one machine. */
export interface Placement {
  readonly transport: Transport;
  /** The machine, for logs: `user@name:port`. */
  readonly host: string;
  /** Task directories go under it, on that machine. */
  readonly workDir: string;
  /** Aborted (with an Error) when that machine goes down while the run holds the slot. */
  readonly lost: AbortSignal;
  /** Gives the slot back; idempotent. */
  release(): void;
}
