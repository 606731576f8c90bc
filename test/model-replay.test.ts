/**
 * Model-based tests of the task runner: every path the model checker finds
 * through the task machine (the shortest way to each state it can reach,
 * finished the shortest way), and seeded random walks, replayed against the
 * real runner (createTaskActors, the mock engine, the in-memory queue, the
 * livelog plugin and a probe): the real run must visit the same states,
 * take the same transitions, call the plugin hooks the contract says, in
 * that order, and end with the same resolution. Every transition of the
 * task machine must be taken by some replay.
 */
import t, { type Test } from 'tap';
import { transitionKey, allTransitions } from '../src/testing/machine-config.js';
import { taskModel } from '../src/testing/machine-models.js';
import { checkMachine, formatPath, type ModelPath } from '../src/testing/model-check.js';
import { replayTaskPath, unrealizable, type ReplayResult } from '../src/testing/task-replay.js';

/** Replays run side by side (each has its own queue, engine and clock): a lost claim waits for a reclaim period. */
const AT_ONCE = 48;
const WALKS = { seed: 20261122, count: 40, maxSteps: 10 };


/** Replays every path, AT_ONCE at a time: a new one starts as soon as one ends. */
async function replayAll(paths: readonly ModelPath[]): Promise<ReplayResult[]> {
  const results = new Array<ReplayResult>(paths.length);
  let next = 0;
  const lane = async () => {
    for (let i = next++; i < paths.length; i = next++) results[i] = await replayTaskPath(paths[i]!);
  };
  await Promise.all(Array.from({ length: Math.min(AT_ONCE, paths.length) }, lane));
  return results;
}

const covered = new Set<string>();
const all = allTransitions(taskModel.machine).map(transitionKey);

function check(t: Test, results: readonly ReplayResult[]): void {
  const skipped = new Map<string, number>();
  for (const result of results) {
    if (result.skipped !== undefined) {
      skipped.set(result.skipped, (skipped.get(result.skipped) ?? 0) + 1);
      continue;
    }
    for (const key of result.taken) covered.add(key);
    const name = result.path.steps.map((step) => step.label).join(' → ');
    t.same(result.problems, [], `${name}: the real run matches the model`, { path: formatPath(result.path) });
    t.same(result.hooks, result.expectedHooks, `${name}: plugin hooks in order`);
  }
  const replayed = results.length - [...skipped.values()].reduce((a, b) => a + b, 0);
  t.comment(`replayed ${replayed} of ${results.length} paths; skipped: ${[...skipped].map(([why, n]) => `${n} (${why})`).join('; ') || 'none'}`);
  t.ok(replayed >= results.length / 2, 'most paths can be replayed');
}

const model = checkMachine(taskModel);

t.test('every shortest path of the task machine, against the real runner', async (t) => {
  const started = performance.now();
  const paths = model.paths();
  check(t, await replayAll(paths));
  t.comment(`${paths.length} paths in ${Math.round(performance.now() - started)} ms`);
});

t.test('a path through every transition, against the real runner', async (t) => {
  // Shortest paths to states miss some transitions (every "ignored here" one, and those whose
  // target is reached more briefly another way): one path per transition, among those the real parts can produce.
  const started = performance.now();
  const seen = new Set(model.paths().map((path) => path.steps.map((step) => step.label).join('|')));
  const paths = model.transitionPaths((path) => unrealizable(path) === undefined).filter((path) => !seen.has(path.steps.map((step) => step.label).join('|')));
  check(t, await replayAll(paths));
  t.comment(`${paths.length} more paths in ${Math.round(performance.now() - started)} ms`);
});

t.test(`seeded random walks (seed ${WALKS.seed})`, async (t) => {
  const started = performance.now();
  const walks = model.randomWalks(WALKS);
  check(t, await replayAll(walks));
  t.comment(`${walks.length} walks in ${Math.round(performance.now() - started)} ms`);
});

t.test('every task-machine transition was taken by the real runner', async (t) => {
  const missing = all.filter((key) => !covered.has(key));
  t.comment(`covered ${all.length - missing.length}/${all.length} transitions`);
  t.same(missing, [], 'transitions no replay took');
});

t.test('a replay catches a run that differs from the model', async (t) => {
  const happy = model.paths().find((path) => path.steps.map((step) => step.label).join(' → ') === 'load done → run done: exit 0 → upload done → report done → cleanup done');
  if (happy === undefined) throw new Error('no happy path in the model');
  // The model is told the command exits 1 (so the mock does), but still expects the run to complete.
  const exit1 = { ...happy, steps: happy.steps.map((step) => (step.actor?.src === 'run' ? { ...step, event: { ...step.event, output: { exitCode: 1, signal: null, durationMs: 0 } } } : step)) };
  const differs = await replayTaskPath(exit1);
  t.same(differs.problems, ['the run ended reported failed, the model reported completed']);
  // The model claims a transition the machine does not take.
  const wrong = { ...happy, steps: happy.steps.map((step, i) => (i === 1 ? { ...step, facts: { ...step.facts, taken: ['task.claimed.running.executing MAX_RUN_TIME'] } } : step)) };
  t.match((await replayTaskPath(wrong)).problems, [/^after step 2 \(run done: exit 0\) the run took \[.*done\(run\)\], the model \[.*MAX_RUN_TIME\]/]);
});
