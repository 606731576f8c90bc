/**
 * maxruntime: the payload's `maxRunTime` (seconds) limits how long the
 * command may run, counted from its start. The plugin only reads the limit
 * (its `maxRunTimeMs` hook); the task machine keeps the time on its own
 * clock, and when the limit passes it stops the command's whole process
 * tree (MAX_RUN_TIME) and resolves the run `failed` with the message
 * `maxRunTime of N s exceeded`, as Taskcluster's generic-worker and
 * docker-worker do (a task that runs too long is the task's failure, not
 * the worker's: it is not retried).
 */
import type { JsonSchemaObject } from '../runtime/schema.js';
import { MAX_RUN_TIME_LIMIT_MS, type Plugin, type TaskPlugin, type TaskPluginOptions } from './plugin.js';

/** The longest maxRunTime in whole seconds that the task machine's timer can keep (2147483 s, about 24.8 days). */
export const MAX_RUN_TIME_SECONDS = Math.floor(MAX_RUN_TIME_LIMIT_MS / 1000);

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    maxRunTime: {
      description: `Seconds the command may run (at most ${MAX_RUN_TIME_SECONDS}, about 24.8 days); then its process tree is stopped and the run resolves failed.`,
      type: 'integer',
      minimum: 1,
      maximum: MAX_RUN_TIME_SECONDS,
    },
  },
};

export function maxruntimePlugin(): Plugin {
  return {
    name: 'maxruntime',
    payloadSchema: PAYLOAD_SCHEMA,
    newTask({ payload }: TaskPluginOptions): TaskPlugin {
      return {
        maxRunTimeMs() {
          // Called after the payload was validated against PAYLOAD_SCHEMA.
          const seconds = payload['maxRunTime'];
          return typeof seconds === 'number' ? seconds * 1000 : undefined;
        },
      };
    },
  };
}
