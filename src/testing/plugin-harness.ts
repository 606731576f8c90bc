/**
 * The plugin harness (drover/testing): runs a plugin through whole task
 * lifecycles (boot, tasks, shutdown) with the real task runner
 * (startTaskRun), the scripted mock engine and an in-memory queue, and
 * returns what happened: which of the plugin's hooks were called, in which
 * order, which threw, the resolution the queue got, the command's
 * environment, the run's artifacts and its log.
 *
 * Every way a run can go is one option away:
 *   - the command's end, output and files: the payload's `mock` script
 *     (src/engines/mock.ts): `{ exitCode: 1 }`, `{ startError }`, `{ files }`...
 *   - a payload the schemas refuse: give one (exception/malformed-payload)
 *   - `interrupt`: the task is canceled, its claim is lost, or the worker
 *     shuts down while the command runs (the command then hangs until it)
 *   - `throwIn`: another plugin, after this one, throws at a hook
 *
 * One task runs at a time; `close()` calls the plugin's `shutdown`.
 */
import { Readable } from 'node:stream';
import { MockEngine } from '../engines/mock.js';
import { ClaimLostError, errorMessage } from '../model/errors.js';
import type { Resolution } from '../model/resolution.js';
import type { Claim, Payload } from '../model/task.js';
import { LIVE_LOG_NAME, livelogPlugin } from '../plugins/livelog.js';
import type { Plugin, TaskPlugin } from '../plugins/plugin.js';
import { successPlugin } from '../plugins/success.js';
import { MemoryQueue } from '../queues/memory.js';
import type { TaskStatus } from '../queues/queue.js';
import { silentLogger, type Logger } from '../runtime/logger.js';
import { startTaskRun } from './task-run.js';

/** A plugin's task hooks, and `newTask` that makes them. */
export type TaskHook = 'newTask' | keyof TaskPlugin;

const TASK_HOOKS: readonly (keyof TaskPlugin)[] = ['prepare', 'buildSandbox', 'started', 'stopped', 'finished', 'exception', 'dispose'];

export interface PluginHarnessOptions {
  /** Plugins that run before the one under test, as a worker's shipped ones do; default livelog and success. */
  readonly others?: readonly Plugin[];
  readonly workerId?: string;
  readonly logger?: Logger;
}

export interface PluginRunOptions {
  /** The task's payload: the mock engine's (`mock`, `env`, `maxRunTime`) and the plugins' properties. */
  readonly payload: Payload;
  /** What happens while the command runs; the command hangs until then. */
  readonly interrupt?: 'cancel' | 'claim-lost' | 'shutdown';
  /** Another plugin, run after the one under test, throws at this hook. */
  readonly throwIn?: TaskHook;
  /** Retries of the task (a run that ends exception/intermittent-task then leaves a pending one). */
  readonly retries?: number;
}

export interface PluginRunOutcome {
  readonly claim: Claim;
  /** The resolution the queue took; undefined when none was reported (canceled, claim lost). */
  readonly resolution?: Resolution;
  readonly unreported?: 'canceled' | 'claim-lost' | 'report-refused';
  /** The plugin's own hooks as they were called, in order (hooks it does not define are not listed). */
  readonly hooks: readonly TaskHook[];
  /** The plugin's hooks that threw, with their message. */
  readonly failures: readonly { readonly hook: TaskHook; readonly message: string }[];
  /** The command's environment: the payload's env, then what plugins set; undefined when it was never prepared. */
  readonly env?: Readonly<Record<string, string>>;
  /** Every artifact of the run but the live log, as text. */
  readonly artifacts: Readonly<Record<string, string>>;
  /** The run's log (the live log): the command's output and drover's and plugins' lines. */
  readonly log: string;
  /** The task as the queue has it afterwards. */
  readonly task: TaskStatus;
}

export interface PluginHarness {
  /** The queue tasks run on; artifacts and task states can be read from it. */
  readonly queue: MemoryQueue;
  readonly engine: MockEngine;
  /** Runs one task through its whole lifecycle; resolves when the run is cleaned up. */
  run(options: PluginRunOptions): Promise<PluginRunOutcome>;
  /** Calls the plugins' `shutdown` and closes the queue. Idempotent. */
  close(): Promise<void>;
}

/** Claims last a second, so that a lost claim is noticed at the first reclaim, half a second in. */
const CLAIM_TIMEOUT_MS = 1000;

/** Boots the plugins (their `boot` hooks) and returns a harness that runs tasks with them. */
export async function pluginHarness(plugin: Plugin, options: PluginHarnessOptions = {}): Promise<PluginHarness> {
  const workerId = options.workerId ?? 'harness-worker';
  const logger = options.logger ?? silentLogger;
  const others = options.others ?? [livelogPlugin(), successPlugin()];
  let loseClaim = false;
  const queue = new MemoryQueue({
    claimTimeoutMs: CLAIM_TIMEOUT_MS,
    hooks: {
      reclaim: (run) => {
        if (loseClaim) throw new ClaimLostError(run, 'claim-expired', 'the claim expired (plugin harness: claim-lost)');
      },
    },
  });
  const engine = new MockEngine();
  let current: { hooks: TaskHook[]; failures: { hook: TaskHook; message: string }[] } | undefined;
  const observed = observe(plugin, {
    called: (hook) => current?.hooks.push(hook),
    failed: (hook, error) => current?.failures.push({ hook, message: errorMessage(error) }),
  });
  // As a worker does: every plugin boots in order, and shuts down in order (a rejected shutdown is the harness's error).
  const all = [...others, plugin];
  try {
    for (const each of all) await each.boot?.({ workerId, logger });
  } catch (error) {
    await queue.close();
    throw error;
  }
  let closing: Promise<void> | undefined;

  return {
    queue,
    engine,
    async run(run) {
      if (current !== undefined) throw new Error('pluginHarness: one task at a time');
      current = { hooks: [], failures: [] };
      let started!: () => void;
      const running = new Promise<void>((resolve) => (started = resolve));
      const probe: Plugin = { name: 'harness-probe', newTask: () => ({ started: async () => started() }) };
      const plugins = [...others, observed, ...(run.throwIn ? [faulty(run.throwIn)] : []), probe];
      const payload = run.interrupt ? { ...run.payload, mock: { ...(run.payload['mock'] as object | undefined), hang: true } } : run.payload;
      const taskRun = await startTaskRun({ payload, engine, plugins, queue, workerId, logger, ...(run.retries !== undefined && { retries: run.retries }) });
      try {
        if (run.interrupt !== undefined) {
          const interrupted = await Promise.race([running.then(() => true), taskRun.output.then(() => false, () => false)]);
          if (interrupted && run.interrupt === 'cancel') await queue.cancel(taskRun.claim.taskId);
          if (interrupted && run.interrupt === 'claim-lost') loseClaim = true;
          if (interrupted && run.interrupt === 'shutdown') taskRun.actor.send({ type: 'ABORT' });
        }
        const output = await taskRun.output;
        const { hooks, failures } = current;
        const mockRun = engine.runs.find((candidate) => candidate.claim.taskId === taskRun.claim.taskId && candidate.claim.runId === taskRun.claim.runId);
        const artifacts: Record<string, string> = {};
        let log = '';
        for (const artifact of await queue.listArtifacts(taskRun.claim)) {
          const text = await textOf(await queue.readArtifact(taskRun.claim, artifact.name));
          if (artifact.name === LIVE_LOG_NAME) log = text;
          else artifacts[artifact.name] = text;
        }
        return {
          claim: taskRun.claim,
          ...(output.resolution === undefined ? {} : { resolution: output.resolution }),
          ...(output.unreported === undefined ? {} : { unreported: output.unreported }),
          hooks,
          failures,
          ...(mockRun === undefined ? {} : { env: { ...mockRun.env } }),
          artifacts,
          log,
          task: await queue.task(taskRun.claim.taskId),
        };
      } finally {
        loseClaim = false;
        current = undefined;
        await taskRun.close();
      }
    },
    close: () => (closing ??= (async () => {
      try {
        for (const each of all) await each.shutdown?.({ workerId, logger });
      } finally {
        await queue.close();
      }
    })()),
  };
}

/** Boots the plugin, runs one task with it, shuts it down. */
export async function runPluginLifecycle(plugin: Plugin, options: PluginRunOptions & PluginHarnessOptions): Promise<PluginRunOutcome> {
  const harness = await pluginHarness(plugin, options);
  try {
    return await harness.run(options);
  } finally {
    await harness.close();
  }
}

interface Recorder {
  called(hook: TaskHook): void;
  failed(hook: TaskHook, error: unknown): void;
}

/** The plugin, telling `recorder` of every call of newTask and of the task hooks it defines, and of what they throw. */
function observe(plugin: Plugin, recorder: Recorder): Plugin {
  const { newTask } = plugin;
  return {
    name: plugin.name,
    ...(plugin.payloadSchema === undefined ? {} : { payloadSchema: plugin.payloadSchema }),
    ...(plugin.secrets === undefined ? {} : { secrets: plugin.secrets }),
    ...(newTask === undefined ? {} : {
      newTask(options) {
        recorder.called('newTask');
        let inner: TaskPlugin;
        try {
          inner = newTask.call(plugin, options);
        } catch (error) {
          recorder.failed('newTask', error);
          throw error;
        }
        const hooks: Record<string, unknown> = {};
        for (const hook of TASK_HOOKS) {
          const method = inner[hook] as ((...args: unknown[]) => Promise<unknown>) | undefined;
          if (typeof method !== 'function') continue;
          hooks[hook] = async (...args: unknown[]) => {
            recorder.called(hook);
            try {
              return await method.apply(inner, args);
            } catch (error) {
              recorder.failed(hook, error);
              throw error;
            }
          };
        }
        return hooks as TaskPlugin;
      },
    }),
  };
}

/** A plugin that throws at one hook. */
function faulty(hook: TaskHook): Plugin {
  const fail = async (): Promise<never> => {
    throw new Error(`the ${hook} hook failed (plugin harness: throwIn)`);
  };
  return {
    name: 'harness-faulty',
    newTask() {
      if (hook === 'newTask') throw new Error('the newTask hook failed (plugin harness: throwIn)');
      return { [hook]: fail };
    },
  };
}

async function textOf(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks).toString('utf8');
}
