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
