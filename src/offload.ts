/**
 * drover/offload: run scripts on SSH hosts from a program, without a queue
 * or a worker (geto's use). One `Offloader` holds one pooled connection per
 * host; every run gets a fresh task directory on the chosen host with the
 * script and its DEPS/, runs it with the script engine (timeout, abort,
 * cleanup of every remote process), reads back the files asked for, and
 * removes the directory.
 *
 *   const offloader = await Offloader.connect({ hosts: [{ address: 'me@build1' }, { address: 'me@build2' }] });
 *   const result = await offloader.runOnLeastLoadedHost({ name: 'render', script: ['#!/bin/sh', 'echo hi'] });
 *   await offloader.close();
 */
import { randomBytes } from 'node:crypto';
import { posix } from 'node:path';
import type { Readable } from 'node:stream';
import { ScriptEngine, TimedSandbox, type ScriptEngineOptions } from './engines/script.js';
import { ResourceUnavailableError, errorMessage } from './model/errors.js';
import type { Claim } from './model/task.js';
import type { MachinePool, MachineStatus, SelectionStrategy } from './hosts/selection.js';
import { createSshPool, type SshPoolOptions } from './hosts/ssh-host.js';
import type { SshTransport } from './hosts/ssh-transport.js';
import { silentLogger } from './runtime/logger.js';

export type { SshHostEntry } from './hosts/ssh-host.js';
export type { SelectionStrategy, MachineStatus } from './hosts/selection.js';

export interface OffloadTask {
  /** The script's name: least-loaded balances by it, maxConcurrent counts it. */
  readonly name: string;
  /** The script's text or lines; its shebang picks the interpreter (/bin/sh without one). */
  readonly script?: string | readonly string[];
  /** Or: a script file on this machine. */
  readonly scriptFile?: string;
  /** Files or directories on this machine, uploaded to DEPS/<basename> beside the script. */
  readonly deps?: readonly string[];
  readonly args?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  /** Seconds; then the script is stopped and `timedOut` is true. */
  readonly timeout?: number;
  /** At most this many runs of `name` at once on one host; more wait. */
  readonly maxConcurrent?: number;
  /** Only hosts with every one of these labels. */
  readonly labels?: readonly string[];
  /** Files of the task directory (relative paths) to bring back in `files`. */
  readonly files?: readonly string[];
  /** Stops the run (remote processes included); the promise rejects with the signal's reason. */
  readonly signal?: AbortSignal;
}

export interface OffloadResult {
  /** `user@name:port` of the host that ran it. */
  readonly host: string;
  readonly stdout: string;
  readonly stderr: string;
  /** Null when a signal ended it. */
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly durationMs: number;
  readonly timedOut: boolean;
  /** The requested files, by relative path. */
  readonly files: Readonly<Record<string, Buffer>>;
}

export interface OffloaderOptions extends SshPoolOptions, ScriptEngineOptions {
  /** Remote directory for task directories; relative to the remote home unless absolute. Default `.drover/offload`. */
  readonly workDir?: string;
}

export class Offloader {
  readonly #pool: MachinePool<SshTransport>;
  readonly #engine: ScriptEngine;
  readonly #workDir: string;
  #runs = 0;

  private constructor(pool: MachinePool<SshTransport>, options: OffloaderOptions) {
    this.#pool = pool;
    this.#engine = new ScriptEngine({ ...options, env: options.env ?? { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' } });
    this.#workDir = options.workDir ?? '.drover/offload';
  }

  /** Connects to every host at once; unreachable ones are marked down. Rejects when none can be reached. */
  static async connect(options: OffloaderOptions): Promise<Offloader> {
    const pool = createSshPool(options);
    const offloader = new Offloader(pool, options);
    await pool.start();
    if (!pool.status().some((m) => m.state === 'up')) {
      await offloader.close();
      throw new ResourceUnavailableError(`no SSH host can be reached:\n${pool.status().map((m) => `  - ${m.address}: ${m.error ?? m.state}`).join('\n')}`);
    }
    return offloader;
  }

  /** Runs on that host (an address as given, `user@name:port`), waiting for a free slot there. */
  runOnHost(task: OffloadTask, host: string): Promise<OffloadResult> {
    const address = this.#pool.machines().find((m) => m.address === host || m.transport.address === host)?.address ?? host;
    return this.#run(task, { address });
  }

  runOnRandomHost(task: OffloadTask): Promise<OffloadResult> {
    return this.#run(task, { strategy: 'random' });
  }

  /** The host running the fewest scripts of this name (then the fewest at all). */
  runOnLeastLoadedHost(task: OffloadTask): Promise<OffloadResult> {
    return this.#run(task, { strategy: 'least-loaded' });
  }

  runOnNextHost(task: OffloadTask): Promise<OffloadResult> {
    return this.#run(task, { strategy: 'round-robin' });
  }

  /** Every host: up, down or retired, with its running count. */
  status(): MachineStatus[] {
    return this.#pool.status();
  }

  async close(): Promise<void> {
    this.#pool.close();
    await Promise.all(this.#pool.machines().map((m) => m.transport.close()));
  }

  async #run(task: OffloadTask, where: { address?: string; strategy?: SelectionStrategy }): Promise<OffloadResult> {
    const slot = await this.#pool.acquire({
      name: task.name,
      ...(task.maxConcurrent === undefined ? {} : { maxConcurrent: task.maxConcurrent }),
      ...(task.labels === undefined ? {} : { labels: task.labels }),
      ...(task.signal === undefined ? {} : { signal: task.signal }),
      ...where,
    });
    const transport = slot.transport;
    const stop = new AbortController();
    const onStop = () => stop.abort(slot.lost.aborted ? slot.lost.reason : task.signal?.reason);
    slot.lost.addEventListener('abort', onStop, { once: true });
    task.signal?.addEventListener('abort', onStop, { once: true });
    const id = `${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
    let taskDir: string | undefined;
    try {
      const home = await transport.home();
      taskDir = posix.join(posix.isAbsolute(this.#workDir) ? this.#workDir : posix.join(home, this.#workDir), `${task.name}-${id}`);
      await transport.mkdir(taskDir);
      const claim: Claim = { taskId: `offload-${id}`, runId: this.#runs++, workerId: 'offload', payload: {}, deadline: Infinity, takenUntil: Infinity, retriesLeft: 0 };
      const payload = {
        name: task.name,
        ...(task.script === undefined ? {} : { script: typeof task.script === 'string' ? task.script : [...task.script] }),
        ...(task.scriptFile === undefined ? {} : { scriptFile: task.scriptFile }),
        ...(task.deps === undefined ? {} : { deps: [...task.deps] }),
        ...(task.args === undefined ? {} : { args: [...task.args] }),
        ...(task.env === undefined ? {} : { env: { ...task.env } }),
        ...(task.timeout === undefined ? {} : { timeout: task.timeout }),
      };
      const builder = await this.#engine.prepare(payload, { claim, transport, taskDir, cookie: `offload-${id}`, logger: silentLogger, signal: stop.signal });
      const sandbox = await builder.start();
      try {
        const aborted = new Promise<void>((resolve) => {
          if (stop.signal.aborted) resolve();
          stop.signal.addEventListener('abort', () => resolve(), { once: true });
        }).then(() => sandbox.abort());
        const [result, stdout, stderr] = await Promise.all([sandbox.wait(), text(sandbox.stdout), text(sandbox.stderr)]);
        if (stop.signal.aborted) {
          await aborted;
          throw stop.signal.reason instanceof Error ? stop.signal.reason : new ResourceUnavailableError(`the run on ${slot.address} was stopped: ${errorMessage(stop.signal.reason)}`);
        }
        const files: Record<string, Buffer> = {};
        for (const file of task.files ?? []) files[file] = await buffer(await sandbox.extractFile(file));
        return {
          host: slot.address,
          stdout,
          stderr,
          exitCode: result.exitCode,
          signal: result.signal,
          durationMs: result.durationMs,
          timedOut: sandbox instanceof TimedSandbox && sandbox.timedOut,
          files,
        };
      } finally {
        await sandbox.dispose();
      }
    } finally {
      slot.lost.removeEventListener('abort', onStop);
      task.signal?.removeEventListener('abort', onStop);
      if (taskDir !== undefined && !slot.lost.aborted) await transport.remove(taskDir).catch(() => {});
      slot.release();
    }
  }
}

async function buffer(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function text(stream: Readable): Promise<string> {
  return (await buffer(stream)).toString('utf8');
}
