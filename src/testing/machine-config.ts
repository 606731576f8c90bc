/**
 * An xstate v5 machine's definition as data: copy its config, change the
 * copy, build a machine from it with the same implementations (actors,
 * guards, actions, delays).
 *
 * The model checker builds an instrumented copy, in which every state
 * entry and exit and every transition reports itself as an action (so a
 * pure `getMicrosteps` says what a step entered and which transitions it
 * took, re-entries and transient states included). Mutation tests build
 * broken copies to prove the checker catches them.
 *
 * Transitions are named by `transitionKey`, from the built state nodes, so
 * the copy and the original machine give the same names: a real actor's
 * inspection events (`@xstate.microstep`) can be matched against the model.
 */
import { createMachine, fromPromise, type AnyStateMachine, type AnyStateNode, type AnyTransitionDefinition } from 'xstate';
import { describeEventType } from '../machines/diagram.js';

/** The raw config of one state node (or of the machine): what `createMachine` was given. */
export type StateConfig = Record<string, any>;

export const CHECK_ENTER = 'drover.check.enter';
export const CHECK_EXIT = 'drover.check.exit';
export const CHECK_TAKE = 'drover.check.take';

/** A deep copy of plain objects and arrays; functions and class instances are shared, as the machine shares them. */
export function cloneConfig<T>(value: T): T {
  if (Array.isArray(value)) return value.map((item: unknown) => cloneConfig(item)) as T;
  if (value !== null && typeof value === 'object') {
    const proto = Object.getPrototypeOf(value) as unknown;
    if (proto !== Object.prototype && proto !== null) return value;
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, cloneConfig(item)])) as T;
  }
  return value;
}

/**
 * Builds a machine from a deep copy of `machine.config` after `change` has
 * edited it; the implementations are the machine's own (plus `actions`).
 */
export function rebuildMachine(
  machine: AnyStateMachine,
  change?: (config: StateConfig) => void,
  actions: Record<string, (...args: any[]) => void> = {},
): AnyStateMachine {
  const config = cloneConfig(machine.config) as StateConfig;
  change?.(config);
  const implementations = machine.implementations as unknown as Record<string, Record<string, unknown>>;
  return createMachine(config as any, { ...implementations, actions: { ...implementations['actions'], ...actions } } as any);
}

/** The config of the state at `path` (`claimed.uploading.reporting`) inside a machine config; throws when there is none. */
export function stateConfig(config: StateConfig, path: string): StateConfig {
  let node = config;
  for (const key of path.split('.').filter((part) => part !== '')) {
    const next = (node['states'] as Record<string, StateConfig> | undefined)?.[key];
    if (next === undefined) throw new Error(`no state "${path}" in machine "${String(config['id'])}" (missing "${key}")`);
    node = next;
  }
  return node;
}

/** Every state node of the machine, the root first, in document order. */
export function allStateNodes(machine: AnyStateMachine): AnyStateNode[] {
  const nodes: AnyStateNode[] = [];
  const visit = (node: AnyStateNode) => {
    nodes.push(node);
    for (const child of Object.values(node.states)) visit(child);
  };
  visit(machine.root);
  return nodes;
}

/** Every transition the machine declares: `on`, `always`, `after`, invoke `onDone`/`onError`, in document order. */
export function allTransitions(machine: AnyStateMachine): AnyTransitionDefinition[] {
  return allStateNodes(machine).flatMap((node) => [...[...node.transitions.values()].flat(), ...(node.always ?? [])]);
}

/** True for a transition that consumes its event on purpose: targetless, described `ignored: why`. */
export function isIgnored(transition: AnyTransitionDefinition): boolean {
  return transition.target === undefined && typeof transition.description === 'string' && transition.description.startsWith('ignored:');
}

/**
 * A stable, readable name for a transition: its source state, its event,
 * and its place among the candidates for that event when there are several:
 * `task.claimed.running.stopping done(stop)#1`, `worker.claiming.spawning always#2`.
 */
export function transitionKey(transition: AnyTransitionDefinition): string {
  const source = transition.source;
  const always = source.always ?? [];
  if (always.includes(transition)) return `${source.id} always${always.length > 1 ? `#${always.indexOf(transition)}` : ''}`;
  const candidates = source.transitions.get(transition.eventType) ?? [transition];
  const index = Math.max(candidates.indexOf(transition), 0);
  return `${source.id} ${describeEventType(source, transition.eventType)}${candidates.length > 1 ? `#${index}` : ''}`;
}

function toArray<T>(value: T | readonly T[] | undefined): T[] {
  if (value === undefined) return [];
  return Array.isArray(value) ? [...(value as T[])] : [value as T];
}

/** A transition config (string target, object, or a list of them) with one more action at the end of each. */
function withAction(transition: unknown, action: () => object): unknown {
  if (transition === undefined || transition === null) return transition;
  if (Array.isArray(transition)) return transition.map((item: unknown) => withAction(item, action));
  const config: StateConfig = typeof transition === 'string' ? { target: transition } : { ...(transition as StateConfig) };
  config['actions'] = [...toArray(config['actions']), action()];
  return config;
}

function instrumentState(config: StateConfig): void {
  config['entry'] = [{ type: CHECK_ENTER, params: { id: '' } }, ...toArray(config['entry'])];
  config['exit'] = [...toArray(config['exit']), { type: CHECK_EXIT, params: { id: '' } }];
  // A fresh action object per transition: its params are filled in with the transition's key once built.
  const take = () => ({ type: CHECK_TAKE, params: { key: '' } });
  for (const field of ['on', 'after'] as const) {
    const map = config[field] as StateConfig | undefined;
    if (map !== undefined) config[field] = Object.fromEntries(Object.entries(map).map(([event, t]) => [event, withAction(t, take)]));
  }
  if (config['always'] !== undefined) config['always'] = withAction(config['always'], take);
  if (config['invoke'] !== undefined) {
    const invokes = toArray(config['invoke'] as StateConfig).map((invoke) => {
      const copy: StateConfig = { ...invoke };
      for (const field of ['onDone', 'onError', 'onSnapshot']) if (copy[field] !== undefined) copy[field] = withAction(copy[field], take);
      return copy;
    });
    config['invoke'] = Array.isArray(config['invoke']) ? invokes : invokes[0];
  }
  for (const child of Object.values((config['states'] ?? {}) as Record<string, StateConfig>)) instrumentState(child);
}

/** Stands in for every actor in a pure exploration, where actors are created but never started. */
const INERT_ACTOR = fromPromise<never>(() => new Promise<never>(() => {}));

/**
 * A copy of `machine` whose every state entry, exit and transition runs a
 * no-op action naming it (CHECK_ENTER / CHECK_EXIT with `params.id`,
 * CHECK_TAKE with `params.key`). Its transitions are the original's. With
 * `inertActors`, every actor it invokes or spawns is an inert stand-in:
 * pure steps create actors without starting them, and creating a machine
 * actor (the worker's task machines) costs a whole initial state.
 */
export function instrumentMachine(machine: AnyStateMachine, options: { readonly inertActors?: boolean } = {}): AnyStateMachine {
  const noop = () => {};
  const actors = machine.implementations.actors as Record<string, unknown>;
  const source = options.inertActors ? machine.provide({ actors: Object.fromEntries(Object.keys(actors).map((name) => [name, INERT_ACTOR])) }) : machine;
  const copy = rebuildMachine(source, instrumentState, { [CHECK_ENTER]: noop, [CHECK_EXIT]: noop, [CHECK_TAKE]: noop });
  // The names are known only once xstate has built the nodes: fill them into the actions' params.
  const named = (actions: readonly unknown[], type: string): Record<string, string>[] =>
    actions.filter((action): action is { type: string; params: Record<string, string> } => (action as { type?: unknown })?.type === type).map((a) => a.params);
  for (const node of allStateNodes(copy)) {
    for (const params of named(node.entry, CHECK_ENTER)) params['id'] = node.id;
    for (const params of named(node.exit, CHECK_EXIT)) params['id'] = node.id;
  }
  for (const transition of allTransitions(copy)) {
    for (const params of named(transition.actions, CHECK_TAKE)) params['key'] = transitionKey(transition);
  }
  return copy;
}
