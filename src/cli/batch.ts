/** `drover batch`: runs each line of stdin as a job, in a resumable session (src/batch). */
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { resolve as resolvePath } from 'node:path';
import { ConfigError, errorMessage } from '../model/errors.js';
import { jobsHash, type JobRecord, type Session } from '../batch/session.js';
import { UsageError, type Command, type Values } from './command.js';
import { EXIT } from './exit-codes.js';

const DETAILS = `Each line of stdin is one job. The line is split into words as a shell
splits them, without expansion: blanks separate words, '...' and "..."
quote (in "..." a backslash keeps " \\ $ and \`), a backslash outside quotes
keeps the next character; $VAR, * and ~ are not expanded. Each word is
quoted again and appended to COMMAND, and the result runs with sh -c.
One COMMAND argument is a shell command line itself; without COMMAND the
line's words are the whole command. Blank lines are skipped. Each job
runs in an empty directory of its own (under the session's work/).

Every batch is a session, in SESSIONS/ID: params.json, jobs.json (each
job's status: pending, running, ok, failed, timeout), session.log,
slot-N.log (each slot's output, for tail -f), output/N.log (each job's
output) and jobs.jsonl (one JSON line per finished job: slot, host, start,
duration, exit code, signal).

Options (flag > DROVER_<NAME> environment):
  --split N                jobs that run at once [number of CPUs]
  --timeout S              kill a job's process group after S seconds (status timeout)
  --retries N              run a failed or timed-out job up to N more times [0]
  --sessions PATH          the sessions directory [~/.drover/sessions] (DROVER_SESSIONS)
  --yes                    do not ask before starting (nothing asks yet)
  --report 'sh: CMD'       when the session ends, run CMD with sh in the session
                           directory, with DROVER_SESSION_ID, DROVER_SESSION_DIR,
                           DROVER_JOBS, DROVER_OK, DROVER_FAILED, DROVER_TIMEOUT,
                           DROVER_PENDING and DROVER_ELAPSED (seconds) set
  --resume ID              run session ID's jobs that are still pending
  --retry ID               run session ID's failed and timed-out jobs again

With --resume or --retry the session keeps its command, split, timeout and
retries; jobs on stdin are optional, and when given they must be the
session's jobs, line for line, or drover refuses to run them.

Ctrl-C or SIGTERM kills the running jobs, saves the session and prints how
to resume it. Output is one timestamped line per finished job, then
"session ID (T s): OK/ALL OK - P pending, T timeout, E errors".

Exit codes: 0 every job succeeded, 1 some job failed or timed out,
2 bad usage (unknown option, bad value, unreadable input), 4 interrupted.`;

export const batchCommand: Command = {
  usage: 'cat jobs | drover batch [options] [--] [COMMAND...]',
  summary: 'run each line of stdin as a job, in parallel, in a resumable session',
  details: DETAILS,
  options: {
    split: { type: 'string' },
    timeout: { type: 'string' },
    retries: { type: 'string' },
    sessions: { type: 'string' },
    hosts: { type: 'string' },
    yes: { type: 'boolean', short: 'y' },
    resume: { type: 'string' },
    retry: { type: 'string' },
    report: { type: 'string' },
  },
  async run(values, positionals) {
    const env = process.env;
    const setting = (name: string): string | undefined => (values[name] as string | undefined) ?? env[`DROVER_${name.toUpperCase()}`];
    const split = whole(setting('split'), 'split', availableParallelism(), 1);
    const timeout = whole(setting('timeout'), 'timeout', 0, 1);
    const retries = whole(setting('retries'), 'retries', 0, 0);
    const report = setting('report');
    if (report !== undefined && !/^sh:\s*\S/.test(report)) throw new UsageError(`--report must be 'sh: COMMAND', not "${report}"`);
    const hosts = setting('hosts');
    if (hosts !== undefined) {
      if (hosts.startsWith('@')) {
        try {
          readFileSync(hosts.slice(1), 'utf8');
        } catch (error) {
          throw new ConfigError(`cannot read the hosts file "${hosts.slice(1)}": ${(error as NodeJS.ErrnoException).code ?? errorMessage(error)}`);
        }
      }
      throw new ConfigError('--hosts is not supported yet: batches run on this machine only');
    }
    const { createSession, runSession } = await import('../batch/run.js');
    const { defaultSessionsDir } = await import('../batch/session.js');
    const sessionsDir = values['sessions'] !== undefined ? resolvePath(values['sessions'] as string) : defaultSessionsDir(env);
    const input = process.stdin.isTTY ? '' : await readStdin();
    const resume = values['resume'] as string | undefined;
    const retry = values['retry'] as string | undefined;
    if (resume !== undefined && retry !== undefined) throw new UsageError('give either --resume or --retry, not both');
    let session;
    if (resume !== undefined || retry !== undefined) {
      const { Session } = await import('../batch/session.js');
      session = Session.open(sessionsDir, (resume ?? retry)!);
      checkSameJobs(session, input, positionals);
      if (retry !== undefined) {
        for (const job of session.jobs) if (job.status === 'failed' || job.status === 'timeout') job.status = 'pending';
      }
    } else {
      session = createSession(input.split('\n'), { command: positionals, split, timeout, retries, sessionsDir });
    }
    const interrupt = new AbortController();
    let signalName: string | undefined;
    const onSignal = (signal: NodeJS.Signals) => {
      signalName ??= signal;
      interrupt.abort();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    const say = (text: string) => process.stdout.write(`${new Date().toISOString()} ${text}\n`);
    const todo = session.jobs.filter((job) => job.status === 'pending' || job.status === 'running').length;
    say(`session ${session.id}: ${todo} of ${session.jobs.length} jobs to run, split ${session.params.split}, in ${session.dir}`);
    try {
      const outcome = await runSession(session, { signal: interrupt.signal, onJob: (job) => say(describeJob(job)) });
      const { counts, elapsedMs } = outcome;
      const total = session.jobs.length;
      process.stdout.write(`session ${session.id} (${Math.round(elapsedMs / 1000)} s): ${counts.ok}/${total} OK - ${counts.pending + counts.running} pending, ${counts.timeout} timeout, ${counts.failed} errors\n`);
      if (report !== undefined) await runReport(report.replace(/^sh:\s*/, ''), session, outcome.elapsedMs);
      if (outcome.interrupted) {
        process.stderr.write(`drover batch: interrupted by ${signalName ?? 'a signal'}; the session is saved. Resume it with: drover batch --resume ${session.id}\n`);
        return EXIT.SIGNAL;
      }
      return counts.ok === total ? EXIT.OK : EXIT.FAILED;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  },
};

/** A resume must not run other commands than the session's: the jobs on stdin, if any, must be the stored ones. */
function checkSameJobs(session: Session, input: string, command: readonly string[]): void {
  if (command.length > 0 && JSON.stringify(command) !== JSON.stringify(session.params.command)) {
    throw new ConfigError(`session ${session.id} runs ${JSON.stringify(session.params.command)}, not ${JSON.stringify(command)}; leave the command out to keep the session's`);
  }
  const lines = input.split('\n').filter((line) => line.trim().length > 0);
  if (lines.length === 0) return;
  if (jobsHash(lines) === session.params.jobsHash) return;
  const stored = session.jobs.map((job) => job.line);
  const at = stored.findIndex((line, i) => lines[i] !== line);
  const where = at >= 0 ? `job ${at + 1} is ${JSON.stringify(stored[at])} in the session but ${JSON.stringify(lines[at] ?? '(missing)')} on stdin` : `stdin has ${lines.length - stored.length} more jobs`;
  throw new ConfigError(`the jobs on stdin are not session ${session.id}'s (${stored.length} stored, ${lines.length} given; ${where}); refusing to resume. Pipe the same jobs, or none`);
}

export const sessionsCommand: Command = {
  usage: 'drover sessions [--sessions PATH]',
  summary: 'list batch sessions with their job counts',
  details: `Options:
  --sessions PATH          the sessions directory [~/.drover/sessions] (DROVER_SESSIONS)`,
  options: { sessions: { type: 'string' } },
  async run(values) {
    const { Session, defaultSessionsDir, sessionIds } = await import('../batch/session.js');
    const dir = values['sessions'] !== undefined ? resolvePath(values['sessions'] as string) : defaultSessionsDir(process.env);
    const rows = sessionIds(dir).flatMap((id) => {
      try {
        const session = Session.open(dir, String(id));
        const counts = session.counts();
        const command = session.params.command.join(' ');
        return [[String(id), session.params.created, String(session.jobs.length), String(counts.ok), String(counts.failed), String(counts.timeout), String(counts.pending + counts.running), command.length > 50 ? command.slice(0, 47) + '...' : command]];
      } catch {
        return [];
      }
    });
    const header = ['ID', 'CREATED', 'JOBS', 'OK', 'FAILED', 'TIMEOUT', 'PENDING', 'COMMAND'];
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
    process.stdout.write([header, ...rows].map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ')).join('\n') + '\n');
    return EXIT.OK;
  },
};

/** The --report hook: its failure is reported, and does not change the batch's exit code. */
async function runReport(command: string, session: Session, elapsedMs: number): Promise<void> {
  const { spawn } = await import('node:child_process');
  const counts = session.counts();
  const env = {
    ...process.env,
    DROVER_SESSION_ID: String(session.id),
    DROVER_SESSION_DIR: session.dir,
    DROVER_JOBS: String(session.jobs.length),
    DROVER_OK: String(counts.ok),
    DROVER_FAILED: String(counts.failed),
    DROVER_TIMEOUT: String(counts.timeout),
    DROVER_PENDING: String(counts.pending + counts.running),
    DROVER_ELAPSED: String(Math.round(elapsedMs / 1000)),
  };
  const code = await new Promise<number | null>((resolve) => {
    const child = spawn('sh', ['-c', command], { cwd: session.dir, env, stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', () => resolve(127));
    child.on('close', (exit) => resolve(exit));
  });
  if (code !== 0) process.stderr.write(`drover batch: the --report command exited with ${code ?? 'a signal'}\n`);
}

function describeJob(job: JobRecord): string {
  const seconds = ((job.durationMs ?? 0) / 1000).toFixed(1);
  const end = job.signal ? `signal ${job.signal}` : `exit ${job.exitCode ?? '-'}`;
  return `job ${job.n} ${job.status === 'pending' ? 'stopped' : job.status} slot ${job.slot ?? '-'} (${seconds} s, ${end}): ${job.line}`;
}

function whole(raw: string | undefined, name: string, fallback: number, min: number): number {
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) throw new UsageError(`--${name} must be a whole number of at least ${min}, not "${raw}"`);
  return value;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export type { Values };
