/**
 * State diagrams drawn from the machine definitions themselves, so they
 * cannot drift from the code: `drover diagram` prints them, docs/machines.md
 * embeds them, and a test fails when the two differ.
 *
 * The state node tree is walked once into a plain description (states,
 * what each invokes, the transitions to draw, the events it ignores), which
 * two renderers turn into Mermaid (stateDiagram-v2) or Graphviz DOT.
 * Transitions whose description starts with "ignored:" are not drawn; the
 * Mermaid output lists them in comments. Mermaid cannot draw a transition
 * between states inside different composite states, so such a transition is
 * drawn between the outermost states that separate its ends, labelled with
 * where inside it starts.
 */
import type { AnyStateMachine, AnyStateNode, AnyTransitionDefinition } from 'xstate';

export type DiagramFormat = 'mermaid' | 'dot';
export const DIAGRAM_FORMATS: readonly DiagramFormat[] = ['mermaid', 'dot'];

/** One drawn transition: from a state to another (or itself), with what triggers it. */
interface Arrow {
  readonly source: AnyStateNode;
  readonly target: AnyStateNode;
  /** `CANCEL`, `done(load)`, `after maxRunTime [hasMaxRunTime]`. */
  readonly label: string;
}

/** `xstate.done.actor.0.task.claimed.loading` → `done(load)`; `xstate.after.maxRunTime.task.x` → `after maxRunTime`. */
export function describeEventType(node: AnyStateNode, eventType: string): string {
  if (eventType === '') return 'always';
  const actor = /^xstate\.(done|error)\.actor\.(.+)$/.exec(eventType);
  if (actor !== null) {
    // An invoked actor by its src; a spawned one (or a wildcard over them) by its id.
    const invoked = node.invoke.find((invoke) => invoke.id === actor[2]);
    return `${actor[1]}(${invoked === undefined ? actor[2] : typeof invoked.src === 'string' ? invoked.src : invoked.id})`;
  }
  const delayed = node.after.find((transition) => transition.eventType === eventType);
  if (delayed !== undefined) return `after ${String(delayed.delay)}`;
  return eventType;
}

function guardName(transition: AnyTransitionDefinition): string | undefined {
  const guard = transition.guard as unknown;
  if (guard === undefined) return undefined;
  if (typeof guard === 'string') return guard;
  if (typeof guard === 'object' && guard !== null && typeof (guard as { type?: unknown }).type === 'string') return (guard as { type: string }).type;
  const name = typeof guard === 'function' ? guard.name : '';
  return name !== '' && name !== 'guard' ? name : 'guarded';
}

function isIgnoredTransition(transition: AnyTransitionDefinition): boolean {
  return transition.target === undefined && typeof transition.description === 'string' && transition.description.startsWith('ignored:');
}

function childrenOf(node: AnyStateNode): AnyStateNode[] {
  return Object.values(node.states);
}

function allNodes(node: AnyStateNode): AnyStateNode[] {
  return [node, ...childrenOf(node).flatMap(allNodes)];
}

function declaredTransitions(node: AnyStateNode): AnyTransitionDefinition[] {
  return [...[...node.transitions.values()].flat(), ...(node.always ?? [])];
}

/** What the renderers draw: the arrows, and per state what it invokes and ignores. */
function describe(machine: AnyStateMachine) {
  const arrows: Arrow[] = [];
  const ignored = new Map<AnyStateNode, string[]>();
  const internal = new Map<AnyStateNode, string[]>();
  for (const node of allNodes(machine.root)) {
    for (const transition of declaredTransitions(node)) {
      const event = describeEventType(node, transition.eventType);
      const guard = guardName(transition);
      const label = guard === undefined ? event : `${event} [${guard}]`;
      if (isIgnoredTransition(transition)) {
        ignored.set(node, [...(ignored.get(node) ?? []), event]);
      } else if (transition.target === undefined || transition.target.length === 0) {
        // A transition that stays put but acts: a self-loop on a simple state, a note on a composite one.
        if (childrenOf(node).length === 0) arrows.push({ source: node, target: node, label });
        else internal.set(node, [...(internal.get(node) ?? []), label]);
      } else {
        for (const target of transition.target) arrows.push({ source: node, target, label });
      }
    }
  }
  return { arrows, ignored, internal };
}

/** The chain of states from the root (excluded) down to `node`. */
function lineage(node: AnyStateNode): AnyStateNode[] {
  const chain: AnyStateNode[] = [];
  for (let at: AnyStateNode | undefined = node; at?.parent !== undefined; at = at.parent) chain.unshift(at);
  return chain;
}

/** Prints a machine as a Mermaid state diagram. */
export function toMermaid(machine: AnyStateMachine): string {
  const { arrows, ignored, internal } = describe(machine);
  const id = (node: AnyStateNode) => lineage(node).map((n) => n.key).join('_');
  // Each arrow goes in the block of the lowest composite holding both ends, between its children.
  const placed = new Map<AnyStateNode, Map<string, { from: string; to: string; labels: Map<string, string[]> }>>();
  for (const arrow of arrows) {
    const from = lineage(arrow.source);
    const to = lineage(arrow.target);
    let common = 0;
    while (common < from.length - 1 && common < to.length - 1 && from[common] === to[common]) common++;
    const block = common === 0 ? machine.root : from[common - 1]!;
    const lifted = { from: from[common]!, to: to[common]! };
    const inner = (chain: AnyStateNode[]) => chain.slice(common + 1).map((n) => n.key).join('.');
    const key = `${id(lifted.from)} ${id(lifted.to)}`;
    const edges = placed.get(block) ?? new Map();
    placed.set(block, edges);
    const edge = edges.get(key) ?? { from: id(lifted.from), to: id(lifted.to), labels: new Map() };
    // Labels grouped by where inside the lifted source the transition starts.
    const group = edge.labels.get(inner(from)) ?? [];
    const text = `${arrow.label}${inner(to) ? ` → ${inner(to)}` : ''}`;
    if (!group.includes(text)) group.push(text);
    edge.labels.set(inner(from), group);
    edges.set(key, edge);
  }
  const labelOf = (labels: Map<string, string[]>) =>
    [...labels].map(([inner, texts]) => `${inner ? `${inner}: ` : ''}${texts.join(', ')}`).join(' · ');
  const lines: string[] = ['stateDiagram-v2'];
  const block = (node: AnyStateNode, indent: string) => {
    const children = childrenOf(node);
    if (node.initial?.target[0] !== undefined) lines.push(`${indent}[*] --> ${id(node.initial.target[0])}`);
    for (const child of children) {
      const invokes = child.invoke.map((invoke) => (typeof invoke.src === 'string' ? invoke.src : invoke.id));
      const name = child.key + (invokes.length > 0 && childrenOf(child).length > 0 ? ` · invokes ${invokes.join(', ')}` : '');
      if (childrenOf(child).length > 0) {
        lines.push(`${indent}state "${name}" as ${id(child)} {`);
        block(child, indent + '  ');
        lines.push(`${indent}}`);
      } else {
        lines.push(`${indent}state "${name}" as ${id(child)}`);
        if (invokes.length > 0) lines.push(`${indent}${id(child)} : invokes ${invokes.join(', ')}`);
      }
      if (child.type === 'final') lines.push(`${indent}${id(child)} --> [*]`);
    }
    for (const edge of placed.get(node)?.values() ?? []) lines.push(`${indent}${edge.from} --> ${edge.to} : ${labelOf(edge.labels)}`);
    for (const child of [node, ...children]) {
      const where = child === node ? (node.parent === undefined ? 'the machine' : node.key) : child.key;
      if (child !== node && childrenOf(child).length > 0) continue;
      if (internal.has(child)) lines.push(`${indent}%% ${where} handles without leaving: ${internal.get(child)!.join(', ')}`);
      if (ignored.has(child)) lines.push(`${indent}%% ${where} ignores: ${ignored.get(child)!.join(', ')}`);
    }
  };
  block(machine.root, '  ');
  return lines.join('\n') + '\n';
}

/** Prints a machine as a Graphviz digraph, composite states as clusters. */
export function toDot(machine: AnyStateMachine): string {
  const { arrows } = describe(machine);
  const id = (node: AnyStateNode) => JSON.stringify(node.id);
  const isComposite = (node: AnyStateNode) => childrenOf(node).length > 0;
  // Graphviz draws arrows between nodes only: a composite end is its initial simple state, clipped at the cluster.
  const entry = (node: AnyStateNode): AnyStateNode => {
    const first = node.initial?.target[0] ?? childrenOf(node)[0];
    return isComposite(node) && first !== undefined ? entry(first) : node;
  };
  const cluster = (node: AnyStateNode) => JSON.stringify(`cluster_${node.id}`);
  const lines = [`digraph ${JSON.stringify(machine.id)} {`, '  compound=true;', '  node [shape=box, style=rounded];', '  start [shape=point, label=""];'];
  const block = (node: AnyStateNode, indent: string) => {
    for (const child of childrenOf(node)) {
      const invokes = child.invoke.map((invoke) => (typeof invoke.src === 'string' ? invoke.src : invoke.id));
      const label = JSON.stringify(child.key + (invokes.length > 0 ? `\ninvokes ${invokes.join(', ')}` : ''));
      if (isComposite(child)) {
        lines.push(`${indent}subgraph ${cluster(child)} {`, `${indent}  label=${label};`);
        block(child, indent + '  ');
        lines.push(`${indent}}`);
      } else {
        lines.push(`${indent}${id(child)} [label=${label}${child.type === 'final' ? ', shape=doublecircle' : ''}];`);
      }
    }
  };
  block(machine.root, '  ');
  lines.push(`  start -> ${id(entry(machine.root))};`);
  // One arrow per pair of states, its labels one per line.
  const pairs = new Map<string, { source: AnyStateNode; target: AnyStateNode; labels: string[] }>();
  for (const { source, target, label } of arrows) {
    const pair = pairs.get(`${source.id} ${target.id}`) ?? { source, target, labels: [] };
    if (!pair.labels.includes(label)) pair.labels.push(label);
    pairs.set(`${source.id} ${target.id}`, pair);
  }
  for (const { source, target, labels } of pairs.values()) {
    const attributes = [`label=${JSON.stringify(labels.join('\n'))}`];
    if (isComposite(source)) attributes.push(`ltail=${cluster(source)}`);
    if (isComposite(target)) attributes.push(`lhead=${cluster(target)}`);
    lines.push(`  ${id(entry(source))} -> ${id(entry(target))} [${attributes.join(', ')}];`);
  }
  lines.push('}');
  return lines.join('\n') + '\n';
}

export function drawMachine(machine: AnyStateMachine, format: DiagramFormat): string {
  return format === 'dot' ? toDot(machine) : toMermaid(machine);
}
