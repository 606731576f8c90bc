/**
 * Crash journal: what a worker must clean up if it dies mid-run.
 *
 * Before a sandbox starts, the worker records an entry (run cookie, run
 * key, task directory); right after spawn it adds the command's process
 * group; after cleanup succeeded it ends the entry. A worker that starts
 * after a crash (kill -9, OOM killer, power loss) of its predecessor calls
 * `reap()`: every open entry whose owner is gone has its processes killed
 * and its task directory removed.
 *
 * Each journal (one per worker) appends to a file of its own,
 * `worker-<pid>-<id>.jsonl`: a header line naming the owner, then one line
 * per event (begun, process group, ended). Every line is one write(2) to a
 * file opened for appending, so it is in the page cache when the call
 * returns and survives a crash of the worker process, which is what the
 * journal is for (after a power loss no process is left to reap, and a lost
 * line costs at most a task directory). A run creates no file: creating one
 * costs far more than an append (two files per run, in the layout before
 * this one, took a fifth of a trivial task's time). When the file outgrows
 * COMPACT_BYTES, the entries still open are written to a new file that
 * replaces it whole (written, then renamed), so it stays small.
 *
 * Files `run-*.json`, one entry each, are what drover wrote before; they are
 * still listed and reaped, so an upgrade strands nothing.
 *
 * Identity is by (pid, start time, boot id): a pid alone may have been
 * reused by an unrelated process since the entry was written. The owner's
 * host name comes with it: a work directory on NFS may be shared by
 * workers on several machines, and whether a worker on another machine
 * lives cannot be told from here, so its entries are left alone (its own
 * machine's next worker reaps them).
 */
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { lstat, readFile, readdir, rm, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve, sep } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../runtime/logger.js';
import { errorMessage } from '../model/errors.js';
import type { RunJournal } from './host.js';
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

/** The worker that wrote an entry. */
export interface JournalOwner {
  readonly pid: number;
  readonly startTime: number;
  readonly bootId?: string;
  /** The owner machine's host name; absent in entries written before it was recorded (this machine's, then). */
  readonly host?: string;
}

/**
 * Whether the owner runs on another machine (a work directory shared over NFS): then its entries are not
 * this worker's to judge. Another host name alone is not enough: a container made anew on this machine
 * has another name but the same kernel, and so the same boot id, and its predecessor's leftovers are its own.
 */
export function ownerElsewhere(owner: JournalOwner, currentBoot = bootId()): boolean {
  return owner.host !== undefined && owner.host !== hostname() && owner.bootId !== undefined && owner.bootId !== currentBoot;
}

/** Whether the owner, on this machine, may be in this boot; without a boot id on either side, assume so (pids are checked). */
function sameBootAs(owner: JournalOwner, currentBoot: string | undefined): boolean {
  return owner.bootId === undefined || currentBoot === undefined || owner.bootId === currentBoot;
}

/** Whether the owner may still be running: on another machine (unknowable from here), or alive here in this boot. */
export function ownerMayLive(owner: JournalOwner, currentBoot = bootId()): boolean {
  return ownerElsewhere(owner, currentBoot) || (sameBootAs(owner, currentBoot) && isAlive(owner.pid, owner.startTime));
}

/** An open entry: a run begun and not yet ended. */
export interface JournalEntry {
  readonly cookie: string;
  readonly runKey: string;
  /** Undefined when a process group was noted for a cookie that was never begun. */
  readonly taskDir?: string;
  readonly owner: JournalOwner;
  /** ISO time the entry was begun, for people. */
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

const LOG_PREFIX = 'worker-';
const LOG_SUFFIX = '.jsonl';
const LEGACY_PREFIX = 'run-';
const LEGACY_SUFFIX = '.json';
const TMP_MARK = '.tmp-';
const POLL_MS = 20;
/** A journal file larger than this is rewritten with only its open entries. */
export const COMPACT_BYTES = 256 * 1024;
const FORMAT = 2;

/** One line of a journal file. */
type Line =
  | { readonly journal: typeof FORMAT; readonly owner: JournalOwner; readonly createdAt: string }
  | { readonly op: 'begin'; readonly cookie: string; readonly runKey: string; readonly taskDir?: string; readonly at: string }
  | { readonly op: 'group'; readonly cookie: string; readonly pgid: number; readonly startTime?: number }
  | { readonly op: 'end'; readonly cookie: string };

export class CrashJournal implements RunJournal {
  readonly dir: string;
  /** This journal's open entries, by cookie. */
  readonly #entries = new Map<string, JournalEntry>();
  readonly #name = `${LOG_PREFIX}${process.pid}-${randomBytes(4).toString('hex')}${LOG_SUFFIX}`;
  #fd: number | undefined;
  #bytes = 0;
  #owner: JournalOwner | undefined;

  constructor(dir: string) {
    this.dir = dir;
  }

  /** This journal's own file. */
  get path(): string {
    return join(this.dir, this.#name);
  }

  /** Records a run before its sandbox starts. Synchronous: the entry is written when it returns. */
  begin(entry: JournalEntryInput): void {
    if (entry.cookie.length === 0) throw new TypeError('crash journal: empty cookie');
    const createdAt = new Date().toISOString();
    this.#append({ op: 'begin', cookie: entry.cookie, runKey: entry.runKey, taskDir: entry.taskDir, at: createdAt });
    this.#entries.set(entry.cookie, { cookie: entry.cookie, runKey: entry.runKey, taskDir: entry.taskDir, owner: this.#ownerIdentity(), createdAt, groups: [] });
  }

  /**
   * Adds a process group to the run's entry; called right after spawn. A
   * cookie that was never begun gets an entry of its own (without a task
   * directory), so its processes are still found after a crash.
   */
  noteProcessGroup(cookie: string, pgid: number): void {
    let current = this.#entries.get(cookie);
    if (current === undefined) {
      const createdAt = new Date().toISOString();
      this.#append({ op: 'begin', cookie, runKey: '(unknown)', at: createdAt });
      current = { cookie, runKey: '(unknown)', owner: this.#ownerIdentity(), createdAt, groups: [] };
    }
    if (current.groups.some((g) => g.pgid === pgid)) return;
    const group: JournalGroup = { pgid, startTime: processStartTime(pgid) };
    this.#append({ op: 'group', cookie, ...group });
    this.#entries.set(cookie, { ...current, groups: [...current.groups, group] });
  }

  /** Ends the run's entry once its cleanup succeeded. An entry that is not open is not an error. */
  end(cookie: string): void {
    if (!this.#entries.delete(cookie)) return;
    this.#append({ op: 'end', cookie });
    if (this.#bytes > COMPACT_BYTES) this.#compact();
  }

  /**
   * Closes the file; with no entry open it is removed, else it stays for the
   * next worker to reap. For a worker that stops; a later begin opens a new file.
   */
  close(): void {
    if (this.#fd === undefined) return;
    closeSync(this.#fd);
    this.#fd = undefined;
    this.#bytes = 0;
    if (this.#entries.size === 0) {
      try {
        unlinkSync(this.path);
      } catch {
        // gone already
      }
    }
  }

  /** The open entries on disk, of every journal in the directory (corrupt files skipped): for gc, diagnostics and tests. */
  list(): JournalEntry[] {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return [];
    }
    const entries: JournalEntry[] = [];
    for (const name of names) {
      const kind = fileKind(name);
      if (kind === undefined) continue;
      try {
        const parsed = parseFile(kind, readFileSync(join(this.dir, name), 'utf8'));
        if (parsed !== undefined) entries.push(...parsed.entries);
      } catch {
        // vanished or unreadable: skip
      }
    }
    return entries;
  }

  /**
   * Cleans up after crashed owners: for every open entry whose owner
   * process is gone (dead, zombie, pid reused, or another boot), SIGKILLs
   * every process that carries the cookie or belongs to a recorded process
   * group, waits (bounded) until they are gone, and removes the task
   * directory; a file whose entries are all handled is removed. Files of
   * live owners, and of owners on other machines, are left alone: two
   * workers may share a work directory, on one machine or over NFS.
   * Corrupt files are logged and removed.
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
        await removeStaleTemp(file, name);
        continue;
      }
      const kind = fileKind(name);
      if (kind === undefined) continue;
      let text: string;
      try {
        text = await readFile(file, 'utf8');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue; // another worker reaped it
        logger.warn('crash journal: cannot read entry', { file, error: errorMessage(error) });
        continue;
      }
      const parsed = parseFile(kind, text);
      if (parsed === undefined) {
        logger.warn('crash journal: removing corrupt entry', { file });
        await unlink(file).catch(() => {});
        continue;
      }
      const { owner } = parsed;
      if (ownerElsewhere(owner, currentBoot)) {
        logger.info('crash journal: entries of a worker on another machine left alone; its next worker there reaps them', { file, host: owner.host });
        continue;
      }
      const sameBoot = sameBootAs(owner, currentBoot);
      if (sameBoot && isAlive(owner.pid, owner.startTime)) {
        logger.debug('crash journal: entries of a live worker left alone', { file, ownerPid: owner.pid });
        continue;
      }
      const kept: JournalEntry[] = [];
      for (const entry of parsed.entries) {
        report.entries += 1;
        const outcome = await reapEntry(entry, sameBoot, timeoutMs, logger.child({ runKey: entry.runKey, cookie: entry.cookie }));
        report.processesKilled += outcome.killed;
        if (outcome.removed) report.directoriesRemoved += 1;
        if (!outcome.done) kept.push(entry);
      }
      try {
        if (kept.length === 0) await unlink(file);
        else writeWhole(file, owner, kept);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') logger.warn('crash journal: cannot update entry', { file, error: errorMessage(error) });
      }
    }
    if (report.entries > 0) logger.info('crash journal: reaped leftovers of crashed workers', { ...report });
    return report;
  }

  #ownerIdentity(): JournalOwner {
    if (this.#owner === undefined) {
      const startTime = processStartTime(process.pid);
      if (startTime === undefined) throw new Error('crash journal: cannot read /proc/self/stat');
      const boot = bootId();
      this.#owner = { pid: process.pid, startTime, ...(boot === undefined ? {} : { bootId: boot }), host: hostname() };
    }
    return this.#owner;
  }

  /** One line, one write; the file (and its header) is made on the first. */
  #append(line: Line): void {
    if (this.#fd === undefined) {
      mkdirSync(this.dir, { recursive: true });
      this.#fd = openSync(this.path, 'a', 0o600);
      this.#bytes = 0;
      this.#write(headerLine(this.#ownerIdentity()));
    }
    this.#write(JSON.stringify(line) + '\n');
  }

  #write(text: string): void {
    const bytes = Buffer.from(text);
    const written = writeSync(this.#fd!, bytes);
    if (written !== bytes.length) throw new Error(`crash journal: short write to ${this.path} (${written} of ${bytes.length} bytes)`);
    this.#bytes += written;
  }

  /** Replaces the file with one holding only the open entries. */
  #compact(): void {
    const fd = writeWhole(this.path, this.#ownerIdentity(), [...this.#entries.values()], true);
    closeSync(this.#fd!);
    this.#fd = fd.fd;
    this.#bytes = fd.bytes;
  }
}

function headerLine(owner: JournalOwner): string {
  return JSON.stringify({ journal: FORMAT, owner, createdAt: new Date().toISOString() } satisfies Line) + '\n';
}

/** The lines that bring a journal to these open entries. */
function entryLines(entry: JournalEntry): string {
  const begin: Line = { op: 'begin', cookie: entry.cookie, runKey: entry.runKey, ...(entry.taskDir === undefined ? {} : { taskDir: entry.taskDir }), at: entry.createdAt };
  return [begin, ...entry.groups.map((group): Line => ({ op: 'group', cookie: entry.cookie, ...group }))].map((line) => JSON.stringify(line) + '\n').join('');
}

/**
 * Writes a journal file with these open entries under a temporary name and
 * renames it over `path`, so a reader sees the old file or the new one.
 * With `keepOpen`, the new file stays open for appending.
 */
function writeWhole(path: string, owner: JournalOwner, entries: readonly JournalEntry[], keepOpen: true): { fd: number; bytes: number };
function writeWhole(path: string, owner: JournalOwner, entries: readonly JournalEntry[]): void;
function writeWhole(path: string, owner: JournalOwner, entries: readonly JournalEntry[], keepOpen = false): { fd: number; bytes: number } | void {
  const tmp = `${path}${TMP_MARK}${process.pid}`;
  const bytes = Buffer.from(headerLine(owner) + entries.map(entryLines).join(''));
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, bytes);
    renameSync(tmp, path);
  } catch (error) {
    closeSync(fd);
    throw error;
  }
  if (keepOpen) return { fd, bytes: bytes.length };
  closeSync(fd);
}

async function removeStaleTemp(file: string, name: string): Promise<void> {
  const pid = Number(name.slice(name.lastIndexOf(TMP_MARK) + TMP_MARK.length));
  if (Number.isInteger(pid) && isAlive(pid)) return; // maybe being written right now
  await unlink(file).catch(() => {});
}

/** Kills what is left of one entry's run and removes its task directory; `done` unless something must be tried again. */
async function reapEntry(entry: JournalEntry, sameBoot: boolean, timeoutMs: number, log: Logger): Promise<{ done: boolean; killed: number; removed: boolean }> {
  // After a reboot no process of the entry can exist, and its pids mean nothing.
  const { killed, left } = sameBoot ? await killRun(entry, timeoutMs) : { killed: 0, left: [] as number[] };
  if (left.length > 0) {
    log.error('crash journal: processes of a crashed run survived SIGKILL; entry kept', { pids: left.join(','), ownerPid: entry.owner.pid });
    return { done: false, killed, removed: false };
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
        return { done: false, killed, removed: false };
      }
    }
  }
  log.info('crash journal: reaped run of a crashed worker', { ownerPid: entry.owner.pid, processesKilled: killed, taskDir: entry.taskDir, taskDirRemoved: removed });
  return { done: true, killed, removed };
}

function fileKind(name: string): 'log' | 'legacy' | undefined {
  if (name.includes(TMP_MARK)) return undefined;
  if (name.startsWith(LOG_PREFIX) && name.endsWith(LOG_SUFFIX)) return 'log';
  if (name.startsWith(LEGACY_PREFIX) && name.endsWith(LEGACY_SUFFIX)) return 'legacy';
  return undefined;
}

/** A journal file's owner and open entries; undefined when the file is corrupt (no valid header or entry). */
function parseFile(kind: 'log' | 'legacy', text: string): { owner: JournalOwner; entries: JournalEntry[] } | undefined {
  if (kind === 'legacy') {
    const entry = parseLegacyEntry(text);
    return entry === undefined ? undefined : { owner: entry.owner, entries: [entry] };
  }
  const lines = text.split('\n');
  const header = parseJson(lines[0] ?? '');
  if (header?.journal !== FORMAT) return undefined;
  const owner = parseOwner(header.owner);
  if (owner === undefined) return undefined;
  const open = new Map<string, JournalEntry>();
  // A line that does not parse (the torn last one of a power loss) is skipped.
  for (const text of lines.slice(1)) {
    const line = parseJson(text);
    if (line === undefined || typeof line.cookie !== 'string' || line.cookie.length === 0) continue;
    const cookie = line.cookie;
    if (line.op === 'begin' && typeof line.runKey === 'string') {
      if (line.taskDir !== undefined && typeof line.taskDir !== 'string') continue;
      open.set(cookie, {
        cookie,
        runKey: line.runKey,
        ...(typeof line.taskDir === 'string' ? { taskDir: line.taskDir } : {}),
        owner,
        createdAt: typeof line.at === 'string' ? line.at : '',
        groups: [],
      });
    } else if (line.op === 'group') {
      const entry = open.get(cookie);
      const group = parseGroup(line);
      if (entry !== undefined && group !== undefined) open.set(cookie, { ...entry, groups: [...entry.groups, group] });
    } else if (line.op === 'end') {
      open.delete(cookie);
    }
  }
  return { owner, entries: [...open.values()] };
}

function parseJson(text: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

function parseOwner(value: unknown): JournalOwner | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const owner = value as Record<string, unknown>;
  if (!isPositiveInt(owner.pid) || !isNonNegativeInt(owner.startTime)) return undefined;
  if (owner.bootId !== undefined && typeof owner.bootId !== 'string') return undefined;
  if (owner.host !== undefined && typeof owner.host !== 'string') return undefined;
  return {
    pid: owner.pid,
    startTime: owner.startTime,
    ...(typeof owner.bootId === 'string' ? { bootId: owner.bootId } : {}),
    ...(typeof owner.host === 'string' ? { host: owner.host } : {}),
  };
}

function parseGroup(value: Record<string, unknown>): JournalGroup | undefined {
  if (!isPositiveInt(value.pgid)) return undefined;
  if (value.startTime !== undefined && !isNonNegativeInt(value.startTime)) return undefined;
  return value.startTime === undefined ? { pgid: value.pgid } : { pgid: value.pgid, startTime: value.startTime as number };
}

/** A `run-*.json` file of the layout before: one whole entry. */
function parseLegacyEntry(text: string): JournalEntry | undefined {
  const v = parseJson(text);
  if (v === undefined || v.version !== 1 || typeof v.cookie !== 'string' || v.cookie.length === 0 || typeof v.runKey !== 'string') return undefined;
  if (v.taskDir !== undefined && typeof v.taskDir !== 'string') return undefined;
  const owner = parseOwner(v.owner);
  if (owner === undefined || !Array.isArray(v.groups)) return undefined;
  const groups: JournalGroup[] = [];
  for (const g of v.groups as unknown[]) {
    const group = typeof g === 'object' && g !== null ? parseGroup(g as Record<string, unknown>) : undefined;
    if (group === undefined) return undefined;
    groups.push(group);
  }
  return {
    cookie: v.cookie,
    runKey: v.runKey,
    ...(typeof v.taskDir === 'string' ? { taskDir: v.taskDir } : {}),
    owner,
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
