import t, { type Test } from 'tap';
import { fork, spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import fsPromises from 'node:fs/promises';
import { syncBuiltinESMExports } from 'node:module';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { ClaimLostError, ConfigError, InternalError, TaskStateError } from '../src/model/errors.js';
import type { RunRef } from '../src/model/task.js';
import { DEFAULT_CLAIM_TIMEOUT_MS, INLINE_MAX_BYTES, MIGRATIONS, SqliteQueue, SWEEP_BATCH, type SqliteQueueOptions } from '../src/queues/sqlite.js';
import type { CancelWatchers } from '../src/queues/wakers.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const HOUR = 3_600_000;
const TIMEOUT = DEFAULT_CLAIM_TIMEOUT_MS;

/** A queue in its own directory, on a clock that moves only when told to. */
function setup(t: Test, options: Partial<SqliteQueueOptions> = {}) {
  const clock = { now: START };
  const dir = t.testdir();
  const open = (more: Partial<SqliteQueueOptions> = {}): SqliteQueue => {
    const queue = SqliteQueue.open({ dir, now: () => clock.now, ...options, ...more });
    t.teardown(() => queue.close());
    return queue;
  };
  const queue = open();
  const submit = (more: { deadline?: number; retries?: number; payload?: Record<string, unknown> } = {}) =>
    queue.submit({ payload: more.payload ?? {}, deadline: more.deadline ?? clock.now + HOUR, retries: more.retries ?? 0 });
  return { queue, dir, clock, open, submit, advance: (ms: number) => void (clock.now += ms) };
}

async function bytesOf(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

async function text(stream: Readable): Promise<string> {
  return (await bytesOf(stream)).toString();
}

t.test('opening a new queue while another process holds its write lock waits for it, as busy_timeout does', async (t) => {
  // A worker and a submit that open a new queue at once: the first is half way through its switch to
  // WAL, holding the write lock, when the second reads the header and wants the write lock too. SQLite
  // answers that second one SQLITE_BUSY at once, busy handler or not.
  const dir = t.testdir();
  const file = join(dir, 'queue.db');
  const holder = spawn(process.execPath, ['-e', `const db = new (require('better-sqlite3'))(${JSON.stringify(file)});
    db.exec('BEGIN IMMEDIATE; CREATE TABLE early (a)'); console.log('held');
    setTimeout(() => { db.exec('COMMIT'); db.close(); }, 300);`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((resolve) => holder.once('exit', resolve));
  await once(holder.stdout, 'data');
  const queue = SqliteQueue.open({ dir });
  t.teardown(() => queue.close());
  t.equal(await exited, 0, 'the holder committed and let go');
  const taskId = await queue.submit({ payload: {}, deadline: Date.now() + HOUR, retries: 0 });
  t.equal((await queue.task(taskId)).state, 'pending');
  const check = new Database(file, { readonly: true });
  t.equal(check.pragma('journal_mode', { simple: true }), 'wal');
  check.close();
});

t.test('submit gives slugid-style ids and claims run FIFO, at most count at a time', async (t) => {
  const { queue, submit } = setup(t);
  const ids = [];
  for (let i = 0; i < 5; i++) ids.push(await submit({ payload: { n: i }, retries: 2 }));
  for (const id of ids) t.match(id, /^[A-Za-z][A-Za-z0-9_-]{21}$/);
  t.equal(new Set(ids).size, 5);

  const first = await queue.claimWork({ workerId: 'A', count: 2, waitMs: 0 });
  t.same(first.map((c) => c.taskId), ids.slice(0, 2));
  t.match(first[0], { runId: 0, workerId: 'A', payload: { n: 0 }, takenUntil: START + TIMEOUT, deadline: START + HOUR, retriesLeft: 2 });
  const rest = await queue.claimWork({ workerId: 'B', count: 10, waitMs: 0 });
  t.same(rest.map((c) => c.taskId), ids.slice(2));
  t.same(await queue.claimWork({ workerId: 'C', count: 1, waitMs: 0 }), []);

  const status = await queue.task(ids[0]!);
  t.match(status, { state: 'running', payload: { n: 0 }, retriesLeft: 2, runs: [{ runId: 0, state: 'running', workerId: 'A', reasonCreated: 'scheduled' }] });
  await t.rejects(queue.task('nosuchtask'), TaskStateError);
});

t.test('submitMany queues its tasks in one transaction, in order; one bad task and none is queued', async (t) => {
  const { queue, clock } = setup(t);
  const task = (n: number, retries = 0) => ({ payload: { n }, deadline: clock.now + HOUR, retries });
  await t.rejects(queue.submitMany([task(0), task(1, -1), task(2)]), new RangeError('task 2 of 3: retries must be a whole number >= 0, not -1'));
  t.same(await queue.listTasks(), [], 'the good tasks before and after the bad one were not queued either');
  t.same(await queue.submitMany([]), []);
  const ids = await queue.submitMany(Array.from({ length: 1000 }, (_, n) => task(n)));
  t.equal(new Set(ids).size, 1000);
  const claims = await queue.claimWork({ workerId: 'A', count: 1000, waitMs: 0 });
  t.same(claims.map((claim) => claim.taskId), ids, 'claimed in the order given');
  t.same(claims.map((claim) => claim.payload['n']), ids.map((_, n) => n), 'each with its own payload');
});

t.test('claims of many different counts (each its own statement, a bounded number kept) take every run once, in order', async (t) => {
  const { queue, submit } = setup(t);
  const ids = [];
  for (let i = 0; i < 300; i++) ids.push(await submit());
  const claimed = [];
  for (let count = 1; count <= 100; count++) {
    const claims = await queue.claimWork({ workerId: 'A', count: count % 7 === 0 ? count + 0.5 : count, waitMs: 0 });
    t.ok(claims.length <= count, `at most ${count}`);
    claimed.push(...claims.map((c) => c.taskId));
  }
  t.same(claimed, ids);
  t.same(await queue.claimWork({ workerId: 'A', count: 5, waitMs: 0 }), []);
});

t.test('task() and listTasks() read a task\'s row and its runs as of one moment', async (t) => {
  const { queue, open, submit } = setup(t);
  const taskId = await submit();
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  // Another process ends the run between the read of the task's row and that of its runs.
  const other = open();
  const statements = (queue as unknown as { s: Record<string, { all: (...args: unknown[]) => unknown[] }> }).s;
  const runs = statements.runs!;
  let between: (() => void) | undefined;
  statements.runs = { all: (...args) => (between?.(), between = undefined, runs.all(...args)) };
  t.teardown(() => void (statements.runs = runs));

  between = () => void other.resolve(claim!, 'A', { state: 'failed' });
  const status = await queue.task(taskId);
  t.equal(status.state, 'running', 'as the row was read');
  t.same(status.runs.map((run) => run.state), ['running'], 'and its runs with it');
  t.equal((await queue.task(taskId)).state, 'failed', 'the next read sees the end');

  const second = await submit();
  const [secondClaim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  between = () => void other.resolve(secondClaim!, 'A', { state: 'completed' });
  const [listed] = await queue.listTasks({ state: 'running' });
  t.match(listed, { taskId: second, state: 'running', runs: [{ state: 'running' }] });
});

t.test('long poll', async (t) => {
  t.test('wakes as soon as a task is submitted on the same instance', async (t) => {
    const { queue, submit } = setup(t, { pollIntervalMs: 60_000 });
    const started = performance.now();
    const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 10_000 });
    await sleep(50);
    const id = await submit();
    const claims = await claiming;
    t.same(claims.map((c) => c.taskId), [id]);
    t.ok(performance.now() - started < 2_000, 'did not wait for a poll tick');
  });

  t.test('sees work from another instance on the next poll', async (t) => {
    const { queue, open } = setup(t, { pollIntervalMs: 20 });
    const other = open();
    const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 5_000 });
    await sleep(50);
    const id = await other.submit({ payload: {}, deadline: START + HOUR, retries: 0 });
    t.same((await claiming).map((c) => c.taskId), [id]);
  });

  t.test('returns [] once waitMs has passed', async (t) => {
    const { queue } = setup(t, { pollIntervalMs: 50 });
    const started = performance.now();
    t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 300 }), []);
    const elapsed = performance.now() - started;
    t.ok(elapsed >= 250 && elapsed < 2_000, `waited ${Math.round(elapsed)} ms`);
  });

  t.test('returns [] when the signal aborts', async (t) => {
    const { queue } = setup(t, { pollIntervalMs: 60_000 });
    const started = performance.now();
    t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 30_000, signal: AbortSignal.timeout(50) }), []);
    t.ok(performance.now() - started < 2_000);
  });

  t.test('returns [] when the queue closes', async (t) => {
    const { queue } = setup(t, { pollIntervalMs: 60_000 });
    const claiming = queue.claimWork({ workerId: 'A', count: 1, waitMs: 30_000 });
    await sleep(20);
    await queue.close();
    t.same(await claiming, []);
  });
});

t.test('reclaim', async (t) => {
  t.test('extends the claim', async (t) => {
    const { queue, submit, advance, clock } = setup(t);
    await submit();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    advance(TIMEOUT - 1);
    t.same(await queue.reclaim(claim!, 'A'), { takenUntil: clock.now + TIMEOUT });
    advance(TIMEOUT - 1); // past the first claim, within the second
    t.same(await queue.reclaim(claim!, 'A'), { takenUntil: clock.now + TIMEOUT });
    t.equal(await queue.sweep(), 0);
  });

  t.test('after expiry: claim-expired, and a retry run is pending', async (t) => {
    const { queue, submit, advance } = setup(t);
    const id = await submit({ retries: 1 });
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    advance(TIMEOUT);
    const error = await queue.reclaim(claim!, 'A').catch((e: unknown) => e);
    t.type(error, ClaimLostError);
    t.match(error, { reason: 'claim-expired', message: /claim expired at 2026-01-01T00:00:30\.000Z; the run was resolved exception\/claim-expired/ });
    t.match(await queue.task(id), {
      state: 'pending',
      retriesLeft: 0,
      runs: [
        { runId: 0, state: 'exception', reasonResolved: 'claim-expired', message: /worker A did not reclaim/ },
        { runId: 1, state: 'pending', reasonCreated: 'retry' },
      ],
    });
    const [retry] = await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 });
    t.match(retry, { taskId: id, runId: 1, retriesLeft: 0 });
  });

  t.test('by another worker is refused', async (t) => {
    const { queue, submit } = setup(t);
    await submit();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await t.rejects(queue.reclaim(claim!, 'B'), { name: 'ClaimLostError', message: /held by worker A, not B/ });
  });
});

t.test('sweep resolves expired claims, retrying while retries remain', async (t) => {
  const { queue, submit, advance } = setup(t);
  const id = await submit({ retries: 1 });
  await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  advance(TIMEOUT);
  t.equal(await queue.sweep(), 1);
  await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  advance(TIMEOUT);
  t.equal(await queue.sweep(), 1);
  t.equal(await queue.sweep(), 0);
  t.match(await queue.task(id), { state: 'exception', retriesLeft: 0, runs: [{ reasonResolved: 'claim-expired' }, { reasonResolved: 'claim-expired' }] });
});

t.test('resolve', async (t) => {
  t.test('succeeds exactly once, only for the holder', async (t) => {
    const { queue, submit } = setup(t);
    const id = await submit();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await t.rejects(queue.resolve(claim!, 'B', { state: 'completed' }), { name: 'ClaimLostError', reason: 'resolved', message: /held by worker A, not B/ });
    await queue.resolve(claim!, 'A', { state: 'completed', message: 'exit code 0' });
    await t.rejects(queue.resolve(claim!, 'A', { state: 'failed' }), {
      name: 'ClaimLostError', reason: 'resolved', message: /already resolved: worker A resolved it completed at/,
    });
    t.match(await queue.task(id), { state: 'completed', runs: [{ state: 'completed', reasonResolved: 'completed', message: 'exit code 0' }] });
    t.equal((await queue.task(id)).runs.length, 1);
    await t.rejects(queue.resolve({ taskId: id, runId: 1 }, 'A', { state: 'completed' }), { name: 'TaskStateError', message: `there is no run ${id}/1` });
  });

  t.test('is refused once the claim has expired, even before a sweep', async (t) => {
    const { queue, submit, advance } = setup(t);
    const id = await submit();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    advance(TIMEOUT + 1);
    await t.rejects(queue.resolve(claim!, 'A', { state: 'completed' }), { name: 'ClaimLostError', reason: 'claim-expired' });
    t.match(await queue.task(id), { state: 'exception', runs: [{ reasonResolved: 'claim-expired' }] });
  });

  t.test('retries retryable exceptions until retries run out', async (t) => {
    const { queue, submit } = setup(t);
    const id = await submit({ retries: 1 });
    const [first] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await queue.resolve(first!, 'A', { state: 'exception', reason: 'worker-shutdown' });
    t.match(await queue.task(id), { state: 'pending', retriesLeft: 0 });
    const [second] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    t.equal(second!.runId, 1);
    await queue.resolve(second!, 'A', { state: 'exception', reason: 'intermittent-task', message: 'flaky' });
    const status = await queue.task(id);
    t.match(status, { state: 'exception', retriesLeft: 0, runs: [{ state: 'exception' }, { state: 'exception', reasonCreated: 'retry', message: 'flaky' }] });
    t.equal(status.runs.length, 2);
    t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), []);
  });

  t.test('does not retry other exceptions', async (t) => {
    const { queue, submit } = setup(t);
    const id = await submit({ retries: 3 });
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await queue.resolve(claim!, 'A', { state: 'exception', reason: 'malformed-payload' });
    t.match(await queue.task(id), { state: 'exception', retriesLeft: 3, runs: [{ reasonResolved: 'malformed-payload' }] });
  });
});

t.test('deadlines', async (t) => {
  const { queue, submit, advance } = setup(t);
  const running = await submit({ deadline: START + 1_000, retries: 5 });
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  const pending = await submit({ deadline: START + 1_000 });
  advance(TIMEOUT + 1_000); // the claim expired too, but the deadline wins: no retry
  t.equal(await queue.sweep(), 2);
  for (const id of [running, pending]) {
    const status = await queue.task(id);
    t.match(status, { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
    t.equal(status.runs.length, 1);
  }
  await t.rejects(queue.reclaim(claim!, 'A'), {
    name: 'ClaimLostError', reason: 'deadline-exceeded', message: /deadline passed at 2026-01-01T00:00:01\.000Z; the run was resolved exception\/deadline-exceeded/,
  });
  t.same(await queue.claimWork({ workerId: 'A', count: 5, waitMs: 0 }), []);
});

t.test('a completed task\'s row is written by the deadline sweep; until then its last run says it is completed', async (t) => {
  const { queue, dir, submit, advance } = setup(t);
  const rowState = (id: string) => {
    const db = new Database(join(dir, 'queue.db'), { readonly: true });
    try {
      return (db.prepare('SELECT state FROM tasks WHERE id = ?').get(id) as { state: string }).state;
    } finally {
      db.close();
    }
  };
  const done = await submit({ deadline: START + 1_000 });
  const open = await submit({ deadline: START + 1_000 });
  const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  await queue.resolve(claim!, 'A', { state: 'completed' });
  t.equal(rowState(done), 'pending', 'the completion wrote only the run');
  t.match(await queue.task(done), { state: 'completed', runs: [{ state: 'completed' }] });
  t.same((await queue.listTasks({ state: 'completed' })).map((s) => s.taskId), [done]);
  t.same((await queue.listTasks({ state: 'pending' })).map((s) => s.taskId), [open]);
  await t.rejects(queue.cancel(done), { name: 'TaskStateError', message: /already resolved completed/ });

  // Past the deadline the sweep ends the open task, and only writes down the completed one.
  advance(2_000);
  t.equal(await queue.sweep(), 1, 'one run ended: the open task\'s');
  t.equal(rowState(done), 'completed');
  t.match(await queue.task(done), { state: 'completed', runs: [{ state: 'completed' }] });
  t.match(await queue.task(open), { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
  t.same((await queue.listTasks({ state: 'completed' })).map((s) => s.taskId), [done]);
  t.same(await queue.listTasks({ state: 'pending' }), []);
});

t.test('a claim\'s sweep writes at most SWEEP_BATCH rows of passed deadlines; sweep() goes on until none is left', async (t) => {
  const { queue, dir, submit, advance } = setup(t);
  const count = 2 * SWEEP_BATCH + 10;
  for (let i = 0; i < count; i++) await submit({ deadline: START + 1_000 });
  for (;;) {
    const claims = await queue.claimWork({ workerId: 'A', count: 100, waitMs: 0 });
    if (claims.length === 0) break;
    for (const claim of claims) await queue.resolve(claim, 'A', { state: 'completed' });
  }
  const open = await submit({ deadline: START + 1_000 });
  const db = new Database(join(dir, 'queue.db'), { readonly: true });
  t.teardown(() => db.close());
  const unswept = () => (db.prepare(`SELECT count(*) AS n FROM tasks WHERE state = 'pending'`).get() as { n: number }).n;
  t.equal(unswept(), count + 1);
  advance(2_000);
  // A claim sweeps once, one batch, inside its own transaction: the write lock is held briefly.
  t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), []);
  t.equal(unswept(), SWEEP_BATCH + 11, 'one batch written');
  t.equal(await queue.sweep(), 1, 'sweep() went on, batch by batch, to the open task behind them, and ended it');
  t.equal(unswept(), 0);
  t.match(await queue.task(open), { state: 'exception', runs: [{ reasonResolved: 'deadline-exceeded' }] });
  t.equal((await queue.listTasks({ state: 'completed', limit: count })).length, count);
});

t.test('a full batch of completed rows to write down does not change how a passed deadline ends a task', async (t) => {
  // SWEEP_BATCH completed tasks whose deadline passed first: a sweep's batch holds them all, and the task
  // under test (a later deadline, also passed) is left for the next sweep.
  const behindBacklog = async (t: Test) => {
    const fixture = setup(t);
    for (let i = 0; i < SWEEP_BATCH; i++) await fixture.submit({ deadline: START + 1_000 });
    for (let claims; (claims = await fixture.queue.claimWork({ workerId: 'A', count: 100, waitMs: 0 })).length > 0;) {
      for (const claim of claims) await fixture.queue.resolve(claim, 'A', { state: 'completed' });
    }
    return fixture;
  };

  t.test('a report refused after the deadline says deadline-exceeded, and the task is ended so', async (t) => {
    const { queue, submit, advance } = await behindBacklog(t);
    const id = await submit({ deadline: START + 2_000, retries: 1 });
    const [claim] = await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 });
    advance(3_000); // the deadline has passed; the claim holds for 27 s more
    await t.rejects(queue.resolve(claim!, 'B', { state: 'completed' }), { name: 'ClaimLostError', reason: 'deadline-exceeded' });
    const status = await queue.task(id);
    t.match(status, { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
    t.equal(status.runs.length, 1, 'no retry after a deadline');
  });

  t.test('a claim that expired after the deadline is not retried: the deadline wins', async (t) => {
    const { queue, submit, advance } = await behindBacklog(t);
    const id = await submit({ deadline: START + 2_000, retries: 1 });
    await queue.claimWork({ workerId: 'B', count: 1, waitMs: 0 });
    advance(TIMEOUT + 3_000);
    await queue.sweep();
    await queue.sweep();
    const status = await queue.task(id);
    t.match(status, { state: 'exception', retriesLeft: 1, runs: [{ state: 'exception', reasonResolved: 'deadline-exceeded' }] });
    t.equal(status.runs.length, 1, 'no retry after a deadline');
  });

  t.test('cancel after the deadline finds the task ended by it', async (t) => {
    const { queue, submit, advance } = await behindBacklog(t);
    const id = await submit({ deadline: START + 2_000 });
    advance(3_000);
    await t.rejects(queue.cancel(id), { name: 'TaskStateError', message: /already resolved exception\/deadline-exceeded/ });
    t.match(await queue.task(id), { state: 'exception', runs: [{ reasonResolved: 'deadline-exceeded' }] });
  });
});

t.test('cancel', async (t) => {
  t.test('a pending task', async (t) => {
    const { queue, submit } = setup(t);
    const id = await submit({ retries: 2 });
    await queue.cancel(id);
    t.match(await queue.task(id), { state: 'exception', runs: [{ state: 'exception', reasonResolved: 'canceled', message: 'canceled by user' }] });
    t.same(await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), []);
  });

  t.test('a running task: the watcher hears it within a second, reclaim says canceled', async (t) => {
    const { queue, submit, open } = setup(t, { pollIntervalMs: 100 });
    const id = await submit({ retries: 2 });
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    let calls = 0;
    const heard = new Promise<void>((resolve) => queue.watchCancellation(claim!, () => { calls++; resolve(); }));
    const started = performance.now();
    await open().cancel(id); // another instance, as another process would
    const late = new AbortController();
    await Promise.race([heard, sleep(1_000, undefined, { signal: late.signal }).then(() => t.fail('no cancellation within a second'))]);
    late.abort();
    t.ok(performance.now() - started < 1_000, 'heard within a second');
    await t.rejects(queue.reclaim(claim!, 'A'), { name: 'ClaimLostError', reason: 'canceled', message: /canceled at .*exception\/canceled/ });
    await t.rejects(queue.resolve(claim!, 'A', { state: 'completed' }), { name: 'ClaimLostError', reason: 'canceled' });
    await sleep(250);
    t.equal(calls, 1, 'called once');
    t.match(await queue.task(id), { state: 'exception', retriesLeft: 2 });
  });

  t.test('watchers share one unref\'d timer that goes with the last of them', async (t) => {
    const { queue } = setup(t);
    // A private peek: the timer is not observable otherwise, since an unref'd one is not an active resource.
    const timer = () => (queue as unknown as { watchers: CancelWatchers }).watchers.timer;
    const refs = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const before = refs();
    const stops = [1, 2, 3].map((runId) => queue.watchCancellation({ taskId: 'x', runId }, () => t.fail('not canceled')));
    const shared = timer();
    t.ok(shared);
    t.notOk(shared?.hasRef(), 'does not keep the process alive');
    t.equal(refs(), before);
    stops[0]!();
    stops[0]!();
    t.equal(timer(), shared, 'one watcher gone, the timer stays');
    stops[1]!();
    stops[2]!();
    t.equal(timer(), undefined, 'no watchers, no timer');
  });

  t.test('a resolved or unknown task is refused', async (t) => {
    const { queue, submit } = setup(t);
    const id = await submit();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    await queue.resolve(claim!, 'A', { state: 'completed' });
    await t.rejects(queue.cancel(id), { name: 'TaskStateError', message: new RegExp(`task ${id}.*already resolved completed`) });
    await t.rejects(queue.cancel('AAAAAAAAAAAAAAAAAAAAAA'), { name: 'TaskStateError', message: /AAAAAAAAAAAAAAAAAAAAAA: there is no such task/ });
  });
});

t.test('artifacts', async (t) => {
  const claimed = async (t: Test, options: Partial<SqliteQueueOptions> = {}) => {
    const q = setup(t, options);
    await q.submit();
    const [claim] = await q.queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    return { ...q, run: { taskId: claim!.taskId, runId: claim!.runId } as RunRef };
  };
  const meta = (name: string) => ({ name, contentType: 'text/plain' });

  t.test('upload, list and read', async (t) => {
    const { queue, run } = await claimed(t);
    const info = await queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), Readable.from(['hello ', 'world']));
    t.match(info, { ...run, name: 'public/logs/live.log', contentType: 'text/plain', state: 'complete', size: 11, created: START });
    t.notOk(existsSync(queue.artifactPath(run, 'public/logs/live.log')), 'small and uploaded at once: kept in its row, no file');
    t.same(await queue.listArtifacts(run), [info]);
    t.equal(await text(await queue.readArtifact(run, 'public/logs/live.log')), 'hello world');
    await t.rejects(queue.uploadArtifact(run, 'A', meta('public/logs/live.log'), Readable.from(['x'])), { name: 'TaskStateError', message: /already has an artifact/ });
    await t.rejects(queue.uploadArtifact(run, 'A', meta('public/logs'), Readable.from(['x'])), { name: 'TaskStateError', message: /clashes with/ });
    await t.rejects(queue.readArtifact(run, 'nope.txt'), { name: 'TaskStateError', message: `artifact "nope.txt" of task ${run.taskId} run 0 does not exist` });
    await t.rejects(queue.listArtifacts({ taskId: run.taskId, runId: 7 }), TaskStateError);
  });

  t.test('small artifacts stay in their row; larger or slower ones go to a file, byte for byte', async (t) => {
    const { queue, run, dir } = await claimed(t, { inlineWaitMs: 200 });
    const bytes = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + 3) % 256));
    const cases = [
      { name: 'empty.bin', content: bytes(0), file: false },
      { name: 'largest-kept.bin', content: bytes(INLINE_MAX_BYTES), file: false },
      { name: 'one-byte-more.bin', content: bytes(INLINE_MAX_BYTES + 1), file: true },
      { name: 'large.bin', content: bytes(5 * INLINE_MAX_BYTES + 11), file: true },
    ];
    for (const { name, content, file } of cases) {
      // In small pieces, as a command's output comes.
      const pieces = Array.from({ length: Math.ceil(content.length / 1000) }, (_, i) => content.subarray(i * 1000, (i + 1) * 1000));
      t.match(await queue.uploadArtifact(run, 'A', meta(name), Readable.from(pieces)), { name, state: 'complete', size: content.length });
      t.equal(existsSync(queue.artifactPath(run, name)), file, `${name}: ${file ? 'a file' : 'no file'}`);
      t.ok((await bytesOf(await queue.readArtifact(run, name))).equals(content), `${name}: read back whole`);
      t.ok((await bytesOf(await queue.readArtifact(run, name, { follow: true }))).equals(content), `${name}: followed whole`);
    }
    // Slow: its first bytes were held for the wait, then went to the file ahead of the rest.
    const slow = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('slow.log'), slow);
    slow.write('first ');
    await sleep(400);
    t.ok(existsSync(queue.artifactPath(run, 'slow.log')), 'after the wait, a file');
    slow.end('last');
    t.match(await uploading, { size: 10 });
    t.equal(await text(await queue.readArtifact(run, 'slow.log')), 'first last');
    // The bytes are in the database itself: another instance reads them.
    const other = SqliteQueue.open({ dir });
    t.teardown(() => other.close());
    t.equal(await text(await other.readArtifact(run, 'largest-kept.bin')), bytes(INLINE_MAX_BYTES).toString());
    t.same((await other.listArtifacts(run)).map((a) => a.name).toSorted(), [...cases.map((c) => c.name), 'slow.log'].toSorted());
  });

  t.test('a follower of a small artifact waits while it streams and reads it once it is complete', { timeout: 10_000 }, async (t) => {
    const { queue, run } = await claimed(t);
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    let ended = false;
    const following = queue.readArtifact(run, 'live.log', { follow: true }).then(text).finally(() => void (ended = true));
    source.write('[drover] claimed\n');
    await sleep(250);
    t.notOk(ended, 'the follower waits while the upload streams');
    t.equal(await text(await queue.readArtifact(run, 'live.log')), '', 'a reader meanwhile reads nothing yet');
    source.end('done\n');
    await uploading;
    t.equal(await following, '[drover] claimed\ndone\n');
    t.notOk(existsSync(queue.artifactPath(run, 'live.log')), 'kept in its row');
  });

  t.test('another listener of the stream (drover batch\'s) and the artifact each get every chunk once', async (t) => {
    for (const [label, inlineWaitMs, pauseMs] of [['kept in the row', 1000, 0], ['held, then a file', 100, 300], ['a file at once', 0, 0]] as const) {
      const { queue, run } = await claimed(t, { inlineWaitMs });
      const source = new PassThrough();
      source.write('first\n'); // before anyone reads, as the log's claim line is
      const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
      // The other listener comes after the upload was called, as drover batch's plugin comes after livelog.
      const seen: string[] = [];
      source.on('data', (chunk: Buffer) => seen.push(chunk.toString()));
      await sleep(20);
      source.write('second\n');
      await sleep(pauseMs);
      source.end('third\n');
      await uploading;
      t.equal(seen.join(''), 'first\nsecond\nthird\n', `${label}: the listener`);
      t.equal(await text(await queue.readArtifact(run, 'live.log')), 'first\nsecond\nthird\n', `${label}: the artifact`);
      t.equal(existsSync(queue.artifactPath(run, 'live.log')), inlineWaitMs !== 1000, `${label}: ${inlineWaitMs === 1000 ? 'no file' : 'a file'}`);
    }
  });

  t.test('inlineWaitMs must be a number of milliseconds', async (t) => {
    for (const inlineWaitMs of [-1, Number.NaN, Infinity]) {
      t.throws(() => SqliteQueue.open({ dir: t.testdir(), inlineWaitMs }), { name: 'ConfigError', message: /inlineWaitMs must be a number of milliseconds >= 0/ });
    }
  });

  t.test('a follower reads a live upload to its end', { timeout: 10_000 }, async (t) => {
    const { queue, run } = await claimed(t);
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    t.match(await queue.listArtifacts(run), [{ name: 'live.log', state: 'streaming', size: 0 }]);
    let ended = false;
    const following = queue.readArtifact(run, 'live.log', { follow: true }).then(text).finally(() => void (ended = true));
    const lines = Array.from({ length: 8 }, (_, i) => `line ${i}\n`);
    for (const line of lines) {
      source.write(line);
      await sleep(30);
    }
    t.notOk(ended, 'the follower waits while the upload streams');
    source.end();
    t.match(await uploading, { state: 'complete', size: lines.join('').length });
    t.equal(await following, lines.join(''));
    t.equal(await text(await queue.readArtifact(run, 'live.log')), lines.join(''));
  });

  t.test('a follower stops when its signal aborts', { timeout: 10_000 }, async (t) => {
    const { queue, run } = await claimed(t);
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    source.write('partial');
    const stop = new AbortController();
    const reader = await queue.readArtifact(run, 'live.log', { follow: true, signal: stop.signal });
    const chunks: Buffer[] = [];
    const ended = new Promise((resolve) => reader.once('end', resolve));
    reader.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      stop.abort(); // the upload is still streaming: only the signal can end this read
    });
    await ended;
    t.equal(Buffer.concat(chunks).toString(), 'partial');
    source.end();
    await uploading;
  });

  t.test('a streaming artifact\'s file follows its row: until it exists a reader reads nothing and a follower waits', async (t) => {
    const { queue, run } = await claimed(t, { inlineWaitMs: 0 });
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    t.match(await queue.listArtifacts(run), [{ name: 'live.log', state: 'streaming' }], 'the row is there as soon as the upload is called');
    // The state just after that call, held still: the row, and no file yet.
    const path = queue.artifactPath(run, 'live.log');
    for (let i = 0; i < 200 && !existsSync(path); i++) await sleep(5);
    rmSync(path);
    t.equal(await text(await queue.readArtifact(run, 'live.log')), '');
    const following = text(await queue.readArtifact(run, 'live.log', { follow: true }));
    await sleep(250);
    writeFileSync(path, 'made');
    source.end();
    await uploading;
    t.equal(await following, 'made', 'the follower opened the file once it was made');
  });

  t.test('a follower that found no file yet reads the artifact its upload completed meanwhile', async (t) => {
    const { queue, run } = await claimed(t, { inlineWaitMs: 0 });
    const path = queue.artifactPath(run, 'live.log');
    // The race, held still: the follower's open finds no file; before it looks at the row again, the upload makes
    // its file, writes it and completes (another process can do all that in between).
    const realOpen = fsPromises.open;
    t.teardown(() => {
      fsPromises.open = realOpen;
      syncBuiltinESMExports();
    });
    let followerLooked!: () => void;
    const looked = new Promise<void>((resolve) => (followerLooked = resolve));
    let uploading: Promise<unknown> | undefined;
    const source = new PassThrough();
    fsPromises.open = (async (file: string, flags: string, ...rest: []) => {
      if (file === path && flags === 'w') await looked;
      if (file !== path || flags !== 'r' || uploading === undefined) return realOpen(file, flags, ...rest);
      try {
        return await realOpen(file, flags, ...rest);
      } catch (error) {
        followerLooked();
        source.end('done');
        await uploading;
        uploading = undefined;
        throw error;
      }
    }) as typeof fsPromises.open;
    syncBuiltinESMExports();
    uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    t.equal(await text(await queue.readArtifact(run, 'live.log', { follow: true })), 'done');
    t.match(await queue.listArtifacts(run), [{ name: 'live.log', state: 'complete', size: 4 }]);
  });

  t.test('a follower whose signal has aborted before the file was made ends, with nothing read', async (t) => {
    const { queue, run } = await claimed(t, { inlineWaitMs: 0 });
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('live.log'), source);
    // The state just after the call, held still: the row, and no file yet.
    const path = queue.artifactPath(run, 'live.log');
    for (let i = 0; i < 200 && !existsSync(path); i++) await sleep(5);
    rmSync(path);
    t.equal(await text(await queue.readArtifact(run, 'live.log', { follow: true, signal: AbortSignal.abort() })), '');
    source.end();
    await uploading;
  });

  t.test('a failed source leaves no artifact behind', async (t) => {
    const { queue, run } = await claimed(t);
    const source = new PassThrough();
    const uploading = queue.uploadArtifact(run, 'A', meta('broken.log'), source);
    source.write('some');
    source.destroy(new Error('source broke'));
    await t.rejects(uploading, { message: 'source broke' });
    t.same(await queue.listArtifacts(run), []);
    t.notOk(existsSync(queue.artifactPath(run, 'broken.log')));
    t.match(await queue.uploadArtifact(run, 'A', meta('broken.log'), Readable.from(['again'])), { size: 5 });
  });

  t.test('files go in a few shard directories: no directory per task, run or name part', async (t) => {
    const { queue, dir, submit } = setup(t, { inlineWaitMs: 0 });
    for (let i = 0; i < 6; i++) await submit();
    const claims = await queue.claimWork({ workerId: 'A', count: 6, waitMs: 0 });
    for (const claim of claims) {
      await queue.uploadArtifact(claim, 'A', meta('public/logs/live.log'), Readable.from([claim.taskId]));
      await queue.uploadArtifact(claim, 'A', meta('public/x.txt'), Readable.from(['x']));
    }
    const shards = readdirSync(join(dir, 'artifacts'));
    t.same(shards.toSorted(), [...new Set(claims.map((claim) => claim.taskId[0]))].toSorted(), 'one directory per first character of a task id');
    for (const shard of shards) {
      for (const entry of readdirSync(join(dir, 'artifacts', shard), { withFileTypes: true })) t.ok(entry.isFile(), `${shard}/${entry.name} is a file`);
    }
    for (const claim of claims) t.equal(await text(await queue.readArtifact(claim, 'public/logs/live.log')), claim.taskId);
  });

  t.test('a name too long for one file name is stored and read', async (t) => {
    const { queue, run } = await claimed(t, { inlineWaitMs: 0 });
    const name = `public/${'ü'.repeat(100)}/${'long-'.repeat(60)}.log`;
    t.match(await queue.uploadArtifact(run, 'A', meta(name), Readable.from(['long'])), { name, size: 4 });
    t.equal(await text(await queue.readArtifact(run, name)), 'long');
    t.ok(existsSync(queue.artifactPath(run, name)));
  });

  t.test('bad names are refused', async (t) => {
    const { queue, run } = await claimed(t);
    for (const name of ['', '/etc/passwd', '../up', 'a/../b', 'a//b', 'a/', '.', 'a/./b', 'a\\b']) {
      await t.rejects(queue.uploadArtifact(run, 'A', meta(name), Readable.from(['x'])), TaskStateError, JSON.stringify(name));
    }
    t.same(await queue.listArtifacts(run), []);
  });

  t.test('an upload needs the current claim', async (t) => {
    const { queue, run, submit, advance } = await claimed(t);
    await t.rejects(queue.uploadArtifact(run, 'B', meta('x.log'), Readable.from(['x'])), { name: 'ClaimLostError', message: /held by worker A, not B/ });
    const other = await submit();
    await t.rejects(queue.uploadArtifact({ taskId: other, runId: 0 }, 'A', meta('x.log'), Readable.from(['x'])), { name: 'ClaimLostError', message: /pending/ });
    advance(TIMEOUT);
    await t.rejects(queue.uploadArtifact(run, 'A', meta('x.log'), Readable.from(['x'])), { name: 'ClaimLostError', reason: 'claim-expired' });
  });
});

t.test('listTasks: newest first, by state, limited', async (t) => {
  const { queue, submit, advance } = setup(t);
  const ids = [];
  for (let i = 0; i < 4; i++) {
    ids.push(await submit({ payload: { n: i } }));
    advance(1);
  }
  await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
  t.same((await queue.listTasks()).map((s) => s.taskId), [...ids].reverse());
  t.same((await queue.listTasks({ limit: 2 })).map((s) => s.taskId), [ids[3], ids[2]]);
  t.same((await queue.listTasks({ state: 'running' })).map((s) => s.taskId), [ids[0]]);
  t.same(await queue.listTasks({ state: 'completed' }), []);

  // One task ends in each resolved state; each state lists its own, newest first.
  const [first, second, third] = [ids[0]!, ids[1]!, ids[2]!];
  await queue.resolve({ taskId: first, runId: 0 }, 'A', { state: 'failed' });
  for (const [id, resolution] of [[second, { state: 'exception', reason: 'malformed-payload' }], [third, { state: 'completed' }]] as const) {
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    t.equal(claim!.taskId, id);
    await queue.resolve(claim!, 'A', resolution);
  }
  t.same((await queue.listTasks({ state: 'failed' })).map((s) => s.taskId), [first]);
  t.same((await queue.listTasks({ state: 'exception' })).map((s) => s.taskId), [second]);
  t.same((await queue.listTasks({ state: 'completed' })).map((s) => s.taskId), [third]);
  t.same((await queue.listTasks({ state: 'pending' })).map((s) => s.taskId), [ids[3]]);
});

t.test('a claim and its resolution write few pages: what bounds throughput is pages written per transaction', async (t) => {
  const { queue, dir, submit } = setup(t);
  await submit();
  await submit();
  const wal = new Database(join(dir, 'queue.db'));
  t.teardown(() => wal.close());
  /** WAL frames (pages written) since the last call, which then checkpoints and empties the WAL. */
  const pagesWritten = () => {
    const [{ log }] = wal.pragma('wal_checkpoint(PASSIVE)') as [{ log: number }];
    t.match(wal.pragma('wal_checkpoint(TRUNCATE)'), [{ busy: 0, log: 0 }], 'the WAL is emptied');
    return log;
  };
  const claimAndResolve = async (resolution: Parameters<SqliteQueue['resolve']>[2]) => {
    pagesWritten();
    const [claim] = await queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 });
    const claimed = pagesWritten();
    await queue.resolve(claim!, 'A', resolution);
    return { claimed, resolved: pagesWritten() };
  };
  // The claim: the run's row, and one page of the open-runs index (its entry moves from the first pending to
  // the last running place: next to each other).
  // A completion: the run's row, out of the open-runs index; the task's row waits for the deadline sweep.
  t.same(await claimAndResolve({ state: 'completed' }), { claimed: 2, resolved: 2 });
  // A failure writes the task's row at once: out of the open-deadline index, into the index of unsuccessful tasks.
  t.same(await claimAndResolve({ state: 'failed' }), { claimed: 2, resolved: 5 });
});

t.test('opening', async (t) => {
  t.test('a directory under a file is a ConfigError naming it', async (t) => {
    const root = t.testdir({ file: 'not a directory' });
    const dir = join(root, 'file', 'queue');
    const error = (() => { try { SqliteQueue.open({ dir }); } catch (e) { return e; } })();
    t.type(error, ConfigError);
    t.match(error, { message: `queue directory "${dir}" cannot be created: ENOTDIR: not a directory` });
    t.notMatch((error as Error).message, /\n\s+at /, 'no stack in the message');
  });

  t.test('a file that is not a database is a ConfigError', async (t) => {
    const dir = t.testdir({ 'queue.db': 'x'.repeat(4096) });
    t.throws(() => SqliteQueue.open({ dir }), { name: 'ConfigError', message: /queue database ".*queue\.db" cannot be opened: file is not a database/ });
  });

  t.test('bad options are a ConfigError', async (t) => {
    t.throws(() => SqliteQueue.open({ dir: t.testdir(), claimTimeoutMs: 0 }), { name: 'ConfigError', message: /claimTimeoutMs/ });
  });

  t.test('records a schema version and uses WAL', async (t) => {
    const { queue, dir } = setup(t);
    await queue.close();
    const db = new Database(join(dir, 'queue.db'), { readonly: true });
    t.teardown(() => db.close());
    t.equal(db.pragma('user_version', { simple: true }), MIGRATIONS.length);
    t.equal(db.pragma('journal_mode', { simple: true }), 'wal');
    t.ok(SqliteQueue.open({ dir }).close(), 'reopens an existing queue');
  });

  t.test('close is idempotent and later calls reject clearly', async (t) => {
    const { queue, submit } = setup(t);
    await queue.close();
    await queue.close();
    await t.rejects(submit(), { name: 'InternalError', message: /queue ".*" is closed/ });
    await t.rejects(queue.claimWork({ workerId: 'A', count: 1, waitMs: 0 }), InternalError);
    t.throws(() => queue.watchCancellation({ taskId: 'x', runId: 0 }, () => {}), InternalError);
  });
});

t.test('separate processes claim each task exactly once', { timeout: 30_000 }, async (t) => {
  const fixture = fileURLToPath(new URL('./fixtures/sqlite-claimer.mjs', import.meta.url));
  const built = fileURLToPath(new URL('../dist/queues/sqlite.js', import.meta.url));
  if (!existsSync(built)) return t.fail(`${built} is missing: run \`npm run build\` first`);
  const { queue, dir } = setup(t, { now: Date.now });
  const ids = new Set<string>();
  for (let i = 0; i < 200; i++) ids.add(await queue.submit({ payload: { i }, deadline: Date.now() + HOUR, retries: 0 }));

  const workers = ['w1', 'w2', 'w3', 'w4'].map((workerId) => {
    // Plain node: the fixture imports the built module, so tap's TypeScript loader would only slow the start.
    const child = fork(fixture, [dir, workerId], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    t.teardown(() => void child.kill());
    const ready = new Promise<void>((resolve) => child.once('message', () => resolve()));
    const done = new Promise<string[]>((resolve, reject) => {
      let claimed: string[] | undefined;
      child.on('message', (m: { claimed?: string[] }) => void (claimed = m.claimed ?? claimed));
      child.once('exit', (code) => (code === 0 && claimed ? resolve(claimed) : reject(new Error(`${workerId} exited ${code}`))));
    });
    return { workerId, child, ready, done };
  });
  await Promise.all(workers.map((w) => w.ready));
  for (const w of workers) w.child.send('go'); // all start together, to contend for the lock
  const results = await Promise.all(workers.map((w) => w.done));

  t.ok([...ids].every((id) => /^[A-Za-z][A-Za-z0-9_-]{21}$/.test(id)), 'ids are slugids that start with a letter');
  const all = results.flat();
  t.equal(all.length, 200, 'every task claimed once in all');
  t.same(new Set(all), ids, 'and no task twice');
  t.comment(`claims per process: ${results.map((r) => r.length).join(', ')}`);
  const tasks = await queue.listTasks({ limit: 1_000 });
  t.equal(tasks.length, 200);
  t.ok(tasks.every((s) => s.state === 'completed' && s.runs.length === 1), 'all completed in one run');
});
