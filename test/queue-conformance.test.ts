/**
 * The queue conformance suite (drover/testing) against both shipped queues:
 * the embedded SQLite one and PostgreSQL (a fresh schema per test), each on
 * an injected clock, each with a second instance as another process.
 */
import t from 'tap';
import { PostgresQueue } from '../src/queues/postgres.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { queueConformance } from '../src/testing/queue-conformance.js';
import { freshSchema, PG_URL } from './helpers/postgres.js';

const START = Date.parse('2026-01-01T00:00:00Z');
const CLAIM_TIMEOUT_MS = 30_000;

t.test('sqlite', async (t) => {
  queueConformance(t, async (t) => {
    const clock = { now: START };
    const dir = t.testdir();
    const open = async () => {
      const queue = SqliteQueue.open({ dir, claimTimeoutMs: CLAIM_TIMEOUT_MS, pollIntervalMs: 50, now: () => clock.now });
      t.teardown(() => queue.close());
      return queue;
    };
    return { queue: await open(), claimTimeoutMs: CLAIM_TIMEOUT_MS, now: () => clock.now, advance: (ms) => void (clock.now += ms), another: open };
  });
});

for (const artifacts of ['postgres', 'directory'] as const) {
  t.test(`postgres, artifacts in ${artifacts}`, async (t) => {
    queueConformance(t, async (t) => {
      const clock = { now: START };
      const schema = freshSchema(t);
      const artifactDir = artifacts === 'directory' ? t.testdir() : undefined;
      const open = async () => {
        // A long poll interval: waking up must come from NOTIFY, not from polling.
        const queue = await PostgresQueue.open({
          url: PG_URL, schema, claimTimeoutMs: CLAIM_TIMEOUT_MS, pollIntervalMs: 5_000, poolSize: 4, now: () => clock.now,
          ...(artifactDir === undefined ? {} : { artifactDir }),
        });
        t.teardown(() => queue.close());
        return queue;
      };
      return { queue: await open(), claimTimeoutMs: CLAIM_TIMEOUT_MS, now: () => clock.now, advance: (ms) => void (clock.now += ms), another: open };
    });
  });
}
