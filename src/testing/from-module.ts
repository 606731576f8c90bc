/**
 * Extensions from their modules, as a worker loads them from its config
 * file (src/runtime/extensions.ts): the default export's shape, `config`
 * against the module's configSchema, then `createPlugin`/`createEngine`
 * and the contract of what it returned. A test of an extension sees the
 * worker's own errors (ConfigError) for a bad config or a bad shape.
 *
 *     const plugin = await pluginFromModule(await import('../src/index.js'), { labels: { pool: 'a' } });
 */
import type { Engine } from '../engines/engine.js';
import { ConfigError } from '../model/errors.js';
import type { Plugin } from '../plugins/plugin.js';
import { instantiate, type ExtensionContext } from '../runtime/extensions.js';

export async function pluginFromModule(namespace: object, config?: unknown, context: Partial<ExtensionContext> = {}): Promise<Plugin> {
  return (await fromModule(namespace, 'plugin', config, context)) as Plugin;
}

export async function engineFromModule(namespace: object, config?: unknown, context: Partial<ExtensionContext> = {}): Promise<Engine> {
  return (await fromModule(namespace, 'engine', config, context)) as Engine;
}

/** The context defaults: this directory, this machine, the worker's default kill signal and grace. */
async function fromModule(namespace: object, kind: 'engine' | 'plugin', config: unknown, context: Partial<ExtensionContext>): Promise<Engine | Plugin> {
  const created = await instantiate(namespace, kind, config, { configDir: process.cwd(), remote: false, killSignal: 'SIGTERM', killGraceMs: 5000, ...context });
  if ('problem' in created) throw new ConfigError(`${kind} module: ${created.problem}`);
  return created.value;
}
