/**
 * A batch session on disk: `<sessions>/<ID>/` holds
 *
 *   params.json   the parameters the session was started with
 *   jobs.json     every job: position, line, command, status, attempts, last result
 *   session.log   the session's own log (the in-process worker's lines)
 *   slot-N.log    the output of every job that ran in slot N, as it comes (`tail -f`)
 *   output/N.log  the output of job N's last attempt
 *   jobs.jsonl    one JSON line per finished attempt: slot, host, start, duration, exit code, signal
 *                 (status `lost` when the attempt's host went away: the job ran again elsewhere)
 *   queue/        the session's embedded SQLite queue
 *
 * Session ids are whole numbers, counted up per sessions directory.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve as resolvePath } from 'node:path';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import { ConfigError } from '../model/errors.js';
import type { ProviderLaunch } from './provider-hosts.js';

export type JobStatus = 'pending' | 'running' | 'ok' | 'failed' | 'timeout';
export const JOB_STATUSES: readonly JobStatus[] = ['pending', 'running', 'ok', 'failed', 'timeout'];

export interface JobRecord {
  /** 1-based position in the input. */
  readonly n: number;
  readonly line: string;
  readonly command: string;
  status: JobStatus;
  attempts: number;
  slot?: number;
  /** The host of the last attempt: `localhost` or `user@name:port`. */
  host?: string;
  /** Attempts cut short because their host went away; they do not count against --retries. */
  lost?: number;
  started?: string;
  durationMs?: number;
  exitCode?: number | null;
  signal?: string | null;
  message?: string;
}

export interface SessionParams {
  readonly command: readonly string[];
  readonly split: number;
  readonly timeout?: number;
  readonly retries: number;
  /** The SSH hosts the jobs run on; none: this machine (or `hostSource`'s). */
  readonly hosts?: readonly SshHostEntry[];
  /** What a host source of a program's own (a cloud provider) said it runs on; a resume must pass that source again. */
  readonly hostSource?: string;
  /** What `--provider` launches (provider-hosts.ts); `--resume` launches fresh instances like them. */
  readonly provider?: ProviderLaunch;
  /** Failed or timed-out jobs in a row that retire a host; 0 never. */
  readonly strikes?: number;
  readonly pre?: string;
  readonly post?: string;
  /** Absolute path of the overlay directory. */
  readonly overlay?: string;
  /** The --report hook, `sh: CMD`; the CLI runs it when the session ends. */
  readonly report?: string;
  readonly created: string;
  /** sha256 of the job lines in order: what `--resume` compares. */
  readonly jobsHash: string;
}

export function defaultSessionsDir(env: NodeJS.ProcessEnv = process.env): string {
  return resolvePath(env['DROVER_SESSIONS'] || join(homedir(), '.drover', 'sessions'));
}

export function jobsHash(lines: readonly string[]): string {
  const hash = createHash('sha256');
  lines.forEach((line, i) => hash.update(`${i + 1}\0${line}\n`));
  return hash.digest('hex');
}

export class Session {
  private constructor(
    readonly id: number,
    readonly dir: string,
    public params: SessionParams,
    readonly jobs: JobRecord[],
  ) {}

  /** A new session directory with the next free id. */
  static create(sessionsDir: string, params: SessionParams, jobs: JobRecord[]): Session {
    mkdirSync(sessionsDir, { recursive: true });
    for (let attempt = 0; attempt < 1000; attempt++) {
      const id = Math.max(0, ...sessionIds(sessionsDir)) + 1;
      const dir = join(sessionsDir, String(id));
      try {
        mkdirSync(dir); // exclusive: two batches starting at once get different ids
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EEXIST') continue;
        throw error;
      }
      mkdirSync(join(dir, 'output'));
      const session = new Session(id, dir, params, jobs);
      session.saveParams();
      session.save();
      return session;
    }
    throw new ConfigError(`could not create a session directory in ${sessionsDir}`);
  }

  static open(sessionsDir: string, id: string): Session {
    const dir = join(sessionsDir, id);
    if (!/^\d+$/.test(id) || !existsSync(join(dir, 'jobs.json'))) {
      throw new ConfigError(`no session "${id}" in ${sessionsDir} (see "drover sessions")`);
    }
    const params = JSON.parse(readFileSync(join(dir, 'params.json'), 'utf8')) as SessionParams;
    const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as JobRecord[];
    return new Session(Number(id), dir, params, jobs);
  }

  /** Changes parameters (a resume given other options) and writes them. */
  update(changes: Partial<Omit<SessionParams, 'command' | 'jobsHash' | 'created'>>): void {
    this.params = { ...this.params, ...changes };
    this.saveParams();
  }

  saveParams(): void {
    writeFileSync(join(this.dir, 'params.json'), JSON.stringify(this.params, null, 2) + '\n');
  }

  /** Writes the job list atomically, so a reader (or a crash) never sees half of it. */
  save(): void {
    const file = join(this.dir, 'jobs.json');
    writeFileSync(file + '.tmp', JSON.stringify(this.jobs, null, 1) + '\n');
    renameSync(file + '.tmp', file);
  }

  counts(): Record<JobStatus, number> {
    return countJobs(this.jobs);
  }
}

export function countJobs(jobs: readonly JobRecord[]): Record<JobStatus, number> {
  const counts = { pending: 0, running: 0, ok: 0, failed: 0, timeout: 0 };
  for (const job of jobs) counts[job.status]++;
  return counts;
}

export function sessionIds(sessionsDir: string): number[] {
  if (!existsSync(sessionsDir)) return [];
  return readdirSync(sessionsDir).filter((name) => /^\d+$/.test(name)).map(Number).sort((a, b) => a - b);
}
