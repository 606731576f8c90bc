/**
 * Where a distributed queue keeps artifact bytes. The queue keeps the
 * metadata (name, state, size) in its own tables and decides who may
 * upload; a store only moves bytes, one artifact at a time, and never holds
 * a whole artifact in memory.
 *
 * Shipped: DirectoryArtifactStore (a directory every worker and reader
 * mounts: NFS, a shared volume) and PostgresArtifactStore (chunks in the
 * queue's own database, postgres-artifact-store.ts).
 *
 * The order of calls for one artifact: `create` (before its metadata row
 * commits, so a reader that finds the row can always read), `write` once,
 * any number of `read`s (also while `write` is under way: live logs), and
 * `remove` when an upload failed half-way.
 */
import { spawn } from 'node:child_process';
import { closeSync, createWriteStream, fstat as fstatCallback, mkdirSync, openSync, ReadStream } from 'node:fs';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { promisify } from 'node:util';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ConfigError, QueueUnavailableError, errorMessage } from '../model/errors.js';

const fstat = promisify(fstatCallback);

export interface ArtifactKey {
  readonly taskId: string;
  readonly runId: number;
  /** Already checked by the queue: relative, slash-separated, no `.` or `..` parts. */
  readonly name: string;
}

export interface ArtifactStore {
  /** `directory` or `postgres`: for messages. */
  readonly kind: string;
  /** Makes the artifact exist, empty. */
  create(key: ArtifactKey): Promise<void>;
  /** Stores everything `source` gives, in order; resolves with the number of bytes. Rejects with the source's error if it fails. */
  write(key: ArtifactKey, source: Readable): Promise<number>;
  /** The bytes stored now from `position` on; ends at what is stored, even while a write goes on. */
  read(key: ArtifactKey, position: number): AsyncIterable<Buffer>;
  /** Removes what there is of the artifact; no error when there is nothing. */
  remove(key: ArtifactKey): Promise<void>;
  close(): Promise<void>;
}

const READ_CHUNK = 64 * 1024;

/** Artifacts as files under `<dir>/<taskId>/<runId>/<name>`, in a directory every worker shares. */
export class DirectoryArtifactStore implements ArtifactStore {
  readonly kind = 'directory';
  readonly dir: string;

  constructor(dir: string) {
    this.dir = resolvePath(dir);
    try {
      mkdirSync(this.dir, { recursive: true });
    } catch (error) {
      throw new ConfigError(`artifact directory "${this.dir}" cannot be created: ${errorMessage(error)}`, { cause: error });
    }
  }

  async create(key: ArtifactKey): Promise<void> {
    const path = this.path(key);
    try {
      mkdirSync(dirname(path), { recursive: true });
      closeSync(openSync(path, 'w'));
    } catch (error) {
      throw new QueueUnavailableError(`cannot create artifact file "${path}": ${errorMessage(error)}`, { cause: error });
    }
  }

  async write(key: ArtifactKey, source: Readable): Promise<number> {
    // Our own handle on the file `create` made: a stream left to open it could re-create a file a failed upload removed.
    return writeArtifactFile(this.path(key), await open(this.path(key), 'r+'), source);
  }

  async *read(key: ArtifactKey, position: number): AsyncIterable<Buffer> {
    const file = await open(this.path(key), 'r');
    try {
      for (;;) {
        const chunk = Buffer.allocUnsafe(READ_CHUNK);
        const { bytesRead } = await file.read(chunk, 0, chunk.length, position);
        if (bytesRead === 0) return;
        position += bytesRead;
        yield chunk.subarray(0, bytesRead);
      }
    } finally {
      await file.close();
    }
  }

  async remove(key: ArtifactKey): Promise<void> {
    await rm(this.path(key), { force: true });
  }

  async close(): Promise<void> {}

  private path(key: ArtifactKey): string {
    return join(this.dir, key.taskId, String(key.runId), ...key.name.split('/'));
  }
}

/** Chunk size of the streamed writes: fewer, larger writes (writev) than a 64 KiB stream default. */
const WRITE_CHUNK = 1024 * 1024;
/**
 * From this size on, a whole local file is copied by `cat` rather than streamed: the kernel's copy runs at
 * nearly twice a stream's speed (bench/ANALYSIS.md, Artifacts), and above this it saves more than starting `cat` costs (a few ms).
 */
export const KERNEL_COPY_MIN = 32 * 1024 * 1024;

/**
 * Stores everything `source` gives in the artifact file at `path`, through
 * `file`, the caller's handle on it (opened for writing when the caller made
 * the file: its own, so that a file a failed upload removed is never made
 * again by a stream opening it), and resolves with the file's size. `read`
 * is what the caller already took from `source`: it goes first. Closes
 * `file` and `source`. Rejects with the source's error, or the destination's;
 * the caller removes the file.
 *
 * A whole regular file of KERNEL_COPY_MIN or more that nothing has read from
 * (what LocalTransport.readFile returns) is copied by `cat`, with the file
 * the stream opened as its stdin and `file` as its stdout: coreutils' cat
 * copies in the kernel (copy_file_range). Not fs.copyFile, though it would
 * save the spawn: Node 20's libuv copies the size the source had when it
 * began and spins without end if the source shrinks meanwhile, and a process
 * a task left in the background (they live until cleanup, after the uploads)
 * can truncate a file at that moment. `cat` stops at the end of the file,
 * whatever it is by then. Everything else is streamed, 1 MiB at a time, as is
 * any file when `cat` cannot be started.
 */
export async function writeArtifactFile(path: string, file: FileHandle, source: Readable, read?: Buffer): Promise<number> {
  const from = read === undefined ? await wholeLargeFile(source) : undefined;
  const copied = from === undefined ? undefined : await catCopy(from, file.fd, path).catch((error: unknown) => error as Error);
  if (copied !== undefined) {
    source.destroy();
    await file.close();
    if (copied instanceof Error) throw copied;
    return copied;
  }
  const sink = createWriteStream(path, { fd: file, highWaterMark: WRITE_CHUNK }); // it closes `file`
  if (read !== undefined && read.length > 0) sink.write(read);
  await pipeline(source, sink); // on a failure it destroys both, so a source's file is closed too
  return sink.bytesWritten;
}

/** The file descriptor under `source` when writeArtifactFile may copy it with `cat`; undefined when it must be streamed. */
async function wholeLargeFile(source: Readable): Promise<number | undefined> {
  if (!(source instanceof ReadStream) || source.pending) return undefined;
  const untouched = !source.destroyed && !source.readableDidRead && source.readableLength === 0 && source.readableFlowing !== true;
  // fs.ReadStream keeps its range as `start` (undefined: from where the fd stands, 0 when unread) and `end`.
  const { fd, start, end } = source as unknown as { fd: unknown; start?: number; end?: number };
  if (!untouched || typeof fd !== 'number' || (start ?? 0) !== 0 || end !== Infinity) return undefined;
  try {
    const stats = await fstat(fd);
    return stats.isFile() && stats.size >= KERNEL_COPY_MIN ? fd : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Copies from `from` to `to` (at its offset 0) with `cat`; resolves with the size of `to` afterwards,
 * or undefined when `cat` could not be started (then nothing was copied).
 */
async function catCopy(from: number, to: number, path: string): Promise<number | undefined> {
  const child = spawn('cat', [], { stdio: [from, to, 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (text: string) => (stderr += text.slice(0, 4096 - stderr.length)));
  const ended = await new Promise<[number | null, NodeJS.Signals | null] | undefined>((resolve) => {
    child.once('error', () => resolve(undefined));
    child.once('close', (code, signal) => resolve([code, signal]));
  });
  if (ended === undefined) return undefined;
  const [code, signal] = ended;
  if (code !== 0) {
    // cat ends by SIGXFSZ where a write of ours would fail with EFBIG: the file size limit (ulimit -f).
    const said = stderr.trim() || (signal ? `ended by ${signal}` : `exit code ${code}`);
    throw Object.assign(new Error(`cannot write artifact file "${path}": cat: ${said.replace(/^cat: /, '')}`), signal === 'SIGXFSZ' ? { code: 'EFBIG' } : {});
  }
  return (await fstat(to)).size;
}

/**
 * An upload that takes `source` over: every queue's uploadArtifact runs its
 * work through this. Its errors are listened for at once, before any await:
 * a source that fails while the upload still checks the claim would
 * otherwise emit 'error' with no listener, an uncaught exception (the error
 * stays on the stream, `readable.errored`, and the pipeline that consumes it
 * later rejects with it). It is paused until the upload reads: another
 * listener of the stream (`drover batch`'s, on a live log) would make it
 * flow meanwhile, and what flowed then would be missing from the artifact.
 * And a refused or failed upload destroys it, so a file under it is closed
 * now, not whenever the garbage collector finds it.
 */
export async function takeOver<T>(source: Readable, upload: () => Promise<T>): Promise<T> {
  source.on('error', () => {});
  source.pause();
  try {
    return await upload();
  } catch (error) {
    source.destroy();
    throw error;
  }
}
