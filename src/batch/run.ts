/**
 * The batch engine: a session's pending jobs go into the session's own
 * embedded queue, and one in-process worker (startWorker, the process
 * engine) with `split` slots runs them, on this machine or over SSH on the
 * session's hosts (hosts.ts says which; batch-host.ts does the per-host
 * set-up, clean-up and retiring). A small plugin follows each run: it
 * picks the run's slot, copies its output into the slot's log and the
 * job's output file, and records how it ended.
 *
 * A job whose host goes away runs again on another host; a job that fails
 * runs again up to `retries` times; when no host is left the batch stops
 * and its jobs stay pending for --resume.
 */
import { spawn } from 'node:child_process';
import { createWriteStream, rmSync, type WriteStream } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join, resolve as resolvePath } from 'node:path';
import { once } from 'node:events';
import { ProcessEngine } from '../engines/process.js';
import type { Host } from '../hosts/host.js';
import { HardwareHost } from '../hosts/local.js';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import type { SshConnectionOptions } from '../hosts/ssh-transport.js';
import { ConfigError } from '../model/errors.js';
import type { Resolution } from '../model/resolution.js';
import type { RunResult } from '../model/task.js';
import { shippedPlugins } from '../plugins/index.js';
import type { Plugin, TaskPlugin } from '../plugins/plugin.js';
import { SqliteQueue } from '../queues/sqlite.js';
import { createLogger, type Logger } from '../runtime/logger.js';
import { startWorker } from '../runtime/worker.js';
import { BatchSshHost, type HostCommands } from './batch-host.js';
import { listedHosts, type BatchHostSource } from './hosts.js';
import type { HostProgress, Progress } from './progress.js';
import { countJobs, defaultSessionsDir, jobsHash, Session, type JobRecord, type JobStatus, type SessionParams } from './session.js';
import { jobCommand } from './words.js';

/** The SSH settings of a batch's hosts (the worker's `ssh.*` settings), and the remote directory of task directories. */
export interface BatchSshOptions extends SshConnectionOptions {
  /** Relative to the remote home unless absolute; default `.drover/work`. */
  readonly workDir?: string;
}

export interface RunSessionOptions {
  /** Stops the batch: running jobs are killed and stay pending, the session is saved. */
  readonly signal?: AbortSignal;
  /** Called once per finished attempt. */
  readonly onJob?: (job: JobRecord) => void;
  /** Called when jobs start or end, with the figures of a progress line: at most every PROGRESS_INTERVAL_MS, and with the last figures. */
  readonly onProgress?: (progress: Progress) => void;
  /** Called for what happens to a host: set-up output, --pre/--post, retirement. */
  readonly onHost?: (host: string, text: string) => void;
  /** How long a killed job gets between SIGTERM and SIGKILL; 2000 ms. */
  readonly killGraceMs?: number;
  /**
   * Which hosts the jobs run on: by default the session's own SSH hosts
   * (`params.hosts`), and without them this machine. A cloud provider
   * passes its own source here.
   */
  readonly hostSource?: BatchHostSource;
  /** How to reach SSH hosts. */
  readonly ssh?: BatchSshOptions;
}

export interface SessionOutcome {
  readonly session: Session;
  readonly interrupted: boolean;
  /** Why the batch stopped with jobs pending although nobody asked it to: no host is left, or none could be reached. */
  readonly stranded?: string;
  readonly elapsedMs: number;
  readonly counts: Record<JobStatus, number>;
  /** Each host at the end: state, and how its jobs went. */
  readonly hosts: readonly HostProgress[];
}

const YEAR_MS = 365 * 24 * 3600 * 1000;
/** How often the progress figures (onProgress) go out at most while jobs run. */
export const PROGRESS_INTERVAL_MS = 100;
const LOCALHOST = 'localhost';

/**
 * Runs every pending job of the session; resolves when none is left (or on interruption).
 * Holds the session's lock while it runs (Session.lock(): a session that another drover runs is
 * refused), unless the session holds it already (Session.open(..., { lock: true })).
 */
export async function runSession(session: Session, options: RunSessionOptions = {}): Promise<SessionOutcome> {
  if (session.locked) return runLockedSession(session, options);
  session.lock();
  try {
    return await runLockedSession(session, options);
  } finally {
    session.unlock();
  }
}

async function runLockedSession(session: Session, options: RunSessionOptions): Promise<SessionOutcome> {
  const started = Date.now();
  const params = session.params;
  const { split, timeout, retries } = params;
  for (const job of session.jobs) if (job.status === 'running') interrupt(job); // a crashed predecessor's
  session.save();
  const todo = session.jobs.filter((job) => job.status === 'pending');
  const tallies = new Map<string, { running: number; ok: number; failed: number }>();
  const outcome = (interrupted: boolean, stranded?: string): SessionOutcome => ({
    session, interrupted, elapsedMs: Date.now() - started, counts: session.counts(), hosts: hostProgress(), ...(stranded === undefined ? {} : { stranded }),
  });
  let batchHost: BatchSshHost | undefined;
  const hostProgress = (): HostProgress[] => {
    const states = new Map((batchHost?.status() ?? []).map((machine) => [machine.address, machine.state] as const));
    const names = new Set([...states.keys(), ...tallies.keys()]);
    return [...names].map((host) => ({ host, state: states.get(host) ?? 'up', running: 0, ok: 0, failed: 0, ...tallies.get(host) }));
  };
  const source = options.hostSource ?? (params.hosts === undefined ? undefined : listedHosts(params.hosts));
  if (source === undefined && params.hostSource !== undefined) {
    throw new ConfigError(`session ${session.id} ran on ${params.hostSource}; resume it with that host source again, or give it hosts (--hosts)`);
  }
  if (source === undefined && params.overlay !== undefined) {
    throw new ConfigError(`--overlay ${params.overlay}: an overlay is copied onto SSH hosts; a batch on this machine has its files at hand already (give --hosts, or leave --overlay out)`);
  }
  if (todo.length === 0 || options.signal?.aborted) return outcome(options.signal?.aborted ?? false);

  // The queue only carries this run's tasks: a resumed session starts from the job list, not from old tasks.
  const queueDir = join(session.dir, 'queue');
  rmSync(queueDir, { recursive: true, force: true });
  const queue = SqliteQueue.open({ dir: queueDir, pollIntervalMs: 50 });
  const streams: WriteStream[] = [];
  const open = (name: string) => {
    const stream = createWriteStream(join(session.dir, name), { flags: 'a' });
    streams.push(stream);
    return stream;
  };
  const sessionLog = open('session.log');
  const jobsLog = open('jobs.jsonl');
  const slotLogs = Array.from({ length: split }, (_, i) => open(`slot-${i + 1}.log`));
  const logger = createLogger({ write: (line) => sessionLog.write(line + '\n') });
  const hostOutput = (host: string, text: string) => {
    for (const line of text.replace(/\n$/, '').split('\n')) sessionLog.write(`[${host}] ${line}\n`);
    options.onHost?.(host, text);
  };
  const freeSlots = new Set(slotLogs.map((_, i) => i + 1));
  const byTask = new Map<string, JobRecord>();
  const strikes = new Map<string, number>();
  let remaining = todo.length;
  let stopping = false;
  let stranded: string | undefined;
  const tally = (host: string) => {
    let entry = tallies.get(host);
    if (entry === undefined) tallies.set(host, (entry = { running: 0, ok: 0, failed: 0 }));
    return entry;
  };
  // Counting is a pass over every job (2 ms for 100,000), and a job starts and ends several times a
  // millisecond: the figures go out at most every PROGRESS_INTERVAL_MS, the last ones in any case.
  let progressTimer: NodeJS.Timeout | undefined;
  let progressDue = false;
  const report = () => options.onProgress?.({ counts: session.counts(), hosts: hostProgress() });
  const progress = () => {
    if (options.onProgress === undefined) return;
    if (progressTimer !== undefined) {
      progressDue = true;
      return;
    }
    report();
    progressTimer = setTimeout(() => {
      progressTimer = undefined;
      if (progressDue) {
        progressDue = false;
        progress();
      }
    }, PROGRESS_INTERVAL_MS);
  };

  /** Queues the jobs in one transaction (a job list may hold 100,000 lines). */
  const submit = async (jobs: readonly JobRecord[]) => {
    const taskIds = await queue.submitMany(jobs.map((job) => ({
      payload: timeout ? { command: job.command, maxRunTime: timeout } : { command: job.command },
      deadline: Date.now() + YEAR_MS,
      retries: 0,
    })));
    taskIds.forEach((taskId, i) => byTask.set(taskId, jobs[i]!));
  };

  /** The batch's own accounting of how an attempt ended; `lost`: its host went away, `stranded`: no host is left. */
  const statusOf = (resolution: Resolution | undefined): JobStatus | 'lost' | 'stranded' => {
    if (resolution?.state === 'completed') return 'ok';
    if (resolution?.state === 'failed') return resolution.message?.startsWith('maxRunTime') ? 'timeout' : 'failed';
    if (stopping) return 'pending'; // killed by the interruption: it runs again on --resume
    if (batchHost !== undefined && resolution?.reason === 'worker-shutdown') return 'lost';
    if (batchHost !== undefined && resolution?.reason === 'resource-unavailable') return 'stranded';
    return 'failed';
  };

  const settle = async (job: JobRecord, startedAt: number, result: RunResult | undefined, resolution: Resolution | undefined) => {
    job.durationMs = result?.durationMs ?? Date.now() - startedAt;
    job.exitCode = result?.exitCode ?? null;
    job.signal = result?.signal ?? null;
    delete job.message;
    const ended = statusOf(resolution);
    if (ended !== 'ok' && resolution !== undefined && (resolution.state === 'exception' || resolution.message)) job.message = resolution.message ?? resolution.state;
    const host = job.host ?? LOCALHOST;
    jobsLog.write(JSON.stringify({
      job: job.n, attempt: job.attempts, status: ended === 'stranded' ? 'pending' : ended, slot: job.slot, host, start: job.started,
      durationMs: Math.round(job.durationMs), exitCode: job.exitCode, signal: job.signal, line: job.line,
    }) + '\n');
    if (ended === 'lost') {
      // Its host went away: the job goes back to the queue for another host, without using up a retry.
      hostOutput(host, `went away during job ${job.n}, which runs again on another host`);
      job.lost = (job.lost ?? 0) + 1;
      job.status = 'pending';
      session.saveSoon();
      if (!stopping) await submit([job]);
      progress();
      return;
    }
    if (ended === 'stranded') {
      interrupt(job);
      stranded ??= `no host is left to run on (${job.message ?? 'all retired'})`;
      stopping = true;
      worker.shutdown({ kind: 'fatal', message: stranded });
      session.saveSoon();
      progress();
      return;
    }
    if (ended === 'pending') interrupt(job);
    else job.status = ended;
    if (ended === 'ok') tally(host).ok++;
    if (ended === 'failed' || ended === 'timeout') tally(host).failed++;
    options.onJob?.(job);
    if (batchHost !== undefined && params.strikes) {
      // --strikes: failed jobs in a row retire their host (cloudtask's rule); one that works starts the count over.
      const count = ended === 'ok' ? 0 : ended === 'pending' ? strikes.get(host) ?? 0 : (strikes.get(host) ?? 0) + 1;
      strikes.set(host, count);
      if (count >= params.strikes) {
        strikes.delete(host);
        hostOutput(host, `retired: ${count} jobs in a row failed (--strikes ${params.strikes})`);
        batchHost.retire(host, `${count} jobs in a row failed (--strikes ${params.strikes})`);
      }
    }
    if ((ended === 'failed' || ended === 'timeout') && failedAttempts(job) <= retries && !stopping) {
      job.status = 'pending';
      session.saveSoon();
      await submit([job]);
      progress();
      return;
    }
    session.saveSoon();
    if (ended !== 'pending') remaining--;
    progress();
    if (remaining === 0) worker.shutdown({ kind: 'tasks-done' });
  };

  const plugin: Plugin = {
    name: 'batch',
    newTask({ claim, log }): TaskPlugin {
      const job = byTask.get(claim.taskId);
      if (job === undefined) return {};
      const slot = Math.min(...freeSlots);
      freeSlots.delete(slot);
      const startedAt = Date.now();
      job.status = 'running';
      job.slot = slot;
      job.attempts++;
      job.started = new Date(startedAt).toISOString();
      delete job.host;
      session.saveSoon();
      const slotLog = slotLogs[slot - 1]!;
      const output = createWriteStream(join(session.dir, 'output', `${job.n}.log`));
      let placed = false;
      const place = () => {
        if (placed) return;
        placed = true;
        job.host = batchHost?.hostOf(claim.taskId) ?? LOCALHOST;
        tally(job.host).running++;
        session.saveSoon();
        slotLog.write(`=== ${job.started} job ${job.n} (attempt ${job.attempts}) on ${job.host}: ${job.command}\n`);
        progress();
      };
      log.stream.on('data', (chunk: Buffer) => {
        if (!slotLog.writableEnded) slotLog.write(chunk);
        if (!output.writableEnded) output.write(chunk);
      });
      let result: RunResult | undefined;
      let resolution: Resolution | undefined;
      return {
        prepare: async () => place(),
        buildSandbox: async (builder) => {
          builder.setEnv('DROVER_SESSION_ID', String(session.id));
          builder.setEnv('DROVER_JOB', String(job.n));
          builder.setEnv('DROVER_HOST', job.host ?? LOCALHOST);
          if (batchHost !== undefined && job.host !== undefined) builder.setEnv('HOME', await batchHost.home(job.host));
        },
        stopped: async (r) => {
          result = r;
          return undefined;
        },
        finished: async (r) => {
          resolution = r;
        },
        exception: async (reason) => {
          resolution = { state: 'exception', reason, message: reason };
        },
        dispose: async () => {
          output.end();
          freeSlots.add(slot);
          if (placed) tally(job.host!).running--;
          await settle(job, startedAt, result, resolution);
        },
      };
    },
  };

  const workDir = join(session.dir, 'work');
  let host: Host;
  const commands: HostCommands = { ...(params.pre === undefined ? {} : { pre: params.pre }), ...(params.post === undefined ? {} : { post: params.post }), ...(params.overlay === undefined ? {} : { overlay: params.overlay }) };
  /** What a batch that ends before its first job (a failure, an interruption) closes. */
  const closeBeforeStart = async () => {
    if (source !== undefined) await closeQuietly(source, logger);
    await queue.close();
    await endStreams(streams);
  };
  // A signal that comes while the hosts open or --pre runs stops the batch before its first job:
  // the worker's abort listener does not exist yet, and one added to an aborted signal never fires.
  const interruptedBeforeStart = async () => {
    await closeBeforeStart();
    return outcome(true);
  };
  if (source !== undefined) {
    batchHost = await openHosts(source, session, options, logger, hostOutput, commands).catch(async (error: unknown) => {
      await closeBeforeStart();
      throw error;
    });
    host = batchHost;
    if (options.signal?.aborted) return interruptedBeforeStart();
  } else {
    host = new HardwareHost({ workDir });
    if (params.pre !== undefined) {
      hostOutput(LOCALHOST, `running: ${params.pre}`);
      const code = await runShell(params.pre, session.dir, (text) => hostOutput(LOCALHOST, text), process.env, options.signal);
      if (options.signal?.aborted) {
        hostOutput(LOCALHOST, `--pre was stopped by the interruption; no job runs`);
        return interruptedBeforeStart();
      }
      if (code !== 0) {
        hostOutput(LOCALHOST, `--pre exited with ${code ?? 'a signal'}; no job runs`);
        await closeBeforeStart();
        return outcome(false, `--pre failed on ${LOCALHOST} (exit ${code ?? 'by a signal'})`);
      }
    }
  }
  await submit(todo);
  const worker = startWorker({
    workerId: `batch-${session.id}`,
    queue,
    host,
    engine: new ProcessEngine({
      killGraceMs: options.killGraceMs ?? 2000,
      ...(options.ssh?.killSignal === undefined ? {} : { killSignal: options.ssh.killSignal }),
      // Remote jobs get a plain PATH; their HOME is set per host (buildSandbox).
      ...(batchHost === undefined ? {} : { env: { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: process.env['LANG'] || 'C.UTF-8' } }),
    }),
    // The batch plugin writes each job's output to the session's files; a copy in the queue, which
    // nobody reads and the next run wipes, cost each job two of its four queue writes.
    plugins: [...shippedPlugins({ liveLog: false }), plugin],
    workDir,
    logger,
    capacity: split,
    maxTasks: 0,
    once: false,
    idleTimeoutMs: 0,
    shutdownGraceMs: 5000,
    pollWaitMs: 1000,
  });
  progress();
  const onAbort = () => {
    stopping = true;
    worker.shutdown({ kind: 'signal', signal: 'SIGINT' });
    worker.shutdown({ kind: 'signal', signal: 'SIGINT' }); // the second asks to kill running jobs now
  };
  options.signal?.addEventListener('abort', onAbort, { once: true });
  if (options.signal?.aborted) onAbort(); // it came while the jobs were queued
  try {
    const { reason } = await worker.stopped;
    if (reason.kind === 'fatal') stranded ??= reason.message;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    for (const job of session.jobs) if (job.status === 'running') interrupt(job);
    session.save();
    clearTimeout(progressTimer);
    if (progressDue) report();
    await queue.close();
    if (source !== undefined) await closeQuietly(source, logger);
    else if (params.post !== undefined) {
      hostOutput(LOCALHOST, `running: ${params.post}`);
      const code = await runShell(params.post, session.dir, (text) => hostOutput(LOCALHOST, text));
      if (code !== 0) hostOutput(LOCALHOST, `--post exited with ${code ?? 'a signal'}`);
    }
    await endStreams(streams);
  }
  const interrupted = options.signal?.aborted ?? false;
  return outcome(interrupted, interrupted ? undefined : session.counts().pending > 0 ? stranded ?? 'the batch stopped early' : undefined);
}

/** A job whose attempt the batch cut short (an interruption, a crash, no host left): pending again, and that attempt does not use up a retry. */
function interrupt(job: JobRecord): void {
  job.status = 'pending';
  job.interrupted = (job.interrupted ?? 0) + 1;
}

/** The attempts that count against --retries: not those whose host went away, nor those the batch cut short. */
function failedAttempts(job: JobRecord): number {
  return job.attempts - (job.lost ?? 0) - (job.interrupted ?? 0);
}

/** Opens the host source and builds the SSH host over what it gives. */
async function openHosts(source: BatchHostSource, session: Session, options: RunSessionOptions, logger: Logger, output: (host: string, text: string) => void, commands: HostCommands): Promise<BatchSshHost> {
  const { split } = session.params;
  const set = await source.open({ split, signal: options.signal ?? new AbortController().signal, logger });
  const { SshHost } = await import('../hosts/ssh-host.js');
  const { workDir, ...ssh } = options.ssh ?? {};
  const inner = new SshHost({
    ...ssh,
    ...set.connection,
    hosts: set.hosts,
    // Hosts that do not say share the split: 3 hosts, --split 6: two jobs at once on each.
    defaultCapacity: Math.max(1, Math.ceil(split / set.hosts.length)),
    // A host that stops answering is out of the batch at once (cloudtask's rule); its jobs run elsewhere.
    strikes: 1,
    ...(workDir === undefined ? {} : { workDir }),
    killGraceMs: options.killGraceMs ?? 2000,
    logger,
  });
  return new BatchSshHost(inner, commands, output);
}

async function closeQuietly(source: BatchHostSource, logger: Logger): Promise<void> {
  await source.close().catch((error: unknown) => logger.error('releasing the batch\'s hosts failed', { error }));
}

async function endStreams(streams: readonly WriteStream[]): Promise<void> {
  await Promise.all(streams.map(async (stream) => {
    stream.end();
    if (!stream.closed) await once(stream, 'close');
  }));
}

/**
 * A shell command line of the batch's own (--pre, --post, --report) on this machine; resolves with the exit code.
 * When `signal` aborts, the command's process group gets SIGTERM, and SIGKILL SHELL_KILL_GRACE_MS later.
 */
export function runShell(command: string, cwd: string, output: (text: string) => void, env: NodeJS.ProcessEnv = process.env, signal?: AbortSignal): Promise<number | null> {
  return new Promise((resolve) => {
    // With a signal, the command gets a process group of its own, so that what it started is stopped with it.
    const child = spawn('sh', ['-c', command], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'], detached: signal !== undefined });
    let killTimer: NodeJS.Timeout | undefined;
    const kill = (name: NodeJS.Signals) => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, name);
      } catch {
        // the group is gone already
      }
    };
    const onAbort = () => {
      kill('SIGTERM');
      killTimer = setTimeout(() => kill('SIGKILL'), SHELL_KILL_GRACE_MS);
    };
    child.stdout.on('data', (data: Buffer) => output(data.toString()));
    child.stderr.on('data', (data: Buffer) => output(data.toString()));
    child.on('error', () => resolve(127));
    child.on('close', (code) => {
      clearTimeout(killTimer);
      signal?.removeEventListener('abort', onAbort);
      resolve(code);
    });
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** How long an interrupted --pre has between SIGTERM and SIGKILL. */
const SHELL_KILL_GRACE_MS = 2000;

export interface BatchOptions extends RunSessionOptions {
  /** The command the job words are appended to; empty: each job line is the command. */
  readonly command?: readonly string[];
  /** How many jobs run at once; the number of CPUs by default. */
  readonly split?: number;
  /** Seconds a job may run before its process group is killed (status `timeout`). */
  readonly timeout?: number;
  /** How many more times a failed or timed-out job runs. */
  readonly retries?: number;
  /** Where session directories go; DROVER_SESSIONS or ~/.drover/sessions by default. */
  readonly sessionsDir?: string;
  /** SSH hosts to run on (kept in the session for --resume); none: this machine, unless `hostSource` says otherwise. */
  readonly hosts?: readonly SshHostEntry[];
  /** Failed or timed-out jobs in a row that retire a host; 0 (default) never. */
  readonly strikes?: number;
  /** Shell command run on each host before its first job. */
  readonly pre?: string;
  /** Shell command run on each host after its last job. */
  readonly post?: string;
  /** Directory copied into each SSH host's home directory before its first job. */
  readonly overlay?: string;
  /** Kept in the session for the CLI's --report hook (`sh: CMD`). */
  readonly report?: string;
}

/** The parameters options give, beyond the command and the job list. */
export function sessionParams(options: BatchOptions): Omit<SessionParams, 'command' | 'created' | 'jobsHash'> {
  const hosts = options.hosts !== undefined && options.hosts.length > 0 ? options.hosts : undefined;
  return {
    // With hosts and no split: each host's capacity (1 unless its hosts file line says).
    split: options.split ?? (hosts === undefined ? availableParallelism() : hosts.reduce((sum, entry) => sum + (entry.capacity ?? 1), 0)),
    ...(options.timeout ? { timeout: options.timeout } : {}),
    retries: options.retries ?? 0,
    ...(hosts === undefined ? {} : { hosts }),
    ...(options.hostSource === undefined ? {} : { hostSource: options.hostSource.describe() }),
    ...(options.strikes ? { strikes: options.strikes } : {}),
    ...(options.pre === undefined ? {} : { pre: options.pre }),
    ...(options.post === undefined ? {} : { post: options.post }),
    ...(options.overlay === undefined ? {} : { overlay: resolvePath(options.overlay) }),
    ...(options.report === undefined ? {} : { report: options.report }),
  };
}

/** Creates a session for these job lines (one job each; blank lines are skipped). */
export function createSession(lines: readonly string[], options: BatchOptions = {}): Session {
  const jobLines = lines.filter((line) => line.trim().length > 0);
  const command = options.command ?? [];
  const jobs: JobRecord[] = jobLines.map((line, i) => ({ n: i + 1, line, command: jobCommand(command, line), status: 'pending', attempts: 0 }));
  return Session.create(options.sessionsDir === undefined ? defaultSessionsDir() : resolvePath(options.sessionsDir), {
    command,
    ...sessionParams(options),
    created: new Date().toISOString(),
    jobsHash: jobsHash(jobLines),
  }, jobs);
}

/** Library use: runs the job lines as a new session and returns every job's record. */
export async function runBatch(lines: readonly string[], options: BatchOptions = {}): Promise<SessionOutcome & { jobs: readonly JobRecord[] }> {
  const outcome = await runSession(createSession(lines, options), options);
  return { ...outcome, jobs: outcome.session.jobs };
}

export { countJobs };
