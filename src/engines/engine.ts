/**
 * Engine: turns a payload into a running sandbox on a host, and reports its result.
 *
 * Lifecycle of one task, driven by the task machine (states in brackets):
 *  1. [loading] `prepare(payload, options)` once the payload has passed the
 *     joined schema. It may reject with MalformedPayloadError (the payload is
 *     valid JSON but cannot run, e.g. an empty command) or
 *     ResourceUnavailableError. It returns a SandboxBuilder; plugins then
 *     add env vars to it.
 *  2. [running] `builder.start()` starts the sandbox; the runtime reads its
 *     stdout and stderr into the task log and awaits `wait()`.
 *  3. [running] on cancel, maxRunTime, claim loss or shutdown: `abort()`,
 *     which resolves only when nothing of the sandbox runs any more.
 *  4. [uploading] plugins may `extractFile()` for artifacts.
 *  5. [cleanup] `dispose()` on the sandbox (or `discard()` on a builder
 *     that never started), always, exactly once, even after abort; it
 *     kills whatever the task left running.
 *
 * An engine declares what it needs of the host's transport (`needs`); the
 * runtime refuses to pair it with a transport that lacks it.
 */
import type { Readable } from 'node:stream';
import type { Logger } from '../runtime/logger.js';
import type { Transport, TransportCapabilities } from '../hosts/transport.js';
import type { Claim, Payload, RunResult } from '../model/task.js';
import type { JsonSchemaObject } from '../runtime/schema.js';

export interface EnginePrepareOptions {
  readonly claim: Claim;
  readonly transport: Transport;
  /** The task directory on the host, created empty for this run. */
  readonly taskDir: string;
  /** Marks every process of this run; see ExecOptions.cookie. */
  readonly cookie: string;
  readonly logger: Logger;
  readonly signal: AbortSignal;
}

export type { RunResult } from '../model/task.js';

export interface SandboxBuilder {
  /** Sets an environment variable of the command; later calls win. */
  setEnv(name: string, value: string): void;
  start(): Promise<Sandbox>;
  /** Releases what prepare() set up when start() is never called. Idempotent. */
  discard(): Promise<void>;
}

export interface Sandbox {
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Resolves once with the result; never rejects. */
  wait(): Promise<RunResult>;
  /** Stops every process of the sandbox (signal sequence) and resolves when they are gone. Idempotent. */
  abort(): Promise<void>;
  /** A file of the task directory, by a path relative to it; rejects for paths outside it. */
  extractFile(relativePath: string): Promise<Readable>;
  /** Kills leftovers and releases the sandbox. Idempotent. */
  dispose(): Promise<void>;
}

export interface Engine {
  readonly name: string;
  /** JSON Schema of the payload properties this engine reads; joined with the plugins'. */
  readonly payloadSchema: JsonSchemaObject;
  readonly needs: TransportCapabilities;
  prepare(payload: Payload, options: EnginePrepareOptions): Promise<SandboxBuilder>;
}
