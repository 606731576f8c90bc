/**
 * The instance machine: one cloud instance drover launches, from the
 * request to its end.
 *
 *   requested ── booting ── ready ── draining ── terminating ─┬─ terminated
 *                (starting,                     (calling ⇄    └─ leaked
 *                 connecting)                    waiting)
 *
 * - requested: the launch call runs; it cannot be taken back, so a DISPOSE
 *   here is remembered and honoured as soon as the launch returns.
 * - booting.starting: wait until the cloud says it runs (bootTimeout);
 *   booting.connecting: until it answers over SSH (sshTimeout). Either
 *   failing or timing out terminates it.
 * - ready: an SSH host; TASK_STARTED / TASK_FINISHED count its tasks.
 * - draining: SCALE_IN or DISPOSE took it out of placement; it is
 *   terminated once no task runs on it. Only an idle instance is ever
 *   terminated, except after a DISPOSE whose drainTimeout passed (the
 *   session is over: its tasks are aborted and re-run elsewhere).
 * - terminating: the terminate call, retried after a pause that doubles
 *   (terminateBackoff) up to `terminateAttempts` calls in all.
 * - terminated: the cloud accepted the terminate, or refused the launch
 *   outright (nothing was made).
 * - leaked: every terminate attempt failed, or the launch failed in a way
 *   that leaves unknown whether an instance was made. The runtime hands a
 *   leaked instance with an id to the watchdog (src/cloud/watchdog.ts),
 *   which goes on terminating it; one without (an unknown launch outcome)
 *   is found by its tags, as a leftover of its closed session, by the
 *   final sweep at the end of a batch.
 *
 * The no-leak invariant, model-checked (src/testing/machine-models.ts):
 * every path ends in terminated or leaked; terminated only after a
 * terminate call succeeded for the launched instance (or no instance was
 * made); leaked only after terminateAttempts failed calls, or an
 * unknown launch outcome. The runtime provides the actors
 * (src/cloud/instance-runtime.ts).
 */
import { assign, fromPromise, setup } from 'xstate';
import { ignored } from './task.js';

export interface InstanceInput {
  /** From launch to running. */
  readonly bootTimeoutMs: number;
  /** From running to answering over SSH. */
  readonly sshTimeoutMs: number;
  /** After a DISPOSE, how long tasks still running may finish before the instance goes anyway. */
  readonly drainTimeoutMs: number;
  /** Terminate calls in all before the instance is reported leaked; at least 1. */
  readonly terminateAttempts: number;
  /** First pause between terminate calls; doubles up to terminateMaxBackoffMs. */
  readonly terminateBackoffMs: number;
  readonly terminateMaxBackoffMs: number;
}

/** What the launch actor resolves with. */
export interface LaunchedInstance {
  readonly id: string;
}
/** What waitRunning resolves with: where SSH finds it. */
export interface RunningInstance {
  readonly id: string;
  /** `user@host:port`. */
  readonly address: string;
}
/** A launch error says whether the cloud refused it outright (nothing was made) or the outcome is unknown. */
export interface LaunchFailure {
  readonly nothingLaunched: boolean;
}

export interface InstanceContext extends InstanceInput {
  readonly instanceId?: string;
  readonly address?: string;
  /** Tasks running on it now. */
  readonly busy: number;
  /** The session is over: terminate as soon as possible (after a bounded drain). */
  readonly disposing: boolean;
  readonly terminateFailures: number;
  /** Why it is being terminated, or why it leaked. */
  readonly reason?: string;
  /** Set by the final state. */
  readonly outcome?: 'terminated' | 'leaked';
}

export type InstanceEvent =
  /** Fewer instances are wanted: take this one out once idle. */
  | { type: 'SCALE_IN' }
  /** The session is over (or interrupted): terminate it, after a bounded drain. */
  | { type: 'DISPOSE' }
  | { type: 'TASK_STARTED' }
  | { type: 'TASK_FINISHED' };

export interface InstanceOutput {
  readonly outcome: 'terminated' | 'leaked';
  /** Undefined when no instance id was ever known. */
  readonly instanceId?: string;
  readonly reason: string;
}

function notProvided(name: string): never {
  throw new Error(`instance machine: actor "${name}" was not provided`);
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A transition to terminating that notes why (the first reason stands). */
const toTerminating = (reason: string) => ({ target: '#instance.terminating', actions: { type: 'noteReason', params: { reason } } }) as const;

export const instanceMachine = setup({
  types: {
    input: {} as InstanceInput,
    context: {} as InstanceContext,
    events: {} as InstanceEvent,
    output: {} as InstanceOutput,
  },
  actors: {
    /** Ask the cloud for the instance (idempotent: retried calls make no second one). */
    launch: fromPromise<LaunchedInstance, void>(async () => notProvided('launch')),
    /** Resolve once the cloud says it runs, with its SSH address. */
    waitRunning: fromPromise<RunningInstance, { id: string }>(async () => notProvided('waitRunning')),
    /** Resolve once it answers over SSH (retrying until aborted). */
    probeSsh: fromPromise<void, { id: string; address: string }>(async () => notProvided('probeSsh')),
    /** One terminate call (the provider retries throttling inside it). */
    terminate: fromPromise<void, { id: string }>(async () => notProvided('terminate')),
  },
  guards: {
    disposing: ({ context }) => context.disposing,
    idle: ({ context }) => context.busy === 0,
    attemptsLeft: ({ context }) => context.terminateFailures + 1 < context.terminateAttempts,
  },
  delays: {
    bootTimeout: ({ context }) => context.bootTimeoutMs,
    sshTimeout: ({ context }) => context.sshTimeoutMs,
    drainTimeout: ({ context }) => context.drainTimeoutMs,
    terminateBackoff: ({ context }) => Math.min(context.terminateMaxBackoffMs, context.terminateBackoffMs * 2 ** Math.min(context.terminateFailures - 1, 30)),
  },
  actions: {
    countStart: assign({ busy: ({ context }) => context.busy + 1 }),
    countFinish: assign({ busy: ({ context }) => Math.max(0, context.busy - 1) }),
    noteDispose: assign({ disposing: true }),
    noteReason: assign(({ context }, params: { reason: string }) => ({ reason: context.reason ?? params.reason })),
  },
}).createMachine({
  id: 'instance',
  context: ({ input }) => ({ ...input, busy: 0, disposing: false, terminateFailures: 0 }),
  initial: 'requested',
  states: {
    requested: {
      invoke: {
        src: 'launch',
        onDone: [
          { guard: 'disposing', target: 'terminating', actions: assign({ instanceId: ({ event }) => event.output.id, reason: 'disposed while launching' }) },
          { target: 'booting', actions: assign({ instanceId: ({ event }) => event.output.id }) },
        ],
        onError: [
          {
            guard: ({ event }) => (event.error as Partial<LaunchFailure> | undefined)?.nothingLaunched === true,
            target: 'terminated',
            actions: assign({ reason: ({ event }) => `the cloud refused the launch: ${errorText(event.error)}` }),
          },
          { target: 'leaked', actions: assign({ reason: ({ event }) => `the launch failed, and may have made an instance: ${errorText(event.error)}` }) },
        ],
      },
      on: {
        // The launch cannot be taken back: remember, and terminate once it returns.
        SCALE_IN: { actions: 'noteDispose' },
        DISPOSE: { actions: 'noteDispose' },
        TASK_STARTED: ignored('not an SSH host yet: no task runs on it'),
        TASK_FINISHED: ignored('not an SSH host yet: no task runs on it'),
      },
    },
    booting: {
      initial: 'starting',
      states: {
        starting: {
          invoke: {
            src: 'waitRunning',
            input: ({ context }) => ({ id: context.instanceId! }),
            onDone: { target: 'connecting', actions: assign({ address: ({ event }) => event.output.address }) },
            onError: toTerminating('it did not start'),
          },
          after: { bootTimeout: toTerminating('it did not start in time (bootTimeout)') },
        },
        connecting: {
          invoke: {
            src: 'probeSsh',
            input: ({ context }) => ({ id: context.instanceId!, address: context.address! }),
            onDone: '#instance.ready',
            onError: toTerminating('it did not answer over SSH'),
          },
          after: { sshTimeout: toTerminating('it did not answer over SSH in time (sshTimeout)') },
        },
      },
      on: {
        SCALE_IN: toTerminating('scaled in while booting'),
        DISPOSE: toTerminating('disposed while booting'),
        TASK_STARTED: ignored('not an SSH host yet: no task runs on it'),
        TASK_FINISHED: ignored('not an SSH host yet: no task runs on it'),
      },
    },
    ready: {
      description: 'An SSH host: tasks are placed on it.',
      on: {
        TASK_STARTED: { actions: 'countStart' },
        TASK_FINISHED: { actions: 'countFinish' },
        SCALE_IN: { target: 'draining', actions: assign({ reason: 'scaled in' }) },
        DISPOSE: { target: 'draining', actions: ['noteDispose', assign({ reason: 'the session is over' })] },
      },
    },
    draining: {
      description: 'Out of placement; terminated once idle (or, when disposing, after drainTimeout).',
      always: { guard: 'idle', target: 'terminating' },
      after: { drainTimeout: { guard: 'disposing', ...toTerminating('tasks were still running after drainTimeout') } },
      on: {
        TASK_STARTED: { actions: 'countStart' },
        TASK_FINISHED: { actions: 'countFinish' },
        SCALE_IN: ignored('draining already'),
        // The drain becomes bounded from now on.
        DISPOSE: { target: 'draining', reenter: true, actions: ['noteDispose', assign({ reason: 'the session is over' })] },
      },
    },
    terminating: {
      initial: 'calling',
      states: {
        calling: {
          invoke: {
            src: 'terminate',
            input: ({ context }) => ({ id: context.instanceId! }),
            onDone: '#instance.terminated',
            onError: [
              { guard: 'attemptsLeft', target: 'waiting', actions: assign({ terminateFailures: ({ context }) => context.terminateFailures + 1 }) },
              {
                target: '#instance.leaked',
                actions: assign({
                  terminateFailures: ({ context }) => context.terminateFailures + 1,
                  reason: ({ context, event }) => `${context.terminateAttempts} terminate calls failed, the last: ${errorText(event.error)}`,
                }),
              },
            ],
          },
        },
        waiting: {
          description: 'A pause that doubles with each failed call.',
          after: { terminateBackoff: 'calling' },
        },
      },
      on: {
        SCALE_IN: ignored('terminating already'),
        DISPOSE: ignored('terminating already'),
        TASK_STARTED: ignored('terminating: its tasks are lost'),
        TASK_FINISHED: ignored('terminating: its tasks are lost'),
      },
    },
    terminated: { type: 'final', entry: assign({ outcome: 'terminated' as const }) },
    leaked: { type: 'final', entry: assign({ outcome: 'leaked' as const }) },
  },
  output: ({ context }) => ({
    outcome: context.outcome ?? 'leaked',
    ...(context.instanceId === undefined ? {} : { instanceId: context.instanceId }),
    reason: context.reason ?? 'terminated',
  }),
});
