/**
 * The models of drover's own machines, checked by test/model-check-machines.test.ts:
 * each says which events the world may send, how the machine's actors may
 * finish, what of the context the guards read, and the invariants the
 * machine must keep. Adding a machine to src/machines means adding its
 * model to MACHINE_MODELS (a test fails until it is there); the diagram
 * command and docs/machines.md take their list from here too.
 */
import type { SnapshotFrom } from 'xstate';
import { instanceMachine, type InstanceInput, type LaunchFailure } from '../machines/instance.js';
import { taskMachine, type TaskContext, type TaskOutput } from '../machines/task.js';
import { TASK_ACTOR_PREFIX, workerMachine, type ClaimRequest, type ClaimResult, type WorkerInput } from '../machines/worker.js';
import { ClaimLostError, MalformedPayloadError, ResourceUnavailableError } from '../model/errors.js';
import { describeResolution, type Resolution } from '../model/resolution.js';
import { runKey, type Claim, type RunResult } from '../model/task.js';
import { violated, type MachineModel, type PathInvariant } from './model-check.js';

function modelClaim(taskId: string): Claim {
  return { taskId, runId: 0, workerId: 'model', payload: {}, deadline: 3_600_000, takenUntil: 30_000, retriesLeft: 0 };
}

// ---- task --------------------------------------------------------------

const CLAIM = modelClaim('T');
const exit = (exitCode: number): RunResult => ({ exitCode, signal: null, durationMs: 1000 });

/**
 * What the upload stage resolves, as the runtime decides it: a resolution
 * decided earlier stands; otherwise the exit code judges (no plugin objects
 * in the model); no result at all is an internal error.
 */
export function expectedUploadResolution(context: TaskContext): Resolution {
  if (context.resolution !== undefined) return context.resolution;
  if (context.result === undefined) return { state: 'exception', reason: 'internal-error', message: 'the run ended without a result' };
  return context.result.exitCode === 0 ? { state: 'completed' } : { state: 'failed', message: `exit code ${context.result.exitCode}` };
}

type TaskSnapshot = SnapshotFrom<typeof taskMachine>;

export const taskInvariants = {
  cleanupOnce: {
    name: 'cleanup is entered exactly once on every path from claimed to done',
    initial: 0,
    step(count: number, step) {
      const entries = count + step.entered.filter((id) => id === 'task.cleanup').length;
      return entries > 1 ? violated('cleanup is entered a second time') : entries;
    },
    atEnd: (count: number) => (count === 1 ? undefined : 'done is reached without entering cleanup'),
  } satisfies PathInvariant<number>,

  reportOnce: {
    name: 'the resolution is reported at most once, and exactly once unless the claim was lost or the task canceled',
    initial: { reports: 0, gone: false },
    step(state: { reports: number; gone: boolean }, step) {
      const report = step.completed?.src === 'report' ? step.completed.outcome : undefined;
      // A refused report is the queue saying the run is no longer ours: the claim is lost.
      const gone = state.gone || step.event.type === 'CANCEL' || step.event.type === 'CLAIM_LOST' || report === 'error';
      const reports = state.reports + (report === 'done' ? 1 : 0);
      return reports > 1 ? violated('the resolution is reported a second time') : { reports, gone };
    },
    atEnd: ({ reports, gone }: { reports: number; gone: boolean }) =>
      reports === 1 || gone ? undefined : 'done is reached without reporting, though the claim was neither lost nor the task canceled',
  } satisfies PathInvariant<{ reports: number; gone: boolean }>,

  noUploadAfterLoss: {
    name: 'nothing is uploaded after the claim is lost or the task canceled',
    initial: false,
    step(gone: boolean, step) {
      const now = gone || step.event.type === 'CLAIM_LOST' || step.event.type === 'CANCEL';
      return now && step.entered.includes('task.claimed.uploading.artifacts')
        ? violated(`uploading.artifacts is entered after ${gone ? 'the run was gone' : step.event.type}`)
        : now;
    },
  } satisfies PathInvariant<boolean>,
};

export const taskModel: MachineModel<typeof taskMachine> = {
  name: 'task',
  machine: taskMachine,
  inputs: [{ claim: CLAIM }],
  events: {
    CANCEL: { type: 'CANCEL' },
    CLAIM_LOST: { type: 'CLAIM_LOST', message: 'claim expired' },
    ABORT: { type: 'ABORT' },
    MAX_RUN_TIME: { type: 'MAX_RUN_TIME' },
    INTERNAL_ERROR: { type: 'INTERNAL_ERROR', message: 'a plugin watcher died' },
  },
  actors: {
    // The reclaimer only sends events; that it may fail at any time over-approximates the real one (which fails only as it starts).
    reclaim: { done: {}, errors: { 'cannot renew': new Error('database is closed') } },
    load: {
      done: { '': { maxRunTimeMs: undefined }, 'maxRunTime 5 s': { maxRunTimeMs: 5000 } },
      errors: {
        'malformed payload': new MalformedPayloadError([{ path: 'payload.command', message: 'is required' }]),
        'resource unavailable': new ResourceUnavailableError('no such cache'),
        internal: new Error('mkdir: EACCES'),
      },
    },
    run: { done: { 'exit 0': exit(0), 'exit 1': exit(1) }, errors: { '': new Error('the sandbox would not start') } },
    stop: { errors: { '': new Error('kill: EPERM') } },
    upload: { done: ({ snapshot }) => ({ '': expectedUploadResolution(snapshot.context) }), errors: { '': new Error('artifact store unreachable') } },
    report: { errors: { refused: new ClaimLostError(CLAIM, 'resolved', 'held by worker w2') } },
    cleanup: { errors: { '': new Error('rm: EBUSY') } },
  },
  // The guards read whether maxRunTime is known and why the command was stopped; the
  // result and resolution are kept too (they are bounded) so paths differ by how they end.
  abstract: (snapshot: TaskSnapshot) => {
    const { context } = snapshot;
    return {
      maxRunTime: context.maxRunTimeMs !== undefined,
      stopReason: context.stopReason,
      exit: context.result?.exitCode,
      resolution: context.resolution === undefined ? undefined : describeResolution(context.resolution),
      reported: context.reported,
    };
  },
  invariants: [taskInvariants.cleanupOnce, taskInvariants.reportOnce, taskInvariants.noUploadAfterLoss],
  leadsTo: [{ name: 'ABORT in any state leads to done (a shutting-down worker can always finish)', after: ['ABORT'] }],
};

// ---- worker ------------------------------------------------------------

/** Capacity 2: claims come from two slots, so task actor ids repeat and the explored state stays finite. */
const SLOTS = ['A', 'B'] as const;
const BASE_INPUT: WorkerInput = { capacity: 2, maxTasks: 0, once: false, idleTimeoutMs: 0, shutdownGraceMs: 30_000, pollWaitMs: 10_000 };
type WorkerSnapshot = SnapshotFrom<typeof workerMachine>;

export const workerInvariants = {
  noClaimAfterShutdown: {
    name: 'no claim is made after shuttingDown is entered',
    initial: false,
    step(down: boolean, step) {
      let shuttingDown = down;
      for (const happening of step.log) {
        if (happening.kind === 'enter' && happening.id === 'worker.shuttingDown') shuttingDown = true;
        if (!shuttingDown) continue;
        if (happening.kind === 'start' && happening.src === 'claimWork') return violated('claimWork is invoked after shuttingDown was entered');
        if (happening.kind === 'enter' && happening.id === 'worker.claiming.polling') return violated('claiming.polling is entered after shuttingDown was entered');
      }
      return shuttingDown;
    },
  } satisfies PathInvariant<boolean>,

  tasksEndBeforeStopped: {
    name: 'stopped is reached only after every spawned task actor has ended',
    initial: [] as string[],
    step(live: string[], step) {
      // A task actor ends with done, or fails (which the worker turns into a fatal shutdown).
      let running = live.filter((id) => id !== step.completed?.id);
      for (const happening of step.log) {
        if (happening.kind === 'start' && happening.src === 'task') running = [...running, happening.id];
        if (happening.kind === 'enter' && happening.id === 'worker.stopped' && running.length > 0) {
          return violated(`stopped is entered while task actor${running.length === 1 ? '' : 's'} ${running.join(', ')} still run${running.length === 1 ? 's' : ''}`);
        }
      }
      return [...new Set(running)].sort();
    },
  } satisfies PathInvariant<string[]>,
};

export const workerModel: MachineModel<typeof workerMachine> = {
  name: 'worker',
  machine: workerMachine,
  // Inputs that make every guard go both ways: --once, numberOfTasksToRun, idleTimeout.
  inputs: [BASE_INPUT, { ...BASE_INPUT, once: true }, { ...BASE_INPUT, maxTasks: 3, idleTimeoutMs: 60_000 }],
  events: {
    'SHUTDOWN (signal)': { type: 'SHUTDOWN', reason: { kind: 'signal', signal: 'SIGTERM' } },
    'SHUTDOWN (host)': { type: 'SHUTDOWN', reason: { kind: 'host', message: 'spot interruption' } },
    FATAL: { type: 'FATAL', message: 'the host is gone' },
  },
  actors: {
    claimWork: {
      done: ({ snapshot, input, children }) => {
        const { context } = snapshot as WorkerSnapshot;
        const busy = new Set(children.filter((child) => child.src === 'task').map((child) => child.id));
        const free = SLOTS.map(modelClaim).filter((claim) => !busy.has(TASK_ACTOR_PREFIX + runKey(claim)));
        // Times relative to when the worker became idle, so that the abstraction need not keep the clock.
        const now = context.idleSince ?? 0;
        const outcomes: Record<string, ClaimResult> = { nothing: { claims: [], now } };
        if (context.idleTimeoutMs > 0 && context.idleSince !== undefined) outcomes['nothing, idle timeout passed'] = { claims: [], now: now + context.idleTimeoutMs };
        const count = Math.min((input as ClaimRequest).count, free.length);
        for (let n = 1; n <= count; n++) outcomes[`${n} claim${n === 1 ? '' : 's'}`] = { claims: free.slice(0, n), now };
        return outcomes;
      },
      errors: { 'queue unreachable': new Error('connection refused') },
    },
    task: {
      done: ({ id }) => ({ '': { claim: modelClaim(id), resolution: { state: 'completed' } } satisfies TaskOutput }),
      errors: { '': new Error('the task machine failed') },
    },
    boot: { errors: { '': new Error('no such host') } },
    dispose: { errors: { '': new Error('host dispose failed') } },
  },
  abstract: (snapshot: WorkerSnapshot) => {
    const { context } = snapshot;
    return {
      running: [...context.running].sort(),
      // Only the task limit reads the count, and only up to the limit.
      claimed: context.maxTasks > 0 ? Math.min(context.claimed, context.maxTasks) : 0,
      idle: context.idleSince !== undefined,
      reason: context.reason?.kind,
    };
  },
  invariants: [workerInvariants.noClaimAfterShutdown, workerInvariants.tasksEndBeforeStopped],
  deadTransitions: {
    'worker.claiming always':
      'claimed only grows in polling, and spawning, which always follows, checks the task limit before claiming\'s own always can: a guard kept for safety',
  },
  leadsTo: [
    { name: 'a shutdown signal in any state leads to stopped', after: ['SHUTDOWN'] },
    { name: 'a fatal error in any state leads to stopped', after: ['FATAL'] },
  ],
};

// ---- instance ----------------------------------------------------------

const INSTANCE_INPUT: InstanceInput = {
  bootTimeoutMs: 300_000, sshTimeoutMs: 120_000, drainTimeoutMs: 30_000,
  terminateAttempts: 3, terminateBackoffMs: 1000, terminateMaxBackoffMs: 300_000,
};
type InstanceSnapshot = SnapshotFrom<typeof instanceMachine>;
/** At most this many tasks at once in the model: enough for "busy" to go up and down. */
const MODEL_TASKS = 2;

interface NoLeakState {
  /** The launch returned an instance id. */
  readonly launched: boolean;
  /** The launch failed without saying whether an instance was made. */
  readonly unknownLaunch: boolean;
  readonly terminated: boolean;
  /** Failed terminate calls, capped at the attempts + 1. */
  readonly failures: number;
}

export const instanceInvariants = {
  noLeak: {
    name: 'every requested instance ends terminated (after a terminate call succeeded, or a launch the cloud refused) or leaked (only after every terminate attempt failed, or a launch of unknown outcome) and handed to the watchdog',
    initial: { launched: false, unknownLaunch: false, terminated: false, failures: 0 },
    step(state: NoLeakState, step) {
      const done = step.completed;
      const attempts = (step.snapshot.context as InstanceInput).terminateAttempts;
      return {
        launched: state.launched || (done?.src === 'launch' && done.outcome === 'done'),
        unknownLaunch: state.unknownLaunch || (done?.src === 'launch' && done.outcome === 'error' && (step.event as { error?: Partial<LaunchFailure> }).error?.nothingLaunched !== true),
        terminated: state.terminated || (done?.src === 'terminate' && done.outcome === 'done'),
        failures: Math.min(attempts + 1, state.failures + (done?.src === 'terminate' && done.outcome === 'error' ? 1 : 0)),
      };
    },
    atEnd(state: NoLeakState, snapshot) {
      const attempts = (snapshot.context as InstanceInput).terminateAttempts;
      if (snapshot.value === 'terminated') {
        if (state.launched && !state.terminated) return 'terminated is reached though no terminate call for the launched instance succeeded';
        if (!state.launched && state.unknownLaunch) return 'terminated is reached after a launch of unknown outcome: the instance may run on';
        return undefined;
      }
      if (snapshot.value === 'leaked') {
        if (state.launched && state.failures < attempts) return `leaked is reached after ${state.failures} failed terminate call${state.failures === 1 ? '' : 's'}, with ${attempts - state.failures} attempt${attempts - state.failures === 1 ? '' : 's'} left`;
        if (!state.launched && !state.unknownLaunch) return 'leaked is reached though the cloud refused the launch (nothing to leak)';
        return undefined;
      }
      return `the machine ended in ${JSON.stringify(snapshot.value)}, neither terminated nor leaked`;
    },
  } satisfies PathInvariant<NoLeakState>,

  idleScaleIn: {
    name: 'terminate is never called while tasks run on the instance, unless a disposal\'s drain timeout passed',
    initial: false,
    step(forced: boolean, step) {
      const now = forced || step.event.type.includes('drainTimeout');
      const busy = (step.snapshot.context as { busy: number }).busy;
      if (!now && busy > 0 && step.started.some((child) => child.src === 'terminate')) return violated(`terminate is called while ${busy} task${busy === 1 ? '' : 's'} run on the instance`);
      return now;
    },
  } satisfies PathInvariant<boolean>,

  disposedNeverReady: {
    name: 'an instance disposed (or scaled in) before it was ready never becomes ready: a disposal during the launch is kept',
    initial: 'before' as 'before' | 'disposed' | 'ready',
    step(state: 'before' | 'disposed' | 'ready', step) {
      if (state === 'disposed' && step.entered.includes('instance.ready')) return violated('ready is entered after a DISPOSE or SCALE_IN that came before it');
      if (state === 'before' && step.entered.includes('instance.ready')) return 'ready';
      if (state === 'before' && (step.event.type === 'DISPOSE' || step.event.type === 'SCALE_IN')) return 'disposed';
      return state;
    },
  } satisfies PathInvariant<'before' | 'disposed' | 'ready'>,
};

export const instanceModel: MachineModel<typeof instanceMachine> = {
  name: 'instance',
  machine: instanceMachine,
  inputs: [INSTANCE_INPUT],
  // Tasks start only up to MODEL_TASKS at once (more add nothing but states).
  events: (snapshot: InstanceSnapshot) => ({
    SCALE_IN: { type: 'SCALE_IN' },
    DISPOSE: { type: 'DISPOSE' },
    ...(snapshot.context.busy < MODEL_TASKS ? { TASK_STARTED: { type: 'TASK_STARTED' as const } } : {}),
    TASK_FINISHED: { type: 'TASK_FINISHED' },
  }),
  actors: {
    launch: {
      done: { '': { id: 'i-1' } },
      errors: {
        refused: Object.assign(new Error('InvalidAMIID.NotFound'), { nothingLaunched: true }),
        'unknown outcome': Object.assign(new Error('no answer within 30000 ms'), { nothingLaunched: false }),
      },
    },
    waitRunning: { done: { '': { id: 'i-1', address: 'ec2-user@192.0.2.1:22' } }, errors: { '': new Error('the instance is terminated, not running') } },
    probeSsh: { errors: { '': new Error('connection refused') } },
    terminate: { errors: { '': new Error('RequestLimitExceeded') } },
  },
  abstract: (snapshot: InstanceSnapshot) => {
    const { context } = snapshot;
    return { launched: context.instanceId !== undefined, busy: context.busy, disposing: context.disposing, failures: context.terminateFailures, outcome: context.outcome };
  },
  invariants: [instanceInvariants.noLeak, instanceInvariants.idleScaleIn, instanceInvariants.disposedNeverReady],
  leadsTo: [{ name: 'DISPOSE in any state leads to terminated or leaked (a session can always end)', after: ['DISPOSE'] }],
};

/** Every machine of src/machines, with its model. */
export const MACHINE_MODELS: readonly MachineModel<any>[] = [taskModel, workerModel, instanceModel];

