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
 * gracefully, with `shutdown.reason` as the reason.
 */
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
  transport(): Transport;
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
