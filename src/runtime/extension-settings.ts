/**
 * The extensions a config file names (`engine.module`, `engine.config`,
 * `plugins`), read as settings: what extensions.ts loads when a worker
 * starts. Apart from the loading, so that reading a config, which every
 * command does, loads no JSON Schema compiler (ajv: 30-45 ms of a command's
 * start).
 */
import { dirname, resolve } from 'node:path';

/** One engine or plugin module named in the config file. */
export interface ExtensionSetting {
  /** Where the config file names it, for messages: `engine.module`, `plugins[2]`. */
  readonly where: string;
  /** A package name, or a path relative to `baseDir`. */
  readonly module: string;
  /** The extension's own config, checked against its configSchema; undefined when not given. */
  readonly config?: unknown;
  /** The config file's directory. */
  readonly baseDir: string;
}

export interface ExtensionSettings {
  readonly engine?: ExtensionSetting;
  readonly plugins: readonly ExtensionSetting[];
}

/** Config file keys that name extensions; they are not in SETTINGS (no flag, no environment variable). */
export const EXTENSION_KEYS: readonly string[] = ['engine.module', 'engine.config', 'plugins'];

/**
 * The extensions a config file names, from its `engine.module`,
 * `engine.config` and `plugins` keys; problems are pushed to `problems`,
 * each naming the file and key.
 */
export function extensionSettings(file: string, raw: Readonly<Record<string, unknown>>, problems: string[]): ExtensionSettings {
  const baseDir = dirname(resolve(file));
  const where = (key: string) => `config file "${file}": ${key}`;
  const setting = (key: string, module: unknown, config: unknown): ExtensionSetting | undefined => {
    if (typeof module !== 'string' || module.trim() === '') {
      problems.push(`${where(`${key}.module`)}: must name a module (a package name, or a path relative to the config file), not ${JSON.stringify(module)}`);
      return undefined;
    }
    return { where: key, module: module.trim(), baseDir, ...(config === undefined || config === null ? {} : { config }) };
  };
  let engine: ExtensionSetting | undefined;
  if (raw['engine.module'] !== undefined || raw['engine.config'] !== undefined) {
    if (raw['engine.module'] === undefined) problems.push(`${where('engine.config')}: is the config of an engine module, but engine.module is not set`);
    else engine = setting('engine', raw['engine.module'], raw['engine.config']);
  }
  const plugins: ExtensionSetting[] = [];
  const list = raw['plugins'];
  if (list !== undefined && list !== null && !Array.isArray(list)) problems.push(`${where('plugins')}: must be a list of { module, config }`);
  for (const [i, item] of (Array.isArray(list) ? list : []).entries()) {
    const key = `plugins[${i}]`;
    const entry = typeof item === 'string' ? { module: item } : item;
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) {
      problems.push(`${where(key)}: must be { module, config } or a module name`);
      continue;
    }
    const { module, config, ...rest } = entry as Record<string, unknown>;
    for (const extra of Object.keys(rest)) problems.push(`${where(`${key}.${extra}`)}: is not a known property (module, config)`);
    const loaded = setting(key, module, config);
    if (loaded !== undefined) plugins.push(loaded);
  }
  return { ...(engine === undefined ? {} : { engine }), plugins };
}
