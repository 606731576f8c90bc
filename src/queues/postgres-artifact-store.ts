/**
 * Artifacts in the queue's own PostgreSQL database: each artifact is a row
 * in `artifacts` (kept by the queue) and its bytes are rows of
 * `artifact_chunks`, keyed by byte offset. Nothing else to mount or back up.
 *
 * Writes are streamed through a Writable, and several chunk rows share one
 * transaction while the source keeps them coming (a file read from disk):
 * a commit per row cost a WAL flush and its bookkeeping per MiB. A
 * transaction commits as soon as the source has nothing more for it (a
 * live log that waits for its process: what was written is visible at
 * once), when it holds BATCH_BYTES, when it is BATCH_MS old, and when
 * another caller waits for a pooled connection (the worker's claims and
 * reports never wait on an upload for longer than one insert). Whatever the
 * source gave while one insert was under way goes into the next one, so a
 * chatty live log makes a row per round trip, not per line.
 *
 * Memory: the Writable's buffer (CHUNK_BYTES) and the rows of the open
 * transaction (at most BATCH_BYTES), kept so that a transaction lost with
 * its connection can be replayed on a new one (ON CONFLICT DO NOTHING makes
 * replaying a transaction that did commit harmless): a server restart does
 * not cut a log. A failed upload rolls back its open transaction; the queue
 * then removes the rows that did commit. Reads fetch a few chunks at a
 * time, in offset order.
 */
import { Writable, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type pg from 'pg';
import type { ArtifactKey, ArtifactStore } from './artifact-store.js';
import { asQueueError, isTransient, retryTransient, type QueueUrl } from './postgres-connection.js';

/** Largest chunk row, and the writer's buffer. */
const CHUNK_BYTES = 1024 * 1024;
/** A transaction commits once it holds this many bytes: what a lost connection makes the writer send again. */
const BATCH_BYTES = 8 * CHUNK_BYTES;
/** ... or once it is this old, so that readers of a live log that never stops still see it every short while. */
const BATCH_MS = 250;
/** Chunks fetched per read query: at most 2 MiB in memory. */
const READ_PAGE = 2;
/** How long a chunk insert is retried while the server is away. */
const WRITE_RETRY_MS = 120_000;
const INSERT_CHUNK = {
  name: 'drover_insert_chunk',
  text: `INSERT INTO artifact_chunks (task_id, run_id, name, "offset", data) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`,
};

interface Chunk { readonly offset: number; readonly data: Buffer }

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
    const batch = new ChunkBatch(this.pool, key, (fn) => this.retrying(fn));
    let offset = 0;
    let writing = false;
    const commitIfIdle = (): void => {
      if (!writing && !sink.destroyed) batch.commit().catch((error: Error) => sink.destroy(error));
    };
    const sink = new Writable({
      highWaterMark: CHUNK_BYTES,
      writev: (entries, done) => {
        writing = true;
        const data = entries.length === 1 ? (entries[0]!.chunk as Buffer) : Buffer.concat(entries.map((entry) => entry.chunk as Buffer));
        (async () => {
          for (let at = 0; at < data.length; at += CHUNK_BYTES) await batch.add({ offset: offset + at, data: data.subarray(at, at + CHUNK_BYTES) });
          offset += data.length;
          if (batch.bytes >= BATCH_BYTES || batch.age >= BATCH_MS || this.pool.waitingCount > 0) await batch.commit();
        })().then(() => {
          writing = false;
          done(); // starts the next write at once when more is buffered
          // Whether the source has more is known once it had a moment to give it: a source paused by this
          // buffer (a file read a row at a time fills it) resumes on the 'drain' that done() emits. If no write
          // started by then, the source is waiting (a live log between lines): commit, so what it wrote is
          // visible now and no transaction stays open. (Deciding before done() committed every such row alone.)
          setImmediate(commitIfIdle);
        }, (error: Error) => {
          writing = false;
          done(error);
        });
      },
      final: (done) => void batch.commit().then(() => done(), done),
      destroy: (error, done) => void batch.abandon().then(() => done(error), () => done(error)),
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

  /** Runs `fn` again while the server is away, for up to WRITE_RETRY_MS; then it fails as QueueUnavailableError. */
  private async retrying(fn: () => Promise<void>): Promise<void> {
    await retryTransient(fn, { forMs: WRITE_RETRY_MS, ...(this.onRetry ? { onRetry: this.onRetry } : {}) }).catch((error: unknown) => {
      throw asQueueError(error, this.url);
    });
  }

  private async query<R extends pg.QueryResultRow>(sql: string, values: unknown[]): Promise<R[]> {
    try {
      return (await this.pool.query<R>(sql, values)).rows;
    } catch (error) {
      throw asQueueError(error, this.url);
    }
  }
}

/**
 * The open transaction of one artifact's write, on a pooled connection that
 * it holds only while the transaction is open. It keeps the rows it inserted
 * until they commit: a transaction lost with its connection is begun again
 * on a new one and its rows inserted again.
 */
class ChunkBatch {
  private client: pg.PoolClient | undefined;
  private rows: Chunk[] = [];
  private began = 0;
  /** Operations run one after another: an abandon waits for the insert under way, so no query runs on a released connection. */
  private tail: Promise<unknown> = Promise.resolve();
  private abandoned = false;
  bytes = 0;

  constructor(
    private readonly pool: pg.Pool,
    private readonly key: ArtifactKey,
    private readonly retrying: (fn: () => Promise<void>) => Promise<void>,
  ) {}

  /** How long the open transaction has been open, in ms; 0 when none is. */
  get age(): number {
    return this.client ? performance.now() - this.began : 0;
  }

  add(chunk: Chunk): Promise<void> {
    return this.serial(async () => {
      await this.retrying(async () => {
        const replay = this.client === undefined ? this.rows : [];
        const client = await this.open();
        for (const row of [...replay, chunk]) await this.insert(client, row);
      });
      this.rows.push(chunk);
      this.bytes += chunk.data.length;
    });
  }

  commit(): Promise<void> {
    return this.serial(async () => {
      if (this.rows.length === 0 && this.client === undefined) return;
      await this.retrying(async () => {
        const replay = this.client === undefined ? this.rows : [];
        const client = await this.open();
        for (const row of replay) await this.insert(client, row);
        await this.run(client, 'COMMIT');
        this.client = undefined;
        client.release();
      });
      this.rows = [];
      this.bytes = 0;
    });
  }

  /** Rolls back the open transaction (the write failed), once the operation under way is over; nothing it inserted becomes visible. */
  abandon(): Promise<void> {
    this.abandoned = true;
    const done = this.tail.catch(() => undefined).then(async () => {
      this.rows = [];
      this.bytes = 0;
      const client = this.client;
      this.client = undefined;
      if (client) client.release(await client.query('ROLLBACK').then(() => undefined, (error: Error) => error));
    });
    this.tail = done;
    return done;
  }

  private serial(fn: () => Promise<void>): Promise<void> {
    const next = this.tail.catch(() => undefined).then(() => {
      if (this.abandoned) throw new Error('the artifact write was abandoned');
      return fn();
    });
    this.tail = next;
    return next;
  }

  private async open(): Promise<pg.PoolClient> {
    if (this.client) return this.client;
    const client = await this.pool.connect();
    this.client = client;
    this.began = performance.now();
    await this.run(client, 'BEGIN');
    return client;
  }

  private async insert(client: pg.PoolClient, { offset, data }: Chunk): Promise<void> {
    await this.run(client, { ...INSERT_CHUNK, values: [this.key.taskId, this.key.runId, this.key.name, offset, data] });
  }

  /** One statement in the transaction; a failure ends the transaction, and a broken connection leaves the pool. */
  private async run(client: pg.PoolClient, query: string | pg.QueryConfig): Promise<void> {
    try {
      await client.query(query);
    } catch (error) {
      if (this.client === client) {
        this.client = undefined;
        client.release(isTransient(error) ? error as Error : await client.query('ROLLBACK').then(() => undefined, (rollback: Error) => rollback));
      }
      throw error;
    }
  }
}
