/**
 * The spawner: a small Node process that starts the local transport's
 * commands for it.
 *
 * Why: Node starts a command by forking the whole calling process (libuv
 * uses fork(2) on Linux), synchronously, so a spawn costs in proportion to
 * the caller's memory, and the copy-on-write faults that follow cost the
 * caller more. In a worker with a grown heap that blocked the event loop
 * for several milliseconds per command and made spawning the largest part
 * of a short task's cost (bench/ANALYSIS.md). A process that holds nothing
 * else forks in about half that time, beside the worker instead of inside
 * its event loop.
 *
 * The command's stdout and stderr are passed back to the worker over the
 * IPC channel (as file descriptors: output never goes through the
 * spawner), with its pid; its exit status follows as a message. Signals
 * go from the worker straight to the command's process group.
 *
 * If the spawner dies, every command it started that has not exited is
 * killed (SIGKILL to its process group) and ends so; the next command
 * starts a new spawner. If the worker dies (or closes it), the spawner
 * sees its channel close, stops every group it started that is still there
 * (killSignal, killGraceMs, SIGKILL), as the agent does, and exits; if both
 * die at once, the crash journal finds the commands by their cookie.
 *
 * The spawner runs in a session of its own, as its commands do: a Ctrl-C in
 * the worker's terminal (SIGINT to the terminal's foreground process group)
 * reaches the worker alone, which shuts down gracefully.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { PassThrough, type Readable } from 'node:stream';
import type { ExitStatus } from './transport.js';

export interface SpawnRequest {
  readonly file: string;
  readonly args: readonly string[];
  readonly cwd: string;
  readonly env: Readonly<Record<string, string>>;
}

/** A started command: the leader of a new session (and process group) whose id is `pid`. */
export interface Spawned {
  readonly pid: number;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Resolves when the command exits (or is killed because the spawner died). Never rejects. */
  readonly exited: Promise<ExitStatus>;
}

/** What the spawner sends back, by request id. */
type Reply =
  | { readonly id: number; readonly pid: number; readonly stream: 'stdout' }
  | { readonly id: number; readonly stream: 'stderr' }
  | { readonly id: number; readonly exit: readonly [number | null, NodeJS.Signals | null] }
  | { readonly id: number; readonly error: { readonly message: string; readonly code?: string } };

interface Pending {
  readonly started: (spawned: Spawned) => void;
  readonly failed: (error: Error) => void;
  readonly exit: (status: ExitStatus) => void;
  readonly exited: Promise<ExitStatus>;
  pid?: number;
  stdout?: Readable;
}

export class Spawner {
  #child: ChildProcess | undefined;
  #nextId = 0;
  readonly #pending = new Map<number, Pending>();
  readonly #onDeath: ((why: string) => void) | undefined;
  readonly #stop: SpawnerStop;

  /**
   * `onDeath` hears when the spawner process ended while commands were in its hands; `killSignal` and
   * `killGraceMs` (SIGTERM, 5000) say how it stops the groups it started once the worker is gone.
   */
  constructor(options: { readonly onDeath?: (why: string) => void; readonly killSignal?: NodeJS.Signals; readonly killGraceMs?: number } = {}) {
    this.#onDeath = options.onDeath;
    this.#stop = { signal: options.killSignal ?? 'SIGTERM', graceMs: Math.max(0, Math.round(options.killGraceMs ?? 5000)) };
  }

  /** Starts a command; rejects with the start error (ENOENT, EACCES...) as Node's spawn gives it. */
  spawn(request: SpawnRequest): Promise<Spawned> {
    const child = this.#process();
    const id = this.#nextId++;
    return new Promise<Spawned>((started, failed) => {
      let exit!: (status: ExitStatus) => void;
      const exited = new Promise<ExitStatus>((resolve) => (exit = resolve));
      this.#pending.set(id, { started, failed, exit, exited });
      child.channel?.ref();
      child.send({ id, ...request }, (error) => {
        if (error) this.#settle(id)?.failed(error);
      });
    });
  }

  /**
   * Stops the spawner process; the next spawn starts another. It stops the
   * groups it started (killSignal, grace period, SIGKILL) and exits; then
   * commands that had not reported their exit are killed as when it dies:
   * nobody could report their exit.
   */
  close(): void {
    const child = this.#child;
    this.#child = undefined;
    if (child?.connected) child.disconnect();
  }

  #process(): ChildProcess {
    if (this.#child !== undefined) return this.#child;
    // No execArgv: the worker's own flags (a profiler, a loader) are not the spawner's. Detached: in a session
    // of its own, out of the reach of the worker's terminal (see the top of this file).
    const child = spawn(process.execPath, ['-e', `(${spawnerMain.toString()})(require('node:child_process'), ${JSON.stringify(this.#stop)})`], {
      stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
      serialization: 'json',
      detached: true,
    });
    child.unref();
    child.channel?.unref();
    child.on('message', (reply: Reply, handle?: Socket) => this.#receive(reply, handle));
    child.on('error', () => {
      // Failing to start shows as its exit below; failing to send, in the send callback.
    });
    child.once('exit', (code, signal) => {
      if (this.#child === child) this.#child = undefined;
      this.#died(`the spawner process ended (${signal ?? `exit code ${code}`})`);
    });
    this.#child = child;
    return child;
  }

  #receive(reply: Reply, handle: Socket | undefined): void {
    const pending = this.#pending.get(reply.id);
    if (pending === undefined) {
      handle?.destroy();
      return;
    }
    if ('error' in reply) {
      this.#settle(reply.id);
      pending.failed(Object.assign(new Error(reply.error.message), reply.error.code === undefined ? {} : { code: reply.error.code }));
    } else if ('exit' in reply) {
      this.#settle(reply.id);
      pending.exit({ exitCode: reply.exit[0], signal: reply.exit[1] });
    } else if (reply.stream === 'stdout') {
      pending.pid = reply.pid;
      pending.stdout = held(handle);
    } else if (pending.pid !== undefined && pending.stdout !== undefined) {
      pending.started({ pid: pending.pid, stdout: pending.stdout, stderr: held(handle), exited: pending.exited });
    }
  }

  /** Forgets a request; once none is left, the channel no longer keeps the worker alive. */
  #settle(id: number): Pending | undefined {
    const pending = this.#pending.get(id);
    this.#pending.delete(id);
    if (this.#pending.size === 0) this.#child?.channel?.unref();
    return pending;
  }

  #died(why: string): void {
    if (this.#pending.size === 0) return;
    this.#onDeath?.(why);
    for (const [id, pending] of [...this.#pending]) {
      this.#settle(id);
      if (pending.pid === undefined) {
        pending.failed(new Error(`${why} before the command started`));
        continue;
      }
      // Nobody could report its exit any more: it goes now, so that it is not left running unwatched.
      try {
        process.kill(-pending.pid, 'SIGKILL');
      } catch {
        // gone already
      }
      pending.exit({ exitCode: null, signal: 'SIGKILL' });
    }
  }
}

/**
 * A received pipe, held until its reader comes. A socket that reaches its
 * end with nothing buffered emits 'end' at once, even unread: the command
 * may well be done before the spawner's last message arrives, and a reader
 * that attaches after that would wait for an 'end' that has passed.
 */
function held(socket: Socket | undefined): Readable {
  const stream = new PassThrough();
  if (socket === undefined) return stream.end();
  socket.on('error', (error) => stream.destroy(error));
  return socket.pipe(stream);
}

/** How the spawner stops the groups it started once the worker is gone. */
interface SpawnerStop {
  readonly signal: NodeJS.Signals;
  readonly graceMs: number;
}

/**
 * The spawner process's whole program; it runs as `node -e`, so it uses
 * nothing but its arguments and `process`.
 */
function spawnerMain(childProcess: typeof import('node:child_process'), stop: SpawnerStop): void {
  const send = (message: unknown, handle?: unknown) => {
    if (process.connected) process.send!(message, handle as never);
  };
  /** Whether a process (maybe a zombie) is in group `pgid`. */
  const groupThere = (pgid: number) => {
    try {
      process.kill(-pgid, 0);
      return true;
    } catch (error) {
      return (error as NodeJS.ErrnoException).code === 'EPERM';
    }
  };
  const signalGroup = (pgid: number, signal: NodeJS.Signals) => {
    try {
      process.kill(-pgid, signal);
    } catch {
      // gone
    }
  };
  /**
   * The groups it started that may not be gone: those whose main process runs, and those it left processes in
   * when it exited. A group that is gone is dropped at once, so that its id, once free, is never signalled.
   */
  const groups = new Set<number>();
  const prune = () => {
    for (const pgid of groups) if (!groupThere(pgid)) groups.delete(pgid);
  };
  // The worker is gone (or closed the channel): nobody is left to watch the commands; they go, as the agent's do.
  process.on('disconnect', () => {
    prune();
    for (const pgid of groups) signalGroup(pgid, stop.signal);
    const deadline = Date.now() + stop.graceMs;
    const look = () => {
      prune();
      if (groups.size > 0 && Date.now() < deadline) {
        setTimeout(look, 50);
        return;
      }
      for (const pgid of groups) signalGroup(pgid, 'SIGKILL');
      process.exit(0);
    };
    look();
  });
  process.on('message', (request: { id: number; file: string; args: string[]; cwd: string; env: Record<string, string> }) => {
    const { id } = request;
    let child: import('node:child_process').ChildProcess;
    try {
      child = childProcess.spawn(request.file, request.args, { cwd: request.cwd, env: request.env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (error) {
      // Invalid arguments (a NUL byte in argv or env...) throw synchronously.
      send({ id, error: { message: (error as Error).message, code: (error as NodeJS.ErrnoException).code } });
      return;
    }
    // Node starts reading a child's pipes at once; bytes read here would be lost with the
    // handle, so reading stops before the event loop can run (what net.Socket's pauseOnCreate does).
    for (const stream of [child.stdout, child.stderr] as unknown as { _handle?: { reading: boolean; readStop(): void } }[]) {
      if (stream._handle) {
        stream._handle.reading = false;
        stream._handle.readStop();
      }
    }
    child.once('spawn', () => {
      prune();
      groups.add(child.pid!);
      send({ id, pid: child.pid, stream: 'stdout' }, child.stdout);
      send({ id, stream: 'stderr' }, child.stderr);
    });
    child.once('error', (error: NodeJS.ErrnoException) => {
      // After a successful start, 'error' could only come from child.kill(), which is not used.
      if (child.pid === undefined) send({ id, error: { message: error.message, code: error.code } });
    });
    // 'exit', not 'close': a background grandchild may hold the pipes open.
    child.once('exit', (code, signal) => {
      // Reaped: the group is gone unless the command left processes in it.
      if (!groupThere(child.pid!)) groups.delete(child.pid!);
      send({ id, exit: [code, signal] });
    });
  });
}
