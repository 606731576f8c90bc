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
import type { Plugin, TaskPlugin, TaskPluginOptions } from './plugin.js';

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    maxRunTime: {
      description: 'Seconds the command may run; then its process tree is stopped and the run resolves failed.',
      type: 'integer',
      minimum: 1,
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
