/**
 * A checker that cannot fail is worth nothing: each test breaks a copy of a
 * shipped machine (its config deep-copied, edited, built again with the
 * same implementations) and asserts that the model check reports the
 * break, with the shortest path that shows it. There is at least one
 * mutant per invariant and per generic check.
 */
import t, { type Test } from 'tap';
import { assign } from 'xstate';
import { ignored, taskMachine } from '../src/machines/task.js';
import { workerMachine } from '../src/machines/worker.js';
import { rebuildMachine, stateConfig, type StateConfig } from '../src/testing/machine-config.js';
import { taskInvariants, taskModel, workerInvariants, workerModel } from '../src/testing/machine-models.js';
import { checkMachine, formatViolation, type CheckKind, type CheckResult, type MachineModel, type Violation } from '../src/testing/model-check.js';

/**
 * Checks the model with its machine mutated; asserts the one expected
 * violation is there, with a path, and returns it for closer looks.
 */
function expectCaught(t: Test, model: MachineModel<any>, mutate: (config: StateConfig) => void, check: CheckKind, name: string, seen?: (result: CheckResult) => void): Violation | undefined {
  const mutant = rebuildMachine(model.machine, mutate);
  const result = checkMachine({ ...model, machine: mutant });
  seen?.(result);
  const violation = result.violations.find((v) => v.check === check && v.name === name);
  t.ok(violation, `caught: ${check} "${name}"`, { found: result.violations.map((v) => `${v.check} "${v.name}": ${v.message}`) });
  if (violation === undefined) return undefined;
  t.comment(formatViolation(violation));
  if (check !== 'unreachable') t.ok((violation.path?.steps.length ?? 0) > 0, 'with a path');
  return violation;
}

const steps = (violation: Violation | undefined) => violation?.path?.steps.map((step) => step.label) ?? [];

t.test('the unmutated machines pass (so the catches below are the mutations\' doing)', async (t) => {
  for (const model of [taskModel, workerModel] as MachineModel<any>[]) t.same(checkMachine(model).violations.map(formatViolation), [], model.name);
});

t.test('task: cleanup exactly once', async (t) => {
  t.test('a path around cleanup: reporting goes straight to done', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void (stateConfig(c, 'claimed.uploading.reporting')['invoke'].onDone.target = '#task.done'),
      'invariant', taskInvariants.cleanupOnce.name);
    t.match(v, { message: 'done is reached without entering cleanup' });
    t.equal(steps(v).at(-1), 'report done', 'the path ends with the report that skips cleanup');
    t.equal(steps(v).length, 3, 'the shortest: a load that fails, the upload, the report');
  });

  t.test('cleanup twice: a failed cleanup starts over', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void (stateConfig(c, 'cleanup')['invoke'].onError = { target: 'cleanup', reenter: true }),
      'invariant', taskInvariants.cleanupOnce.name);
    t.match(v, { message: 'cleanup is entered a second time' });
    t.same(steps(v).slice(-2), ['CANCEL', 'cleanup error'], 'the shortest way into cleanup, then its failure');
  });
});

t.test('task: the resolution is reported once', async (t) => {
  t.test('a second report: reporting re-enters itself after the queue took the first', async (t) => {
    const v = expectCaught(t, taskModel, (c) => {
      stateConfig(c, 'claimed.uploading.reporting')['invoke'].onDone = { target: 'reporting', reenter: true, actions: assign({ reported: true }) };
    }, 'invariant', taskInvariants.reportOnce.name);
    t.match(v, { message: 'the resolution is reported a second time' });
    t.same(steps(v).slice(-2), ['report done', 'report done']);
  });

  t.test('no report: the upload goes straight to cleanup', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void (stateConfig(c, 'claimed.uploading.artifacts')['invoke'].onDone.target = '#task.cleanup'),
      'invariant', taskInvariants.reportOnce.name);
    t.match(v, { message: /^done is reached without reporting/ });
    t.notOk(steps(v).some((label) => label === 'CANCEL' || label === 'CLAIM_LOST'), 'on a path where the run was never gone');
  });
});

t.test('task: nothing is uploaded after the claim is lost', async (t) => {
  const v = expectCaught(t, taskModel, (c) => {
    // Forget that a lost or canceled run has nothing left to upload: every stop goes on to uploading.
    const stopping = stateConfig(c, 'claimed.running.stopping')['invoke'];
    stopping.onDone = stopping.onDone.slice(1);
  }, 'invariant', taskInvariants.noUploadAfterLoss.name);
  t.match(v, { message: /^uploading\.artifacts is entered after the run was gone/ });
  t.equal(steps(v).at(-1), 'stop done');
  t.ok(steps(v).includes('CANCEL') || steps(v).includes('CLAIM_LOST'));
});

t.test('task: generic checks', async (t) => {
  t.test('a dropped transition: loading no longer answers CANCEL', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void delete stateConfig(c, 'claimed.loading')['on'].CANCEL, 'unhandled', 'unhandled');
    t.match(v, { message: /^claimed\.loading drops CANCEL silently: it has no transition for it/ });
    t.same(steps(v), ['CANCEL']);
  });

  t.test('an actor failure nobody handles: reclaim without onError (the bug fixed in fc100cb)', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void delete stateConfig(c, 'claimed')['invoke'].onError, 'machine-error', 'machine-error');
    t.match(v, { message: /^the machine fails on reclaim error: cannot renew in claimed\.loading/ });
    t.same(steps(v), ['reclaim error: cannot renew']);
  });

  t.test('a trap: cleanup ends without going to done', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void (stateConfig(c, 'cleanup')['invoke'].onDone = { actions: [] }), 'deadlock', 'deadlock');
    t.match(v, { message: /^no final state can be reached from cleanup/ });
    t.equal(steps(v).at(-1), 'cleanup done');
  });

  t.test('ABORT leads to done: an upload retried forever after a failure never lets a shutdown finish', async (t) => {
    const v = expectCaught(t, taskModel, (c) => void (stateConfig(c, 'claimed.uploading.artifacts')['invoke'].onError = { target: 'artifacts', reenter: true }),
      'leads-to', taskModel.leadsTo![0]!.name);
    t.match(v, { message: /^after ABORT a path can go round a cycle through claimed\.uploading\.artifacts forever/ });
    t.same(steps(v), ['ABORT', 'upload error'], 'ABORT in loading, then the upload fails, and fails again');
  });
});

t.test('worker: no claim after shuttingDown', async (t) => {
  const v = expectCaught(t, workerModel, (c) => {
    stateConfig(c, 'shuttingDown.draining')['on']['xstate.done.actor.task.*'] = { target: '#worker.claiming', actions: 'forgetTask' };
  }, 'invariant', workerInvariants.noClaimAfterShutdown.name);
  t.match(v, { message: /^(claimWork is invoked|claiming\.polling is entered) after shuttingDown was entered/ });
  t.equal(steps(v).at(-1), 'task done', 'a task that ends while the worker drains');
});

t.test('worker: stopped only after every task actor ended', async (t) => {
  const v = expectCaught(t, workerModel, (c) => void (stateConfig(c, 'shuttingDown.draining')['always'] = { target: 'disposing' }),
    'invariant', workerInvariants.tasksEndBeforeStopped.name);
  t.match(v, { message: /^stopped is entered while task actor task\.A\/0 still runs/ });
  t.same(steps(v), ['boot done', 'claimWork done: 1 claim', 'SHUTDOWN (signal)', 'dispose done']);
});

t.test('worker: a shutdown signal leads to stopped', async (t) => {
  let checks: string[] = [];
  const v = expectCaught(t, workerModel, (c) => void (stateConfig(c, 'running')['on'].SHUTDOWN = ignored('let the tasks finish first')),
    'leads-to', workerModel.leadsTo![0]!.name, (result) => (checks = result.violations.map((x) => x.check)));
  t.match(v, { message: /^after SHUTDOWN \(signal\) a path can go round a cycle/ });
  t.ok(steps(v).includes('SHUTDOWN (signal)'));
  // The handled check passes this mutant: ignoring is an answer. Only the leads-to check catches it.
  t.same(checks, ['leads-to'], 'caught by leads-to only');
});

t.test('worker: a fatal error leads to stopped', async (t) => {
  const v = expectCaught(t, workerModel, (c) => void (stateConfig(c, 'claiming')['on'].FATAL = ignored('keep claiming')),
    'leads-to', workerModel.leadsTo![1]!.name);
  t.match(v, { message: /^after FATAL a path can go round a cycle/ });
  t.equal(steps(v)[1], 'FATAL', 'in claiming, the first state that ignores it');
});

t.test('worker: a dropped transition', async (t) => {
  const v = expectCaught(t, workerModel, (c) => void delete stateConfig(c, 'booting')['on'].FATAL, 'unhandled', 'unhandled');
  t.same(steps(v), ['FATAL']);
});

t.test('mutants are copies: the shipped machines are untouched', async (t) => {
  const before = JSON.stringify(taskMachine.config, (_, value: unknown) => (typeof value === 'function' ? '<fn>' : value));
  const mutant = rebuildMachine(taskMachine, (c) => void delete stateConfig(c, 'claimed.loading')['on'].CANCEL);
  t.notOk(mutant.root.states['claimed']!.states['loading']!.transitions.has('CANCEL'), 'the mutant lost it');
  t.ok(taskMachine.root.states['claimed']!.states['loading']!.transitions.has('CANCEL'), 'the machine kept it');
  t.equal(JSON.stringify(taskMachine.config, (_, value: unknown) => (typeof value === 'function' ? '<fn>' : value)), before, 'its config is as it was');
  t.ok(workerMachine.root.states['running']!.transitions.has('SHUTDOWN'));
});
