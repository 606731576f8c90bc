/**
 * Runs the built `drover` CLI (bin/drover.js -> dist/) in child processes,
 * the way a user does, and reads the queue directly for assertions.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { SqliteQueue } from '../../src/queues/sqlite.js';
import type { TaskStatus } from '../../src/queues/queue.js';

export const DROVER = fileURLToPath(new URL('../../bin/drover.js', import.meta.url));

/** Settings that keep tests quick: short claims, fast polls. */
export const FAST_ENV: Record<string, string> = {
  DROVER_CLAIM_TIMEOUT: '4',
  DROVER_POLL_INTERVAL: '0.05',
  DROVER_POLL_WAIT: '1',
  DROVER_SHUTDOWN_GRACE: '1',
  DROVER_KILL_GRACE: '0.5',
};

/**
 * The environment a user's shell would give drover: without the hooks tap
 * injects into child processes (NODE_OPTIONS, _TAPJS_*), which cost about
 * 200 ms per process and are of no use with coverage off.
 */
export function userEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (key.startsWith('_TAPJS_') || key === 'NODE_OPTIONS' || key.startsWith('TAP')) continue;
    env[key] = value;
  }
  return { ...env, ...FAST_ENV, ...extra };
}

export interface RunResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  readonly cwd: string;
  readonly env?: Record<string, string>;
  readonly input?: string;
  readonly timeoutMs?: number;
}

/** Runs `drover ARGS...` to completion. */
export function drover(args: readonly string[], options: RunOptions): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [DROVER, ...args], {
      cwd: options.cwd,
      env: userEnv(options.env),
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`drover ${args.join(' ')} did not finish in ${options.timeoutMs ?? 30_000} ms\n${stderr}`));
    }, options.timeoutMs ?? 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/**
 * Runs `drover ARGS...` and says which of `packages` (under node_modules) it loaded, read from the
 * CommonJS module cache as the process exits. First it checks, with a process that loads the first of
 * them, that the hook sees a loaded package: an empty answer means what it says.
 */
export async function droverLoading(args: readonly string[], packages: readonly string[], options: RunOptions): Promise<RunResult & { readonly loaded: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'drover-loaded-'));
  try {
    const hook = join(dir, 'loaded.mjs');
    writeFileSync(hook, `import { Module } from 'node:module';
process.on('exit', () => {
  const loaded = ${JSON.stringify(packages)}.filter((name) => Object.keys(Module._cache).some((path) => path.includes('/node_modules/' + name + '/')));
  process.stderr.write('packages loaded: ' + loaded.join(' ') + '\\n');
});
`);
    const env = { NODE_OPTIONS: `--import=${pathToFileURL(hook).href}` };
    const seen = (stderr: string) => /^packages loaded: (.*)$/m.exec(stderr)?.[1]?.split(' ').filter(Boolean);
    const control = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(packages[0])})`], { cwd: options.cwd, env: userEnv(env), encoding: 'utf8' });
    if (seen(control.stderr)?.[0] !== packages[0]) throw new Error(`the hook did not see ${packages[0]} loaded: ${control.stderr}`);
    const result = await drover(args, { ...options, env: { ...options.env, ...env } });
    const loaded = seen(result.stderr);
    if (loaded === undefined) throw new Error(`drover ${args.join(' ')} did not say what it loaded: ${result.stderr}`);
    return { ...result, loaded };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Submits a task and returns its id. */
export async function submit(args: readonly string[], options: RunOptions): Promise<string> {
  const result = await drover(['submit', ...args], options);
  if (result.code !== 0) throw new Error(`submit failed (${result.code}): ${result.stderr}`);
  return result.stdout.trim();
}

export interface WorkerProcess {
  readonly child: ChildProcess;
  /** Everything the worker logged so far. */
  log(): string;
  /** Resolves with the exit code (or the signal name) once the process ended. */
  readonly exited: Promise<number | string>;
}

/** Starts `drover worker ARGS...` in the background; `detached`: as the leader of a process group of its own (a foreground job). */
export function startWorker(args: readonly string[], options: RunOptions & { readonly detached?: boolean }): WorkerProcess {
  const child = spawn(process.execPath, [DROVER, 'worker', ...args], {
    cwd: options.cwd,
    env: userEnv(options.env),
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: options.detached ?? false,
  });
  let log = '';
  child.stdout!.on('data', (d: Buffer) => (log += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  const exited = new Promise<number | string>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  return { child, log: () => log, exited };
}

/** Polls `check` every 50 ms until it returns a value other than undefined/false, or fails after `timeoutMs`. */
export async function eventually<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Reads a task straight from the queue in `dir`. */
export async function readTask(dir: string, taskId: string): Promise<TaskStatus> {
  const queue = SqliteQueue.open({ dir });
  try {
    return await queue.task(taskId);
  } finally {
    await queue.close();
  }
}

/** Waits until the task's latest run is resolved, and returns the task. */
export function resolved(dir: string, taskId: string, timeoutMs?: number): Promise<TaskStatus> {
  return eventually(`task ${taskId} to resolve`, async () => {
    const task = await readTask(dir, taskId);
    return task.state !== 'pending' && task.state !== 'running' ? task : undefined;
  }, timeoutMs);
}

/** `completed`, `failed` or `exception/<reason>` of every run, in order. */
export function runOutcomes(task: TaskStatus): string[] {
  return task.runs.map((run) => (run.state === 'exception' ? `exception/${run.reasonResolved}` : run.state));
}

/** Live processes on this machine whose command line holds `needle` (zombies are not alive: PID 1 here may not reap them). */
export function processesWith(needle: string): number[] {
  return readdirSync('/proc').filter((name) => /^\d+$/.test(name)).flatMap((name) => {
    try {
      if (/\) Z /.test(readFileSync(`/proc/${name}/stat`, 'utf8'))) return [];
      return readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(needle) ? [Number(name)] : [];
    } catch {
      return [];
    }
  });
}
