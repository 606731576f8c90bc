/**
 * Transport: exec and file operations on one host.
 *
 * A transport is how the engines reach a machine: `local` runs on this one,
 * `ssh` (a later issue) reaches another. Nothing here may assume that paths
 * or processes are on this machine; a transport says what it can do in
 * `capabilities`, and an engine that needs more refuses the task with
 * ResourceUnavailableError instead of failing half-way.
 */
import type { Readable } from 'node:stream';

export interface TransportCapabilities {
  /** exec() works. */
  readonly exec: boolean;
  /** The file operations below work. */
  readonly files: boolean;
}

/** How a command's main process ended. Exactly one of exitCode and signal is set. */
export interface ExitStatus {
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
}

export interface ExecOptions {
  /** Working directory on the host; it must exist. */
  readonly cwd: string;
  /** The whole environment of the command (not merged with the worker's). */
  readonly env: Readonly<Record<string, string>>;
  /**
   * Written to the crash journal before the command starts, and set in its
   * environment as DROVER_RUN_COOKIE: a worker that starts after a crash
   * finds and stops every process that still carries it.
   */
  readonly cookie: string;
}

/**
 * A running command, in a process group of its own with stdin closed.
 * stdout and stderr must be read (or they fill up and the command stalls).
 */
export interface Execution {
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Resolves when the main process exits. Never rejects; a start failure is exit code 127. */
  readonly exited: Promise<ExitStatus & { readonly startError?: Error }>;
  /** Sends `signal` to every process of the command's group (ESRCH is not an error). */
  kill(signal: NodeJS.Signals): Promise<void>;
  /** Resolves true once no process of the group is left, false if `timeoutMs` passed first. */
  waitGone(timeoutMs: number): Promise<boolean>;
}

export interface FileStat {
  readonly type: 'file' | 'directory' | 'symlink' | 'other';
  readonly size: number;
}

/** What lstat() (or a directory entry, local or SFTP) says a path is. */
export function fileType(stats: { isSymbolicLink(): boolean; isFile(): boolean; isDirectory(): boolean }): FileStat['type'] {
  return stats.isSymbolicLink() ? 'symlink' : stats.isFile() ? 'file' : stats.isDirectory() ? 'directory' : 'other';
}

/** One entry of a directory: its name and what it is itself (a symlink is `symlink`, not followed). */
export interface DirectoryEntry {
  readonly name: string;
  readonly type: FileStat['type'];
}

export interface Transport {
  readonly capabilities: TransportCapabilities;
  /** Starts `argv` (argv[0] looked up in PATH of `env`). Resolves once the command is started. */
  exec(argv: readonly string[], options: ExecOptions): Promise<Execution>;
  mkdir(path: string): Promise<void>;
  /** Removes a file or directory tree; a missing path is not an error. */
  remove(path: string): Promise<void>;
  stat(path: string): Promise<FileStat | undefined>;
  /**
   * The entries of a directory, without `.` and `..`, in no set order.
   * Rejects with ENOENT when it is missing, ENOTDIR when it is not a directory.
   */
  list(path: string): Promise<DirectoryEntry[]>;
  /**
   * The path with every symlink resolved, absolute and normalized (what
   * realpath(3) gives), so a caller can check where a path really leads
   * (the artifacts plugin keeps uploads inside the task directory).
   * Rejects with ENOENT when the path, or the target of a link on it, is missing.
   */
  realpath(path: string): Promise<string>;
  /** A stream of the file's bytes; rejects with ENOENT when it is missing. */
  readFile(path: string): Promise<Readable>;
  writeFile(path: string, data: Readable | Uint8Array | string): Promise<void>;
  /** Joins path segments the way the host does. */
  join(...segments: string[]): string;
}
