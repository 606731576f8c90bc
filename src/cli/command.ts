/** The shape of a `drover` subcommand; main.ts lists them, parses flags and maps errors to exit codes. */
import type { ParseArgsConfig } from 'node:util';
import { DroverError } from '../model/errors.js';
import { MAX_RUN_TIME_SECONDS } from '../plugins/maxruntime.js';

export type Options = ParseArgsConfig['options'] & {};
export type Values = Record<string, string | boolean | undefined>;

export interface Command {
  /** One or more `drover NAME ...` lines. */
  readonly usage: string;
  /** One line, lower case, no full stop: shown in `drover --help`. */
  readonly summary: string;
  /** What `--help` says after the usage: the command's own options, and anything worth knowing. */
  readonly details?: string;
  /** Flags beyond the common --config, --queue-dir and --help; parsed strictly. */
  readonly options: Options;
  /**
   * false: the command has no use for the task queue (a batch has queues of its own): the common
   * queue flags (--queue-dir, --queue...) are refused with a sentence that says so, and --help does
   * not list them.
   */
  readonly usesQueue?: false;
  /** Returns the exit code; throws UsageError or ConfigError for exit code 2. */
  run(values: Values, positionals: string[]): Promise<number>;
}

/** Bad usage of a command: the CLI prints it with a pointer to --help and exits 2. */
export class UsageError extends DroverError {
  constructor(message: string) {
    super('DROVER_USAGE', message);
  }
}

/**
 * The bound of a maxRunTime given on the command line (`submit --max-run-time`, `batch --timeout`):
 * the maxruntime plugin's, so that a longer one is refused at once rather than failing each task
 * as a malformed payload when a worker loads it.
 */
export const MAX_RUN_TIME_BOUND = { max: MAX_RUN_TIME_SECONDS, unit: ' seconds (about 24.8 days, the longest maxRunTime a worker can keep)' } as const;

/**
 * A whole-number option (`fallback` when not given), at least `min` and at most `max`; an error names the
 * option and, unless it was a flag, where its value came `from`. An empty value is no number.
 */
export function whole<T extends number | undefined>(raw: string | undefined, name: string, fallback: T, min: number, limits: { readonly from?: string | undefined; readonly max?: number; readonly unit?: string } = {}): number | T {
  if (raw === undefined) return fallback;
  const value = Number(raw);
  const from = limits.from === undefined ? '' : ` (from ${limits.from})`;
  if (!Number.isInteger(value) || value < min) throw new UsageError(`--${name} must be a whole number of at least ${min}, not "${raw}"${from}`);
  if (limits.max !== undefined && value > limits.max) throw new UsageError(`--${name} must be at most ${limits.max}${limits.unit ?? ''}, not "${raw}"${from}`);
  return value;
}
