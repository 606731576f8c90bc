import { runKey, type RunRef } from '../model/task.js';

/**
 * The queues' wakeable wait: a long poll (or an artifact follower) pauses
 * for up to its poll interval, and `wake()` (a submit, a notification, a
 * new chunk) ends every pause at once, as does an aborted signal.
 */
export class Wakers {
  readonly #waiting = new Set<() => void>();
  #wakeups = 0;

  /** How often `wake()` was called: read it before looking for work and compare before pausing, so a wake-up in between is not missed. */
  get wakeups(): number {
    return this.#wakeups;
  }

  /** How many pauses are under way. */
  get size(): number {
    return this.#waiting.size;
  }

  /** Ends every pause under way. */
  wake(): void {
    this.#wakeups++;
    for (const wake of [...this.#waiting]) wake();
  }

  /** Waits `ms` of real time, or less when `wake()` is called or one of `signals` aborts. */
  pause(ms: number, ...signals: readonly (AbortSignal | undefined)[]): Promise<void> {
    return new Promise((done) => {
      if (signals.some((signal) => signal?.aborted)) return done();
      const wake = (): void => {
        clearTimeout(timer);
        this.#waiting.delete(wake);
        for (const signal of signals) signal?.removeEventListener('abort', wake);
        done();
      };
      const timer = setTimeout(wake, ms);
      this.#waiting.add(wake);
      for (const signal of signals) signal?.addEventListener('abort', wake, { once: true });
    });
  }
}

/**
 * The runs a queue's workers watch for cancellation (watchCancellation):
 * one shared timer calls `check`, which asks the queue which watched runs
 * were canceled and passes their keys to `canceled()`; each such watcher
 * is told once and dropped. The timer goes with the last watcher.
 */
export class CancelWatchers {
  readonly #watchers = new Set<{ readonly run: RunRef; readonly onCanceled: () => void }>();
  #timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly intervalMs: number,
    private readonly check: () => void | Promise<void>,
  ) {}

  get size(): number {
    return this.#watchers.size;
  }

  /** The shared timer, while there are watchers (tests check that it is unref'd and goes with the last one). */
  get timer(): NodeJS.Timeout | undefined {
    return this.#timer;
  }

  /** The watched runs, to ask the queue about. */
  runs(): RunRef[] {
    return [...this.#watchers].map((watcher) => watcher.run);
  }

  /** Watches `run`; returns the function that stops watching it. */
  watch(run: RunRef, onCanceled: () => void): () => void {
    const watcher = { run: { taskId: run.taskId, runId: run.runId }, onCanceled };
    this.#watchers.add(watcher);
    this.#timer ??= setInterval(() => void this.check(), this.intervalMs).unref();
    return () => this.#drop(watcher);
  }

  /** Tells the watchers of these runs (keys by runKey) and drops them. */
  canceled(keys: ReadonlySet<string>): void {
    for (const watcher of [...this.#watchers]) {
      if (!keys.has(runKey(watcher.run))) continue;
      this.#drop(watcher);
      watcher.onCanceled();
    }
  }

  /** Drops every watcher, untold (the queue closes). */
  clear(): void {
    this.#watchers.clear();
    this.#drop();
  }

  #drop(watcher?: { readonly run: RunRef; readonly onCanceled: () => void }): void {
    if (watcher) this.#watchers.delete(watcher);
    if (this.#watchers.size === 0 && this.#timer) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }
}
