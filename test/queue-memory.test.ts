/**
 * The in-memory queue: the queue conformance suite (instances on one store
 * stand for processes sharing a database), and the hooks tests use to make
 * an operation wait or fail at a moment they choose.
 */
import { Readable } from 'node:stream';
import t, { type Test } from 'tap';
import { ClaimLostError, QueueUnavailableError } from '../src/model/errors.js';
import { MemoryQueue, MemoryStore, type MemoryQueueHooks } from '../src/queues/memory.js';
import { queueConformance } from '../src/testing/queue-conformance.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const CLAIM_TIMEOUT_MS = 30_000;

t.test('conformance', async (t) => {
  queueConformance(t, async (t) => {
    const clock = { now: START };
    const store = new MemoryStore();
    const open = async () => {
      const queue = new MemoryQueue({ store, claimTimeoutMs: CLAIM_TIMEOUT_MS, now: () => clock.now });
      t.teardown(() => queue.close());
      return queue;
    };
    return { queue: await open(), claimTimeoutMs: CLAIM_TIMEOUT_MS, now: () => clock.now, advance: (ms) => void (clock.now += ms), another: open };
  });
});

function claimed(t: Test, hooks: MemoryQueueHooks = {}) {
  const queue = new MemoryQueue({ hooks });
  t.teardown(() => queue.close());
  const claim = async () => {
    await queue.submit({ payload: { command: 'true' }, deadline: Date.now() + 60_000, retries: 1 });
    const [run] = await queue.claimWork({ workerId: 'w', count: 1, waitMs: 0 });
    if (run === undefined) throw new Error('nothing claimed');
    return run;
  };
  return { queue, claim };
}

t.test('hooks', async (t) => {
  t.test('a reclaim hook that throws makes the claim lost at the moment the test chooses', async (t) => {
    let lose = false;
    const { queue, claim } = claimed(t, {
      reclaim: (run) => {
        if (lose) throw new ClaimLostError(run, 'claim-expired', 'the test took it');
      },
    });
    const run = await claim();
    t.ok((await queue.reclaim(run, 'w')).takenUntil > Date.now());
    lose = true;
    await t.rejects(queue.reclaim(run, 'w'), { name: 'ClaimLostError', reason: 'claim-expired', message: /the test took it/ });
    t.match(await queue.task(run.taskId), { state: 'running' }, 'the queue itself still holds the claim');
  });

  t.test('a resolve hook can hold the report until the test lets it through', async (t) => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const { queue, claim } = claimed(t, { resolve: () => gate });
    const run = await claim();
    let reported = false;
    const reporting = queue.resolve(run, 'w', { state: 'completed' }).then(() => void (reported = true));
    await new Promise((resolve) => setImmediate(resolve));
    t.notOk(reported, 'held');
    t.match(await queue.task(run.taskId), { state: 'running' });
    release();
    await reporting;
    t.match(await queue.task(run.taskId), { state: 'completed' });
  });

  t.test('a resolve hook that throws QueueUnavailableError is an outage; the run stays open', async (t) => {
    const { queue, claim } = claimed(t, { resolve: () => { throw new QueueUnavailableError('the test pulled the cable'); } });
    const run = await claim();
    await t.rejects(queue.resolve(run, 'w', { state: 'completed' }), { name: 'QueueUnavailableError' });
    t.match(await queue.task(run.taskId), { state: 'running' });
  });

  t.test('a watchCancellation hook that throws fails the watch at once', async (t) => {
    const { queue, claim } = claimed(t, { watchCancellation: () => { throw new Error('database is closed'); } });
    const run = await claim();
    t.throws(() => queue.watchCancellation(run, () => {}), { message: 'database is closed' });
  });

  t.test('claimWork and uploadArtifact hooks see their arguments', async (t) => {
    const seen: string[] = [];
    const { queue, claim } = claimed(t, {
      claimWork: (options) => void seen.push(`claim ${options.workerId} ${options.count}`),
      uploadArtifact: (run, workerId, meta) => void seen.push(`upload ${run.runId} ${workerId} ${meta.name}`),
    });
    const run = await claim();
    await queue.uploadArtifact(run, 'w', { name: 'public/x.txt', contentType: 'text/plain' }, Readable.from(['x']));
    t.same(seen, ['claim w 1', 'upload 0 w public/x.txt']);
  });
});

t.test('watching a run canceled already is told at once', async (t) => {
  const { queue, claim } = claimed(t);
  const run = await claim();
  await queue.cancel(run.taskId);
  const heard = await new Promise<boolean>((resolve) => {
    queue.watchCancellation(run, () => resolve(true));
    setTimeout(() => resolve(false), 500);
  });
  t.ok(heard);
});

t.test('the payload is stored as data: the caller\'s object can change, a claim\'s copy too', async (t) => {
  const queue = new MemoryQueue();
  t.teardown(() => queue.close());
  const payload = { command: ['echo', 'a'] };
  const id = await queue.submit({ payload, deadline: Date.now() + 60_000, retries: 0 });
  payload.command.push('b');
  const [claim] = await queue.claimWork({ workerId: 'w', count: 1, waitMs: 0 });
  t.same(claim!.payload, { command: ['echo', 'a'] });
  (claim!.payload['command'] as string[]).push('c');
  t.same((await queue.task(id)).payload, { command: ['echo', 'a'] });
});

t.test('instances on separate stores share nothing', async (t) => {
  const a = new MemoryQueue();
  const b = new MemoryQueue();
  t.teardown(() => Promise.all([a.close(), b.close()]));
  await a.submit({ payload: {}, deadline: Date.now() + 60_000, retries: 0 });
  t.same(await b.listTasks(), []);
  t.equal((await a.listTasks()).length, 1);
});
