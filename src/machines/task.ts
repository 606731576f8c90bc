/**
 * The task machine: one run of one task, from claim to cleanup.
 *
 *   claimed ─┬─ loading ── running ── uploading ─┬─ cleanup ── done
 *            └─ (reclaim runs beside all three) ─┘
 *
 * `claimed` is the lease: the `reclaim` actor it invokes renews the claim
 * while any of its child states is active, and stops when the run leaves
 * it. Resolving happens inside `claimed` (uploading.reporting); `cleanup`
 * comes after, outside, and is entered exactly once on every path.
 *
 * Every state says what it does with each event of the alphabet: a
 * transition, or a targetless transition whose description starts with
 * "ignored:" and says why. The actors named here do the work; the runtime
 * provides them (src/runtime/task-actors.ts), tests provide fakes.
 */
import { assign, fromCallback, fromPromise, raise, setup } from 'xstate';
import type { Claim, RunResult } from '../model/task.js';
import type { Resolution } from '../model/resolution.js';
import { resolutionForError } from '../model/errors.js';

export interface TaskInput {
  readonly claim: Claim;
}

/** Why a running command is being stopped. */
export type StopReason = 'canceled' | 'claim-lost' | 'worker-shutdown' | 'max-run-time' | 'internal-error';

export interface TaskContext {
  readonly claim: Claim;
  /** Known once the payload is loaded. */
  readonly maxRunTimeMs?: number;
  readonly result?: RunResult;
  /** Set early on exception paths; the final one once the upload stage decided. */
  readonly resolution?: Resolution;
  readonly stopReason?: StopReason;
  /** Why the run stopped, in words, for the log and the resolution message. */
  readonly detail?: string;
  /** True once the queue acknowledged the resolution. */
  readonly reported: boolean;
}

export type TaskEvent =
  /** The task was canceled (the queue has resolved the run already). */
  | { type: 'CANCEL' }
  /** The claim is no longer ours: expired, deadline passed, or resolved elsewhere. */
  | { type: 'CLAIM_LOST'; message: string }
  /**
   * Stop the run so that the queue runs it again: the worker is shutting down and its grace period is
   * over, or the machine the run was placed on went down (`message` then says which and why).
   */
  | { type: 'ABORT'; message?: string }
  /** The payload's maxRunTime has passed since the command started. */
  | { type: 'MAX_RUN_TIME' }
  /** Something outside the current actor broke (a log upload, a plugin's watcher). */
  | { type: 'INTERNAL_ERROR'; message: string };

export type TaskEventType = TaskEvent['type'];
export const TASK_EVENT_TYPES: readonly TaskEventType[] = ['CANCEL', 'CLAIM_LOST', 'ABORT', 'MAX_RUN_TIME', 'INTERNAL_ERROR'];

/** How a run ended, from the worker's point of view. */
export interface TaskOutput {
  readonly claim: Claim;
  /** The resolution the queue acknowledged; undefined when none was reported. */
  readonly resolution?: Resolution;
  /** Why nothing was reported: `canceled`, `claim-lost`, or `report-refused`. */
  readonly unreported?: 'canceled' | 'claim-lost' | 'report-refused';
  readonly detail?: string;
}

export interface LoadOutput {
  readonly maxRunTimeMs?: number;
}
export interface UploadInput {
  readonly claim: Claim;
  readonly result?: RunResult;
  /** Decided before the upload stage (exception paths, maxRunTime); plugins then do not vote. */
  readonly resolution?: Resolution;
}
export interface ReportInput {
  readonly claim: Claim;
  readonly resolution: Resolution;
}
export interface StopInput {
  readonly claim: Claim;
  readonly reason: StopReason;
  readonly detail?: string;
}
export interface ClaimInput {
  readonly claim: Claim;
}
/** The run's end as the machine's output will give it, so that cleanup can say why nothing was reported. */
export interface CleanupInput extends ClaimInput {
  readonly unreported?: TaskOutput['unreported'];
  readonly detail?: string;
  /** The resolution decided, reported or not. */
  readonly resolution?: Resolution;
}

function notProvided(name: string): never {
  throw new Error(`task machine: actor "${name}" was not provided`);
}

/** A transition that consumes an event on purpose: documented, and visible to the model checks. */
export function ignored(why: string) {
  return { description: `ignored: ${why}` } as const;
}

function exception(reason: 'worker-shutdown' | 'internal-error', message: string): Resolution {
  return { state: 'exception', reason, message };
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export const taskMachine = setup({
  types: {
    input: {} as TaskInput,
    context: {} as TaskContext,
    events: {} as TaskEvent,
    output: {} as TaskOutput,
  },
  actors: {
    /** Validate the payload, let plugins prepare, build the sandbox. */
    load: fromPromise<LoadOutput, ClaimInput>(async () => notProvided('load')),
    /** Start the sandbox and wait for its command to end. */
    run: fromPromise<RunResult, ClaimInput>(async () => notProvided('run')),
    /** Stop the command and everything it started; resolves when all is gone. */
    stop: fromPromise<void, StopInput>(async () => notProvided('stop')),
    /** Plugins decide success and upload artifacts; resolves with the resolution to report. */
    upload: fromPromise<Resolution, UploadInput>(async () => notProvided('upload')),
    /** Report the resolution to the queue (retrying while the queue is unreachable). */
    report: fromPromise<void, ReportInput>(async () => notProvided('report')),
    /** Dispose the sandbox, plugins and task directory; never changes the resolution. */
    cleanup: fromPromise<void, CleanupInput>(async () => notProvided('cleanup')),
    /** Renew the claim until stopped; sends CANCEL or CLAIM_LOST when the run is no longer ours. */
    reclaim: fromCallback<TaskEvent, ClaimInput>(() => notProvided('reclaim')),
  },
  guards: {
    hasMaxRunTime: ({ context }) => context.maxRunTimeMs !== undefined,
    /** The queue has resolved the run already, or it is no longer ours: nothing to upload or report. */
    runIsGone: ({ context }) => context.stopReason === 'canceled' || context.stopReason === 'claim-lost',
  },
  delays: {
    // A timer (Node's setTimeout) keeps it: the runtime gives only limits up to 2^31-1 ms, since a longer
    // delay fires after 1 ms.
    maxRunTime: ({ context }) => context.maxRunTimeMs ?? 0,
  },
  actions: {
    stopFor: assign((_, params: { reason: StopReason; detail?: string }) => ({
      stopReason: params.reason,
      detail: params.detail,
    })),
  },
}).createMachine({
  id: 'task',
  context: ({ input }) => ({ claim: input.claim, reported: false }),
  initial: 'claimed',
  states: {
    claimed: {
      description: 'The lease is held; reclaim renews it beside every child state.',
      invoke: {
        id: 'reclaim',
        src: 'reclaim',
        input: ({ context }) => ({ claim: context.claim }),
        // Without a reclaimer the claim will run out: stop the run as an internal error while it is still ours.
        onError: { actions: raise(({ event }) => ({ type: 'INTERNAL_ERROR' as const, message: `the claim cannot be renewed: ${errorText(event.error)}` })) },
      },
      initial: 'loading',
      states: {
        loading: {
          description: 'Validate the payload, let plugins prepare, build the sandbox.',
          invoke: {
            src: 'load',
            input: ({ context }) => ({ claim: context.claim }),
            onDone: {
              target: 'running',
              actions: assign(({ event }) => ({ maxRunTimeMs: event.output.maxRunTimeMs })),
            },
            onError: {
              target: 'uploading',
              actions: assign(({ event }) => ({ resolution: resolutionForError(event.error) })),
            },
          },
          on: {
            CANCEL: { target: '#task.cleanup', actions: { type: 'stopFor', params: { reason: 'canceled' } } },
            CLAIM_LOST: {
              target: '#task.cleanup',
              actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'claim-lost', detail: event.message }) },
            },
            ABORT: {
              target: 'uploading',
              actions: assign(({ event }) => ({ resolution: exception('worker-shutdown', event.message ?? 'the worker shut down before the task started') })),
            },
            INTERNAL_ERROR: {
              target: 'uploading',
              actions: assign(({ event }) => ({ resolution: exception('internal-error', event.message) })),
            },
            MAX_RUN_TIME: ignored('maxRunTime counts from the start of the command'),
          },
        },
        running: {
          initial: 'executing',
          states: {
            executing: {
              description: 'The command runs; its output streams into the task log.',
              invoke: {
                src: 'run',
                input: ({ context }) => ({ claim: context.claim }),
                onDone: { target: '#task.claimed.uploading', actions: assign(({ event }) => ({ result: event.output })) },
                onError: {
                  target: '#task.claimed.uploading',
                  actions: assign(({ event }) => ({ resolution: exception('internal-error', errorText(event.error)) })),
                },
              },
              after: { maxRunTime: { guard: 'hasMaxRunTime', actions: raise({ type: 'MAX_RUN_TIME' }) } },
              on: {
                CANCEL: { target: 'stopping', actions: { type: 'stopFor', params: { reason: 'canceled' } } },
                CLAIM_LOST: {
                  target: 'stopping',
                  actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'claim-lost', detail: event.message }) },
                },
                ABORT: { target: 'stopping', actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'worker-shutdown', detail: event.message }) } },
                MAX_RUN_TIME: {
                  target: 'stopping',
                  actions: {
                    type: 'stopFor',
                    params: ({ context }) => ({
                      reason: 'max-run-time',
                      detail: context.maxRunTimeMs === undefined ? 'maxRunTime exceeded' : `maxRunTime of ${context.maxRunTimeMs / 1000} s exceeded`,
                    }),
                  },
                },
                INTERNAL_ERROR: {
                  target: 'stopping',
                  actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'internal-error', detail: event.message }) },
                },
              },
            },
            stopping: {
              description: 'Stop the command and its whole process tree, then go on.',
              invoke: {
                src: 'stop',
                input: ({ context }) => ({ claim: context.claim, reason: context.stopReason!, detail: context.detail }),
                onDone: [
                  { guard: 'runIsGone', target: '#task.cleanup' },
                  { target: '#task.claimed.uploading', actions: assign(({ context }) => ({ resolution: stopResolution(context) })) },
                ],
                onError: [
                  { guard: 'runIsGone', target: '#task.cleanup' },
                  {
                    target: '#task.claimed.uploading',
                    actions: assign(({ event }) => ({
                      resolution: exception('internal-error', `could not stop the command: ${errorText(event.error)}`),
                    })),
                  },
                ],
              },
              on: {
                CANCEL: { actions: { type: 'stopFor', params: { reason: 'canceled' } } },
                CLAIM_LOST: {
                  actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'claim-lost', detail: event.message }) },
                },
                ABORT: ignored('already stopping'),
                MAX_RUN_TIME: ignored('already stopping'),
                INTERNAL_ERROR: ignored('already stopping; the first reason stands'),
              },
            },
          },
        },
        uploading: {
          initial: 'artifacts',
          states: {
            artifacts: {
              description: 'Plugins decide success and upload artifacts; the log always.',
              invoke: {
                src: 'upload',
                input: ({ context }) => ({ claim: context.claim, result: context.result, resolution: context.resolution }),
                onDone: { target: 'reporting', actions: assign(({ event }) => ({ resolution: event.output })) },
                onError: {
                  target: 'reporting',
                  actions: assign(({ event }) => ({ resolution: exception('internal-error', errorText(event.error)) })),
                },
              },
              on: {
                CANCEL: { target: '#task.cleanup', actions: { type: 'stopFor', params: { reason: 'canceled' } } },
                CLAIM_LOST: {
                  target: '#task.cleanup',
                  actions: { type: 'stopFor', params: ({ event }) => ({ reason: 'claim-lost', detail: event.message }) },
                },
                ABORT: ignored('the upload finishes; the shutdown deadline bounds it'),
                MAX_RUN_TIME: ignored('the command has ended'),
                INTERNAL_ERROR: ignored('the upload stage decides the resolution'),
              },
            },
            reporting: {
              description: 'Report the resolution to the queue, once.',
              invoke: {
                src: 'report',
                input: ({ context }) => ({ claim: context.claim, resolution: context.resolution! }),
                onDone: { target: '#task.cleanup', actions: assign({ reported: true }) },
                onError: {
                  target: '#task.cleanup',
                  actions: assign(({ event }) => ({ detail: `the queue refused the report: ${errorText(event.error)}` })),
                },
              },
              on: {
                CANCEL: ignored('the report decides: the queue refuses it for a canceled run'),
                CLAIM_LOST: ignored('the report decides: the queue refuses it for a run it no longer holds for us'),
                ABORT: ignored('the report is one call; the shutdown deadline bounds it'),
                MAX_RUN_TIME: ignored('the command has ended'),
                INTERNAL_ERROR: ignored('the resolution is decided'),
              },
            },
          },
        },
      },
    },
    cleanup: {
      description: 'Dispose the sandbox, plugins and task directory; exactly once on every path.',
      invoke: {
        src: 'cleanup',
        // Nothing changes the outcome once here (every event is ignored): it is the output's.
        input: ({ context }) => ({ claim: context.claim, resolution: context.resolution, ...unreportedOf(context) }),
        onDone: { target: 'done' },
        onError: { target: 'done' },
      },
      on: {
        CANCEL: ignored('cleaning up already'),
        CLAIM_LOST: ignored('cleaning up already'),
        ABORT: ignored('cleaning up already'),
        MAX_RUN_TIME: ignored('cleaning up already'),
        INTERNAL_ERROR: ignored('cleanup reports its own errors'),
      },
    },
    done: { type: 'final' },
  },
  output: ({ context }) => ({
    claim: context.claim,
    resolution: context.reported ? context.resolution : undefined,
    unreported: unreportedOf(context).unreported,
    detail: context.detail,
  }),
});

/** Why the run ends without a resolution from this worker (none when the queue took one), and the detail. */
function unreportedOf(context: TaskContext): { unreported: TaskOutput['unreported']; detail: string | undefined } {
  const unreported = context.reported
    ? undefined
    : context.stopReason === 'canceled'
      ? 'canceled'
      : context.stopReason === 'claim-lost'
        ? 'claim-lost'
        : 'report-refused';
  return { unreported, detail: context.detail };
}

/** The resolution a stopped command gets, when the run is still ours to resolve. */
function stopResolution(context: TaskContext): Resolution {
  switch (context.stopReason) {
    case 'max-run-time':
      return { state: 'failed', message: context.detail ?? 'maxRunTime exceeded' };
    case 'worker-shutdown':
      return exception('worker-shutdown', context.detail ?? 'the worker shut down while the task ran');
    default:
      return exception('internal-error', context.detail ?? 'the run was stopped');
  }
}
