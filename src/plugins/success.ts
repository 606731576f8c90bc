/**
 * success: says whether a run succeeded from how its command ended, as
 * Taskcluster's generic-worker does. Exit status 0 is `completed`, anything
 * else (another code, a signal, a command that could not start) is
 * `failed`, unless the payload says otherwise:
 *
 *   onExitStatus.retry        exit codes that resolve the run
 *                             `exception/intermittent-task`, which the queue
 *                             runs again while the task has retries left
 *   onExitStatus.purgeCaches  exit codes after which the task's caches are
 *                             not to be trusted: `purgeCaches` is called
 *                             (`drover worker` passes the gc plugin's; with
 *                             none, the run's log says there is nothing to
 *                             purge); the verdict is still the one of the code
 */
import type { RunResult } from '../model/task.js';
import { describeResult } from '../runtime/task-actors.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { Plugin, TaskPlugin, TaskPluginOptions, Verdict } from './plugin.js';

export interface SuccessPluginOptions {
  /** Called when the exit code is one of `onExitStatus.purgeCaches`; default: a line in the run's log. */
  readonly purgeCaches?: (options: TaskPluginOptions, exitCode: number) => Promise<void> | void;
}

const EXIT_CODES = { type: 'array', items: { type: 'integer', minimum: 0, maximum: 255 }, uniqueItems: true };

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    onExitStatus: {
      description: 'What exit codes of the command mean, beyond 0 (completed) and the others (failed).',
      type: 'object',
      additionalProperties: false,
      properties: {
        retry: { ...EXIT_CODES, description: 'Exit codes that resolve the run exception/intermittent-task: it runs again while retries remain.' },
        purgeCaches: { ...EXIT_CODES, description: 'Exit codes after which the caches the task used are purged.' },
      },
    },
  },
};

interface OnExitStatus {
  readonly retry: readonly number[];
  readonly purgeCaches: readonly number[];
}

export function successPlugin(pluginOptions: SuccessPluginOptions = {}): Plugin {
  return {
    name: 'success',
    payloadSchema: PAYLOAD_SCHEMA,
    newTask(options: TaskPluginOptions): TaskPlugin {
      return {
        async stopped(result: RunResult): Promise<Verdict> {
          // The payload was validated against PAYLOAD_SCHEMA before the command ran.
          const onExitStatus = readOnExitStatus(options.payload['onExitStatus']);
          const code = result.startError === undefined && result.signal === null ? result.exitCode : null;
          if (code !== null && onExitStatus.purgeCaches.includes(code)) {
            if (pluginOptions.purgeCaches !== undefined) await pluginOptions.purgeCaches(options, code);
            else options.log.line(`exit code ${code} is in onExitStatus.purgeCaches; this worker keeps no caches, so there is nothing to purge`);
          }
          if (code === 0) return { state: 'completed' };
          if (code !== null && onExitStatus.retry.includes(code)) {
            return { state: 'exception', reason: 'intermittent-task', message: `${describeResult(result)}, which onExitStatus.retry lists` };
          }
          return { state: 'failed', message: describeResult(result) };
        },
      };
    },
  };
}

function readOnExitStatus(value: unknown): OnExitStatus {
  const { retry, purgeCaches } = (typeof value === 'object' && value !== null ? value : {}) as { retry?: unknown; purgeCaches?: unknown };
  const codes = (list: unknown): number[] => (Array.isArray(list) ? list.filter((code): code is number => typeof code === 'number') : []);
  return { retry: codes(retry), purgeCaches: codes(purgeCaches) };
}
