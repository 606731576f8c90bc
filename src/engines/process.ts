/**
 * The `process` engine: runs the payload's command as a plain process
 * group on the host, in the task directory, with no isolation beyond that.
 *
 * Payload:
 *   command     a string run by `sh -c`, or an argv array (argv[0] looked up in PATH)
 *   env         extra environment variables (string values)
 *
 * The command's environment is built, later wins: the engine's base env
 * (a few variables of the worker's own: PATH, HOME, LANG...), then
 * payload.env, then what plugins set with `setEnv()` (the env plugin:
 * the worker's task env, TASK_ID, RUN_ID and TASK_DIR); the transport
 * adds DROVER_RUN_COOKIE last. (`maxRunTime` is the maxruntime plugin's.)
 */
import { posix } from 'node:path';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { MalformedPayloadError, ResourceUnavailableError, errorMessage, type PayloadProblem } from '../model/errors.js';
import type { Payload } from '../model/task.js';
import type { Logger } from '../runtime/logger.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { Execution, Transport, TransportCapabilities } from '../hosts/transport.js';
import type { Engine, EnginePrepareOptions, RunResult, Sandbox, SandboxBuilder } from './engine.js';

export interface ProcessEngineOptions {
  /** First signal of abort(); SIGTERM. */
  readonly killSignal?: NodeJS.Signals;
  /** How long abort() waits after killSignal before SIGKILL; 5000 ms. */
  readonly killGraceMs?: number;
  /**
   * Base environment of every command. Default: PATH, HOME, LANG, LC_ALL,
   * TZ, USER, LOGNAME, SHELL and TMPDIR of the worker's environment, where set.
   */
  readonly env?: Readonly<Record<string, string>>;
}

/** Variables of the worker's environment that commands get by default. */
export const DEFAULT_BASE_ENV_NAMES = ['PATH', 'HOME', 'LANG', 'LC_ALL', 'TZ', 'USER', 'LOGNAME', 'SHELL', 'TMPDIR'] as const;

/** How long abort() and dispose() wait for the group after SIGKILL. */
const KILL_WAIT_MS = 10_000;
/** How long abort() waits for the main process's exit to be reported once the group is gone. */
const EXIT_REPORT_WAIT_MS = 1_000;

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    command: {
      description: 'A command line run by `sh -c`, or an argv array (argv[0] is looked up in PATH).',
      anyOf: [
        { type: 'string', minLength: 1 },
        { type: 'array', items: { type: 'string' }, minItems: 1 },
      ],
    },
    env: {
      description: 'Environment variables of the command.',
      type: 'object',
      additionalProperties: { type: 'string' },
    },
  },
  required: ['command'],
};

export class ProcessEngine implements Engine {
  readonly name = 'process';
  readonly payloadSchema: JsonSchemaObject = PAYLOAD_SCHEMA;
  readonly needs: TransportCapabilities = { exec: true, files: true };
  readonly #killSignal: NodeJS.Signals;
  readonly #killGraceMs: number;
  readonly #baseEnv: Readonly<Record<string, string>>;

  constructor(options: ProcessEngineOptions = {}) {
    this.#killSignal = options.killSignal ?? 'SIGTERM';
    this.#killGraceMs = options.killGraceMs ?? 5000;
    this.#baseEnv = { ...(options.env ?? defaultBaseEnv()) };
  }

  async prepare(payload: Payload, options: EnginePrepareOptions): Promise<SandboxBuilder> {
    const { transport } = options;
    if (!transport.capabilities.exec || !transport.capabilities.files) {
      throw new ResourceUnavailableError('the process engine needs a transport that can exec and access files');
    }
    const problems: PayloadProblem[] = [];
    const argv = parseCommand(payload.command, problems);
    const payloadEnv = parseEnv(payload.env, problems);
    if (problems.length > 0 || argv === undefined) {
      throw new MalformedPayloadError(problems.length > 0 ? problems : [{ path: 'payload.command', message: 'is required' }]);
    }
    const env: Record<string, string> = { ...this.#baseEnv, ...payloadEnv };
    return new ProcessSandboxBuilder({
      argv,
      env,
      transport,
      taskDir: options.taskDir,
      cookie: options.cookie,
      logger: options.logger,
      killSignal: this.#killSignal,
      killGraceMs: this.#killGraceMs,
    });
  }
}

function defaultBaseEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of DEFAULT_BASE_ENV_NAMES) {
    const value = process.env[name];
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** What the schema cannot say: an empty argv[0], blank command lines, NUL bytes. */
function parseCommand(command: unknown, problems: PayloadProblem[]): string[] | undefined {
  if (typeof command === 'string') {
    if (command.trim().length === 0) problems.push({ path: 'payload.command', message: 'must not be blank' });
    else if (command.includes('\0')) problems.push({ path: 'payload.command', message: 'must not contain NUL characters' });
    return ['sh', '-c', command];
  }
  if (Array.isArray(command)) {
    if (command.length === 0) problems.push({ path: 'payload.command', message: 'must not be empty' });
    command.forEach((arg: unknown, i) => {
      if (typeof arg !== 'string') problems.push({ path: `payload.command[${i}]`, message: 'must be string' });
      else if (arg.includes('\0')) problems.push({ path: `payload.command[${i}]`, message: 'must not contain NUL characters' });
      else if (i === 0 && arg.length === 0) problems.push({ path: 'payload.command[0]', message: 'must not be empty (it is the program to run)' });
    });
    return command.map(String);
  }
  problems.push({ path: 'payload.command', message: command === undefined ? 'is required' : 'must be a string or an array of strings' });
  return undefined;
}

function parseEnv(env: unknown, problems: PayloadProblem[]): Record<string, string> {
  if (env === undefined) return {};
  if (typeof env !== 'object' || env === null || Array.isArray(env)) {
    problems.push({ path: 'payload.env', message: 'must be object' });
    return {};
  }
  const result: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    const path = /^[A-Za-z_][A-Za-z0-9_]*$/.test(name) ? `payload.env.${name}` : `payload.env[${JSON.stringify(name)}]`;
    const nameProblem = envNameProblem(name);
    if (nameProblem !== undefined) problems.push({ path, message: nameProblem });
    else if (typeof value !== 'string') problems.push({ path, message: 'must be string' });
    else if (value.includes('\0')) problems.push({ path, message: 'must not contain NUL characters' });
    else result[name] = value;
  }
  return result;
}

function envNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'an environment variable name must not be empty';
  if (name.includes('=') || name.includes('\0')) return 'an environment variable name must not contain "=" or NUL';
  return undefined;
}

interface SandboxSpec {
  readonly argv: readonly string[];
  readonly env: Record<string, string>;
  readonly transport: Transport;
  readonly taskDir: string;
  readonly cookie: string;
  readonly logger: Logger;
  readonly killSignal: NodeJS.Signals;
  readonly killGraceMs: number;
}

class ProcessSandboxBuilder implements SandboxBuilder {
  readonly #spec: SandboxSpec;
  readonly #extraEnv: Record<string, string> = {};
  #state: 'building' | 'started' | 'discarded' = 'building';

  constructor(spec: SandboxSpec) {
    this.#spec = spec;
  }

  setEnv(name: string, value: string): void {
    const problem = envNameProblem(name);
    if (problem !== undefined) throw new TypeError(`setEnv(${JSON.stringify(name)}): ${problem}`);
    if (value.includes('\0')) throw new TypeError(`setEnv(${JSON.stringify(name)}): the value must not contain NUL characters`);
    if (this.#state !== 'building') throw new Error(`setEnv(${JSON.stringify(name)}): the sandbox is already ${this.#state}`);
    this.#extraEnv[name] = value;
  }

  async start(): Promise<Sandbox> {
    if (this.#state !== 'building') throw new Error(`start(): the sandbox is already ${this.#state}`);
    this.#state = 'started';
    const spec = this.#spec;
    const env = { ...spec.env, ...this.#extraEnv };
    const startedAt = performance.now();
    const execution = await spec.transport.exec(spec.argv, { cwd: spec.taskDir, env, cookie: spec.cookie });
    return new ProcessSandbox(spec, execution, startedAt);
  }

  async discard(): Promise<void> {
    // prepare() holds nothing (the task directory is the runtime's), so
    // there is nothing to release; it only stops a later start().
    if (this.#state === 'building') this.#state = 'discarded';
  }
}

class ProcessSandbox implements Sandbox {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly #spec: SandboxSpec;
  readonly #execution: Execution;
  readonly #result: Promise<RunResult>;
  #abort: Promise<void> | undefined;
  #dispose: Promise<void> | undefined;

  constructor(spec: SandboxSpec, execution: Execution, startedAt: number) {
    this.#spec = spec;
    this.#execution = execution;
    this.stdout = execution.stdout;
    this.stderr = execution.stderr;
    this.#result = execution.exited.then(
      (status): RunResult => {
        const durationMs = performance.now() - startedAt;
        const result: RunResult = { exitCode: status.exitCode, signal: status.signal, durationMs };
        return status.startError === undefined ? result : { ...result, startError: status.startError.message };
      },
      // The transport promises never to reject; if one does anyway, it is still a result.
      (error: unknown): RunResult => ({
        exitCode: 127,
        signal: null,
        durationMs: performance.now() - startedAt,
        startError: errorMessage(error),
      }),
    );
  }

  wait(): Promise<RunResult> {
    return this.#result;
  }

  abort(): Promise<void> {
    this.#abort ??= this.#stop();
    return this.#abort;
  }

  async #stop(): Promise<void> {
    const { killSignal, killGraceMs, logger } = this.#spec;
    const execution = this.#execution;
    let gone = false;
    try {
      await execution.kill(killSignal);
      gone = await execution.waitGone(killGraceMs);
    } catch (error) {
      logger.warn('process engine: cannot signal the command', { signal: killSignal, error: errorMessage(error) });
    }
    if (!gone) gone = await this.#kill('abort');
    if (gone) {
      // The group is gone, so the main process is dead; let its exit be reported.
      await Promise.race([this.#result, sleep(EXIT_REPORT_WAIT_MS, undefined, { ref: false })]);
    }
  }

  /** SIGKILL to what is left of the group, and a bounded wait for it; true when nothing is left. */
  async #kill(why: string): Promise<boolean> {
    const { logger } = this.#spec;
    try {
      await this.#execution.kill('SIGKILL');
      if (await this.#execution.waitGone(KILL_WAIT_MS)) return true;
    } catch (error) {
      logger.error(`process engine: ${why}: cannot SIGKILL the command`, { error: errorMessage(error) });
      return false;
    }
    logger.error(`process engine: ${why}: processes of the command survived SIGKILL`, { waitedMs: KILL_WAIT_MS });
    return false;
  }

  async extractFile(relativePath: string): Promise<Readable> {
    const problem = relativePathProblem(relativePath);
    if (problem !== undefined) throw new MalformedPayloadError([{ path: `artifact ${JSON.stringify(relativePath)}`, message: problem }]);
    const { transport, taskDir } = this.#spec;
    return transport.readFile(transport.join(taskDir, posix.normalize(relativePath)));
  }

  dispose(): Promise<void> {
    // Whatever the command left running (background children of a main
    // process that exited, or an abort still in its grace period) goes now.
    this.#dispose ??= this.#kill('dispose').then(() => undefined);
    return this.#dispose;
  }
}

/**
 * Why a path is not one of a file inside the task directory, if it is not.
 * Lexical only: a symlink inside the task directory is followed (the
 * command runs as the worker's user, so it could read the target anyway).
 */
function relativePathProblem(relativePath: string): string | undefined {
  if (relativePath.length === 0) return 'must not be empty';
  if (relativePath.includes('\0')) return 'must not contain NUL characters';
  if (posix.isAbsolute(relativePath)) return 'must be relative to the task directory';
  const normalized = posix.normalize(relativePath);
  if (normalized === '..' || normalized.startsWith('../')) return 'is outside the task directory';
  if (normalized === '.' || normalized === './') return 'is the task directory itself, not a file';
  return undefined;
}
