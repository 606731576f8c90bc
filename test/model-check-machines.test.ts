/**
 * The model checks of every machine in src/machines (their models are in
 * src/testing/machine-models.ts): reachability, no deadlock, every event
 * answered in every state, and each machine's invariants. A machine file
 * without a model fails here, so a new machine cannot go unchecked.
 */
import { readdirSync } from 'node:fs';
import t from 'tap';
import { StateMachine } from 'xstate';
import { MACHINE_MODELS } from '../src/testing/machine-models.js';
import { checkModel } from '../src/testing/model-check.js';

for (const model of MACHINE_MODELS) {
  t.test(`the ${model.name} machine`, async (t) => {
    const started = performance.now();
    checkModel(t, model);
    t.comment(`${model.name}: checked in ${Math.round(performance.now() - started)} ms`);
  });
}

t.test('every machine exported by src/machines has a model', async (t) => {
  const dir = new URL('../src/machines/', import.meta.url);
  const files = readdirSync(dir).filter((name) => name.endsWith('.ts') && !name.endsWith('.d.ts'));
  const modelled = new Set(MACHINE_MODELS.map((model) => model.machine));
  const found: string[] = [];
  for (const file of files) {
    const exports = (await import(new URL(file.replace(/\.ts$/, '.js'), dir).href)) as Record<string, unknown>;
    for (const [name, value] of Object.entries(exports)) {
      if (!(value instanceof StateMachine)) continue;
      found.push(`${file}: ${name}`);
      t.ok(modelled.has(value), `${file}: ${name} has a model in MACHINE_MODELS (src/testing/machine-models.ts)`);
    }
  }
  t.ok(found.length >= 2, `found the machines: ${found.join(', ')}`);
  t.equal(new Set(MACHINE_MODELS.map((model) => model.name)).size, MACHINE_MODELS.length, 'model names are unique (the diagram command uses them)');
});
