/**
 * A small model checker for xstate v5 machines (exported as drover/testing).
 *
 * It explores every state a machine can reach, breadth first, with the
 * machine's pure `transition` on an instrumented copy of it (see
 * machine-config.ts), collecting the actions every step would run, and checks:
 *
 *  - every declared state is reachable;
 *  - from every reachable state a final state can still be reached (no
 *    deadlock, no trap);
 *  - every state answers every event of the alphabet explicitly: with a
 *    transition, or with a targetless one described "ignored: why";
 *  - the machine never fails (an actor error nobody handles, a throwing action);
 *  - invariants: monitors folded over every path (PathInvariant);
 *  - leads-to properties: after a trigger event, every path without another
 *    trigger reaches a target (LeadsTo).
 *
 * A violation comes with the shortest path (event sequence) that shows it.
 *
 * Why its own traversal rather than xstate/graph's: the invariants are
 * monitors explored together with the machine (their state is part of the
 * explored state), and the environment depends on what is alive (which
 * children can finish, which timers can fire); both need the actions of
 * every step, which the graph helpers do not give. (Nor does it use
 * `getMicrosteps`: each call builds a whole actor of the machine first.)
 *
 * The environment is part of the model: the machine's actors finish when
 * the model says so. Each live child (invoked or spawned) may complete with
 * any output the model lists for its `src` (`xstate.done.actor.<id>`) or
 * fail with any of its errors (`xstate.error.actor.<id>`); each pending
 * timer may fire, once (`xstate.after.<delay>.<state>`, or a delayed
 * `raise`); and every external event of the alphabet may arrive in every
 * state. Children and timers are tracked from the steps' actions. Contexts are
 * abstracted by `model.abstract` (what the guards read), which keeps the
 * explored graph small and finite.
 */
import type { Test } from 'tap';
import { createActor, fromPromise, getStateNodes, type AnyActorScope, type AnyMachineSnapshot, type AnyStateMachine, type EventFromLogic, type EventObject, type SnapshotFrom } from 'xstate';
import { CHECK_ENTER, CHECK_EXIT, CHECK_TAKE, allStateNodes, allTransitions, instrumentMachine, isIgnored, transitionKey } from './machine-config.js';
import { findCycles, reachingTo, shortestCycle, shortestRoute } from './model-graph.js';

/** Outputs (or errors) an actor may finish with, by a label for people: `{ 'exit 0': {...}, 'exit 1': {...} }`. */
export type Outcomes = Readonly<Record<string, unknown>>;

/** A child actor of the machine, invoked or spawned, that has not finished. */
export interface LiveChild {
  readonly id: string;
  readonly src: string;
  readonly input: unknown;
}

/** What an ActorModel's functions see: the machine's snapshot and the child. */
export interface ChildView<TSnapshot = AnyMachineSnapshot> extends LiveChild {
  readonly snapshot: TSnapshot;
  /** Every live child, this one included. */
  readonly children: readonly LiveChild[];
}

/**
 * How the actors with one `src` may finish. Defaults: they complete with
 * `undefined` (`{ '': undefined }`) and fail with one Error. `done: {}`
 * means they never complete (a callback actor that only sends events).
 */
export interface ActorModel<TSnapshot = AnyMachineSnapshot> {
  readonly done?: Outcomes | ((view: ChildView<TSnapshot>) => Outcomes);
  readonly errors?: Outcomes | ((view: ChildView<TSnapshot>) => Outcomes);
}

/** One thing that happened inside a step, in order. */
export type Happening =
  | { readonly kind: 'enter'; readonly id: string }
  | { readonly kind: 'exit'; readonly id: string }
  | { readonly kind: 'take'; readonly key: string }
  | { readonly kind: 'start'; readonly id: string; readonly src: string }
  | { readonly kind: 'stop'; readonly id: string };

/** What one step (one event, all its microsteps) did: what invariants read. */
export interface StepFacts {
  /** The event the step processed; `xstate.init` for the start. */
  readonly event: EventObject;
  readonly log: readonly Happening[];
  /** State node ids entered, in order, transient states and re-entries included. */
  readonly entered: readonly string[];
  readonly exited: readonly string[];
  /** Transition keys (see transitionKey) taken, in order. */
  readonly taken: readonly string[];
  /** Children started (invoked or spawned). */
  readonly started: readonly { readonly id: string; readonly src: string }[];
  /** The child whose completion this step's event was, if it was one. */
  readonly completed?: { readonly id: string; readonly src: string; readonly outcome: 'done' | 'error' };
  readonly snapshot: AnyMachineSnapshot;
}

/** What an invariant's `step` returns when the path breaks it. */
export class Violated {
  constructor(readonly message: string) {}
}
export const violated = (message: string): Violated => new Violated(message);

/**
 * A property of paths, as a monitor: `initial` is its state at the start;
 * `step` folds each step into it (or says how the path broke the property);
 * `atEnd` judges a path that reached a final state. The monitor's state is
 * part of the explored state, so keep it small, bounded and JSON-like (cap
 * counters: 0, 1, "more").
 */
export interface PathInvariant<S = any> {
  readonly name: string;
  readonly initial: S;
  step(state: S, step: StepFacts): S | Violated;
  atEnd?(state: S, snapshot: AnyMachineSnapshot): string | undefined;
}

/**
 * After any event whose type is in `after`, in any state, every path that
 * sees no further such event reaches a state where `reach` holds (default:
 * a final state): no state from which it cannot be reached, and no cycle of
 * actor completions and delays that avoids it. Fairness assumed: every live
 * actor eventually finishes, and the world eventually stops sending events.
 */
export interface LeadsTo<TSnapshot = AnyMachineSnapshot> {
  readonly name: string;
  readonly after: readonly string[];
  readonly reach?: (snapshot: TSnapshot) => boolean;
}

export interface MachineModel<M extends AnyStateMachine = AnyStateMachine> {
  /** Names the model in reports; the diagram command uses it too. */
  readonly name: string;
  readonly machine: M;
  /** Inputs to start from (each gives an initial state); vary them so every guard can go both ways. */
  readonly inputs?: readonly unknown[];
  /** The external alphabet, by label; each must be answered in every state. */
  readonly events: Readonly<Record<string, EventFromLogic<M>>> | ((snapshot: SnapshotFrom<M>) => Readonly<Record<string, EventFromLogic<M>>>);
  /** How children finish, by `src`. */
  readonly actors?: Readonly<Record<string, ActorModel<SnapshotFrom<M>>>>;
  /** The part of a snapshot's context that tells states apart (what guards read); default: the whole context. */
  readonly abstract?: (snapshot: SnapshotFrom<M>) => unknown;
  readonly invariants?: readonly PathInvariant[];
  readonly leadsTo?: readonly LeadsTo<SnapshotFrom<M>>[];
  /** Stop exploring after this many states (a violation); default 50 000. */
  readonly maxStates?: number;
  /** Transitions no path takes, by key, each with why it stays in the machine; checkModel fails on any other. */
  readonly deadTransitions?: Readonly<Record<string, string>>;
}

/** One event the environment may send, with what it stands for. */
export interface ModelEvent {
  /** For people, and unique among the events possible in a state: `CANCEL`, `load done: maxRunTime 5 s`. */
  readonly label: string;
  readonly kind: 'event' | 'done' | 'error' | 'after';
  readonly event: EventObject;
  /** The child that finished, for `done` and `error`. */
  readonly actor?: { readonly id: string; readonly src: string };
  /** The outcome's label in the ActorModel, for `done` and `error`. */
  readonly outcome?: string;
  /** The timer that fired, for `after`. */
  readonly timer?: string;
}

export interface ModelStep extends ModelEvent {
  /** The state after the step: `claimed.running.executing`. */
  readonly state: string;
  readonly facts: StepFacts;
}

export interface ModelPath {
  readonly input: unknown;
  /** Which of the model's inputs, and how many it has. */
  readonly inputIndex: number;
  readonly inputCount: number;
  /** The initial state and what starting did. */
  readonly start: { readonly state: string; readonly facts: StepFacts };
  readonly steps: readonly ModelStep[];
  /** The last snapshot; `status === 'done'` when the path reached a final state. */
  readonly end: AnyMachineSnapshot;
}

export type CheckKind = 'unreachable' | 'deadlock' | 'unhandled' | 'machine-error' | 'invariant' | 'leads-to' | 'bound';

export interface Violation {
  readonly check: CheckKind;
  /** The invariant's or leads-to's name, or the check's. */
  readonly name: string;
  readonly message: string;
  /** The shortest path that shows it (empty for an unreachable state). */
  readonly path: ModelPath | undefined;
}

export interface CheckResult {
  readonly model: string;
  /** Explored states (machine state × abstract context × live children × monitors). */
  readonly states: number;
  readonly edges: number;
  /** Declared state node ids, and which of them some path entered. */
  readonly stateNodes: readonly string[];
  readonly reached: ReadonlySet<string>;
  /** Every declared transition's key, which were taken, and which are documented "ignored here". */
  readonly transitions: { readonly all: readonly string[]; readonly taken: ReadonlySet<string>; readonly ignored: readonly string[] };
  readonly violations: readonly Violation[];
  /** The shortest path to every explored state, each continued the shortest way to a final state; no duplicates. */
  paths(): ModelPath[];
  /** Seeded random walks of at most `maxSteps`, each continued the shortest way to a final state. */
  randomWalks(options: { readonly seed: number; readonly count: number; readonly maxSteps: number }): ModelPath[];
  /**
   * For every transition some step takes, a short path that takes it, finished the shortest way
   * (shortest paths to states miss a transition whose target state is reached more briefly another
   * way, and every "ignored here" one). `accept` filters candidates: the first accepted is kept.
   */
  transitionPaths(accept?: (path: ModelPath) => boolean): ModelPath[];
}

/** `{ claimed: { running: 'executing' } }` → `claimed.running.executing`. */
export function stateName(value: unknown): string {
  if (typeof value === 'string') return value;
  const entries = Object.entries((value ?? {}) as Record<string, unknown>).map(([key, child]) => {
    const inner = child === undefined ? '' : stateName(child);
    return inner === '' ? key : `${key}.${inner}`;
  });
  // Parallel regions side by side.
  return entries.join('|');
}

const VIOLATED = '\u0000violated';
const DEFAULT_MAX_STATES = 50_000;

/** A delayed event the machine sent itself (`after`, or `raise` with a delay), not yet fired nor canceled. */
interface Timer {
  readonly id: string;
  readonly event: EventObject;
  readonly delay: unknown;
}

/** What lives beside the machine's snapshot: its children and its pending timers. */
interface World {
  readonly children: readonly LiveChild[];
  readonly timers: readonly Timer[];
}

interface Node {
  readonly inputIndex: number;
  readonly snapshot: AnyMachineSnapshot;
  readonly world: World;
  readonly monitors: readonly unknown[];
  readonly parent: number | undefined;
  readonly via: ModelEvent | undefined;
}

interface Edge {
  readonly to: number;
  readonly via: ModelEvent;
  /** The transitions the step took (keys). */
  readonly taken: readonly string[];
}

type Advanced = { readonly snapshot: AnyMachineSnapshot; readonly world: World; readonly facts: StepFacts };

/** Runs one model through every check; see the file comment. */
export function checkMachine<M extends AnyStateMachine>(model: MachineModel<M>): CheckResult {
  return new Explorer(model as unknown as MachineModel).run();
}

class Explorer {
  private readonly machine: AnyStateMachine;
  private readonly inputs: readonly unknown[];
  private readonly invariants: readonly PathInvariant[];
  private readonly delayNames: ReadonlyMap<string, string>;
  private readonly nodes: Node[] = [];
  private readonly edges: Edge[][] = [];
  private readonly byKey = new Map<string, number>();
  /** The first node of each machine state (state, context, world), whatever its monitors. */
  private readonly byMachineKey = new Map<string, number>();
  private readonly violations: Violation[] = [];
  private readonly reported = new Set<string>();
  private readonly entered = new Set<string>();
  private readonly taken = new Set<string>();

  constructor(private readonly model: MachineModel) {
    this.machine = instrumentMachine(model.machine, { inertActors: true });
    this.inputs = model.inputs ?? [undefined];
    this.invariants = model.invariants ?? [];
    // `after` timers carry the delay in milliseconds; people know them by the delay's name.
    this.delayNames = new Map(allStateNodes(this.machine).flatMap((node) => node.after.map((t) => [t.eventType, String(t.delay)] as const)));
  }

  run(): CheckResult {
    const complete = this.explore();
    if (complete) {
      this.checkReachability();
      this.checkDeadlocks();
      for (const property of this.model.leadsTo ?? []) this.checkLeadsTo(property);
    }
    const transitions = allTransitions(this.machine);
    return {
      model: this.model.name,
      states: this.nodes.length,
      edges: this.edges.reduce((sum, list) => sum + list.length, 0),
      stateNodes: allStateNodes(this.machine).slice(1).map((node) => node.id),
      reached: new Set([...this.entered].filter((id) => id !== this.machine.root.id)),
      transitions: {
        all: transitions.map(transitionKey),
        taken: this.taken,
        ignored: transitions.filter(isIgnored).map(transitionKey),
      },
      violations: this.violations,
      paths: () => this.allPaths(),
      transitionPaths: (accept) => this.transitionPaths(accept ?? (() => true)),
      randomWalks: (options) => this.randomWalks(options),
    };
  }

  // ---- exploration ------------------------------------------------------

  /** Breadth first over (state, abstract context, live children and timers, monitors); false when the bound stopped it. */
  private explore(): boolean {
    const max = this.model.maxStates ?? DEFAULT_MAX_STATES;
    const queue: number[] = [];
    this.inputs.forEach((input, inputIndex) => {
      const started = this.start(input);
      const monitors = this.fold(this.invariants.map((invariant) => invariant.initial), started, undefined, inputIndex, undefined);
      const index = this.add({ inputIndex, snapshot: started.snapshot, world: started.world, monitors, parent: undefined, via: undefined });
      if (index !== undefined) queue.push(index);
    });
    for (let head = 0; head < queue.length; head++) {
      if (this.nodes.length > max) {
        this.violations.push({
          check: 'bound', name: 'bound', path: undefined,
          message: `explored more than ${max} states without finishing: abstract more of the context (model.abstract) or raise maxStates`,
        });
        return false;
      }
      const from = queue[head]!;
      const node = this.nodes[from]!;
      if (node.snapshot.status !== 'active') continue;
      this.checkHandled(from);
      for (const via of this.candidates(node.snapshot, node.world)) {
        let next: Advanced;
        try {
          next = this.advance(node.snapshot, node.world, via);
        } catch (error) {
          this.report('machine-error', `${stateName(node.snapshot.value)}|${via.label}`, 'machine-error', `the machine throws on ${via.label} in ${stateName(node.snapshot.value)}: ${errorText(error)}`, from, via);
          continue;
        }
        if (next.snapshot.status === 'error') {
          this.report('machine-error', `${stateName(node.snapshot.value)}|${via.label}`, 'machine-error',
            `the machine fails on ${via.label} in ${stateName(node.snapshot.value)}: ${errorText((next.snapshot as { error?: unknown }).error)}`, from, via);
        }
        const monitors = this.fold(node.monitors, next, from, node.inputIndex, via);
        const to = this.add({ inputIndex: node.inputIndex, snapshot: next.snapshot, world: next.world, monitors, parent: from, via });
        const target = to ?? this.byKey.get(this.keyOf(node.inputIndex, next.snapshot, next.world, monitors))!;
        this.edges[from]!.push({ to: target, via, taken: next.facts.taken });
        if (to !== undefined) queue.push(to);
      }
    }
    return true;
  }

  /** Adds a node unless an equal one exists; returns its index when it is new. */
  private add(node: Node): number | undefined {
    const key = this.keyOf(node.inputIndex, node.snapshot, node.world, node.monitors);
    if (this.byKey.has(key)) return undefined;
    const index = this.nodes.length;
    this.nodes.push(node);
    this.edges.push([]);
    this.byKey.set(key, index);
    const machineKey = this.machineKeyOf(node.inputIndex, node.snapshot, node.world);
    if (!this.byMachineKey.has(machineKey)) this.byMachineKey.set(machineKey, index);
    return index;
  }

  private machineKeyOf(inputIndex: number, snapshot: AnyMachineSnapshot, world: World): string {
    const context = this.model.abstract ? this.model.abstract(snapshot as never) : snapshot.context;
    const children = world.children.map((c) => `${c.id}:${c.src}`);
    return JSON.stringify([inputIndex, snapshot.status, snapshot.value, context, children, world.timers.map((timer) => timer.id)]);
  }

  private keyOf(inputIndex: number, snapshot: AnyMachineSnapshot, world: World, monitors: readonly unknown[]): string {
    return `${this.machineKeyOf(inputIndex, snapshot, world)}${JSON.stringify(monitors)}`;
  }

  /** Folds a step into every monitor; reports the first violation of each (BFS: the shortest). */
  private fold(monitors: readonly unknown[], step: Advanced, from: number | undefined, inputIndex: number, via: ModelEvent | undefined): unknown[] {
    return this.invariants.map((invariant, i) => {
      let state = monitors[i];
      if (state === VIOLATED) return state;
      const next = invariant.step(state, step.facts);
      const where = () => this.violationPath(from, via, inputIndex);
      if (next instanceof Violated) {
        this.reportPath('invariant', `invariant:${invariant.name}`, invariant.name, next.message, where);
        return VIOLATED;
      }
      state = next;
      if (step.snapshot.status === 'done') {
        const problem = invariant.atEnd?.(state, step.snapshot);
        if (problem !== undefined) {
          this.reportPath('invariant', `invariant:${invariant.name}`, invariant.name, problem, where);
          return VIOLATED;
        }
      }
      return state;
    });
  }

  /** Every event of the alphabet must select a transition (an `ignored:` one counts). */
  private checkHandled(from: number): void {
    const { snapshot } = this.nodes[from]!;
    for (const via of this.externalEvents(snapshot)) {
      if (this.machine.getTransitionData(snapshot as never, via.event as never).length > 0) continue;
      const state = stateName(snapshot.value);
      const declared = getStateNodes(this.machine.root, snapshot.value).some((node) => node.transitions.has(via.event.type));
      const why = declared
        ? `every transition declared for it is guarded, and no guard lets it through here`
        : `it has no transition for it: add one, or a documented ignored("why")`;
      this.report('unhandled', `${state}|${via.event.type}`, 'unhandled', `${state} drops ${via.label} silently: ${why}`, from, via);
    }
  }

  // ---- one step --------------------------------------------------------

  private start(input: unknown): Advanced {
    const { scope, actions } = inertScope();
    const snapshot = this.machine.getInitialSnapshot(scope, input) as AnyMachineSnapshot;
    return this.digest({ type: 'xstate.init' }, snapshot, actions, { children: [], timers: [] }, undefined);
  }

  private advance(snapshot: AnyMachineSnapshot, world: World, via: ModelEvent): Advanced {
    const { scope, actions } = inertScope();
    const next = this.machine.transition(snapshot as never, via.event as never, scope) as AnyMachineSnapshot;
    return this.digest(via.event, next, actions, world, via);
  }

  /** Reads what the step did from the instrumented actions; tracks the live children and timers. */
  private digest(event: EventObject, snapshot: AnyMachineSnapshot, actions: readonly unknown[], before: World, via: ModelEvent | undefined): Advanced {
    const live = new Map(before.children.map((child) => [child.id, child]));
    const timers = new Map(before.timers.map((timer) => [timer.id, timer]));
    // What finished goes first: the step may start a new one under the same id (a re-entered state).
    const completed = via?.actor && { ...via.actor, outcome: via.kind === 'error' ? ('error' as const) : ('done' as const) };
    if (completed !== undefined) live.delete(completed.id);
    if (via?.timer !== undefined) timers.delete(via.timer);
    const log: Happening[] = [];
    for (const action of actions as { type: string; params?: any }[]) {
      const params = action.params;
      switch (action.type) {
        case CHECK_ENTER: log.push({ kind: 'enter', id: params.id }); break;
        case CHECK_EXIT: log.push({ kind: 'exit', id: params.id }); break;
        case CHECK_TAKE: log.push({ kind: 'take', key: params.key }); break;
        case 'xstate.spawnChild': {
          const id: string = params.actorRef?.id ?? params.id;
          const src = typeof params.src === 'string' ? params.src : id;
          live.set(id, { id, src, input: params.input });
          log.push({ kind: 'start', id, src });
          break;
        }
        case 'xstate.raise':
          // A delayed raise is a timer; one without a delay was handled inside the step.
          if (params?.delay !== undefined) {
            const id: string = params.id ?? params.event.type;
            timers.set(id, { id, event: params.event, delay: params.delay });
          }
          break;
        case 'xstate.cancel':
          timers.delete(params.sendId);
          break;
        case 'xstate.stopChild': {
          const id: string | undefined = params?.actorRef?.id ?? params?.id;
          if (id !== undefined) {
            live.delete(id);
            log.push({ kind: 'stop', id });
          }
          break;
        }
      }
    }
    // A machine that is done or failed has stopped all its children and timers.
    const active = snapshot.status === 'active';
    const world: World = { children: active ? [...live.values()].sort(byId) : [], timers: active ? [...timers.values()].sort(byId) : [] };
    const pick = <K extends Happening['kind']>(kind: K) => log.filter((h): h is Extract<Happening, { kind: K }> => h.kind === kind);
    const facts: StepFacts = {
      event,
      log,
      entered: pick('enter').map((h) => h.id),
      exited: pick('exit').map((h) => h.id),
      taken: pick('take').map((h) => h.key),
      started: pick('start').map(({ id, src }) => ({ id, src })),
      ...(completed && { completed }),
      snapshot,
    };
    for (const id of facts.entered) this.entered.add(id);
    for (const key of facts.taken) this.taken.add(key);
    return { snapshot, world, facts };
  }

  /** What the environment may do next: children finish, timers fire, external events arrive. */
  private candidates(snapshot: AnyMachineSnapshot, world: World): ModelEvent[] {
    const { children } = world;
    const events: ModelEvent[] = [];
    for (const child of children) {
      const actor = this.model.actors?.[child.src] ?? {};
      const view: ChildView = { ...child, snapshot, children };
      const done = resolveOutcomes(actor.done, view) ?? { '': undefined };
      const errors = resolveOutcomes(actor.errors, view) ?? { '': new Error(`${child.src} failed`) };
      for (const [label, output] of Object.entries(done)) {
        events.push({
          label: `${child.src} done${label ? `: ${label}` : ''}`, kind: 'done', actor: { id: child.id, src: child.src }, outcome: label,
          event: { type: `xstate.done.actor.${child.id}`, output, actorId: child.id } as EventObject,
        });
      }
      for (const [label, error] of Object.entries(errors)) {
        events.push({
          label: `${child.src} error${label ? `: ${label}` : ''}`, kind: 'error', actor: { id: child.id, src: child.src }, outcome: label,
          event: { type: `xstate.error.actor.${child.id}`, error, actorId: child.id } as EventObject,
        });
      }
    }
    for (const timer of world.timers) {
      const delay = this.delayNames.get(timer.event.type);
      const after = delay !== undefined ? `after ${delay}` : `delayed ${timer.event.type}`;
      events.push({ label: after, kind: 'after', event: timer.event, timer: timer.id });
    }
    events.push(...this.externalEvents(snapshot));
    return uniqueLabels(events);
  }

  private externalEvents(snapshot: AnyMachineSnapshot): ModelEvent[] {
    const alphabet = (typeof this.model.events === 'function' ? this.model.events(snapshot as never) : this.model.events) as Record<string, EventObject>;
    return Object.entries(alphabet).map(([label, event]) => ({ label, kind: 'event' as const, event }));
  }

  // ---- checks after exploring --------------------------------------------

  private checkReachability(): void {
    for (const node of allStateNodes(this.machine).slice(1)) {
      if (this.entered.has(node.id)) continue;
      this.violations.push({ check: 'unreachable', name: 'unreachable', path: undefined, message: `state ${node.id} is declared but no path enters it` });
    }
  }

  /** Traps: active states from which no final state can be reached; the shortest path to each trapped machine state. */
  private checkDeadlocks(): void {
    const canFinish = reachingTo(this.edges, this.nodes.map((node) => node.snapshot.status === 'done'));
    this.nodes.forEach((node, index) => {
      if (node.snapshot.status !== 'active' || canFinish[index]) return;
      const state = stateName(node.snapshot.value);
      const accepts = [...new Set(this.edges[index]!.map((edge) => edge.via.label))];
      this.report('deadlock', `deadlock|${state}`, 'deadlock',
        `no final state can be reached from ${state}${accepts.length > 0 ? ` (what may happen there leads nowhere else: ${accepts.join(', ')})` : ' (nothing can happen there)'}`,
        index, undefined);
    });
  }

  private checkLeadsTo(property: LeadsTo): void {
    const isTrigger = (edge: Edge) => edge.via.kind === 'event' && property.after.includes(edge.via.event.type);
    const reach = property.reach ?? ((snapshot: AnyMachineSnapshot) => snapshot.status === 'done');
    const inner = this.edges.map((list) => list.filter((edge) => !isTrigger(edge)));
    const target = this.nodes.map((node) => reach(node.snapshot as never));
    const canReach = reachingTo(inner, target);
    // Only the machine and its actors can keep it from the target: a cycle the world drives by
    // sending events over and over (CANCEL, CLAIM_LOST, CANCEL...) ends when the world stops.
    const driven = inner.map((list) => list.filter((edge) => edge.via.kind !== 'event' && !target[edge.to]));
    const cyclic = findCycles(driven, target);
    const bad = this.nodes.map((_, i) => !target[i] && (!canReach[i] || cyclic[i]!));
    const leadsToBad = reachingTo(inner, bad);
    let count = 0;
    let first: { from: number; via: ModelEvent; route: ModelEvent[]; end: number } | undefined;
    this.nodes.forEach((_, from) => {
      for (const edge of this.edges[from]!.filter(isTrigger)) {
        if (target[edge.to] || !leadsToBad[edge.to]) continue;
        count++;
        if (first === undefined) {
          const route = shortestRoute(inner, edge.to, (i) => bad[i]!);
          first = { from, via: edge.via, route: route.map((e) => e.via), end: route.at(-1)?.to ?? edge.to };
        }
      }
    });
    if (first === undefined) return;
    const { end } = first;
    const endState = stateName(this.nodes[end]!.snapshot.value);
    // Show the cycle itself: on from where it was entered, round and back to it.
    const round = cyclic[end] ? shortestCycle(driven, end).map((edge) => edge.via.label) : [];
    const how = cyclic[end] ? `can go round a cycle through ${endState} forever` : `gets stuck in ${endState}`;
    const path = this.execute(this.nodes[first.from]!.inputIndex, [...this.labelsTo(first.from), first.via.label, ...first.route.map((e) => e.label), ...round]);
    this.violations.push({
      check: 'leads-to', name: property.name, path,
      message: `after ${first.via.label} a path ${how} without reaching the target (${count} such trigger${count === 1 ? '' : 's'} in all)`,
    });
  }

  // ---- paths ----------------------------------------------------------

  private labelsTo(index: number): string[] {
    const labels: string[] = [];
    for (let node = this.nodes[index]; node?.via !== undefined; node = this.nodes[node.parent!]) labels.push(node.via.label);
    return labels.reverse();
  }

  /** The shortest way on from a node to a final state, as labels (none when there is no way). */
  private labelsToEnd(index: number): string[] {
    return shortestRoute(this.edges, index, (i) => this.nodes[i]!.snapshot.status === 'done').map((edge) => edge.via.label);
  }

  private violationPath(from: number | undefined, via: ModelEvent | undefined, inputIndex: number): ModelPath {
    const labels = from === undefined ? [] : this.labelsTo(from);
    return this.execute(inputIndex, via === undefined ? labels : [...labels, via.label]);
  }

  private report(check: CheckKind, dedupe: string, name: string, message: string, from: number, via: ModelEvent | undefined): void {
    this.reportPath(check, dedupe, name, message, () => this.violationPath(from, via, this.nodes[from]!.inputIndex));
  }

  private reportPath(check: CheckKind, dedupe: string, name: string, message: string, path: () => ModelPath): void {
    if (this.reported.has(dedupe)) return;
    this.reported.add(dedupe);
    this.violations.push({ check, name, message, path: path() });
  }

  /** Runs the machine along `labels` from input `inputIndex`, recording every step. */
  private execute(inputIndex: number, labels: readonly string[]): ModelPath {
    const input = this.inputs[inputIndex];
    const started = this.start(input);
    let { snapshot, world } = started;
    const steps: ModelStep[] = [];
    for (const label of labels) {
      const via = this.candidates(snapshot, world).find((candidate) => candidate.label === label);
      if (via === undefined) throw new Error(`model ${this.model.name}: "${label}" cannot happen in ${stateName(snapshot.value)}`);
      const next = this.advance(snapshot, world, via);
      steps.push({ ...via, state: stateName(next.snapshot.value), facts: next.facts });
      ({ snapshot, world } = next);
    }
    return { input, inputIndex, inputCount: this.inputs.length, start: { state: stateName(started.snapshot.value), facts: started.facts }, steps, end: snapshot };
  }

  private allPaths(): ModelPath[] {
    const seen = new Set<string>();
    const paths: ModelPath[] = [];
    this.nodes.forEach((node, index) => {
      const labels = [...this.labelsTo(index), ...this.labelsToEnd(index)];
      const key = JSON.stringify([node.inputIndex, labels]);
      if (seen.has(key)) return;
      seen.add(key);
      paths.push(this.execute(node.inputIndex, labels));
    });
    return paths;
  }

  private transitionPaths(accept: (path: ModelPath) => boolean): ModelPath[] {
    /** How many candidate edges to try per transition before giving up on it. */
    const CANDIDATES = 50;
    const found = new Map<string, ModelPath>();
    const tried = new Map<string, number>();
    // Nodes come in breadth-first order: the earlier the source, the shorter the path.
    this.edges.forEach((edges, from) => {
      for (const edge of edges) {
        for (const key of edge.taken) {
          if (found.has(key) || (tried.get(key) ?? 0) >= CANDIDATES) continue;
          tried.set(key, (tried.get(key) ?? 0) + 1);
          const path = this.execute(this.nodes[from]!.inputIndex, [...this.labelsTo(from), edge.via.label, ...this.labelsToEnd(edge.to)]);
          if (accept(path)) found.set(key, path);
        }
      }
    });
    return [...found.values()];
  }

  private randomWalks({ seed, count, maxSteps }: { seed: number; count: number; maxSteps: number }): ModelPath[] {
    const random = mulberry32(seed);
    const walks: ModelPath[] = [];
    for (let walk = 0; walk < count; walk++) {
      const inputIndex = Math.floor(random() * this.inputs.length);
      let { snapshot, world } = this.start(this.inputs[inputIndex]);
      const labels: string[] = [];
      for (let step = 0; step < maxSteps && snapshot.status === 'active'; step++) {
        const options = this.candidates(snapshot, world);
        const via = options[Math.floor(random() * options.length)];
        if (via === undefined) break;
        labels.push(via.label);
        ({ snapshot, world } = this.advance(snapshot, world, via));
      }
      // Finish the walk the shortest way, from the explored state it stands for (monitors aside).
      const node = snapshot.status === 'active' ? this.byMachineKey.get(this.machineKeyOf(inputIndex, snapshot, world)) : undefined;
      const finish = node === undefined ? [] : this.labelsToEnd(node);
      try {
        walks.push(this.execute(inputIndex, [...labels, ...finish]));
      } catch {
        // The abstraction hid something the way on depends on: keep the walk as it is.
        walks.push(this.execute(inputIndex, labels));
      }
    }
    return walks;
  }
}

/** Stands in for the machine's own actor in a pure step: children are created under it, never started. */
const HOST_LOGIC = fromPromise<never>(() => new Promise<never>(() => {}));

/**
 * An actor scope in which actions are collected, not run (as xstate's own
 * pure helpers do), on a fresh actor system each time, so that children
 * with a systemId never meet those of another step.
 */
function inertScope(): { scope: AnyActorScope; actions: unknown[] } {
  const actions: unknown[] = [];
  const host = createActor(HOST_LOGIC);
  const noop = () => {};
  const scope = {
    self: host, system: host.system, id: '', sessionId: '', logger: noop, defer: noop, stopChild: noop, emit: noop,
    actionExecutor: (action: unknown) => void actions.push(action),
  };
  return { scope: scope as unknown as AnyActorScope, actions };
}

function byId(a: { readonly id: string }, b: { readonly id: string }): number {
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function resolveOutcomes(outcomes: ActorModel['done'], view: ChildView): Outcomes | undefined {
  return typeof outcomes === 'function' ? outcomes(view) : outcomes;
}

/** Labels must tell the possible events apart: repeats get ` (2)`, ` (3)`... */
function uniqueLabels(events: ModelEvent[]): ModelEvent[] {
  const counts = new Map<string, number>();
  return events.map((event) => {
    const n = (counts.get(event.label) ?? 0) + 1;
    counts.set(event.label, n);
    return n === 1 ? event : { ...event, label: `${event.label} (${n})` };
  });
}

/** A small seeded PRNG (mulberry32): the same seed gives the same walks. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A path as lines for people: `  1. CANCEL → claimed.running.stopping`. */
export function formatPath(path: ModelPath): string {
  const input = JSON.stringify(path.input) ?? '';
  const which = path.inputCount > 1 ? `   (input ${path.inputIndex + 1} of ${path.inputCount}: ${input.length > 100 ? `${input.slice(0, 99)}…` : input})` : '';
  const lines = [`  start → ${path.start.state}${which}`];
  const width = Math.max(0, ...path.steps.map((step) => step.label.length));
  path.steps.forEach((step, i) => lines.push(`  ${String(i + 1).padStart(2)}. ${step.label.padEnd(width)} → ${step.state}`));
  return lines.join('\n');
}

export function formatViolation(violation: Violation): string {
  const head = `${violation.check}${violation.name === violation.check ? '' : ` "${violation.name}"`}: ${violation.message}`;
  return violation.path === undefined ? head : `${head}\n${formatPath(violation.path)}`;
}

/** One line: how much was explored and covered. */
export function summarize(result: CheckResult): string {
  const { transitions } = result;
  return `${result.model}: ${result.states} states, ${result.edges} edges; ` +
    `${result.stateNodes.filter((id) => result.reached.has(id)).length}/${result.stateNodes.length} states reached; ` +
    `${transitions.all.filter((key) => transitions.taken.has(key)).length}/${transitions.all.length} transitions taken ` +
    `(${transitions.ignored.length} of them "ignored here"); ${result.violations.length} violation${result.violations.length === 1 ? '' : 's'}`;
}


/**
 * checkMachine as tap assertions, for a test file: no violations (each
 * printed with its path), and every declared transition taken on some path
 * but the model's documented `deadTransitions`. Comments the summary.
 */
export function checkModel(t: Test, model: MachineModel<any>): CheckResult {
  const result = checkMachine(model);
  t.comment(summarize(result));
  for (const violation of result.violations) t.fail(formatViolation(violation));
  if (result.violations.length === 0) t.pass(`${model.name}: every check passes`);
  const untaken = result.transitions.all.filter((key) => !result.transitions.taken.has(key));
  t.same(untaken.sort(), Object.keys(model.deadTransitions ?? {}).sort(), `${model.name}: every transition is taken on some path, but the documented dead ones`);
  return result;
}
