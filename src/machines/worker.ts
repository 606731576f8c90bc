/**
 * The worker machine: one worker process's life.
 *
 *   booting ── claiming ⇄ running ── shuttingDown ── stopped
 *
 * `claiming` long-polls the queue for as many runs as there are free slots
 * and spawns one task machine per claim; `running` waits while every slot
 * is busy. `shuttingDown` never claims: it lets tasks finish (for the grace
 * period when the shutdown was asked for), aborts the rest, disposes, and
 * only then reaches `stopped`. Task actors are children of this machine;
 * their completion arrives as `xstate.done.actor.<id>` events.
 */
import { assign, enqueueActions, fromPromise, raise, setup, type ActorRefFrom } from 'xstate';
import type { Claim } from '../model/task.js';
import { runKey } from '../model/task.js';
import { ignored, taskMachine, type TaskOutput } from './task.js';

/** Why the worker stops; the CLI maps each kind to an exit code. */
export type ShutdownReason =
  | { readonly kind: 'tasks-done' }
  | { readonly kind: 'drained' }
  | { readonly kind: 'idle' }
  | { readonly kind: 'signal'; readonly signal: string }
  | { readonly kind: 'host'; readonly message: string }
  | { readonly kind: 'fatal'; readonly message: string };

export interface WorkerInput {
  readonly capacity: number;
  /** Stop after claiming this many runs (Taskcluster's numberOfTasksToRun); 0 = no limit. */
  readonly maxTasks: number;
  /** Stop once the queue has nothing pending and no task runs. */
  readonly once: boolean;
  /** Stop after this long with nothing to do; 0 = never. */
  readonly idleTimeoutMs: number;
  /** How long running tasks may finish after a shutdown is asked for. */
  readonly shutdownGraceMs: number;
  /** How long one claim request may wait for work. */
  readonly pollWaitMs: number;
}

export interface WorkerContext extends WorkerInput {
  /** Actor ids of the task machines still running. */
  readonly running: readonly string[];
  readonly claimed: number;
  readonly idleSince?: number;
  readonly claimFailures: number;
  readonly reason?: ShutdownReason;
}

export type WorkerEvent =
  /** A signal or the host asks the worker to stop; a second one aborts tasks at once. */
  | { type: 'SHUTDOWN'; reason: ShutdownReason }
  /** Something the worker cannot go on after (lost its host, broken runtime). */
  | { type: 'FATAL'; message: string }
  | { type: `xstate.done.actor.${string}`; output: TaskOutput }
  | { type: `xstate.error.actor.${string}`; error: unknown };

export interface ClaimRequest {
  readonly count: number;
  readonly waitMs: number;
}
export interface ClaimResult {
  readonly claims: readonly Claim[];
  /** When the request returned, by the runtime's clock (for the idle timeout). */
  readonly now: number;
}
export interface WorkerOutput {
  readonly reason: ShutdownReason;
}

/** Task actors are named `task.<taskId>/<runId>`, so `xstate.done.actor.task.*` matches their completion only. */
export const TASK_ACTOR_PREFIX = 'task.';

/** A shutdown someone asked for (or a fatal error), as opposed to one the worker decided on. */
function isRequested(reason: ShutdownReason | undefined): boolean {
  return reason?.kind === 'signal' || reason?.kind === 'host' || reason?.kind === 'fatal';
}

function freeSlots(context: WorkerContext): number {
  const free = context.capacity - context.running.length;
  return context.maxTasks > 0 ? Math.min(free, context.maxTasks - context.claimed) : free;
}

function notProvided(name: string): never {
  throw new Error(`worker machine: actor "${name}" was not provided`);
}

export const workerMachine = setup({
  types: {
    input: {} as WorkerInput,
    context: {} as WorkerContext,
    events: {} as WorkerEvent,
    output: {} as WorkerOutput,
  },
  actors: {
    /** Boot the host, start plugins, reap what a crashed predecessor left. */
    boot: fromPromise<void, void>(async () => notProvided('boot')),
    /** Ask the queue for up to `count` runs, waiting up to `waitMs` for work. */
    claimWork: fromPromise<ClaimResult, ClaimRequest>(async () => notProvided('claimWork')),
    /** Stop plugins and dispose the host. */
    dispose: fromPromise<void, { reason: ShutdownReason }>(async () => notProvided('dispose')),
    task: taskMachine,
  },
  guards: {
    taskLimitReached: ({ context }) => context.maxTasks > 0 && context.claimed >= context.maxTasks,
    noTasksRunning: ({ context }) => context.running.length === 0,
    /** A shutdown someone asked for gives tasks a grace period; one the worker decided on waits for them. */
    graceApplies: ({ context }) => isRequested(context.reason),
  },
  delays: {
    shutdownGrace: ({ context }) => context.shutdownGraceMs,
    claimBackoff: ({ context }) => Math.min(30_000, 500 * 2 ** Math.min(Math.max(context.claimFailures - 1, 0), 6)),
  },
  actions: {
    /** The first reason to stop is the one the worker reports. */
    noteReason: assign(({ context }, params: { reason: ShutdownReason }) => ({ reason: context.reason ?? params.reason })),
    /**
     * A task actor ended: free its slot and drop it from the machine's
     * children. xstate keeps a spawned child that reached its end among the
     * children until it is stopped, so without the stop every task run stays
     * in memory and each later spawn copies them all (quadratic in the runs).
     */
    forgetTask: enqueueActions(({ context, event, enqueue }) => {
      const ended = event.type.replace(/^xstate\.(done|error)\.actor\./, '');
      enqueue.assign({ running: context.running.filter((id) => id !== ended) });
      enqueue.stopChild(ended);
    }),
    /** A signal or the host overrides a reason the worker chose itself (tasks done, drained, idle). */
    overrideReason: assign(({ context }, params: { reason: ShutdownReason }) => ({
      reason: isRequested(context.reason) ? context.reason : params.reason,
    })),
    abortTasks: enqueueActions(({ context, enqueue }) => {
      for (const id of context.running) enqueue.sendTo(id, { type: 'ABORT' });
    }),
  },
}).createMachine({
  id: 'worker',
  context: ({ input }) => ({ ...input, running: [], claimed: 0, claimFailures: 0 }),
  initial: 'booting',
  on: {
    // A task machine that fails skipped its own cleanup: the worker can no longer be trusted.
    'xstate.error.actor.task.*': {
      actions: ['forgetTask', raise(({ event }) => ({ type: 'FATAL' as const, message: `a task actor failed: ${errorText((event as { error?: unknown }).error)}` }))],
    },
  },
  states: {
    booting: {
      invoke: {
        src: 'boot',
        onDone: 'claiming',
        onError: {
          target: 'shuttingDown',
          // The boot actor's error names what failed (`plugin gc: boot failed: ...`, `host ssh: boot failed: ...`).
          actions: { type: 'noteReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: errorText(event.error) } }) },
        },
      },
      on: {
        SHUTDOWN: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: event.reason }) } },
        FATAL: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: event.message } }) } },
      },
    },
    claiming: {
      always: {
        guard: 'taskLimitReached',
        target: 'shuttingDown',
        actions: { type: 'noteReason', params: { reason: { kind: 'tasks-done' } } },
      },
      initial: 'polling',
      states: {
        polling: {
          invoke: {
            src: 'claimWork',
            input: ({ context }) => ({
              count: freeSlots(context),
              waitMs: context.once ? 0 : context.pollWaitMs,
            }),
            onDone: [
              {
                guard: ({ context, event }) => event.output.claims.length === 0 && context.running.length === 0 && context.once,
                target: '#worker.shuttingDown',
                actions: { type: 'noteReason', params: { reason: { kind: 'drained' } } },
              },
              {
                guard: ({ context, event }) =>
                  event.output.claims.length === 0 &&
                  context.running.length === 0 &&
                  context.idleTimeoutMs > 0 &&
                  context.idleSince !== undefined &&
                  event.output.now - context.idleSince >= context.idleTimeoutMs,
                target: '#worker.shuttingDown',
                actions: { type: 'noteReason', params: { reason: { kind: 'idle' } } },
              },
              {
                // --once never long-polls: with nothing to claim it waits for a running task to end.
                guard: ({ context, event }) => event.output.claims.length === 0 && context.once,
                target: '#worker.running',
              },
              {
                target: '#worker.claiming.spawning',
                actions: enqueueActions(({ context, event, enqueue }) => {
                  const { claims, now } = event.output;
                  const ids = claims.map((claim) => TASK_ACTOR_PREFIX + runKey(claim));
                  claims.forEach((claim, i) => enqueue.spawnChild('task', { id: ids[i]!, input: { claim } }));
                  const busy = claims.length > 0 || context.running.length > 0;
                  enqueue.assign({
                    running: [...context.running, ...ids],
                    claimed: context.claimed + claims.length,
                    claimFailures: 0,
                    idleSince: busy ? undefined : (context.idleSince ?? now),
                  });
                }),
              },
            ],
            onError: { target: 'backingOff', actions: assign(({ context }) => ({ claimFailures: context.claimFailures + 1 })) },
          },
          on: { 'xstate.done.actor.task.*': { actions: 'forgetTask' } },
        },
        spawning: {
          description: 'Decide where the new claims leave the worker: full, or still free.',
          always: [
            { guard: 'taskLimitReached', target: '#worker.shuttingDown', actions: { type: 'noteReason', params: { reason: { kind: 'tasks-done' } } } },
            { guard: ({ context }) => freeSlots(context) <= 0, target: '#worker.running' },
            { target: 'polling' },
          ],
        },
        backingOff: {
          description: 'The queue could not be reached; try again after a growing pause.',
          after: { claimBackoff: 'polling' },
          on: { 'xstate.done.actor.task.*': { actions: 'forgetTask' } },
        },
      },
      on: {
        SHUTDOWN: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: event.reason }) } },
        FATAL: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: event.message } }) } },
      },
    },
    running: {
      description: 'Every slot is busy (or, with --once, nothing is pending): wait for a task to finish.',
      on: {
        'xstate.done.actor.task.*': { target: 'claiming', actions: 'forgetTask' },
        SHUTDOWN: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: event.reason }) } },
        FATAL: { target: 'shuttingDown', actions: { type: 'noteReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: event.message } }) } },
      },
    },
    shuttingDown: {
      initial: 'draining',
      states: {
        draining: {
          description: 'No more claims; running tasks may finish (within the grace period if it applies).',
          always: { guard: 'noTasksRunning', target: 'disposing' },
          after: { shutdownGrace: { guard: 'graceApplies', target: 'aborting' } },
          on: {
            'xstate.done.actor.task.*': { actions: 'forgetTask' },
            // A second request aborts at once; a first one, after the worker had decided to stop
            // (tasks done, drained, idle), starts the grace period and becomes the reason.
            SHUTDOWN: [
              { guard: 'graceApplies', target: 'aborting', actions: { type: 'noteReason', params: ({ event }) => ({ reason: event.reason }) } },
              { target: 'draining', reenter: true, actions: { type: 'overrideReason', params: ({ event }) => ({ reason: event.reason }) } },
            ],
            FATAL: [
              { guard: 'graceApplies', target: 'aborting', actions: { type: 'noteReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: event.message } }) } },
              { target: 'draining', reenter: true, actions: { type: 'overrideReason', params: ({ event }) => ({ reason: { kind: 'fatal', message: event.message } }) } },
            ],
          },
        },
        aborting: {
          description: 'Abort the tasks still running (exception/worker-shutdown, so the queue re-runs them).',
          entry: 'abortTasks',
          always: { guard: 'noTasksRunning', target: 'disposing' },
          on: {
            'xstate.done.actor.task.*': { actions: 'forgetTask' },
            SHUTDOWN: ignored('tasks are being aborted already'),
            FATAL: ignored('tasks are being aborted already'),
          },
        },
        disposing: {
          description: 'Stop plugins and dispose the host.',
          invoke: {
            src: 'dispose',
            input: ({ context }) => ({ reason: context.reason! }),
            onDone: '#worker.stopped',
            // The dispose actor logs each part's failure and goes on; the worker stops all the same, with its reason.
            onError: '#worker.stopped',
          },
          on: {
            SHUTDOWN: ignored('disposing already'),
            FATAL: ignored('disposing already'),
          },
        },
      },
    },
    stopped: { type: 'final' },
  },
  output: ({ context }) => ({ reason: context.reason ?? { kind: 'fatal', message: 'stopped without a reason' } }),
});

export type TaskActorRef = ActorRefFrom<typeof taskMachine>;

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
