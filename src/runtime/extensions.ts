/**
 * Extensions: engines and plugins that live in npm modules of their own,
 * named in the config file and loaded when the worker starts.
 *
 *   engine: { module: drover-engine-docker, config: { image: alpine } }
 *   plugins:
 *     - module: ./plugins/summary.js
 *       config: { name: public/summary.json }
 *
 * `module` is a package name or a path (`./`, `../` or `/`) relative to the
 * config file's directory. A package is resolved from that directory as
 * Node's `require.resolve` would, then from drover's own installation; a
 * path may name a file or a package directory.
 *
 * The module's default export is the extension (CommonJS: `module.exports`):
 *
 *   export default {
 *     configSchema: { type: 'object', properties: {...} },   // optional
 *     createPlugin(config, context) { return { name, ...hooks } },   // or createEngine
 *   };
 *
 * `config` is checked against `configSchema` (JSON Schema, every problem
 * at once); a module without a configSchema takes no config. `create*` may
 * be async; what it returns is checked against the Engine or Plugin
 * contract. Every problem of every extension is reported at once, as a
 * ConfigError (the CLI exits 2) naming the setting and the module. A loaded
 * engine replaces `engine.type`; loaded plugins run after the shipped ones,
 * in the order the config file lists them, and before livelog, which closes
 * the run's log last.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Engine } from '../engines/engine.js';
import { ConfigError, MalformedPayloadError, errorMessage } from '../model/errors.js';
import type { Plugin } from '../plugins/plugin.js';
import type { ExtensionSetting, ExtensionSettings } from './extension-settings.js';
import { compilePayloadValidator, joinedPayloadSchema, joinPayloadSchemas, jsonSchemaProblems, type JsonSchemaObject } from './schema.js';

/** What `createEngine` and `createPlugin` get besides their config. */
export interface ExtensionContext {
  /** The config file's directory: resolve relative paths of the extension's config against it. */
  readonly configDir: string;
  /** Tasks run on other machines, over SSH: paths and processes of this machine mean nothing there. */
  readonly remote: boolean;
  /** The worker's `engine.killSignal` and `engine.killGrace`, so that an engine aborts as the shipped ones do. */
  readonly killSignal: NodeJS.Signals;
  readonly killGraceMs: number;
}

/** The default export of an engine module. */
export interface EngineExtension<C = any> {
  /** JSON Schema of `config`; without one, the engine takes no config. */
  readonly configSchema?: object;
  createEngine(config: C, context: ExtensionContext): Engine | Promise<Engine>;
}

/** The default export of a plugin module. */
export interface PluginExtension<C = any> {
  /** JSON Schema of `config`; without one, the plugin takes no config. */
  readonly configSchema?: object;
  createPlugin(config: C, context: ExtensionContext): Plugin | Promise<Plugin>;
}

/**
 * The shipped parts with the configured extensions added: a loaded engine
 * replaces the shipped one, loaded plugins follow the shipped ones. Throws
 * one ConfigError with every problem: modules that cannot be loaded, bad
 * configs, plugin names or payload properties that two parts claim.
 */
export async function withExtensions(
  shipped: { readonly engine: Engine; readonly plugins: readonly Plugin[] },
  settings: ExtensionSettings,
  context: Context,
): Promise<{ engine: Engine; plugins: Plugin[] }> {
  const problems: string[] = [];
  const engine = settings.engine && (await loadOne(settings.engine, 'engine', context, problems));
  const loaded: Plugin[] = [];
  const owners = new Map(shipped.plugins.map((plugin) => [plugin.name, 'a shipped plugin']));
  for (const setting of settings.plugins) {
    const plugin = await loadOne(setting, 'plugin', context, problems);
    if (plugin === undefined) continue;
    const owner = owners.get(plugin.name);
    if (owner !== undefined) {
      problems.push(`${describe(setting)}: its plugin is called "${plugin.name}", as ${owner} is; plugin names must differ`);
      continue;
    }
    owners.set(plugin.name, describe(setting));
    loaded.push(plugin);
  }
  // Loaded plugins run after the shipped ones but before livelog, which ends
  // the run's log in its finished/exception hooks: their lines are kept.
  const livelog = shipped.plugins.findIndex((plugin) => plugin.name === 'livelog');
  const plugins = livelog < 0 ? [...shipped.plugins, ...loaded] : [...shipped.plugins.slice(0, livelog), ...loaded, ...shipped.plugins.slice(livelog)];
  const parts = { engine: engine ?? shipped.engine, plugins };
  if (problems.length === 0) {
    try {
      joinedPayloadSchema(parts);
    } catch (error) {
      problems.push(`the loaded extensions do not fit together: ${errorMessage(error)}`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
  return parts;
}

function describe(setting: ExtensionSetting): string {
  return `${setting.where} (module "${setting.module}")`;
}

type Kind = 'engine' | 'plugin';
type Context = Omit<ExtensionContext, 'configDir'>;

/** Loads, checks and creates one extension; undefined after pushing what is wrong. */
async function loadOne(setting: ExtensionSetting, kind: 'engine', context: Context, problems: string[]): Promise<Engine | undefined>;
async function loadOne(setting: ExtensionSetting, kind: 'plugin', context: Context, problems: string[]): Promise<Plugin | undefined>;
async function loadOne(setting: ExtensionSetting, kind: Kind, context: Context, problems: string[]): Promise<Engine | Plugin | undefined> {
  const fail = (problem: string) => {
    problems.push(`${describe(setting)}: ${problem}`);
    return undefined;
  };
  let namespace: object;
  try {
    namespace = (await import(locate(setting))) as object;
  } catch (error) {
    // Not found is the package itself missing; a missing dependency of the module names that dependency.
    // (The message, not the code: an import hook, such as a TypeScript loader, may drop the code.)
    const missing = errorMessage(error).startsWith(`Cannot find package '${setting.module}'`);
    if (!missing) return fail(`failed to load: ${firstLine(error)}`);
    const file = existsSync(resolve(setting.baseDir, setting.module)) ? `; to load the file of that name, write ./${setting.module}` : '';
    return fail(`cannot be found (looked from ${setting.baseDir}, and from drover's own installation)${file}`);
  }
  const created = await instantiate(namespace, kind, setting.config, { ...context, configDir: setting.baseDir });
  return 'problem' in created ? fail(created.problem) : created.value;
}

/**
 * An extension from its module's namespace (what `import()` gave), as the
 * worker makes it: the default export's shape, the config against its
 * configSchema, then `create*` and the contract of what it returned.
 */
export async function instantiate(namespace: object, kind: Kind, config: unknown, context: ExtensionContext): Promise<{ value: Engine | Plugin } | { problem: string }> {
  const factory = kind === 'engine' ? 'createEngine' : 'createPlugin';
  const other = kind === 'engine' ? 'createPlugin' : 'createEngine';
  let definition = (namespace as Record<string, unknown>)['default'] as Record<string, unknown> | undefined;
  // A CommonJS module compiled from `export default` (TypeScript, Babel) keeps it under `.default`.
  if (definition?.['__esModule'] === true && typeof definition['default'] === 'object') definition = definition['default'] as Record<string, unknown>;
  const shape = `export default { ${factory}(config, context), configSchema }`;
  if (definition === null || typeof definition !== 'object') {
    return { problem: `has ${definition === undefined ? 'no default export' : `a default export of type ${typeof definition}`}; an ${kind} module must ${shape}` };
  }
  if (typeof definition[factory] !== 'function') {
    return {
      problem: typeof definition[other] === 'function'
        ? `is ${kind === 'engine' ? 'a plugin' : 'an engine'} module (it has ${other}), named where ${kind === 'engine' ? 'an engine' : 'a plugin'} belongs`
        : `its default export has no ${factory} function; an ${kind} module must ${shape}`,
    };
  }
  let checked: unknown;
  try {
    checked = checkedConfig(definition['configSchema'], config);
  } catch (error) {
    return { problem: errorMessage(error) };
  }
  let created: unknown;
  try {
    created = await (definition[factory] as (config: unknown, context: ExtensionContext) => unknown)(checked, context);
  } catch (error) {
    return { problem: `${factory} failed: ${errorMessage(error)}` };
  }
  const problems = kind === 'engine' ? engineProblems(created) : pluginProblems(created);
  if (problems.length > 0) return { problem: `${factory} returned no valid ${kind}: ${problems.join('; ')}` };
  return { value: created as Engine | Plugin };
}

/** What to import: the module's file URL, or for a package not found from the config file's directory, its name. */
function locate(setting: ExtensionSetting): string {
  const { module, baseDir } = setting;
  if (module.startsWith('./') || module.startsWith('../') || isAbsolute(module)) {
    const path = resolve(baseDir, module);
    if (!existsSync(path)) throw new Error(`no such file or directory: ${path}`);
    return pathToFileURL(statSync(path).isDirectory() ? packageEntry(path) : path).href;
  }
  try {
    return pathToFileURL(createRequire(join(baseDir, 'drover.config.js')).resolve(module)).href;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'MODULE_NOT_FOUND' && code !== 'ERR_PACKAGE_PATH_NOT_EXPORTED') throw error;
  }
  // A package installed beside drover (both global, say), or an ESM-only one: Node's own resolution from here.
  return module;
}

/** The file a package directory's package.json names as its entry point, as `import` would pick it. */
function packageEntry(dir: string): string {
  const manifest = join(dir, 'package.json');
  if (!existsSync(manifest)) throw new Error(`${dir} is a directory without a package.json; name its module file`);
  const pkg = JSON.parse(readFileSync(manifest, 'utf8')) as { exports?: unknown; main?: unknown };
  const pick = (target: unknown): string | undefined => {
    if (typeof target === 'string') return target;
    if (target === null || typeof target !== 'object' || Array.isArray(target)) return undefined;
    const conditions = target as Record<string, unknown>;
    if ('.' in conditions) return pick(conditions['.']);
    for (const condition of ['import', 'node', 'default']) {
      const found = pick(conditions[condition]);
      if (found !== undefined) return found;
    }
    return undefined;
  };
  const entry = pick(pkg.exports) ?? (typeof pkg.main === 'string' ? pkg.main : 'index.js');
  return resolve(dir, entry);
}

/** The extension's config after its schema's check; throws naming every problem. */
function checkedConfig(schema: unknown, config: unknown): unknown {
  if (schema === undefined) {
    if (config !== undefined) throw new Error('takes no config (the module exports no configSchema), but config is given');
    return undefined;
  }
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) throw new Error('its configSchema must be a JSON Schema object');
  const problems = jsonSchemaProblems(schema, 'configSchema');
  if (problems.length > 0) throw new Error(`its configSchema is not a valid JSON Schema: ${problems.join('; ')}`);
  let validate: (value: unknown) => void;
  try {
    validate = compilePayloadValidator(schema as JsonSchemaObject, { checked: true });
  } catch (error) {
    throw new Error(`its configSchema is not a valid JSON Schema: ${firstLine(error)}`);
  }
  const value = config === undefined ? {} : structuredClone(config);
  try {
    validate(value);
  } catch (error) {
    if (!(error instanceof MalformedPayloadError)) throw error;
    const problems = error.problems.map((problem) => `${problem.path.replace(/^payload/, 'config')}: ${problem.message}`);
    throw new Error(`bad config: ${problems.join('; ')}`);
  }
  return value;
}

function engineProblems(value: unknown): string[] {
  if (value === null || typeof value !== 'object') return [`got ${value === null ? 'null' : typeof value}, not an object`];
  const engine = value as Partial<Record<keyof Engine, unknown>>;
  const problems = [...nameProblems(engine.name), ...schemaProblems(engine.payloadSchema, true)];
  const needs = engine.needs as Record<string, unknown> | undefined;
  if (needs === null || typeof needs !== 'object' || typeof needs['exec'] !== 'boolean' || typeof needs['files'] !== 'boolean') {
    problems.push('needs must be { exec: boolean, files: boolean }');
  }
  if (typeof engine.prepare !== 'function') problems.push('prepare must be a function');
  return problems;
}

function pluginProblems(value: unknown): string[] {
  if (value === null || typeof value !== 'object') return [`got ${value === null ? 'null' : typeof value}, not an object`];
  const plugin = value as Partial<Record<keyof Plugin, unknown>>;
  const problems = [...nameProblems(plugin.name), ...schemaProblems(plugin.payloadSchema, false)];
  if (plugin.secrets !== undefined && !(Array.isArray(plugin.secrets) && plugin.secrets.every((secret) => typeof secret === 'string'))) {
    problems.push('secrets must be a list of strings');
  }
  for (const hook of ['boot', 'beforeClaim', 'shutdown', 'newTask'] as const) {
    if (plugin[hook] !== undefined && typeof plugin[hook] !== 'function') problems.push(`${hook} must be a function`);
  }
  return problems;
}

function nameProblems(name: unknown): string[] {
  return typeof name === 'string' && name.trim() !== '' ? [] : ['name must be a non-empty string'];
}

function schemaProblems(schema: unknown, required: boolean): string[] {
  if (schema === undefined && !required) return [];
  const object = schema as Record<string, unknown> | undefined;
  const properties = object?.['properties'];
  if (!(object !== null && typeof object === 'object' && object['type'] === 'object' && properties !== null && typeof properties === 'object' && !Array.isArray(properties))) {
    return ['payloadSchema must be a JSON Schema { type: \'object\', properties: {...} }'];
  }
  // Checked as the worker will use it (joined with the others: its $schema and top-level definitions
  // dropped), so that the worker's compiling of every part's schema together cannot fail naming none.
  const joined = joinPayloadSchemas([{ owner: 'this module', schema: object as JsonSchemaObject }]);
  const problems = jsonSchemaProblems(joined, 'payloadSchema');
  if (problems.length > 0) return problems;
  try {
    compilePayloadValidator(joined, { checked: true });
  } catch (error) {
    return [`payloadSchema cannot be compiled: ${firstLine(error)}`];
  }
  return [];
}

function firstLine(error: unknown): string {
  return errorMessage(error).split('\n')[0] ?? '';
}
