/**
 * The `script` engine, geto's model: a task names a script (its lines, or a
 * file on the worker's machine) and the files it depends on; the engine
 * uploads them into the task directory on the chosen host, the script as
 * `<taskDir>/<scriptName>` and each dependency under `<taskDir>/DEPS/`, so
 * the script refers to `DEPS/foo.bin`; then it runs the script there, under
 * a timeout.
 *
 * Payload:
 *   name           required: the script's name; `least-loaded` balances by it
 *   script         the script's text, a string or an array of lines
 *   scriptFile     or: a script file on the worker's machine
 *   deps           files or directories on the worker's machine, uploaded to DEPS/<basename>
 *   args           arguments of the script
 *   env            environment variables (as the process engine)
 *   timeout        seconds; then the script is stopped (signal, grace, SIGKILL) and the run fails
 *   maxConcurrent  at most this many runs of `name` at once on one host
 *   hostLabels     only hosts that carry all these labels
 *
 * The script's first line decides its interpreter, as the kernel would:
 * `#!/usr/bin/python3 -u` runs `/usr/bin/python3 -u <script> args...`; a
 * script without one runs with /bin/sh. The command is then run as the
 * process engine runs its commands (same environment, abort and cleanup).
 */
import { createReadStream } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { basename, join as joinLocal } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { MalformedPayloadError, ResourceUnavailableError, errorMessage, type PayloadProblem } from '../model/errors.js';
import type { Payload } from '../model/task.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { Transport, TransportCapabilities } from '../hosts/transport.js';
import type { Engine, EnginePrepareOptions, RunResult, Sandbox, SandboxBuilder } from './engine.js';
import { ProcessEngine, type ProcessEngineOptions } from './process.js';

export const DEPS_DIR = 'DEPS';

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    name: { description: 'The script\'s name: host selection balances by it, maxConcurrent counts it.', type: 'string', minLength: 1, pattern: '^[A-Za-z0-9._-]+$' },
    script: {
      description: 'The script: its text, or an array of its lines. Its shebang line decides the interpreter (/bin/sh without one).',
      anyOf: [
        { type: 'string', minLength: 1 },
        { type: 'array', items: { type: 'string' }, minItems: 1 },
      ],
    },
    scriptFile: { description: 'Or: a script file on the worker\'s machine.', type: 'string', minLength: 1 },
    deps: { description: 'Files or directories on the worker\'s machine, uploaded to DEPS/<name> beside the script.', type: 'array', items: { type: 'string', minLength: 1 } },
    args: { description: 'Arguments of the script.', type: 'array', items: { type: 'string' } },
    env: { description: 'Environment variables of the script.', type: 'object', additionalProperties: { type: 'string' } },
    timeout: { description: 'Seconds the script may run; then it is stopped and the run fails.', type: 'number', exclusiveMinimum: 0 },
    maxConcurrent: { description: 'At most this many runs of this script name at once on one host.', type: 'integer', minimum: 1 },
    hostLabels: { description: 'Only hosts that carry every one of these labels.', type: 'array', items: { type: 'string' } },
  },
  required: ['name'],
};

export type ScriptEngineOptions = ProcessEngineOptions;

/** A transport that can copy a local tree itself, keeping file modes (the SSH transport over SFTP). */
interface Uploader {
  upload(localPath: string, remotePath: string): Promise<void>;
}

function canUpload(transport: Transport): transport is Transport & Uploader {
  return typeof (transport as Partial<Uploader>).upload === 'function';
}

/** Interpreter argv from a script's first line: `#!/usr/bin/env python3` -> ['/usr/bin/env', 'python3']. */
export function interpreterOf(script: string): string[] {
  const first = script.slice(0, script.indexOf('\n') < 0 ? undefined : script.indexOf('\n')).replace(/\r$/, '');
  if (!first.startsWith('#!')) return ['/bin/sh'];
  const line = first.slice(2).trim();
  const space = line.search(/\s/);
  if (line === '') return ['/bin/sh'];
  // As Linux does: the interpreter, and the rest of the line as one argument.
  return space < 0 ? [line] : [line.slice(0, space), line.slice(space).trim()];
}

export class ScriptEngine implements Engine {
  readonly name = 'script';
  readonly payloadSchema: JsonSchemaObject = PAYLOAD_SCHEMA;
  readonly needs: TransportCapabilities = { exec: true, files: true };
  readonly #process: ProcessEngine;

  constructor(options: ScriptEngineOptions = {}) {
    this.#process = new ProcessEngine(options);
  }

  async prepare(payload: Payload, options: EnginePrepareOptions): Promise<SandboxBuilder> {
    const { transport, taskDir } = options;
    if (!transport.capabilities.exec || !transport.capabilities.files) {
      throw new ResourceUnavailableError('the script engine needs a transport that can exec and access files');
    }
    const problems: PayloadProblem[] = [];
    const { script: text, scriptFile, deps, args, env, timeout, name } = payload as {
      script?: string | string[];
      scriptFile?: string;
      deps?: string[];
      args?: string[];
      env?: Record<string, string>;
      timeout?: number;
      name?: string;
    };
    if ((text === undefined) === (scriptFile === undefined)) problems.push({ path: 'payload.script', message: 'give either script or scriptFile' });
    let script: string | undefined;
    if (Array.isArray(text)) script = text.join('\n') + '\n';
    else if (typeof text === 'string') script = text;
    else if (scriptFile !== undefined) {
      try {
        script = await readFile(scriptFile, 'utf8');
      } catch (error) {
        problems.push({ path: 'payload.scriptFile', message: `cannot be read on the worker: ${(error as NodeJS.ErrnoException).code ?? errorMessage(error)}` });
      }
    }
    const depNames = new Set<string>();
    for (const [i, dep] of (deps ?? []).entries()) {
      const depName = basename(dep);
      if (depNames.has(depName)) problems.push({ path: `payload.deps[${i}]`, message: `another dependency is also called ${depName}` });
      depNames.add(depName);
      try {
        const stats = await stat(dep);
        if (!stats.isFile() && !stats.isDirectory()) problems.push({ path: `payload.deps[${i}]`, message: 'is neither a file nor a directory' });
      } catch (error) {
        problems.push({ path: `payload.deps[${i}]`, message: `cannot be read on the worker: ${(error as NodeJS.ErrnoException).code ?? errorMessage(error)}` });
      }
    }
    if (problems.length > 0 || script === undefined) throw new MalformedPayloadError(problems);

    const scriptName = scriptFile !== undefined ? basename(scriptFile) : `${name ?? 'script'}`;
    const scriptPath = transport.join(taskDir, scriptName);
    await transport.writeFile(scriptPath, script);
    if ((deps ?? []).length > 0) {
      await transport.mkdir(transport.join(taskDir, DEPS_DIR));
      for (const dep of deps!) await uploadTree(transport, dep, transport.join(taskDir, DEPS_DIR, basename(dep)), options.cookie, taskDir);
    }
    const command = [...interpreterOf(script), `./${scriptName}`, ...(args ?? [])];
    const builder = await this.#process.prepare({ command, ...(env === undefined ? {} : { env }) }, options);
    builder.setEnv('SCRIPT_NAME', name ?? scriptName);
    return timeout === undefined ? builder : new TimedBuilder(builder, timeout * 1000);
  }
}

/** Copies a local file or tree to the transport, keeping the executable bit. */
async function uploadTree(transport: Transport, localPath: string, remotePath: string, cookie: string, cwd: string): Promise<void> {
  if (canUpload(transport)) {
    await transport.upload(localPath, remotePath);
    return;
  }
  const executables: string[] = [];
  const copy = async (from: string, to: string): Promise<void> => {
    const stats = await stat(from);
    if (stats.isDirectory()) {
      await transport.mkdir(to);
      for (const entry of await readdir(from)) await copy(joinLocal(from, entry), transport.join(to, entry));
      return;
    }
    await transport.writeFile(to, createReadStream(from));
    if (stats.mode & 0o111) executables.push(to);
  };
  await copy(localPath, remotePath);
  if (executables.length > 0) {
    const chmod = await transport.exec(['chmod', '+x', '--', ...executables], { cwd, env: { PATH: '/usr/bin:/bin' }, cookie });
    chmod.stdout.resume();
    chmod.stderr.resume();
    const status = await chmod.exited;
    if (status.exitCode !== 0) throw new Error(`cannot make dependencies executable: chmod exited with ${status.exitCode ?? status.signal}`);
  }
}

/** Stops the script after `timeoutMs`; says so on its stderr. */
class TimedBuilder implements SandboxBuilder {
  constructor(
    private readonly inner: SandboxBuilder,
    private readonly timeoutMs: number,
  ) {}
  setEnv(name: string, value: string): void {
    this.inner.setEnv(name, value);
  }
  async start(): Promise<Sandbox> {
    return new TimedSandbox(await this.inner.start(), this.timeoutMs);
  }
  discard(): Promise<void> {
    return this.inner.discard();
  }
}

export class TimedSandbox implements Sandbox {
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** True once the timeout stopped the script. */
  timedOut = false;
  readonly #inner: Sandbox;
  readonly #result: Promise<RunResult>;

  constructor(inner: Sandbox, timeoutMs: number) {
    this.#inner = inner;
    this.stdout = inner.stdout;
    const stderr = new PassThrough();
    this.stderr = stderr;
    inner.stderr.pipe(stderr, { end: false });
    const timer = setTimeout(() => {
      this.timedOut = true;
      void inner.abort();
    }, timeoutMs);
    this.#result = inner.wait().then((result) => {
      clearTimeout(timer);
      return result;
    });
    inner.stderr.once('end', () => {
      void this.#result.then(() => {
        if (this.timedOut) stderr.write(`[drover] the script timed out after ${timeoutMs / 1000} s and was stopped\n`);
        stderr.end();
      });
    });
  }

  wait(): Promise<RunResult> {
    return this.#result;
  }
  abort(): Promise<void> {
    return this.#inner.abort();
  }
  extractFile(relativePath: string): Promise<Readable> {
    return this.#inner.extractFile(relativePath);
  }
  dispose(): Promise<void> {
    return this.#inner.dispose();
  }
}
