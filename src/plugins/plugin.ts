/**
 * Plugin: code that joins the worker's life and every task's stages.
 *
 * Worker hooks: `boot` in `booting` (a rejection stops the worker),
 * `beforeClaim` before each claim request in `claiming` (see below), and
 * `shutdown` in `shuttingDown` (errors are logged).
 *
 * Task hooks are called on the object returned by `newTask`, for every
 * plugin in configuration order, in this fixed order:
 *
 *   prepare        [loading]   the payload is valid; fetch what the task needs
 *   buildSandbox   [loading]   add env vars to the sandbox builder
 *   maxRunTimeMs   [loading]   how long the command may run (ms), if limited:
 *                              the shortest limit of all plugins applies; when
 *                              it passes the task machine stops the command
 *                              (MAX_RUN_TIME) and the run resolves `failed`.
 *                              A limit is a number in 1..MAX_RUN_TIME_LIMIT_MS
 *                              (any other value, null too, fails the run
 *                              `exception/internal-error` naming the plugin)
 *   started        [running]   the sandbox runs
 *   stopped        [uploading] the command ended: return a verdict (success);
 *                              an exception verdict wins, then a failed one,
 *                              and with no verdict at all the exit status
 *                              decides (0 completed, else failed)
 *   finished       [uploading] the resolution is known and not yet reported:
 *                              upload artifacts here
 *   exception      [uploading] instead of stopped/finished, when the run
 *                              ends in an exception (malformed payload,
 *                              worker shutdown, internal error)
 *   dispose        [cleanup]   always, in reverse order, for every plugin
 *                              whose newTask returned; errors are logged
 *
 * A hook that throws resolves the run `exception/internal-error` (or
 * `exception/malformed-payload` for MalformedPayloadError) with the
 * plugin's name in the message. Hooks receive an AbortSignal that is
 * aborted when the run is canceled or its claim is lost.
 */
import type { Logger } from '../runtime/logger.js';
import type { Claim, Payload } from '../model/task.js';
import type { ExceptionReason, Resolution } from '../model/resolution.js';
import type { RunResult, Sandbox, SandboxBuilder } from '../engines/engine.js';
import type { Transport } from '../hosts/transport.js';
import type { Queue } from '../queues/queue.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { TaskLog } from '../runtime/task-log.js';

/**
 * The longest limit `maxRunTimeMs` may give: 2^31-1 ms, about 24.8 days. The
 * task machine keeps the limit with a timer (xstate's `after`, Node's
 * setTimeout), and Node turns a longer delay into 1 ms: the command would be
 * stopped at once.
 */
export const MAX_RUN_TIME_LIMIT_MS = 2 ** 31 - 1;

export interface PluginWorkerOptions {
  readonly workerId: string;
  readonly logger: Logger;
}

export interface TaskPluginOptions {
  readonly claim: Claim;
  readonly payload: Payload;
  readonly workerId: string;
  readonly queue: Queue;
  /** The run's log: the command's output, and lines plugins and drover write. */
  readonly log: TaskLog;
  readonly logger: Logger;
  readonly signal: AbortSignal;
}

/**
 * A plugin's say on whether the run succeeded; undefined means no opinion.
 * `exception/intermittent-task` asks the queue to run the task again while
 * it has retries left (the success plugin's `onExitStatus.retry`).
 */
export type Verdict =
  | { readonly state: 'completed' | 'failed'; readonly message?: string }
  | { readonly state: 'exception'; readonly reason: 'intermittent-task'; readonly message?: string }
  | undefined;

/** What buildSandbox may need beyond the builder. */
export interface BuildSandboxContext {
  /** The run's task directory, on the machine the command runs on. */
  readonly taskDir: string;
  /** That machine's transport: files in the task directory (artifacts read them after the run). */
  readonly transport: Transport;
}

export interface TaskPlugin {
  prepare?(): Promise<void>;
  buildSandbox?(builder: SandboxBuilder, context: BuildSandboxContext): Promise<void>;
  maxRunTimeMs?(): number | undefined;
  started?(sandbox: Sandbox): Promise<void>;
  stopped?(result: RunResult): Promise<Verdict>;
  finished?(resolution: Resolution, sandbox: Sandbox): Promise<void>;
  exception?(reason: ExceptionReason): Promise<void>;
  dispose?(): Promise<void>;
}

export interface Plugin {
  readonly name: string;
  /** JSON Schema of the payload properties this plugin reads; joined with the engine's. */
  readonly payloadSchema?: JsonSchemaObject;
  /** Values that must never appear in logs: the runtime masks them in every run's log. */
  readonly secrets?: readonly string[];
  boot?(options: PluginWorkerOptions): Promise<void>;
  /**
   * Called before each claim request, for every plugin in order until one
   * gives a reason: make room for the next task (the gc plugin frees disk
   * here), and return why the worker must not claim now, or undefined. While
   * a reason stands the worker claims nothing and asks again about once a
   * second; it logs the reason once when it starts holding off, says so when
   * it claims again, and `Worker.heldOff()` gives it. Running tasks are not
   * touched. A throw counts as a reason (the plugin's name and the error).
   */
  beforeClaim?(options: PluginWorkerOptions): Promise<string | undefined>;
  shutdown?(options: PluginWorkerOptions): Promise<void>;
  newTask?(options: TaskPluginOptions): TaskPlugin;
}
