/** retry(): the backoff helper the cloud hosts call their services through. */
import t from 'tap';
import { backoffDelay, retry } from '../src/hosts/retry.js';

const QUICK = { baseDelayMs: 1, maxDelayMs: 4 };

t.test('backoffDelay doubles its ceiling per attempt, up to the maximum, with full jitter', async (t) => {
  const top = () => 0.999_999;
  t.same([1, 2, 3, 4, 5, 10].map((attempt) => backoffDelay(attempt, { baseDelayMs: 100, maxDelayMs: 1000, random: top })), [99, 199, 399, 799, 999, 999]);
  t.equal(backoffDelay(3, { baseDelayMs: 100, maxDelayMs: 1000, random: () => 0 }), 0, 'the jitter reaches down to no pause');
});

t.test('retry tries again until the call succeeds, telling each failure', async (t) => {
  const told: [string, number][] = [];
  let calls = 0;
  const value = await retry(async (attempt) => {
    calls++;
    if (attempt < 3) throw new Error(`failure ${attempt}`);
    return 'done';
  }, { attempts: 5, ...QUICK, onRetry: (error, attempt) => told.push([(error as Error).message, attempt]) });
  t.equal(value, 'done');
  t.equal(calls, 3);
  t.same(told, [['failure 1', 1], ['failure 2', 2]]);
});

t.test('retry gives up with the last error when the attempts are used up or the error is not retryable', async (t) => {
  let calls = 0;
  await t.rejects(retry(async (attempt) => {
    calls++;
    throw new Error(`failure ${attempt}`);
  }, { attempts: 3, ...QUICK }), { message: 'failure 3' });
  t.equal(calls, 3);

  calls = 0;
  await t.rejects(retry(async () => {
    calls++;
    throw new RangeError('permanent');
  }, { attempts: 3, ...QUICK, retryable: (error) => !(error instanceof RangeError) }), RangeError);
  t.equal(calls, 1, 'a permanent error is not tried again');
});

t.test('retry stops at once when its signal is aborted, in a call or in a pause', async (t) => {
  const stop = new AbortController();
  let calls = 0;
  const pending = retry(async () => {
    calls++;
    throw new Error('down');
  }, { attempts: 100, baseDelayMs: 60_000, maxDelayMs: 60_000, random: () => 0.5, signal: stop.signal });
  await new Promise((resolve) => setTimeout(resolve, 20));
  stop.abort(new Error('disposed'));
  await t.rejects(pending, { message: 'disposed' }, 'the pause (30 s) ends with the abort reason');
  t.equal(calls, 1);

  await t.rejects(retry(async () => 'never', { attempts: 3, ...QUICK, signal: stop.signal }), { message: 'disposed' }, 'an aborted signal runs nothing');
});
