/**
 * The batch engine: a session's pending jobs go into the session's own
 * embedded queue, and one in-process worker (startWorker, the process
 * engine on this machine) with `split` slots runs them. A small plugin
 * follows each run: it picks the run's slot, copies its output into the
 * slot's log and the job's output file, and records how it ended.
 */
import { createWriteStream, rmSync, type WriteStream } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join, resolve as resolvePath } from 'node:path';
import { once } from 'node:events';
import { ProcessEngine } from '../engines/process.js';
import { HardwareHost } from '../hosts/local.js';
import type { Resolution } from '../model/resolution.js';
import type { RunResult } from '../model/task.js';
import { shippedPlugins } from '../plugins/index.js';
import type { Plugin, TaskPlugin } from '../plugins/plugin.js';
import { SqliteQueue } from '../queues/sqlite.js';
import { createLogger } from '../runtime/logger.js';
import { startWorker } from '../runtime/worker.js';
import { countJobs, defaultSessionsDir, jobsHash, Session, type JobRecord, type JobStatus } from './session.js';
import { jobCommand } from './words.js';

export interface RunSessionOptions {
  /** Stops the batch: running jobs are killed and stay pending, the session is saved. */
  readonly signal?: AbortSignal;
  /** Called once per finished attempt. */
  readonly onJob?: (job: JobRecord) => void;
  /** How long a killed job gets between SIGTERM and SIGKILL; 2000 ms. */
  readonly killGraceMs?: number;
}

export interface SessionOutcome {
  readonly session: Session;
  readonly interrupted: boolean;
  readonly elapsedMs: number;
  readonly counts: Record<JobStatus, number>;
}

const YEAR_MS = 365 * 24 * 3600 * 1000;

/** Runs every pending job of the session; resolves when none is left (or on interruption). */
export async function runSession(session: Session, options: RunSessionOptions = {}): Promise<SessionOutcome> {
  const started = Date.now();
  const { split, timeout, retries } = session.params;
  for (const job of session.jobs) if (job.status === 'running') job.status = 'pending'; // a crashed predecessor's
  session.save();
  const todo = session.jobs.filter((job) => job.status === 'pending');
  if (todo.length === 0 || options.signal?.aborted) {
    return { session, interrupted: options.signal?.aborted ?? false, elapsedMs: Date.now() - started, counts: session.counts() };
  }
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
  const freeSlots = new Set(slotLogs.map((_, i) => i + 1));
  const byTask = new Map<string, JobRecord>();
  let remaining = todo.length;
  let stopping = false;

  const submit = async (job: JobRecord) => {
    const taskId = await queue.submit({
      payload: timeout ? { command: job.command, maxRunTime: timeout } : { command: job.command },
      deadline: Date.now() + YEAR_MS,
      retries: 0,
    });
    byTask.set(taskId, job);
  };

  const settle = async (job: JobRecord, startedAt: number, result: RunResult | undefined, resolution: Resolution | undefined) => {
    job.durationMs = result?.durationMs ?? Date.now() - startedAt;
    job.exitCode = result?.exitCode ?? null;
    job.signal = result?.signal ?? null;
    delete job.message;
    let status: JobStatus;
    if (resolution?.state === 'completed') status = 'ok';
    else if (resolution?.state === 'failed') status = resolution.message?.startsWith('maxRunTime') ? 'timeout' : 'failed';
    else if (stopping) status = 'pending'; // killed by the interruption: it runs again on --resume
    else status = 'failed';
    if (resolution?.state === 'exception' || (resolution?.message && status !== 'ok')) job.message = resolution?.message ?? resolution?.state;
    job.status = status;
    jobsLog.write(JSON.stringify({
      job: job.n, attempt: job.attempts, status, slot: job.slot, host: 'localhost', start: job.started,
      durationMs: Math.round(job.durationMs), exitCode: job.exitCode, signal: job.signal, line: job.line,
    }) + '\n');
    options.onJob?.(job);
    if ((status === 'failed' || status === 'timeout') && job.attempts <= retries && !stopping) {
      job.status = 'pending';
      session.save();
      await submit(job);
      return;
    }
    session.save();
    if (status !== 'pending') remaining--;
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
      session.save();
      const slotLog = slotLogs[slot - 1]!;
      const output = createWriteStream(join(session.dir, 'output', `${job.n}.log`));
      slotLog.write(`=== ${job.started} job ${job.n} (attempt ${job.attempts}): ${job.command}\n`);
      log.stream.on('data', (chunk: Buffer) => {
        if (!slotLog.writableEnded) slotLog.write(chunk);
        if (!output.writableEnded) output.write(chunk);
      });
      let result: RunResult | undefined;
      let resolution: Resolution | undefined;
      return {
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
          await settle(job, startedAt, result, resolution);
        },
      };
    },
  };

  for (const job of todo) await submit(job);
  const workDir = join(session.dir, 'work');
  const worker = startWorker({
    workerId: `batch-${session.id}`,
    queue,
    host: new HardwareHost({ workDir }),
    engine: new ProcessEngine({ killGraceMs: options.killGraceMs ?? 2000 }),
    plugins: [...shippedPlugins(), plugin],
    workDir,
    logger,
    capacity: split,
    maxTasks: 0,
    once: false,
    idleTimeoutMs: 0,
    shutdownGraceMs: 5000,
    pollWaitMs: 1000,
  });
  const onAbort = () => {
    stopping = true;
    worker.shutdown({ kind: 'signal', signal: 'SIGINT' });
    worker.shutdown({ kind: 'signal', signal: 'SIGINT' }); // the second asks to kill running jobs now
  };
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await worker.stopped;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    for (const job of session.jobs) if (job.status === 'running') job.status = 'pending';
    session.save();
    await queue.close();
    await Promise.all(streams.map(async (stream) => {
      stream.end();
      if (!stream.closed) await once(stream, 'close');
    }));
  }
  return { session, interrupted: stopping, elapsedMs: Date.now() - started, counts: session.counts() };
}

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
}

/** Creates a session for these job lines (one job each; blank lines are skipped). */
export function createSession(lines: readonly string[], options: BatchOptions = {}): Session {
  const jobLines = lines.filter((line) => line.trim().length > 0);
  const command = options.command ?? [];
  const jobs: JobRecord[] = jobLines.map((line, i) => ({ n: i + 1, line, command: jobCommand(command, line), status: 'pending', attempts: 0 }));
  return Session.create(options.sessionsDir === undefined ? defaultSessionsDir() : resolvePath(options.sessionsDir), {
    command,
    split: options.split ?? availableParallelism(),
    ...(options.timeout ? { timeout: options.timeout } : {}),
    retries: options.retries ?? 0,
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
