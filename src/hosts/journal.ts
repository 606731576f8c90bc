/**
 * Crash journal: what a worker must clean up if it dies mid-run.
 *
 * Before a sandbox starts, the worker writes an entry (run cookie, run key,
 * task directory, and itself as owner); right after spawn it adds the
 * command's process group; after cleanup succeeded it removes the entry.
 * A worker that starts after a crash (kill -9, OOM killer, power loss) of
 * its predecessor calls `reap()`: every entry whose owner is gone has its
 * processes killed and its task directory removed.
 *
 * One small JSON file per entry, written synchronously to a temporary name
 * and renamed (after fsync), so an entry is either absent or whole, and it
 * is on disk before the sandbox starts.
 *
 * Identity is by (pid, start time, boot id): a pid alone may have been
 * reused by an unrelated process since the entry was written.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { lstat, readFile, readdir, rm, unlink } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../runtime/logger.js';
import { errorMessage } from '../model/errors.js';
import {
  bootId,
  groupProcesses,
  isAlive,
  pidsWithCookie,
  processStartTime,
  readProcStat,
  signalPid,
} from './proc.js';

/** What the runtime records before a sandbox starts. */
export interface JournalEntryInput {
  /** The run cookie: set as DROVER_RUN_COOKIE in the environment of every process of the run. */
  readonly cookie: string;
  /** `taskId/runId`, for logs. */
  readonly runKey: string;
  /** Removed (rm -rf) when the entry is reaped. */
  readonly taskDir: string;
}

/** A process group of the run, with its leader's start time (guards against pgid reuse). */
export interface JournalGroup {
  readonly pgid: number;
  /** Start time (clock ticks since boot) of the group leader; undefined if it was gone already. */
  readonly startTime?: number;
}

/** An entry as stored. */
export interface JournalEntry {
  readonly version: 1;
  readonly cookie: string;
  readonly runKey: string;
  /** Undefined when a process group was noted for a cookie that was never begun. */
  readonly taskDir?: string;
  readonly owner: {
    readonly pid: number;
    readonly startTime: number;
    readonly bootId?: string;
  };
  /** ISO time the entry was first written, for people. */
  readonly createdAt: string;
  readonly groups: readonly JournalGroup[];
}

export interface ReapReport {
  /** Entries of gone owners that were handled (corrupt files not counted). */
  readonly entries: number;
  readonly processesKilled: number;
  readonly directoriesRemoved: number;
}

export interface ReapOptions {
  /** How long to keep killing and waiting for the processes of one entry; 5000 ms. */
  readonly timeoutMs?: number;
}

const ENTRY_PREFIX = 'run-';
const ENTRY_SUFFIX = '.json';
const TMP_MARK = '.tmp-';
const POLL_MS = 20;

export class CrashJournal {
  readonly dir: string;
  /** Entries this instance wrote, by cookie. */
  readonly #entries = new Map<string, JournalEntry>();
  #dirReady = false;
  #owner: JournalEntry['owner'] | undefined;

  constructor(dir: string) {
    this.dir = dir;
  }

  /** Records a run before its sandbox starts. Synchronous: the entry is on disk when it returns. */
  begin(entry: JournalEntryInput): void {
    if (entry.cookie.length === 0) throw new TypeError('crash journal: empty cookie');
    const stored: JournalEntry = {
      version: 1,
      cookie: entry.cookie,
      runKey: entry.runKey,
      taskDir: entry.taskDir,
      owner: this.#ownerIdentity(),
      createdAt: new Date().toISOString(),
      groups: [],
    };
    this.#write(stored);
    this.#entries.set(entry.cookie, stored);
  }

  /**
   * Adds a process group to the run's entry; called right after spawn. A
   * cookie that was never begun gets an entry of its own (without a task
   * directory), so its processes are still found after a crash.
   */
  noteProcessGroup(cookie: string, pgid: number): void {
    const current = this.#entries.get(cookie) ?? this.#readOwn(cookie) ?? {
      version: 1 as const,
      cookie,
      runKey: '(unknown)',
      owner: this.#ownerIdentity(),
      createdAt: new Date().toISOString(),
      groups: [],
    };
    if (current.groups.some((g) => g.pgid === pgid)) return;
    const group: JournalGroup = { pgid, startTime: processStartTime(pgid) };
    const next: JournalEntry = { ...current, groups: [...current.groups, group] };
    this.#write(next);
    this.#entries.set(cookie, next);
  }

  /** Removes the run's entry once its cleanup succeeded. A missing entry is not an error. */
  end(cookie: string): Promise<void> {
    this.#entries.delete(cookie);
    // Off the event loop: an unlink can take milliseconds. If it fails, the entry stays and the next
    // worker to boot here finds nothing left to kill, removes the (gone) task directory and the entry.
    return unlink(this.#path(cookie)).catch(() => {});
  }

  /** The entries on disk (corrupt files skipped): for `drover` diagnostics and tests. */
  list(): JournalEntry[] {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return [];
    }
    const entries: JournalEntry[] = [];
    for (const name of names) {
      if (!isEntryName(name)) continue;
      try {
        const entry = parseEntry(readFileSync(join(this.dir, name), 'utf8'));
        if (entry !== undefined) entries.push(entry);
      } catch {
        // vanished or unreadable: skip
      }
    }
    return entries;
  }

  /**
   * Cleans up after crashed owners: for every entry whose owner process is
   * gone (dead, zombie, pid reused, or another boot), SIGKILLs every process
   * that carries the cookie or belongs to a recorded process group, waits
   * (bounded) until they are gone, removes the task directory and the
   * entry. Entries of live owners are left alone: two workers may share a
   * work directory. Corrupt entry files are logged and removed.
   *
   * It does not throw for one entry's trouble: that is logged, and the
   * entry is kept for the next worker to try again.
   */
  async reap(logger: Logger, options: ReapOptions = {}): Promise<ReapReport> {
    const timeoutMs = options.timeoutMs ?? 5000;
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { entries: 0, processesKilled: 0, directoriesRemoved: 0 };
      throw error;
    }
    const report = { entries: 0, processesKilled: 0, directoriesRemoved: 0 };
    const currentBoot = bootId();
    for (const name of names.sort()) {
      const file = join(this.dir, name);
      if (name.includes(TMP_MARK)) {
        await this.#removeStaleTemp(file, name);
        continue;
      }
      if (!isEntryName(name)) continue;
      let text: string;
      try {
        text = await readFile(file, 'utf8');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue; // another worker reaped it
        logger.warn('crash journal: cannot read entry', { file, error: errorMessage(error) });
        continue;
      }
      const entry = parseEntry(text);
      if (entry === undefined) {
        logger.warn('crash journal: removing corrupt entry', { file });
        await unlink(file).catch(() => {});
        continue;
      }
      // Without a boot id on either side, assume the same boot (the safe side: pids are checked).
      const sameBoot = entry.owner.bootId === undefined || currentBoot === undefined || entry.owner.bootId === currentBoot;
      if (sameBoot && isAlive(entry.owner.pid, entry.owner.startTime)) {
        logger.debug('crash journal: entry of a live worker left alone', { runKey: entry.runKey, ownerPid: entry.owner.pid });
        continue;
      }
      const log = logger.child({ runKey: entry.runKey, cookie: entry.cookie });
      report.entries += 1;
      // After a reboot no process of the entry can exist, and its pids mean nothing.
      const { killed, left } = sameBoot ? await killRun(entry, timeoutMs) : { killed: 0, left: [] as number[] };
      report.processesKilled += killed;
      if (left.length > 0) {
        log.error('crash journal: processes of a crashed run survived SIGKILL; entry kept', { pids: left.join(','), ownerPid: entry.owner.pid });
        continue;
      }
      let removed = false;
      if (entry.taskDir !== undefined) {
        if (!isSafeToRemove(entry.taskDir)) {
          log.error('crash journal: refusing to remove task directory', { taskDir: entry.taskDir });
        } else {
          try {
            const existed = await lstat(entry.taskDir).then(() => true, () => false);
            await rm(entry.taskDir, { recursive: true, force: true });
            removed = existed;
          } catch (error) {
            log.error('crash journal: cannot remove task directory; entry kept', { taskDir: entry.taskDir, error: errorMessage(error) });
            continue;
          }
        }
      }
      if (removed) report.directoriesRemoved += 1;
      await unlink(file).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') log.warn('crash journal: cannot remove entry', { file, error: errorMessage(error) });
      });
      log.info('crash journal: reaped run of a crashed worker', {
        ownerPid: entry.owner.pid,
        processesKilled: killed,
        taskDir: entry.taskDir,
        taskDirRemoved: removed,
      });
    }
    if (report.entries > 0) logger.info('crash journal: reaped leftovers of crashed workers', { ...report });
    return report;
  }

  #ownerIdentity(): JournalEntry['owner'] {
    if (this.#owner === undefined) {
      const startTime = processStartTime(process.pid);
      if (startTime === undefined) throw new Error('crash journal: cannot read /proc/self/stat');
      const boot = bootId();
      this.#owner = boot === undefined ? { pid: process.pid, startTime } : { pid: process.pid, startTime, bootId: boot };
    }
    return this.#owner;
  }

  #path(cookie: string): string {
    return join(this.dir, entryName(cookie));
  }

  #readOwn(cookie: string): JournalEntry | undefined {
    try {
      const entry = parseEntry(readFileSync(this.#path(cookie), 'utf8'));
      return entry?.cookie === cookie ? entry : undefined;
    } catch {
      return undefined;
    }
  }

  #write(entry: JournalEntry): void {
    if (!this.#dirReady) {
      mkdirSync(this.dir, { recursive: true });
      this.#dirReady = true;
    }
    const path = this.#path(entry.cookie);
    const tmp = `${path}${TMP_MARK}${process.pid}`;
    // Written whole under a temporary name, then renamed: an entry is never half-written. No
    // fsync: the journal guards against crashes of the worker process (kill -9, OOM), which
    // leave the page cache intact; after a power loss no process is left to reap, and an
    // unwritten entry costs at most a task directory. fsync made up half a trivial task's time.
    writeFileSync(tmp, JSON.stringify(entry) + '\n', { mode: 0o600 });
    renameSync(tmp, path);
  }

  async #removeStaleTemp(file: string, name: string): Promise<void> {
    const pid = Number(name.slice(name.lastIndexOf(TMP_MARK) + TMP_MARK.length));
    if (Number.isInteger(pid) && isAlive(pid)) return; // maybe being written right now
    await unlink(file).catch(() => {});
  }
}

function entryName(cookie: string): string {
  const hash = createHash('sha256').update(cookie).digest('hex').slice(0, 32);
  return `${ENTRY_PREFIX}${hash}${ENTRY_SUFFIX}`;
}

function isEntryName(name: string): boolean {
  return name.startsWith(ENTRY_PREFIX) && name.endsWith(ENTRY_SUFFIX);
}

function parseEntry(text: string): JournalEntry | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== 'object' || value === null) return undefined;
  const v = value as Record<string, unknown>;
  const owner = v.owner as Record<string, unknown> | null | undefined;
  if (v.version !== 1 || typeof v.cookie !== 'string' || v.cookie.length === 0 || typeof v.runKey !== 'string') return undefined;
  if (v.taskDir !== undefined && typeof v.taskDir !== 'string') return undefined;
  if (typeof owner !== 'object' || owner === null || !isPositiveInt(owner.pid) || !isNonNegativeInt(owner.startTime)) return undefined;
  if (owner.bootId !== undefined && typeof owner.bootId !== 'string') return undefined;
  if (!Array.isArray(v.groups)) return undefined;
  const groups: JournalGroup[] = [];
  for (const g of v.groups as unknown[]) {
    if (typeof g !== 'object' || g === null) return undefined;
    const group = g as Record<string, unknown>;
    if (!isPositiveInt(group.pgid)) return undefined;
    if (group.startTime !== undefined && !isNonNegativeInt(group.startTime)) return undefined;
    groups.push(group.startTime === undefined ? { pgid: group.pgid } : { pgid: group.pgid, startTime: group.startTime as number });
  }
  return {
    version: 1,
    cookie: v.cookie,
    runKey: v.runKey,
    ...(typeof v.taskDir === 'string' ? { taskDir: v.taskDir } : {}),
    owner: {
      pid: owner.pid,
      startTime: owner.startTime as number,
      ...(typeof owner.bootId === 'string' ? { bootId: owner.bootId } : {}),
    },
    createdAt: typeof v.createdAt === 'string' ? v.createdAt : '',
    groups,
  };
}

function isPositiveInt(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value > 0;
}

function isNonNegativeInt(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0;
}

/** A corrupt or hostile entry must not make us `rm -rf /` or a top-level directory. */
function isSafeToRemove(dir: string): boolean {
  if (!dir.startsWith('/')) return false;
  const parts = resolve(dir).split(sep).filter((p) => p.length > 0);
  return parts.length >= 2;
}

/**
 * The processes of a run, now: those carrying its cookie, and the members
 * of its recorded groups. A group counts only while it can still be ours:
 * if its id is now the pid of a process with another start time, the id
 * was free at some point (the kernel does not reuse a pid still used as a
 * group id) and so the group is gone and that is someone else's. Members
 * must have started no earlier than the group leader (or the owner).
 */
function runProcesses(entry: JournalEntry): { pids: Map<number, number>; groups: number[] } {
  const pids = new Map<number, number>(); // pid -> start time
  for (const pid of pidsWithCookie(entry.cookie)) {
    const startTime = processStartTime(pid);
    if (startTime !== undefined) pids.set(pid, startTime);
  }
  const groups: number[] = [];
  for (const group of entry.groups) {
    const leader = readProcStat(group.pgid);
    if (leader !== undefined && group.startTime !== undefined && leader.startTime !== group.startTime) continue;
    const since = group.startTime ?? entry.owner.startTime;
    const members = groupProcesses(group.pgid).filter((stat) => stat.startTime >= since && stat.pid !== process.pid);
    if (members.length === 0) continue;
    groups.push(group.pgid);
    for (const stat of members) pids.set(stat.pid, stat.startTime);
  }
  return { pids, groups };
}

async function killRun(entry: JournalEntry, timeoutMs: number): Promise<{ killed: number; left: number[] }> {
  const killed = new Set<string>();
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const { pids, groups } = runProcesses(entry);
    if (pids.size === 0) return { killed: killed.size, left: [] };
    if (performance.now() >= deadline) return { killed: killed.size, left: [...pids.keys()] };
    // The group first: one signal reaches every member, even one forked just now.
    for (const pgid of groups) {
      try {
        process.kill(-pgid, 'SIGKILL');
      } catch {
        // ESRCH: gone already; EPERM: the per-pid kills below report nothing more useful
      }
    }
    for (const [pid, startTime] of pids) {
      // Re-check identity right before the signal: the pid may have been reused since the scan.
      if (!isAlive(pid, startTime)) {
        killed.add(`${pid}:${startTime}`);
        continue;
      }
      try {
        if (signalPid(pid, 'SIGKILL')) killed.add(`${pid}:${startTime}`);
      } catch {
        // EPERM: not ours to kill; it stays in `left` if it never goes
      }
    }
    await sleep(POLL_MS);
  }
}
