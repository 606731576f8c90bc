/**
 * The client side of the agent (the program and its frame protocol:
 * ssh-agent-program.ts). The SSH transport runs one per connection, in one
 * exec channel; the local transport runs one as a child process, with its
 * stdin and stdout as the channel. Every command goes through it, with no
 * channel of its own:
 *
 * - exec(): a `C` frame; the agent forks, applies the deferred changes the
 *   command carries, and starts it in a process group of its own.
 * - stdout and stderr come back as frames; each stream is credited as its
 *   reader consumes it, so at most the agent's window (256 KiB) of a
 *   stream is on its way or buffered here, whatever the reader does.
 * - kill() and waitGone() are frames too; once the main process exited the
 *   agent says at once whether anything of its group is left.
 * - When the channel or the connection goes, the agent stops every group
 *   it started (signal, grace period, SIGKILL); the commands here end as
 *   the wrapper's do when the connection is lost (exit code 255). An agent
 *   that dies without doing so (SIGKILL: the OOM killer, an admin) leaves
 *   them running, each in its session: the transport that ran the agent
 *   stops them (onClosed, AgentExecution.stoppedBy).
 */
import { PassThrough } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import { AGENT_PROTOCOL, NO_PERL, agentCommandLine, agentProgramMessage } from './ssh-agent-program.js';
import type { Changes } from './ssh-pending.js';
import type { ExecOptions, Execution, ExitStatus } from './transport.js';

const HEADER = 9;

export type ChangeFailure = 'unremoved' | 'unmade';

/** A command for the agent: the transport's exec() arguments and the deferred changes it carries. */
export interface AgentCommand extends Pick<ExecOptions, 'cwd' | 'env'> {
  readonly argv: readonly string[];
  readonly changes: Pick<Changes, 'removals' | 'dirs'>;
  /** A removal among the changes covers cwd: it must be gone before the directories are made. */
  readonly freshCwd: boolean;
}

/** What the agent's frames travel over: what ssh2's exec channel offers, or a child process's pipes. */
export interface AgentChannel {
  /** The agent's own complaints. */
  readonly stderr: { on(event: 'data', listener: (data: Buffer) => void): unknown };
  on(event: 'data', listener: (data: Buffer) => void): unknown;
  /** The agent's exit: its code, or the signal (`SIGKILL`) that ended it. */
  on(event: 'exit', listener: (code: number | null, signal?: string | null) => void): unknown;
  once(event: 'close', listener: () => void): unknown;
  write(data: Buffer): unknown;
  /** Ends the agent's stdin. */
  end(): unknown;
  /** Gives the channel up at once. */
  close(): unknown;
}

export interface AgentStartOptions {
  /** Where the agent runs, for messages: `user@name:port`, or `this machine`. */
  readonly address: string;
  readonly killSignal: string;
  readonly killGraceMs: number;
  /** How long the agent may take to say hello. */
  readonly timeoutMs: number;
  /** Aborted when the connection is gone (its channels may go silently). */
  readonly connectionClosed: AbortSignal;
  readonly logger?: Logger | undefined;
  /**
   * Whether to answer every batch of frames with a no-op frame (P): over SSH, where sshd's Nagle's
   * algorithm would otherwise hold the agent's next frames for our delayed ACK. Default true.
   */
  readonly acknowledge?: boolean;
  /** Hears when the agent gets its first command in flight (true) and when it has none left (false). */
  readonly onBusy?: (busy: boolean) => void;
  /** Runs the shell command line `command` with a channel to it; `onChannel` runs before any of its events. */
  open<T>(command: string, onChannel: (channel: AgentChannel) => T): Promise<T>;
}

/** Why there is no agent: the host has no perl, or it did not start. */
export interface AgentUnavailable {
  readonly noPerl: boolean;
  readonly reason: string;
}

function encode(type: string, id: number, payload: string | Buffer = ''): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload, 'utf8') : payload;
  const frame = Buffer.allocUnsafe(HEADER + body.length);
  frame.write(type, 0, 'latin1');
  frame.writeUInt32BE(id, 1);
  frame.writeUInt32BE(body.length, 5);
  body.copy(frame, HEADER);
  return frame;
}

/** NUL-separated fields; a NUL inside one could not reach the host intact. */
function fields(values: readonly string[], what: string): string {
  for (const value of values) if (value.includes('\0')) throw new Error(`exec: ${what} contains a NUL byte, which cannot be passed to a command: ${JSON.stringify(value)}`);
  return values.join('\0');
}

function changeFields(changes: Pick<Changes, 'removals' | 'dirs'>): string[] {
  return [String(changes.removals.length), ...changes.removals, String(changes.dirs.length), ...changes.dirs];
}

/** The no-op frame, P: see the channel's data handler. */
const NOTHING = encode('P', 0);

export class RemoteAgent {
  readonly #channel: AgentChannel;
  readonly #address: string;
  readonly #logger: Logger | undefined;
  #nextId = 1;
  readonly #executions = new Map<number, AgentExecution>();
  readonly #flushes = new Map<number, { unremoved: number[]; unmade: number[]; done: () => void; failed: (error: Error) => void }>();
  /** The agent said hello: it runs the program and speaks the protocol. */
  #started = false;
  #closed = false;
  #lostConnection = false;
  /** How the agent ended, once its channel said: `exit code N` or `signal SIGNAME`. */
  #exit: string | undefined;
  readonly #onBusy: ((busy: boolean) => void) | undefined;
  readonly #closedListeners: ((inFlight: readonly AgentExecution[]) => void)[] = [];

  /** Starts the agent on the host; resolves with it, or with why there is none. */
  static async start(options: AgentStartOptions): Promise<RemoteAgent | AgentUnavailable> {
    let stderr = '';
    let exitCode: number | null = null;
    let agent: RemoteAgent | undefined;
    let hello!: (outcome: boolean) => void;
    const said = new Promise<boolean>((resolve) => (hello = resolve));
    try {
      await options.open(agentCommandLine(options.killSignal, options.killGraceMs), (channel) => {
        agent = new RemoteAgent(channel, options, () => hello(true));
        channel.stderr.on('data', (data: Buffer) => {
          if (agent !== undefined && agent.#started) {
            agent.#logger?.warn('ssh agent said', { message: data.toString().trim() });
          } else {
            stderr = (stderr + data.toString()).slice(-2000);
          }
        });
        channel.on('exit', (code: number | null) => (exitCode = code));
        channel.once('close', () => hello(false));
        options.connectionClosed.addEventListener('abort', () => hello(false), { once: true });
        channel.write(agentProgramMessage());
      });
    } catch (error) {
      return { noPerl: false, reason: errorMessage(error) };
    }
    const timer = new AbortController();
    const started = await Promise.race([said, sleep(options.timeoutMs, false, { signal: timer.signal }).catch(() => false)]);
    timer.abort();
    if (started && agent !== undefined) return agent;
    if (agent !== undefined) {
      agent.close();
      agent.#channel.close();
    }
    const noPerl = exitCode === 127 && stderr.includes(NO_PERL);
    const reason = noPerl ? NO_PERL : `the agent did not start (exit code ${exitCode ?? 'none'}${stderr.trim() ? `: ${stderr.trim()}` : ''})`;
    return { noPerl, reason };
  }

  private constructor(channel: AgentChannel, options: AgentStartOptions, onHello: () => void) {
    this.#channel = channel;
    this.#onBusy = options.onBusy;
    const acknowledge = options.acknowledge ?? true;
    this.#address = options.address;
    this.#logger = options.logger;
    /** Bytes not parsed yet: at most a header or a control frame, since output is passed on as it comes. */
    let buffer: Buffer = Buffer.alloc(0);
    /** The output frame (O, E) whose payload is still coming, and how much of it. */
    let output: { type: string; id: number; left: number } | undefined;
    channel.on('data', (data: Buffer) => {
      buffer = buffer.length === 0 ? data : Buffer.concat([buffer, data]);
      let at = 0;
      while (at < buffer.length) {
        if (output !== undefined) {
          // Output goes on in the pieces it comes in: a frame of 64 KiB spans reads, and joining them would copy it.
          const piece = buffer.subarray(at, at + output.left);
          at += piece.length;
          output.left -= piece.length;
          const { type, id } = output;
          if (output.left === 0) output = undefined;
          this.#onFrame(type, id, piece);
          continue;
        }
        if (buffer.length - at < HEADER) break;
        const type = String.fromCharCode(buffer[at]!);
        const id = buffer.readUInt32BE(at + 1);
        const length = buffer.readUInt32BE(at + 5);
        if ((type === 'O' || type === 'E') && length > 0) {
          at += HEADER;
          output = { type, id, left: length };
          continue;
        }
        if (buffer.length - at < HEADER + length) break;
        const payload = buffer.subarray(at + HEADER, at + HEADER + length);
        at += HEADER + length;
        if (type === 'H') {
          if (payload.toString() !== AGENT_PROTOCOL) {
            this.#logger?.warn('ssh agent: unknown protocol', { hello: payload.toString() });
            this.close();
            return;
          }
          this.#started = true;
          onHello();
        } else {
          this.#onFrame(type, id, payload);
        }
      }
      buffer = at === buffer.length ? Buffer.alloc(0) : buffer.subarray(at);
      // sshd leaves Nagle's algorithm on in sessions without a terminal: its next frames wait for the TCP ACK
      // of these, which Linux may delay up to 40 ms. A frame back carries the ACK at once.
      if (acknowledge && this.#started && !this.#closed) this.#channel.write(NOTHING);
    });
    const onLost = () => {
      this.#lostConnection = true;
      this.#ended();
    };
    options.connectionClosed.addEventListener('abort', onLost, { once: true });
    channel.on('exit', (code: number | null, signal?: string | null) => {
      this.#exit = signal ? `signal ${signal}` : `exit code ${code}`;
    });
    channel.once('close', () => {
      options.connectionClosed.removeEventListener('abort', onLost);
      this.#ended();
    });
  }

  /** Whether the agent's channel is gone. */
  get closed(): boolean {
    return this.#closed;
  }

  /** How the agent ended (`exit code N`, `signal SIGKILL`), if its channel said. */
  get exit(): string | undefined {
    return this.#exit;
  }

  /** Calls `listener` once the agent's channel is gone, with the commands it had not said all about. */
  onClosed(listener: (inFlight: readonly AgentExecution[]) => void): void {
    if (this.#closed) listener([]);
    else this.#closedListeners.push(listener);
  }

  /** Starts a command; exec() waits for `started` and looks at headerSeen and workdirError, as with the wrapper. */
  exec(command: AgentCommand, onChangeFailed: (kind: ChangeFailure, index: number) => void): AgentExecution {
    const id = this.#id();
    const assignments = Object.entries(command.env).map(([name, value]) => `${name}=${value}`);
    const payload = [
      command.freshCwd ? '1' : '0',
      command.cwd,
      command.env['PATH'] ?? '/usr/bin:/bin',
      ...changeFields(command.changes),
      String(assignments.length),
      ...assignments,
      ...command.argv,
    ];
    const frame = encode('C', id, fields(payload, 'an argument, variable or path'));
    const execution = new AgentExecution(this, id, this.#address, onChangeFailed);
    if (this.#closed) {
      execution.agentGone(this.#lostConnection);
      return execution;
    }
    this.#executions.set(id, execution);
    if (this.#executions.size === 1) this.#onBusy?.(true);
    this.#channel.write(frame);
    return execution;
  }

  /** Applies deferred changes on the host (in a child of the agent); resolves with the indexes of those that failed. */
  applyChanges(changes: Pick<Changes, 'removals' | 'dirs'>): Promise<{ unremoved: number[]; unmade: number[] }> {
    if (this.#closed) return Promise.reject(new Error(`the agent on ${this.#address} is gone`));
    const id = this.#id();
    const frame = encode('F', id, fields(changeFields(changes), 'a path'));
    return new Promise((resolve, reject) => {
      const flush = { unremoved: [] as number[], unmade: [] as number[], done: () => resolve(flush), failed: reject };
      this.#flushes.set(id, flush);
      this.#channel.write(frame);
    });
  }

  /** Sends a frame about a command, unless the agent is gone. */
  send(type: string, id: number, payload: string): void {
    if (!this.#closed) this.#channel.write(encode(type, id, payload));
  }

  /** The command is done with: no frame will come for it. */
  forget(id: number): void {
    if (this.#executions.delete(id) && this.#executions.size === 0) this.#onBusy?.(false);
  }

  /**
   * Ends the agent's stdin: it stops every group it started, as when the
   * connection breaks, and exits; then its channel closes. (sshd keeps a
   * channel that the client closes open until its command exits, stdin too.)
   */
  close(): void {
    this.#channel.end();
  }

  #id(): number {
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 0xffffffff ? 1 : this.#nextId + 1;
    return id;
  }

  #onFrame(type: string, id: number, payload: Buffer): void {
    const flush = this.#flushes.get(id);
    if (flush !== undefined) {
      if (type === 'U') flush.unremoved.push(Number(payload.toString()));
      else if (type === 'M') flush.unmade.push(Number(payload.toString()));
      else if (type === 'D') {
        this.#flushes.delete(id);
        flush.done();
      }
      return;
    }
    this.#executions.get(id)?.onFrame(type, payload);
  }

  #ended(): void {
    if (this.#closed) return;
    this.#closed = true;
    const inFlight = [...this.#executions.values()];
    for (const execution of inFlight) execution.agentGone(this.#lostConnection);
    this.#executions.clear();
    if (inFlight.length > 0) this.#onBusy?.(false);
    for (const flush of this.#flushes.values()) flush.failed(new Error(this.#lostConnection ? `the connection to ${this.#address} was lost` : `the agent on ${this.#address} stopped`));
    this.#flushes.clear();
    for (const listener of this.#closedListeners.splice(0)) listener(inFlight);
  }
}

/** One output stream of a command: bytes given to its reader and not yet credited to the agent. */
interface StreamSide {
  readonly stream: PassThrough;
  /** The frame that credits it: A (stdout) or B (stderr). */
  readonly credit: 'A' | 'B';
  uncredited: number;
  draining: boolean;
  ended: boolean;
}

/** A command started by the agent. */
export class AgentExecution implements Execution {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  readonly exited: Promise<ExitStatus & { readonly startError?: Error }>;
  /** Settles once the agent said whether the command started. */
  readonly started: Promise<void>;
  /** The main process, also its process group. */
  pid: number | undefined;

  /** The command's process group: its main process's pid. */
  get pgid(): number | undefined {
    return this.pid;
  }
  /** The agent said whether it started: it applied the changes the command carried. */
  headerSeen = false;
  /** Why the working directory could not be cleared or made (exec() rejects then). */
  workdirError: string | undefined;
  readonly #agent: RemoteAgent;
  readonly #id: number;
  readonly #address: string;
  readonly #onChangeFailed: (kind: ChangeFailure, index: number) => void;
  #resolveExit!: (status: ExitStatus & { readonly startError?: Error }) => void;
  #resolveStarted!: () => void;
  #exitSeen = false;
  /** The agent is gone, or said all there is to say about the command. */
  #over = false;
  /** No process of the group is left: its id may be reused, so it is never signalled again. */
  #freed = false;
  #reportGroup!: (gone: boolean) => void;
  /** Once the agent is gone: whether whoever stops the group in its place (stoppedBy) saw it gone. */
  #stopped: Promise<boolean> | undefined;
  /** Settles with what the agent said, right after the exit, of the group. */
  readonly #groupReport: Promise<boolean>;
  /** Answers to group queries, in the order they were asked. */
  readonly #answers: ((gone: boolean) => void)[] = [];
  readonly #streams: { O: StreamSide; E: StreamSide } = {
    O: { stream: this.stdout, credit: 'A', uncredited: 0, draining: false, ended: false },
    E: { stream: this.stderr, credit: 'B', uncredited: 0, draining: false, ended: false },
  };

  constructor(agent: RemoteAgent, id: number, address: string, onChangeFailed: (kind: ChangeFailure, index: number) => void) {
    this.#agent = agent;
    this.#id = id;
    this.#address = address;
    this.#onChangeFailed = onChangeFailed;
    this.exited = new Promise((resolve) => (this.#resolveExit = resolve));
    this.started = new Promise((resolve) => (this.#resolveStarted = resolve));
    this.#groupReport = new Promise((resolve) => (this.#reportGroup = resolve));
  }

  onFrame(type: string, payload: Buffer): void {
    switch (type) {
      case 'U':
      case 'M':
        this.#onChangeFailed(type === 'U' ? 'unremoved' : 'unmade', Number(payload.toString()));
        return;
      case 'S':
        this.pid = Number(payload.toString());
        this.headerSeen = true;
        this.#resolveStarted();
        return;
      case 'N': {
        const [word, why] = splitOnce(payload.toString());
        this.headerSeen = true;
        let startError: Error;
        if (word === 'workdir') {
          this.workdirError = `${why} on ${this.#address}`;
          startError = new Error(this.workdirError);
        } else {
          startError = new Error(`${why} (on ${this.#address})`);
        }
        this.#freed = true;
        this.#finish({ exitCode: 127, signal: null, startError });
        return;
      }
      case 'O':
      case 'E':
        this.#deliver(this.#streams[type], payload);
        return;
      case 'o':
      case 'e':
        this.#endStream(this.#streams[type === 'o' ? 'O' : 'E']);
        return;
      case 'X': {
        const [word, value] = splitOnce(payload.toString());
        this.#exitSeen = true;
        this.#resolveExit(word === 'signal' ? { exitCode: null, signal: value as NodeJS.Signals } : { exitCode: Number(value), signal: null });
        return;
      }
      case 'G':
      case 'R': {
        const gone = payload.toString() === 'gone';
        if (gone) this.#freed = true;
        if (type === 'G') this.#reportGroup(gone);
        else this.#answers.shift()?.(gone);
        this.#forgetIfDone();
        return;
      }
    }
  }

  /** Whether the agent said that no process of the group is left (its id may be reused since). */
  get groupGone(): boolean {
    return this.#freed;
  }

  /** The agent's channel or the connection is gone: the agent stops the group by itself. */
  agentGone(connectionLost: boolean): void {
    if (this.#over) return;
    const what = connectionLost ? `the connection to ${this.#address} was lost` : `the agent on ${this.#address} stopped`;
    if (!this.headerSeen) {
      this.#finish({ exitCode: 127, signal: null, startError: new Error(`${what} before the command started`) });
      return;
    }
    if (!this.#exitSeen) this.stderr.write(`[drover] ${what} while the command ran\n`);
    this.#finish({ exitCode: 255, signal: null });
  }

  /**
   * The agent died without stopping the group (SIGKILL), and `stopped` stops it in its place: it settles
   * with whether nothing of the group is left then. waitGone() waits for it.
   */
  stoppedBy(stopped: Promise<boolean>): void {
    this.#stopped = stopped.then((gone) => {
      if (gone) this.#freed = true;
      return gone;
    });
  }

  async kill(signal: NodeJS.Signals): Promise<void> {
    if (this.#freed || this.#over || this.pid === undefined) return;
    const name = signal.replace(/^SIG/, '');
    // After the exit the agent says at once whether anything is left: then a gone group is not signalled.
    if (this.#exitSeen && (await this.#groupEnded())) return;
    this.#agent.send('K', this.#id, name);
  }

  async waitGone(timeoutMs: number): Promise<boolean> {
    if (this.#freed || this.pid === undefined) return true;
    const deadline = performance.now() + Math.max(0, timeoutMs);
    if (!this.#exitSeen && !this.#over && !(await exitsWithin(this.exited, timeoutMs))) return false;
    if (await this.#groupEnded()) return true;
    // Without its channel the agent stops the group on its own (there is nobody to ask), unless it died first.
    if (this.#over) return this.#stopped === undefined ? true : exitsWithin(this.#stopped, deadline - performance.now()).then((settled) => settled && this.#freed);
    const answer = new Promise<boolean>((resolve) => this.#answers.push(resolve));
    this.#agent.send('Q', this.#id, String(Math.max(0, Math.round(deadline - performance.now()))));
    return answer;
  }

  /** After the exit: whether the agent said that nothing of the group was left. */
  async #groupEnded(): Promise<boolean> {
    if (!this.#freed && !this.#over) await this.#groupReport;
    return this.#freed;
  }

  #deliver(side: StreamSide, data: Buffer): void {
    if (side.ended) return;
    side.stream.write(data);
    side.uncredited += data.length;
    if (!side.stream.writableNeedDrain) {
      this.#credit(side);
    } else if (!side.draining) {
      side.draining = true;
      side.stream.once('drain', () => {
        side.draining = false;
        this.#credit(side);
      });
    }
  }

  #credit(side: StreamSide): void {
    if (side.uncredited === 0 || side.ended) return;
    this.#agent.send(side.credit, this.#id, String(side.uncredited));
    side.uncredited = 0;
  }

  #endStream(side: StreamSide): void {
    if (side.ended) return;
    side.ended = true;
    side.stream.end();
    this.#forgetIfDone();
  }

  /** Ends everything: the exit status (unless it came), both streams, the group's report. */
  #finish(status: ExitStatus & { readonly startError?: Error }): void {
    this.#over = true;
    this.#resolveStarted();
    this.#resolveExit(status);
    this.#endStream(this.#streams.O);
    this.#endStream(this.#streams.E);
    this.#reportGroup(this.#freed);
    for (const answer of this.#answers.splice(0)) answer(true);
    this.#agent.forget(this.#id);
  }

  #forgetIfDone(): void {
    if (this.#exitSeen && this.#freed && this.#streams.O.ended && this.#streams.E.ended && this.#answers.length === 0) {
      this.#over = true;
      this.#agent.forget(this.#id);
    }
  }
}

/** Whether `exited` settles within `timeoutMs`. */
export async function exitsWithin(exited: Promise<unknown>, timeoutMs: number): Promise<boolean> {
  const timer = new AbortController();
  const settled = await Promise.race([exited.then(() => true), sleep(Math.max(0, timeoutMs), false, { signal: timer.signal }).catch(() => false)]);
  timer.abort();
  return settled;
}

/** `word rest of line` -> [word, rest]. */
export function splitOnce(text: string): [string, string] {
  const space = text.indexOf(' ');
  return space < 0 ? [text, ''] : [text.slice(0, space), text.slice(space + 1)];
}
