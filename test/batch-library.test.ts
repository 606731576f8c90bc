/** runBatch: the batch engine as a library function, without the CLI. */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { runBatch } from '../src/batch/run.js';

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

t.test('runBatch stops on its signal: nothing runs after it, the jobs stay pending', async (t) => {
  const sessionsDir = t.testdir({});
  const stop = new AbortController();
  stop.abort();
  const outcome = await runBatch(['1', '2'], { command: ['true'], split: 1, sessionsDir, signal: stop.signal });
  t.ok(outcome.interrupted);
  t.same(outcome.jobs.map((job) => job.status), ['pending', 'pending']);
});
