/**
 * The local transport (commands and files on this machine) and the
 * `hardware` host (this machine, as is).
 *
 * Every command runs in a new session, so in a process group of its own
 * whose id is the main process's pid: `kill()` signals the whole group and
 * `waitGone()` watches it through /proc. Commands are started by a small
 * helper process, the spawner (spawner.ts), not by the worker itself.
 *
 * Limitation: a process stays in the command's group only as long as it
 * does not leave it itself (setsid(), setpgid(), e.g. `setsid cmd` or a
 * daemonizing service). Such an escapee is not signalled by `kill()` nor
 * waited for by `waitGone()`; it still carries DROVER_RUN_COOKIE in its
 * environment, and the crash journal finds it by that when it reaps.
 */
import { createWriteStream } from 'node:fs';
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
import { Spawner, type Spawned } from './spawner.js';
import { fileType, type DirectoryEntry, type ExecOptions, type Execution, type ExitStatus, type FileStat, type Transport, type TransportCapabilities } from './transport.js';

const POLL_MS = 20;

export interface LocalTransportOptions {
  /** When given, every started process group is noted in it (see CrashJournal.noteProcessGroup). */
  readonly journal?: CrashJournal;
  /** Where a failure to write the journal is reported; the command runs anyway (its cookie is journaled). */
  readonly logger?: Logger;
}

export class LocalTransport implements Transport {
  readonly capabilities: TransportCapabilities = { exec: true, files: true };
  readonly #journal: CrashJournal | undefined;
  readonly #logger: Logger | undefined;
  readonly #spawner: Spawner;

  constructor(options: LocalTransportOptions = {}) {
    this.#journal = options.journal;
    this.#logger = options.logger;
    this.#spawner = new Spawner({
      onDeath: (why) => this.#logger?.error(`${why}: the commands it started are killed`),
    });
  }

  async exec(argv: readonly string[], options: ExecOptions): Promise<LocalExecution> {
    const [file, ...args] = argv;
    if (file === undefined) return LocalExecution.failed(new Error('exec: empty argv'));
    const env = { ...options.env, DROVER_RUN_COOKIE: options.cookie };
    let spawned: Spawned;
    try {
      spawned = await this.#spawner.spawn({ file, args, cwd: options.cwd, env });
    } catch (error) {
      // ENOENT, EACCES, a bad cwd, a NUL byte in argv or env...
      return LocalExecution.failed(error instanceof Error ? error : new Error(String(error)));
    }
    // As soon as the pid is known. A crash before this line leaves the group unnoted, but every
    // process of it carries the cookie, which the journal was given before (and reaps by).
    if (this.#journal !== undefined) {
      try {
        this.#journal.noteProcessGroup(options.cookie, spawned.pid);
      } catch (error) {
        this.#logger?.warn('crash journal: cannot note process group', { pgid: spawned.pid, error: errorMessage(error) });
      }
    }
    return new LocalExecution(spawned);
  }

  /** Stops the spawner process (commands still running are killed, see Spawner.close). For a host that is disposed. */
  close(): void {
    this.#spawner.close();
  }

  async mkdir(path: string): Promise<void> {
    await mkdir(path, { recursive: true });
  }

  async remove(path: string): Promise<void> {
    // One rmdir(2) answers the common cases, a missing path and an empty directory; rm's
    // recursive walk (lstat first, then one call per entry) is for the rest.
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
