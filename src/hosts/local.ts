/**
 * The local transport (commands and files on this machine) and the
 * `hardware` host (this machine, as is).
 *
 * Every command runs in a new session, so in a process group of its own
 * whose id is the main process's pid: `kill()` signals the whole group and
 * `waitGone()` waits until none of it is left.
 *
 * Commands are started by a helper process, not by the worker itself (Node
 * forks the whole calling process to start one): the agent, the same Perl
 * program that SSH hosts run (ssh-agent-program.ts), here a child process
 * whose stdin and stdout carry its frames. It forks and execs each command
 * and sends its output back as frames: no file descriptors are passed and
 * nothing waits for the worker's event loop to acknowledge them. Where this
 * machine has no perl, the spawner (spawner.ts), a small Node process,
 * starts them instead and passes their pipes back.
 *
 * If the agent dies, the groups it started that were not known to be gone
 * are killed (SIGKILL) and their commands end with exit code 255; the next
 * command starts a new agent. If the worker dies, the agent sees its stdin
 * end and stops every group it started (SIGTERM, 5 s, SIGKILL); if both
 * die at once, the crash journal finds the commands by their cookie.
 *
 * The agent and the spawner run in a session of their own, as the commands
 * do: a Ctrl-C in the worker's terminal (SIGINT to its foreground process
 * group) reaches the worker alone, which lets running tasks finish within
 * its grace period; the helpers stop when the worker is gone.
 *
 * Limitation: a process stays in the command's group only as long as it
 * does not leave it itself (setsid(), setpgid(), e.g. `setsid cmd` or a
 * daemonizing service). Such an escapee is not signalled by `kill()` nor
 * waited for by `waitGone()`; it still carries DROVER_RUN_COOKIE in its
 * environment, and the crash journal finds it by that when it reaps.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, lstatSync } from 'node:fs';
import { lstat, mkdir, open, readdir, realpath, rm, rmdir, writeFile } from 'node:fs/promises';
import { arch, availableParallelism, hostname, platform, totalmem } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../runtime/logger.js';
import { errorMessage } from '../model/errors.js';
import type { Host, HostBootOptions, HostIdentity } from './host.js';
import { CrashJournal } from './journal.js';
import { groupExists, groupPids } from './proc.js';
import { RemoteAgent, type AgentChannel } from './ssh-agent.js';
import { Spawner, type Spawned } from './spawner.js';
import { fileType, type DirectoryEntry, type ExecOptions, type Execution, type ExitStatus, type FileStat, type Transport, type TransportCapabilities } from './transport.js';

const POLL_MS = 20;

export interface LocalTransportOptions {
  /** When given, every started process group is noted in it (see CrashJournal.noteProcessGroup). */
  readonly journal?: CrashJournal;
  /** Where a failure to write the journal is reported; the command runs anyway (its cookie is journaled). */
  readonly logger?: Logger;
  /** Start commands through the agent when this machine has perl (default true); false: through the spawner. */
  readonly agent?: boolean;
}

/** How the agent (and the spawner) stop the groups they started when the worker is gone. */
const AGENT_KILL_SIGNAL = 'TERM';
const AGENT_KILL_GRACE_MS = 5000;
/** How long the agent may take to start and say hello. */
const AGENT_START_TIMEOUT_MS = 10_000;
const NO_CHANGES = { removals: [], dirs: [] } as const;

export class LocalTransport implements Transport {
  readonly capabilities: TransportCapabilities = { exec: true, files: true };
  readonly #journal: CrashJournal | undefined;
  readonly #logger: Logger | undefined;
  readonly #spawner: Spawner;
  /** The agent, started by the first command; undefined when commands go through the spawner. */
  #agent: Promise<RemoteAgent | undefined> | undefined;
  #useAgent: boolean;
  /** Aborted by close(): an agent starting then gives up. */
  readonly #closing = new AbortController();

  constructor(options: LocalTransportOptions = {}) {
    this.#journal = options.journal;
    this.#logger = options.logger;
    this.#useAgent = options.agent ?? true;
    this.#spawner = new Spawner({
      onDeath: (why) => this.#logger?.error(`${why}: the commands it started are killed`),
      killSignal: `SIG${AGENT_KILL_SIGNAL}`,
      killGraceMs: AGENT_KILL_GRACE_MS,
    });
  }

  async exec(argv: readonly string[], options: ExecOptions): Promise<Execution & { readonly pgid: number | undefined }> {
    const [file, ...args] = argv;
    if (file === undefined) return LocalExecution.failed(new Error('exec: empty argv'));
    const env = { ...options.env, DROVER_RUN_COOKIE: options.cookie };
    const agent = await this.#agentFor();
    if (agent !== undefined) {
      let execution;
      try {
        execution = agent.exec({ argv, cwd: options.cwd, env, changes: NO_CHANGES, freshCwd: false }, () => {});
      } catch (error) {
        // A NUL byte in argv or env.
        return LocalExecution.failed(error instanceof Error ? error : new Error(String(error)));
      }
      await execution.started;
      if (execution.pid !== undefined) this.#noteGroup(options.cookie, execution.pid);
      return execution;
    }
    let spawned: Spawned;
    try {
      spawned = await this.#spawner.spawn({ file, args, cwd: options.cwd, env });
    } catch (error) {
      // ENOENT, EACCES, a bad cwd, a NUL byte in argv or env...
      return LocalExecution.failed(error instanceof Error ? error : new Error(String(error)));
    }
    this.#noteGroup(options.cookie, spawned.pid);
    return new LocalExecution(spawned);
  }

  /**
   * Notes a command's group in the journal as soon as its pid is known. A crash before that leaves the
   * group unnoted, but every process of it carries the cookie, which the journal was given before (and reaps by).
   */
  #noteGroup(cookie: string, pgid: number): void {
    if (this.#journal === undefined) return;
    try {
      this.#journal.noteProcessGroup(cookie, pgid);
    } catch (error) {
      this.#logger?.warn('crash journal: cannot note process group', { pgid, error: errorMessage(error) });
    }
  }

  /** The agent, started on first use; undefined when commands go through the spawner. */
  #agentFor(): Promise<RemoteAgent | undefined> {
    if (!this.#useAgent || this.#closing.signal.aborted) return Promise.resolve(undefined);
    this.#agent ??= this.#startAgent();
    return this.#agent;
  }

  async #startAgent(): Promise<RemoteAgent | undefined> {
    let channel: ReturnType<typeof processChannel> | undefined;
    const started = await RemoteAgent.start({
      address: 'this machine',
      killSignal: AGENT_KILL_SIGNAL,
      killGraceMs: AGENT_KILL_GRACE_MS,
      timeoutMs: AGENT_START_TIMEOUT_MS,
      connectionClosed: this.#closing.signal,
      logger: this.#logger,
      // Pipes have no Nagle's algorithm to answer.
      acknowledge: false,
      onBusy: (busy) => channel?.hold(busy),
      open: async (command, onChannel) => {
        // In a session of its own (detached), as its commands are: a Ctrl-C in the worker's terminal goes to the
        // worker's process group, and only the worker may hear it (it shuts down gracefully); the agent stops
        // when its stdin ends, which the worker's death, whatever kills it, brings about.
        channel = processChannel(spawn('/bin/sh', ['-c', command], { stdio: ['pipe', 'pipe', 'pipe'], detached: true }));
        return onChannel(channel);
      },
    });
    if (!(started instanceof RemoteAgent)) {
      this.#useAgent = false;
      this.#agent = undefined;
      if (started.noPerl) this.#logger?.info('this machine has no perl: commands are started by the spawner');
      else if (!this.#closing.signal.aborted) this.#logger?.warn('the agent did not start: commands are started by the spawner', { reason: started.reason });
      return undefined;
    }
    started.onClosed((inFlight) => {
      this.#agent = undefined;
      // Nobody is left to report on these groups or to stop them: they go now, as with a dead spawner.
      const orphans = inFlight.flatMap((execution) => (execution.pid === undefined || execution.groupGone ? [] : [execution.pid]));
      for (const pgid of orphans) {
        try {
          process.kill(-pgid, 'SIGKILL');
        } catch {
          // gone already
        }
      }
      if (orphans.length > 0) this.#logger?.error('the agent ended while commands ran: they are killed', { groups: orphans.length });
    });
    return started;
  }

  /** Stops the agent or the spawner (commands still running are killed). For a host that is disposed. */
  close(): void {
    this.#closing.abort();
    void this.#agent?.then((agent) => agent?.close());
    this.#spawner.close();
  }

  async mkdir(path: string): Promise<void> {
    await mkdir(path, { recursive: true });
  }

  async remove(path: string): Promise<void> {
    // A missing path is the most common case (the runtime clears a task directory before it makes it):
    // a synchronous lstat of a local path answers it in microseconds, without an error to build.
    if (lstatSync(path, { throwIfNoEntry: false }) === undefined) return;
    // One rmdir(2) answers an empty directory; rm's recursive walk (lstat first, then one call per
    // entry) is for the rest.
    try {
      await rmdir(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      await rm(path, { recursive: true, force: true });
    }
  }

  async stat(path: string): Promise<FileStat | undefined> {
    try {
      const stats = await lstat(path);
      return { type: fileType(stats), size: stats.size };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  }

  async list(path: string): Promise<DirectoryEntry[]> {
    return (await readdir(path, { withFileTypes: true })).map((entry) => ({ name: entry.name, type: fileType(entry) }));
  }

  realpath(path: string): Promise<string> {
    return realpath(path);
  }

  async readFile(path: string): Promise<Readable> {
    // Open first: a missing file rejects here (ENOENT), not later on the stream.
    const handle = await open(path, 'r');
    try {
      const stats = await handle.stat();
      if (stats.isDirectory()) {
        throw Object.assign(new Error(`EISDIR: illegal operation on a directory, read '${path}'`), {
          code: 'EISDIR',
          errno: -21,
          syscall: 'read',
          path,
        });
      }
    } catch (error) {
      await handle.close();
      throw error;
    }
    // 1 MiB reads: the default 64 KiB ones bound an artifact's upload at a
    // third of a plain copy's speed (bench/ANALYSIS.md); memory stays bounded.
    return handle.createReadStream({ highWaterMark: 1024 * 1024 });
  }

  async writeFile(path: string, data: Readable | Uint8Array | string): Promise<void> {
    if (data instanceof Readable) {
      await pipeline(data, createWriteStream(path));
    } else {
      await writeFile(path, data);
    }
  }

  join(...segments: string[]): string {
    return join(...segments);
  }
}

/** A command started by LocalTransport; `pgid` is its process group (undefined when it failed to start). */
export class LocalExecution implements Execution {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly exited: Promise<ExitStatus & { readonly startError?: Error }>;
  readonly pgid: number | undefined;
  /** Set once the group id is seen free: it may be reused, so it is never signalled again. */
  #groupFreed = false;

  /** An execution that never started: exit code 127 with `startError`. */
  static failed(startError: Error): LocalExecution {
    return new LocalExecution(undefined, startError);
  }

  constructor(spawned: Spawned | undefined, startError?: Error) {
    this.stdout = spawned?.stdout ?? emptyStream();
    this.stderr = spawned?.stderr ?? emptyStream();
    this.exited = spawned?.exited ?? Promise.resolve({ exitCode: 127, signal: null, startError: startError ?? new Error('not started') });
    this.pgid = spawned?.pid;
  }

  async kill(signal: NodeJS.Signals): Promise<void> {
    const pgid = this.pgid;
    if (pgid === undefined || this.#groupFreed) return;
    // Once no process (not even a zombie) has the group id, the kernel may
    // hand it to a new, unrelated group: do not signal that one.
    if (!groupExists(pgid)) {
      this.#groupFreed = true;
      return;
    }
    try {
      process.kill(-pgid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
    }
  }

  async waitGone(timeoutMs: number): Promise<boolean> {
    const pgid = this.pgid;
    if (pgid === undefined) return true;
    const deadline = performance.now() + Math.max(0, timeoutMs);
    for (;;) {
      // The cheap check first: once the group is empty, /proc need not be scanned.
      if (this.#groupFreed || !groupExists(pgid) || groupPids(pgid).length === 0) return true;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      await sleep(Math.min(POLL_MS, left));
    }
  }
}

/**
 * The agent's channel over a child process's pipes. The agent keeps the worker alive only while it
 * has commands in flight (`hold(true)`), as the spawner does: an idle transport does not hold a process open.
 */
function processChannel(child: ChildProcess): AgentChannel & { hold(busy: boolean): void } {
  // A failed start shows as the channel's close without a hello; a write after the agent died, the same.
  child.on('error', () => {});
  child.stdin!.on('error', () => {});
  const handles = [child, child.stdin, child.stdout, child.stderr] as unknown as { ref(): void; unref(): void }[];
  const hold = (busy: boolean) => handles.forEach((handle) => (busy ? handle.ref() : handle.unref()));
  hold(false);
  const on = (event: string, listener: (...args: any[]) => void) => (event === 'data' ? child.stdout!.on('data', listener) : child.on('exit', listener));
  return {
    hold,
    stderr: child.stderr!,
    on: on as AgentChannel['on'],
    once: (_event, listener) => child.once('close', listener),
    write: (data) => child.stdin!.write(data),
    end: () => child.stdin!.end(),
    close: () => child.kill('SIGKILL'),
  };
}

function emptyStream(): Readable {
  const stream = new PassThrough();
  stream.end();
  return stream;
}

export interface HardwareHostOptions {
  /** The worker's work directory; the crash journal lives in `<workDir>/journal`. */
  readonly workDir: string;
}

/**
 * This machine, as is: nothing to provision, nothing that asks the worker
 * to leave. Process signals (SIGTERM, SIGINT) are the CLI's to handle, not
 * the host's, so `shutdown` never fires here.
 */
export class HardwareHost implements Host {
  readonly name = 'hardware';
  readonly shutdown: AbortSignal = new AbortController().signal;
  readonly #journal: CrashJournal;
  #transport: LocalTransport | undefined;
  #logger: Logger | undefined;
  #disposed = false;

  constructor(options: HardwareHostOptions) {
    this.#journal = new CrashJournal(join(options.workDir, 'journal'));
  }

  get journal(): CrashJournal {
    return this.#journal;
  }

  async boot(options: HostBootOptions): Promise<HostIdentity> {
    this.#logger = options.logger;
    await mkdir(this.#journal.dir, { recursive: true });
    // Leftovers of a crashed predecessor go before this worker claims anything.
    await this.#journal.reap(options.logger);
    return {
      hostname: hostname(),
      facts: {
        platform: platform(),
        arch: arch(),
        cpus: String(availableParallelism()),
        memory: `${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
      },
    };
  }

  transport(): Transport {
    this.#transport ??= new LocalTransport(
      this.#logger === undefined ? { journal: this.#journal } : { journal: this.#journal, logger: this.#logger },
    );
    return this.#transport;
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    // Tasks release their own processes and directories; the journal's file goes when no entry is open.
    this.#transport?.close();
    this.#journal.close();
  }
}
