/**
 * The SSH transport: commands and files on another machine, over one
 * pooled SSH connection (the `ssh2` package).
 *
 * - One connection per host, opened on first use, with TCP_NODELAY and
 *   SSH keepalives; at most `maxChannels` channels at once on it (default
 *   8, below OpenSSH's MaxSessions of 10); beyond that, callers queue. One
 *   channel is the SFTP session, and one is always kept free for short
 *   control commands (`run()`; kill, rm without the agent).
 * - With the connection starts the remote agent (ssh-agent.ts, and the
 *   program it runs, ssh-agent-program.ts), in a channel of its own: every
 *   command goes through it, as frames on that channel, and takes no
 *   channel; as many run at once as callers start. On a host without perl
 *   (or with `remoteAgent: false`) each command takes a channel through
 *   the remote wrapper instead, so at most `maxChannels - 2` run at once.
 * - A connection that drops is reopened on next use, after a backoff that
 *   doubles with each failed attempt (reconnectDelayMs .. maxReconnectDelayMs).
 *   A drop emits `lost` (with the error) and ends the commands that ran on
 *   it: their `exited` resolves with exit code 255. So does an agent that
 *   stops under running commands while the connection lives (killed by the
 *   OOM killer or an admin); their groups, which a killed agent did not
 *   stop, are killed over a control channel.
 * - Through the agent or the wrapper (ssh-remote.ts), a command gets
 *   exactly its environment, is the leader of its own process group,
 *   kill() signals that group, and when the connection (or the agent's
 *   channel) goes away the remote side stops the group by itself (signal,
 *   grace period, SIGKILL).
 * - Files go over SFTP: mkdir, stat, read and write streams, and upload()
 *   and download() of files and directory trees. remove() is `rm -rf`.
 * - remove(), and a mkdir() of a path that a pending removal covers (the
 *   runtime's `remove(taskDir)` then `mkdir(taskDir)`), are deferred
 *   (ssh-pending.ts) and go with the next command, applied before it
 *   starts, so a task costs no round trip of its own for them. Through the
 *   agent, which applies them in the order it gets them, commands may
 *   carry changes while earlier ones are still on their way; through the
 *   wrapper, one application is under way at a time. Every other operation
 *   that could see them waits for them first (a request to the agent, or
 *   a control command, applies them when no command is on its way); a change that
 *   nobody looks at is applied within FLUSH_DELAY_MS anyway, and close()
 *   applies what is left. Changes whose command never ran (a lost
 *   connection) stay pending and are applied on the next connection.
 *   A removal that fails is logged (it can no longer reject its caller);
 *   a working directory that cannot be cleared or made rejects the exec,
 *   as the mkdir would have.
 * - Host keys are checked against known_hosts (ssh-known-hosts.ts);
 *   credentials are private key files and ssh-agent. Keys and passphrases
 *   never appear in logs or errors; file paths do.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import { readFileSync } from 'node:fs';
import { mkdir as mkdirLocal, readdir, stat as statLocal } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join as joinLocal, posix } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client, type AnyAuthMethod, type ClientChannel, type FileEntry, type SFTPWrapper } from 'ssh2';
import { DroverError, errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import { formatSshAddress, parseSshAddress, type SshTarget } from './ssh-address.js';
import { HostKeyError, knownKeyTypes, verifyHostKey, type HostKeyPolicy } from './ssh-known-hosts.js';
import { RemoteAgent, exitsWithin, splitOnce, type AgentExecution, type ChangeFailure } from './ssh-agent.js';
import { NO_CHANGES, PendingChanges, covers, normalizePath, type Changes } from './ssh-pending.js';
import { changesCommandLine, groupControlLine, remoteCommandLine, signalName } from './ssh-remote.js';
import { fileType, type DirectoryEntry, type ExecOptions, type Execution, type ExitStatus, type FileStat, type Transport, type TransportCapabilities } from './transport.js';

/** The host could not be reached, refused us, or the connection broke. */
export class SshConnectionError extends DroverError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('DROVER_SSH_CONNECTION', message, options);
  }
}

export interface SshAuthOptions {
  /** Private key files (OpenSSH or PEM format). Default: ~/.ssh/id_ed25519, id_ecdsa and id_rsa, those that exist. */
  readonly identityFiles?: readonly string[];
  /** Passphrase of encrypted key files. */
  readonly passphrase?: string;
  /** ssh-agent's socket; default SSH_AUTH_SOCK; false: do not use an agent. */
  readonly agent?: string | false;
  /** known_hosts file; default ~/.ssh/known_hosts. */
  readonly knownHostsFile?: string;
  /** strict (default), accept-new (records unknown hosts' keys) or off. */
  readonly hostKeyPolicy?: HostKeyPolicy;
}

export interface SshConnectionOptions extends SshAuthOptions {
  /** Channels open at once on the connection, the SFTP session included; default 8. */
  readonly maxChannels?: number;
  /** SSH keepalive interval; default 5000 ms. A connection is dropped after keepaliveCountMax (3) unanswered ones. */
  readonly keepaliveIntervalMs?: number;
  readonly keepaliveCountMax?: number;
  /** How long connecting (TCP, handshake, authentication) may take; default 10000 ms. */
  readonly connectTimeoutMs?: number;
  /** First delay before reconnecting after a failure; doubles up to maxReconnectDelayMs (default 100 and 5000 ms). */
  readonly reconnectDelayMs?: number;
  readonly maxReconnectDelayMs?: number;
  /** How the remote side stops a command whose connection is gone: this signal, then SIGKILL after killGraceMs (SIGTERM, 5000). */
  readonly killSignal?: NodeJS.Signals;
  readonly killGraceMs?: number;
  /**
   * Run commands through one remote agent per connection (a Perl program,
   * ssh-agent-program.ts) when the host has perl: default true. False, or a
   * host without perl: every command through the shell wrapper in a channel
   * of its own (ssh-remote.ts).
   */
  readonly remoteAgent?: boolean;
  readonly logger?: Logger;
}

export interface SshTransportOptions extends SshConnectionOptions {
  /** `[user@]name[:port]`. */
  readonly address: string;
}

export interface SshTransportStats {
  /** TCP connections opened (attempts included). */
  readonly connectionsOpened: number;
  /** Channels opened: commands, control commands and SFTP sessions. */
  readonly channelsOpened: number;
  /** Channels open now. */
  readonly channelsOpen: number;
  /** Control commands that only applied deferred changes (the rest went with commands). */
  readonly changeFlushes: number;
  /** Deferred removals that failed (each is logged). */
  readonly failedRemovals: number;
  /** Remote agents started (one per connection, unless the host has no perl). */
  readonly agentsStarted: number;
  /** The most files upload() had in flight at once (UPLOAD_PARALLEL at most). */
  readonly uploadsAtOncePeak: number;
}

/** How often a refused channel open is retried (about 3 s in all). */
const OPEN_RETRIES = 20;
/** How long deferred changes wait for a command to take them before a control command applies them. */
export const FLUSH_DELAY_MS = 100;
/** How many files of a tree upload() copies at once. */
const UPLOAD_PARALLEL = 8;
/** How long close() tries to apply deferred changes. */
const CLOSE_FLUSH_MS = 5000;
/** How long kill() and waitGone() wait, after the main process exited, for the wrapper to say whether its group is gone. */
const GROUP_REPORT_WAIT_MS = 2000;
/** How long the kill of a dead agent's groups waits, for each, for it to be gone after SIGKILL. */
const GROUP_KILL_WAIT_MS = 2000;

const DEFAULT_HOST_KEY_ALGORITHMS: Readonly<Record<string, readonly string[]>> = {
  'ssh-ed25519': ['ssh-ed25519'],
  'ecdsa-sha2-nistp256': ['ecdsa-sha2-nistp256'],
  'ecdsa-sha2-nistp384': ['ecdsa-sha2-nistp384'],
  'ecdsa-sha2-nistp521': ['ecdsa-sha2-nistp521'],
  'ssh-rsa': ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'],
};

/** At most `limit` at once; the others wait their turn, in order. */
class Limit {
  #inUse = 0;
  readonly #waiting: (() => void)[] = [];

  constructor(readonly limit: number) {}

  get inUse(): number {
    return this.#inUse;
  }

  /** Resolves with an idempotent release once it is this caller's turn. */
  async acquire(): Promise<() => void> {
    // A release hands its place to the first waiter, so the count only drops when nobody waits.
    if (this.#inUse < this.limit) this.#inUse++;
    else await new Promise<void>((turn) => this.#waiting.push(turn));
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.#waiting.shift();
      if (next === undefined) this.#inUse--;
      else next();
    };
  }
}

/** Channels of one connection: commands may not take the last free one, control operations may. */
class ChannelSlots {
  #inUse = 0;
  readonly #waiters: { kind: 'command' | 'control'; grant: () => void }[] = [];

  constructor(readonly limit: number) {}

  get inUse(): number {
    return this.#inUse;
  }

  #fits(kind: 'command' | 'control'): boolean {
    return this.#inUse < (kind === 'command' ? this.limit - 1 : this.limit);
  }

  /** Takes a channel for good, whatever is free (the agent's, opened with the connection); returns its idempotent release. */
  take(): () => void {
    this.#inUse++;
    return this.#release();
  }

  /** Resolves with an idempotent release function once a channel may be opened. */
  async acquire(kind: 'command' | 'control'): Promise<() => void> {
    if (this.#waiters.length === 0 && this.#fits(kind)) {
      this.#inUse++;
    } else {
      await new Promise<void>((grant) => this.#waiters.push({ kind, grant }));
    }
    return this.#release();
  }

  /** An idempotent release of one channel in use. */
  #release(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#inUse--;
      this.#grant();
    };
  }

  #grant(): void {
    // Control operations first: they are short and others wait on them (a kill, a cleanup).
    for (const kind of ['control', 'command'] as const) {
      for (let i = 0; i < this.#waiters.length && this.#fits(kind); ) {
        const waiter = this.#waiters[i]!;
        if (waiter.kind !== kind) {
          i++;
          continue;
        }
        this.#waiters.splice(i, 1);
        this.#inUse++;
        waiter.grant();
      }
    }
  }
}

/** Deferred changes on their way to the host, with a command or in a control command (or a request to the agent). */
interface Application {
  readonly changes: Changes;
  /** Resolves once it is off the list of applications under way (applied, or back in the pending set). */
  readonly done: Promise<void>;
  readonly finish: () => void;
  /** The agent it went to, which applies what it gets in order. */
  readonly agent: RemoteAgent | undefined;
  outcome?: 'applied' | 'failed';
}

interface Connection {
  readonly client: Client;
  sftp?: Promise<SFTPWrapper>;
  releaseSftp?: () => void;
  closed: boolean;
  /** Why it closed, when it broke. */
  error?: Error;
  readonly closedSignal: AbortController;
  /** The remote agent; undefined in it when commands go through the wrapper. */
  agent?: Promise<RemoteAgent | undefined>;
  /** The host has no perl, or the agent would not start: no more attempts on this connection. */
  noAgent?: boolean;
}

export class SshTransport extends EventEmitter<{ lost: [error: Error] }> implements Transport {
  readonly capabilities: TransportCapabilities = { exec: true, files: true };
  readonly target: SshTarget;
  /** `user@name:port`. */
  readonly address: string;
  readonly #options: SshTransportOptions;
  readonly #slots: ChannelSlots;
  readonly #logger: Logger | undefined;
  #connection: Connection | undefined;
  #connecting: Promise<Connection> | undefined;
  #failures = 0;
  #nextAttemptAt = 0;
  #closed = false;
  #closing: Promise<void> | undefined;
  #home: string | undefined;
  #stats = { connectionsOpened: 0, channelsOpened: 0, changeFlushes: 0, failedRemovals: 0, agentsStarted: 0, uploadsAtOncePeak: 0 };
  /** Files upload() has in flight, across calls. */
  readonly #uploads = new Limit(UPLOAD_PARALLEL);
  readonly #pending = new PendingChanges();
  /**
   * Applications under way, oldest first. Through the agent, which applies
   * them in the order it gets them, several may be; otherwise one at a time,
   * so that they land in the order they were taken.
   */
  readonly #applying: Application[] = [];
  #flushTimer: NodeJS.Timeout | undefined;
  /** Deferred directories that could not be made, and why: an exec there rejects. */
  readonly #unmade = new Map<string, string>();

  constructor(options: SshTransportOptions) {
    super();
    this.#options = options;
    this.target = parseSshAddress(options.address);
    this.address = formatSshAddress(this.target);
    const maxChannels = options.maxChannels ?? 8;
    if (!Number.isInteger(maxChannels) || maxChannels < 3) throw new RangeError(`maxChannels must be a whole number of at least 3, not ${maxChannels}`);
    // One channel is the SFTP session.
    this.#slots = new ChannelSlots(maxChannels - 1);
    this.#logger = options.logger?.child({ sshHost: this.address });
  }

  get stats(): SshTransportStats {
    return { ...this.#stats, channelsOpen: this.#slots.inUse + (this.#connection?.sftp ? 1 : 0) };
  }

  /** Whether a connection is open now. */
  get connected(): boolean {
    return this.#connection !== undefined && !this.#connection.closed;
  }

  /** Opens the connection now (or reuses the open one); rejects with SshConnectionError or HostKeyError. */
  async connect(): Promise<void> {
    await this.#connect();
  }

  /** The remote user's home directory: where relative paths start. */
  async home(): Promise<string> {
    if (this.#home !== undefined) return this.#home;
    const sftp = await this.#sftp();
    this.#home = await new Promise<string>((resolve, reject) => sftp.realpath('.', (error, path) => (error ? reject(this.#fileError(error, '.')) : resolve(path))));
    return this.#home;
  }

  async exec(argv: readonly string[], options: ExecOptions): Promise<Execution> {
    if (argv.length === 0) return SshExecution.failed(new Error('exec: empty argv'));
    // The command must see every change asked for before it; those still pending go with it.
    const need = this.#pending.count;
    const agent = await this.#agentFor(await this.#connect());
    if (agent !== undefined) return this.#execByAgent(agent, argv, options, need);
    const release = await this.#slots.acquire('command');
    let execution: SshExecution;
    const nonce = `DROVER-${randomBytes(9).toString('hex')}`;
    let carried: Carried | undefined;
    try {
      const connection = await this.#connect();
      carried = await this.#carry(need, undefined);
      const { changes } = carried;
      const cwd = normalizePath(options.cwd);
      const unmade = this.#unmade.get(cwd);
      if (unmade !== undefined && !changes.dirs.includes(cwd)) throw workdirError(unmade, options.cwd);
      const command = remoteCommandLine({
        nonce,
        cwd: options.cwd,
        env: { ...options.env, DROVER_RUN_COOKIE: options.cookie },
        argv,
        killSignal: this.#options.killSignal ?? 'SIGTERM',
        killGraceMs: this.#options.killGraceMs ?? 5000,
        removals: changes.removals,
        dirs: changes.dirs,
        freshCwd: changes.removals.some((removal) => covers(removal, cwd)),
      });
      const onChangeFailed = (kind: ChangeFailure, index: number) => this.#changeFailed(changes, kind, index);
      // Built in the callback: ssh2 may emit the channel's first events in the same tick.
      execution = await this.#openExec(connection, command, (channel) => new SshExecution(this, connection, channel, nonce, release, onChangeFailed));
    } catch (error) {
      carried?.settle(false);
      release();
      throw error;
    }
    await execution.started;
    // Without the header it is unknown what the wrapper did: the changes are applied again (they are idempotent).
    carried.settle(execution.headerSeen);
    if (execution.workdirError !== undefined) throw workdirError(execution.workdirError, options.cwd);
    return execution;
  }

  /** exec() through the remote agent: no channel of its own. */
  async #execByAgent(agent: RemoteAgent, argv: readonly string[], options: ExecOptions, need: number): Promise<Execution> {
    const carried = await this.#carry(need, agent);
    let execution: AgentExecution;
    try {
      const { changes } = carried;
      const cwd = normalizePath(options.cwd);
      const unmade = this.#unmade.get(cwd);
      if (unmade !== undefined && !changes.dirs.includes(cwd)) throw workdirError(unmade, options.cwd);
      execution = agent.exec(
        { cwd: options.cwd, env: { ...options.env, DROVER_RUN_COOKIE: options.cookie }, argv, changes, freshCwd: changes.removals.some((removal) => covers(removal, cwd)) },
        (kind, index) => this.#changeFailed(changes, kind, index),
      );
    } catch (error) {
      carried.settle(false);
      throw error;
    }
    await execution.started;
    // Without the agent's answer it is unknown what it did: the changes are applied again (they are idempotent).
    carried.settle(execution.headerSeen);
    if (execution.workdirError !== undefined) throw workdirError(execution.workdirError, options.cwd);
    return execution;
  }

  /** The connection's agent, started on first use; undefined when commands go through the wrapper. */
  #agentFor(connection: Connection): Promise<RemoteAgent | undefined> {
    if (this.#options.remoteAgent === false || connection.noAgent === true || connection.closed) return Promise.resolve(undefined);
    connection.agent ??= this.#startAgent(connection);
    return connection.agent;
  }

  async #startAgent(connection: Connection): Promise<RemoteAgent | undefined> {
    const release = this.#slots.take();
    const started = await RemoteAgent.start({
      address: this.address,
      killSignal: signalName(this.#options.killSignal ?? 'SIGTERM'),
      killGraceMs: this.#options.killGraceMs ?? 5000,
      timeoutMs: this.#options.connectTimeoutMs ?? 10_000,
      connectionClosed: connection.closedSignal.signal,
      logger: this.#logger,
      open: (command, onChannel) => this.#openExec(connection, command, onChannel),
    });
    if (!(started instanceof RemoteAgent)) {
      release();
      connection.noAgent = true;
      connection.agent = undefined;
      if (started.noPerl) this.#logger?.info('ssh: the host has no perl; commands go through the shell wrapper, a channel each');
      else if (!connection.closed) this.#logger?.warn('ssh: the remote agent did not start; commands go through the shell wrapper, a channel each', { reason: started.reason });
      return undefined;
    }
    this.#stats.agentsStarted++;
    started.onClosed((inFlight) => {
      release();
      // An agent that stopped (the connection lives on) is started again by the next command.
      if (connection.agent !== undefined && !connection.closed) {
        this.#logger?.warn('ssh: the remote agent stopped; the next command starts another');
        connection.agent = undefined;
      }
      if (inFlight.length > 0 && !connection.closed && this.#closing === undefined) this.#agentStopped(connection, started, inFlight);
    });
    return started;
  }

  /**
   * The agent's channel closed under running commands while the connection lives: the agent was
   * killed (the OOM killer, an admin), or stopped them itself. Their runs did not fail by themselves:
   * the host is reported lost (`lost`), so that they stop as for a lost connection and run again
   * elsewhere. A killed agent stopped nothing, and its commands run on, each in its own session:
   * their groups get SIGKILL over a control channel, as the local transport kills a dead agent's.
   */
  #agentStopped(connection: Connection, agent: RemoteAgent, inFlight: readonly AgentExecution[]): void {
    const orphans = inFlight.filter((execution) => execution.pid !== undefined && !execution.groupGone);
    const how = agent.exit === undefined ? '' : ` (${agent.exit})`;
    const error = new SshConnectionError(`the remote agent on ${this.address} stopped${how} while ${inFlight.length} command(s) ran`);
    this.#logger?.error('ssh: the remote agent stopped while commands ran: their groups are killed', { error: error.message, groups: orphans.length });
    // First the host hears of it (it stops the runs placed there), then the groups go.
    this.emit('lost', error);
    if (orphans.length === 0) return;
    const pgids = orphans.map((execution) => execution.pid!);
    const killed = this.#killGroups(connection, pgids);
    orphans.forEach((execution, i) => execution.stoppedBy(killed.then((gone) => gone[i] === true)));
  }

  /** SIGKILL to each group, over a control channel; says of each whether nothing of it is left. */
  async #killGroups(connection: Connection, pgids: readonly number[]): Promise<boolean[]> {
    let release: (() => void) | undefined;
    try {
      release = await this.#slots.acquire('control');
      const { stdout } = await this.#runOn(connection, pgids.map((pgid) => groupControlLine(pgid, 'SIGKILL', GROUP_KILL_WAIT_MS)).join('\n'));
      const answers = stdout.trim().split('\n');
      const left = pgids.filter((_, i) => answers[i] !== 'gone');
      if (left.length > 0) this.#logger?.error(`ssh: process groups on ${this.address} are still there after SIGKILL`, { groups: left });
      return pgids.map((_, i) => answers[i] === 'gone');
    } catch (error) {
      this.#logger?.error(`ssh: cannot kill the process groups of a stopped agent on ${this.address}`, { groups: pgids, error: errorMessage(error) });
      return pgids.map(() => false);
    } finally {
      release?.();
    }
  }

  /** Runs a short shell command line (a control channel) once the changes asked for so far are made; resolves with its exit code and output. */
  async run(commandLine: string): Promise<{ exitCode: number | null; stdout: string; stderr: string }> {
    await this.#settle();
    const release = await this.#slots.acquire('control');
    try {
      return await this.#runOn(await this.#connect(), commandLine);
    } finally {
      release();
    }
  }

  async #runOn(connection: Connection, commandLine: string): Promise<{ exitCode: number | null; stdout: string; stderr: string }> {
    let stdout = '';
    let stderr = '';
    let exitCode: number | null = null;
    const { closed } = await this.#openExec(connection, commandLine, (channel) => {
      channel.on('data', (data: Buffer) => (stdout += data.toString()));
      channel.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
      channel.on('exit', (code: number | null) => (exitCode = code));
      // In an object: a bare promise would be adopted, and the open would wait for the close.
      return { closed: once(channel, 'close') };
    });
    // A connection that breaks may take its channels with it silently.
    const lost = connection.closedSignal.signal;
    const done = new AbortController();
    try {
      await Promise.race([closed, lost.aborted ? undefined : once(lost, 'abort', { signal: done.signal })]);
    } finally {
      done.abort();
    }
    if (connection.closed && exitCode === null) throw new SshConnectionError(`${this.address}: the connection was lost while running a command`, { cause: connection.error });
    return { exitCode, stdout, stderr };
  }

  async mkdir(path: string): Promise<void> {
    const normalized = normalizePath(path);
    if (!this.#closing && this.#pending.mkdir(normalized)) {
      this.#unmade.delete(normalized);
      this.#scheduleFlush();
      return;
    }
    await this.#settle();
    const sftp = await this.#sftp();
    const make = (dir: string) => new Promise<void>((resolve, reject) => sftp.mkdir(dir, (error) => (error ? reject(error) : resolve())));
    const ensure = async (dir: string): Promise<void> => {
      try {
        await make(dir);
      } catch (error) {
        const existing = await this.stat(dir);
        if (existing?.type === 'directory') return;
        if (existing !== undefined) throw this.#fileError(Object.assign(new Error('not a directory'), { code: 'ENOTDIR' }), dir);
        const parent = posix.dirname(dir);
        if (parent === dir || (error as { code?: unknown }).code !== 2) throw this.#fileError(error, dir);
        await ensure(parent);
        await make(dir).catch(async (again: unknown) => {
          if ((await this.stat(dir))?.type !== 'directory') throw this.#fileError(again, dir);
        });
      }
    };
    await ensure(posix.normalize(path));
  }

  /** Deferred: see the top of this file. Rejects only when the transport is closed. */
  async remove(path: string): Promise<void> {
    if (this.#closing) throw new SshConnectionError(`${this.address}: the transport is closed`);
    const normalized = normalizePath(path);
    this.#pending.remove(normalized);
    for (const dir of this.#unmade.keys()) if (covers(normalized, dir)) this.#unmade.delete(dir);
    this.#scheduleFlush();
  }

  /** Applies every deferred change now; resolves once the host has them. */
  async flush(): Promise<void> {
    await this.#settle();
  }

  async stat(path: string): Promise<FileStat | undefined> {
    await this.#settle();
    const sftp = await this.#sftp();
    return new Promise((resolve, reject) =>
      sftp.lstat(path, (error, stats) => {
        if (error) {
          if ((error as { code?: unknown }).code === 2) resolve(undefined);
          else reject(this.#fileError(error, path));
          return;
        }
        resolve({ type: fileType(stats), size: stats.size });
      }),
    );
  }

  async list(path: string): Promise<DirectoryEntry[]> {
    await this.#settle();
    const sftp = await this.#sftp();
    // OpenSSH's server describes entries as lstat() does: a symlink is a symlink.
    const entries = await new Promise<FileEntry[]>((resolve, reject) => sftp.readdir(path, (error, list) => (error ? reject(this.#fileError(error, path)) : resolve(list))));
    return entries.filter((entry) => entry.filename !== '.' && entry.filename !== '..').map((entry) => ({ name: entry.filename, type: typeOfMode(entry.attrs.mode) }));
  }

  async realpath(path: string): Promise<string> {
    await this.#settle();
    const sftp = await this.#sftp();
    const resolved = await new Promise<string>((resolve, reject) => sftp.realpath(path, (error, target) => (error ? reject(this.#fileError(error, path)) : resolve(target))));
    // SFTP servers may resolve a path whose last part is missing; the contract says ENOENT.
    if ((await this.stat(resolved)) === undefined) throw this.#fileError(Object.assign(new Error('no such file'), { code: 2 }), path);
    return resolved;
  }

  async readFile(path: string): Promise<Readable> {
    await this.#settle();
    const sftp = await this.#sftp();
    const handle = await new Promise<Buffer>((resolve, reject) => sftp.open(path, 'r', (error, handle) => (error ? reject(this.#fileError(error, path)) : resolve(handle))));
    const isDirectory = await new Promise<boolean>((resolve) => sftp.fstat(handle, (error, stats) => resolve(!error && stats.isDirectory())));
    if (isDirectory) {
      sftp.close(handle, () => {});
      throw Object.assign(new Error(`EISDIR: illegal operation on a directory, read '${path}' on ${this.address}`), { code: 'EISDIR', path });
    }
    return sftp.createReadStream(path, { handle, autoClose: true });
  }

  async writeFile(path: string, data: Readable | Uint8Array | string): Promise<void> {
    await this.#settle();
    const sftp = await this.#sftp();
    if (data instanceof Readable) {
      const stream = sftp.createWriteStream(path);
      const closed = once(stream, 'close');
      try {
        await pipeline(data, stream);
      } catch (error) {
        throw this.#fileError(error, path);
      }
      await closed;
      return;
    }
    await new Promise<void>((resolve, reject) => sftp.writeFile(path, Buffer.from(data), (error) => (error ? reject(this.#fileError(error, path)) : resolve())));
  }

  /**
   * Copies a local file or directory tree to `remotePath`, keeping file modes (the executable bit).
   * Each file is written beside its place under a name of its own and renamed into it: a command
   * that runs the old file meanwhile (a job on a host that shares this home, over NFS) never
   * sees a half-written one, and a running program can be replaced (its file may not be written).
   * The tree is read first, in name order (a path that is neither file nor directory refuses it
   * before any file is copied), its directories are made, parents first, then up to UPLOAD_PARALLEL
   * files go at a time, on this transport as a whole: SFTP requests pipeline on one channel, so small
   * files are not one round trip after another, and each file in flight holds at most fastPut's
   * 2 MiB. After a failure no more files start; the first failure is the one thrown.
   */
  async upload(localPath: string, remotePath: string): Promise<void> {
    await this.#settle();
    const files: { readonly local: string; readonly remote: string; readonly mode: number }[] = [];
    const walk = async (local: string, remote: string): Promise<void> => {
      const stats = await statLocal(local);
      if (stats.isDirectory()) {
        await this.mkdir(remote);
        for (const entry of (await readdir(local)).sort()) await walk(joinLocal(local, entry), posix.join(remote, entry));
      } else if (stats.isFile()) {
        files.push({ local, remote, mode: stats.mode & 0o777 });
      } else {
        throw new Error(`upload: ${local} is neither a file nor a directory`);
      }
    };
    await walk(localPath, remotePath);
    await this.#settle();
    let next = 0;
    let failure: { readonly error: unknown } | undefined;
    const lane = async () => {
      while (failure === undefined && next < files.length) {
        const { local, remote, mode } = files[next++]!;
        const release = await this.#uploads.acquire();
        // Another call's files may have held the turn while one of ours failed.
        if (failure !== undefined) return release();
        this.#stats.uploadsAtOncePeak = Math.max(this.#stats.uploadsAtOncePeak, this.#uploads.inUse);
        await this.#uploadFile(local, remote, mode).catch((error: unknown) => (failure ??= { error })).finally(release);
      }
    };
    await Promise.all(Array.from({ length: Math.min(UPLOAD_PARALLEL, files.length) }, lane));
    if (failure !== undefined) throw failure.error;
  }

  #warnUnremoved(paths: readonly string[]): void {
    this.#logger?.warn('ssh: closing without removing these paths: the host cannot be reached', { paths });
  }

  /** One file of upload(): written beside its place, its mode set, renamed into place. */
  async #uploadFile(localPath: string, remotePath: string, mode: number): Promise<void> {
    const partial = posix.join(posix.dirname(remotePath), `.${posix.basename(remotePath)}.drover-${randomBytes(6).toString('hex')}`);
    // ssh2 answers no request made after its channel closed, and fastPut makes one (closing the file)
    // when a write fails: without the race, an upload cut off by a lost connection never ends.
    const connection = await this.#connect();
    const sftp = await this.#sftp(connection);
    const lost = connection.closedSignal.signal;
    const call = (op: (done: (error?: Error | null) => void) => void) =>
      new Promise<void>((resolve, reject) => {
        const onLost = () => reject(this.#fileError(new SshConnectionError('the connection was lost'), remotePath));
        if (lost.aborted) return onLost();
        lost.addEventListener('abort', onLost, { once: true });
        op((error) => {
          lost.removeEventListener('abort', onLost);
          if (error) reject(this.#fileError(error, remotePath));
          else resolve();
        });
      });
    try {
      await call((done) => sftp.fastPut(localPath, partial, { mode }, done));
      // The server's umask applies at open; the executable bit must survive it.
      await call((done) => sftp.chmod(partial, mode, done));
      // SFTP's own rename refuses to replace a file; OpenSSH's posix-rename replaces it at once.
      await call((done) => {
        try {
          sftp.ext_openssh_rename(partial, remotePath, done);
        } catch {
          // A server without that extension: make room, then the plain rename. No request may follow
          // a failed one: on a channel that has closed, ssh2 never answers it.
          sftp.unlink(remotePath, (error) => (!error || (error as { code?: unknown }).code === 2 ? sftp.rename(partial, remotePath, done) : done(error)));
        }
      });
    } catch (error) {
      // The partial file goes with the deferred changes: on this connection if it lives (no request may
      // follow a failed one on a channel that has closed), else on the next one (the flush reconnects
      // once; close() tries again). A transport that is closing takes no more changes: say what stays.
      this.remove(partial).catch(() => this.#warnUnremoved([partial]));
      throw error;
    }
  }

  /** Copies a remote file or directory tree to `localPath`. */
  async download(remotePath: string, localPath: string): Promise<void> {
    await this.#settle();
    const sftp = await this.#sftp();
    const stats = await this.stat(remotePath);
    if (stats === undefined) throw this.#fileError(Object.assign(new Error('no such file'), { code: 2 }), remotePath);
    if (stats.type === 'directory') {
      await mkdirLocal(localPath, { recursive: true });
      const entries = await new Promise<string[]>((resolve, reject) =>
        sftp.readdir(remotePath, (error, list) => (error ? reject(this.#fileError(error, remotePath)) : resolve(list.map((item) => item.filename)))),
      );
      for (const entry of entries) await this.download(posix.join(remotePath, entry), joinLocal(localPath, entry));
      return;
    }
    await new Promise<void>((resolve, reject) => sftp.fastGet(remotePath, localPath, (error) => (error ? reject(this.#fileError(error, remotePath)) : resolve())));
  }

  join(...segments: string[]): string {
    return posix.join(...segments);
  }

  /**
   * Applies the deferred changes (reconnecting if need be, for at most
   * CLOSE_FLUSH_MS; a host that cannot be reached keeps them, and the
   * paths are logged), then closes the connection; remote commands still
   * running are stopped by their wrappers. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    if (!this.#pending.empty || this.#applying.length > 0) {
      const timer = new AbortController();
      const settled = await Promise.race([
        this.#settle().then(() => true, (error: unknown) => {
          this.#logger?.warn('ssh: deferred changes could not be applied before closing', { error: errorMessage(error) });
          return false;
        }),
        sleep(CLOSE_FLUSH_MS, false, { signal: timer.signal }).catch(() => false),
      ]);
      timer.abort();
      const left = settled ? [] : [...this.#applying.flatMap((application) => application.changes.removals), ...this.#pending.take().removals];
      if (left.length > 0) this.#warnUnremoved(left);
    }
    this.#closed = true;
    const connection = this.#connection;
    this.#connection = undefined;
    if (connection !== undefined && !connection.closed) {
      const closed = once(connection.client, 'close').catch(() => {});
      connection.client.end();
      // The timer goes once the connection closed: left running, it would hold the process open for its whole 2 s.
      const timer = new AbortController();
      await Promise.race([closed, sleep(2000, undefined, { signal: timer.signal }).catch(() => {})]);
      timer.abort();
      connection.client.destroy();
    }
  }

  /** Ends the remote agent (it stops every group it started, as when its channel is lost; `lost` is emitted if commands ran): for tests. */
  async stopAgent(): Promise<void> {
    const connection = this.#connection;
    const agent = connection === undefined ? undefined : await connection.agent;
    agent?.close();
  }

  /** Cuts the TCP connection as a network failure would: for tests. */
  dropConnection(): void {
    const connection = this.#connection;
    if (connection === undefined) return;
    (connection.client as unknown as { _sock?: { destroy(): void } })._sock?.destroy();
  }

  /**
   * Takes every pending change for the caller to apply (settle() says
   * whether it did). First waits for the applications under way, the
   * changes numbered up to `need` among them, but for those sent to
   * `agent`, the caller's: it applies what it gets in order, and starts a
   * command only after the changes sent before it.
   */
  async #carry(need: number, agent: RemoteAgent | undefined): Promise<Carried> {
    for (let applying = this.#waitedFor(agent); applying !== undefined; applying = this.#waitedFor(agent)) {
      // One under way with only newer changes took every older one: nothing the caller needs is pending.
      if (applying.changes.oldest > need) return NOTHING_CARRIED;
      await applying.done;
    }
    const changes = this.#pending.take();
    if (changes === NO_CHANGES) return NOTHING_CARRIED;
    let finish!: () => void;
    const done = new Promise<void>((resolve) => (finish = resolve));
    const application: Application = { changes, done, finish, agent };
    this.#applying.push(application);
    return {
      changes,
      settle: (applied) => {
        if (application.outcome !== undefined) return;
        application.outcome = applied ? 'applied' : 'failed';
        this.#retire();
      },
    };
  }

  /** The oldest application under way that a caller through `agent` (or none) must wait for. */
  #waitedFor(agent: RemoteAgent | undefined): Application | undefined {
    return this.#applying.find((application) => agent === undefined || application.agent !== agent);
  }

  /**
   * Takes settled applications off the list: applied ones from its front;
   * and from its end, newest first, applied or failed ones. A failed one goes
   * back to the pending set before every change after it (restore()), so it
   * waits for the newer ones to settle first: the calls' order is kept.
   */
  #retire(): void {
    for (let first = this.#applying[0]; first?.outcome === 'applied'; first = this.#applying[0]) {
      this.#applying.shift();
      first.finish();
    }
    for (let last = this.#applying.at(-1); last?.outcome !== undefined; last = this.#applying.at(-1)) {
      this.#applying.pop();
      if (last.outcome === 'failed') {
        this.#pending.restore(last.changes);
        this.#scheduleFlush();
      }
      last.finish();
    }
  }

  /** Waits until every change asked for so far has reached the host; applies pending ones with a control command. */
  async #settle(): Promise<void> {
    const need = this.#pending.count;
    for (;;) {
      const applying = this.#applying.find((application) => application.changes.oldest <= need);
      if (applying !== undefined) {
        await applying.done;
        continue;
      }
      if (this.#pending.oldest > need) return;
      await this.#flushNow();
    }
  }

  /** Applies every pending change: through the agent, or with one control command. */
  async #flushNow(): Promise<void> {
    const agent = await this.#agentFor(await this.#connect());
    if (agent !== undefined) {
      await this.#flushByAgent(agent);
      return;
    }
    const release = await this.#slots.acquire('control');
    let carried: Carried | undefined;
    try {
      carried = await this.#carry(Infinity, undefined);
      const { changes } = carried;
      if (changes === NO_CHANGES) return;
      const connection = await this.#connect();
      this.#stats.changeFlushes++;
      const nonce = `DROVER-${randomBytes(9).toString('hex')}`;
      const { exitCode, stdout, stderr } = await this.#runOn(connection, changesCommandLine(nonce, changes));
      for (const line of stdout.split('\n')) {
        const [marker, kind, index] = line.split(' ');
        if (marker === nonce && (kind === 'unremoved' || kind === 'unmade')) this.#changeFailed(changes, kind, Number(index));
      }
      if (exitCode !== 0) this.#logger?.error('ssh: applying deferred changes failed', { exitCode, stderr: stderr.trim() });
      carried.settle(true);
    } catch (error) {
      carried?.settle(false);
      throw error;
    } finally {
      release();
    }
  }

  async #flushByAgent(agent: RemoteAgent): Promise<void> {
    const carried = await this.#carry(Infinity, agent);
    const { changes } = carried;
    if (changes === NO_CHANGES) return;
    this.#stats.changeFlushes++;
    let failed: { unremoved: number[]; unmade: number[] };
    try {
      failed = await agent.applyChanges(changes);
    } catch (error) {
      carried.settle(false);
      throw new SshConnectionError(`${this.address}: cannot apply deferred changes: ${errorMessage(error)}`, { cause: error });
    }
    for (const index of failed.unremoved) this.#changeFailed(changes, 'unremoved', index);
    for (const index of failed.unmade) this.#changeFailed(changes, 'unmade', index);
    carried.settle(true);
  }

  #scheduleFlush(): void {
    if (this.#flushTimer !== undefined || this.#closing !== undefined || this.#pending.empty) return;
    this.#flushTimer = setTimeout(() => {
      this.#flushTimer = undefined;
      if (this.#pending.empty || this.#closing !== undefined) return;
      // A failure leaves them pending for the next command, or close(); a lost connection is reported by `lost`.
      this.#flushNow().catch((error: unknown) => this.#logger?.debug('ssh: deferred changes wait for the connection', { error: errorMessage(error) }));
    }, FLUSH_DELAY_MS);
    this.#flushTimer.unref();
  }

  /** A deferred change the host could not make. */
  #changeFailed(changes: Changes, kind: ChangeFailure, index: number): void {
    const path = kind === 'unremoved' ? changes.removals[index] : changes.dirs[index];
    if (path === undefined) return;
    if (kind === 'unremoved') {
      this.#stats.failedRemovals++;
      this.#logger?.error('ssh: cannot remove a path', { path });
    } else {
      this.#unmade.set(path, `cannot make the directory ${path} on ${this.address}`);
    }
  }

  async #connect(): Promise<Connection> {
    if (this.#connection !== undefined && !this.#connection.closed) return this.#connection;
    this.#connecting ??= this.#open().finally(() => (this.#connecting = undefined));
    return this.#connecting;
  }

  async #open(): Promise<Connection> {
    if (this.#closed) throw new SshConnectionError(`${this.address}: the transport is closed`);
    const wait = this.#nextAttemptAt - Date.now();
    if (wait > 0) await sleep(wait);
    const options = this.#options;
    const { host, port, user } = this.target;
    const knownHostsFile = options.knownHostsFile ?? joinLocal(homedir(), '.ssh', 'known_hosts');
    const policy = options.hostKeyPolicy ?? 'strict';
    const check = { file: knownHostsFile, policy, host, port, address: this.address };
    let refused: HostKeyError | undefined;
    const client = new Client();
    const connection: Connection = { client, closed: false, closedSignal: new AbortController() };
    this.#stats.connectionsOpened++;
    try {
      const auth = authMethods(user, options);
      const preferred = policy === 'off' ? [] : knownKeyTypes(check).flatMap((type) => DEFAULT_HOST_KEY_ALGORITHMS[type] ?? []);
      await new Promise<void>((resolve, reject) => {
        client.once('ready', resolve);
        client.once('error', reject);
        client.connect({
          host,
          port,
          username: user,
          authHandler: auth.methods,
          readyTimeout: options.connectTimeoutMs ?? 10_000,
          keepaliveInterval: options.keepaliveIntervalMs ?? 5000,
          keepaliveCountMax: options.keepaliveCountMax ?? 3,
          ...(preferred.length > 0 ? { algorithms: { serverHostKey: { remove: preferred, prepend: preferred } as never } } : {}),
          hostVerifier: (key: Buffer) => {
            try {
              verifyHostKey(check, key);
              return true;
            } catch (error) {
              refused = error instanceof HostKeyError ? error : new HostKeyError(errorMessage(error));
              return false;
            }
          },
        });
        client.setNoDelay(true);
      }).catch((error: unknown) => {
        if (refused !== undefined) throw refused;
        const message = errorMessage(error);
        if (/authentication methods failed/i.test(message)) {
          throw new SshConnectionError(`cannot log in to ${this.address}: authentication failed (tried ${auth.tried.join(', ') || 'nothing'})`, { cause: error });
        }
        throw new SshConnectionError(`cannot connect to ${this.address}: ${describeConnectError(error)}`, { cause: error });
      });
    } catch (error) {
      client.removeAllListeners('error');
      client.on('error', () => {});
      client.destroy();
      this.#failures++;
      const base = options.reconnectDelayMs ?? 100;
      this.#nextAttemptAt = Date.now() + Math.min(options.maxReconnectDelayMs ?? 5000, base * 2 ** (this.#failures - 1));
      throw error;
    }
    this.#failures = 0;
    this.#nextAttemptAt = 0;
    client.removeAllListeners('error');
    client.on('error', (error: Error) => {
      connection.error ??= error;
    });
    client.on('close', () => {
      if (connection.closed) return;
      connection.closed = true;
      connection.releaseSftp?.();
      if (this.#connection === connection) this.#connection = undefined;
      if (!this.#closed) {
        const error = new SshConnectionError(`the connection to ${this.address} was lost${connection.error ? `: ${connection.error.message}` : ''}`, { cause: connection.error });
        this.#logger?.warn('ssh connection lost', { error: error.message });
        // First the host hears of it (it stops the runs placed there), then the commands end.
        this.emit('lost', error);
      }
      connection.closedSignal.abort();
    });
    if (this.#closed) {
      client.end();
      throw new SshConnectionError(`${this.address}: the transport is closed`);
    }
    this.#connection = connection;
    this.#logger?.debug('ssh connected');
    // The agent starts with the connection, so that the first command does not wait for it.
    await this.#agentFor(connection);
    return connection;
  }

  /**
   * Opens an exec channel; `onChannel` runs synchronously with it, before any of its events.
   * The server frees a closed channel's session only once it has our close, so right
   * after many closes it may refuse a new one for a moment (MaxSessions): that is retried.
   */
  async #openExec<T>(connection: Connection, command: string, onChannel: (channel: ClientChannel) => T): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#request<ClientChannel, T>(connection, (done) => connection.client.exec(command, done), (channel) => {
          this.#stats.channelsOpened++;
          return onChannel(channel);
        });
      } catch (error) {
        if (error instanceof SshConnectionError) throw error;
        const refusedOpen = typeof (error as { reason?: unknown }).reason === 'number';
        if (refusedOpen && attempt < OPEN_RETRIES && !connection.closed) {
          await sleep(Math.min(200, 5 * 2 ** attempt));
          continue;
        }
        throw new SshConnectionError(`${this.address}: cannot start a command: ${errorMessage(error)}`, { cause: error });
      }
    }
  }

  /**
   * An ssh2 request on `connection` (a channel to open), settled by its callback, or failed once the
   * connection is lost: ssh2 never calls back a request that the connection dropped under halfway
   * (a channel confirmed, its subsystem not yet), and whoever waits on it would wait for ever.
   * `take` runs inside the callback, before any event of what it gives.
   */
  #request<T, R>(connection: Connection, send: (done: (error: Error | undefined, value: T) => void) => void, take: (value: T) => R): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      const lost = () => reject(new SshConnectionError(`the connection to ${this.address} was lost`, { cause: connection.error }));
      if (connection.closed) {
        lost();
        return;
      }
      const signal = connection.closedSignal.signal;
      signal.addEventListener('abort', lost, { once: true });
      send((error, value) => {
        signal.removeEventListener('abort', lost);
        if (error) reject(error);
        else resolve(take(value));
      });
    });
  }

  /** The connection's SFTP channel (this transport's connection, made if need be, unless one is given). */
  async #sftp(given?: Connection): Promise<SFTPWrapper> {
    const connection = given ?? (await this.#connect());
    if (connection.sftp === undefined) {
      connection.sftp = this.#request<SFTPWrapper, SFTPWrapper>(connection, (done) => connection.client.sftp(done), (sftp) => {
        this.#stats.channelsOpened++;
        sftp.on('error', () => {});
        return sftp;
      }).catch((error: unknown) => {
        throw error instanceof SshConnectionError ? error : new SshConnectionError(`${this.address}: cannot start SFTP: ${errorMessage(error)}`, { cause: error });
      });
      connection.sftp.catch(() => {
        connection.sftp = undefined;
      });
    }
    return connection.sftp;
  }

  /** An SFTP failure as a Node-style error (ENOENT, EACCES) naming the path and the host. */
  #fileError(error: unknown, path: string): Error {
    const status = (error as { code?: unknown }).code;
    const code = status === 2 ? 'ENOENT' : status === 3 ? 'EACCES' : typeof status === 'string' ? status : 'EIO';
    const text = code === 'ENOENT' ? 'no such file or directory' : code === 'EACCES' ? 'permission denied' : errorMessage(error);
    return Object.assign(new Error(`${code}: ${text}, '${path}' on ${this.address}`, { cause: error }), { code, path });
  }
}

/** The file type in an SFTP entry's mode bits (S_IFMT), as FileStat says it. */
function typeOfMode(mode: number): FileStat['type'] {
  switch (mode & 0o170000) {
    case 0o120000: return 'symlink';
    case 0o100000: return 'file';
    case 0o040000: return 'directory';
    default: return 'other';
  }
}

/** Deferred changes that an operation took to apply; settle(false) puts them back. */
interface Carried {
  readonly changes: Changes;
  settle(applied: boolean): void;
}

const NOTHING_CARRIED: Carried = { changes: NO_CHANGES, settle: () => {} };

/** A working directory the wrapper could not clear or make: the error its mkdir would have given. */
function workdirError(why: string, path: string): Error {
  return Object.assign(new Error(why), { code: 'EIO', path });
}

function describeConnectError(error: unknown): string {
  const code = (error as { code?: string }).code;
  const level = (error as { level?: string }).level;
  if (code === 'ECONNREFUSED') return 'connection refused (is sshd running on that port?)';
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return 'no such host name';
  if (code === 'ETIMEDOUT' || /timed out/i.test(errorMessage(error))) return 'timed out';
  return level === 'client-ssh' ? `the server refused: ${errorMessage(error)}` : errorMessage(error);
}

function authMethods(user: string, options: SshAuthOptions): { methods: AnyAuthMethod[]; tried: string[] } {
  const methods: AnyAuthMethod[] = [];
  const tried: string[] = [];
  const explicit = options.identityFiles !== undefined;
  const files = options.identityFiles ?? ['id_ed25519', 'id_ecdsa', 'id_rsa'].map((name) => joinLocal(homedir(), '.ssh', name));
  for (const file of files) {
    let key: Buffer;
    try {
      key = readFileSync(file);
    } catch (error) {
      if (!explicit && (error as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw new SshConnectionError(`identity file "${file}" cannot be read: ${(error as NodeJS.ErrnoException).code ?? errorMessage(error)}`);
    }
    methods.push({ type: 'publickey', username: user, key, ...(options.passphrase === undefined ? {} : { passphrase: options.passphrase }) });
    tried.push(`key ${file}`);
  }
  const agent = options.agent === false ? undefined : (options.agent ?? process.env['SSH_AUTH_SOCK']);
  if (agent) {
    methods.push({ type: 'agent', username: user, agent });
    tried.push('ssh-agent');
  }
  if (methods.length === 0) throw new SshConnectionError('no SSH credentials: give identity files, or run ssh-agent (SSH_AUTH_SOCK)');
  return { methods, tried };
}

/** A command running over SSH; see ssh-remote.ts for the remote side. */
class SshExecution implements Execution {
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly exited: Promise<ExitStatus & { readonly startError?: Error }>;
  /** Settles once the header came: the command started, or could not. */
  readonly started: Promise<void>;
  /** The remote main process, also its process group. */
  pid: number | undefined;
  /** The wrapper's last header line came: it applied the changes it carried. */
  headerSeen = false;
  /** Why the working directory could not be cleared or made (exec() rejects then). */
  workdirError: string | undefined;
  readonly #transport: SshTransport | undefined;
  readonly #channel: ClientChannel | undefined;
  readonly #connection: Connection | undefined;
  #exitSeen = false;
  /** The channel is closed: the main process exited and its output ended, or the connection is gone. */
  #gone = false;
  /** No process of the group is left: its id may be reused, so it is never signalled again. */
  #freed = false;
  /** Settles with whether the wrapper said, once the main process exited, that nothing of its group is left. */
  readonly #groupReport: Promise<boolean>;

  static failed(startError: Error): SshExecution {
    return new SshExecution(undefined, undefined, undefined, '', () => {}, () => {}, startError);
  }

  constructor(
    transport: SshTransport | undefined,
    connection: Connection | undefined,
    channel: ClientChannel | undefined,
    nonce: string,
    release: () => void,
    onChangeFailed: (kind: ChangeFailure, index: number) => void,
    startError?: Error,
  ) {
    this.#transport = transport;
    this.#connection = connection;
    this.#channel = channel;
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    this.stdout = stdout;
    this.stderr = stderr;
    if (channel === undefined || transport === undefined) {
      stdout.end();
      stderr.end();
      this.#gone = true;
      this.#freed = true;
      this.exited = Promise.resolve({ exitCode: 127, signal: null, startError: startError ?? new Error('not started') });
      this.started = Promise.resolve();
      this.#groupReport = Promise.resolve(true);
      return;
    }
    let reportGroup!: (gone: boolean) => void;
    this.#groupReport = new Promise((resolve) => (reportGroup = resolve));
    let resolveExit!: (status: ExitStatus & { readonly startError?: Error }) => void;
    this.exited = new Promise((resolve) => (resolveExit = resolve));
    let headerDone!: () => void;
    this.started = new Promise((resolve) => (headerDone = resolve));
    let headerError: Error | undefined;
    let pending = Buffer.alloc(0);
    let inHeader = true;
    channel.on('data', (data: Buffer) => {
      if (!stdout.write(data)) {
        channel.pause();
        stdout.once('drain', () => channel.resume());
      }
    });
    // After the header, the command's stderr, out of which the watcher's one report line is taken.
    const marker = Buffer.from(`${nonce} `);
    let reported = false;
    let held = Buffer.alloc(0);
    const passOn = (data: Buffer) => {
      if (reported) {
        stderr.write(data);
        return;
      }
      let rest = held.length > 0 ? Buffer.concat([held, data]) : data;
      held = Buffer.alloc(0);
      for (let at = rest.indexOf(marker); at >= 0; at = rest.indexOf(marker)) {
        const newline = rest.indexOf(10, at);
        if (newline < 0) break;
        const word = rest.subarray(at + marker.length, newline).toString('latin1');
        if (at > 0) stderr.write(rest.subarray(0, at));
        rest = rest.subarray(newline + 1);
        if (word === 'gone' || word === 'alive') {
          reported = true;
          if (word === 'gone') this.#freed = true;
          reportGroup(word === 'gone');
          if (rest.length > 0) stderr.write(rest);
          return;
        }
      }
      // The report comes after the exit; from then on, bytes that may begin it are held back until the rest
      // of it comes (or the channel closes).
      const start = rest.indexOf(marker);
      const keep = !this.#exitSeen ? 0 : start >= 0 ? rest.length - start : partialMatch(rest, marker);
      if (rest.length > keep) stderr.write(rest.subarray(0, rest.length - keep));
      if (keep > 0) held = Buffer.from(rest.subarray(rest.length - keep));
    };
    channel.stderr.on('data', (data: Buffer) => {
      if (!inHeader) {
        passOn(data);
        return;
      }
      pending = Buffer.concat([pending, data]);
      for (let newline = pending.indexOf(10); newline >= 0 && inHeader; newline = pending.indexOf(10)) {
        const line = pending.subarray(0, newline).toString('utf8');
        pending = pending.subarray(newline + 1);
        const [word, argument] = line.startsWith(`${nonce} `) ? splitOnce(line.slice(nonce.length + 1)) : ['', ''];
        if (word === 'started') {
          this.pid = Number(argument);
        } else if (word === 'error') {
          headerError = new Error(`${argument} (on ${transport.address})`);
        } else if (word === 'workdir') {
          this.workdirError = `${argument} on ${transport.address}`;
          headerError = new Error(this.workdirError);
        } else if (word === 'unremoved' || word === 'unmade') {
          onChangeFailed(word, Number(argument));
          continue;
        } else {
          // Said before the wrapper ran (the login shell, sshd): the command's stderr all the same.
          stderr.write(`${line}\n`);
          continue;
        }
        inHeader = false;
        this.headerSeen = true;
      }
      if (!inHeader) {
        const rest = pending;
        pending = Buffer.alloc(0);
        if (rest.length > 0) passOn(rest);
        headerDone();
      }
    });
    channel.on('exit', (code: number | null, signal?: string) => {
      this.#exitSeen = true;
      // ssh2 emits the exit at once but stream data a tick later: the header may still be on its way.
      void this.started.then(() => {
        if (headerError !== undefined) resolveExit({ exitCode: 127, signal: null, startError: headerError });
        else resolveExit(signal ? { exitCode: null, signal: signal as NodeJS.Signals } : { exitCode: code ?? 255, signal: null });
      });
    });
    {
      const finish = () => {
        if (this.#gone) return;
        this.#gone = true;
        release();
        if (inHeader) {
          inHeader = false;
          if (pending.length > 0) stderr.write(pending);
          headerError ??= new Error(connection?.closed ? `the connection to ${transport.address} was lost before the command started` : `the command did not start on ${transport.address}`);
          headerDone();
        }
        reportGroup(false);
        if (held.length > 0) stderr.write(held);
        if (!this.#exitSeen) {
          const lost = connection?.closed === true;
          if (lost && headerError === undefined) stderr.write(`[drover] the connection to ${transport.address} was lost while the command ran\n`);
          resolveExit(headerError !== undefined ? { exitCode: 127, signal: null, startError: headerError } : { exitCode: 255, signal: null });
        }
        stdout.end();
        stderr.end();
      };
      const signal = connection?.closedSignal.signal;
      const onLost = () => finish();
      channel.once('close', () => {
        signal?.removeEventListener('abort', onLost);
        finish();
      });
      signal?.addEventListener('abort', onLost, { once: true });
    }
  }

  async kill(signal: NodeJS.Signals): Promise<void> {
    if (this.#freed || this.pid === undefined) return;
    const name = signalName(signal);
    if (!this.#exitSeen && !this.#gone && this.#channel?.writable) {
      // The watcher reads signals on the channel's stdin while the main process runs.
      this.#channel.write(`${name}\n`);
      return;
    }
    // The main process has exited (sshd closed the watcher's stdin): the watcher says whether anything is left,
    // and what is left of the group is signalled directly.
    if (await this.#groupEnded()) return;
    if (this.#connection?.closed) return;
    await this.#control(signal, 0);
  }

  async waitGone(timeoutMs: number): Promise<boolean> {
    if (this.#freed || this.pid === undefined) return true;
    const deadline = performance.now() + Math.max(0, timeoutMs);
    if (!this.#exitSeen && !this.#gone && !(await exitsWithin(this.exited, timeoutMs))) return false;
    if (await this.#groupEnded()) return true;
    // Without a connection the remote watcher stops the group on its own; there is nobody to ask.
    if (this.#connection?.closed) return true;
    return this.#control(undefined, deadline - performance.now());
  }

  /** After the main process exited: whether the watcher said that nothing of the group was left (then it is never signalled again). */
  async #groupEnded(): Promise<boolean> {
    if (this.#freed) return true;
    const timer = new AbortController();
    await Promise.race([this.#groupReport, sleep(GROUP_REPORT_WAIT_MS, undefined, { signal: timer.signal, ref: false }).catch(() => {})]);
    timer.abort();
    return this.#freed;
  }

  /** Signals what is left of the group and/or waits for it; true once it is gone (and never signalled again). */
  async #control(signal: NodeJS.Signals | undefined, waitMs: number): Promise<boolean> {
    try {
      const { stdout } = await this.#transport!.run(groupControlLine(this.pid!, signal, waitMs));
      if (stdout.trim() === 'gone') this.#freed = true;
    } catch (error) {
      if (this.#connection?.closed) return true;
      throw error;
    }
    return this.#freed;
  }
}

/** How many bytes at the end of `data` are the first bytes of `marker`. */
function partialMatch(data: Buffer, marker: Buffer): number {
  for (let length = Math.min(marker.length - 1, data.length); length > 0; length--) {
    if (data.subarray(data.length - length).equals(marker.subarray(0, length))) return length;
  }
  return 0;
}
