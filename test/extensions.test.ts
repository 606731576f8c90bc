/**
 * Loading extensions: engines and plugins named by module in the config
 * file, loaded by dynamic import, checked, and joined to the shipped parts;
 * every way a module can be wrong gives one error naming it, and
 * `drover worker` exits 2 on it.
 */
import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { workerParts, workerPayloadSchema } from '../src/cli/worker-command.js';
import { loadConfig } from '../src/runtime/config.js';
import { drover } from './helpers/drover.js';

const GOOD_PLUGIN = `
export default {
  configSchema: { type: 'object', additionalProperties: false, properties: { greeting: { type: 'string' }, times: { type: 'integer', minimum: 1 } } },
  createPlugin(config, context) {
    return { name: 'greeter', payloadSchema: { type: 'object', properties: { greet: { type: 'boolean' } } }, greeting: config.greeting, context };
  },
};
`;

const GOOD_ENGINE = `
export default {
  createEngine(config, context) {
    return { name: 'noop', payloadSchema: { type: 'object', properties: { noop: { type: 'string' } } }, needs: { exec: false, files: false }, prepare: async () => { throw new Error('never') }, context };
  },
};
`;

/** A directory with a config file and modules; returns the config file's path. */
function setup(t: Test, config: string, files: Record<string, string> = {}): string {
  const dir = t.testdir({});
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(join(dir, path, '..'), { recursive: true });
    writeFileSync(join(dir, path), text);
  }
  writeFileSync(join(dir, 'drover.yaml'), config);
  return join(dir, 'drover.yaml');
}

async function partsOf(file: string) {
  return workerParts(loadConfig({ file, env: {} }), false);
}

t.test('a plugin by path relative to the config file runs after the shipped ones, with its checked config and a context', async (t) => {
  const file = setup(t, 'plugins:\n  - module: ./plugins/greeter.mjs\n    config: { greeting: hello }\n', { 'plugins/greeter.mjs': GOOD_PLUGIN });
  const { engine, plugins } = await partsOf(file);
  t.equal(engine.name, 'process');
  const names = plugins.map((plugin) => plugin.name);
  t.same(names.slice(-2), ['greeter', 'livelog'], 'loaded plugins come after the shipped ones, before livelog, which closes the log');
  t.same(names.slice(0, -2), ['success', 'env', 'maxruntime', 'gc', 'artifacts'], 'the other shipped plugins come first, in their order');
  const greeter = plugins.at(-2) as unknown as { greeting: string; context: Record<string, unknown> };
  t.equal(greeter.greeting, 'hello');
  t.same(greeter.context, { remote: false, killSignal: 'SIGTERM', killGraceMs: 5000, configDir: join(file, '..') });
  const schema = await workerPayloadSchema(loadConfig({ file, env: {} }));
  t.ok('greet' in schema.properties, 'its payload schema joins the worker\'s');
});

t.test('plugins run in config order; a package name is resolved from the config file\'s directory; CommonJS works', async (t) => {
  const file = setup(t, 'plugins:\n  - module: drover-plugin-cjs\n  - ./two.mjs\n', {
    'node_modules/drover-plugin-cjs/package.json': JSON.stringify({ name: 'drover-plugin-cjs', main: 'main.js' }),
    'node_modules/drover-plugin-cjs/main.js': 'module.exports = { createPlugin: () => ({ name: "one" }) };\n',
    'two.mjs': 'export default { createPlugin: async () => ({ name: "two" }) };\n',
  });
  const { plugins } = await partsOf(file);
  t.same(plugins.slice(-3, -1).map((plugin) => plugin.name), ['one', 'two']);
});

t.test('a payloadSchema that names another JSON Schema version loads: the worker reads its properties', async (t) => {
  // zod's toJSONSchema writes draft 2020-12's $schema; the join keeps only properties and required.
  const file = setup(t, 'plugins: [./newer.mjs]\n', {
    'newer.mjs': 'export default { createPlugin: () => ({ name: "newer", payloadSchema: { $schema: "https://json-schema.org/draft/2020-12/schema", type: "object", properties: { note: { type: "string" } } } }) };\n',
  });
  const { plugins } = await partsOf(file);
  t.equal(plugins.at(-2)?.name, 'newer');
  t.ok('note' in (await workerPayloadSchema(loadConfig({ file, env: {} }))).properties);
});

t.test('a bare name is a package, not a file: the error says how to name the file', async (t) => {
  const file = setup(t, 'plugins: [greeter.mjs]\n', { 'greeter.mjs': GOOD_PLUGIN });
  await t.rejects(partsOf(file), { message: /plugins\[0\] \(module "greeter\.mjs"\): cannot be found .*; to load the file of that name, write \.\/greeter\.mjs/ });
});

t.test('a package directory by path: its package.json exports pick the entry', async (t) => {
  const file = setup(t, 'plugins:\n  - module: ./pkg\n', {
    'pkg/package.json': JSON.stringify({ name: 'pkg', type: 'module', exports: { '.': { import: './lib/entry.js' } } }),
    'pkg/lib/entry.js': 'export default { createPlugin: () => ({ name: "from-dir" }) };\n',
  });
  t.equal((await partsOf(file)).plugins.at(-2)?.name, 'from-dir');
});

t.test('an engine module replaces engine.type; its payload schema is the worker\'s', async (t) => {
  const file = setup(t, 'engine:\n  module: ./noop-engine.mjs\n', { 'noop-engine.mjs': GOOD_ENGINE });
  const { engine } = await partsOf(file);
  t.equal(engine.name, 'noop');
  const schema = await workerPayloadSchema(loadConfig({ file, env: {} }));
  t.equal(schema['title'], 'drover task payload (engine noop)');
  t.ok('noop' in schema.properties);
  t.notOk('command' in schema.properties, 'not the process engine\'s');
  t.equal(loadConfig({ file, env: {}, flags: { 'engine.type': 'script' } }).extensions.engine, undefined, 'an --engine flag beats the file\'s module');
  t.equal(loadConfig({ file, env: { DROVER_ENGINE: 'script' } }).extensions.engine?.module, './noop-engine.mjs', 'the file beats the environment');
});

t.test('every way a module is wrong is reported at once, each naming the setting and the module', async (t) => {
  const file = setup(t, [
    'engine: { module: ./plugin-as-engine.mjs }',
    'plugins:',
    '  - ./missing.mjs',
    '  - drover-plugin-nowhere',
    '  - ./throws.mjs',
    '  - ./no-default.mjs',
    '  - ./wrong-shape.mjs',
    '  - { module: ./configured.mjs, config: { times: 0, extra: true } }',
    '  - { module: ./no-schema.mjs, config: { a: 1 } }',
    '  - ./create-throws.mjs',
    '  - ./bad-plugin.mjs',
    '  - ./syntax.mjs',
    '  - ./bad-schema.mjs',
    '  - ./bad-config-schema.mjs',
    '  - ./bad-pattern.mjs',
    '  - ./bad-type.mjs',
    '  - ./config-2020.mjs',
    '',
  ].join('\n'), {
    'plugin-as-engine.mjs': GOOD_PLUGIN,
    'throws.mjs': 'throw new Error("cannot start: no licence");\n',
    'no-default.mjs': 'export const createPlugin = () => ({ name: "x" });\n',
    'wrong-shape.mjs': 'export default { make: () => ({}) };\n',
    'configured.mjs': GOOD_PLUGIN,
    'no-schema.mjs': 'export default { createPlugin: () => ({ name: "plain" }) };\n',
    'create-throws.mjs': 'export default { createPlugin() { throw new Error("bad mood") } };\n',
    'bad-plugin.mjs': 'export default { createPlugin: () => ({ name: "", newTask: 3, payloadSchema: { properties: 1 } }) };\n',
    'syntax.mjs': 'export default {\n',
    'bad-pattern.mjs': 'export default { createPlugin: () => ({ name: "pattern", payloadSchema: { type: "object", properties: { id: { type: "string", pattern: "(" } } } }) };\n',
    'bad-type.mjs': 'export default { createPlugin: () => ({ name: "typed", payloadSchema: { type: "object", properties: { note: { type: "strin" } } } }) };\n',
    'config-2020.mjs': 'export default { configSchema: { $schema: "https://json-schema.org/draft/2020-12/schema", type: "object" }, createPlugin: () => ({ name: "newer" }) };\n',
    'bad-config-schema.mjs': 'export default { configSchema: { type: "object", properties: { times: { type: "integer", minimum: "one" } } }, createPlugin: () => ({ name: "counted" }) };\n',
    'bad-schema.mjs': 'export default { createPlugin: () => ({ name: "typo", payloadSchema: { type: "object", properties: { note: { type: "string", minLength: "x" } } } }) };\n',
  });
  const error = await partsOf(file).catch((error: Error) => error);
  t.equal((error as { code?: string }).code, 'DROVER_CONFIG');
  const lines = (error as Error).message.split('\n');
  const expected: [string, RegExp][] = [
    ['engine (module "./plugin-as-engine.mjs")', /is a plugin module \(it has createPlugin\), named where an engine belongs/],
    ['plugins[0] (module "./missing.mjs")', /failed to load: no such file or directory: .*missing\.mjs/],
    ['plugins[1] (module "drover-plugin-nowhere")', /cannot be found \(looked from .*, and from drover's own installation\)/],
    ['plugins[2] (module "./throws.mjs")', /failed to load: cannot start: no licence/],
    ['plugins[3] (module "./no-default.mjs")', /has no default export; an plugin module must export default \{ createPlugin\(config, context\), configSchema \}/],
    ['plugins[4] (module "./wrong-shape.mjs")', /its default export has no createPlugin function/],
    ['plugins[5] (module "./configured.mjs")', /bad config: .*config\.times: must be >= 1.*|bad config: .*config\.extra: is not a known property/],
    ['plugins[6] (module "./no-schema.mjs")', /takes no config \(the module exports no configSchema\), but config is given/],
    ['plugins[7] (module "./create-throws.mjs")', /createPlugin failed: bad mood/],
    ['plugins[8] (module "./bad-plugin.mjs")', /createPlugin returned no valid plugin: name must be a non-empty string; payloadSchema must be .*; newTask must be a function/],
    ['plugins[9] (module "./syntax.mjs")', /failed to load: .*(Unexpected|SyntaxError|end of input)/],
    // Not left to the worker's compiling of all the schemas together, whose error named no module (exit 70).
    ['plugins[10] (module "./bad-schema.mjs")', /createPlugin returned no valid plugin: payloadSchema\.properties\.note\.minLength: must be integer$/],
    ['plugins[11] (module "./bad-config-schema.mjs")', /its configSchema is not a valid JSON Schema: configSchema\.properties\.times\.minimum: must be number$/],
    // Valid JSON Schema that the worker could still not compile.
    ['plugins[12] (module "./bad-pattern.mjs")', /createPlugin returned no valid plugin: payloadSchema cannot be compiled: Invalid regular expression/],
    ['plugins[13] (module "./bad-type.mjs")', /createPlugin returned no valid plugin: payloadSchema\.properties\.note\.type: must be one of "array", "boolean", .*"string"$/],
    ['plugins[14] (module "./config-2020.mjs")', /its configSchema is not a valid JSON Schema: configSchema\.\$schema: drover reads JSON Schema draft-07 \(no schema with key or ref/],
  ];
  for (const [prefix, pattern] of expected) {
    const line = lines.find((candidate) => candidate.startsWith(`${prefix}: `));
    t.ok(line, `${prefix} is reported`);
    t.match(line, pattern, prefix);
  }
  t.equal(lines.length, expected.length, 'one line per problem');
  const configured = lines.find((line) => line.includes('configured.mjs'));
  t.match(configured, /config\.times: must be >= 1/);
  t.match(configured, /config\.extra: is not a known property/);
});

t.test('plugin names and payload properties must not clash with the shipped parts or each other', async (t) => {
  const clash = setup(t, 'plugins: [./a.mjs, ./b.mjs, ./livelog.mjs]\n', {
    'a.mjs': 'export default { createPlugin: () => ({ name: "same" }) };\n',
    'b.mjs': 'export default { createPlugin: () => ({ name: "same" }) };\n',
    'livelog.mjs': 'export default { createPlugin: () => ({ name: "livelog" }) };\n',
  });
  const names = await partsOf(clash).catch((error: Error) => error.message);
  t.match(names, /plugins\[1\] \(module "\.\/b\.mjs"\): its plugin is called "same", as plugins\[0\] \(module "\.\/a\.mjs"\) is/);
  t.match(names, /plugins\[2\] \(module "\.\/livelog\.mjs"\): its plugin is called "livelog", as a shipped plugin is/);
  const property = setup(t, 'plugins: [./env.mjs]\n', {
    'env.mjs': 'export default { createPlugin: () => ({ name: "env2", payloadSchema: { type: "object", properties: { command: {} } } }) };\n',
  });
  await t.rejects(partsOf(property), { code: 'DROVER_CONFIG', message: /payload property "command" is declared by both engine process and plugin env2/ });
});

t.test('the config file\'s extension keys are checked with the rest of the file', async (t) => {
  const file = setup(t, [
    'engine: { type: script, module: ./e.mjs }',
    'plugins:',
    '  - { modul: ./x.mjs }',
    '  - 3',
    '  - { module: "" }',
    '',
  ].join('\n'));
  const error = (() => {
    try {
      loadConfig({ file, env: {} });
      return undefined;
    } catch (error) {
      return error as Error;
    }
  })();
  t.equal((error as { code?: string } | undefined)?.code, 'DROVER_CONFIG');
  t.match(error?.message, /engine\.type and engine\.module both choose the engine; keep one/);
  t.match(error?.message, /plugins\[0\]\.modul: is not a known property \(module, config\)/);
  t.match(error?.message, /plugins\[0\]\.module: must name a module/);
  t.match(error?.message, /plugins\[1\]: must be \{ module, config \} or a module name/);
  t.match(error?.message, /plugins\[2\]\.module: must name a module/);
  const notList = setup(t, 'plugins: { module: ./x.mjs }\nengine: { config: { a: 1 } }\n');
  t.throws(() => loadConfig({ file: notList, env: {} }), { message: /plugins: must be a list of \{ module, config \}/ });
  t.throws(() => loadConfig({ file: notList, env: {} }), { message: /engine\.config: is the config of an engine module, but engine\.module is not set/ });
});

t.test('drover worker exits 2 naming the module; drover schema shows a loaded plugin\'s properties', async (t) => {
  const file = setup(t, 'plugins:\n  - ./greeter.mjs\n  - ./broken.mjs\n', { 'greeter.mjs': GOOD_PLUGIN, 'broken.mjs': 'export default 42;\n' });
  const cwd = join(file, '..');
  const worker = await drover(['worker', '--once', '--config', file], { cwd });
  t.equal(worker.code, 2);
  t.match(worker.stderr, /plugins\[1\] \(module "\.\/broken\.mjs"\): has a default export of type number/);
  const good = setup(t, 'plugins:\n  - ./greeter.mjs\n', { 'greeter.mjs': GOOD_PLUGIN });
  const schema = await drover(['schema', '--config', good], { cwd: join(good, '..') });
  t.equal(schema.code, 0, schema.stderr);
  t.ok('greet' in (JSON.parse(schema.stdout) as { properties: object }).properties);
});
