/**
 * Which hosts a batch runs on. A batch without hosts runs on this machine;
 * with them, each job runs over SSH on one of them (src/hosts/ssh-host.ts).
 *
 * `BatchHostSource` is the one place that says which hosts those are:
 * `listedHosts()` serves `--hosts LIST|@FILE`, and a cloud provider
 * supplies its own source that launches instances in `open()` and
 * terminates them in `close()`. The batch engine asks nothing else of it.
 * A session keeps the hosts of `--hosts`, so that `--resume` finds them;
 * of a source of a program's own it keeps only `describe()`, and refuses to
 * resume without that source (or new hosts) rather than run on this machine.
 */
import { ConfigError } from '../model/errors.js';
import { formatSshAddress, parseSshAddress } from '../hosts/ssh-address.js';
import type { SshHostEntry } from '../hosts/ssh-host.js';
import type { SshConnectionOptions } from '../hosts/ssh-transport.js';
import type { Logger } from '../runtime/logger.js';

export interface BatchHostSet {
  /** The SSH hosts; one without a capacity takes its share of the split. */
  readonly hosts: readonly SshHostEntry[];
  /** How to reach them, over the batch's own SSH settings (a provider's fresh key and known_hosts, say). */
  readonly connection?: SshConnectionOptions;
}

export interface BatchHostSource {
  /** One line for the parameter table: what the batch will run on. */
  describe(): string;
  /**
   * Called once, before the first job: the hosts to run on. `split` is how
   * many jobs run at once; a provider launches enough machines for it.
   * Rejects (ConfigError, ResourceUnavailableError) when there are none.
   */
  open(options: { readonly split: number; readonly signal: AbortSignal; readonly logger: Logger }): Promise<BatchHostSet>;
  /** Called once after the last job, on every path (also after open() failed); releases what open() made. */
  close(): Promise<void>;
}

/** The hosts of `--hosts`: `a,b,c` (addresses separated by commas or blanks), or `@FILE` in the hosts file format. */
export async function parseHostList(spec: string): Promise<SshHostEntry[]> {
  let entries: SshHostEntry[];
  if (spec.startsWith('@')) {
    const { parseHostsFile } = await import('../hosts/ssh-host.js');
    entries = parseHostsFile(spec.slice(1));
  } else {
    entries = spec.split(/[\s,]+/).filter(Boolean).map((address) => ({ address }));
    if (entries.length === 0) throw new ConfigError('--hosts lists no hosts: give user@name:port, separated by commas, or @FILE');
  }
  const where = spec.startsWith('@') ? `hosts file "${spec.slice(1)}"` : '--hosts';
  const seen = new Set<string>();
  for (const { address } of entries) {
    let canonical: string;
    try {
      canonical = formatSshAddress(parseSshAddress(address));
    } catch (error) {
      throw new ConfigError(`${where}: ${(error as Error).message}`);
    }
    if (seen.has(canonical)) throw new ConfigError(`${where}: ${canonical} is listed twice`);
    seen.add(canonical);
  }
  return entries;
}

/** Pre-configured hosts, as given (already parsed: a session stores them so that --resume finds the same ones). */
export function listedHosts(hosts: readonly SshHostEntry[]): BatchHostSource {
  if (hosts.length === 0) throw new ConfigError('no hosts to run the batch on');
  return {
    describe: () => hosts.map((entry) => (entry.capacity === undefined ? entry.address : `${entry.address} (capacity ${entry.capacity})`)).join(', '),
    open: async () => ({ hosts }),
    close: async () => {},
  };
}
