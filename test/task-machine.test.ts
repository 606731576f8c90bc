/**
 * The task machine on its own, with fake actors the tests settle by hand and
 * a SimulatedClock for maxRunTime: every path from claim to cleanup, what is
 * (and is not) invoked on each, and that every state answers every event.
 */
import t, { type Test } from 'tap';
import { createActor, fromCallback, SimulatedClock, waitFor, type CallbackActorLogic, type SnapshotFrom } from 'xstate';
import {
  TASK_EVENT_TYPES,
  taskMachine,
  type ClaimInput,
  type LoadOutput,
  type ReportInput,
  type StopInput,
  type TaskEvent,
  type TaskEventType,
  type UploadInput,
} from '../src/machines/task.js';
import { MalformedPayloadError, ResourceUnavailableError } from '../src/model/errors.js';
import type { Resolution } from '../src/model/resolution.js';
import type { RunResult } from '../src/model/task.js';
import { CallbackFake, PromiseFake, makeClaim, settle, stateName, until } from './helpers/fake-actors.js';

const WAIT = { timeout: 2000 } as const;
const CLAIM = makeClaim('T1', 0);
const EXIT_0: RunResult = { exitCode: 0, signal: null, durationMs: 1200 };

/** One event of each type, with the payloads the runtime would send. */
const EVENTS: Record<TaskEventType, TaskEvent> = {
  CANCEL: { type: 'CANCEL' },
  CLAIM_LOST: { type: 'CLAIM_LOST', message: 'the claim expired at 12:00' },
  ABORT: { type: 'ABORT' },
  MAX_RUN_TIME: { type: 'MAX_RUN_TIME' },
  INTERNAL_ERROR: { type: 'INTERNAL_ERROR', message: 'the log upload broke' },
};

type ActorName = 'load' | 'run' | 'stop' | 'upload' | 'report' | 'cleanup';

/**
 * A task machine with fakes that answer at once (load: no maxRunTime, run:
 * exit 0, upload: the decided resolution or completed) unless named in `hold`,
 * in which case each invocation waits for the test. `reclaim` replaces the
 * reclaim fake (whose `running` then stays false).
 */
function harness(
  t: Test,
  options: { hold?: readonly ActorName[]; load?: LoadOutput; reclaim?: CallbackActorLogic<TaskEvent, ClaimInput> } = {},
) {
  const log: string[] = [];
  const fakes = {
    load: new PromiseFake<ClaimInput, LoadOutput>('load', log, () => options.load ?? {}),
    run: new PromiseFake<ClaimInput, RunResult>('run', log, () => EXIT_0),
    stop: new PromiseFake<StopInput, void>('stop', log, () => undefined),
    upload: new PromiseFake<UploadInput, Resolution>('upload', log, (input) => input.resolution ?? { state: 'completed' }),
    report: new PromiseFake<ReportInput, void>('report', log, () => undefined),
    cleanup: new PromiseFake<ClaimInput, void>('cleanup', log, () => undefined),
  };
  const reclaim = new CallbackFake<ClaimInput, TaskEvent>('reclaim', log);
  for (const name of options.hold ?? []) fakes[name].hold();
  const machine = taskMachine.provide({
    actors: {
      load: fakes.load.logic,
      run: fakes.run.logic,
      stop: fakes.stop.logic,
      upload: fakes.upload.logic,
      report: fakes.report.logic,
      cleanup: fakes.cleanup.logic,
      reclaim: options.reclaim ?? reclaim.logic,
    },
  });
  const clock = new SimulatedClock();
  const actor = createActor(machine, { clock, input: { claim: CLAIM } });
  /** Every state the machine was seen in, with whether reclaim was running then. */
  const seen: { state: string; reclaiming: boolean }[] = [];
  const errors: unknown[] = [];
  actor.subscribe({
    next: (snapshot) => {
      const state = stateName(snapshot.value);
      if (seen.at(-1)?.state !== state) seen.push({ state, reclaiming: reclaim.running });
    },
    error: (error) => errors.push(error),
  });
  t.teardown(() => actor.stop());
  actor.start();

  const at = (state: string) => waitFor(actor, (s) => stateName(s.value) === state, WAIT);
  const done = async () => {
    const snapshot = await waitFor(actor, (s) => s.status !== 'active', WAIT);
    t.equal(snapshot.status, 'done', 'the machine ends in its final state');
    t.same(errors, [], 'the machine never errors');
    return snapshot.output!;
  };
  return { actor, machine, clock, log, reclaim, ...fakes, seen, states: () => seen.map((s) => s.state), at, done };
}

type Harness = ReturnType<typeof harness>;

/** Drives a machine to `state` with every actor that would leave it held; returns it there. */
async function reach(t: Test, state: string, load: LoadOutput = {}): Promise<Harness> {
  switch (state) {
    case 'claimed.loading': {
      const h = harness(t, { hold: ['load'] });
      await h.at(state);
      return h;
    }
    case 'claimed.running.executing': {
      const h = harness(t, { hold: ['run'], load });
      await h.at(state);
      return h;
    }
    case 'claimed.running.stopping': {
      const h = harness(t, { hold: ['run', 'stop'], load });
      await h.at('claimed.running.executing');
      h.actor.send({ type: 'ABORT' });
      await h.at(state);
      return h;
    }
    case 'claimed.uploading.artifacts': {
      const h = harness(t, { hold: ['upload'], load });
      await h.at(state);
      return h;
    }
    case 'claimed.uploading.reporting': {
      const h = harness(t, { hold: ['report'], load });
      await h.at(state);
      return h;
    }
    case 'cleanup': {
      const h = harness(t, { hold: ['cleanup'], load });
      await h.at(state);
      return h;
    }
    default:
      throw new Error(`reach: no way to ${state}`);
  }
}

const ACTIVE_STATES = [
  'claimed.loading',
  'claimed.running.executing',
  'claimed.running.stopping',
  'claimed.uploading.artifacts',
  'claimed.uploading.reporting',
  'cleanup',
] as const;

t.test('happy path: load, run, upload, report, cleanup, done', async (t) => {
  const h = harness(t);
  const output = await h.done();
  t.same(h.states(), [
    'claimed.loading',
    'claimed.running.executing',
    'claimed.uploading.artifacts',
    'claimed.uploading.reporting',
    'cleanup',
    'done',
  ]);
  t.same(h.log, ['reclaim:start', 'load', 'run', 'upload', 'report', 'reclaim:stop', 'cleanup']);
  t.same(h.upload.last.input, { claim: CLAIM, result: EXIT_0, resolution: undefined }, 'plugins decide: no resolution is decided before upload');
  t.same(h.report.last.input, { claim: CLAIM, resolution: { state: 'completed' } });
  t.equal(h.report.count, 1, 'reported exactly once');
  t.equal(h.cleanup.count, 1, 'cleaned up exactly once');
  t.same(output, { claim: CLAIM, resolution: { state: 'completed' }, unreported: undefined, detail: undefined });
  t.equal(output.unreported, undefined, 'nothing is unreported');
});

t.test('the upload stage decides the resolution that is reported', async (t) => {
  const h = harness(t);
  h.upload.answer(() => ({ state: 'failed', message: 'exit code 3' }));
  const output = await h.done();
  t.same(h.report.last.input.resolution, { state: 'failed', message: 'exit code 3' });
  t.same(output.resolution, { state: 'failed', message: 'exit code 3' });
});

t.test('a load that fails resolves by the error it threw, without running', async (t) => {
  const cases: { name: string; error: unknown; reason: string; message: string }[] = [
    (() => {
      const error = new MalformedPayloadError([
        { path: 'payload.command', message: 'must be an array' },
        { path: 'payload.maxRunTime', message: 'must be a number' },
      ]);
      return { name: 'MalformedPayloadError', error, reason: 'malformed-payload', message: error.message };
    })(),
    { name: 'plain Error', error: new Error('mkdir failed: EACCES'), reason: 'internal-error', message: 'mkdir failed: EACCES' },
    { name: 'ResourceUnavailableError', error: new ResourceUnavailableError('no GPU on this host'), reason: 'resource-unavailable', message: 'no GPU on this host' },
    { name: 'a thrown string', error: 'it broke', reason: 'internal-error', message: 'it broke' },
  ];
  for (const c of cases) {
    t.test(c.name, async (t) => {
      const h = harness(t, { hold: ['load'] });
      await h.at('claimed.loading');
      h.load.last.result.reject(c.error);
      const output = await h.done();
      const resolution = { state: 'exception', reason: c.reason, message: c.message };
      t.same(h.states(), ['claimed.loading', 'claimed.uploading.artifacts', 'claimed.uploading.reporting', 'cleanup', 'done']);
      t.equal(h.run.count, 0, 'nothing runs');
      t.equal(h.stop.count, 0, 'nothing to stop');
      t.same(h.upload.last.input, { claim: CLAIM, result: undefined, resolution }, 'upload gets the decided resolution');
      t.same(h.report.last.input.resolution, resolution);
      t.same(output.resolution, resolution);
      t.equal(output.unreported, undefined);
      t.equal(h.cleanup.count, 1);
    });
  }
  if (cases[0]) t.match(cases[0].message, /payload\.command: must be an array[\s\S]*payload\.maxRunTime/, 'the message lists every problem');
});

t.test('CANCEL: nothing more is uploaded or reported; cleanup once; unreported canceled', async (t) => {
  t.test('in loading', async (t) => {
    const h = await reach(t, 'claimed.loading');
    h.reclaim.emit({ type: 'CANCEL' });
    const output = await h.done();
    t.same(h.states(), ['claimed.loading', 'cleanup', 'done']);
    t.ok(h.load.last.signal.aborted, 'the load is abandoned (its signal aborted)');
    t.equal(h.run.count + h.stop.count + h.upload.count + h.report.count, 0, 'no run, stop, upload or report');
    t.equal(h.cleanup.count, 1);
    t.same(output, { claim: CLAIM, resolution: undefined, unreported: 'canceled', detail: undefined });
  });

  t.test('in executing: the command is stopped for canceled', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    h.reclaim.emit({ type: 'CANCEL' });
    const output = await h.done();
    t.same(h.states(), ['claimed.loading', 'claimed.running.executing', 'claimed.running.stopping', 'cleanup', 'done']);
    t.same(h.stop.last.input, { claim: CLAIM, reason: 'canceled', detail: undefined });
    t.ok(h.run.last.signal.aborted, 'the run actor is stopped');
    t.equal(h.upload.count + h.report.count, 0, 'no upload, no report');
    t.equal(h.cleanup.count, 1);
    t.equal(output.unreported, 'canceled');
    t.equal(output.resolution, undefined);
  });

  t.test('in stopping (for a shutdown): the cancel wins, nothing is uploaded', async (t) => {
    const h = await reach(t, 'claimed.running.stopping');
    t.equal(h.stop.last.input.reason, 'worker-shutdown');
    h.reclaim.emit({ type: 'CANCEL' });
    await h.at('claimed.running.stopping');
    t.equal(h.stop.count, 1, 'the stop under way is not restarted');
    h.stop.last.result.resolve();
    const output = await h.done();
    t.same(h.log.slice(-3), ['stop', 'reclaim:stop', 'cleanup']);
    t.equal(h.upload.count + h.report.count, 0, 'no upload, no report');
    t.equal(h.cleanup.count, 1);
    t.equal(output.unreported, 'canceled');
  });

  t.test('in stopping, when the stop fails: still straight to cleanup', async (t) => {
    const h = await reach(t, 'claimed.running.stopping');
    h.reclaim.emit({ type: 'CANCEL' });
    await h.at('claimed.running.stopping');
    h.stop.last.result.reject(new Error('kill: EPERM'));
    const output = await h.done();
    t.equal(h.upload.count + h.report.count, 0);
    t.equal(output.unreported, 'canceled');
  });

  t.test('in uploading.artifacts: the upload is abandoned and not reported', async (t) => {
    const h = await reach(t, 'claimed.uploading.artifacts');
    h.reclaim.emit({ type: 'CANCEL' });
    const output = await h.done();
    t.same(h.states().slice(-3), ['claimed.uploading.artifacts', 'cleanup', 'done']);
    t.ok(h.upload.last.signal.aborted, 'the upload actor is stopped');
    t.equal(h.report.count, 0, 'no report');
    t.equal(h.cleanup.count, 1);
    t.equal(output.unreported, 'canceled');
  });
});

t.test('CLAIM_LOST: nothing is uploaded after the claim is lost; unreported claim-lost', async (t) => {
  const LOST = { type: 'CLAIM_LOST', message: 'run T1/0 is held by w2' } as const;
  /** After the claim is lost: no upload or report begins; cleanup runs once; the output says why. */
  const checkAfterLoss = (t: Test, h: Harness, lostAt: number, output: Awaited<ReturnType<Harness['done']>>) => {
    const after = h.log.slice(lostAt);
    t.notOk(after.includes('upload'), `no upload after the claim was lost (${after.join(', ')})`);
    t.notOk(after.includes('report'), 'no report after the claim was lost');
    t.equal(h.report.count, 0, 'never reported');
    t.equal(h.cleanup.count, 1, 'cleaned up once');
    t.same(output, { claim: CLAIM, resolution: undefined, unreported: 'claim-lost', detail: LOST.message });
  };

  t.test('in loading', async (t) => {
    const h = await reach(t, 'claimed.loading');
    const lostAt = h.log.length;
    h.reclaim.emit(LOST);
    const output = await h.done();
    t.equal(h.upload.count, 0);
    checkAfterLoss(t, h, lostAt, output);
  });

  t.test('in executing: stop for claim-lost, then cleanup', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    const lostAt = h.log.length;
    h.reclaim.emit(LOST);
    const output = await h.done();
    t.same(h.stop.last.input, { claim: CLAIM, reason: 'claim-lost', detail: LOST.message });
    t.equal(h.upload.count, 0);
    checkAfterLoss(t, h, lostAt, output);
  });

  t.test('in executing, when the command ends on its own while stopping', async (t) => {
    const h = harness(t, { hold: ['run', 'stop'] });
    await h.at('claimed.running.executing');
    const lostAt = h.log.length;
    h.reclaim.emit(LOST);
    await h.at('claimed.running.stopping');
    h.run.last.result.resolve(EXIT_0); // too late: the run actor was stopped
    await settle();
    t.equal(stateName(h.actor.getSnapshot().value), 'claimed.running.stopping', 'a late result is not taken');
    h.stop.last.result.resolve();
    const output = await h.done();
    t.equal(h.upload.count, 0);
    checkAfterLoss(t, h, lostAt, output);
  });

  t.test('in stopping', async (t) => {
    const h = await reach(t, 'claimed.running.stopping');
    const lostAt = h.log.length;
    h.reclaim.emit(LOST);
    await settle();
    h.stop.last.result.resolve();
    const output = await h.done();
    t.equal(h.upload.count, 0);
    checkAfterLoss(t, h, lostAt, output);
  });

  t.test('in uploading.artifacts: the upload under way is stopped', async (t) => {
    const h = await reach(t, 'claimed.uploading.artifacts');
    const lostAt = h.log.length;
    h.reclaim.emit(LOST);
    const output = await h.done();
    t.equal(h.upload.count, 1, 'the one upload begun before the loss');
    t.ok(h.upload.last.signal.aborted, 'and it is stopped');
    checkAfterLoss(t, h, lostAt, output);
  });
});

t.test('ABORT', async (t) => {
  t.test('in loading: resolved exception/worker-shutdown without running', async (t) => {
    const h = await reach(t, 'claimed.loading');
    h.actor.send({ type: 'ABORT' });
    const output = await h.done();
    const resolution = { state: 'exception', reason: 'worker-shutdown', message: 'the worker shut down before the task started' };
    t.same(h.states(), ['claimed.loading', 'claimed.uploading.artifacts', 'claimed.uploading.reporting', 'cleanup', 'done']);
    t.ok(h.load.last.signal.aborted, 'the load is abandoned');
    t.equal(h.run.count + h.stop.count, 0);
    t.same(h.upload.last.input.resolution, resolution);
    t.same(h.report.last.input.resolution, resolution);
    t.same(output, { claim: CLAIM, resolution, unreported: undefined, detail: undefined });
  });

  t.test('in executing: stop (worker-shutdown), upload, report exception/worker-shutdown', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    h.actor.send({ type: 'ABORT' });
    const output = await h.done();
    const resolution = { state: 'exception', reason: 'worker-shutdown', message: 'the worker shut down while the task ran' };
    t.same(h.states(), [
      'claimed.loading',
      'claimed.running.executing',
      'claimed.running.stopping',
      'claimed.uploading.artifacts',
      'claimed.uploading.reporting',
      'cleanup',
      'done',
    ]);
    t.same(h.log, ['reclaim:start', 'load', 'run', 'stop', 'upload', 'report', 'reclaim:stop', 'cleanup']);
    t.same(h.stop.last.input, { claim: CLAIM, reason: 'worker-shutdown', detail: undefined });
    t.same(h.upload.last.input, { claim: CLAIM, result: undefined, resolution });
    t.same(h.report.last.input.resolution, resolution);
    t.same(output.resolution, resolution);
  });

  // The runtime's reclaimer sends ABORT with a message when the machine the run was placed on goes down.
  const HOST_DOWN = 'host w@10.0.0.7:22 went down: the connection was lost';

  t.test('with a message, in loading: exception/worker-shutdown with that message', async (t) => {
    const h = await reach(t, 'claimed.loading');
    h.actor.send({ type: 'ABORT', message: HOST_DOWN });
    const output = await h.done();
    const resolution = { state: 'exception', reason: 'worker-shutdown', message: HOST_DOWN };
    t.equal(h.run.count + h.stop.count, 0);
    t.same(h.report.last.input.resolution, resolution);
    t.same(output, { claim: CLAIM, resolution, unreported: undefined, detail: undefined });
  });

  t.test('with a message, in executing: the stop and the resolution carry it', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    h.actor.send({ type: 'ABORT', message: HOST_DOWN });
    const output = await h.done();
    const resolution = { state: 'exception', reason: 'worker-shutdown', message: HOST_DOWN };
    t.same(h.stop.last.input, { claim: CLAIM, reason: 'worker-shutdown', detail: HOST_DOWN });
    t.same(h.upload.last.input, { claim: CLAIM, result: undefined, resolution });
    t.same(h.report.last.input.resolution, resolution);
    t.same(output.resolution, resolution);
  });

  t.test('in executing, when the stop fails: exception/internal-error naming it', async (t) => {
    const h = await reach(t, 'claimed.running.stopping');
    h.stop.last.result.reject(new Error('kill: EPERM'));
    const output = await h.done();
    const resolution = { state: 'exception', reason: 'internal-error', message: 'could not stop the command: kill: EPERM' };
    t.same(h.report.last.input.resolution, resolution);
    t.same(output.resolution, resolution);
  });
});

t.test('maxRunTime', async (t) => {
  t.test('after maxRunTimeMs of command time: stopped, then failed', async (t) => {
    const h = await reach(t, 'claimed.running.executing', { maxRunTimeMs: 5000 });
    h.clock.increment(4999);
    await settle();
    t.equal(stateName(h.actor.getSnapshot().value), 'claimed.running.executing', 'not yet at 4999 ms');
    t.equal(h.stop.count, 0);
    h.clock.increment(1);
    const output = await h.done();
    t.same(h.stop.last.input, { claim: CLAIM, reason: 'max-run-time', detail: 'maxRunTime of 5 s exceeded' });
    t.same(h.states().slice(1, 4), ['claimed.running.executing', 'claimed.running.stopping', 'claimed.uploading.artifacts']);
    const reported = h.report.last.input.resolution;
    t.equal(reported.state, 'failed');
    t.match(reported.message, /maxRunTime/);
    t.same(h.upload.last.input.resolution, reported, 'decided before the upload stage');
    t.same(output.resolution, reported);
  });

  t.test('counts from the start of the command, not from the claim', async (t) => {
    const h = harness(t, { hold: ['load', 'run'] });
    await h.at('claimed.loading');
    h.clock.increment(60_000); // a slow load
    h.load.last.result.resolve({ maxRunTimeMs: 5000 });
    await h.at('claimed.running.executing');
    h.clock.increment(4000);
    await settle();
    t.equal(h.stop.count, 0, 'still within maxRunTime 4 s into the command');
    h.clock.increment(1000);
    await h.done();
    t.equal(h.stop.last.input.reason, 'max-run-time');
  });

  t.test('without maxRunTimeMs nothing happens however far the clock goes', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    for (let i = 0; i < 5; i++) {
      h.clock.increment(1_000_000_000);
      await settle();
    }
    t.equal(stateName(h.actor.getSnapshot().value), 'claimed.running.executing');
    t.equal(h.stop.count, 0);
    h.run.last.result.resolve(EXIT_0);
    const output = await h.done();
    t.same(output.resolution, { state: 'completed' });
  });

  t.test('a command that ends in time is not stopped later', async (t) => {
    const h = await reach(t, 'claimed.running.executing', { maxRunTimeMs: 5000 });
    h.upload.hold();
    h.clock.increment(3000);
    h.run.last.result.resolve(EXIT_0);
    await h.at('claimed.uploading.artifacts');
    h.clock.increment(10_000);
    await settle();
    t.equal(stateName(h.actor.getSnapshot().value), 'claimed.uploading.artifacts');
    h.upload.last.result.resolve({ state: 'completed' });
    const output = await h.done();
    t.equal(h.stop.count, 0);
    t.same(output.resolution, { state: 'completed' });
  });
});

t.test('INTERNAL_ERROR in executing: stop, then exception/internal-error', async (t) => {
  const h = await reach(t, 'claimed.running.executing');
  h.actor.send({ type: 'INTERNAL_ERROR', message: 'the log upload broke' });
  const output = await h.done();
  const resolution = { state: 'exception', reason: 'internal-error', message: 'the log upload broke' };
  t.same(h.log, ['reclaim:start', 'load', 'run', 'stop', 'upload', 'report', 'reclaim:stop', 'cleanup']);
  t.same(h.stop.last.input, { claim: CLAIM, reason: 'internal-error', detail: 'the log upload broke' });
  t.same(h.report.last.input.resolution, resolution);
  t.same(output.resolution, resolution);
});

t.test('INTERNAL_ERROR in loading: exception/internal-error without running', async (t) => {
  const h = await reach(t, 'claimed.loading');
  h.actor.send({ type: 'INTERNAL_ERROR', message: 'plugin watcher died' });
  const output = await h.done();
  t.equal(h.run.count, 0);
  t.same(output.resolution, { state: 'exception', reason: 'internal-error', message: 'plugin watcher died' });
});

t.test('failures of run, upload and cleanup', async (t) => {
  t.test('run rejects: exception/internal-error, nothing to stop', async (t) => {
    const h = await reach(t, 'claimed.running.executing');
    h.run.last.result.reject(new Error('spawn ENOENT'));
    const output = await h.done();
    t.equal(h.stop.count, 0);
    t.same(h.upload.last.input, { claim: CLAIM, result: undefined, resolution: { state: 'exception', reason: 'internal-error', message: 'spawn ENOENT' } });
    t.same(output.resolution, { state: 'exception', reason: 'internal-error', message: 'spawn ENOENT' });
  });

  t.test('upload rejects: exception/internal-error is reported', async (t) => {
    const h = await reach(t, 'claimed.uploading.artifacts');
    h.upload.last.result.reject(new Error('artifact store unreachable'));
    const output = await h.done();
    t.same(h.report.last.input.resolution, { state: 'exception', reason: 'internal-error', message: 'artifact store unreachable' });
    t.same(output.resolution, h.report.last.input.resolution);
  });

  t.test('cleanup rejects: still done, the reported resolution stands', async (t) => {
    const h = await reach(t, 'cleanup');
    h.cleanup.last.result.reject(new Error('rm: EBUSY'));
    const output = await h.done();
    t.same(output, { claim: CLAIM, resolution: { state: 'completed' }, unreported: undefined, detail: undefined });
  });
});

t.test('events in reporting and cleanup are consumed without any change', async (t) => {
  for (const state of ['claimed.uploading.reporting', 'cleanup'] as const) {
    t.test(state, async (t) => {
      const h = await reach(t, state);
      const before = h.actor.getSnapshot();
      const invocations = h.log.length;
      for (const type of TASK_EVENT_TYPES) {
        h.actor.send(EVENTS[type]);
        await settle(1);
        const now = h.actor.getSnapshot();
        t.equal(stateName(now.value), state, `${type} leaves the state as it is`);
        t.equal(now.status, 'active');
        t.same(now.context, before.context, `${type} changes no context`);
      }
      t.equal(h.log.length, invocations, 'no actor invoked or restarted');
    });
  }
});

t.test('a report the queue refuses: cleanup, unreported report-refused', async (t) => {
  const h = await reach(t, 'claimed.uploading.reporting');
  h.report.last.result.reject(new Error('run T1/0 is not held by w1'));
  const output = await h.done();
  t.equal(h.cleanup.count, 1);
  t.same(output, {
    claim: CLAIM,
    resolution: undefined,
    unreported: 'report-refused',
    detail: 'the queue refused the report: run T1/0 is not held by w1',
  });
});

t.test('a CANCEL during reporting lets the report decide', async (t) => {
  const h = await reach(t, 'claimed.uploading.reporting');
  h.reclaim.emit({ type: 'CANCEL' });
  await settle();
  t.equal(stateName(h.actor.getSnapshot().value), 'claimed.uploading.reporting');
  t.notOk(h.report.last.signal.aborted, 'the report is not interrupted');
  h.report.last.result.resolve();
  const output = await h.done();
  t.same(output.resolution, { state: 'completed' }, 'the queue took it: reported');
});

t.test('reclaim runs in every claimed.* state and is stopped when cleanup is entered', async (t) => {
  const h = harness(t, { hold: ['load', 'run', 'stop', 'upload', 'report', 'cleanup'] });
  await h.at('claimed.loading');
  h.load.last.result.resolve({});
  await h.at('claimed.running.executing');
  h.actor.send({ type: 'INTERNAL_ERROR', message: 'watcher died' });
  await h.at('claimed.running.stopping');
  h.stop.last.result.resolve();
  await h.at('claimed.uploading.artifacts');
  h.upload.last.result.resolve({ state: 'exception', reason: 'internal-error', message: 'watcher died' });
  await h.at('claimed.uploading.reporting');
  h.report.last.result.resolve();
  await h.at('cleanup');
  t.notOk(h.reclaim.running, 'reclaim is stopped by the time cleanup is entered');
  h.cleanup.last.result.resolve();
  await h.done();
  t.same(h.seen, [
    { state: 'claimed.loading', reclaiming: true },
    { state: 'claimed.running.executing', reclaiming: true },
    { state: 'claimed.running.stopping', reclaiming: true },
    { state: 'claimed.uploading.artifacts', reclaiming: true },
    { state: 'claimed.uploading.reporting', reclaiming: true },
    { state: 'cleanup', reclaiming: false },
    { state: 'done', reclaiming: false },
  ]);
  t.equal(h.reclaim.starts.length, 1, 'started once: moving between child states does not restart it');
  t.same(h.reclaim.starts[0], { claim: CLAIM });
  t.equal(h.reclaim.stops, 1, 'stopped once');
  t.ok(h.log.indexOf('reclaim:stop') < h.log.indexOf('cleanup'), 'stopped before the cleanup actor starts');
});

t.test('reclaim is stopped before cleanup on the cancel path too', async (t) => {
  const h = await reach(t, 'claimed.running.executing');
  h.reclaim.emit({ type: 'CANCEL' });
  await h.done();
  t.same(
    h.seen.map((s) => [s.state, s.reclaiming]),
    [
      ['claimed.loading', true],
      ['claimed.running.executing', true],
      ['claimed.running.stopping', true],
      ['cleanup', false],
      ['done', false],
    ],
  );
  t.equal(h.reclaim.stops, 1);
});

t.test('regression: a reclaimer that throws at start is an internal error, not a failed task machine', async (t) => {
  // Before the fix, `claimed` invoked reclaim without onError: the callback throwing put the whole
  // machine in status 'error' (no upload, no report, no cleanup), and took its worker down with it.
  let starts = 0;
  const reclaim = fromCallback<TaskEvent, ClaimInput>(() => {
    starts++;
    throw new Error('database is closed');
  });
  const h = harness(t, { hold: ['load'], reclaim });
  await until(() => h.actor.getSnapshot().status !== 'active', 'the task machine to end');
  if (!t.equal(h.actor.getSnapshot().status, 'done', "the task machine ends in 'done', not 'error'")) return;
  const output = await h.done();
  t.equal(starts, 1, 'the reclaimer was started once');
  t.same(h.states(), ['claimed.loading', 'claimed.uploading.artifacts', 'claimed.uploading.reporting', 'cleanup', 'done']);
  t.equal(h.load.count, 1);
  t.ok(h.load.last.signal.aborted, 'the load is abandoned');
  t.equal(h.run.count + h.stop.count, 0, 'nothing runs, nothing to stop');
  const resolution = h.report.last.input.resolution;
  t.match(resolution, { state: 'exception', reason: 'internal-error' }, 'resolved exception/internal-error');
  t.match(resolution.message, /the claim cannot be renewed/);
  t.match(resolution.message, /database is closed/);
  t.same(h.upload.last.input.resolution, resolution, 'decided before the upload stage');
  t.equal(h.report.count, 1, 'reported once');
  t.equal(h.cleanup.count, 1, 'cleaned up exactly once');
  t.same(output, { claim: CLAIM, resolution, unreported: undefined, detail: undefined });
});

/** Every atomic state of a machine, by id. */
function atomicStates(node: { type: string; id: string; states: Record<string, unknown> }): string[] {
  if (node.type === 'atomic') return [node.id];
  return Object.values(node.states).flatMap((child) => atomicStates(child as typeof node));
}

t.test('every state handles every event', async (t) => {
  t.test('statically: every non-final atomic state, or an ancestor, names each event', async (t) => {
    const atomic = atomicStates(taskMachine.root);
    t.same(atomic.sort(), ACTIVE_STATES.map((s) => `task.${s}`).sort(), 'the reachable states are all the atomic states');
    for (const id of atomic) {
      let node: ReturnType<typeof taskMachine.getStateNodeById> | undefined = taskMachine.getStateNodeById(id);
      const handled = new Set<string>();
      for (; node !== undefined; node = node.parent) for (const key of node.transitions.keys()) handled.add(key);
      for (const type of TASK_EVENT_TYPES) t.ok(handled.has(type), `${id} handles ${type}`);
    }
  });

  t.test('dynamically: in each reachable state each event is an explicit transition', async (t) => {
    for (const state of ACTIVE_STATES) {
      for (const type of TASK_EVENT_TYPES) {
        const h = await reach(t, state);
        const snapshot: SnapshotFrom<typeof h.machine> = h.actor.getSnapshot();
        const transitions = h.machine.getTransitionData(snapshot, EVENTS[type]);
        t.ok(transitions.length > 0, `${state} has a transition for ${type}`);
        const meaningful = transitions.some((tr) => tr.target !== undefined || tr.actions.length > 0);
        const ignoredOnPurpose = transitions.every((tr) => tr.description?.startsWith('ignored:'));
        t.ok(meaningful || ignoredOnPurpose, `${state} / ${type}: a transition, or documented as ignored`);
        // snapshot.can() is false for a targetless, actionless transition (xstate treats it as forbidden),
        // so it is true exactly for the events that do something here.
        t.equal(snapshot.can(EVENTS[type]), meaningful, `${state} / ${type}: can() agrees`);
        const retargets = transitions.some((tr) => tr.target !== undefined);
        h.actor.send(EVENTS[type]);
        const after = h.actor.getSnapshot(); // right after the event's macrostep, before any actor answers
        t.not(after.status, 'error', `${state} / ${type}: the machine did not error`);
        if (retargets) t.not(stateName(after.value), state, `${state} / ${type}: the state changed`);
        else t.equal(stateName(after.value), state, `${state} / ${type}: the state stays`);
        if (meaningful && !retargets) t.notSame(after.context, snapshot.context, `${state} / ${type}: the context changed`);
        if (!meaningful) t.same(after.context, snapshot.context, `${state} / ${type}: ignored, nothing changed`);
        h.actor.stop();
      }
    }
  });
});
