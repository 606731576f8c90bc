/**
 * The queue conformance suite: the rules of src/queues/queue.ts as tap
 * subtests, for any Queue. drover's SQLite and PostgreSQL queues pass it;
 * the author of another queue runs the same suite against theirs:
 *
 *     import t from 'tap';
 *     import { queueConformance } from 'drover/testing';
 *     queueConformance(t, async (t) => {
 *       const clock = { now: Date.parse('2026-01-01T00:00:00Z') };
 *       const open = () => MyQueue.open({ ..., claimTimeoutMs: 30_000, now: () => clock.now });
 *       const queue = await open();
 *       t.teardown(() => queue.close());
 *       return { queue, claimTimeoutMs: 30_000, now: () => clock.now, advance: (ms) => void (clock.now += ms), another: open };
 *     });
 *
 * Each subtest asks for a fresh, empty queue. Tests that move time need
 * `advance` (an injected clock); without one they are skipped. Tests of
 * several instances (another process's view of the same queue) need
 * `another`.
 */
import { PassThrough, Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Test } from 'tap';
import type { RunRef } from '../model/task.js';
import type { Queue } from '../queues/queue.js';

export interface QueueFixture {
  /** A fresh, empty queue; the fixture closes it at the test's teardown. */
  readonly queue: Queue;
  /** The claim length the queue was opened with. */
  readonly claimTimeoutMs: number;
  /** The queue's clock. */
  readonly now: () => number;
  /** Moves the queue's clock forward; absent when the queue runs on real time (time-based tests are then skipped). */
  readonly advance?: (ms: number) => void;
  /** Opens another instance on the same storage and clock, as another process would; the fixture closes it too. */
  readonly another?: () => Promise<Queue>;
}

export type MakeQueue = (t: Test) => Promise<QueueFixture>;

const HOUR = 3_600_000;
const SLUGID = /^[A-Za-z][A-Za-z0-9_-]{21}$/;

async function text(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks).toString();
}

async function bytes(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

/** Registers the queue rules as subtests of `t`. */
export function queueConformance(t: Test, makeQueue: MakeQueue): void {
  const setup = async (t: Test) => {
    const fixture = await makeQueue(t);
    const { queue } = fixture;
    const submit = (more: { deadline?: number; retries?: number; payload?: Record<string, unknown> } = {}) =>
      queue.submit({ payload: more.payload ?? {}, deadline: more.deadline ?? fixture.now() + HOUR, retries: more.retries ?? 0 });
    const claimOne = async (workerId = 'A'): Promise<RunRef> => {
      const [claim] = await queue.claimWork({ workerId, count: 1, waitMs: 0 });
      if (claim === undefined) throw new Error('expected a claim, got none');
      return { taskId: claim.taskId, runId: claim.runId };
    };
    return { ...fixture, submit, claimOne };
  };
  t.test('claims: ids are slugids, runs go oldest first, at most count at a time', async (t) => {
    const { queue, submit, now, claimTimeoutMs } = await setup(t);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push(await submit({ payload: { n: i, nested: { list: [1, 'two'] } }, retries: 2 }));
    for (const id of ids) t.match(id, SLUGID);
    t.equal(new Set(ids).size, 5, 'ids are distinct');
    const first = await queue.claimWork({ workerId: 'A', count: 2, waitMs: 0 });
    t.same(first.map((c) => c.taskId), ids.slice(0, 2), 'oldest first');
    t.match(first[0], { runId: 0, workerId: 'A', payload: { n: 0, nested: { list: [1, 'two'] } }, retriesLeft: 2 });
    t.equal(first[0]!.takenUntil, now() + claimTimeoutMs, 'the claim lasts claimTimeoutMs');
    t.same((await queue.claimWork({ workerId: 'B', count: 10, waitMs: 0 })).map((c) => c.taskId), ids.slice(2));
    t.same(await queue.claimWork({ workerId: 'C', count: 1, waitMs: 0 }), [], 'nothing left');
    t.same(await queue.claimWork({ workerId: 'C', count: 0, waitMs: 0 }), [], 'count 0 claims nothing');
    t.match(await queue.task(ids[0]!), { state: 'running', retriesLeft: 2, runs: [{ runId: 0, state: 'running', workerId: 'A', reasonCreated: 'scheduled' }] });
    await t.rejects(queue.task('AAAAAAAAAAAAAAAAAAAAAA'), { name: 'TaskStateError' });
  });

  t.test('long poll', async (t) => {
    t.test('wakes soon after another instance submits', async (t) => {
      const { queue, another, now } = await setup(t);
      if (another === undefined) return void t.plan(0, 'no second instance');
      const other = await another();
      const started = performance.now();
      const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 10_000 });
      await sleep(100);
      const id = await other.submit({ payload: {}, deadline: now() + HOUR, retries: 0 });
      t.same((await claiming).map((c) => c.taskId), [id]);
      t.ok(performance.now() - started < 3_000, 'well before waitMs');
    });

    t.test('returns [] once waitMs has passed', async (t) => {
      const { queue } = await setup(t);
      const started = performance.now();
      t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 300 }), []);
      const elapsed = performance.now() - started;
      t.ok(elapsed >= 250 && elapsed < 3_000, `waited ${Math.round(elapsed)} ms`);
    });

    t.test('returns [] when the signal aborts', async (t) => {
      const { queue } = await setup(t);
      const started = performance.now();
      t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 30_000, signal: AbortSignal.timeout(100) }), []);
      t.ok(performance.now() - started < 3_000);
    });

    t.test('returns [] when the queue closes', async (t) => {
      const { queue } = await setup(t);
      const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 30_000 });
      await sleep(50);
      await queue.close();
      t.same(await claiming, []);
    });
  });

  t.test('reclaim', async (t) => {
    t.test('extends the claim', async (t) => {
      const { queue, submit, claimOne, advance, now, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      await submit();
      const run = await claimOne();
      advance(claimTimeoutMs - 1);
      t.same(await queue.reclaim(run, 'A'), { takenUntil: now() + claimTimeoutMs });
      advance(claimTimeoutMs - 1); // past the first claim, within the second
      t.same(await queue.reclaim(run, 'A'), { takenUntil: now() + claimTimeoutMs });
      t.equal(await queue.sweep(), 0, 'nothing expired');
    });

    t.test('after expiry: refused as claim-expired, and a retry run is pending', async (t) => {
      const { queue, submit, claimOne, advance, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      const id = await submit({ retries: 1 });
      const run = await claimOne();
      advance(claimTimeoutMs);
      await t.rejects(queue.reclaim(run, 'A'), { name: 'ClaimLostError', reason: 'claim-expired', message: /claim expired at .*exception\/claim-expired/ });
      t.match(await queue.task(id), {
        state: 'pending', retriesLeft: 0,
        runs: [{ runId: 0, state: 'exception', reasonResolved: 'claim-expired', message: /worker A did not reclaim/ }, { runId: 1, state: 'pending', reasonCreated: 'retry' }],
      });
      t.match(await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 }), [{ taskId: id, runId: 1, retriesLeft: 0 }]);
    });

    t.test('by another worker is refused', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      await submit();
      const run = await claimOne();
      await t.rejects(queue.reclaim(run, 'B'), { name: 'ClaimLostError', reason: 'resolved', message: /held by worker A, not B/ });
    });
  });

  t.test('resolve', async (t) => {
    t.test('succeeds once, only for the holder; a different later report is refused', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const id = await submit();
      const run = await claimOne();
      await t.rejects(queue.resolve(run, 'B', { state: 'completed' }), { name: 'ClaimLostError', reason: 'resolved', message: /held by worker A, not B/ });
      await queue.resolve(run, 'A', { state: 'completed', message: 'exit code 0' });
      await t.rejects(queue.resolve(run, 'A', { state: 'failed' }), { name: 'ClaimLostError', reason: 'resolved', message: /already resolved: worker A resolved it completed at/ });
      await t.rejects(queue.resolve(run, 'B', { state: 'completed', message: 'exit code 0' }), { name: 'ClaimLostError', reason: 'resolved' });
      const status = await queue.task(id);
      t.match(status, { state: 'completed', runs: [{ state: 'completed', reasonResolved: 'completed', message: 'exit code 0', workerId: 'A' }] });
      t.equal(status.runs.length, 1);
      await t.rejects(queue.resolve({ taskId: id, runId: 1 }, 'A', { state: 'completed' }), { name: 'TaskStateError', message: `there is no run ${id}/1` });
    });

    t.test('the same report again is acknowledged and applied once (a retry after a lost answer)', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const id = await submit({ retries: 3 });
      const run = await claimOne();
      const resolution = { state: 'exception', reason: 'worker-shutdown', message: 'stopping' } as const;
      await queue.resolve(run, 'A', resolution);
      await queue.resolve(run, 'A', resolution);
      await queue.resolve(run, 'A', resolution);
      const status = await queue.task(id);
      t.equal(status.runs.length, 2, 'one retry run, not three');
      t.equal(status.retriesLeft, 2, 'one retry used');
      await t.rejects(queue.resolve(run, 'A', { ...resolution, message: 'something else' }), { name: 'ClaimLostError' });
    });

    t.test('is refused once the claim has expired, even before a sweep', async (t) => {
      const { queue, submit, claimOne, advance, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      const id = await submit();
      const run = await claimOne();
      advance(claimTimeoutMs + 1);
      await t.rejects(queue.resolve(run, 'A', { state: 'completed' }), { name: 'ClaimLostError', reason: 'claim-expired' });
      t.match(await queue.task(id), { state: 'exception', runs: [{ reasonResolved: 'claim-expired' }] });
    });

    t.test('retries retryable exceptions until retries run out', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const id = await submit({ retries: 1 });
      await queue.resolve(await claimOne(), 'A', { state: 'exception', reason: 'worker-shutdown' });
      t.match(await queue.task(id), { state: 'pending', retriesLeft: 0 });
      const second = await claimOne();
      t.equal(second.runId, 1);
      await queue.resolve(second, 'A', { state: 'exception', reason: 'intermittent-task', message: 'flaky' });
      const status = await queue.task(id);
      t.match(status, { state: 'exception', retriesLeft: 0, runs: [{ state: 'exception' }, { state: 'exception', reasonCreated: 'retry', message: 'flaky' }] });
      t.equal(status.runs.length, 2);
      t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), []);
    });

    t.test('does not retry other exceptions, nor failures', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const malformed = await submit({ retries: 3 });
      await queue.resolve(await claimOne(), 'A', { state: 'exception', reason: 'malformed-payload' });
      t.match(await queue.task(malformed), { state: 'exception', retriesLeft: 3, runs: [{ reasonResolved: 'malformed-payload' }] });
      const failing = await submit({ retries: 3 });
      await queue.resolve(await claimOne(), 'A', { state: 'failed', message: 'exit 1' });
      t.match(await queue.task(failing), { state: 'failed', retriesLeft: 3, runs: [{ state: 'failed', reasonResolved: 'failed' }] });
    });
  });

  t.test('sweep', async (t) => {
    t.test('resolves expired claims, retrying while retries remain', async (t) => {
      const { queue, submit, claimOne, advance, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      const id = await submit({ retries: 1 });
      await claimOne();
      advance(claimTimeoutMs);
      t.equal(await queue.sweep(), 1);
      await claimOne();
      advance(claimTimeoutMs);
      t.equal(await queue.sweep(), 1);
      t.equal(await queue.sweep(), 0);
      t.match(await queue.task(id), { state: 'exception', retriesLeft: 0, runs: [{ reasonResolved: 'claim-expired' }, { reasonResolved: 'claim-expired' }] });
    });

    t.test('many sweepers at once resolve each expired run once', async (t) => {
      const { queue, submit, another, advance, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      const ids = [];
      for (let i = 0; i < 20; i++) ids.push(await submit({ retries: 1 }));
      t.equal((await queue.claimWork({ workerId: 'A', count: 20, waitMs: 0 })).length, 20);
      advance(claimTimeoutMs);
      const others = another ? await Promise.all([another(), another(), another()]) : [];
      const swept = await Promise.all([queue, ...others, queue].map((q) => q.sweep()));
      t.equal(swept.reduce((a, b) => a + b, 0), 20, `swept ${swept.join(' + ')}`);
      for (const id of ids) t.match(await queue.task(id), { state: 'pending', retriesLeft: 0, runs: [{ reasonResolved: 'claim-expired' }, { state: 'pending' }] });
    });
  });

  t.test('deadlines beat expired claims, and pending tasks past them are never claimed', async (t) => {
    const { queue, submit, claimOne, advance, now, claimTimeoutMs } = await setup(t);
    if (!advance) return void t.plan(0, 'no injected clock');
    const deadline = now() + 1_000;
    const running = await submit({ deadline, retries: 5 });
    const run = await claimOne();
    const pending = await submit({ deadline });
    advance(claimTimeoutMs + 1_000);
    t.same(await queue.claimWork({ workerId: 'B', count: 5, waitMs: 0 }), [], 'nothing to claim: both deadlines passed');
    await queue.sweep();
    for (const id of [running, pending]) {
      const status = await queue.task(id);
      t.match(status, { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
      t.equal(status.runs.length, 1, 'no retry after a deadline');
    }
    await t.rejects(queue.reclaim(run, 'A'), {
      name: 'ClaimLostError', reason: 'deadline-exceeded', message: new RegExp(`deadline passed at ${new Date(deadline).toISOString().replace(/\./g, '\\.')}`),
    });
  });

  t.test('past the task deadline, within the claim, nothing more is accepted, before any sweep', async (t) => {
    const { queue, submit, claimOne, now, advance } = await setup(t);
    if (!advance) return void t.plan(0, 'no injected clock');
    const ids = [await submit({ deadline: now() + 1_000, retries: 3 }), await submit({ deadline: now() + 1_000 }), await submit({ deadline: now() + 1_000 })];
    const [resolved, reclaimed, uploaded] = [await claimOne(), await claimOne(), await claimOne()];
    advance(1_000); // the claims hold for a while yet; the deadlines have passed, and nothing has swept
    await t.rejects(queue.resolve(resolved, 'A', { state: 'completed' }), { name: 'ClaimLostError', reason: 'deadline-exceeded' });
    const status = await queue.task(ids[0]!);
    t.match(status, { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
    t.equal(status.runs.length, 1, 'no retry after a deadline');
    await t.rejects(queue.reclaim(reclaimed, 'A'), { name: 'ClaimLostError', reason: 'deadline-exceeded' });
    await t.rejects(queue.uploadArtifact(uploaded, 'A', { name: 'log', contentType: 'text/plain' }, Readable.from(['x'])), { name: 'ClaimLostError', reason: 'deadline-exceeded' });
  });

  t.test('a passed deadline is swept, for a running task whose claim still holds and for a pending one', async (t) => {
    const { queue, submit, claimOne, advance, now } = await setup(t);
    if (!advance) return void t.plan(0, 'no injected clock');
    const running = await submit({ deadline: now() + 1_000, retries: 2 });
    await claimOne();
    const pending = await submit({ deadline: now() + 1_000 });
    advance(1_000);
    t.equal(await queue.sweep(), 2, 'the running and the pending task');
    for (const id of [running, pending]) t.match(await queue.task(id), { state: 'exception', runs: [{ reasonResolved: 'deadline-exceeded' }] });
    t.equal(await queue.sweep(), 0, 'nothing twice');
  });

  t.test('cancel', async (t) => {
    t.test('a pending task: never claimed, not retried', async (t) => {
      const { queue, submit } = await setup(t);
      const id = await submit({ retries: 2 });
      await queue.cancel(id);
      t.match(await queue.task(id), { state: 'exception', retriesLeft: 2, runs: [{ state: 'exception', reasonResolved: 'canceled', message: 'canceled by user' }] });
      t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), []);
    });

    t.test('a running task: the watcher hears it within a second, reclaim and resolve say canceled', async (t) => {
      const { queue, submit, claimOne, another } = await setup(t);
      const id = await submit({ retries: 2 });
      const run = await claimOne();
      let calls = 0;
      const heard = new Promise<void>((resolve) => queue.watchCancellation(run, () => { calls++; resolve(); }));
      await sleep(100); // let a listener connect, where there is one
      const started = performance.now();
      await (another ? await another() : queue).cancel(id);
      const late = new AbortController();
      await Promise.race([heard, sleep(1_500, undefined, { signal: late.signal }).then(() => t.fail('no cancellation heard in time')).catch(() => undefined)]);
      late.abort();
      t.ok(performance.now() - started < 1_500, `heard in ${Math.round(performance.now() - started)} ms`);
      await t.rejects(queue.reclaim(run, 'A'), { name: 'ClaimLostError', reason: 'canceled', message: /canceled at .*exception\/canceled/ });
      await t.rejects(queue.resolve(run, 'A', { state: 'completed' }), { name: 'ClaimLostError', reason: 'canceled' });
      await sleep(250);
      t.equal(calls, 1, 'called once');
      t.match(await queue.task(id), { state: 'exception', retriesLeft: 2 });
    });

    t.test('a watcher that stopped watching is not called', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const id = await submit();
      const run = await claimOne();
      const stop = queue.watchCancellation(run, () => t.fail('called after it stopped watching'));
      stop();
      stop();
      await queue.cancel(id);
      await sleep(300);
    });

    t.test('a resolved or unknown task is refused', async (t) => {
      const { queue, submit, claimOne } = await setup(t);
      const id = await submit();
      await queue.resolve(await claimOne(), 'A', { state: 'completed' });
      await t.rejects(queue.cancel(id), { name: 'TaskStateError', message: new RegExp(`task ${id}.*already resolved completed`) });
      await t.rejects(queue.cancel('AAAAAAAAAAAAAAAAAAAAAA'), { name: 'TaskStateError', message: /AAAAAAAAAAAAAAAAAAAAAA: there is no such task/ });
    });
  });

  t.test('artifacts', async (t) => {
    const claimed = async (t: Test) => {
      const fixture = await setup(t);
      await fixture.submit();
      return { ...fixture, run: await fixture.claimOne() };
    };
    const meta = (name: string) => ({ name, contentType: 'text/plain' });

    t.test('upload, list and read; names are unique per run and never nest', async (t) => {
      const { queue, run, now } = await claimed(t);
      const info = await queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), Readable.from([Buffer.from('hello '), Buffer.from('world')]));
      t.match(info, { ...run, name: 'public/logs/live.log', contentType: 'text/plain', state: 'complete', size: 11, created: now() });
      t.same(await queue.listArtifacts(run), [info]);
      t.equal(await text(await queue.readArtifact(run, 'public/logs/live.log')), 'hello world');
      await t.rejects(queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), Readable.from(['x'])), { name: 'TaskStateError', message: /already has an artifact/ });
      await t.rejects(queue.uploadArtifact(run, 'A', meta('public/logs'), Readable.from(['x'])), { name: 'TaskStateError', message: /clashes with/ });
      await t.rejects(queue.uploadArtifact(run, 'A', meta('public/logs/live.log/more'), Readable.from(['x'])), { name: 'TaskStateError', message: /clashes with/ });
      await t.rejects(queue.readArtifact(run, 'nope.txt'), { name: 'TaskStateError', message: `artifact "nope.txt" of task ${run.taskId} run 0 does not exist` });
      await t.rejects(queue.listArtifacts({ taskId: run.taskId, runId: 7 }), { name: 'TaskStateError' });
    });

    t.test('a large artifact round-trips byte for byte', { timeout: 30_000 }, async (t) => {
      const { queue, run } = await claimed(t);
      const size = 3 * 1024 * 1024 + 12_345;
      const data = Buffer.alloc(size);
      for (let i = 0; i < size; i++) data[i] = (i * 7919) % 251;
      // Uneven pieces, so chunk boundaries fall anywhere.
      const pieces = [];
      for (let at = 0, n = 1; at < size; at += n, n = (n * 31 + 17) % 200_000 + 1) pieces.push(data.subarray(at, at + n));
      const info = await queue.uploadArtifact(run, 'A', meta('big.bin'), Readable.from(pieces));
      t.equal(info.size, size);
      t.ok((await bytes(await queue.readArtifact(run, 'big.bin'))).equals(data), 'the same bytes');
      t.ok((await bytes(await queue.readArtifact(run, 'big.bin', { follow: true }))).equals(data), 'the same bytes when followed');
    });

    t.test('a follower reads a live upload to its end', { timeout: 15_000 }, async (t) => {
      const { queue, run, another } = await claimed(t);
      const reader = another ? await another() : queue;
      const source = new PassThrough();
      const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
      // The upload has begun once its row is there: a queue on a server needs a round trip or two for that.
      t.match(await listedWithin(5000, () => reader.listArtifacts(run)), [{ name: 'live.log', state: 'streaming' }]);
      let ended = false;
      const following = reader.readArtifact(run, 'live.log', { follow: true }).then(text).finally(() => void (ended = true));
      const lines = Array.from({ length: 8 }, (_, i) => `line ${i}\n`);
      for (const line of lines) {
        source.write(line);
        await sleep(30);
      }
      t.notOk(ended, 'the follower waits while the upload streams');
      source.end();
      t.match(await uploading, { state: 'complete', size: lines.join('').length });
      t.equal(await following, lines.join(''));
      t.equal(await text(await reader.readArtifact(run, 'live.log')), lines.join(''));
    });

    t.test('a follower stops when its signal aborts', { timeout: 15_000 }, async (t) => {
      const { queue, run } = await claimed(t);
      const source = new PassThrough();
      const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
      source.write('partial');
      await sleep(100);
      const stop = new AbortController();
      const reader = await queue.readArtifact(run, 'live.log', { follow: true, signal: stop.signal });
      const chunks: Buffer[] = [];
      const ended = new Promise((resolve) => reader.once('end', resolve));
      reader.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        stop.abort(); // the upload still streams: only the signal can end this read
      });
      await ended;
      t.equal(Buffer.concat(chunks).toString(), 'partial');
      source.end();
      await uploading;
    });

    t.test('a follower of an upload nobody finishes ends a claim\'s length after the run was lost', { timeout: 15_000 }, async (t) => {
      const { queue, submit, claimOne, advance, claimTimeoutMs } = await setup(t);
      if (!advance) return void t.plan(0, 'no injected clock');
      const id = await submit({ retries: 1 });
      const run = await claimOne();
      // The worker streams its live log, then stops: killed, or cut off from the queue. Its upload never ends.
      const source = new PassThrough();
      const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source).catch(() => undefined);
      const line = 'the last line before the worker died\n';
      source.write(line);
      // A queue may hold the first bytes a moment before it stores them (SQLite keeps small artifacts in the row).
      t.equal(await within(5000, () => queue.readArtifact(run, 'live.log').then(text, () => ''), (stored) => stored.length > 0), line, 'the line is stored');
      t.match(await queue.listArtifacts(run), [{ name: 'live.log', state: 'streaming' }]);
      let ended = false;
      const following = queue.readArtifact(run, 'live.log', { follow: true }).then(text).finally(() => void (ended = true));
      advance(claimTimeoutMs); // the claim runs out: the run is no longer the worker's
      await sleep(500);
      t.notOk(ended, 'within a claim\'s length of that, the worker may still finish the upload');
      advance(claimTimeoutMs);
      t.equal(await following, line, 'then the follower ends with what was written');
      await queue.sweep();
      t.match(await queue.task(id), { runs: [{ state: 'exception', reasonResolved: 'claim-expired' }, { state: 'pending' }] }, 'the run was swept as usual');
      source.destroy();
      await uploading;
    });

    t.test('another listener of the source and the artifact each get every chunk once', async (t) => {
      const { queue, run } = await claimed(t);
      const source = new PassThrough();
      source.write('first\n'); // before anyone reads, as a live log's first line is
      const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
      // drover batch's plugin listens to the live log after the livelog plugin has started its upload.
      const seen: Buffer[] = [];
      source.on('data', (chunk: Buffer) => seen.push(chunk));
      await sleep(20);
      source.end('second\n');
      await uploading;
      t.equal(Buffer.concat(seen).toString(), 'first\nsecond\n', 'the other listener');
      t.equal(await text(await queue.readArtifact(run, 'live.log')), 'first\nsecond\n', 'the artifact');
    });

    t.test('a failed source leaves no artifact behind', async (t) => {
      const { queue, run } = await claimed(t);
      const source = new PassThrough();
      const uploading = queue.uploadArtifact(run, 'A', meta('broken.log'), source);
      source.write('some');
      await sleep(50);
      source.destroy(new Error('source broke'));
      await t.rejects(uploading, { message: 'source broke' });
      t.same(await queue.listArtifacts(run), []);
      t.match(await queue.uploadArtifact(run, 'A', meta('broken.log'), Readable.from(['again'])), { size: 5 });
      t.equal(await text(await queue.readArtifact(run, 'broken.log')), 'again');
    });

    t.test('bad names are refused', async (t) => {
      const { queue, run } = await claimed(t);
      for (const name of ['', '/etc/passwd', '../up', 'a/../b', 'a//b', 'a/', '.', 'a/./b', 'a\\b']) {
        const source = Readable.from(['x']);
        await t.rejects(queue.uploadArtifact(run, 'A', meta(name), source), { name: 'TaskStateError' }, JSON.stringify(name));
        t.ok(source.destroyed, `the source of ${JSON.stringify(name)} is destroyed`);
      }
      t.same(await queue.listArtifacts(run), []);
    });

    t.test('an upload needs the current claim when it starts; a refused one destroys its source', async (t) => {
      const { queue, run, submit, advance, claimTimeoutMs } = await claimed(t);
      const source = Readable.from(['x']);
      await t.rejects(queue.uploadArtifact(run, 'B', meta('x.log'), source), { name: 'ClaimLostError', message: /held by worker A, not B/ });
      t.ok(source.destroyed, 'the source is destroyed: a file under it is closed now');
      const other = await submit();
      await t.rejects(queue.uploadArtifact({ taskId: other, runId: 0 }, 'A', meta('x.log'), Readable.from(['x'])), { name: 'ClaimLostError', message: /pending/ });
      if (!advance) return;
      advance(claimTimeoutMs);
      await t.rejects(queue.uploadArtifact(run, 'A', meta('x.log'), Readable.from(['x'])), { name: 'ClaimLostError', reason: 'claim-expired' });
    });
  });

  t.test('listTasks: newest first, by state, limited', async (t) => {
    const { queue, submit, advance, claimOne } = await setup(t);
    const ids = [];
    for (let i = 0; i < 4; i++) {
      ids.push(await submit({ payload: { n: i } }));
      advance?.(1);
    }
    await claimOne();
    t.same((await queue.listTasks()).map((s) => s.taskId), [...ids].reverse());
    t.same((await queue.listTasks({ limit: 2 })).map((s) => s.taskId), [ids[3], ids[2]]);
    t.same((await queue.listTasks({ state: 'running' })).map((s) => s.taskId), [ids[0]]);
    t.same(await queue.listTasks({ state: 'completed' }), []);
  });

  t.test('concurrency: claimers racing on several instances never claim a run twice', { timeout: 60_000 }, async (t) => {
    const { queue, submit, another } = await setup(t);
    const total = 120;
    const ids = new Set<string>();
    for (let i = 0; i < total; i++) ids.add(await submit({ payload: { i } }));
    const instances = [queue, ...(another ? await Promise.all([another(), another(), another()]) : [])];
    const claimed: string[] = [];
    const claimers = Array.from({ length: 8 }, async (_, n) => {
      const q = instances[n % instances.length]!;
      const workerId = `w${n}`;
      for (;;) {
        const claims = await q.claimWork({ workerId, count: 1 + (n % 3), waitMs: 0 });
        if (claims.length === 0) return;
        for (const claim of claims) {
          claimed.push(claim.taskId);
          await q.resolve(claim, workerId, { state: 'completed' });
        }
      }
    });
    await Promise.all(claimers);
    t.equal(claimed.length, total, 'every task claimed once in all');
    t.same(new Set(claimed), ids, 'and no task twice');
    const tasks = await queue.listTasks({ limit: 1_000 });
    t.ok(tasks.every((s) => s.state === 'completed' && s.runs.length === 1), 'all completed in one run');
  });

  t.test('close is idempotent; later calls reject with InternalError', async (t) => {
    const { queue, submit } = await setup(t);
    await queue.close();
    await queue.close();
    await t.rejects(submit(), { name: 'InternalError', message: /closed/ });
    await t.rejects(queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), { name: 'InternalError' });
    t.throws(() => queue.watchCancellation({ taskId: 'x', runId: 0 }, () => {}), { name: 'InternalError' });
  });
}

/** What `read` gives once it is `ready` (asked every 20 ms), or after `ms` whatever it gives then. */
async function within<T>(ms: number, read: () => Promise<T>, ready: (value: T) => boolean): Promise<T> {
  const giveUpAt = Date.now() + ms;
  for (;;) {
    const value = await read();
    if (ready(value) || Date.now() >= giveUpAt) return value;
    await sleep(20);
  }
}

/** The list once it has something in it, or after `ms`. */
const listedWithin = <T>(ms: number, list: () => Promise<readonly T[]>) => within(ms, list, (listed) => listed.length > 0);
