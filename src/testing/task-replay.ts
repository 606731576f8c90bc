/**
 * Model-based testing of the task runner: replays a path the model checker
 * found (a sequence of events: actors finishing, delays passing, the world's
 * events) against the real runner (createTaskActors, the mock engine, an
 * in-memory queue, real plugin objects), making the real parts produce each
 * event in turn, and compares what the real run did with what the model
 * says: the states it visited, the transitions it took, the plugin hooks it
 * called, and how it ended.
 *
 * Each actor of the run is held at a point of its own until the path says
 * how it finishes (a gate): `load` in the engine's prepare, `run` in a
 * probe plugin's `started` hook, `stop` in the engine's abort, `upload` in
 * the probe's `stopped` or `exception` hook, `report` in the queue's resolve,
 * `cleanup` in the probe's `dispose`. The world's events come from where the
 * runtime gets them: a cancellation through the queue, a lost claim through
 * a reclaim the queue refuses, the maxRunTime delay through the machine's
 * clock; ABORT and INTERNAL_ERROR are sent as the worker would send them.
 *
 * Some model paths cannot happen with the real parts (the model lets the
 * reclaimer fail at any time, the runtime's fails only as it starts); those
 * are skipped, with the reason.
 */
import { SimulatedClock, type AnyMachineSnapshot, type InspectionEvent } from 'xstate';
import { MockEngine } from '../engines/mock.js';
import type { TaskContext, TaskOutput } from '../machines/task.js';
import { ClaimLostError } from '../model/errors.js';
import { describeResolution } from '../model/resolution.js';
import type { Payload } from '../model/task.js';
import { livelogPlugin } from '../plugins/livelog.js';
import { maxruntimePlugin } from '../plugins/maxruntime.js';
import type { Plugin } from '../plugins/plugin.js';
import { MemoryQueue } from '../queues/memory.js';
import { silentLogger, type Logger } from '../runtime/logger.js';
import { transitionKey } from './machine-config.js';
import { stateName, type ModelPath, type ModelStep } from './model-check.js';
import { startTaskRun } from './task-run.js';

export interface ReplayResult {
  readonly path: ModelPath;
  /** Why the real parts cannot produce this path; nothing was run. */
  readonly skipped?: string;
  /** What the real run did differently from the model, in words; empty when it matched. */
  readonly problems: readonly string[];
  /** The probe plugin's hooks, as called and as the plugin contract expects them. */
  readonly hooks: readonly string[];
  readonly expectedHooks: readonly string[];
  /** Transition keys the real run took. */
  readonly taken: readonly string[];
}

/** How long a replay waits for any one thing before it gives up: only a failing replay waits that long. */
const WAIT_MS = 10_000;
/** Short claims, so that the reclaimer asks often: a refused reclaim (a lost claim) comes within half a second. */
const CLAIM_TIMEOUT_MS = 1000;

type Gate = 'load' | 'run' | 'stop' | 'upload' | 'report' | 'cleanup';

/** Hold points: an actor's work waits at its gate until the driver lets it through, or makes it fail. */
class Gates {
  readonly #held = new Map<Gate, { resolve: () => void; reject: (error: unknown) => void }>();
  readonly #arrivals = new Map<Gate, (() => void)[]>();
  readonly #reached = new Set<Gate>();

  /** Called at the hold point: waits there; gives up if `signal` aborts (the actor was stopped). */
  wait(gate: Gate, signal?: AbortSignal): Promise<void> {
    this.#reached.add(gate);
    for (const arrived of this.#arrivals.get(gate) ?? []) arrived();
    this.#arrivals.delete(gate);
    return new Promise<void>((resolve, reject) => {
      if (signal?.aborted) return reject(new Error(`${gate} abandoned`));
      signal?.addEventListener('abort', () => reject(new Error(`${gate} abandoned`)), { once: true });
      this.#held.set(gate, { resolve, reject });
    });
  }

  /** Resolves once the gate's hold point has been reached. */
  reached(gate: Gate): Promise<void> {
    if (this.#reached.has(gate)) return Promise.resolve();
    return new Promise((resolve) => this.#arrivals.set(gate, [...(this.#arrivals.get(gate) ?? []), resolve]));
  }

  release(gate: Gate, error?: unknown): void {
    const held = this.#held.get(gate);
    this.#held.delete(gate);
    if (error === undefined) held?.resolve();
    else held?.reject(error);
  }

  /** Lets every work still held go on (after the comparison: what it does then is not the path's). */
  releaseAll(): void {
    for (const gate of [...this.#held.keys()]) this.release(gate);
  }
}

/** Which way the upload stage goes, by the context it starts with (as the runtime decides it). */
function uploadWay(context: TaskContext): 'result' | 'exception' | 'decided' {
  if (context.resolution?.state === 'exception') return 'exception';
  return context.result !== undefined && context.resolution === undefined ? 'result' : 'decided';
}

function contextAt(path: ModelPath, index: number): TaskContext {
  const snapshot: AnyMachineSnapshot = index === 0 ? path.start.facts.snapshot : path.steps[index - 1]!.facts.snapshot;
  return snapshot.context as TaskContext;
}

/**
 * The probe plugin's hooks the plugin contract expects on this path: its
 * prepare hooks when the load succeeds, `started` with the command, then
 * `stopped` and `finished` (a result) or `exception`, and `dispose` in cleanup.
 */
export function expectedHooks(path: ModelPath): string[] {
  const hooks: string[] = [];
  path.steps.forEach((step, i) => {
    const before = contextAt(path, i);
    if (step.actor?.src === 'load' && step.kind === 'done') hooks.push('prepare', 'buildSandbox');
    if (step.actor?.src === 'upload' && uploadWay(before) === 'result') hooks.push('finished');
    for (const id of step.facts.entered) {
      if (id === 'task.claimed.running.executing') hooks.push('started');
      if (id === 'task.cleanup') hooks.push('dispose');
      if (id === 'task.claimed.uploading.artifacts') {
        const way = uploadWay(step.facts.snapshot.context as TaskContext);
        // A run stopped for maxRunTime has a resolution (failed) but no result: the contract's `finished`.
        hooks.push(way === 'result' ? 'stopped' : way === 'exception' ? 'exception' : 'finished');
      }
    }
  });
  return hooks;
}

/** Why the real parts cannot produce the path, or undefined when they can. */
export function unrealizable(path: ModelPath): string | undefined {
  for (const [i, step] of path.steps.entries()) {
    if (step.actor?.src === 'reclaim' && i > 0) return 'the reclaimer fails only as it starts';
  }
  return undefined;
}

/** The payload that makes the mock engine do what the path needs: how the load and the command end. */
function payloadFor(path: ModelPath): Payload {
  const load = path.steps.find((step) => step.actor?.src === 'load' && step.kind === 'done');
  const run = path.steps.find((step) => step.actor?.src === 'run' && step.kind === 'done');
  const exitCode = (run?.event as { output?: { exitCode?: number } } | undefined)?.output?.exitCode ?? 0;
  const maxRunTimeMs = (load?.event as { output?: { maxRunTimeMs?: number } } | undefined)?.output?.maxRunTimeMs;
  return { mock: { exitCode }, ...(maxRunTimeMs !== undefined && { maxRunTime: maxRunTimeMs / 1000 }) };
}

/** What `promise` gives within WAIT_MS, or undefined; the timer goes either way. */
async function within<T>(promise: Promise<T>): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), WAIT_MS)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits, a few milliseconds at a time, until `predicate` holds; false after WAIT_MS. */
async function until(predicate: () => boolean): Promise<boolean> {
  const giveUpAt = Date.now() + WAIT_MS;
  while (!predicate()) {
    if (Date.now() > giveUpAt) return false;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return true;
}

const GATE_OF: Readonly<Record<string, Gate>> = {
  'claimed.loading': 'load',
  'claimed.running.executing': 'run',
  'claimed.running.stopping': 'stop',
  'claimed.uploading.artifacts': 'upload',
  'claimed.uploading.reporting': 'report',
  cleanup: 'cleanup',
};

/** Replays one model path against the real task runner; see the file comment. */
export async function replayTaskPath(path: ModelPath): Promise<ReplayResult> {
  const expected = expectedHooks(path);
  const skipped = unrealizable(path);
  if (skipped !== undefined) return { path, skipped, problems: [], hooks: [], expectedHooks: expected, taken: [] };

  const gates = new Gates();
  const hooks: string[] = [];
  // The reclaimer reports a loss once, and not at all when it could not start: later losses are sent directly.
  const world: World = { loseClaim: false, failUpload: false, reclaimerGone: path.steps[0]?.actor?.src === 'reclaim' };
  const clock = new SimulatedClock();
  const engine = new MockEngine({
    intercept: (point, run) => (point === 'prepare' ? gates.wait('load', run.signal) : point === 'abort' ? gates.wait('stop') : undefined),
  });
  // The queue's clock stands still: a claim never runs out by itself, however slow the machine
  // running the tests, so a claim is lost only when the path says so.
  const frozen = Date.now();
  const queue = new MemoryQueue({
    claimTimeoutMs: CLAIM_TIMEOUT_MS,
    now: () => frozen,
    hooks: {
      reclaim: (run) => {
        if (world.loseClaim) throw new ClaimLostError(run, 'claim-expired', 'the replay took the claim away');
      },
      resolve: () => gates.wait('report'),
      watchCancellation: () => {
        if (path.steps[0]?.actor?.src === 'reclaim') throw new Error('the replay broke the reclaimer');
      },
    },
  });
  // A log sink that breaks when the path wants the upload to fail: the one failure the upload stage lets through.
  const logger: Logger = {
    ...silentLogger,
    error: (msg, data) => {
      if (world.failUpload) throw new Error(`the log sink broke on: ${msg}`);
      silentLogger.error(msg, data);
    },
    child: () => logger,
  };
  const taken: string[] = [];
  const states: string[] = [];
  // Seen from the very start, before the run is handed back: only the task machine's own events.
  const inspect = (event: InspectionEvent) => {
    if (event.actorRef.sessionId !== event.rootId) return;
    if (event.type === '@xstate.microstep') for (const transition of event._transitions) taken.push(transitionKey(transition));
    if (event.type === '@xstate.snapshot') {
      const state = stateName((event.snapshot as AnyMachineSnapshot).value);
      if (states.at(-1) !== state) states.push(state);
    }
  };
  const run = await startTaskRun({
    payload: payloadFor(path), engine, queue, clock, logger, inspect,
    plugins: [livelogPlugin(), maxruntimePlugin(), probePlugin(hooks, gates), fragilePlugin(world)],
  });
  const now = () => stateName(run.actor.getSnapshot().value);

  const problems: string[] = [];
  const expectedTaken: string[] = [...path.start.facts.taken];
  let hooksAtEnd: string[] = [];
  let canceledInQueue = false;
  try {
    for (const [i, step] of path.steps.entries()) {
      const stateBefore = i === 0 ? path.start.state : path.steps[i - 1]!.state;
      const wait = async (what: string, predicate: () => boolean) => {
        if (!(await until(predicate))) throw new Error(`step ${i + 1} (${step.label}): timed out waiting for ${what}; the run is in ${now()}`);
      };
      // Before anything happens, the real run must be where the model is, its actor at its gate; but an
      // actor with no gate (the reclaimer failing as it starts) goes on by itself.
      const byItself = step.actor?.src === 'reclaim';
      if (!byItself) {
        await wait(stateBefore, () => now() === stateBefore);
        const gate = GATE_OF[stateBefore];
        if (gate !== undefined) await within(gates.reached(gate));
      }
      canceledInQueue = (await realize(step, path.steps.slice(i + 1), { run, gates, world, clock, canceledInQueue })) || canceledInQueue;
      expectedTaken.push(...step.facts.taken);
      await wait(`the transitions ${step.facts.taken.join(', ') || '(none)'}`, () => taken.length >= expectedTaken.length);
      world.failUpload = false;
      if (taken.slice(0, expectedTaken.length).join('\n') !== expectedTaken.join('\n')) {
        problems.push(`after step ${i + 1} (${step.label}) the run took [${taken.join(', ')}], the model [${expectedTaken.join(', ')}]`);
        break;
      }
    }
    // A run that already went another way may be held at a gate forever: no need to wait for its end.
    const output = problems.length > 0 ? undefined : await within(run.output);
    hooksAtEnd = [...hooks];
    if (problems.length === 0 && taken.join('\n') !== expectedTaken.join('\n')) {
      problems.push(`the run took [${taken.join(', ')}], the model [${expectedTaken.join(', ')}]`);
    }
    if (output === undefined) {
      if (problems.length === 0) problems.push(`the run did not end; it is in ${now()}`);
    } else {
      compareOutput(output, path.end.output as TaskOutput, problems);
      const expectedStates = [path.start.state, ...path.steps.map((step) => step.state)].filter((state, i, all) => i === 0 || all[i - 1] !== state);
      if (states.join(' ') !== expectedStates.join(' ')) problems.push(`the run visited ${states.join(' → ')}, the model ${expectedStates.join(' → ')}`);
      if (output.resolution !== undefined) {
        const recorded = (await queue.task(run.claim.taskId)).runs[run.claim.runId];
        const reason = output.resolution.state === 'exception' ? output.resolution.reason : output.resolution.state;
        if (recorded?.reasonResolved !== reason) problems.push(`the queue recorded ${recorded?.reasonResolved}, the run reported ${reason}`);
      }
    }
  } catch (error) {
    problems.push(error instanceof Error ? error.message : String(error));
  } finally {
    gates.releaseAll();
    await run.close();
    await queue.close();
  }
  return { path, problems, hooks: hooksAtEnd, expectedHooks: expected, taken };
}

/** What the driver has arranged for the real parts to do next. */
interface World {
  /** The queue refuses reclaims: the reclaimer reports a lost claim. */
  loseClaim: boolean;
  /** The fragile plugin's upload hooks fail, and so does the log sink the upload stage reports that to. */
  failUpload: boolean;
  /** The reclaimer has reported a loss, or never started: it sends nothing more. */
  reclaimerGone: boolean;
}

interface Driver {
  readonly run: Awaited<ReturnType<typeof startTaskRun>>;
  readonly gates: Gates;
  readonly world: World;
  readonly clock: SimulatedClock;
  readonly canceledInQueue: boolean;
}

/** Makes the real parts produce one event of the path; true when it canceled the run in the queue. */
async function realize(step: ModelStep, rest: readonly ModelStep[], driver: Driver): Promise<boolean> {
  const { run, gates, world, clock } = driver;
  const error = (step.event as { error?: unknown }).error;
  switch (step.kind) {
    case 'after':
      clock.increment(24 * 3_600_000);
      return false;
    case 'done':
    case 'error': {
      const src = step.actor!.src;
      if (src === 'reclaim') return false; // arranged before the start: the reclaimer could not begin
      if (src === 'upload' && step.kind === 'error') {
        world.failUpload = true;
        gates.release('upload');
        return false;
      }
      // A report to a queue that canceled the run fails by itself.
      if (src === 'report' && step.kind === 'error' && driver.canceledInQueue) {
        gates.release('report');
        return false;
      }
      gates.release(src as Gate, step.kind === 'error' ? error : undefined);
      return false;
    }
    case 'event': {
      // The queue's own events come through the reclaimer while it runs (in claimed), once.
      const value = run.actor.getSnapshot().value;
      const fromQueue = !world.reclaimerGone && typeof value === 'object' && 'claimed' in value;
      // A canceled run's report is refused: a path that has the queue take a report later gets its CANCEL directly.
      if (step.event.type === 'CANCEL' && fromQueue && !rest.some((later) => later.actor?.src === 'report' && later.kind === 'done')) {
        world.reclaimerGone = true;
        await run.queue.cancel(run.claim.taskId);
        return true;
      }
      if (step.event.type === 'CLAIM_LOST' && fromQueue) {
        world.reclaimerGone = true;
        world.loseClaim = true;
        return false;
      }
      run.actor.send(step.event as never);
      return false;
    }
  }
}

function compareOutput(actual: TaskOutput, model: TaskOutput, problems: string[]): void {
  const describe = (output: TaskOutput) =>
    output.resolution !== undefined ? `reported ${describeResolution(output.resolution)}` : `not reported (${output.unreported})`;
  if (describe(actual) !== describe(model)) problems.push(`the run ended ${describe(actual)}, the model ${describe(model)}`);
}

/** Records its hooks, and holds the run in those that stand for an actor's work. */
function probePlugin(hooks: string[], gates: Gates): Plugin {
  return {
    name: 'probe',
    newTask: () => {
      // The upload stage is held in its first hook: `stopped` after a result, else `finished` (maxRunTime) or `exception`.
      let stopped = false;
      return {
      prepare: async () => void hooks.push('prepare'),
      buildSandbox: async () => void hooks.push('buildSandbox'),
      started: async () => {
        hooks.push('started');
        await gates.wait('run');
      },
      stopped: async () => {
        hooks.push('stopped');
        stopped = true;
        await gates.wait('upload');
        return undefined;
      },
      finished: async () => {
        hooks.push('finished');
        if (!stopped) await gates.wait('upload');
      },
      exception: async () => {
        hooks.push('exception');
        await gates.wait('upload');
      },
      dispose: async () => {
        hooks.push('dispose');
        await gates.wait('cleanup');
      },
      };
    },
  };
}

/** Fails its upload hooks when the path wants the upload stage to fail. */
function fragilePlugin(world: { failUpload: boolean }): Plugin {
  const fail = async () => {
    if (world.failUpload) throw new Error('the artifact store refused the upload');
  };
  return { name: 'fragile', newTask: () => ({ finished: fail, exception: fail }) };
}
