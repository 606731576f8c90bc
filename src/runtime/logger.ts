/**
 * One structured logger. Each line is `time level msg key=value...` for
 * people, or a JSON object with `--log-format json`; child loggers bind
 * worker, task and run ids so every line says whose it is.
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, data?: Record<string, unknown>): void;
  info(msg: string, data?: Record<string, unknown>): void;
  warn(msg: string, data?: Record<string, unknown>): void;
  error(msg: string, data?: Record<string, unknown>): void;
  child(bindings: Record<string, unknown>): Logger;
  /** Whether a line at `level` would be written; a logger without it is taken to write every level. */
  enabled?(level: LogLevel): boolean;
}

export interface LoggerOptions {
  readonly level?: LogLevel;
  readonly format?: 'text' | 'json';
  readonly write?: (line: string) => void;
}

export function createLogger(options: LoggerOptions = {}, bindings: Record<string, unknown> = {}): Logger {
  const min = LEVELS[options.level ?? 'info'];
  const write = options.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const json = options.format === 'json';
  const log = (level: LogLevel, msg: string, data?: Record<string, unknown>): void => {
    if (LEVELS[level] < min) return;
    const fields = { ...bindings, ...data };
    const time = new Date().toISOString();
    if (json) {
      write(JSON.stringify({ time, level, msg, ...fields }, jsonReplacer));
      return;
    }
    const rest = Object.entries(fields)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${formatValue(v)}`)
      .join(' ');
    write(`${time} ${level.padEnd(5)} ${msg}${rest ? ' ' + rest : ''}`);
  };
  return {
    debug: (m, d) => log('debug', m, d),
    info: (m, d) => log('info', m, d),
    warn: (m, d) => log('warn', m, d),
    error: (m, d) => log('error', m, d),
    child: (more) => createLogger(options, { ...bindings, ...more }),
    enabled: (level) => LEVELS[level] >= min,
  };
}

/** A logger that drops everything: for tests and library use. */
export const silentLogger: Logger = createLogger({ write: () => {} });

function jsonReplacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? { name: value.name, message: value.message } : value;
}

function formatValue(value: unknown): string {
  if (value instanceof Error) return JSON.stringify(value.message);
  if (typeof value === 'string') return /^[\w./:@-]+$/.test(value) ? value : JSON.stringify(value);
  return JSON.stringify(value) ?? String(value);
}
