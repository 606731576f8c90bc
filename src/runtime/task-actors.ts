/**
 * The task machine's actors: the work behind each state, against the real
 * engine, host, plugins and queue.
 *
 * Each claimed run gets a `RunState` that holds what its stages build (the
 * sandbox, the plugin objects, the task directory), keyed by run. The actors
 * find it by the claim in their input; `cleanup` releases it, in reverse
 * order of set-up, waiting first for any stage still under way, and reports
 * every step's error.
 */
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { fromCallback, fromPromise } from 'xstate';
import type { Engine, Sandbox, SandboxBuilder } from '../engines/engine.js';
import type { Host, Placement } from '../hosts/host.js';
import type { Transport } from '../hosts/transport.js';
import { ClaimLostError, InternalError, MalformedPayloadError, QueueUnavailableError, errorMessage } from '../model/errors.js';
import { describeResolution, type Resolution } from '../model/resolution.js';
import { randomHex, runKey, type Claim, type RunResult } from '../model/task.js';
import { SecretMasker } from '../plugins/env.js';
import { MAX_RUN_TIME_LIMIT_MS, type Plugin, type TaskPlugin, type Verdict } from '../plugins/plugin.js';
import type { Queue } from '../queues/queue.js';
import type { ClaimInput, CleanupInput, LoadOutput, ReportInput, StopInput, TaskEvent, UploadInput } from '../machines/task.js';
import type { Logger } from './logger.js';
import type { PayloadValidator } from './schema.js';
import { TaskLog } from './task-log.js';

export interface TaskRuntime {
  readonly workerId: string;
  readonly queue: Queue;
  readonly host: Host;
  readonly engine: Engine;
  /** In configuration order; hooks run in this order, dispose in reverse. */
  readonly plugins: readonly Plugin[];
  readonly validatePayload: PayloadValidator;
  /** Task directories are made under `<workDir>/tasks` on the host. */
  readonly workDir: string;
  readonly logger: Logger;
  readonly now?: () => number;
}

/** How long the log waits for the command's streams to close after its main process exited. */
const OUTPUT_DRAIN_MS = 500;

class RunState {
  readonly log: TaskLog;
  /** Aborted when the run is canceled or its claim is lost: hooks and engine calls give up. */
  readonly lost = new AbortController();
  readonly cookie = randomHex(12);
  readonly plugins: { readonly name: string; readonly hooks: TaskPlugin }[] = [];
  takenUntil: number;
  taskDir?: string;
  /** The machine the run was placed on, for hosts that place runs (`ssh`); released last in cleanup. */
  placement?: Placement;
  /** Aborted when the placement's machine goes down: the reclaim actor then stops the run (ABORT). */
  readonly hostLost = new AbortController();
  unwatchPlacement?: () => void;
  journaled = false;
  builder?: SandboxBuilder;
  sandbox?: Sandbox;
  /** Stages still under way; cleanup waits for them before it disposes. */
  loading?: Promise<unknown>;
  starting?: Promise<unknown>;
  output?: Promise<unknown>;

  constructor(
    readonly claim: Claim,
    readonly logger: Logger,
    secrets: SecretMasker,
  ) {
    this.takenUntil = claim.takenUntil;
    this.log = secrets.empty ? new TaskLog() : new MaskedTaskLog(secrets);
  }
}

export function createTaskActors(runtime: TaskRuntime) {
  const { queue, host, engine, workerId } = runtime;
  // Claims are measured on the queue's clock (a PostgreSQL queue's is the server's), so reclaims are timed by it.
  const now = runtime.now ?? (queue.now === undefined ? Date.now : () => queue.now!());
  const runs = new Map<string, RunState>();
  const secrets = new SecretMasker(runtime.plugins.flatMap((plugin) => plugin.secrets ?? []));

  const stateOf = (claim: Claim): RunState => {
    const key = runKey(claim);
    let run = runs.get(key);
    if (run === undefined) {
      run = new RunState(claim, runtime.logger.child({ taskId: claim.taskId, runId: claim.runId }), secrets);
      runs.set(key, run);
    }
    return run;
  };

  /** Calls one hook on every plugin that has it, in order; a throw names the plugin and stops the stage. */
  const eachPlugin = async (run: RunState, hook: keyof TaskPlugin, call: (hooks: TaskPlugin) => Promise<unknown> | undefined) => {
    for (const { name, hooks } of run.plugins) {
      try {
        if (lacks(hooks, hook)) continue;
        await call(hooks);
      } catch (error) {
        throw pluginError(name, hook, error);
      }
    }
  };

  /** Where the run's files and commands go: its placement's machine, else the host's one transport. */
  const transportOf = (run: RunState): Transport => run.placement?.transport ?? host.transport();

  async function load(claim: Claim, signal: AbortSignal): Promise<LoadOutput> {
    const run = stateOf(claim);
    run.log.line(`worker ${workerId} claimed run ${claim.runId} of task ${claim.taskId}`);
    // Plugin objects exist before validation so that every path can reach their hooks
    // (the live log must carry a malformed-payload message too); they read the payload in prepare.
    for (const plugin of runtime.plugins) {
      if (plugin.newTask === undefined) continue;
      try {
        const hooks = plugin.newTask({ claim, payload: claim.payload, workerId, queue, log: run.log, logger: run.logger, signal: run.lost.signal });
        // Checked here, so that every later stage may take the hooks for an object (a JavaScript plugin could return anything).
        if (typeof hooks !== 'object' || hooks === null) throw new TypeError(`it returned ${hooks === null ? 'null' : typeof hooks}, not an object of hooks`);
        run.plugins.push({ name: plugin.name, hooks });
      } catch (error) {
        throw pluginError(plugin.name, 'newTask', error);
      }
    }
    runtime.validatePayload(claim.payload);
    let workDir = runtime.workDir;
    if (host.place !== undefined) {
      const placement = await host.place({ claim, ...placementHints(claim.payload), signal });
      run.placement = placement;
      workDir = placement.workDir;
      run.log.line(`running on ${placement.host}`);
      const onLost = () => run.hostLost.abort(placement.lost.reason);
      if (placement.lost.aborted) onLost();
      else {
        placement.lost.addEventListener('abort', onLost, { once: true });
        run.unwatchPlacement = () => placement.lost.removeEventListener('abort', onLost);
      }
    }
    const transport = transportOf(run);
    const taskDir = transport.join(workDir, 'tasks', `${claim.taskId}-${claim.runId}`);
    // Recorded before anything exists, so a crash at any later point leaves nothing unreaped.
    host.journal?.begin({ cookie: run.cookie, runKey: runKey(claim), taskDir });
    run.journaled = host.journal !== undefined;
    run.taskDir = taskDir;
    await transport.remove(taskDir);
    await transport.mkdir(taskDir);
    run.builder = fulfils<SandboxBuilder>(
      await engine.prepare(claim.payload, { claim, transport, taskDir, cookie: run.cookie, logger: run.logger, signal }),
      `engine ${engine.name}: prepare`, 'a sandbox builder', BUILDER_METHODS,
    );
    await eachPlugin(run, 'prepare', (hooks) => hooks.prepare?.());
    const builder = run.builder;
    await eachPlugin(run, 'buildSandbox', (hooks) => hooks.buildSandbox?.(builder, { taskDir, transport }));
    // The shortest limit any plugin sets (the maxruntime plugin's, from the payload); the task machine enforces it.
    const limits: number[] = [];
    await eachPlugin(run, 'maxRunTimeMs', async (hooks) => {
      const limit: unknown = hooks.maxRunTimeMs?.();
      if (limit === undefined) return;
      // A JavaScript plugin may give anything: null would make the limit 0, and a limit past the timer's
      // range becomes 1 ms; either would stop the command at once.
      if (typeof limit !== 'number' || !(limit >= 1 && limit <= MAX_RUN_TIME_LIMIT_MS)) {
        throw new InternalError(`it gave ${describeValue(limit)}, not a number of milliseconds in 1..${MAX_RUN_TIME_LIMIT_MS}`);
      }
      limits.push(limit);
    });
    return { maxRunTimeMs: limits.length > 0 ? Math.min(...limits) : undefined };
  }

  async function run(claim: Claim): Promise<RunResult> {
    const state = stateOf(claim);
    if (state.builder === undefined) throw new InternalError('run: the sandbox was never built');
    const starting = state.builder.start();
    state.starting = starting;
    const started: unknown = await starting;
    let sandbox: Sandbox;
    try {
      sandbox = fulfils<Sandbox>(started, `engine ${engine.name}: start`, 'a sandbox', SANDBOX_METHODS, SANDBOX_STREAMS);
    } catch (error) {
      // Its command may be running: what dispose it has ends it, so that nothing is left behind.
      const dispose = (started as { dispose?: unknown } | null | undefined)?.dispose;
      if (typeof dispose === 'function') await attempt(() => dispose.call(started)).catch(() => {});
      throw error;
    }
    state.sandbox = sandbox;
    // Secrets the plugins name (the env plugin's) are masked before the output reaches the log.
    const masked = (source: Readable): Readable => (secrets.empty ? source : source.pipe(secrets.transform()));
    state.output = Promise.all([state.log.pipeFrom(masked(sandbox.stdout)), state.log.pipeFrom(masked(sandbox.stderr))]);
    await eachPlugin(state, 'started', (hooks) => hooks.started?.(sandbox));
    const result = await sandbox.wait();
    // A background process may hold the pipes open; its output is not worth a stuck task.
    await atMost(state.output, OUTPUT_DRAIN_MS);
    state.log.line(describeResult(result));
    return result;
  }

  async function stop({ claim, reason, detail }: StopInput): Promise<void> {
    const run = stateOf(claim);
    run.log.line(`stopping the command: ${detail ?? reason}`);
    await run.starting?.catch(() => {});
    await run.sandbox?.abort();
  }

  async function upload({ claim, result, resolution: decided }: UploadInput): Promise<Resolution> {
    const run = stateOf(claim);
    // The resolution: decided before this stage (exceptions, maxRunTime), else the plugins' verdicts on the result.
    let resolution: Resolution;
    if (decided !== undefined) {
      resolution = decided;
    } else if (result === undefined) {
      resolution = { state: 'exception', reason: 'internal-error', message: 'the run ended without a result' };
    } else {
      try {
        const verdicts: Verdict[] = [];
        await eachPlugin(run, 'stopped', async (hooks) => verdicts.push(await hooks.stopped?.(result)));
        resolution = judge(result, verdicts);
      } catch (error) {
        resolution = { state: 'exception', reason: 'internal-error', message: errorMessage(error) };
      }
    }
    run.log.line(`resolved ${describeResolution(resolution)}${resolution.message ? `: ${resolution.message}` : ''}`);
    if (resolution.state === 'exception' || run.sandbox === undefined) {
      const reason = resolution.state === 'exception' ? resolution.reason : 'internal-error';
      // Every plugin hears of the exception, even when one of them fails: the log must still be uploaded.
      for (const { name, hooks } of run.plugins) {
        if (lacks(hooks, 'exception')) continue;
        await attempt(() => hooks.exception?.(reason)).catch((error) => run.logger.error(pluginError(name, 'exception', error).message));
      }
      return resolution;
    }
    // The command ran (to its end, or until maxRunTime): plugins upload what it made.
    const sandbox = run.sandbox;
    for (const { name, hooks } of run.plugins) {
      if (lacks(hooks, 'finished')) continue;
      await attempt(() => hooks.finished?.(resolution, sandbox)).catch((error) => {
        const failure = pluginError(name, 'finished', error);
        run.logger.error(failure.message);
        resolution = failure instanceof MalformedPayloadError
          ? { state: 'exception', reason: 'malformed-payload', message: failure.message }
          : { state: 'exception', reason: 'internal-error', message: failure.message };
      });
    }
    return resolution;
  }

  async function report({ claim, resolution }: ReportInput, signal: AbortSignal): Promise<void> {
    const run = stateOf(claim);
    for (let attempt = 0; ; attempt++) {
      try {
        // A message may quote what the command printed or an error about it: secrets stay out of the queue too.
        await queue.resolve(claim, workerId, maskedResolution(resolution, secrets));
        run.logger.info('resolved', { resolution: describeResolution(resolution) });
        return;
      } catch (error) {
        if (!(error instanceof QueueUnavailableError) || now() >= run.takenUntil) throw error;
        run.logger.warn('the queue did not take the resolution; retrying', { error, attempt });
        await sleep(Math.min(5000, 100 * 2 ** attempt), undefined, { signal });
      }
    }
  }

  async function cleanup({ claim, unreported, detail, resolution }: CleanupInput): Promise<void> {
    const run = stateOf(claim);
    // Once per run (cleanup is): a run that ends without a resolution from this worker says so, and why.
    if (unreported === 'report-refused') {
      run.logger.error('the run ends unresolved: the queue refused its resolution', {
        reason: unreported,
        ...(resolution === undefined ? {} : { resolution: describeResolution(resolution) }),
        detail,
      });
    } else if (unreported !== undefined) {
      run.logger.warn(`the run ends unresolved: ${unreported === 'canceled' ? 'the task was canceled' : 'the claim was lost'}`, { reason: unreported, detail });
    }
    const failures: string[] = [];
    const step = async (what: string, action: () => Promise<unknown> | undefined) => {
      try {
        await action();
      } catch (error) {
        failures.push(`${what}: ${errorMessage(error)}`);
      }
    };
    // Stages that were interrupted may still be settling; dispose only what they finished building.
    await Promise.allSettled([run.loading, run.starting]);
    await step('sandbox', () => (run.sandbox ? run.sandbox.dispose() : run.builder?.discard()));
    for (const { name, hooks } of [...run.plugins].reverse()) {
      if (lacks(hooks, 'dispose')) continue;
      await step(`plugin ${name}: dispose`, () => hooks.dispose?.());
    }
    run.log.end();
    if (run.taskDir !== undefined) {
      const taskDir = run.taskDir;
      // A machine that went down cannot be cleaned now; its directory waits there for a later worker.
      if (!run.hostLost.signal.aborted) await step('task directory', () => transportOf(run).remove(taskDir));
    }
    run.unwatchPlacement?.();
    run.placement?.release();
    runs.delete(runKey(claim));
    if (failures.length > 0) {
      // The journal entry stays, so the next worker to boot here reaps what is left.
      run.logger.error('cleanup failed', { failures });
      throw new InternalError(`cleanup failed: ${failures.join('; ')}`);
    }
    if (run.journaled) host.journal?.end(run.cookie);
  }

  /** Renews the claim at half its remaining length; tells the machine when the run is no longer ours. */
  const reclaim = fromCallback<TaskEvent, ClaimInput>(({ input, sendBack }) => {
    const run = stateOf(input.claim);
    let timer: NodeJS.Timeout | undefined;
    let stopped = false;
    const lost = (event: TaskEvent) => {
      if (stopped) return;
      stopped = true;
      clearTimeout(timer);
      run.lost.abort();
      sendBack(event);
    };
    const schedule = () => {
      timer = setTimeout(tick, Math.max(250, (run.takenUntil - now()) / 2));
    };
    const tick = async () => {
      try {
        run.takenUntil = (await queue.reclaim(input.claim, workerId)).takenUntil;
      } catch (error) {
        if (error instanceof ClaimLostError) {
          lost(error.reason === 'canceled' ? { type: 'CANCEL' } : { type: 'CLAIM_LOST', message: error.message });
          return;
        }
        run.logger.warn('reclaim failed; retrying', { error });
        if (now() >= run.takenUntil) {
          lost({ type: 'CLAIM_LOST', message: `could not reclaim before the claim expired: ${errorMessage(error)}` });
          return;
        }
      }
      if (!stopped) schedule();
    };
    const unwatch = queue.watchCancellation(input.claim, () => lost({ type: 'CANCEL' }));
    // The machine the run was placed on went down: stop the run as for a shutdown, so the queue runs it again elsewhere.
    const onHostLost = () => {
      if (stopped) return;
      const reason = errorMessage(run.hostLost.signal.reason as unknown);
      // The resolution's message names the machine, whatever words the host chose for why.
      const host = run.placement?.host;
      const message = host === undefined || reason.includes(host) ? reason : `host ${host} went down: ${reason}`;
      run.log.line(`${message}; stopping the run so that it runs again elsewhere`);
      run.logger.warn('the run\'s host went down', { host, error: reason });
      sendBack({ type: 'ABORT', message });
    };
    if (run.hostLost.signal.aborted) onHostLost();
    else run.hostLost.signal.addEventListener('abort', onHostLost, { once: true });
    schedule();
    return () => {
      stopped = true;
      clearTimeout(timer);
      unwatch();
      run.hostLost.signal.removeEventListener('abort', onHostLost);
    };
  });

  const track = <T>(claim: Claim, field: 'loading', promise: Promise<T>): Promise<T> => {
    stateOf(claim)[field] = promise;
    return promise;
  };

  return {
    load: fromPromise<LoadOutput, ClaimInput>(({ input, signal }) => track(input.claim, 'loading', load(input.claim, signal))),
    run: fromPromise<RunResult, ClaimInput>(({ input }) => run(input.claim)),
    stop: fromPromise<void, StopInput>(({ input }) => stop(input)),
    upload: fromPromise<Resolution, UploadInput>(({ input }) => upload(input)),
    report: fromPromise<void, ReportInput>(({ input, signal }) => report(input, signal)),
    cleanup: fromPromise<void, CleanupInput>(({ input }) => cleanup(input)),
    reclaim,
    /** Runs still held: for status output and tests. */
    runs: () => [...runs.keys()],
  };
}

/** What a payload says about where it may run: the script name, its maxConcurrent, the labels a host must carry. */
function placementHints(payload: Claim['payload']): { name?: string; maxConcurrent?: number; labels?: string[] } {
  const { name, maxConcurrent, hostLabels } = payload as { name?: unknown; maxConcurrent?: unknown; hostLabels?: unknown };
  return {
    ...(typeof name === 'string' ? { name } : {}),
    ...(typeof maxConcurrent === 'number' ? { maxConcurrent } : {}),
    ...(Array.isArray(hostLabels) ? { labels: hostLabels.filter((label): label is string => typeof label === 'string') } : {}),
  };
}

/** A run's log whose own lines (drover's, plugins') have the secrets masked too. */
class MaskedTaskLog extends TaskLog {
  constructor(readonly secrets: SecretMasker) {
    super();
  }

  override line(text: string): void {
    super.line(this.secrets.mask(text));
  }
}

function maskedResolution(resolution: Resolution, secrets: SecretMasker): Resolution {
  return resolution.message === undefined || secrets.empty ? resolution : { ...resolution, message: secrets.mask(resolution.message) };
}

/** Waits for `promise`, but at most `ms`; the timer goes as soon as the promise settles (one per task would pile up). */
function atMost(promise: Promise<unknown>, ms: number): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([promise, new Promise((resolve) => (timer = setTimeout(resolve, ms)))]).finally(() => clearTimeout(timer));
}

const BUILDER_METHODS = ['setEnv', 'start', 'discard'] as const;
const SANDBOX_METHODS = ['wait', 'abort', 'extractFile', 'dispose'] as const;
const SANDBOX_STREAMS = ['stdout', 'stderr'] as const;

/**
 * `value` as what an engine's call must give, or an error that names the engine, the call and what is
 * missing. An engine may be a JavaScript module that returns anything; without this check its mistake
 * would surface later as a TypeError in another part (a plugin's buildSandbox, the live log).
 */
function fulfils<T>(value: unknown, call: string, what: string, methods: readonly string[], streams: readonly string[] = []): T {
  if (typeof value !== 'object' || value === null) {
    throw new InternalError(`${call} gave ${value === null ? 'null' : typeof value}, not ${what}`);
  }
  const fields = value as Record<string, unknown>;
  const missing = [
    ...methods.filter((name) => typeof fields[name] !== 'function'),
    ...streams.filter((name) => typeof (fields[name] as { pipe?: unknown } | undefined)?.pipe !== 'function'),
  ];
  if (missing.length > 0) throw new InternalError(`${call} gave ${what} without ${missing.join(', ')}`);
  return value as T;
}

/**
 * Whether a plugin's task object surely has no `hook`: then it is not called at all. Most plugins have few
 * of the hooks, and a call made and awaited in vain cost every task a few promises per plugin and hook. A
 * hook whose getter throws counts as present, so that its call reports the error as any hook's would.
 */
function lacks(hooks: TaskPlugin, hook: keyof TaskPlugin): boolean {
  try {
    return hooks[hook] === undefined;
  } catch {
    return false;
  }
}

/** Calls a hook so that a synchronous throw becomes a rejection, like an asynchronous one. */
export function attempt<T>(call: () => T | Promise<T>): Promise<T> {
  return Promise.resolve().then(call);
}

/**
 * The resolution from the plugins' verdicts (the success plugin's among
 * them): an exception verdict wins, then a failed one, then a completed one.
 * With no verdict at all (a worker without the success plugin) the exit
 * status decides: 0 is completed, anything else failed.
 */
function judge(result: RunResult, verdicts: readonly Verdict[]): Resolution {
  const given = verdicts.filter((verdict) => verdict !== undefined);
  const decisive = given.find((verdict) => verdict.state === 'exception') ?? given.find((verdict) => verdict.state === 'failed') ?? given[0];
  if (decisive !== undefined) {
    const { message } = decisive;
    if (decisive.state === 'exception') return { state: 'exception', reason: decisive.reason, ...(message === undefined ? {} : { message }) };
    return { state: decisive.state, ...(message === undefined ? {} : { message }) };
  }
  if (result.exitCode === 0 && result.signal === null && result.startError === undefined) return { state: 'completed' };
  return { state: 'failed', message: describeResult(result) };
}

export function describeResult(result: RunResult): string {
  const seconds = (result.durationMs / 1000).toFixed(2);
  if (result.startError !== undefined) return `the command could not start: ${result.startError}`;
  if (result.signal !== null) return `the command was killed by ${result.signal} after ${seconds} s`;
  return `the command exited with code ${result.exitCode} after ${seconds} s`;
}

/** A value as an error message shows it: `null`, `Infinity`, `"30"`, `a function`. */
function describeValue(value: unknown): string {
  if (typeof value === 'number' || value === null || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (typeof value === 'string') return JSON.stringify(value);
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

function pluginError(name: string, hook: string, error: unknown): Error {
  if (error instanceof MalformedPayloadError) {
    return new MalformedPayloadError(
      error.problems.map((problem) => ({ ...problem, message: `${problem.message} (plugin ${name})` })),
      { cause: error },
    );
  }
  return new InternalError(`plugin ${name}: ${hook} failed: ${errorMessage(error)}`, { cause: error });
}
