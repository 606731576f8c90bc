/**
 * The watchdog: finds instances drover launched that nobody will
 * terminate any more, and terminates them.
 *
 * An instance (any with drover:session, in any state but terminated) is:
 *  - a leftover when it was handed over (`adopt`: the instance machine
 *    gave up on it), or when its owner names this machine and that process
 *    is gone, or its session is not open in this machine's registry
 *    (sessions.ts);
 *  - ending when it is shutting down already;
 *  - live when its owner runs and its session is open;
 *  - foreign when another machine launched it: never touched here.
 *
 * `sweep()` lists, judges and terminates every leftover (each terminate
 * call retried by the provider); what fails stays for the next sweep. A
 * sweep under way may have listed and judged before a session closed or an
 * instance was adopted: `freshSweep()` waits for it and sweeps again.
 * `start()` sweeps at once and then every `intervalMs` (default 5
 * minutes, as cloudtask retries for hours) until `stop()`.
 */
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import type { CloudInstance, Provider, ProviderName } from './provider.js';
import { ownedHere, ownerGone, type SessionRegistry } from './sessions.js';

export type VerdictKind = 'leftover' | 'ending' | 'live' | 'foreign';

export interface InstanceReport {
  readonly provider: ProviderName;
  readonly instance: CloudInstance;
  readonly verdict: VerdictKind;
  /** Why, in words: `its owner host/123 is gone`. */
  readonly why: string;
}

export interface SweepReport {
  readonly found: readonly InstanceReport[];
  /** Leftovers whose terminate was accepted. */
  readonly terminated: readonly InstanceReport[];
  readonly failed: readonly { readonly report: InstanceReport; readonly error: string }[];
}

export interface WatchdogOptions {
  readonly providers: readonly Provider[];
  readonly registry: SessionRegistry;
  readonly logger?: Logger;
  /** Between sweeps; default 300000 ms. */
  readonly intervalMs?: number;
  /** This machine's name, as owners name it; default os.hostname(). */
  readonly host?: string;
}

export class Watchdog {
  readonly #options: WatchdogOptions;
  /** Handed over, by provider: terminated by every sweep until it works. */
  readonly #adopted = new Map<Provider, Set<string>>();
  #timer: NodeJS.Timeout | undefined;
  #sweeping: Promise<SweepReport> | undefined;
  readonly #stop = new AbortController();

  constructor(options: WatchdogOptions) {
    this.#options = options;
  }

  /** Takes over an instance the instance machine could not terminate. */
  adopt(provider: Provider, id: string): void {
    const ids = this.#adopted.get(provider) ?? new Set();
    ids.add(id);
    this.#adopted.set(provider, ids);
  }

  /** The instances handed over and not terminated yet. */
  adopted(): string[] {
    return [...this.#adopted.values()].flatMap((ids) => [...ids]);
  }

  judge(provider: Provider, instance: CloudInstance): InstanceReport {
    const report = (verdict: VerdictKind, why: string): InstanceReport => ({ provider: provider.name, instance, verdict, why });
    const owner = instance.owner ?? '(no owner)';
    if (this.#adopted.get(provider)?.has(instance.id)) return report('leftover', 'handed over: its terminate attempts failed');
    if (instance.state === 'shutting-down') return report('ending', 'shutting down');
    if (!ownedHere(instance.owner, this.#options.host)) return report('foreign', `launched from another machine (${owner})`);
    if (ownerGone(owner)) return report('leftover', `its owner ${owner} is gone`);
    if (!this.#options.registry.isOpen(instance.session ?? '')) return report('leftover', `its session ${instance.session ?? '?'} is over`);
    return report('live', `session ${instance.session ?? '?'} of ${owner} is open`);
  }

  /** Lists and judges every drover instance of every provider. */
  async survey(signal?: AbortSignal): Promise<InstanceReport[]> {
    const reports: InstanceReport[] = [];
    for (const provider of this.#options.providers) {
      for (const instance of await provider.list(signal === undefined ? {} : { signal })) reports.push(this.judge(provider, instance));
    }
    return reports;
  }

  /** One pass: survey, then terminate every leftover (and every adopted instance). Never runs twice at once. */
  sweep(signal?: AbortSignal): Promise<SweepReport> {
    this.#sweeping ??= this.#sweep(signal).finally(() => (this.#sweeping = undefined));
    return this.#sweeping;
  }

  /**
   * A sweep that starts after this call: it waits for one under way (whose
   * survey may predate a session's close or an adoption), then sweeps, so
   * that what is a leftover now is judged and terminated.
   */
  async freshSweep(signal?: AbortSignal): Promise<SweepReport> {
    const under = this.#sweeping;
    // Its `finally` clears #sweeping before this resumes: a sweep found under way after it started after this call.
    if (under !== undefined) await under.catch(() => {});
    return this.sweep(signal);
  }

  async #sweep(signal?: AbortSignal): Promise<SweepReport> {
    const found = await this.survey(signal);
    const terminated: InstanceReport[] = [];
    const failed: { report: InstanceReport; error: string }[] = [];
    const leftovers = found.filter((report) => report.verdict === 'leftover');
    // Adopted instances that the listing no longer shows are terminated again: it is idempotent, and proves them gone.
    for (const [provider, ids] of this.#adopted) {
      for (const id of ids) {
        if (!leftovers.some((report) => report.provider === provider.name && report.instance.id === id)) {
          leftovers.push({ provider: provider.name, instance: { id, state: 'pending', tags: {} }, verdict: 'leftover', why: 'handed over: its terminate attempts failed' });
        }
      }
    }
    for (const report of leftovers) {
      const provider = this.#options.providers.find((p) => p.name === report.provider)!;
      try {
        await provider.terminate(report.instance.id, signal === undefined ? {} : { signal });
        this.#adopted.get(provider)?.delete(report.instance.id);
        terminated.push(report);
        this.#options.logger?.info('watchdog: terminated a leftover instance', { provider: report.provider, instance: report.instance.id, why: report.why });
      } catch (error) {
        failed.push({ report, error: errorMessage(error) });
        this.#options.logger?.warn('watchdog: could not terminate a leftover instance; the next sweep tries again', { provider: report.provider, instance: report.instance.id, error: errorMessage(error) });
      }
    }
    return { found, terminated, failed };
  }

  /** Sweeps now, then every intervalMs, until stop(). */
  start(): void {
    if (this.#timer !== undefined || this.#stop.signal.aborted) return;
    const run = () => {
      this.sweep(this.#stop.signal).catch((error: unknown) => {
        if (!this.#stop.signal.aborted) this.#options.logger?.warn('watchdog: a sweep failed; the next one tries again', { error: errorMessage(error) });
      });
    };
    this.#timer = setInterval(run, this.#options.intervalMs ?? 300_000);
    this.#timer.unref();
    run();
  }

  /** Stops the periodic sweeps and waits for one under way; idempotent. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    this.#stop.abort(new Error('the watchdog stopped'));
    await this.#sweeping?.catch(() => {});
  }
}
