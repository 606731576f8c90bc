/**
 * Small Linux /proc helpers for the local transport, the crash journal and
 * the tests: who is alive, who belongs to a process group, who carries a
 * run cookie.
 *
 * Processes come and go while we read: every helper treats a process that
 * vanishes mid-read (ENOENT, ESRCH) or that we may not read (EACCES, EPERM)
 * as absent, and never throws for it.
 *
 * Zombies (state Z) count as gone everywhere: they run nothing, and in some
 * containers nobody ever reaps orphaned ones.
 */
import { readdirSync, readFileSync } from 'node:fs';

/** The fields of /proc/<pid>/stat drover cares about. */
export interface ProcStat {
  readonly pid: number;
  /** One letter: R running, S sleeping, D disk sleep, Z zombie, T stopped, ... */
  readonly state: string;
  readonly ppid: number;
  /** Process group id. */
  readonly pgrp: number;
  /** Session id. */
  readonly session: number;
  /** When the process started, in clock ticks since boot: with the pid, it identifies a process. */
  readonly startTime: number;
}

/** Parses the text of /proc/<pid>/stat; undefined when it is not one. */
export function parseProcStat(text: string): ProcStat | undefined {
  // comm (field 2) is in parentheses and may itself contain spaces and
  // parentheses, so the fixed fields are those after the last ')'.
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  if (open < 0 || close < open) return undefined;
  const pid = Number(text.slice(0, open).trim());
  // After ')': state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9)
  // minflt(10) cminflt(11) majflt(12) cmajflt(13) utime(14) stime(15)
  // cutime(16) cstime(17) priority(18) nice(19) num_threads(20)
  // itrealvalue(21) starttime(22)
  const rest = text.slice(close + 1).trim().split(/\s+/);
  const field = (n: number): string | undefined => rest[n - 3];
  const state = field(3);
  const ppid = Number(field(4));
  const pgrp = Number(field(5));
  const session = Number(field(6));
  const startTime = Number(field(22));
  if (!Number.isInteger(pid) || state === undefined || state.length === 0) return undefined;
  if (![ppid, pgrp, session, startTime].every(Number.isFinite)) return undefined;
  return { pid, state, ppid, pgrp, session, startTime };
}

/** The stat of a process; undefined when there is no such process (any more). */
export function readProcStat(pid: number): ProcStat | undefined {
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  return parseProcStat(text);
}

/** Every pid in /proc right now (zombies included). */
export function listPids(): number[] {
  let names: string[];
  try {
    names = readdirSync('/proc');
  } catch {
    return [];
  }
  const pids: number[] = [];
  for (const name of names) {
    if (/^\d+$/.test(name)) pids.push(Number(name));
  }
  return pids;
}

/** Stats of every process that is not a zombie. */
export function liveProcesses(): ProcStat[] {
  const stats: ProcStat[] = [];
  for (const pid of listPids()) {
    const stat = readProcStat(pid);
    if (stat !== undefined && !isZombie(stat)) stats.push(stat);
  }
  return stats;
}

/** Stats of the non-zombie processes of process group `pgid`. */
export function groupProcesses(pgid: number): ProcStat[] {
  if (!Number.isInteger(pgid) || pgid <= 0) return [];
  return liveProcesses().filter((stat) => stat.pgrp === pgid);
}

/** Pids of the non-zombie processes of process group `pgid`. */
export function groupPids(pgid: number): number[] {
  return groupProcesses(pgid).map((stat) => stat.pid);
}

/** Whether any process (zombies included) still has `pgid` as its group: the id is then not free for reuse. */
export function groupExists(pgid: number): boolean {
  if (!Number.isInteger(pgid) || pgid <= 0) return false;
  // kill(-pgid, 0) answers without reading /proc: ESRCH means no process, zombie or not, is in the group.
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ESRCH') return false;
  }
  for (const pid of listPids()) {
    if (readProcStat(pid)?.pgrp === pgid) return true;
  }
  return false;
}

/**
 * Pids of the non-zombie processes whose initial environment holds
 * `DROVER_RUN_COOKIE=<cookie>` exactly. The environment is the one the
 * process was exec'ed with; processes we may not read are skipped.
 */
export function pidsWithCookie(cookie: string): number[] {
  if (cookie.length === 0) return [];
  const needle = Buffer.from(`DROVER_RUN_COOKIE=${cookie}\0`);
  const pids: number[] = [];
  for (const pid of listPids()) {
    if (pid === process.pid) continue;
    let environ: Buffer;
    try {
      environ = readFileSync(`/proc/${pid}/environ`);
    } catch {
      continue;
    }
    // Entries are NUL-terminated; match a whole entry, not a suffix of another.
    if (!hasWholeEntry(environ, needle)) continue;
    const stat = readProcStat(pid);
    if (stat !== undefined && !isZombie(stat)) pids.push(pid);
  }
  return pids;
}

function hasWholeEntry(environ: Buffer, needle: Buffer): boolean {
  let at = environ.indexOf(needle);
  while (at >= 0) {
    if (at === 0 || environ[at - 1] === 0) return true;
    at = environ.indexOf(needle, at + 1);
  }
  return false;
}

/** The start time of a process (clock ticks since boot); undefined when it is gone. */
export function processStartTime(pid: number): number | undefined {
  return readProcStat(pid)?.startTime;
}

/**
 * Whether `pid` runs: it exists, is not a zombie and, when `startTime` is
 * given, started at that time (so a reused pid is not mistaken for it).
 */
export function isAlive(pid: number, startTime?: number): boolean {
  const stat = readProcStat(pid);
  if (stat === undefined || isZombie(stat)) return false;
  return startTime === undefined || stat.startTime === startTime;
}

export function isZombie(stat: ProcStat): boolean {
  // X (dead) is only ever seen in a race with the kernel tearing it down.
  return stat.state === 'Z' || stat.state === 'X';
}

/** The kernel's boot id: pids and start times only mean something within one boot. */
export function bootId(): string | undefined {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Sends `signal` to one pid; false when it is gone (ESRCH). Other errors are thrown. */
export function signalPid(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(pid, signal);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ESRCH') return false;
    throw error;
  }
}
