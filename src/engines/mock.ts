/**
 * The `mock` engine: a sandbox scripted entirely by its payload (after
 * Nomad's mock driver), so that every path of a run can be reproduced
 * without running anything: how long the "command" runs, how it ends, what
 * it prints, which files it leaves, and which step fails.
 *
 * Payload:
 *   mock        the script (MockScript below); `{}` exits 0 at once
 *   env         environment variables, recorded (there is no process)
 *
 * Time runs on the clock the engine is given (`setTimeout`/`clearTimeout`,
 * and `now` if it has one: xstate's SimulatedClock fits), so a test moves it
 * instead of sleeping. `intercept` lets a test hold a run at a chosen
 * point, or make that point fail. `runs` records every run: the env it got
 * from plugins, how far it went, how it ended.
 *
 * It needs nothing of the host's transport: files live in memory.
 */
import { posix } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { MalformedPayloadError, ResourceUnavailableError, type PayloadProblem } from '../model/errors.js';
import type { Claim, Payload, RunResult } from '../model/task.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { TransportCapabilities } from '../hosts/transport.js';
import type { Engine, EnginePrepareOptions, Sandbox, SandboxBuilder } from './engine.js';

export interface MockScript {
  /** Milliseconds (on the engine's clock) the command runs before it ends; default 0. */
  readonly runFor?: number;
  /** Its exit code when it ends on its own; default 0. */
  readonly exitCode?: number;
  /** It ends killed by this signal instead of exiting. */
  readonly exitSignal?: NodeJS.Signals;
  /** What it writes to stdout and stderr as it starts. */
  readonly stdout?: string;
  readonly stderr?: string;
  /** Files it leaves in the task directory (relative path → content), for artifacts. */
  readonly files?: Readonly<Record<string, string>>;
  /** It runs until aborted; `runFor` is then ignored. */
  readonly hang?: boolean;
  /** `prepare` rejects: MalformedPayloadError, ResourceUnavailableError, or a plain Error. */
  readonly prepareError?: { readonly kind: 'malformed-payload' | 'resource-unavailable' | 'internal'; readonly message: string };
  /** The command cannot start (no such program): `wait()` gives exit code 127 with this message. */
  readonly startError?: string;
  /** `start()` itself rejects with this message: the engine broke, not the command. */
  readonly startFailure?: string;
  /** `abort()` rejects with this message and the command keeps running (a kill that fails). */
  readonly abortError?: string;
  /** `dispose()` rejects with this message. */
  readonly disposeError?: string;
}

/** Where `intercept` is called, before the step takes effect. */
export type MockPoint = 'prepare' | 'start' | 'exit' | 'abort' | 'dispose';

export interface MockClock {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
  now?(): number;
}

export interface MockEngineOptions {
  readonly clock?: MockClock;
  /**
   * Called at each point of a run, before it takes effect: a promise holds
   * the run there until it settles; a rejection makes that step fail with
   * its error (`exit` can only be held: a command's end cannot fail).
   * `signal` is the prepare options' signal (aborted when the load is abandoned).
   */
  readonly intercept?: (point: MockPoint, run: { readonly claim: Claim; readonly signal?: AbortSignal }) => void | Promise<void>;
}

/** One run of the mock engine, as far as it went. */
export interface MockRun {
  readonly claim: Claim;
  readonly script: MockScript;
  /** The payload's env, then what plugins set. */
  readonly env: Record<string, string>;
  state: 'prepared' | 'discarded' | 'started' | 'ended' | 'disposed';
  result?: RunResult;
  aborted: boolean;
}

const SCRIPT_SCHEMA = {
  description: 'What the mock command does (see src/engines/mock.ts).',
  type: 'object',
  additionalProperties: false,
  properties: {
    runFor: { type: 'number', minimum: 0 },
    exitCode: { type: 'integer', minimum: 0, maximum: 255 },
    exitSignal: { type: 'string', pattern: '^SIG[A-Z0-9]+$' },
    stdout: { type: 'string' },
    stderr: { type: 'string' },
    files: { type: 'object', additionalProperties: { type: 'string' } },
    hang: { type: 'boolean' },
    prepareError: {
      type: 'object', additionalProperties: false, required: ['kind', 'message'],
      properties: { kind: { enum: ['malformed-payload', 'resource-unavailable', 'internal'] }, message: { type: 'string' } },
    },
    startError: { type: 'string' },
    startFailure: { type: 'string' },
    abortError: { type: 'string' },
    disposeError: { type: 'string' },
  },
};

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    mock: SCRIPT_SCHEMA,
    env: { description: 'Environment variables of the command.', type: 'object', additionalProperties: { type: 'string' } },
  },
};

const globalClock: MockClock = {
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (id) => clearTimeout(id as NodeJS.Timeout),
};

export class MockEngine implements Engine {
  readonly name = 'mock';
  readonly payloadSchema: JsonSchemaObject = PAYLOAD_SCHEMA;
  readonly needs: TransportCapabilities = { exec: false, files: false };
  /** Every run, in the order they were prepared. */
  readonly runs: MockRun[] = [];
  readonly #clock: MockClock;
  readonly #intercept: NonNullable<MockEngineOptions['intercept']>;

  constructor(options: MockEngineOptions = {}) {
    this.#clock = options.clock ?? globalClock;
    this.#intercept = options.intercept ?? (() => {});
  }

  async prepare(payload: Payload, options: EnginePrepareOptions): Promise<SandboxBuilder> {
    await this.#intercept('prepare', { claim: options.claim, signal: options.signal });
    const script = parseScript(payload['mock']);
    const { prepareError } = script;
    if (prepareError?.kind === 'malformed-payload') throw new MalformedPayloadError([{ path: 'payload.mock', message: prepareError.message }]);
    if (prepareError?.kind === 'resource-unavailable') throw new ResourceUnavailableError(prepareError.message);
    if (prepareError !== undefined) throw new Error(prepareError.message);
    const env = { ...((payload['env'] as Record<string, string> | undefined) ?? {}) };
    const run: MockRun = { claim: options.claim, script, env, state: 'prepared', aborted: false };
    this.runs.push(run);
    return new MockSandboxBuilder(run, this.#clock, this.#intercept);
  }
}

/** The script, checked again here: prepare() may be called without the runtime's schema check. */
function parseScript(value: unknown): MockScript {
  if (value === undefined) return {};
  const problems: PayloadProblem[] = [];
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new MalformedPayloadError([{ path: 'payload.mock', message: 'must be object' }]);
  }
  const known = Object.keys(SCRIPT_SCHEMA.properties);
  for (const [key, field] of Object.entries(value)) {
    if (!known.includes(key)) problems.push({ path: `payload.mock.${key}`, message: 'is not a known property' });
    else if (['runFor', 'exitCode'].includes(key) && (typeof field !== 'number' || field < 0)) problems.push({ path: `payload.mock.${key}`, message: 'must be a number >= 0' });
  }
  if (problems.length > 0) throw new MalformedPayloadError(problems);
  return value as MockScript;
}

class MockSandboxBuilder implements SandboxBuilder {
  constructor(
    private readonly run: MockRun,
    private readonly clock: MockClock,
    private readonly intercept: NonNullable<MockEngineOptions['intercept']>,
  ) {}

  setEnv(name: string, value: string): void {
    if (this.run.state !== 'prepared') throw new Error(`setEnv(${JSON.stringify(name)}): the sandbox is already ${this.run.state}`);
    this.run.env[name] = value;
  }

  async start(): Promise<Sandbox> {
    if (this.run.state !== 'prepared') throw new Error(`start(): the sandbox is already ${this.run.state}`);
    await this.intercept('start', { claim: this.run.claim });
    if (this.run.script.startFailure !== undefined) throw new Error(this.run.script.startFailure);
    this.run.state = 'started';
    return new MockSandbox(this.run, this.clock, this.intercept);
  }

  async discard(): Promise<void> {
    if (this.run.state === 'prepared') this.run.state = 'discarded';
  }
}

class MockSandbox implements Sandbox {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  readonly #run: MockRun;
  readonly #clock: MockClock;
  readonly #intercept: NonNullable<MockEngineOptions['intercept']>;
  readonly #startedAt: number;
  readonly #result: Promise<RunResult>;
  #end!: (result: Omit<RunResult, 'durationMs'>) => void;
  #timer: unknown;
  #abort: Promise<void> | undefined;
  #dispose: Promise<void> | undefined;

  constructor(run: MockRun, clock: MockClock, intercept: NonNullable<MockEngineOptions['intercept']>) {
    this.#run = run;
    this.#clock = clock;
    this.#intercept = intercept;
    this.#startedAt = this.#now();
    this.#result = new Promise<RunResult>((resolve) => {
      this.#end = (ended) => {
        if (run.state !== 'started') return;
        this.#clock.clearTimeout(this.#timer);
        const result: RunResult = { ...ended, durationMs: this.#now() - this.#startedAt };
        run.state = 'ended';
        run.result = result;
        this.stdout.end();
        this.stderr.end();
        resolve(result);
      };
    });
    const { script } = run;
    if (script.startError !== undefined) {
      this.#end({ exitCode: 127, signal: null, startError: script.startError });
      return;
    }
    if (script.stdout !== undefined) this.stdout.write(script.stdout);
    if (script.stderr !== undefined) this.stderr.write(script.stderr);
    if (!script.hang) this.#timer = clock.setTimeout(() => void this.#exit(), script.runFor ?? 0);
  }

  /** The command ends on its own, once `exit` lets it. */
  async #exit(): Promise<void> {
    await Promise.resolve(this.#intercept('exit', { claim: this.#run.claim })).catch(() => {});
    const { exitSignal, exitCode } = this.#run.script;
    this.#end(exitSignal !== undefined ? { exitCode: null, signal: exitSignal } : { exitCode: exitCode ?? 0, signal: null });
  }

  #now(): number {
    return this.#clock.now?.() ?? performance.now();
  }

  wait(): Promise<RunResult> {
    return this.#result;
  }

  abort(): Promise<void> {
    this.#abort ??= (async () => {
      await this.#intercept('abort', { claim: this.#run.claim });
      if (this.#run.script.abortError !== undefined) throw new Error(this.#run.script.abortError);
      if (this.#run.state === 'started') this.#run.aborted = true;
      this.#end({ exitCode: null, signal: 'SIGKILL' });
    })();
    return this.#abort;
  }

  async extractFile(relativePath: string): Promise<Readable> {
    const normalized = posix.normalize(relativePath);
    if (relativePath === '' || posix.isAbsolute(relativePath) || normalized === '..' || normalized.startsWith('../')) {
      throw new MalformedPayloadError([{ path: `artifact ${JSON.stringify(relativePath)}`, message: 'is outside the task directory' }]);
    }
    const content = this.#run.script.files?.[normalized];
    if (content === undefined) throw Object.assign(new Error(`ENOENT: no such file in the task directory: ${relativePath}`), { code: 'ENOENT' });
    return Readable.from([Buffer.from(content)]);
  }

  dispose(): Promise<void> {
    this.#dispose ??= (async () => {
      await this.#intercept('dispose', { claim: this.#run.claim });
      // Whatever still runs goes now, as the process engine's SIGKILL would.
      this.#end({ exitCode: null, signal: 'SIGKILL' });
      this.#run.state = 'disposed';
      if (this.#run.script.disposeError !== undefined) throw new Error(this.#run.script.disposeError);
    })();
    return this.#dispose;
  }
}
