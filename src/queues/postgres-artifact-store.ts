/**
 * Artifacts in the queue's own PostgreSQL database: each artifact is a row
 * in `artifacts` (kept by the queue) and its bytes are rows of
 * `artifact_chunks`, keyed by byte offset. Nothing else to mount or back up.
 *
 * Writes are streamed: a Writable whose buffer is the only memory used
 * (CHUNK_BYTES at most, plus the chunk being written); whatever the source
 * gave while one insert was under way goes into the next one, so a chatty
 * live log makes a row per round trip, not per line. An insert that fails
 * on the connection is retried (ON CONFLICT DO NOTHING makes a retry of a
 * committed insert harmless), so a server restart does not cut a log.
 * Reads fetch a few chunks at a time, in offset order.
 */
import { Writable, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type pg from 'pg';
import type { ArtifactKey, ArtifactStore } from './artifact-store.js';
import { asQueueError, retryTransient, type QueueUrl } from './postgres-connection.js';

/**
 * Largest chunk row, and the writer's buffer. Each row is a commit: at 1 MiB
 * a 64 MiB upload ran 1.6x faster than at 256 KiB (bench/ANALYSIS.md).
 */
const CHUNK_BYTES = 1024 * 1024;
/** Chunks fetched per read query: at most 2 MiB in memory. */
const READ_PAGE = 2;
/** How long a chunk insert is retried while the server is away. */
const WRITE_RETRY_MS = 120_000;

export class PostgresArtifactStore implements ArtifactStore {
  readonly kind = 'postgres';

  constructor(
    private readonly pool: pg.Pool,
    private readonly url: QueueUrl,
    private readonly onRetry?: (error: unknown) => void,
  ) {}

  async create(): Promise<void> {
    // Nothing to make: an artifact without chunk rows reads as empty.
  }

  async write(key: ArtifactKey, source: Readable): Promise<number> {
    let offset = 0;
    const sink = new Writable({
      highWaterMark: CHUNK_BYTES,
      writev: (entries, done) => {
        const data = entries.length === 1 ? (entries[0]!.chunk as Buffer) : Buffer.concat(entries.map((entry) => entry.chunk as Buffer));
        this.append(key, offset, data).then(() => {
          offset += data.length;
          done();
        }, done);
      },
    });
    await pipeline(source, sink);
    return offset;
  }

  async *read(key: ArtifactKey, position: number): AsyncIterable<Buffer> {
    // Start at the chunk that holds `position`; after it, every page starts where the last one ended.
    const first = await this.query<{ offset: number }>(
      `SELECT "offset" FROM artifact_chunks WHERE task_id = $1 AND run_id = $2 AND name = $3 AND "offset" <= $4 ORDER BY "offset" DESC LIMIT 1`,
      [key.taskId, key.runId, key.name, position],
    );
    let from = first[0]?.offset ?? position;
    for (;;) {
      const rows = await this.query<{ offset: number; data: Buffer }>(
        `SELECT "offset", data FROM artifact_chunks WHERE task_id = $1 AND run_id = $2 AND name = $3 AND "offset" >= $4 ORDER BY "offset" LIMIT ${READ_PAGE}`,
        [key.taskId, key.runId, key.name, from],
      );
      for (const row of rows) {
        const end = row.offset + row.data.length;
        if (end > position) yield row.data.subarray(Math.max(0, position - row.offset));
        position = Math.max(position, end);
        from = end;
      }
      if (rows.length < READ_PAGE) return;
    }
  }

  async remove(key: ArtifactKey): Promise<void> {
    await this.query(`DELETE FROM artifact_chunks WHERE task_id = $1 AND run_id = $2 AND name = $3`, [key.taskId, key.runId, key.name]);
  }

  async close(): Promise<void> {}

  /** Stores `data` at `offset`, in rows of at most CHUNK_BYTES, retrying while the server is away. */
  private async append(key: ArtifactKey, offset: number, data: Buffer): Promise<void> {
    for (let at = 0; at < data.length; at += CHUNK_BYTES) {
      const piece = data.subarray(at, at + CHUNK_BYTES);
      await retryTransient(
        () => this.pool.query(
          `INSERT INTO artifact_chunks (task_id, run_id, name, "offset", data) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`,
          [key.taskId, key.runId, key.name, offset + at, piece],
        ),
        { forMs: WRITE_RETRY_MS, ...(this.onRetry ? { onRetry: this.onRetry } : {}) },
      ).catch((error: unknown) => {
        throw asQueueError(error, this.url);
      });
    }
  }

  private async query<R extends pg.QueryResultRow>(sql: string, values: unknown[]): Promise<R[]> {
    try {
      return (await this.pool.query<R>(sql, values)).rows;
    } catch (error) {
      throw asQueueError(error, this.url);
    }
  }
}
