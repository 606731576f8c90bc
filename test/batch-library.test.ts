/** runBatch: the batch engine as a library function, without the CLI. */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import type { BatchHostSource } from '../src/batch/hosts.js';
import { PROGRESS_INTERVAL_MS, runBatch, runSession } from '../src/batch/run.js';
import type { Progress } from '../src/batch/progress.js';
import { Session } from '../src/batch/session.js';

t.test('runBatch runs the lines as a session and returns every job\'s record', async (t) => {
  const sessionsDir = t.testdir({});
  const seen: number[] = [];
  const outcome = await runBatch(['a', 'b', '', 'c'], {
    command: ['sh', '-c', 'test "$0" != b'],
    split: 2,
    sessionsDir,
    onJob: (job) => seen.push(job.n),
  });
  t.equal(outcome.session.id, 1);
  t.notOk(outcome.interrupted);
  t.same(outcome.jobs.map((job) => [job.n, job.line, job.status, job.exitCode, job.attempts]), [
    [1, 'a', 'ok', 0, 1],
    [2, 'b', 'failed', 1, 1],
    [3, 'c', 'ok', 0, 1],
  ], 'blank lines are no jobs; each job has its status and exit code');
  t.same(outcome.counts, { pending: 0, running: 0, ok: 2, failed: 1, timeout: 0 });
  t.same(seen.sort(), [1, 2, 3], 'onJob heard of every finished job');
  t.ok(existsSync(join(sessionsDir, '1', 'jobs.jsonl')));
});

t.test('onProgress hears at most every PROGRESS_INTERVAL_MS while jobs run, and the last figures in any case', async (t) => {
  const sessionsDir = t.testdir({});
  const heard: { at: number; progress: Progress }[] = [];
  const started = performance.now();
  const lines = Array.from({ length: 200 }, (_, i) => String(i + 1));
  const outcome = await runBatch(lines, { command: ['true'], split: 8, sessionsDir, onProgress: (progress) => heard.push({ at: performance.now(), progress }) });
  const elapsed = performance.now() - started;
  t.same(outcome.counts, { pending: 0, running: 0, ok: 200, failed: 0, timeout: 0 });
  // Each job starts and ends: 400 calls or more, a few milliseconds apart, when every change is passed on.
  // A timer counts from the event loop's clock, which a busy turn of the loop leaves behind the real one,
  // so a gap may come out some milliseconds short of the interval: the checks allow half of it.
  const bound = 2 + Math.ceil(elapsed / (PROGRESS_INTERVAL_MS / 2));
  t.ok(heard.length >= 1 && heard.length <= bound, `${heard.length} calls in ${elapsed.toFixed(0)} ms (at most ${bound})`);
  // The last call may come sooner: the end passes on what is left.
  const gaps = heard.slice(1, -1).map((call, i) => call.at - heard[i]!.at);
  t.ok(gaps.every((gap) => gap >= PROGRESS_INTERVAL_MS / 2), `the calls came about ${PROGRESS_INTERVAL_MS} ms apart: ${gaps.map((gap) => gap.toFixed(0)).join(' ')}`);
  t.same(heard.at(-1)!.progress.counts, { pending: 0, running: 0, ok: 200, failed: 0, timeout: 0 }, 'the last call has the final figures');
});

t.test('runBatch stops on its signal: nothing runs after it, the jobs stay pending', async (t) => {
  const sessionsDir = t.testdir({});
  const stop = new AbortController();
  stop.abort();
  const outcome = await runBatch(['1', '2'], { command: ['true'], split: 1, sessionsDir, signal: stop.signal });
  t.ok(outcome.interrupted);
  t.same(outcome.jobs.map((job) => job.status), ['pending', 'pending']);
});

t.test('runBatch on a host source of its own: opened once with the split, closed once; its session cannot resume without it', async (t) => {
  const sessionsDir = t.testdir({});
  const calls: string[] = [];
  const hostSource: BatchHostSource = {
    describe: () => 'a test cloud',
    // Nothing listens on port 1 of the loopback: the batch finds no host to run on.
    open: async ({ split }) => {
      calls.push(`open ${split}`);
      return { hosts: [{ address: 'me@127.0.0.1:1' }, { address: 'me@127.0.0.1:2' }], connection: { agent: false, identityFiles: [] } };
    },
    close: async () => {
      calls.push('close');
    },
  };
  const outcome = await runBatch(['1', '2', '3'], { command: ['echo'], split: 4, sessionsDir, hostSource });
  t.same(calls, ['open 4', 'close']);
  t.match(outcome.stranded, /no SSH host can be reached/);
  t.same(outcome.counts, { pending: 3, running: 0, ok: 0, failed: 0, timeout: 0 }, 'the jobs stay pending');
  t.same(outcome.hosts.map((host) => [host.host, host.state]), [['me@127.0.0.1:1', 'retired'], ['me@127.0.0.1:2', 'retired']]);
  t.equal(outcome.session.params.hostSource, 'a test cloud');
  await t.rejects(runSession(Session.open(sessionsDir, '1')), { message: 'session 1 ran on a test cloud; resume it with that host source again, or give it hosts (--hosts)' }, 'a resume does not fall back to this machine');
});
