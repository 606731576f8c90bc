/**
 * Fakes for the machine tests: promise actors the test settles by hand,
 * callback actors whose `sendBack` the test holds, and a bounded wait.
 *
 * Nothing here sleeps on a real timer except `until`, which gives the event
 * loop a turn at a time and fails after a bound.
 */
import { fromCallback, fromPromise, type CallbackActorLogic, type EventObject, type PromiseActorLogic } from 'xstate';
import type { Claim } from '../../src/model/task.js';

export interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
  reject(error: unknown): void;
  readonly settled: boolean;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  let settled = false;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return {
    promise,
    resolve: (value) => {
      settled = true;
      resolve(value);
    },
    reject: (error) => {
      settled = true;
      reject(error);
    },
    get settled() {
      return settled;
    },
  };
}

/** One invocation of a promise fake: what it was given, and how to settle it. */
export interface Invocation<I, O> {
  readonly input: I;
  readonly signal: AbortSignal;
  readonly result: Deferred<O>;
}

/**
 * A promise actor the test controls. Each invocation appends its name to the
 * shared `log` and gets its own deferred. With `auto`, the deferred is
 * settled at once with what `auto` returns (or rejects with what it throws);
 * `hold()` switches auto off so that invocations wait for the test.
 */
export class PromiseFake<I, O> {
  readonly invocations: Invocation<I, O>[] = [];
  readonly logic: PromiseActorLogic<O, I>;

  constructor(
    readonly name: string,
    private readonly log: string[],
    private auto?: (input: I) => O | Promise<O>,
  ) {
    this.logic = fromPromise<O, I>(({ input, signal }) => {
      this.log.push(name);
      const result = deferred<O>();
      this.invocations.push({ input, signal, result });
      const auto = this.auto;
      if (auto !== undefined) {
        Promise.resolve()
          .then(() => auto(input))
          .then(result.resolve, result.reject);
      }
      return result.promise;
    });
  }

  /** Invocations wait for the test from now on. */
  hold(): this {
    this.auto = undefined;
    return this;
  }

  /** Invocations settle by themselves from now on. */
  answer(auto: (input: I) => O | Promise<O>): this {
    this.auto = auto;
    return this;
  }

  get count(): number {
    return this.invocations.length;
  }

  /** The latest invocation; throws when there was none, so a test fails where it should. */
  get last(): Invocation<I, O> {
    const last = this.invocations.at(-1);
    if (last === undefined) throw new Error(`${this.name} was never invoked`);
    return last;
  }
}

/**
 * A callback actor whose `sendBack` the test holds: `emit` sends an event to
 * the parent as the real actor would. `running` is true between start and
 * the cleanup function xstate calls when the invoking state is left.
 */
export class CallbackFake<I, E extends EventObject> {
  readonly starts: I[] = [];
  stops = 0;
  running = false;
  private sendBack?: (event: E) => void;
  readonly logic: CallbackActorLogic<E, I>;

  constructor(
    readonly name: string,
    private readonly log: string[],
  ) {
    this.logic = fromCallback<E, I>(({ input, sendBack }) => {
      this.log.push(`${name}:start`);
      this.starts.push(input);
      this.running = true;
      this.sendBack = sendBack as (event: E) => void;
      return () => {
        this.log.push(`${name}:stop`);
        this.running = false;
        this.stops++;
      };
    });
  }

  emit(event: E): void {
    if (this.sendBack === undefined) throw new Error(`${this.name} was never started`);
    this.sendBack(event);
  }
}

/**
 * Waits, a turn of the event loop at a time, until `predicate` holds; fails
 * after `timeoutMs` of real time naming what it waited for.
 */
export async function until(predicate: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  const giveUpAt = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > giveUpAt) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/** Lets pending promise callbacks and the actors' mailboxes run (a few turns, no timers). */
export async function settle(turns = 5): Promise<void> {
  for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

/** `{ claimed: { running: 'executing' } }` → `claimed.running.executing`. */
export function stateName(value: unknown): string {
  if (typeof value === 'string') return value;
  const [key, child] = Object.entries(value as Record<string, unknown>)[0] ?? ['?', undefined];
  return child === undefined ? key : `${key}.${stateName(child)}`;
}

export function makeClaim(taskId: string, runId = 0, payload: Record<string, unknown> = {}): Claim {
  return { taskId, runId, workerId: 'w1', payload, deadline: 10 * 3_600_000, takenUntil: 1_200_000, retriesLeft: 0 };
}
