/**
 * The `ssh` host: a list of machines reached over SSH, each with a
 * capacity and labels. Every run is placed on one of them (`place()`, see
 * selection.ts for the strategies and for health, strikes and probation);
 * a machine that goes down mid-run aborts the runs placed there, which
 * resolve `exception/worker-shutdown` so the queue runs them again,
 * elsewhere.
 *
 * Hosts come from `hosts: [{ address, capacity, labels }]` or a hosts file
 * (parseHostsFile). Task directories go under `workDir` on each machine,
 * relative to the remote user's home unless absolute.
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { posix } from 'node:path';
import type { Readable } from 'node:stream';
import { ConfigError, ResourceUnavailableError, errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import type { Host, HostBootOptions, HostIdentity, Placement, PlacementRequest } from './host.js';
import { parseSshAddress } from './ssh-address.js';
import { MachinePool, type MachineStatus, type SelectionStrategy, type SlotRequest } from './selection.js';
import { HostKeyError } from './ssh-known-hosts.js';
import { SshConnectionError, SshTransport, type SshConnectionOptions } from './ssh-transport.js';
import type { DirectoryEntry, ExecOptions, Execution, FileStat, Transport, TransportCapabilities } from './transport.js';

export interface SshHostEntry {
  /** `[user@]name[:port]`. */
  readonly address: string;
  /** Tasks at once on this machine; default `defaultCapacity`. */
  readonly capacity?: number;
  readonly labels?: readonly string[];
}

export interface SshPoolOptions extends SshConnectionOptions {
  readonly hosts: readonly SshHostEntry[];
  /** Capacity of hosts that do not say; default 4. */
  readonly defaultCapacity?: number;
  readonly selection?: SelectionStrategy;
  /** Failures in a row that retire a host; default 3. */
  readonly strikes?: number;
  /** How long a down host rests before it is probed again; default 30000 ms. */
  readonly probationMs?: number;
  /** How often down hosts are looked at; default 1000 ms. */
  readonly checkIntervalMs?: number;
}

export interface SshHostOptions extends SshPoolOptions {
  /** Task directories go under it on every machine; relative to the remote home unless absolute. Default `.drover/work`. */
  readonly workDir?: string;
}

/**
 * Parses a hosts file: one `[user@]name[:port] [capacity=N] [labels=a,b]` a line; `#` starts a comment.
 * Every problem (a bad address, a bad field) is named with its line, all at once.
 */
export function parseHostsFile(file: string): SshHostEntry[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    throw new ConfigError(`hosts file "${file}": ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : errorMessage(error)}`);
  }
  const entries: SshHostEntry[] = [];
  const problems: string[] = [];
  text.split('\n').forEach((raw, index) => {
    const line = raw.replace(/#.*/, '').trim();
    if (line === '') return;
    const [address, ...rest] = line.split(/\s+/);
    try {
      parseSshAddress(address!);
    } catch (error) {
      problems.push(`hosts file "${file}" line ${index + 1}: ${errorMessage(error)}`);
    }
    let capacity: number | undefined;
    let labels: string[] | undefined;
    for (const field of rest) {
      const [key, value = ''] = field.split('=', 2);
      if (key === 'capacity' && /^\d+$/.test(value) && Number(value) >= 1) capacity = Number(value);
      else if (key === 'labels') labels = value.split(',').filter(Boolean);
      else problems.push(`hosts file "${file}" line ${index + 1}: "${field}" is neither capacity=N (N >= 1) nor labels=a,b`);
    }
    entries.push({ address: address!, ...(capacity === undefined ? {} : { capacity }), ...(labels === undefined ? {} : { labels }) });
  });
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
  if (entries.length === 0) throw new ConfigError(`hosts file "${file}": lists no hosts`);
  return entries;
}

/** A pool of SSH machines with their transports: shared by the `ssh` host and the library API (offload.ts). */
export function createSshPool(options: SshPoolOptions): MachinePool<SshTransport> {
  if (options.hosts.length === 0) throw new ConfigError('no SSH hosts given');
  const transports = options.hosts.map((entry) => new SshTransport({ ...options, address: entry.address }));
  const pool: MachinePool<SshTransport> = new MachinePool(
    transports.map((transport, i) => ({
      address: transport.address,
      transport,
      capacity: options.hosts[i]!.capacity ?? options.defaultCapacity ?? 4,
      labels: options.hosts[i]!.labels ?? [],
    })),
    {
      ...(options.selection === undefined ? {} : { strategy: options.selection }),
      ...(options.strikes === undefined ? {} : { strikes: options.strikes }),
      ...(options.probationMs === undefined ? {} : { probationMs: options.probationMs }),
      ...(options.checkIntervalMs === undefined ? {} : { checkIntervalMs: options.checkIntervalMs }),
      ...(options.logger === undefined ? {} : { logger: options.logger }),
      probe: async (transport) => {
        const ssh = transport as SshTransport;
        try {
          const { exitCode, stderr } = await ssh.run('true');
          if (exitCode !== 0) throw new SshConnectionError(`${ssh.address}: a probe command failed: ${stderr.trim() || `exit code ${exitCode}`}`);
          await ssh.home();
        } catch (error) {
          // A refused host key will not fix itself: retire at once.
          if (error instanceof HostKeyError) for (let i = 0; i < (options.strikes ?? 3) - 1; i++) pool.markDown(ssh.address, error);
          throw error;
        }
      },
    },
  );
  for (const transport of transports) transport.on('lost', (error) => pool.markDown(transport.address, error));
  return pool;
}

/** A machine's transport as one run sees it: a command that cannot start marks the machine down. */
class PlacedTransport implements Transport {
  readonly capabilities: TransportCapabilities;
  constructor(
    readonly inner: SshTransport,
    private readonly pool: MachinePool<SshTransport>,
  ) {
    this.capabilities = inner.capabilities;
  }
  async exec(argv: readonly string[], options: ExecOptions): Promise<Execution> {
    try {
      const execution = await this.inner.exec(argv, options);
      this.pool.markWorking(this.inner.address);
      return execution;
    } catch (error) {
      if (error instanceof SshConnectionError || error instanceof HostKeyError) this.pool.markDown(this.inner.address, error);
      throw error;
    }
  }
  mkdir(path: string): Promise<void> {
    return this.inner.mkdir(path);
  }
  remove(path: string): Promise<void> {
    return this.inner.remove(path);
  }
  stat(path: string): Promise<FileStat | undefined> {
    return this.inner.stat(path);
  }
  list(path: string): Promise<DirectoryEntry[]> {
    return this.inner.list(path);
  }
  realpath(path: string): Promise<string> {
    return this.inner.realpath(path);
  }
  readFile(path: string): Promise<Readable> {
    return this.inner.readFile(path);
  }
  writeFile(path: string, data: Readable | Uint8Array | string): Promise<void> {
    return this.inner.writeFile(path, data);
  }
  join(...segments: string[]): string {
    return this.inner.join(...segments);
  }
  /** SFTP upload that keeps file modes; engines use it when present. */
  upload(localPath: string, remotePath: string): Promise<void> {
    return this.inner.upload(localPath, remotePath);
  }
}

export class SshHost implements Host {
  readonly name = 'ssh';
  /** SSH machines never ask the worker to leave; a machine that goes away only loses its runs. */
  readonly shutdown: AbortSignal = new AbortController().signal;
  readonly pool: MachinePool<SshTransport>;
  readonly #workDir: string;
  #logger: Logger | undefined;
  #disposed = false;

  constructor(options: SshHostOptions) {
    this.pool = createSshPool(options);
    this.#workDir = options.workDir ?? '.drover/work';
  }

  /** Tasks at once over all machines: the default capacity of a worker on this host. */
  get capacity(): number {
    return this.pool.capacity;
  }

  status(): MachineStatus[] {
    return this.pool.status();
  }

  async boot(options: HostBootOptions): Promise<HostIdentity> {
    this.#logger = options.logger;
    await this.pool.start();
    const status = this.pool.status();
    for (const machine of status) {
      if (machine.state === 'up') options.logger.info('ssh host up', { host: machine.address, capacity: machine.capacity });
      else options.logger.error('ssh host unreachable; going on without it', { host: machine.address, state: machine.state, error: machine.error });
    }
    if (!status.some((machine) => machine.state === 'up')) {
      throw new ResourceUnavailableError(`no SSH host can be reached:\n${status.map((m) => `  - ${m.address}: ${m.error ?? m.state}`).join('\n')}`);
    }
    return {
      hostname: hostname(),
      facts: { sshHosts: status.map((m) => `${m.address} (${m.state}, capacity ${m.capacity})`).join(', ') },
    };
  }

  transport(): Transport {
    return this.pool.machines()[0]!.transport;
  }

  async place(request: PlacementRequest): Promise<Placement> {
    const slotRequest: SlotRequest = {
      signal: request.signal,
      ...(request.name === undefined ? {} : { name: request.name }),
      ...(request.maxConcurrent === undefined ? {} : { maxConcurrent: request.maxConcurrent }),
      ...(request.labels === undefined ? {} : { labels: request.labels }),
    };
    const slot = await this.pool.acquire(slotRequest);
    try {
      const transport = slot.transport;
      const workDir = posix.isAbsolute(this.#workDir) ? this.#workDir : posix.join(await transport.home(), this.#workDir);
      return { transport: new PlacedTransport(transport, this.pool), host: slot.address, workDir, lost: slot.lost, release: slot.release };
    } catch (error) {
      slot.release();
      if (error instanceof SshConnectionError) this.pool.markDown(slot.address, error);
      throw new ResourceUnavailableError(`host ${slot.address}: ${errorMessage(error)}`, { cause: error });
    }
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    this.pool.close();
    await Promise.all(this.pool.machines().map((machine) => machine.transport.close().catch((error: unknown) => this.#logger?.warn('ssh: closing a connection failed', { host: machine.transport.address, error }))));
  }
}
