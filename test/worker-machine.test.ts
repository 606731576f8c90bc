/**
 * The worker machine on its own: a fake queue (claimWork) that waits on a
 * SimulatedClock, fake boot and dispose, and a small fake task machine that
 * ends when the test says FINISH (or, if asked, when it is aborted). Every
 * delay (poll wait, claim backoff, shutdown grace) runs on the simulated clock.
 */
import t, { type Test } from 'tap';
import { assign, createActor, fromPromise, setup, SimulatedClock, waitFor, type AnyActorRef, type PromiseActorLogic } from 'xstate';
import type { TaskInput, TaskOutput, taskMachine } from '../src/machines/task.js';
import {
  TASK_ACTOR_PREFIX,
  workerMachine,
  type ClaimRequest,
  type ClaimResult,
  type ShutdownReason,
  type WorkerInput,
  type WorkerOutput,
} from '../src/machines/worker.js';
import type { Claim } from '../src/model/task.js';
import { runKey } from '../src/model/task.js';
import { PromiseFake, makeClaim, settle, stateName, until } from './helpers/fake-actors.js';

const WAIT = { timeout: 2000 } as const;
const SIGTERM: ShutdownReason = { kind: 'signal', signal: 'SIGTERM' };
const SIGINT: ShutdownReason = { kind: 'signal', signal: 'SIGINT' };

const DEFAULTS: WorkerInput = {
  capacity: 1,
  maxTasks: 0,
  once: false,
  idleTimeoutMs: 0,
  shutdownGraceMs: 10_000,
  pollWaitMs: 20_000,
};

function claims(n: number, from = 1): Claim[] {
  return Array.from({ length: n }, (_, i) => makeClaim(`T${from + i}`));
}

/**
 * What the fake tasks did: which are alive, the most alive at once, which were
 * aborted. Each fake task machine registers its own ref so the test can FINISH it.
 */
class Tasks {
  readonly alive = new Set<string>();
  readonly refs = new Map<string, AnyActorRef>();
  readonly aborted: string[] = [];
  readonly finished: string[] = [];
  /** Tasks whose machine throws on entry, so that the actor errors as soon as it is spawned. */
  readonly failOnStart = new Set<string>();
  maxAlive = 0;

  constructor(
    private readonly log: string[],
    /** Whether an ABORT ends a task at once, or the task winds down until FINISH. */
    readonly finishOnAbort: boolean,
  ) {}

  readonly machine = setup({
    types: {
      input: {} as TaskInput,
      context: {} as { claim: Claim; aborted: boolean },
      events: {} as { type: 'FINISH' } | { type: 'ABORT' },
      output: {} as TaskOutput,
    },
    actions: {
      started: ({ context, self }) => {
        const id = context.claim.taskId;
        if (this.failOnStart.has(id)) {
          this.log.push(`fail ${id}`);
          throw new Error(`task ${id} broke on entry`);
        }
        this.log.push(`start ${id}`);
        this.alive.add(id);
        this.refs.set(id, self);
        this.maxAlive = Math.max(this.maxAlive, this.alive.size);
      },
      aborted: ({ context }) => {
        this.log.push(`abort ${context.claim.taskId}`);
        this.aborted.push(context.claim.taskId);
      },
      finished: ({ context }) => {
        this.log.push(`finish ${context.claim.taskId}`);
        this.alive.delete(context.claim.taskId);
        this.finished.push(context.claim.taskId);
      },
    },
    guards: { finishOnAbort: () => this.finishOnAbort },
  }).createMachine({
    id: 'fake-task',
    context: ({ input }) => ({ claim: input.claim, aborted: false }),
    entry: 'started',
    initial: 'working',
    states: {
      working: {
        on: {
          FINISH: 'finished',
          ABORT: [
            { guard: 'finishOnAbort', target: 'finished', actions: ['aborted', assign({ aborted: true })] },
            { target: 'windingDown', actions: ['aborted', assign({ aborted: true })] },
          ],
        },
      },
      windingDown: { on: { FINISH: 'finished' } },
      finished: { type: 'final', entry: 'finished' },
    },
    output: ({ context }) => ({
      claim: context.claim,
      resolution: context.aborted ? { state: 'exception', reason: 'worker-shutdown' } : { state: 'completed' },
    }),
  });

  finish(taskId: string): void {
    const ref = this.refs.get(taskId);
    if (ref === undefined) throw new Error(`task ${taskId} never started`);
    ref.send({ type: 'FINISH' });
  }
}

/**
 * A queue holding `pending` claims: claimWork hands out up to `count` at once,
 * or waits `waitMs` on the simulated clock when it has none (returning at once
 * for waitMs 0). `failures` are thrown, one per call, before anything else.
 */
class FakeQueue {
  readonly calls: { count: number; waitMs: number; at: number; alive: number; signal: AbortSignal }[] = [];
  readonly failures: Error[] = [];
  readonly logic: PromiseActorLogic<ClaimResult, ClaimRequest>;

  constructor(
    readonly pending: Claim[],
    clock: SimulatedClock,
    log: string[],
    alive: () => number,
  ) {
    this.logic = fromPromise<ClaimResult, ClaimRequest>(({ input, signal }) => {
      log.push('claimWork');
      this.calls.push({ ...input, at: clock.now(), alive: alive(), signal });
      const failure = this.failures.shift();
      if (failure !== undefined) return Promise.reject(failure);
      const claims = this.pending.splice(0, input.count);
      if (claims.length > 0 || input.waitMs === 0) return Promise.resolve({ claims, now: clock.now() });
      return new Promise<ClaimResult>((resolve) => {
        const timer = clock.setTimeout(() => resolve({ claims: [], now: clock.now() }), input.waitMs);
        signal.addEventListener('abort', () => clock.clearTimeout(timer));
      });
    });
  }

  /** How many calls there have been, waiting (bounded) for the count to reach `n`. */
  async untilCalls(n: number): Promise<void> {
    await until(() => this.calls.length >= n, `claimWork call #${n}`);
  }
}

interface HarnessOptions {
  pending?: Claim[];
  finishOnAbort?: boolean;
  holdBoot?: boolean;
  /** Task ids whose task actor errors as soon as it is spawned. */
  failOnStart?: string[];
  /** Replaces the fake queue's claimWork (the FakeQueue then records nothing). */
  claimWork?: PromiseActorLogic<ClaimResult, ClaimRequest>;
}

function harness(t: Test, input: Partial<WorkerInput> = {}, options: HarnessOptions = {}) {
  const log: string[] = [];
  const clock = new SimulatedClock();
  const tasks = new Tasks(log, options.finishOnAbort ?? true);
  for (const id of options.failOnStart ?? []) tasks.failOnStart.add(id);
  const queue = new FakeQueue(options.pending ?? [], clock, log, () => tasks.alive.size);
  const boot = new PromiseFake<void, void>('boot', log, () => undefined);
  const dispose = new PromiseFake<{ reason: ShutdownReason }, void>('dispose', log, () => undefined);
  if (options.holdBoot) boot.hold();
  const machine = workerMachine.provide({
    actors: {
      boot: boot.logic,
      claimWork: options.claimWork ?? queue.logic,
      dispose: dispose.logic,
      // The fake's events and context differ from the real task machine's; the worker only spawns it,
      // sends it ABORT and reads its completion, which the fake does like the real one.
      task: tasks.machine as unknown as typeof taskMachine,
    },
  });
  const config: WorkerInput = { ...DEFAULTS, ...input };
  const actor = createActor(machine, { clock, input: config });
  const states: string[] = [];
  const errors: unknown[] = [];
  actor.subscribe({
    next: (snapshot) => {
      const state = stateName(snapshot.value);
      if (states.at(-1) !== state) {
        states.push(state);
        log.push(`@${state}`);
      }
    },
    error: (error) => errors.push(error),
  });
  t.teardown(() => actor.stop());
  actor.start();

  const state = () => stateName(actor.getSnapshot().value);
  const at = (name: string) => waitFor(actor, (s) => stateName(s.value) === name, WAIT);
  const stopped = async (): Promise<WorkerOutput> => {
    const snapshot = await waitFor(actor, (s) => s.status !== 'active', WAIT);
    t.equal(snapshot.status, 'done', 'the worker reaches stopped');
    t.same(errors, [], 'the worker never errors');
    return snapshot.output!;
  };
  /** The worker's own record of its running task actors. */
  const running = () => actor.getSnapshot().context.running;
  return { actor, clock, log, tasks, queue, boot, dispose, states, state, at, stopped, running, config };
}

t.test('task actors are named task.<taskId>/<runId>', async (t) => {
  const h = harness(t, { capacity: 2 }, { pending: claims(2) });
  await h.at('running');
  t.same(h.running(), [`${TASK_ACTOR_PREFIX}${runKey(makeClaim('T1'))}`, 'task.T2/0']);
  t.same(Object.keys(h.actor.getSnapshot().children).filter((id) => id.startsWith(TASK_ACTOR_PREFIX)).sort(), ['task.T1/0', 'task.T2/0']);
});

t.test('regression: a task actor that ended is no longer among the worker\'s children (memory, and spawn cost)', async (t) => {
  const h = harness(t, { capacity: 2 }, { pending: claims(6) });
  const children = () => Object.keys(h.actor.getSnapshot().children).filter((id) => id.startsWith(TASK_ACTOR_PREFIX)).sort();
  for (const [i, id] of ['T1', 'T2', 'T3', 'T4', 'T5'].entries()) {
    await until(() => h.tasks.alive.has(id), `${id} started`);
    h.tasks.finish(id);
    await h.queue.untilCalls(i + 2);
    await settle();
  }
  t.same(children(), ['task.T6/0'], 'only the running task is a child; the five that ended are gone');
  h.tasks.finish('T6');
  await until(() => h.running().length === 0, 'T6 forgotten');
  t.same(children(), [], 'no task child is left once every task ended');
});

t.test('capacity: never more tasks than slots; each claim asks for the free slots', async (t) => {
  const h = harness(t, { capacity: 2 }, { pending: claims(5) });
  await h.queue.untilCalls(1);
  await h.at('running');
  t.same(h.tasks.alive, new Set(['T1', 'T2']));
  for (const [i, id] of ['T1', 'T2', 'T3', 'T4'].entries()) {
    h.tasks.finish(id);
    await h.queue.untilCalls(i + 2);
    await settle();
    t.ok(h.tasks.alive.size <= 2, `at most 2 alive after ${id} finished`);
  }
  // T5 runs; the last poll waits for work that does not come.
  t.equal(h.state(), 'claiming.polling');
  t.same(h.tasks.alive, new Set(['T5']));
  h.tasks.finish('T5');
  await until(() => h.running().length === 0, 'T5 forgotten');
  t.equal(h.queue.calls.length, 5, 'a task ending while polling does not restart the poll');

  t.equal(h.tasks.maxAlive, 2, 'never more than 2 task actors alive');
  t.same(h.queue.calls.map((c) => c.count), [2, 1, 1, 1, 1]);
  for (const call of h.queue.calls) t.equal(call.count, 2 - call.alive, `count ${call.count} = free slots (${call.alive} alive)`);
  t.same(h.queue.calls.map((c) => c.waitMs), [20_000, 20_000, 20_000, 20_000, 20_000]);
  t.ok(h.states.includes('running'), 'waits in running while full');

  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  const output = await h.stopped();
  t.same(output, { reason: SIGTERM });
  t.equal(h.dispose.count, 1);
});

t.test('--once', async (t) => {
  t.test('an empty queue: drained at once, without waiting for work', async (t) => {
    const h = harness(t, { once: true, capacity: 2 });
    const output = await h.stopped();
    t.same(output, { reason: { kind: 'drained' } });
    t.same(h.queue.calls.map((c) => [c.count, c.waitMs]), [[2, 0]]);
    t.equal(h.clock.now(), 0, 'no time passed');
    t.same(h.dispose.last.input, { reason: { kind: 'drained' } });
  });

  t.test('drains the queue, then stops once it is empty and no task runs', async (t) => {
    const h = harness(t, { once: true, capacity: 2 }, { pending: claims(3) });
    await h.at('running');
    h.tasks.finish('T1');
    await h.queue.untilCalls(2); // claims T3
    await h.at('running');
    h.tasks.finish('T2');
    await h.queue.untilCalls(3); // nothing left, T3 still runs: wait for it without a long poll
    await settle();
    t.equal(h.state(), 'running');
    t.equal(h.actor.getSnapshot().status, 'active', 'not drained while a task runs');
    h.tasks.finish('T3');
    const output = await h.stopped();
    t.same(output, { reason: { kind: 'drained' } });
    t.same(
      h.queue.calls.map((c) => [c.count, c.waitMs]),
      [
        [2, 0],
        [1, 0],
        [1, 0],
        [2, 0],
      ],
      '--once never waits for work: it claims what is pending, else waits for a running task to end',
    );
    t.notOk(h.queue.calls.some((c) => c.signal.aborted), 'no poll was abandoned, so no claim can be dropped');
    t.equal(h.clock.now(), 0, 'no simulated time was needed');
    t.same(h.tasks.finished, ['T1', 'T2', 'T3']);
    t.same(h.tasks.aborted, []);
  });
});

t.test('maxTasks: stops after that many claims, letting them finish (no grace abort)', async (t) => {
  const h = harness(t, { capacity: 2, maxTasks: 3, shutdownGraceMs: 1000 }, { pending: claims(5) });
  await h.at('running');
  h.tasks.finish('T1');
  await h.at('shuttingDown.draining');
  t.same(h.queue.calls.map((c) => c.count), [2, 1], 'the last claim asks only for what the limit leaves');
  t.same(h.tasks.alive, new Set(['T2', 'T3']));
  h.clock.increment(1_000_000);
  await settle();
  t.equal(h.state(), 'shuttingDown.draining', 'still draining long after the grace period');
  t.same(h.tasks.aborted, [], 'no task is aborted');
  t.equal(h.dispose.count, 0);
  h.tasks.finish('T2');
  h.tasks.finish('T3');
  const output = await h.stopped();
  t.same(output, { reason: { kind: 'tasks-done' } });
  t.equal(h.queue.calls.length, 2, 'no claim after the limit');
  t.equal(h.queue.pending.length, 2, 'two runs left in the queue');
  t.equal(h.actor.getSnapshot().context.claimed, 3);
  t.ok(h.log.indexOf('dispose') > h.log.indexOf('finish T3'), 'disposed after the last task');
});

t.test('maxTasks reached in one claim goes straight to draining', async (t) => {
  const h = harness(t, { capacity: 4, maxTasks: 2 }, { pending: claims(5) });
  await h.at('shuttingDown.draining');
  t.same(h.queue.calls.map((c) => c.count), [2]);
  h.tasks.finish('T1');
  h.tasks.finish('T2');
  t.same(await h.stopped(), { reason: { kind: 'tasks-done' } });
});

t.test('idleTimeoutMs', async (t) => {
  /** Moves the clock one poll at a time until the worker stops; returns the polls' times. */
  const runIdle = async (h: ReturnType<typeof harness>) => {
    for (let i = 0; i < 50 && h.actor.getSnapshot().status === 'active'; i++) {
      const calls = h.queue.calls.length;
      h.clock.increment(h.config.pollWaitMs);
      await until(() => h.queue.calls.length > calls || h.actor.getSnapshot().status !== 'active', 'the next poll or the end');
    }
  };

  t.test('stops with reason idle once now - idleSince >= idleTimeoutMs', async (t) => {
    const h = harness(t, { idleTimeoutMs: 10_000, pollWaitMs: 3000 });
    await h.queue.untilCalls(1);
    await runIdle(h);
    const output = await h.stopped();
    t.same(output, { reason: { kind: 'idle' } });
    // idleSince is the end of the first empty poll (3000); the poll that ends at 15000 is the first 10 s after it.
    t.same(h.queue.calls.map((c) => c.at), [0, 3000, 6000, 9000, 12000]);
    t.equal(h.clock.now(), 15_000);
    t.equal(h.dispose.count, 1);
  });

  t.test('work resets the idle time', async (t) => {
    const h = harness(t, { idleTimeoutMs: 10_000, pollWaitMs: 3000 });
    await h.queue.untilCalls(1);
    h.clock.increment(3000); // empty poll: idle since 3000
    await h.queue.untilCalls(2);
    h.queue.pending.push(makeClaim('T1'));
    h.clock.increment(3000); // empty poll at 6000; the next one claims T1
    await h.at('running');
    h.clock.increment(5000); // T1 runs until 11000
    h.tasks.finish('T1');
    await h.queue.untilCalls(4);
    t.equal(h.actor.getSnapshot().context.idleSince, undefined, 'busy: not idle');
    await runIdle(h);
    t.same(await h.stopped(), { reason: { kind: 'idle' } });
    // idle again since the first empty poll after T1 (14000): stops at the poll ending 24000 or later
    t.equal(h.clock.now(), 26_000);
  });

  t.test('0 means never', async (t) => {
    const h = harness(t, { idleTimeoutMs: 0, pollWaitMs: 3000 });
    await h.queue.untilCalls(1);
    for (let i = 2; i <= 20; i++) {
      h.clock.increment(3000);
      await h.queue.untilCalls(i);
    }
    t.equal(h.actor.getSnapshot().status, 'active');
    t.equal(h.state(), 'claiming.polling');
  });
});

t.test('SHUTDOWN while tasks run: grace, then abort; stopped after the last task', async (t) => {
  const h = harness(t, { capacity: 4, shutdownGraceMs: 10_000 }, { pending: claims(3), finishOnAbort: false });
  await h.queue.untilCalls(2); // 3 claimed; a second poll waits for the fourth slot
  await h.at('claiming.polling');
  t.same(h.tasks.alive, new Set(['T1', 'T2', 'T3']));

  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  t.equal(h.state(), 'shuttingDown.draining');
  t.ok(h.queue.calls[1]!.signal.aborted, 'the poll under way is abandoned');
  const callsAtShutdown = h.queue.calls.length;

  h.clock.increment(4000);
  h.tasks.finish('T1');
  await until(() => h.running().length === 2, 'T1 forgotten');
  t.equal(h.state(), 'shuttingDown.draining');
  h.clock.increment(5999);
  await settle();
  t.same(h.tasks.aborted, [], 'nothing aborted within the grace period');
  t.equal(h.state(), 'shuttingDown.draining');

  h.clock.increment(1); // 10 s after the SHUTDOWN
  await h.at('shuttingDown.aborting');
  t.same(h.tasks.aborted, ['T2', 'T3'], 'the remaining tasks receive ABORT');
  t.equal(h.dispose.count, 0, 'not disposed while aborted tasks wind down');
  h.tasks.finish('T2');
  await until(() => h.running().length === 1, 'T2 forgotten');
  t.equal(h.state(), 'shuttingDown.aborting');
  t.equal(h.dispose.count, 0);
  h.clock.increment(1_000_000);
  await settle();
  t.equal(h.state(), 'shuttingDown.aborting', 'waits for every task however long');
  h.tasks.finish('T3');

  const output = await h.stopped();
  t.same(output, { reason: SIGTERM });
  t.equal(h.queue.calls.length, callsAtShutdown, 'no claimWork after shuttingDown was entered');
  t.notOk(h.log.slice(h.log.indexOf('@shuttingDown.draining')).includes('claimWork'));
  t.same(h.tasks.finished, ['T1', 'T2', 'T3']);
  t.equal(h.dispose.count, 1, 'disposed once');
  t.same(h.dispose.last.input, { reason: SIGTERM });
  t.same(h.log.slice(-4), ['finish T3', 'dispose', '@shuttingDown.disposing', '@stopped'], 'disposed after the last task');
});

t.test('SHUTDOWN when every task finishes within the grace: nothing aborted', async (t) => {
  const h = harness(t, { capacity: 2, shutdownGraceMs: 10_000 }, { pending: claims(2) });
  await h.at('running');
  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  h.clock.increment(9000);
  h.tasks.finish('T1');
  h.tasks.finish('T2');
  t.same(await h.stopped(), { reason: SIGTERM });
  h.clock.increment(10_000);
  t.same(h.tasks.aborted, []);
  t.equal(h.dispose.count, 1);
});

t.test('a second SHUTDOWN while draining aborts at once; the first reason stands', async (t) => {
  const h = harness(t, { capacity: 2, shutdownGraceMs: 10_000 }, { pending: claims(2) });
  await h.at('running');
  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  t.equal(h.state(), 'shuttingDown.draining');
  t.same(h.tasks.aborted, []);
  h.actor.send({ type: 'SHUTDOWN', reason: SIGINT });
  t.same(h.tasks.aborted, ['T1', 'T2'], 'ABORT sent without the clock moving');
  t.equal(h.clock.now(), 0);
  const output = await h.stopped();
  t.same(output, { reason: SIGTERM });
  t.same(h.states.slice(-4), ['shuttingDown.draining', 'shuttingDown.aborting', 'shuttingDown.disposing', 'stopped']);
  t.equal(h.dispose.count, 1);
});

t.test('FATAL while tasks run: a grace period, then abort, reason fatal', async (t) => {
  const h = harness(t, { capacity: 1, shutdownGraceMs: 5000 }, { pending: claims(1) });
  await h.at('running');
  h.actor.send({ type: 'FATAL', message: 'lost the host' });
  t.equal(h.state(), 'shuttingDown.draining');
  h.clock.increment(5000);
  t.same(await h.stopped(), { reason: { kind: 'fatal', message: 'lost the host' } });
  t.same(h.tasks.aborted, ['T1']);
});

t.test('boot fails: stopped, reason fatal naming the failure; never claims', async (t) => {
  const h = harness(t, {}, { pending: claims(2), holdBoot: true });
  await h.at('booting');
  h.boot.last.result.reject(new Error('host ssh: boot failed: no such host: h1'));
  const output = await h.stopped();
  t.match(output.reason, { kind: 'fatal', message: /^host ssh: boot failed: no such host: h1$/ }, 'the boot actor\'s words, which name the part that failed');
  t.equal(h.queue.calls.length, 0, 'claimWork is never called');
  t.same(h.tasks.alive, new Set());
  t.equal(h.dispose.count, 1, 'what booted is still disposed');
  t.same(h.states, ['booting', 'shuttingDown.disposing', 'stopped']);
});

t.test('claimWork fails: backs off on the clock, retries, and goes on', async (t) => {
  const h = harness(t, { capacity: 1 }, { pending: claims(1) });
  h.queue.failures.push(new Error('ECONNREFUSED'), new Error('ECONNREFUSED'));
  await h.at('claiming.backingOff');
  t.equal(h.queue.calls.length, 1);
  h.clock.increment(499);
  await settle();
  t.equal(h.queue.calls.length, 1, 'not retried before the backoff');
  h.clock.increment(1);
  await h.queue.untilCalls(2);
  await h.at('claiming.backingOff');
  h.clock.increment(999);
  await settle();
  t.equal(h.queue.calls.length, 2, 'the second backoff is longer');
  h.clock.increment(1);
  await h.queue.untilCalls(3);
  await h.at('running');
  t.same(h.tasks.alive, new Set(['T1']), 'the third try claims');
  t.equal(h.actor.getSnapshot().context.claimFailures, 0, 'a success resets the failures');

  h.queue.failures.push(new Error('ECONNRESET'));
  h.tasks.finish('T1');
  await h.queue.untilCalls(4);
  await h.at('claiming.backingOff');
  h.clock.increment(500);
  await h.queue.untilCalls(5);
  t.same(h.queue.calls.map((c) => c.at), [0, 500, 1500, 1500, 2000], 'backoff 0.5 s, 1 s; back to 0.5 s after a success');
  t.equal(h.actor.getSnapshot().status, 'active', 'the worker keeps going');
  t.equal(h.state(), 'claiming.polling');
});

t.test('a task ending during the claim backoff is forgotten', async (t) => {
  const h = harness(t, { capacity: 2 }, { pending: claims(1) });
  await h.queue.untilCalls(2); // T1 claimed; the second poll waits
  h.queue.failures.push(new Error('ECONNREFUSED'));
  h.clock.increment(20_000); // the waiting poll returns nothing; the next one fails
  await h.at('claiming.backingOff');
  h.tasks.finish('T1');
  await until(() => h.running().length === 0, 'T1 forgotten');
  t.equal(h.state(), 'claiming.backingOff');
});

t.test('SHUTDOWN while booting: stopped without claiming', async (t) => {
  const h = harness(t, {}, { pending: claims(1), holdBoot: true });
  await h.at('booting');
  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  const output = await h.stopped();
  t.same(output, { reason: SIGTERM });
  t.ok(h.boot.last.signal.aborted, 'the boot is abandoned');
  t.equal(h.queue.calls.length, 0);
  t.equal(h.dispose.count, 1);
  t.same(h.states, ['booting', 'shuttingDown.disposing', 'stopped']);
});

t.test('SHUTDOWN while stopping is ignored', async (t) => {
  const h = harness(t, {}, {});
  await h.queue.untilCalls(1);
  h.dispose.hold();
  h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
  await h.at('shuttingDown.disposing');
  h.actor.send({ type: 'SHUTDOWN', reason: SIGINT });
  h.actor.send({ type: 'FATAL', message: 'late' });
  t.equal(h.state(), 'shuttingDown.disposing');
  t.equal(h.dispose.count, 1, 'dispose not restarted');
  h.dispose.last.result.resolve();
  t.same(await h.stopped(), { reason: SIGTERM });
});

t.test('regression: after the worker decided to stop, a first SHUTDOWN or FATAL starts the grace period and becomes the reason', async (t) => {
  // Before the fix, draining treated every SHUTDOWN or FATAL as a second request: the tasks were
  // aborted at once, with no grace period, and the output kept the worker's own reason, tasks-done.
  const GRACE = 10_000;

  /** A worker that has claimed its maxTasks (T1, T2) and drains for tasks-done, long past a grace period. */
  const decidedToStop = async (t: Test) => {
    const h = harness(t, { capacity: 2, maxTasks: 2, shutdownGraceMs: GRACE }, { pending: claims(3) });
    await h.at('shuttingDown.draining');
    t.same(h.actor.getSnapshot().context.reason, { kind: 'tasks-done' }, 'the worker decided to stop by itself');
    h.clock.increment(60_000);
    await settle();
    t.same(h.tasks.aborted, [], 'a stop the worker decided on waits for its tasks');
    return h;
  };

  /** Sends the first request; nothing is aborted until GRACE after it, then both tasks are. */
  const graceThenAbort = async (t: Test, h: Awaited<ReturnType<typeof decidedToStop>>, event: { type: 'SHUTDOWN'; reason: ShutdownReason } | { type: 'FATAL'; message: string }) => {
    h.actor.send(event);
    t.equal(h.state(), 'shuttingDown.draining', 'still draining: the grace period starts');
    t.same(h.tasks.aborted, [], 'no task is aborted at once');
    h.clock.increment(GRACE - 1);
    await settle();
    t.same(h.tasks.aborted, [], 'no task is aborted within the grace period');
    t.equal(h.state(), 'shuttingDown.draining');
    h.clock.increment(1);
    await until(() => h.tasks.aborted.length === 2 || h.actor.getSnapshot().status !== 'active', 'the end of the grace period');
    t.same(h.tasks.aborted, ['T1', 'T2'], 'the tasks are aborted when the grace period ends');
  };

  t.test('SHUTDOWN (SIGTERM): grace, then abort; the signal is the reason', async (t) => {
    const h = await decidedToStop(t);
    await graceThenAbort(t, h, { type: 'SHUTDOWN', reason: SIGTERM });
    const output = await h.stopped();
    t.same(output, { reason: SIGTERM }, 'the reason is the signal, not tasks-done');
    t.same(h.dispose.last.input, { reason: SIGTERM });
    t.equal(h.dispose.count, 1);
  });

  t.test('FATAL: grace, then abort; the reason is fatal', async (t) => {
    const h = await decidedToStop(t);
    await graceThenAbort(t, h, { type: 'FATAL', message: 'lost the host' });
    const output = await h.stopped();
    t.same(output, { reason: { kind: 'fatal', message: 'lost the host' } }, 'the reason is fatal, not tasks-done');
    t.equal(h.dispose.count, 1);
  });

  t.test('a second SHUTDOWN aborts at once; the first request stays the reason', async (t) => {
    const h = await decidedToStop(t);
    h.actor.send({ type: 'SHUTDOWN', reason: SIGTERM });
    t.same(h.tasks.aborted, [], 'the first SHUTDOWN aborts nothing');
    h.clock.increment(GRACE / 2);
    await settle();
    t.same(h.tasks.aborted, [], 'nothing aborted half-way through the grace period');
    const now = h.clock.now();
    h.actor.send({ type: 'SHUTDOWN', reason: SIGINT });
    t.same(h.tasks.aborted, ['T1', 'T2'], 'the second SHUTDOWN sends ABORT without the clock moving');
    t.equal(h.clock.now(), now);
    const output = await h.stopped();
    t.same(output, { reason: SIGTERM });
    t.same(h.states.slice(-4), ['shuttingDown.draining', 'shuttingDown.aborting', 'shuttingDown.disposing', 'stopped']);
    t.equal(h.dispose.count, 1);
  });
});

t.test('regression: a task actor that errors is forgotten and shuts the worker down as fatal, in order', async (t) => {
  // Before the fix, nothing handled xstate.error.actor.task.*: the worker machine itself went to status
  // 'error', so the other task got no grace period and no ABORT, and nothing was disposed.
  const h = harness(t, { capacity: 2, shutdownGraceMs: 10_000 }, { pending: claims(2), failOnStart: ['T2'] });
  await until(() => h.actor.getSnapshot().status !== 'active' || h.state().startsWith('shuttingDown'), 'the worker to react to the failed task');
  if (!t.equal(h.actor.getSnapshot().status, 'active', "the worker does not go to status 'error'")) return;
  t.ok(h.log.includes('fail T2'), 'T2 failed as it was spawned');
  t.equal(h.state(), 'shuttingDown.draining', 'shutting down, tasks may finish');
  t.same(h.running(), ['task.T1/0'], 'the failed task is forgotten; T1 still runs');
  t.same(h.tasks.alive, new Set(['T1']));
  const reason = h.actor.getSnapshot().context.reason;
  t.match(reason, { kind: 'fatal', message: /a task actor failed/ });
  t.match(reason, { message: /task T2 broke on entry/ }, 'the reason names the error');

  t.same(h.tasks.aborted, [], 'T1 is not aborted at once');
  h.clock.increment(9_999);
  await settle();
  t.same(h.tasks.aborted, [], 'T1 is not aborted within the grace period');
  t.equal(h.dispose.count, 0, 'not disposed while T1 runs');
  h.clock.increment(1);
  const output = await h.stopped(); // status 'done'
  t.same(h.tasks.aborted, ['T1'], 'T1 gets ABORT when the grace period ends');
  t.same(h.tasks.finished, ['T1']);
  t.match(output, { reason: { kind: 'fatal', message: /a task actor failed/ } });
  t.equal(h.dispose.count, 1, 'disposed once');
  t.same(h.dispose.last.input, { reason: output.reason });
  t.equal(h.queue.calls.length, 1, 'no claim after the failure');
});

t.test('regression: --once keeps a claim the queue hands out as the last running task ends', async (t) => {
  // Before the fix, --once long-polled while a task ran and re-entered the poll when the last task
  // ended: a claim the queue answered with in that same turn was dropped (never spawned), and the
  // worker could stop as drained with a run claimed that nothing would ever execute.
  const polls = new PromiseFake<ClaimRequest, ClaimResult>('claimWork', []); // answered by hand
  const h = harness(t, { once: true, capacity: 2 }, { claimWork: polls.logic });
  await until(() => polls.count === 1, 'poll 1');
  polls.last.result.resolve({ claims: [makeClaim('T1')], now: 0 });
  await until(() => polls.count === 2, 'poll 2');
  t.same(h.running(), ['task.T1/0']);
  const poll2 = polls.last;
  t.same(poll2.input, { count: 1, waitMs: 0 }, '--once does not wait for work while a task runs');

  // One synchronous block: the queue answers poll 2 with T2, and T1, the last task running, ends.
  poll2.result.resolve({ claims: [makeClaim('T2')], now: 0 });
  h.tasks.finish('T1');

  await until(() => polls.count === 3 || h.actor.getSnapshot().status !== 'active', 'poll 3');
  await settle();
  t.notOk(poll2.signal.aborted, 'poll 2 was not abandoned');
  const snapshot = h.actor.getSnapshot();
  t.equal(snapshot.context.claimed, 2, 'T2 is counted as claimed');
  t.ok(snapshot.children['task.T2/0'], "T2's task actor exists");
  if (!t.ok(h.tasks.alive.has('T2'), 'T2 was spawned and runs')) return;
  t.same(h.running(), ['task.T2/0']);
  t.same(polls.last.input, { count: 1, waitMs: 0 }, 'poll 3 asks for the one free slot');

  polls.last.result.resolve({ claims: [], now: 0 }); // nothing pending, T2 runs
  await settle();
  t.equal(h.actor.getSnapshot().status, 'active', 'not stopped as drained while T2 runs');
  t.equal(h.state(), 'running');
  t.equal(h.dispose.count, 0);

  h.tasks.finish('T2');
  await until(() => polls.count === 4, 'poll 4');
  polls.last.result.resolve({ claims: [], now: 0 });
  const output = await h.stopped();
  t.same(output, { reason: { kind: 'drained' } });
  t.same(
    polls.invocations.map((i) => i.input),
    [
      { count: 2, waitMs: 0 },
      { count: 1, waitMs: 0 },
      { count: 1, waitMs: 0 },
      { count: 2, waitMs: 0 },
    ],
    '--once always claims with waitMs 0',
  );
  t.same(h.tasks.finished, ['T1', 'T2']);
  t.same(h.tasks.aborted, []);
  t.equal(h.clock.now(), 0, 'no simulated time was needed');
});

t.test('every worker state names SHUTDOWN and FATAL (itself or an ancestor)', async (t) => {
  const atomic = (node: typeof workerMachine.root): (typeof workerMachine.root)[] =>
    node.type === 'atomic' ? [node] : Object.values(node.states).flatMap((child) => atomic(child as typeof node));
  const nodes = atomic(workerMachine.root);
  t.same(nodes.map((n) => n.id).sort(), [
    'worker.booting',
    'worker.claiming.backingOff',
    'worker.claiming.polling',
    'worker.claiming.spawning',
    'worker.running',
    'worker.shuttingDown.aborting',
    'worker.shuttingDown.disposing',
    'worker.shuttingDown.draining',
  ]);
  for (const node of nodes) {
    const handled = new Set<string>();
    for (let n: typeof node | undefined = node; n !== undefined; n = n.parent) for (const key of n.transitions.keys()) handled.add(key);
    for (const type of ['SHUTDOWN', 'FATAL']) t.ok(handled.has(type), `${node.id} handles ${type}`);
  }
});
