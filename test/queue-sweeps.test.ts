/**
 * When the queues sweep (issue 8's queue work): a claim that keeps finding
 * work still sweeps once per poll interval. The memory, SQLite and
 * PostgreSQL queues, on an injected clock. (That a report is refused once
 * its task's deadline has passed, before any sweep, is in the conformance
 * suite, src/testing/queue-conformance.ts.)
 */
import t, { type Test } from 'tap';
import { MemoryQueue } from '../src/queues/memory.js';
import { PostgresQueue } from '../src/queues/postgres.js';
import type { Queue } from '../src/queues/queue.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { freshSchema, PG_URL } from './helpers/postgres.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const CLAIM_TIMEOUT_MS = 30_000;
const POLL_MS = 200;

type Open = (t: Test, clock: { now: number }) => Promise<Queue>;
const QUEUES: Record<string, Open> = {
  memory: async (_t, clock) => new MemoryQueue({ claimTimeoutMs: CLAIM_TIMEOUT_MS, now: () => clock.now }),
  sqlite: async (t, clock) => {
    const queue = SqliteQueue.open({ dir: t.testdir(), claimTimeoutMs: CLAIM_TIMEOUT_MS, pollIntervalMs: POLL_MS, now: () => clock.now });
    t.teardown(() => queue.close());
    return queue;
  },
  postgres: async (t, clock) => {
    const queue = await PostgresQueue.open({
      url: PG_URL, schema: freshSchema(t), claimTimeoutMs: CLAIM_TIMEOUT_MS, pollIntervalMs: POLL_MS, poolSize: 2, now: () => clock.now,
    });
    t.teardown(() => queue.close());
    return queue;
  },
};

for (const [name, open] of Object.entries(QUEUES)) {
  t.test(name, async (t) => {
    const setup = async (t: Test) => {
      const clock = { now: START };
      const queue = await open(t, clock);
      const submit = (deadline = START + 3_600_000, retries = 0) => queue.submit({ payload: {}, deadline, retries });
      const claim = async (workerId: string) => (await queue.claimWork({ workerId, count: 1, waitMs: 0 }))[0]!;
      return { clock, queue, submit, claim };
    };

    t.test('a claim that finds work still sweeps an expired claim once the poll interval has passed', async (t) => {
      const { clock, queue, submit, claim } = await setup(t);
      const lost = await submit(START + 3_600_000, 1);
      await claim('A');
      const waiting = await submit();
      clock.now += CLAIM_TIMEOUT_MS; // A's claim has expired; nobody has swept it
      t.match(await claim('B'), { taskId: waiting }, 'the pending task is claimed');
      t.match(await queue.task(lost), {
        state: 'pending', retriesLeft: 0,
        runs: [{ state: 'exception', reasonResolved: 'claim-expired' }, { state: 'pending', reasonCreated: 'retry' }],
      }, 'and the expired claim was swept by that claim');
      t.match(await claim('B'), { taskId: lost, runId: 1 });
    });
  });
}
