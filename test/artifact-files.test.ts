/**
 * Artifact files (writeArtifactFile, src/queues/artifact-store.ts), in the
 * SQLite queue's file store and DirectoryArtifactStore: a local file is
 * stored whole with the artifact's own mode, a stream from where it stands,
 * and a failure (a missing source, a lost claim, a destination that fails
 * part-way) leaves no row and no file.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { chmodSync, createReadStream, existsSync, mkdirSync, readdirSync, readFileSync, statSync, truncateSync, writeFileSync, type ReadStream } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { LocalTransport } from '../src/hosts/local.js';
import type { RunRef } from '../src/model/task.js';
import { DirectoryArtifactStore, KERNEL_COPY_MIN, type ArtifactKey } from '../src/queues/artifact-store.js';
import Database from 'better-sqlite3';
import { SqliteQueue } from '../src/queues/sqlite.js';

const MiB = 1024 * 1024;
const START = Date.parse('2026-01-01T00:00:00Z');
const meta = (name: string) => ({ name, contentType: 'application/octet-stream' });

/** A subdirectory of the test's own directory: t.testdir() makes that anew on every call. */
const testDirs = new WeakMap<Test, string>();
function scratch(t: Test, name: string): string {
  if (!testDirs.has(t)) testDirs.set(t, t.testdir());
  const dir = join(testDirs.get(t)!, name);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** A file of `size` random bytes with an unusual mode (a copy must not take it over). */
function randomFile(t: Test, size: number, mode = 0o751): { file: string; bytes: Buffer } {
  const bytes = randomBytes(size);
  const file = join(scratch(t, 'task'), 'source.bin');
  writeFileSync(file, bytes);
  chmodSync(file, mode);
  return { file, bytes };
}

async function claimed(t: Test) {
  const dir = scratch(t, 'queue');
  // A clock that stands still: two uploads' rows differ only where their artifacts do.
  const queue = SqliteQueue.open({ dir, now: () => START });
  t.teardown(() => queue.close());
  await queue.submit({ payload: {}, deadline: START + 3_600_000, retries: 0 });
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  return { queue, dir, run: { taskId: claim!.taskId, runId: claim!.runId } as RunRef };
}

function transport(t: Test): LocalTransport {
  const local = new LocalTransport();
  t.teardown(() => local.close());
  return local;
}

async function bytesOf(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

/** Every file under `dir`, relative. */
function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((entry) => !entry.isDirectory()).map((entry) => entry.name);
}

t.test('a local file is stored whole, with the artifact\'s mode, not its own', async (t) => {
  for (const size of [0, 5, 3 * MiB + 7, KERNEL_COPY_MIN + 7]) {
    t.test(`SQLite queue, ${size} bytes`, async (t) => {
      const { file, bytes } = randomFile(t, size);
      const { queue, run } = await claimed(t);
      const source = await transport(t).readFile(file) as ReadStream;
      const info = await queue.uploadArtifact(run, 'A', meta('public/big.bin'), source);
      t.ok(source.destroyed, 'the source is closed');
      t.equal(source.bytesRead, size < KERNEL_COPY_MIN ? size : 0, size < KERNEL_COPY_MIN ? 'streamed' : 'copied by cat, not streamed');
      t.match(info, { ...run, name: 'public/big.bin', state: 'complete', size: bytes.length });
      t.same(await queue.listArtifacts(run), [info]);
      const stored = queue.artifactPath(run, 'public/big.bin');
      t.ok(readFileSync(stored).equals(bytes), 'the file holds the same bytes');
      t.not(statSync(stored).mode & 0o777, 0o751, 'and its own mode');
      t.ok((await bytesOf(await queue.readArtifact(run, 'public/big.bin'))).equals(bytes), 'and reads back whole');
    });
    t.test(`DirectoryArtifactStore, ${size} bytes`, async (t) => {
      const { file, bytes } = randomFile(t, size);
      const store = new DirectoryArtifactStore(scratch(t, 'store'));
      const key: ArtifactKey = { taskId: 'T', runId: 0, name: 'public/big.bin' };
      await store.create(key);
      t.equal(await store.write(key, createReadStream(file)), bytes.length);
      t.ok((await bytesOf(Readable.from(store.read(key, 0)))).equals(bytes));
    });
  }
});

t.test('a stream that was read from, or covers a range, is streamed from where it stands', async (t) => {
  const { file, bytes } = randomFile(t, MiB + 11);
  const { queue, run } = await claimed(t);
  const started = createReadStream(file);
  await once(started, 'readable');
  const head = started.read(10) as Buffer;
  t.ok(head.equals(bytes.subarray(0, 10)));
  t.match(await queue.uploadArtifact(run, 'A', meta('rest.bin'), started), { size: bytes.length - 10 });
  t.ok(readFileSync(queue.artifactPath(run, 'rest.bin')).equals(bytes.subarray(10)), 'the rest of the file, as the stream had it');

  const range = createReadStream(file, { start: 5, end: 104 });
  t.match(await queue.uploadArtifact(run, 'A', meta('range.bin'), range), { size: 100 });
  t.ok(readFileSync(queue.artifactPath(run, 'range.bin')).equals(bytes.subarray(5, 105)));
});

t.test('a large file that shrinks while cat copies it is stored as far as it went, and the upload ends', { timeout: 30_000 }, async (t) => {
  // fs.copyFile would copy the size the file had when it began, and never end (Node 20's libuv).
  const { file, bytes } = randomFile(t, 2 * KERNEL_COPY_MIN);
  const { queue, run } = await claimed(t);
  const source = await transport(t).readFile(file) as ReadStream;
  const upload = queue.uploadArtifact(run, 'A', meta('shrunk.bin'), source);
  // As soon as cat has begun to write, the file shrinks to 1 MiB (polled; bounded by the upload's end).
  const stored = queue.artifactPath(run, 'shrunk.bin');
  let ended = false;
  void upload.finally(() => (ended = true)).catch(() => {});
  while (!ended && !(existsSync(stored) && statSync(stored).size > 0)) await new Promise(setImmediate);
  truncateSync(file, MiB);
  const info = await upload;
  t.equal(source.bytesRead, 0, 'copied by cat');
  t.ok(info.size >= MiB && info.size <= bytes.length, `the size is what there was to copy (${info.size})`);
  t.ok(readFileSync(stored).equals(bytes.subarray(0, info.size)), 'the bytes are the file\'s, in order');
});

t.test('without cat on the PATH a large file is streamed', async (t) => {
  const { file, bytes } = randomFile(t, KERNEL_COPY_MIN);
  const { queue, run } = await claimed(t);
  const path = process.env.PATH;
  process.env.PATH = scratch(t, 'empty-bin');
  t.teardown(() => void (process.env.PATH = path));
  const source = await transport(t).readFile(file) as ReadStream;
  t.match(await queue.uploadArtifact(run, 'A', meta('a.bin'), source), { size: bytes.length });
  t.equal(source.bytesRead, bytes.length, 'streamed');
  t.ok(readFileSync(queue.artifactPath(run, 'a.bin')).equals(bytes));
});

t.test('a missing source file fails as the stream does, and leaves nothing', async (t) => {
  const { queue, dir, run } = await claimed(t);
  const missing = join(scratch(t, 'task'), 'missing.bin');
  const error = await queue.uploadArtifact(run, 'A', meta('a.bin'), createReadStream(missing)).then(() => undefined, (e: Error) => e);
  t.match(error, { code: 'ENOENT', message: `ENOENT: no such file or directory, open '${missing}'` });
  t.same(await queue.listArtifacts(run), []);
  t.same(filesUnder(join(dir, 'artifacts')), [], 'no file left');
});

t.test('an upload to a run that is no longer current leaves no row and no file', async (t) => {
  const { file } = randomFile(t, MiB);
  const { queue, dir, run } = await claimed(t);
  await queue.resolve(run, 'A', { state: 'completed' });
  await t.rejects(queue.uploadArtifact(run, 'A', meta('late.bin'), await transport(t).readFile(file)), { name: 'ClaimLostError' });
  t.same(await queue.listArtifacts(run), []);
  t.same(filesUnder(join(dir, 'artifacts')), []);
});

t.test('a destination that fails part-way fails the upload and leaves nothing', { timeout: 30_000 }, async (t) => {
  const fixture = fileURLToPath(new URL('./fixtures/artifact-file-limit.mjs', import.meta.url));
  const built = fileURLToPath(new URL('../dist/queues/artifact-store.js', import.meta.url));
  if (!existsSync(built)) return t.fail(`${built} is missing: run \`npm run build\` first`);
  for (const [size, how] of [[4 * MiB, 'streamed'], [KERNEL_COPY_MIN + MiB, 'copied by cat']] as const) {
    t.test(how, async (t) => {
      const { file } = randomFile(t, size);
      // A file size limit of 1024 blocks (at most 1 MiB): writing the artifact fails with EFBIG.
      const child = spawn('sh', ['-c', 'ulimit -f 1024 && exec "$0" "$@"', process.execPath, fixture, scratch(t, 'queue'), file], { stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      child.stdout.on('data', (chunk: Buffer) => (out += chunk));
      const [code, signal] = await once(child, 'exit') as [number | null, string | null];
      t.same([code, signal], [0, null], 'the process ran to its end');
      const left = JSON.parse(out) as { error?: { code: string; message: string }; rows: unknown[]; files: string[]; bytesRead: number; closed: boolean };
      t.match(left.error, { code: 'EFBIG' }, 'the upload failed with the destination\'s error');
      t.same(left.rows, [], 'no row');
      t.same(left.files, [], 'no file');
      t.ok(left.closed, 'the source is closed');
      if (how === 'streamed') t.ok(left.bytesRead > 0, 'the stream was read');
      else t.equal(left.bytesRead, 0, 'the stream was not read');
    });
  }
});

t.test('an upload whose completion cannot be written fails and leaves nothing, so it can be uploaded again', async (t) => {
  const { file, bytes } = randomFile(t, 4 * MiB);
  const { queue, dir, run } = await claimed(t);
  // A real SQLite error on the row's completion (as a full disk or a lock held too long would give).
  const db = new Database(join(dir, 'queue.db'));
  t.teardown(() => db.close());
  db.exec(`CREATE TRIGGER refuse_completion BEFORE UPDATE OF state ON artifacts WHEN NEW.state = 'complete'
           BEGIN SELECT RAISE(ABORT, 'completion refused by the test'); END`);
  await t.rejects(queue.uploadArtifact(run, 'A', meta('big.bin'), await transport(t).readFile(file)), /completion refused by the test/);
  t.same(await queue.listArtifacts(run), [], 'no row says streaming');
  t.same(filesUnder(join(dir, 'artifacts')), [], 'no file');
  db.exec('DROP TRIGGER refuse_completion');
  await queue.uploadArtifact(run, 'A', meta('big.bin'), await transport(t).readFile(file));
  t.same(await bytesOf(await queue.readArtifact(run, 'big.bin')), bytes, 'the same name uploads again');
});
