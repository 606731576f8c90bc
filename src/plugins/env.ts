/**
 * env: the task's environment, later wins: the worker's base env (the
 * `taskEnv` and `secretTaskEnv` settings), then the payload's `env`, then
 * TASK_ID, RUN_ID and TASK_DIR, which only this plugin sets. (The engine
 * sets the payload's env too; this plugin puts the worker's base under it.)
 *
 * Values of `secretTaskEnv` never appear in logs: the plugin lists them as
 * its `secrets`, the runtime masks them as `[secret]` in the run's log (the
 * live log) and in the resolution message it reports, and the worker masks
 * them in its own log.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { StringDecoder } from 'node:string_decoder';
import type { Logger } from '../runtime/logger.js';
import type { Plugin, TaskPlugin, TaskPluginOptions } from './plugin.js';

export interface EnvPluginOptions {
  /** Variables every task gets, under the payload's env. */
  readonly base?: Readonly<Record<string, string>>;
  /** Like `base`, but their values are masked in every log. */
  readonly secret?: Readonly<Record<string, string>>;
}

export const SECRET_MASK = '[secret]';

export function envPlugin(pluginOptions: EnvPluginOptions = {}): Plugin {
  const base = { ...pluginOptions.base, ...pluginOptions.secret };
  return {
    name: 'env',
    secrets: Object.values(pluginOptions.secret ?? {}),
    newTask(options: TaskPluginOptions): TaskPlugin {
      return {
        async buildSandbox(builder, { taskDir }) {
          const payloadEnv = options.payload['env'];
          const env: Record<string, string> = {
            ...base,
            // The engine checked the payload's env (names and string values) before this hook.
            ...(typeof payloadEnv === 'object' && payloadEnv !== null ? (payloadEnv as Record<string, string>) : {}),
            TASK_ID: options.claim.taskId,
            RUN_ID: String(options.claim.runId),
            TASK_DIR: taskDir,
          };
          for (const [name, value] of Object.entries(env)) builder.setEnv(name, value);
        },
      };
    },
  };
}

/** Replaces every secret in text; longer secrets first, so one that contains another is masked whole. */
export class SecretMasker {
  readonly #secrets: readonly string[];
  readonly #longest: number;

  constructor(secrets: readonly string[]) {
    this.#secrets = [...new Set(secrets.filter((secret) => secret.length > 0))].sort((a, b) => b.length - a.length);
    this.#longest = this.#secrets[0]?.length ?? 0;
  }

  get empty(): boolean {
    return this.#secrets.length === 0;
  }

  mask(text: string): string {
    let masked = text;
    for (const secret of this.#secrets) masked = masked.split(secret).join(SECRET_MASK);
    return masked;
  }

  /**
   * A stream that masks what passes through. A chunk that ends with the
   * start of a secret keeps that end back until the next chunk, so that a
   * secret split across two chunks is still masked; other output passes at once.
   */
  transform(): Transform {
    let pending = '';
    // A character split across chunks is decoded whole, with the next chunk.
    const decoder = new StringDecoder('utf8');
    return new Transform({
      decodeStrings: true,
      transform: (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback) => {
        const text = pending + decoder.write(chunk);
        const cut = this.#safeCut(text, text.length - this.#heldBack(text));
        pending = text.slice(cut);
        callback(null, this.mask(text.slice(0, cut)));
      },
      flush: (callback: TransformCallback) => callback(null, this.mask(pending + decoder.end())),
    });
  }

  /** The cut moved back, if need be, so that no whole secret in text straddles it. */
  #safeCut(text: string, cut: number): number {
    for (let moved = true; moved;) {
      moved = false;
      for (const secret of this.#secrets) {
        const at = text.indexOf(secret, Math.max(0, cut - secret.length + 1));
        if (at >= 0 && at < cut && at + secret.length > cut) {
          cut = at;
          moved = true;
        }
      }
    }
    return cut;
  }

  /** How many characters at the end of text could begin a secret. */
  #heldBack(text: string): number {
    for (let length = Math.min(this.#longest - 1, text.length); length > 0; length--) {
      const tail = text.slice(text.length - length);
      if (this.#secrets.some((secret) => secret.startsWith(tail))) return length;
    }
    return 0;
  }
}

/** A logger that masks the secrets in its messages and in the string values of its fields (errors' messages too). */
export function maskedLogger(logger: Logger, masker: SecretMasker): Logger {
  if (masker.empty) return logger;
  const maskValue = (value: unknown, depth: number): unknown => {
    if (typeof value === 'string') return masker.mask(value);
    if (value instanceof Error) {
      const masked = new Error(masker.mask(value.message));
      masked.name = value.name;
      return masked;
    }
    if (depth > 5 || value === null || typeof value !== 'object') return value;
    if (Array.isArray(value)) return value.map((item) => maskValue(item, depth + 1));
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, maskValue(item, depth + 1)]));
  };
  const fields = (data: Record<string, unknown> | undefined) => (data === undefined ? undefined : (maskValue(data, 0) as Record<string, unknown>));
  return {
    debug: (msg, data) => logger.debug(masker.mask(msg), fields(data)),
    info: (msg, data) => logger.info(masker.mask(msg), fields(data)),
    warn: (msg, data) => logger.warn(masker.mask(msg), fields(data)),
    error: (msg, data) => logger.error(masker.mask(msg), fields(data)),
    child: (bindings) => maskedLogger(logger.child(fields(bindings) ?? {}), masker),
  };
}
