/**
 * The model checker on small machines made to pass or to break each check:
 * reachability, deadlock, unhandled events, machine errors, invariants,
 * leads-to, the exploration bound, and the paths it hands to replays.
 */
import t from 'tap';
import { assign, fromPromise, setup } from 'xstate';
import { ignored } from '../src/machines/task.js';
import { checkMachine, formatViolation, summarize, violated, type CheckResult, type MachineModel, type PathInvariant } from '../src/testing/model-check.js';

/** A lamp: off ⇄ on, and a BREAK in either state ends it. */
const lamp = setup({}).createMachine({
  id: 'lamp',
  initial: 'off',
  states: {
    off: { on: { SWITCH: 'on', BREAK: 'broken' } },
    on: { on: { SWITCH: 'off', BREAK: 'broken' } },
    broken: { type: 'final' },
  },
});
const LAMP_EVENTS = { SWITCH: { type: 'SWITCH' }, BREAK: { type: 'BREAK' } } as const;

/** Violations without their paths' snapshots: what assertions compare (and print, when they fail). */
function found(result: CheckResult) {
  return result.violations.map((v) => ({ check: v.check, name: v.name, message: v.message, text: formatViolation(v) }));
}

function labels(result: CheckResult, check: string): string[][] {
  return result.violations.filter((v) => v.check === check).map((v) => v.path?.steps.map((s) => s.label) ?? []);
}

t.test('a sound machine passes every check; the summary counts states and transitions', async (t) => {
  const result = checkMachine({ name: 'lamp', machine: lamp, events: LAMP_EVENTS });
  t.same(found(result), []);
  t.same([...result.reached].sort(), ['lamp.broken', 'lamp.off', 'lamp.on']);
  t.same(result.transitions.all, ['lamp.off SWITCH', 'lamp.off BREAK', 'lamp.on SWITCH', 'lamp.on BREAK']);
  t.equal(result.transitions.taken.size, 4);
  t.equal(result.states, 3);
  t.match(summarize(result), /^lamp: 3 states, \d+ edges; 3\/3 states reached; 4\/4 transitions taken \(0 of them "ignored here"\); 0 violations$/);
});

t.test('a state nothing enters is unreachable', async (t) => {
  const machine = setup({}).createMachine({
    id: 'lamp', initial: 'off',
    states: { off: { on: { SWITCH: 'off', BREAK: 'broken' } }, hidden: { on: { SWITCH: 'off', BREAK: 'broken' } }, broken: { type: 'final' } },
  });
  const result = checkMachine({ name: 'lamp', machine, events: LAMP_EVENTS });
  t.match(found(result), [{ check: 'unreachable', message: 'state lamp.hidden is declared but no path enters it' }]);
  t.equal(result.violations.length, 1);
});

t.test('an event a state does not answer is reported with the path to that state', async (t) => {
  const machine = setup({}).createMachine({
    id: 'lamp', initial: 'off',
    states: { off: { on: { SWITCH: 'on', BREAK: 'broken' } }, on: { on: { SWITCH: 'off' } }, broken: { type: 'final' } },
  });
  const result = checkMachine({ name: 'lamp', machine, events: LAMP_EVENTS });
  t.equal(result.violations.length, 1);
  t.match(found(result)[0], { check: 'unhandled', message: /^on drops BREAK silently: it has no transition for it/ });
  t.same(labels(result, 'unhandled'), [['SWITCH', 'BREAK']], 'the shortest way to on, then the dropped event');
  t.match(formatViolation(result.violations[0]!), /unhandled: on drops BREAK[^\n]*\n {2}start → off\n {3}1\. SWITCH → on\n {3}2\. BREAK {2}→ on/);

  t.test('an ignored("why") transition answers it', async (t) => {
    const fixed = setup({}).createMachine({
      id: 'lamp', initial: 'off',
      states: { off: { on: { SWITCH: 'on', BREAK: 'broken' } }, on: { on: { SWITCH: 'off', BREAK: ignored('lamps that are on do not break') } }, broken: { type: 'final' } },
    });
    const result = checkMachine({ name: 'lamp', machine: fixed, events: LAMP_EVENTS });
    t.same(found(result), []);
    t.same(result.transitions.ignored, ['lamp.on BREAK']);
  });

  t.test('a guarded transition whose guard refuses is a silent drop too, and says so', async (t) => {
    const guarded = setup({ guards: { never: () => false } }).createMachine({
      id: 'lamp', initial: 'off',
      states: { off: { on: { SWITCH: 'on', BREAK: 'broken' } }, on: { on: { SWITCH: 'off', BREAK: { guard: 'never', target: 'broken' } } }, broken: { type: 'final' } },
    });
    const result = checkMachine({ name: 'lamp', machine: guarded, events: LAMP_EVENTS });
    t.match(found(result), [{ check: 'unhandled', message: /on drops BREAK silently: every transition declared for it is guarded/ }]);
  });
});

t.test('a trap is a deadlock, reported with the shortest path into it', async (t) => {
  const machine = setup({}).createMachine({
    id: 'lamp', initial: 'off',
    states: {
      off: { on: { SWITCH: 'on', BREAK: 'broken' } },
      on: { on: { SWITCH: 'off', BREAK: 'smoking' } },
      smoking: { on: { SWITCH: ignored('the switch is melted'), BREAK: ignored('already broken') } },
      broken: { type: 'final' },
    },
  });
  const result = checkMachine({ name: 'lamp', machine, events: LAMP_EVENTS });
  t.match(found(result), [{ check: 'deadlock', message: /no final state can be reached from smoking \(what may happen there leads nowhere else: SWITCH, BREAK\)/ }]);
  t.same(labels(result, 'deadlock'), [['SWITCH', 'BREAK']]);
});

t.test('actors: completions and failures are events; an unhandled failure fails the machine', async (t) => {
  const fetcher = (withOnError: boolean) =>
    setup({ actors: { fetch: fromPromise<string>(async () => 'page') } }).createMachine({
      id: 'fetcher', initial: 'fetching',
      states: {
        fetching: {
          invoke: { src: 'fetch', onDone: 'done', ...(withOnError ? { onError: 'done' } : {}) },
          on: { CANCEL: 'done' },
        },
        done: { type: 'final' },
      },
    });
  const model: MachineModel = { name: 'fetcher', machine: fetcher(false), events: { CANCEL: { type: 'CANCEL' } }, actors: { fetch: { done: { page: 'page' }, errors: { offline: new Error('offline') } } } };
  const result = checkMachine(model);
  t.match(found(result), [{ check: 'machine-error', message: 'the machine fails on fetch error: offline in fetching: offline' }]);
  t.same(labels(result, 'machine-error'), [['fetch error: offline']]);
  t.same(found(checkMachine({ ...model, machine: fetcher(true) })), [], 'with onError it is sound');
  const keys = checkMachine({ ...model, machine: fetcher(true) }).transitions.all;
  t.same(keys, ['fetcher.fetching CANCEL', 'fetcher.fetching done(fetch)', 'fetcher.fetching error(fetch)'], 'invoked actors are named by src');
});

t.test('invariants: the first violation found is on a shortest path, and atEnd judges finished paths', async (t) => {
  // Breaking the lamp straight from off is forbidden: it must have been on first.
  const onBeforeBroken: PathInvariant<boolean> = {
    name: 'on before broken',
    initial: false,
    step: (wasOn, step) => {
      if (step.entered.includes('lamp.broken') && !wasOn) return violated('broken without having been on');
      return wasOn || step.entered.includes('lamp.on');
    },
  };
  const result = checkMachine({ name: 'lamp', machine: lamp, events: LAMP_EVENTS, invariants: [onBeforeBroken] });
  t.equal(result.violations.length, 1);
  t.match(found(result)[0], { check: 'invariant', name: 'on before broken', message: 'broken without having been on' });
  t.same(labels(result, 'invariant'), [['BREAK']], 'the one-step path, not SWITCH SWITCH BREAK');

  const switchedTwice: PathInvariant<number> = {
    name: 'switched at least twice',
    initial: 0,
    step: (n, step) => Math.min(2, n + step.taken.filter((key) => key.endsWith('SWITCH')).length),
    atEnd: (n) => (n >= 2 ? undefined : `broken after ${n} switch${n === 1 ? '' : 'es'}`),
  };
  const ended = checkMachine({ name: 'lamp', machine: lamp, events: LAMP_EVENTS, invariants: [switchedTwice] });
  t.match(found(ended), [{ check: 'invariant', message: 'broken after 0 switches' }]);
  t.same(labels(ended, 'invariant'), [['BREAK']]);
});

t.test('leads-to: a cycle of actor completions that ignores the trigger is caught', async (t) => {
  // A poller: poll, wait, poll again... STOP must end it from any state.
  const poller = (stopWhileWaiting: boolean) =>
    setup({ actors: { poll: fromPromise(async () => undefined) }, delays: { pause: 1000 } }).createMachine({
      id: 'poller', initial: 'polling',
      states: {
        polling: { invoke: { src: 'poll', onDone: 'waiting', onError: 'waiting' }, on: { STOP: 'stopped' } },
        waiting: { after: { pause: 'polling' }, on: { STOP: stopWhileWaiting ? 'stopped' : ignored('finish the pause first') } },
        stopped: { type: 'final' },
      },
    });
  const model = { name: 'poller', events: { STOP: { type: 'STOP' } }, leadsTo: [{ name: 'STOP stops it', after: ['STOP'] }] };
  t.same(found(checkMachine({ ...model, machine: poller(true) })), []);
  const result = checkMachine({ ...model, machine: poller(false) });
  t.match(found(result), [{ check: 'leads-to', name: 'STOP stops it', message: /after STOP a path can go round a cycle through (polling|waiting) forever/ }]);
  const path = labels(result, 'leads-to')[0]!;
  t.same(path, ['poll done', 'STOP', 'after pause', 'poll done'], 'the trigger in the first state that ignores it, then once round the cycle');
  t.same(result.violations[0]!.path!.steps.map((s) => s.state), ['waiting', 'waiting', 'polling', 'waiting']);
});

t.test('a world that sends events forever is not a liveness failure', async (t) => {
  const machine = setup({ actors: { work: fromPromise(async () => undefined) } }).createMachine({
    id: 'm', initial: 'a',
    states: {
      a: { invoke: { src: 'work', onDone: 'end', onError: 'end' }, on: { PING: 'b', STOP: 'end' } },
      b: { invoke: { src: 'work', onDone: 'end', onError: 'end' }, on: { PING: 'a', STOP: 'end' } },
      end: { type: 'final' },
    },
  });
  const result = checkMachine({ name: 'm', machine, events: { PING: { type: 'PING' }, STOP: { type: 'STOP' } }, leadsTo: [{ name: 'STOP', after: ['STOP'] }, { name: 'PING', after: ['PING'] }] });
  t.same(found(result), []);
});

t.test('the exploration is bounded, and an abstraction bounds it', async (t) => {
  const counter = setup({ types: { context: {} as { n: number } } }).createMachine({
    id: 'counter', initial: 'counting', context: { n: 0 },
    states: {
      counting: { on: { TICK: { actions: assign({ n: ({ context }) => context.n + 1 }) }, STOP: 'stopped' } },
      stopped: { type: 'final' },
    },
  });
  const model = { name: 'counter', machine: counter, events: { TICK: { type: 'TICK' }, STOP: { type: 'STOP' } }, maxStates: 50 };
  t.match(found(checkMachine(model)), [{ check: 'bound', message: /explored more than 50 states without finishing: abstract more of the context/ }]);
  t.same(found(checkMachine({ ...model, abstract: () => null })), [], 'no guard reads the count: abstracted away, two states');
});

t.test('paths: one per explored state, each finished to a final state; seeded random walks', async (t) => {
  const result = checkMachine({ name: 'lamp', machine: lamp, events: LAMP_EVENTS });
  const paths = result.paths();
  t.same(paths.map((p) => p.steps.map((s) => s.label)), [['BREAK'], ['SWITCH', 'BREAK']], 'off, on and broken are all on these two');
  for (const path of paths) t.equal(path.end.status, 'done');
  t.same(paths[1]!.steps.map((s) => s.state), ['on', 'broken']);
  t.same(paths[1]!.steps[0]!.facts.taken, ['lamp.off SWITCH']);

  const walks = (seed: number) => result.randomWalks({ seed, count: 5, maxSteps: 6 }).map((p) => p.steps.map((s) => s.label).join(' '));
  t.same(walks(7), walks(7), 'the same seed, the same walks');
  t.not(walks(7).join('|'), walks(8).join('|'), 'another seed, other walks');
  for (const walk of result.randomWalks({ seed: 1, count: 20, maxSteps: 3 })) {
    t.equal(walk.end.status, 'done', 'every walk is finished the shortest way');
    t.ok(walk.steps.length <= 4);
  }
});
