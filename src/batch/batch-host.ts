/**
 * The SSH host as a batch uses it: every run is placed on one of the
 * session's hosts (SshHost.place), and around that placement the batch
 * does its per-host work:
 *
 *   set-up     before a host's first job: the --overlay tree is copied into
 *              the remote user's home directory, then --pre runs there. A
 *              host whose set-up fails is retired, and the job is placed
 *              on another one.
 *   clean-up   after the last job (dispose): --post runs on every host that
 *              was set up and is still up.
 *   retire     a host that stops answering is retired at once (the pool's
 *              strikes are 1), and the batch retires one whose jobs fail
 *              --strikes times in a row; the jobs running there go back to
 *              the queue.
 *
 * It also remembers which host each task runs on, for the session's logs.
 */
import { basename, resolve as resolvePath } from 'node:path';
import type { Host, HostBootOptions, HostIdentity, Placement, PlacementRequest } from '../hosts/host.js';
import type { SshHost } from '../hosts/ssh-host.js';
import type { SshTransport } from '../hosts/ssh-transport.js';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';

export interface HostCommands {
  /** Shell command run on each host before its first job. */
  readonly pre?: string;
  /** Shell command run on each host after its last job. */
  readonly post?: string;
  /** Local directory whose contents are copied into each host's home directory before its first job. */
  readonly overlay?: string;
}

/** Output of a host command: where --pre and --post output goes, host by host. */
export type HostOutput = (host: string, text: string) => void;

export class BatchSshHost implements Host {
  readonly name = 'ssh';
  readonly #inner: SshHost;
  readonly #commands: HostCommands;
  readonly #output: HostOutput;
  readonly #setUp = new Map<string, Promise<void>>();
  readonly #hostOf = new Map<string, string>();
  #logger: Logger | undefined;

  constructor(inner: SshHost, commands: HostCommands, output: HostOutput) {
    this.#inner = inner;
    this.#commands = commands;
    this.#output = output;
  }

  get shutdown(): AbortSignal {
    return this.#inner.shutdown;
  }

  boot(options: HostBootOptions): Promise<HostIdentity> {
    this.#logger = options.logger;
    return this.#inner.boot(options);
  }

  transport() {
    return this.#inner.transport();
  }

  /** The host a task's current run was placed on. */
  hostOf(taskId: string): string | undefined {
    return this.#hostOf.get(taskId);
  }

  /** Every host: up, down or retired, with its running count. */
  status() {
    return this.#inner.status();
  }

  /** The remote user's home directory on that host: jobs get it as HOME, and the overlay goes there. */
  home(address: string): Promise<string> {
    return this.#transportOf(address).home();
  }

  /** Takes a host out of the batch for good; the jobs running there go back to the queue. */
  retire(address: string, why: string): void {
    this.#logger?.error('retiring host', { host: address, why });
    // The batch's pool retires a host at its first strike.
    this.#inner.pool.markDown(address, new Error(why));
  }

  async place(request: PlacementRequest): Promise<Placement> {
    // Bounded: every failed set-up retires a host, and place() rejects once none is up.
    for (;;) {
      const placement = await this.#inner.place(request);
      try {
        await this.#ensureSetUp(placement.host);
      } catch (error) {
        placement.release();
        this.retire(placement.host, `set-up failed: ${errorMessage(error)}`);
        continue;
      }
      this.#hostOf.set(request.claim.taskId, placement.host);
      return placement;
    }
  }

  async dispose(): Promise<void> {
    const { post } = this.#commands;
    if (post !== undefined) {
      const up = new Set(this.#inner.status().filter((machine) => machine.state === 'up').map((machine) => machine.address));
      await Promise.all([...this.#setUp.keys()].filter((address) => up.has(address)).map(async (address) => {
        const done = await this.#setUp.get(address)!.then(() => true, () => false);
        if (!done) return;
        await this.#run(address, 'post', post).catch((error: unknown) => this.#output(address, `--post failed: ${errorMessage(error)}\n`));
      }));
    }
    await this.#inner.dispose();
  }

  #ensureSetUp(address: string): Promise<void> {
    let setUp = this.#setUp.get(address);
    if (setUp === undefined) {
      setUp = this.#setUpHost(address);
      this.#setUp.set(address, setUp);
    }
    return setUp;
  }

  async #setUpHost(address: string): Promise<void> {
    const { overlay, pre } = this.#commands;
    if (overlay !== undefined) {
      const home = await this.home(address);
      this.#output(address, `copying the overlay ${basename(resolvePath(overlay))}/ into ${home}\n`);
      await this.#transportOf(address).upload(overlay, home);
    }
    if (pre !== undefined) await this.#run(address, 'pre', pre);
  }

  /** Runs --pre or --post in the remote home directory; a non-zero exit is an error. */
  async #run(address: string, which: 'pre' | 'post', command: string): Promise<void> {
    const transport = this.#transportOf(address);
    this.#output(address, `--${which}: ${command}\n`);
    const result = await transport.run(`cd && ${command}`);
    if (result.stdout) this.#output(address, result.stdout);
    if (result.stderr) this.#output(address, result.stderr);
    if (result.exitCode !== 0) throw new Error(`--${which} exited with ${result.exitCode ?? 'a signal'}`);
  }

  #transportOf(address: string): SshTransport {
    const machine = this.#inner.pool.machines().find((m) => m.address === address);
    if (machine === undefined) throw new Error(`no host ${address} in the batch`);
    return machine.transport;
  }
}
