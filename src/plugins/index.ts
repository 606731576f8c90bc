/**
 * The plugins drover ships, in the order a worker runs their hooks: one
 * list for `drover worker`, `drover batch` and the test runner
 * (startTaskRun), so the three never drift apart. A batch leaves out
 * `livelog` (liveLog: false): its jobs' output goes to the session's files.
 *
 * The order matters where hooks meet: `success` comes before `artifacts`,
 * so a failed command's message wins over missing artifacts' (the first
 * `failed` verdict is the one reported); `gc` gives caches back in
 * `dispose`, after artifacts were read from them; `livelog` comes last, so
 * the lines the others write in `finished` and `exception` are in the log
 * it then completes.
 */
import { artifactsPlugin } from './artifacts.js';
import { envPlugin } from './env.js';
import { gcPlugin, type GcPluginOptions } from './gc.js';
import { livelogPlugin } from './livelog.js';
import { maxruntimePlugin } from './maxruntime.js';
import type { Plugin } from './plugin.js';
import { successPlugin } from './success.js';

/** The settings the shipped plugins read (a worker's Config has them; liveLog is for callers such as the batch). */
export interface ShippedPluginsConfig {
  /** Variables of every task, under the payload's env (the `taskEnv` setting). */
  readonly taskEnv?: Readonly<Record<string, string>>;
  /** Like taskEnv, with the values masked in every log and resolution (the `secretTaskEnv` setting). */
  readonly secretTaskEnv?: Readonly<Record<string, string>>;
  /**
   * Caches and disk space in this work directory (the gc plugin, which
   * also purges caches for the success plugin's onExitStatus.purgeCaches).
   * Without it there is no gc plugin: a batch or a test keeps no caches.
   */
  readonly gc?: GcPluginOptions;
  /**
   * Whether runs store their log in the queue (the livelog plugin); true by default. A batch says
   * false: each job's output goes to files of the session's own, and nothing reads its queue's copy.
   */
  readonly liveLog?: boolean;
}

export function shippedPlugins(config: ShippedPluginsConfig = {}): Plugin[] {
  const gc = config.gc === undefined ? undefined : gcPlugin(config.gc);
  return [
    successPlugin(gc === undefined ? {} : { purgeCaches: gc.purgeCaches }),
    envPlugin({ base: config.taskEnv ?? {}, secret: config.secretTaskEnv ?? {} }),
    maxruntimePlugin(),
    ...(gc === undefined ? [] : [gc]),
    artifactsPlugin(),
    ...(config.liveLog === false ? [] : [livelogPlugin()]),
  ];
}
