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
 *   queue/        the session's embedded SQLite queue: this run's tasks only, without their logs
 *   lock          while a drover runs the session: who (pid, start time, boot id, host), so that a
 *                 second one (--resume of a session that runs) is refused instead of running its jobs
 *                 twice; a lock whose owner is gone (crashed, killed) is taken over
 *
 * While jobs run, jobs.json is rewritten at most once per SAVE_DELAY_MS
 * (saveSoon), not at every change: the whole list at every start and end
 * of every job is quadratic in the number of jobs. A rewrite costs time in
 * proportion to the list (0.5-1 ms per 1000 jobs here), so the pause after
 * one also grows with what it cost (SAVE_COST_SHARE): a batch of 100,000
 * jobs spends a twentieth of its time rewriting (more only past a rewrite
 * of SAVE_MAX_DELAY_MS * SAVE_COST_SHARE, half a second), where a fixed
 * 100 ms pause had it rewriting 40% of the time. jobs.jsonl is appended
 * as each attempt ends, so open() takes from it the jobs that finished
 * `ok` after the last rewrite (a crash then loses no finished job).
 *
 * Session ids are whole numbers, counted up per sessions directory.
 */
import { createHash } from 'node:crypto';
import { existsSync, linkSync, mkdirSync, readFileSync, readdirSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { homedir, hostname } from 'node:os';
import { join, resolve as resolvePath } from 'node:path';
import { SessionRegistry, type SessionRecord } from '../cloud/sessions.js';
import { ownerMayLive } from '../hosts/journal.js';
import { bootId, isAlive, processStartTime } from '../hosts/proc.js';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import { ConfigError } from '../model/errors.js';
import type { ProviderLaunch } from './provider-hosts.js';

/** How long saveSoon() gathers changes before it rewrites jobs.json, at least. */
export const SAVE_DELAY_MS = 100;
/** The share of the time rewriting jobs.json may take at most: saveSoon() waits 1/SHARE times what the last rewrite took, */
export const SAVE_COST_SHARE = 0.05;
/** but never longer than this, so that jobs.json stays within seconds of the truth (a list of a million jobs). */
export const SAVE_MAX_DELAY_MS = 10_000;

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
  /**
   * Attempts cut short by the batch itself: stopped by Ctrl-C or SIGTERM, running when a drover
   * crashed, or left with no host to run on; like `lost` ones, they do not count against --retries.
   */
  interrupted?: number;
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

/**
 * The registry of open cloud sessions (src/cloud/sessions.ts): one per
 * user on this machine (DROVER_CLOUD_SESSIONS, default
 * ~/.drover/cloud-sessions), whatever directory drover runs in, so that a
 * batch's watchdog and `drover instances --cleanup`, run anywhere, see
 * every batch that runs. It also lists the sessions of `legacyDirs`:
 * QUEUE-DIR/cloud-sessions, where earlier versions of drover kept them, so
 * that the instances of such a batch that still runs are not taken for
 * leftovers from its directory.
 */
export function cloudSessionRegistry(options: { readonly env?: NodeJS.ProcessEnv; readonly legacyDirs?: readonly string[] } = {}): SessionRegistry {
  const dir = cloudSessionsDir(options.env);
  const legacy = (options.legacyDirs ?? []).map((legacyDir) => resolvePath(legacyDir)).filter((legacyDir) => legacyDir !== dir);
  return legacy.length === 0 ? new SessionRegistry(dir) : new RegistryWithLegacy(dir, legacy);
}

/** Where this user's open cloud sessions are recorded: DROVER_CLOUD_SESSIONS, or ~/.drover/cloud-sessions. */
export function cloudSessionsDir(env: NodeJS.ProcessEnv = process.env): string {
  return resolvePath(env['DROVER_CLOUD_SESSIONS'] || join(homedir(), '.drover', 'cloud-sessions'));
}

/** Opens and closes sessions in its own directory; lists those of the legacy directories too. */
class RegistryWithLegacy extends SessionRegistry {
  readonly #legacy: readonly SessionRegistry[];
  constructor(dir: string, legacyDirs: readonly string[]) {
    super(dir);
    this.#legacy = legacyDirs.map((legacyDir) => new SessionRegistry(legacyDir));
  }

  override list(): SessionRecord[] {
    return [...super.list(), ...this.#legacy.flatMap((registry) => registry.list())];
  }
}

export function jobsHash(lines: readonly string[]): string {
  const hash = createHash('sha256');
  lines.forEach((line, i) => hash.update(`${i + 1}\0${line}\n`));
  return hash.digest('hex');
}

export class Session {
  #saveTimer: NodeJS.Timeout | undefined;
  #lock: SessionLock | undefined;
  /** Times jobs.json was written, and the milliseconds that took: for tests. */
  saves = 0;
  saveMs = 0;
  #lastSaveMs = 0;

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

  /**
   * Reads a session. With `lock`, takes its lock first (see lock()), so that the jobs are read as
   * the last run left them: a session that another drover runs is refused.
   */
  static open(sessionsDir: string, id: string, options: { readonly lock?: boolean } = {}): Session {
    const dir = join(sessionsDir, id);
    if (!/^\d+$/.test(id) || !existsSync(join(dir, 'jobs.json'))) {
      throw new ConfigError(`no session "${id}" in ${sessionsDir} (see "drover sessions")`);
    }
    const lock = options.lock === true ? SessionLock.take(dir, Number(id)) : undefined;
    try {
      const params = JSON.parse(readFileSync(join(dir, 'params.json'), 'utf8')) as SessionParams;
      const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as JobRecord[];
      takeFinishedJobs(jobs, join(dir, 'jobs.jsonl'));
      const session = new Session(Number(id), dir, params, jobs);
      session.#lock = lock;
      return session;
    } catch (error) {
      lock?.release();
      throw error;
    }
  }

  /** Whether this object holds the session's lock. */
  get locked(): boolean {
    return this.#lock !== undefined;
  }

  /**
   * Takes the session's lock (its directory's `lock` file), so that no other drover runs the
   * session at the same time; a no-op when this object holds it. Throws ConfigError
   * "session N is running (pid P ...)" while another process that may live holds it; a lock
   * whose process is gone is taken over. unlock() releases it, and so does the end of the process.
   */
  lock(): void {
    this.#lock ??= SessionLock.take(this.dir, this.id);
  }

  unlock(): void {
    this.#lock?.release();
    this.#lock = undefined;
  }

  /** Changes parameters (a resume given other options) and writes them. */
  update(changes: Partial<Omit<SessionParams, 'command' | 'jobsHash' | 'created'>>): void {
    this.params = { ...this.params, ...changes };
    this.saveParams();
  }

  saveParams(): void {
    writeFileSync(join(this.dir, 'params.json'), JSON.stringify(this.params, null, 2) + '\n');
  }

  /** Writes the job list now, atomically, so a reader (or a crash) never sees half of it. */
  save(): void {
    clearTimeout(this.#saveTimer);
    this.#saveTimer = undefined;
    this.saves++;
    const started = performance.now();
    const file = join(this.dir, 'jobs.json');
    writeFileSync(file + '.tmp', JSON.stringify(this.jobs, null, 1) + '\n');
    renameSync(file + '.tmp', file);
    this.#lastSaveMs = performance.now() - started;
    this.saveMs += this.#lastSaveMs;
  }

  /**
   * Writes the job list soon, with whatever changed until then: after SAVE_DELAY_MS, or after
   * 1/SAVE_COST_SHARE times what the last rewrite took if that is longer (up to SAVE_MAX_DELAY_MS).
   * save() at the end writes what is left.
   */
  saveSoon(): void {
    this.#saveTimer ??= setTimeout(() => this.save(), Math.min(SAVE_MAX_DELAY_MS, Math.max(SAVE_DELAY_MS, this.#lastSaveMs / SAVE_COST_SHARE)));
  }

  counts(): Record<JobStatus, number> {
    return countJobs(this.jobs);
  }
}

/** Who holds a session's lock, as its `lock` file says. */
interface LockOwner {
  readonly pid: number;
  /** The process's start time (clock ticks since boot): with the pid, it names the process. */
  readonly startTime?: number;
  readonly bootId?: string;
  readonly host: string;
  readonly since: string;
}

/** A session's lock file, held by this process. */
class SessionLock {
  readonly #releaseOnExit = () => this.release();
  #held = true;

  private constructor(
    readonly file: string,
    readonly owner: LockOwner,
  ) {
    process.once('exit', this.#releaseOnExit);
  }

  /** Creates the lock file, or takes over one whose owner is gone; refuses while its owner may run. */
  static take(dir: string, id: number): SessionLock {
    const file = join(dir, 'lock');
    const startTime = processStartTime(process.pid);
    const boot = bootId();
    const me: LockOwner = { pid: process.pid, ...(startTime === undefined ? {} : { startTime }), ...(boot === undefined ? {} : { bootId: boot }), host: hostname(), since: new Date().toISOString() };
    const mine = `${file}.${process.pid}`;
    writeFileSync(mine, JSON.stringify(me) + '\n');
    try {
      for (let attempt = 0; attempt < 5; attempt++) {
        try {
          linkSync(mine, file); // exclusive, and the file is whole the moment it exists
          return new SessionLock(file, me);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
        }
        const owner = readLock(file);
        if (owner === 'gone') continue;
        if (owner !== undefined && lockOwnerRuns(owner)) throw running(id, owner, file);
        // Its process is gone: move it aside, and look again at what was moved, in case another
        // drover took the lock over in between (its lock then goes back).
        const aside = `${file}.stale.${process.pid}`;
        try {
          renameSync(file, aside);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue;
          throw error;
        }
        const moved = readLock(aside);
        if (moved !== 'gone' && moved !== undefined && lockOwnerRuns(moved)) {
          try {
            linkSync(aside, file);
          } catch {
            // a third drover holds it now: the next look says so
          }
        }
        unlinkSync(aside);
      }
      throw new ConfigError(`session ${id}: could not take its lock ${file} (other drover processes keep taking it)`);
    } finally {
      unlinkSync(mine);
    }
  }

  /** Removes the lock file, if it is still this process's; idempotent. */
  release(): void {
    if (!this.#held) return;
    this.#held = false;
    process.off('exit', this.#releaseOnExit);
    const owner = readLock(this.file);
    if (owner !== 'gone' && owner !== undefined && owner.pid === this.owner.pid && owner.since === this.owner.since) unlinkSync(this.file);
  }
}

/** The owner a lock file names; undefined when it is unreadable (a lock to take over), 'gone' when there is no file. */
function readLock(file: string): LockOwner | undefined | 'gone' {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT' ? 'gone' : undefined;
  }
  try {
    const owner = JSON.parse(text) as Partial<LockOwner>;
    return typeof owner.pid === 'number' && typeof owner.host === 'string' ? owner as LockOwner : undefined;
  } catch {
    return undefined;
  }
}

/** Whether the lock's process may still run: on another machine (unknowable from here), or alive here. */
function lockOwnerRuns(owner: LockOwner): boolean {
  if (owner.startTime === undefined) return owner.host !== hostname() || isAlive(owner.pid);
  return ownerMayLive({ pid: owner.pid, startTime: owner.startTime, host: owner.host, ...(owner.bootId === undefined ? {} : { bootId: owner.bootId }) });
}

function running(id: number, owner: LockOwner, file: string): ConfigError {
  const where = owner.host === hostname() ? '' : ` on ${owner.host}`;
  return new ConfigError(`session ${id} is running (pid ${owner.pid}${where}, since ${owner.since}): resuming it now would run its jobs twice; wait for it to end, or stop it first (lock file ${file})`);
}

/**
 * Jobs that jobs.json still shows pending or running although jobs.jsonl
 * says their attempt ended `ok` (the process stopped before its next
 * rewrite of jobs.json): they are done, with that attempt's figures.
 */
function takeFinishedJobs(jobs: JobRecord[], jobsLog: string): void {
  let text: string;
  try {
    text = readFileSync(jobsLog, 'utf8');
  } catch {
    return;
  }
  for (const line of text.split('\n')) {
    let entry: { job?: unknown; attempt?: unknown; status?: unknown; slot?: unknown; host?: unknown; start?: unknown; durationMs?: unknown; exitCode?: unknown; signal?: unknown };
    try {
      entry = JSON.parse(line) as typeof entry;
    } catch {
      continue; // the last line may be cut short by the crash
    }
    if (entry.status !== 'ok' || typeof entry.job !== 'number' || typeof entry.attempt !== 'number') continue;
    const job = jobs[entry.job - 1];
    if (job === undefined || job.n !== entry.job || (job.status !== 'pending' && job.status !== 'running') || entry.attempt < job.attempts) continue;
    job.status = 'ok';
    job.attempts = entry.attempt;
    if (typeof entry.slot === 'number') job.slot = entry.slot;
    if (typeof entry.host === 'string') job.host = entry.host;
    if (typeof entry.start === 'string') job.started = entry.start;
    if (typeof entry.durationMs === 'number') job.durationMs = entry.durationMs;
    job.exitCode = typeof entry.exitCode === 'number' ? entry.exitCode : null;
    job.signal = typeof entry.signal === 'string' ? entry.signal : null;
    delete job.message;
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
