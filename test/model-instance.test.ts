/**
 * The instance machine's model check (no leaked instance: every requested
 * instance ends terminated, or leaked only after its terminate attempts
 * are spent; only idle instances are scaled in; DISPOSE always ends it),
 * and mutants that break it, each caught with the shortest path that shows
 * the break. test/model-check-machines.test.ts runs the same check with
 * every other machine; this file is the instance machine's own account.
 */
import t, { type Test } from 'tap';
import { instanceMachine } from '../src/machines/instance.js';
import { rebuildMachine, stateConfig, type StateConfig } from '../src/testing/machine-config.js';
import { instanceInvariants, instanceModel } from '../src/testing/machine-models.js';
import { checkMachine, checkModel, formatViolation, type CheckKind, type Violation } from '../src/testing/model-check.js';

function expectCaught(t: Test, mutate: (config: StateConfig) => void, check: CheckKind, name: string): Violation | undefined {
  const result = checkMachine({ ...instanceModel, machine: rebuildMachine(instanceMachine, mutate) });
  const violation = result.violations.find((v) => v.check === check && v.name === name);
  t.ok(violation, `caught: ${check} "${name}"`, { found: result.violations.map((v) => `${v.check} "${v.name}": ${v.message}`) });
  if (violation !== undefined) {
    t.comment(formatViolation(violation));
    t.ok((violation.path?.steps.length ?? 0) > 0, 'with a path');
  }
  return violation;
}

const steps = (violation: Violation | undefined) => violation?.path?.steps.map((step) => step.label) ?? [];

t.test('the instance machine passes every check', async (t) => {
  const result = checkModel(t, instanceModel);
  t.ok(result.reached.has('instance.leaked'), 'leaked is reachable (so the invariant is not vacuous there)');
  t.ok(result.reached.has('instance.terminating.waiting'), 'a failed terminate is retried');
});

t.test('mutant: a failed terminate call is not retried (goes straight to leaked)', async (t) => {
  const v = expectCaught(t, (c) => void (stateConfig(c, 'terminating.calling')['invoke'].onError = { target: '#instance.leaked' }),
    'invariant', instanceInvariants.noLeak.name);
  t.match(v, { message: 'leaked is reached after 1 failed terminate call, with 2 attempts left' });
  t.equal(steps(v).at(-1), 'terminate error', 'the path ends with the one failure');
});

t.test('mutant: a failed terminate call counts as done', async (t) => {
  const v = expectCaught(t, (c) => void (stateConfig(c, 'terminating.calling')['invoke'].onError = { target: '#instance.terminated' }),
    'invariant', instanceInvariants.noLeak.name);
  t.match(v, { message: 'terminated is reached though no terminate call for the launched instance succeeded' });
});

t.test('mutant: a launch of unknown outcome is taken for a refusal', async (t) => {
  const v = expectCaught(t, (c) => {
    const onError = stateConfig(c, 'requested')['invoke'].onError as StateConfig[];
    onError[1]!['target'] = 'terminated';
  }, 'invariant', instanceInvariants.noLeak.name);
  t.match(v, { message: /^terminated is reached after a launch of unknown outcome/ });
  t.same(steps(v), ['launch error: unknown outcome']);
});

t.test('mutant: draining terminates without waiting for the tasks', async (t) => {
  const v = expectCaught(t, (c) => void (stateConfig(c, 'draining')['always'] = { target: 'terminating' }),
    'invariant', instanceInvariants.idleScaleIn.name);
  t.match(v, { message: 'terminate is called while 1 task run on the instance' });
  t.same(steps(v).slice(-2), ['TASK_STARTED', 'SCALE_IN'], 'a task starts, then the instance is scaled in');
});

t.test('mutant: the terminate retry loops for ever (no bound)', async (t) => {
  const v = expectCaught(t, (c) => {
    const onError = stateConfig(c, 'terminating.calling')['invoke'].onError as StateConfig[];
    onError.splice(0, 2, { target: 'waiting' });
  }, 'leads-to', instanceModel.leadsTo![0]!.name);
  t.match(v, { message: /^after DISPOSE a path can go round a cycle through terminating/ });
});

t.test('mutant: a DISPOSE during the launch is forgotten', async (t) => {
  // Leads-to does not see it: the forgotten instance waits in ready, where a second DISPOSE would end it.
  const v = expectCaught(t, (c) => {
    stateConfig(c, 'requested')['on'].DISPOSE = { description: 'ignored: forget it' };
  }, 'invariant', instanceInvariants.disposedNeverReady.name);
  t.same(steps(v), ['DISPOSE', 'launch done', 'waitRunning done', 'probeSsh done']);
});
