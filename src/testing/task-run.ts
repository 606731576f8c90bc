/**
 * One task through the real task runner, for tests (drover/testing): the
 * task machine provided with the runtime's own actors (createTaskActors),
 * on a queue (an in-memory one by default), an engine (the scripted mock
 * engine by default), the plugins given (the shipped ones by default) and a host
 * whose transport is this machine's, in a temporary work directory.
 *
 * A plugin author checks a plugin against every way a run can go by
 * scripting the mock engine's payload; the model-based replays drive it
 * event by event.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createActor, type Actor, type ActorOptions, type InspectionEvent } from 'xstate';
import { MockEngine } from '../engines/mock.js';
import type { Engine } from '../engines/engine.js';
import type { Host } from '../hosts/host.js';
import { LocalTransport } from '../hosts/local.js';
import { taskMachine, type TaskOutput } from '../machines/task.js';
import type { Claim, Payload } from '../model/task.js';
import { shippedPlugins } from '../plugins/index.js';
import type { Plugin } from '../plugins/plugin.js';
import { MemoryQueue } from '../queues/memory.js';
import type { Queue } from '../queues/queue.js';
import { silentLogger, type Logger } from '../runtime/logger.js';
import { compilePayloadValidator, joinedPayloadSchema, type JsonSchemaObject, type PayloadValidator } from '../runtime/schema.js';
import { createTaskActors } from '../runtime/task-actors.js';

export interface TaskRunOptions {
  readonly payload: Payload;
  readonly engine?: Engine;
  readonly plugins?: readonly Plugin[];
  readonly queue?: Queue;
  /** The task machine's clock (maxRunTime); xstate's SimulatedClock lets a test move it. */
  readonly clock?: NonNullable<ActorOptions<typeof taskMachine>['clock']>;
  readonly workerId?: string;
  readonly retries?: number;
  readonly logger?: Logger;
  /** Sees the machine's inspection events (snapshots, microsteps with the transitions taken). */
  readonly inspect?: (event: InspectionEvent) => void;
}

export interface TaskRun {
  readonly claim: Claim;
  readonly queue: Queue;
  readonly actor: Actor<typeof taskMachine>;
  /** Resolves with the machine's output once it is done; rejects if it fails. */
  readonly output: Promise<TaskOutput>;
  /** Stops the machine if it still runs, removes the work directory, closes a queue it opened. Idempotent. */
  close(): Promise<void>;
}

/** Compiled validators by schema: compiling is most of the cost of a short run, and tests start many. */
const validators = new Map<string, PayloadValidator>();

function validatorFor(schema: JsonSchemaObject): PayloadValidator {
  const key = JSON.stringify(schema);
  let validate = validators.get(key);
  if (validate === undefined) {
    validate = compilePayloadValidator(schema);
    validators.set(key, validate);
  }
  return validate;
}

/** A host for tests: this machine's transport, nothing to boot or dispose. */
export function localTestHost(): Host {
  const transport = new LocalTransport();
  return {
    name: 'test',
    shutdown: new AbortController().signal,
    boot: async () => ({ hostname: 'test', facts: {} }),
    transport: () => transport,
    dispose: async () => {},
  };
}

/** Submits a task with `payload`, claims it, and starts its task machine; the machine runs from here. */
export async function startTaskRun(options: TaskRunOptions): Promise<TaskRun> {
  const workerId = options.workerId ?? 'test-worker';
  const queue = options.queue ?? new MemoryQueue();
  const engine = options.engine ?? new MockEngine();
  const plugins = options.plugins ?? shippedPlugins();
  const workDir = await mkdtemp(join(tmpdir(), 'drover-task-'));
  const validatePayload = validatorFor(joinedPayloadSchema({ engine, plugins }));
  const actors = createTaskActors({ workerId, queue, host: localTestHost(), engine, plugins, validatePayload, workDir, logger: options.logger ?? silentLogger });
  await queue.submit({ payload: options.payload, deadline: Date.now() + 3_600_000, retries: options.retries ?? 0 });
  const [claim] = await queue.claimWork({ workerId, count: 1, waitMs: 0 });
  if (claim === undefined) throw new Error('startTaskRun: the queue gave no claim for the task just submitted');
  const actor = createActor(taskMachine.provide({ actors }), {
    input: { claim },
    ...(options.clock && { clock: options.clock }),
    ...(options.inspect && { inspect: options.inspect }),
  });
  const output = new Promise<TaskOutput>((resolve, reject) => {
    actor.subscribe({ complete: () => resolve(actor.getSnapshot().output!), error: reject });
  });
  // Nobody may be listening yet; a failure still surfaces through `output` when awaited.
  output.catch(() => {});
  actor.start();
  let closing: Promise<void> | undefined;
  return {
    claim, queue, actor, output,
    close: () => (closing ??= (async () => {
      actor.stop();
      await rm(workDir, { recursive: true, force: true });
      if (options.queue === undefined) await queue.close();
    })()),
  };
}
