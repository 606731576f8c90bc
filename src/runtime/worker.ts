/**
 * The worker's composition root: the parts a configuration chose (queue,
 * host, engine, plugins) are handed to the pure machines as actors, and the
 * result is one running worker with a way to ask it to stop.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { createActor, fromPromise, type Actor, type InspectionEvent } from 'xstate';
import type { Engine } from '../engines/engine.js';
import type { Host } from '../hosts/host.js';
import { ConfigError, InternalError, errorMessage } from '../model/errors.js';
import type { Plugin } from '../plugins/plugin.js';
import type { Queue } from '../queues/queue.js';
import { taskMachine } from '../machines/task.js';
import { workerMachine, type ClaimRequest, type ClaimResult, type ShutdownReason, type WorkerInput, type WorkerOutput } from '../machines/worker.js';
import type { Logger } from './logger.js';
import { compilePayloadValidator, joinedPayloadSchema } from './schema.js';
import { attempt, createTaskActors } from './task-actors.js';

export interface WorkerOptions extends WorkerInput {
  readonly workerId: string;
  readonly queue: Queue;
  readonly host: Host;
  readonly engine: Engine;
  readonly plugins: readonly Plugin[];
  /** Task directories go under `<workDir>/tasks` on the host. */
  readonly workDir: string;
  readonly logger: Logger;
}

export interface Worker {
  /** Resolves when the worker has stopped, with the reason. */
  readonly stopped: Promise<WorkerOutput>;
  /**
   * Asks the worker to stop; a second call aborts running tasks without waiting for the grace period.
   * With `abortTasksAt` (epoch ms), the grace period ends then at the latest, even when it is longer.
   */
  shutdown(reason: ShutdownReason, options?: { readonly abortTasksAt?: number }): void;
  /** The worker machine's current state, for status output: `claiming`, `shuttingDown.draining`... */
  state(): string;
  /** Why the worker claims nothing although it may (a plugin's beforeClaim reason: `gc: ...`), or undefined. */
  heldOff(): string | undefined;
}

/** How often a worker that holds off claiming asks the plugins again. */
const HOLD_OFF_RECHECK_MS = 1000;

export function startWorker(options: WorkerOptions): Worker {
  const { queue, host, engine, plugins, logger, workerId } = options;
  const validatePayload = compilePayloadValidator(joinedPayloadSchema({ engine, plugins }));
  const gatekeepers = plugins.filter((plugin) => plugin.beforeClaim !== undefined);
  let heldOff: { readonly plugin: string; readonly reason: string } | undefined;
  /** The first plugin's reason not to claim now, if any; a failing hook is one too. */
  const holdOff = async () => {
    for (const plugin of gatekeepers) {
      // Called through attempt(): a JavaScript plugin's hook may throw synchronously or return no promise.
      const reason = await attempt(() => plugin.beforeClaim!({ workerId, logger })).catch((error: unknown) => `beforeClaim failed: ${errorMessage(error)}`);
      if (reason !== undefined) return { plugin: plugin.name, reason };
    }
    return undefined;
  };
  /**
   * Resolves true once no plugin holds claims off, false when the poll's wait
   * ran out first (an empty poll, as with no work: the idle timeout counts
   * it). A poll that may not wait (--once) waits for room instead, since an
   * empty answer would mean that the queue is drained.
   */
  const roomToClaim = async (waitMs: number, signal: AbortSignal): Promise<boolean> => {
    const until = waitMs > 0 ? Date.now() + waitMs : Infinity;
    for (;;) {
      const hold = await holdOff();
      if (hold === undefined) {
        if (heldOff !== undefined) logger.info('claiming again', { plugin: heldOff.plugin });
        heldOff = undefined;
        return true;
      }
      if (heldOff?.plugin !== hold.plugin) logger.warn('holding off claiming', { plugin: hold.plugin, reason: hold.reason });
      heldOff = hold;
      const left = until - Date.now();
      if (left <= 0) return false;
      await sleep(Math.min(left, HOLD_OFF_RECHECK_MS), undefined, { signal });
    }
  };
  const taskActors = createTaskActors({ workerId, queue, host, engine, plugins, validatePayload, workDir: options.workDir, logger });
  const machine = workerMachine.provide({
    actors: {
      boot: fromPromise(async ({ signal }) => {
        // xstate aborts the signal when the worker leaves booting (a SHUTDOWN during boot): the host stops booting.
        const identity = await bootOf(`host ${host.name}`, () => host.boot({ logger, signal }));
        const capabilities = host.transport().capabilities;
        const missing = Object.entries(engine.needs).filter(([need, wanted]) => wanted && !capabilities[need as keyof typeof capabilities]);
        if (missing.length > 0) {
          throw new ConfigError(`engine ${engine.name} needs ${missing.map(([need]) => need).join(' and ')}, which host ${host.name} does not offer`);
        }
        for (const plugin of plugins) await bootOf(`plugin ${plugin.name}`, () => plugin.boot?.({ workerId, logger }));
        logger.info('worker booted', { host: host.name, hostname: identity.hostname, engine: engine.name, capacity: options.capacity, ...identity.facts });
      }),
      claimWork: fromPromise<ClaimResult, ClaimRequest>(async ({ input, signal }) => {
        if (gatekeepers.length > 0 && !(await roomToClaim(input.waitMs, signal))) return { claims: [], now: Date.now() };
        const claims = await queue.claimWork({ workerId, count: input.count, waitMs: input.waitMs, signal }).catch((error: unknown) => {
          // The machine backs off and tries again; the log says why the worker is idle meanwhile.
          logger.warn('could not claim work; retrying after a pause', { error: errorMessage(error) });
          throw error;
        });
        if (signal.aborted && claims.length > 0) {
          // The worker left `claiming` (shutdown) while the queue handed these out; nobody will run
          // them, so give them back now instead of letting their claims expire.
          await Promise.all(claims.map((claim) =>
            queue
              .resolve(claim, workerId, { state: 'exception', reason: 'worker-shutdown', message: 'the worker shut down as it claimed the run' })
              .catch((error: unknown) => logger.warn('could not give back a run claimed during shutdown', { taskId: claim.taskId, error })),
          ));
          return { claims: [], now: Date.now() };
        }
        for (const claim of claims) logger.info('claimed', { taskId: claim.taskId, runId: claim.runId });
        return { claims, now: Date.now() };
      }),
      dispose: fromPromise<void, { reason: ShutdownReason }>(async ({ input }) => {
        logger.info('shutting down', { reason: input.reason.kind });
        // Every plugin's shutdown runs, and then the host's dispose, whatever one of them does: through
        // attempt(), a hook that throws synchronously or returns no promise is one more logged failure.
        for (const plugin of [...plugins].reverse()) {
          await attempt(() => plugin.shutdown?.({ workerId, logger })).catch((error: unknown) => logger.error(`plugin ${plugin.name}: shutdown failed`, { error }));
        }
        await attempt(() => host.dispose()).catch((error: unknown) => logger.error(`host ${host.name}: dispose failed`, { error }));
      }),
      task: taskMachine.provide({ actors: taskActors }),
    },
  });
  const actor: Actor<typeof machine> = createActor(machine, {
    input: {
      capacity: options.capacity,
      maxTasks: options.maxTasks,
      once: options.once,
      idleTimeoutMs: options.idleTimeoutMs,
      shutdownGraceMs: options.shutdownGraceMs,
      pollWaitMs: options.pollWaitMs,
    },
    // Inspection builds an event for every event and snapshot of every actor of the system (each task and
    // each of its stages): only for the debug log of task states (2% of a short-task worker's main thread
    // went to handing them out alone, in a profile).
    ...(logger.enabled?.('debug') === false ? {} : { inspect: logTaskStates(logger) }),
  });
  // Grace periods cut short by a deadline: a second SHUTDOWN then aborts the tasks, as a second signal does.
  const deadlines = new Set<NodeJS.Timeout>();
  const stopped = new Promise<WorkerOutput>((resolve, reject) => {
    let last: string | undefined;
    actor.subscribe({
      next: (snapshot) => {
        const state = stateName(snapshot.value);
        if (state !== last) logger.info('worker state', { state });
        last = state;
      },
      complete: () => resolve(actor.getSnapshot().output!),
      error: reject,
    });
  });
  void stopped.finally(() => deadlines.forEach(clearTimeout)).catch(() => undefined);
  actor.start();
  return {
    stopped,
    shutdown: (reason, { abortTasksAt } = {}) => {
      actor.send({ type: 'SHUTDOWN', reason });
      if (abortTasksAt === undefined) return;
      const timer = setTimeout(() => {
        deadlines.delete(timer);
        // Tasks that ended within the grace period, or were aborted already, need nothing more.
        if (!actor.getSnapshot().matches({ shuttingDown: 'draining' })) return;
        logger.warn('the shutdown deadline is here: aborting the tasks still running', { reason: reason.kind });
        actor.send({ type: 'SHUTDOWN', reason });
      }, Math.max(0, abortTasksAt - Date.now()));
      deadlines.add(timer);
    },
    state: () => stateName(actor.getSnapshot().value),
    heldOff: () => (heldOff === undefined ? undefined : `${heldOff.plugin}: ${heldOff.reason}`),
  };
}

/**
 * One part's boot; a failure names the part (`plugin gc: boot failed: ...`, `host ssh: boot failed: ...`),
 * and is the reason the worker stops. A synchronous throw counts as a failure too.
 */
async function bootOf<T>(part: string, boot: () => T | Promise<T>): Promise<T> {
  try {
    return await boot();
  } catch (error) {
    throw new InternalError(`${part}: boot failed: ${errorMessage(error)}`, { cause: error, fatal: true });
  }
}

/** Logs every state a task machine enters, at debug, with the state as data. */
function logTaskStates(logger: Logger): (event: InspectionEvent) => void {
  const last = new Map<string, string>();
  return (event) => {
    if (event.type !== '@xstate.snapshot') return;
    const snapshot = event.snapshot as { value?: unknown; context?: { claim?: { taskId: string; runId: number } } };
    const claim = snapshot.context?.claim;
    if (snapshot.value === undefined || claim === undefined) return;
    const state = stateName(snapshot.value);
    const id = event.actorRef.sessionId;
    if (last.get(id) === state) return;
    if (state === 'done') last.delete(id);
    else last.set(id, state);
    logger.debug('task state', { taskId: claim.taskId, runId: claim.runId, state });
  };
}

function stateName(value: unknown): string {
  if (typeof value === 'string') return value;
  const [key, child] = Object.entries(value as Record<string, unknown>)[0] ?? ['?', undefined];
  return child === undefined ? key : `${key}.${stateName(child)}`;
}
