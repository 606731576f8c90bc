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
import { closeSync, createWriteStream, mkdirSync, openSync } from 'node:fs';
import { open, rm, type FileHandle } from 'node:fs/promises';
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

/**
 * Stores everything `source` gives in the artifact file at `path`, through
 * `file`, the caller's handle on it (opened for writing when the caller made
 * the file: its own, so that a file a failed upload removed is never made
 * again by a stream opening it), and resolves with the file's size. Closes
 * `file`. Rejects with the source's error, or the destination's; the caller
 * removes the file.
 *
 * Every source is streamed, a local file too. The kernel's copy
 * (fs.copyFile: copy_file_range) is several times faster for a whole local
 * file, but in Node 20's libuv it copies the size the source had when it
 * began and never returns if the source shrinks meanwhile, with a thread at
 * 100% CPU; a process a task left in the background (they live until
 * cleanup, after the uploads) can truncate a file at that moment. A worker
 * that can hang on what a task does is worse than a slower copy
 * (bench/ANALYSIS.md, Artifacts).
 */
export async function writeArtifactFile(path: string, file: FileHandle, source: Readable): Promise<number> {
  const sink = createWriteStream(path, { fd: file, highWaterMark: WRITE_CHUNK }); // it closes `file`
  await pipeline(source, sink); // on a failure it destroys both, so a source's file is closed too
  return sink.bytesWritten;
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
