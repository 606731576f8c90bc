/**
 * Artifact files (writeArtifactFile, src/queues/artifact-store.ts), in the
 * SQLite queue's file store and DirectoryArtifactStore: a local file that
 * nothing has read from yet is copied by the kernel, not streamed through
 * JavaScript; anything else is streamed; and either way the artifact, its
 * row, its file and what a failure leaves behind are the same.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { chmodSync, createReadStream, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync, type ReadStream } from 'node:fs';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { LocalTransport } from '../src/hosts/local.js';
import type { RunRef } from '../src/model/task.js';
import { DirectoryArtifactStore, type ArtifactKey } from '../src/queues/artifact-store.js';
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

t.test('a local file nothing has read from is copied whole, not streamed', async (t) => {
  const { file, bytes } = randomFile(t, 3 * MiB + 7);
  const sources: [string, () => Promise<ReadStream>][] = [
    ['LocalTransport.readFile', () => transport(t).readFile(file) as Promise<ReadStream>],
    ['fs.createReadStream of a path', async () => createReadStream(file)],
  ];
  for (const [what, open] of sources) {
    t.test(`SQLite queue, ${what}`, async (t) => {
      const { queue, run } = await claimed(t);
      const source = await open();
      const info = await queue.uploadArtifact(run, 'A', meta('public/big.bin'), source);
      t.equal(source.bytesRead, 0, 'the stream was never read: the file was copied');
      t.ok(source.destroyed, 'and the stream is closed');
      t.match(info, { ...run, name: 'public/big.bin', state: 'complete', size: bytes.length });
      t.same(await queue.listArtifacts(run), [info]);
      t.ok(readFileSync(queue.artifactPath(run, 'public/big.bin')).equals(bytes), 'the file holds the same bytes');
      t.ok((await bytesOf(await queue.readArtifact(run, 'public/big.bin'))).equals(bytes), 'and reads back whole');
    });
    t.test(`DirectoryArtifactStore, ${what}`, async (t) => {
      const store = new DirectoryArtifactStore(scratch(t, 'store'));
      const key: ArtifactKey = { taskId: 'T', runId: 0, name: 'public/big.bin' };
      await store.create(key);
      const source = await open();
      t.equal(await store.write(key, source), bytes.length);
      t.equal(source.bytesRead, 0, 'the stream was never read: the file was copied');
      t.ok((await bytesOf(Readable.from(store.read(key, 0)))).equals(bytes));
    });
  }
});

t.test('copied and streamed, an artifact is the same: bytes, row, file, mode', async (t) => {
  for (const size of [0, 5, 2 * MiB + 3]) {
    t.test(`${size} bytes`, async (t) => {
      const { file, bytes } = randomFile(t, size);
      const { queue, run } = await claimed(t);
      const local = transport(t);
      const copied = await local.readFile(file) as ReadStream;
      // Behind a plain Readable, the same file can only be streamed.
      const streamed = Readable.from(await local.readFile(file));
      const fast = await queue.uploadArtifact(run, 'A', meta('fast.bin'), copied);
      const slow = await queue.uploadArtifact(run, 'A', meta('slow.bin'), streamed);
      t.equal(copied.bytesRead, 0, 'one was copied');
      const { name: _fast, ...fastRest } = fast;
      const { name: _slow, ...slowRest } = slow;
      t.same(fastRest, slowRest, 'the same row but for the name');
      t.equal(fast.size, size);
      const [fastFile, slowFile] = [queue.artifactPath(run, 'fast.bin'), queue.artifactPath(run, 'slow.bin')];
      t.ok(readFileSync(fastFile).equals(bytes) && readFileSync(slowFile).equals(bytes), 'both files hold the source bytes');
      t.equal(statSync(fastFile).mode, statSync(slowFile).mode, 'the same mode (not the source file\'s)');
      t.not(statSync(fastFile).mode & 0o777, 0o751);
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

t.test('a missing source file fails as the stream would, on either path, and leaves nothing', async (t) => {
  const { queue, dir, run } = await claimed(t);
  const missing = join(scratch(t, 'task'), 'missing.bin');
  const direct = queue.uploadArtifact(run, 'A', meta('a.bin'), createReadStream(missing));
  // Behind a PassThrough, the same stream can only be streamed; its error is passed on as it is.
  const inner = createReadStream(missing);
  const outer = new PassThrough();
  inner.on('error', (error) => outer.destroy(error)).pipe(outer);
  const wrapped = queue.uploadArtifact(run, 'A', meta('b.bin'), outer);
  const [directError, wrappedError] = await Promise.all([direct.then(() => undefined, (e: Error) => e), wrapped.then(() => undefined, (e: Error) => e)]);
  t.match(directError, { code: 'ENOENT', message: `ENOENT: no such file or directory, open '${missing}'` });
  t.equal(directError?.message, wrappedError?.message);
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

t.test('a destination that fails part-way fails the upload on either path and leaves nothing', { timeout: 30_000 }, async (t) => {
  const fixture = fileURLToPath(new URL('./fixtures/artifact-file-limit.mjs', import.meta.url));
  const built = fileURLToPath(new URL('../dist/queues/artifact-store.js', import.meta.url));
  if (!existsSync(built)) return t.fail(`${built} is missing: run \`npm run build\` first`);
  const { file } = randomFile(t, 4 * MiB);
  for (const how of ['copy', 'stream']) {
    // A file size limit of 1024 blocks (at most 1 MiB): writing the artifact fails with EFBIG.
    const child = spawn('sh', ['-c', 'ulimit -f 1024 && exec "$0" "$@"', process.execPath, fixture, scratch(t, how), file, how], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk));
    const [code, signal] = await once(child, 'exit') as [number | null, string | null];
    t.same([code, signal], [0, null], `${how}: the process ran to its end`);
    const left = JSON.parse(out) as { error?: { code: string; message: string }; rows: unknown[]; files: string[]; bytesRead: number; closed: boolean };
    t.match(left.error, { code: 'EFBIG' }, `${how}: the upload failed with the destination's error`);
    t.same(left.rows, [], `${how}: no row`);
    t.same(left.files, [], `${how}: no file`);
    t.ok(left.closed, `${how}: the source is closed`);
    if (how === 'copy') t.equal(left.bytesRead, 0, 'the copy was the kernel\'s');
    else t.ok(left.bytesRead > 0, 'the stream was read');
  }
});
