/**
 * PostgreSQL's chunk store under its write batching: chunk rows share a
 * transaction while the source keeps them coming, yet what a live log wrote
 * is visible as soon as the log waits, a failed upload leaves nothing, and
 * a transaction lost with its connection is replayed on a new one.
 */
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import { LocalTransport } from '../src/hosts/local.js';
import type { Claim } from '../src/model/task.js';
import type { PostgresQueue } from '../src/queues/postgres.js';
import { freshSchema, openQueue, sql } from './helpers/postgres.js';

const MiB = 1024 * 1024;
const meta = (name: string) => ({ name, contentType: 'application/octet-stream' });

async function claimed(queue: PostgresQueue): Promise<Claim> {
  await queue.submit({ payload: {}, deadline: Date.now() + 600_000, retries: 0 });
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  return claim!;
}

async function bytes(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** Piece `i` of a recognisable stream: no two pieces are equal. */
function piece(i: number, size: number): Buffer {
  const buffer = Buffer.alloc(size, i % 251);
  buffer.writeUInt32LE(i, 0);
  return buffer;
}

/** The queue's connections that sit in an open transaction. */
const openTransactions = (schema: string) =>
  sql<{ pid: number }>(`SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state LIKE 'idle in transaction%'`, [`drover ${schema}`]);

t.test('a live log is visible as soon as it waits, and holds no transaction open meanwhile', async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const run = await claimed(queue);
  const source = new PassThrough();
  const upload = queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), source);
  // A burst (several rows, which may share a transaction), then the log waits.
  for (let i = 0; i < 3; i++) source.write(piece(i, MiB));
  source.write('first line\n');
  const expected = Buffer.concat([piece(0, MiB), piece(1, MiB), piece(2, MiB), Buffer.from('first line\n')]);
  let seen: Buffer = Buffer.alloc(0);
  const giveUp = Date.now() + 10_000;
  while (!seen.equals(expected) && Date.now() < giveUp) {
    await sleep(20);
    // The upload makes its artifact's row first: until then there is nothing to read.
    seen = await queue.readArtifact(run, 'public/logs/live.log').then(bytes, () => Buffer.alloc(0));
  }
  t.ok(seen.equals(expected), `a reader sees everything written while the writer waits (${seen.length} of ${expected.length} bytes)`);
  t.same(await openTransactions(schema), [], 'the waiting upload holds no transaction open');
  source.end('last line\n');
  t.match(await upload, { state: 'complete', size: expected.length + 10 });
});

t.test('a file read a row at a time is stored several rows to a transaction', async (t) => {
  // Regression: with a source that gives whole rows (LocalTransport.readFile reads 1 MiB at a time), the writer
  // saw nothing waiting after each insert and committed every row alone: a WAL flush per MiB.
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const run = await claimed(queue);
  const file = join(t.testdir(), 'big.bin');
  const content = Buffer.concat(Array.from({ length: 16 }, (_, i) => piece(i, MiB)));
  writeFileSync(file, content);
  const transport = new LocalTransport();
  t.teardown(() => transport.close());
  t.match(await queue.uploadArtifact(run, 'A', meta('public/big.bin'), await transport.readFile(file)), { size: content.length });
  t.ok((await bytes(await queue.readArtifact(run, 'public/big.bin'))).equals(content), 'stored whole');
  // Rows inserted by one transaction share its id (xmin).
  const [counts] = await sql<{ rows: number; transactions: number }>(
    `SELECT count(*)::int AS rows, count(DISTINCT xmin::text)::int AS transactions FROM "${schema}".artifact_chunks`,
  );
  t.equal(counts!.rows, 16, 'a row per MiB');
  t.ok(counts!.transactions <= 8, `several rows to a transaction (${counts!.transactions} transactions for 16 rows)`);
});

t.test('small pieces that come together make one row, not a row each', async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const run = await claimed(queue);
  const pieces = Array.from({ length: 256 }, (_, i) => piece(i, 4096));
  t.match(await queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), Readable.from(pieces, { objectMode: false })), { size: MiB });
  t.ok((await bytes(await queue.readArtifact(run, 'public/logs/live.log'))).equals(Buffer.concat(pieces)));
  const [counts] = await sql<{ rows: number }>(`SELECT count(*)::int AS rows FROM "${schema}".artifact_chunks`);
  t.ok(counts!.rows <= 4, `256 pieces of 4 KiB in ${counts!.rows} rows`);
});

t.test('a failed upload leaves nothing: neither its committed chunks nor its open transaction', async (t) => {
  const schema = freshSchema(t);
  const queue = await openQueue(t, { schema });
  const run = await claimed(queue);
  const source = new PassThrough();
  const upload = queue.uploadArtifact(run, 'A', meta('public/big.bin'), source);
  // Far more than one transaction's worth, buffered at once: the source fails while chunks have committed
  // and a transaction is open with more.
  for (let i = 0; i < 32; i++) source.write(piece(i, MiB));
  let open = false;
  const giveUp = Date.now() + 30_000;
  while (!open && Date.now() < giveUp) {
    open = (await sql(`SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL AND query LIKE 'INSERT INTO artifact_chunks%'`, [`drover ${schema}`])).length > 0;
    if (!open) await sleep(5);
  }
  t.ok(open, 'the upload had a transaction open');
  source.destroy(new Error('the disk went away'));
  await t.rejects(upload, { message: 'the disk went away' });
  t.same(await queue.listArtifacts(run), [], 'no artifact');
  t.same(await sql(`SELECT count(*)::int AS n FROM "${schema}".artifact_chunks`), [{ n: 0 }], 'no chunk rows');
  t.same(await openTransactions(schema), [], 'no transaction left open');
  const again = await queue.uploadArtifact(run, 'A', meta('public/big.bin'), Readable.from([piece(0, 10)]));
  t.match(again, { size: 10 }, 'the upload can be made again');
});

t.test('a transaction lost with its connection is replayed on a new one: the artifact is whole', { timeout: 120_000 }, async (t) => {
  const schema = freshSchema(t);
  const retries: unknown[] = [];
  const queue = await openQueue(t, { schema, onRetry: (error) => retries.push(error) });
  const run = await claimed(queue);
  let killed = false;
  const written = createHash('sha256');
  let size = 0;
  const source = Readable.from((async function* () {
    // Pieces come until a connection was cut in the middle of a transaction, and 8 MiB more (at most 512 MiB in all).
    for (let i = 0, after = 0; i < 2048 && after < 32; i++) {
      const next = piece(i, 256 * 1024);
      written.update(next);
      size += next.length;
      if (killed) after++;
      yield next;
    }
  })());
  const upload = queue.uploadArtifact(run, 'A', meta('public/big.bin'), source);
  const giveUp = Date.now() + 60_000;
  while (!killed && Date.now() < giveUp) {
    const cut = await sql<{ n: number }>(
      `SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity
       WHERE application_name = $1 AND xact_start IS NOT NULL AND query LIKE 'INSERT INTO artifact_chunks%'`, [`drover ${schema}`],
    );
    killed = cut[0]!.n > 0;
    if (!killed) await sleep(5);
  }
  t.ok(killed, 'a connection was cut in the middle of an upload transaction');
  const info = await upload;
  t.equal(info.size, size);
  const stored = createHash('sha256');
  for await (const chunk of await queue.readArtifact(run, 'public/big.bin')) stored.update(chunk as Buffer);
  t.equal(stored.digest('hex'), written.digest('hex'), 'every byte, in order, once');
  t.ok(retries.length > 0, 'the writer met the lost connection and retried');
});
