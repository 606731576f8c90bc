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
import { once } from 'node:events';
import { closeSync, constants, createWriteStream, existsSync, mkdirSync, openSync, ReadStream } from 'node:fs';
import { access, copyFile, open, readlink, rm, stat, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve as resolvePath } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ConfigError, QueueUnavailableError, errorMessage } from '../model/errors.js';

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
/** Where an open file can be opened again by path (Linux): the fast path copies the very file the source opened. */
const PROC_FD = '/proc/self/fd';
const procFd = existsSync(PROC_FD);

/**
 * Stores everything `source` gives in the artifact file at `path`, through
 * `file`, the caller's handle on it (opened for writing when the caller made
 * the file: its own, so that a file a failed upload removed is never made
 * again by a stream opening it), and resolves with the file's size. Closes
 * `file`. Rejects with the source's error, or the destination's; the caller
 * removes the file.
 *
 * Fast path: when `source` is an fs.ReadStream over a whole regular file
 * that nothing has read from yet (what LocalTransport.readFile returns), the
 * kernel copies the file it opened (fs.copyFile: a reflink where the
 * filesystem has them, else copy_file_range), and the stream is closed
 * unread. A stream copy moves every byte through JavaScript at a fraction of
 * that speed (bench/ANALYSIS.md, Artifacts). Anything else (a live log, an
 * SSH read, a file already read from, a range of one) is streamed. The file
 * ends with the same bytes either way, with the mode it was made with.
 *
 * Limitation of the fast path (libuv 1.46, Node 20): copyFile copies the
 * size the source had when the copy began, and if the source is truncated
 * below it during the copy, the copy never ends and keeps a libuv thread at
 * 100% CPU. A task's artifacts are uploaded after its main process exited,
 * but processes it left in the background are killed only at cleanup
 * (ProcessSandbox.dispose), after the uploads: one that truncates a file in
 * the moment it is copied hangs that upload. Streaming has no such case.
 */
export async function writeArtifactFile(path: string, file: FileHandle, source: Readable): Promise<number> {
  holdSourceErrors(source);
  let streaming = false;
  try {
    const fd = await unreadLocalFile(source);
    if (fd !== undefined) return await copyLocalFile(source, fd, path, file);
    streaming = true; // the stream closes `file`
    const sink = createWriteStream(path, { fd: file, highWaterMark: WRITE_CHUNK });
    await pipeline(source, sink);
    return sink.bytesWritten;
  } catch (error) {
    source.destroy(); // a source that was not consumed still holds its file open
    throw error;
  } finally {
    if (!streaming) await file.close().catch(() => undefined);
  }
}

/** The file descriptor of `source` when the fast path may copy its file (see writeArtifactFile); undefined when it must be streamed. */
async function unreadLocalFile(source: Readable): Promise<number | undefined> {
  if (!procFd || !(source instanceof ReadStream)) return undefined;
  const untouched = !source.destroyed && !source.readableDidRead && source.readableLength === 0 && source.readableFlowing !== true
    && source.listenerCount('data') === 0 && source.listenerCount('readable') === 0;
  // fs.ReadStream keeps its range as `start` (undefined: from the current position, 0 for an unread fd) and `end`.
  const range = source as unknown as { start?: number; end?: number };
  if (!untouched || (range.start ?? 0) !== 0 || range.end !== Infinity) return undefined;
  // A stream given a path opens it now: a missing file rejects here, with the stream's own error.
  if (source.pending) await once(source, 'ready');
  const fd = (source as unknown as { fd?: unknown }).fd;
  if (typeof fd !== 'number') return undefined;
  const from = join(PROC_FD, String(fd));
  try {
    if (!(await stat(from)).isFile()) return undefined; // a FIFO or device has no size to copy
    await access(from, constants.R_OK); // opened when it was readable; copyFile opens it again
  } catch {
    return undefined;
  }
  return fd;
}

async function copyLocalFile(source: Readable, fd: number, path: string, file: FileHandle): Promise<number> {
  const from = join(PROC_FD, String(fd));
  const { mode } = await file.stat();
  try {
    await copyFile(from, path, constants.COPYFILE_FICLONE);
  } catch (error) {
    const name = source instanceof ReadStream && typeof source.path === 'string' ? source.path : await readlink(from).catch(() => from);
    throw Object.assign(new Error(`cannot copy "${name}" to "${path}": ${errorMessage(error)}`, { cause: error }), {
      code: (error as NodeJS.ErrnoException).code,
    });
  }
  const copied = await file.stat(); // the same file: copyFile empties and fills it, it does not replace it
  // copyFile gives the copy its source's mode; the artifact keeps the one it was made with.
  if (copied.mode !== mode) await file.chmod(mode & 0o7777);
  if (source.destroyed) throw source.errored ?? new Error(`the source of "${path}" was closed while it was being copied`);
  source.destroy();
  return copied.size;
}

/**
 * Call first thing in uploadArtifact, before any await: a source that fails
 * while the upload is still checking the claim would otherwise emit 'error'
 * with no listener, an uncaught exception. The error stays on the stream
 * (`readable.errored`), and the pipeline that consumes it later rejects with it.
 */
export function holdSourceErrors(source: Readable): void {
  source.on('error', () => {});
}
