/**
 * Diagrams drawn from the machine definitions: the generator draws every
 * state and every transition but the ignored ones, `drover diagram` prints
 * them, and docs/machines.md embeds exactly what the machines draw today.
 *
 * When a machine changes, update the docs with
 *     DROVER_UPDATE_DIAGRAMS=1 npx tap test/diagram.test.ts
 * and then read the explanations around the diagrams: they may need words too.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import t from 'tap';
import { setup } from 'xstate';
import { createDiagramCommand } from '../src/cli/diagram.js';
import { ignored } from '../src/machines/task.js';
import { describeEventType, toDot, toMermaid } from '../src/machines/diagram.js';
import { allStateNodes, allTransitions, isIgnored } from '../src/testing/machine-config.js';
import { MACHINE_MODELS } from '../src/testing/machine-models.js';

const DOCS = new URL('../docs/machines.md', import.meta.url);

/** The Markdown block docs/machines.md holds for a machine, between its markers. */
function docBlock(name: string, mermaid: string): string {
  return `<!-- diagram:${name} (generated: do not edit by hand) -->\n\`\`\`mermaid\n${mermaid}\`\`\`\n<!-- /diagram:${name} -->`;
}

t.test('docs/machines.md embeds the diagram of every machine, as the machines draw it now', async (t) => {
  let docs = readFileSync(DOCS, 'utf8');
  const update = process.env['DROVER_UPDATE_DIAGRAMS'] === '1';
  for (const { name, machine } of MACHINE_MODELS) {
    const pattern = new RegExp(`<!-- diagram:${name} [^>]*-->[\\s\\S]*?<!-- /diagram:${name} -->`);
    const expected = docBlock(name, toMermaid(machine));
    const found = pattern.exec(docs)?.[0];
    t.ok(found, `docs/machines.md has a diagram block for ${name}`);
    if (update && found !== undefined) docs = docs.replace(pattern, () => expected);
    else t.equal(found, expected, `the ${name} diagram in docs/machines.md matches the machine: DROVER_UPDATE_DIAGRAMS=1 npx tap test/diagram.test.ts updates it`);
  }
  if (update) writeFileSync(DOCS, docs);
});

t.test('the Mermaid diagram draws every state and every transition but the ignored ones', async (t) => {
  for (const { name, machine } of MACHINE_MODELS) {
    const mermaid = toMermaid(machine);
    t.match(mermaid, /^stateDiagram-v2\n/, name);
    for (const node of allStateNodes(machine).slice(1)) t.match(mermaid, `state "${node.key}`, `${name}: state ${node.id} is drawn`);
    const arrows = mermaid.split('\n').filter((line) => line.includes(' --> ')).join('\n');
    const notes = mermaid.split('\n').filter((line) => line.includes('%%')).join('\n');
    for (const transition of allTransitions(machine)) {
      const event = describeEventType(transition.source, transition.eventType);
      if (isIgnored(transition)) t.match(notes, new RegExp(`%% ${transition.source.key} ignores: .*${escape(event)}`), `${name}: ${transition.source.id} ignores ${event}, noted`);
      else t.match(`${arrows}\n${notes}`, event, `${name}: ${transition.source.id} ${event} is drawn`);
    }
    t.notMatch(arrows, 'ignored:', 'the why of an ignored event is not drawn');
  }
});

t.test('a transition between states of different composites is drawn between the states that separate them', async (t) => {
  const machine = setup({}).createMachine({
    id: 'm', initial: 'a',
    states: {
      a: { initial: 'a1', states: { a1: { on: { NEXT: 'a2', JUMP: '#m.b.b2' } }, a2: { on: { NEXT: '#m.end', WAIT: ignored('later') } } } },
      b: { initial: 'b1', states: { b1: {}, b2: {} } },
      end: { type: 'final' },
    },
  });
  t.equal(toMermaid(machine), [
    'stateDiagram-v2',
    '  [*] --> a',
    '  state "a" as a {',
    '    [*] --> a_a1',
    '    state "a1" as a_a1',
    '    state "a2" as a_a2',
    '    a_a1 --> a_a2 : NEXT',
    '    %% a2 ignores: WAIT',
    '  }',
    '  state "b" as b {',
    '    [*] --> b_b1',
    '    state "b1" as b_b1',
    '    state "b2" as b_b2',
    '  }',
    '  state "end" as end',
    '  end --> [*]',
    '  a --> b : a1: JUMP → b2',
    '  a --> end : a2: NEXT',
    '',
  ].join('\n'));
  t.equal(toDot(machine), [
    'digraph "m" {',
    '  compound=true;',
    '  node [shape=box, style=rounded];',
    '  start [shape=point, label=""];',
    '  subgraph "cluster_m.a" {',
    '    label="a";',
    '    "m.a.a1" [label="a1"];',
    '    "m.a.a2" [label="a2"];',
    '  }',
    '  subgraph "cluster_m.b" {',
    '    label="b";',
    '    "m.b.b1" [label="b1"];',
    '    "m.b.b2" [label="b2"];',
    '  }',
    '  "m.end" [label="end", shape=doublecircle];',
    '  start -> "m.a.a1";',
    '  "m.a.a1" -> "m.a.a2" [label="NEXT"];',
    '  "m.a.a1" -> "m.b.b2" [label="JUMP"];',
    '  "m.a.a2" -> "m.end" [label="NEXT"];',
    '}',
    '',
  ].join('\n'));
});

t.test('drover diagram', async (t) => {
  const run = async (positionals: string[], values: Record<string, string> = {}) => {
    let out = '';
    const code = await createDiagramCommand((text) => void (out += text)).run(values, positionals);
    return { code, out };
  };
  const task = MACHINE_MODELS.find((model) => model.name === 'task')!;
  t.same(await run(['task']), { code: 0, out: toMermaid(task.machine) }, 'Mermaid by default');
  t.same(await run(['task'], { format: 'dot' }), { code: 0, out: toDot(task.machine) });
  t.match((await run(['worker'], { format: 'mermaid' })).out, /^stateDiagram-v2\n {2}\[\*\] --> booting\n/);
  await t.rejects(run([]), { name: 'UsageError', message: 'which machine? one of: task, worker' });
  await t.rejects(run(['lamp']), { name: 'UsageError', message: 'there is no machine "lamp"; there are: task, worker' });
  await t.rejects(run(['task', 'worker']), { name: 'UsageError', message: 'one machine at a time, not "task worker"' });
  await t.rejects(run(['task'], { format: 'svg' }), { name: 'UsageError', message: '--format must be one of mermaid, dot, not "svg"' });
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
