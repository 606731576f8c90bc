/** `drover batch` on this machine: jobs from stdin, the session directory, timeouts, retries, bad input. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { createSession } from '../src/batch/run.js';
import { EXIT } from '../src/cli/exit-codes.js';
import { MAX_RUN_TIME_SECONDS } from '../src/plugins/maxruntime.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { drover, droverLoading } from './helpers/drover.js';

interface JobLine {
  job: number;
  attempt: number;
  status: string;
  slot: number;
  host: string;
  start: string;
  durationMs: number;
  exitCode: number | null;
  signal: string | null;
}

function jobsLog(dir: string): JobLine[] {
  return readFileSync(join(dir, 'jobs.jsonl'), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as JobLine);
}

t.test('seq 10 | drover batch echo hello: ten jobs, a session directory, a summary, exit 0', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const input = Array.from({ length: 10 }, (_, i) => `${i + 1}`).join('\n') + '\n';
  const result = await drover(['batch', 'echo', 'hello'], { cwd, input, env: { DROVER_SESSIONS: sessions } });
  t.equal(result.code, 0, result.stderr);
  t.match(result.stdout, /^session 1 \(\d+ s\): 10\/10 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.match(result.stdout, /^\d{4}-\d\d-\d\dT[\d:.]+Z job 3 ok slot \d+ /m, 'plain timestamped lines when stdout is not a terminal');
  const dir = join(sessions, '1');
  for (let n = 1; n <= 10; n++) t.equal(readFileSync(join(dir, 'output', `${n}.log`), 'utf8').match(/^hello \d+$/m)?.[0], `hello ${n}`);
  const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as { n: number; status: string; command: string }[];
  t.same(jobs.map((job) => job.status), Array(10).fill('ok'));
  t.equal(jobs[4]!.command, 'echo hello 5');
  const log = jobsLog(dir);
  t.equal(log.length, 10, 'one job log line per finished job');
  t.same(log.map((line) => line.job).sort((a, b) => a - b), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  for (const line of log) {
    t.equal(line.exitCode, 0);
    t.equal(line.signal, null);
    t.equal(line.host, 'localhost');
    t.ok(Number.isFinite(Date.parse(line.start)) && line.durationMs >= 0);
  }
  const slots = readFileSync(join(dir, 'slot-1.log'), 'utf8');
  t.match(slots, /=== .* job \d+ \(attempt 1\) on localhost: echo hello \d+\n(\[drover\] .*\n)*hello \d+\n/, 'slot logs carry each job\'s output under a header');
  t.match(readFileSync(join(dir, 'session.log'), 'utf8'), /worker booted/);
  // Each job's output file starts with drover's claim line: the batch's own listener on the log gets
  // every line. The session's queue keeps no copy of the logs (two of each job's four queue writes).
  const queue = SqliteQueue.open({ dir: join(dir, 'queue') });
  t.teardown(() => queue.close());
  const tasks = await queue.listTasks();
  t.equal(tasks.length, 10);
  for (const task of tasks) {
    const n = jobs.find((job) => job.command === (task.payload as { command: string }).command)!.n;
    const output = readFileSync(join(dir, 'output', `${n}.log`), 'utf8');
    t.match(output, /^\[drover\] worker .* claimed run 0 /, `job ${n}: the output starts with the claim`);
    t.match(output, /\nhello \d+\n(\[drover\] .*\n)*\[drover\] resolved completed\n$/, `job ${n}: the output ends with its resolution`);
    t.same(await queue.listArtifacts({ taskId: task.taskId, runId: 0 }), [], `job ${n}: no artifact in the session's queue`);
  }
});

t.test('a batch on this machine does not load ssh2 or the cloud\'s modules (70 ms of its start)', async (t) => {
  const cwd = t.testdir({});
  const { code, stderr, loaded } = await droverLoading(['batch', '--split', '2', '--sessions', join(cwd, 'sessions'), '--', 'true'], ['ssh2', '@aws-sdk', '@google-cloud'], { cwd, input: '1\n2\n' });
  t.equal(code, 0, stderr);
  t.same(loaded, []);
});

t.test('words are split like a shell splits them, without expansion, and quoted again', async (t) => {
  const cwd = t.testdir({});
  const input = `a 'b c' "d \\"e\\"" f\\ g $HOME '*'\n`;
  const result = await drover(['batch', '--split', '1', '--sessions', 'sessions', '--', 'printf', '[%s]'], { cwd, input });
  t.equal(result.code, 0, result.stderr);
  t.match(readFileSync(join(cwd, 'sessions', '1', 'output', '1.log'), 'utf8'), '[a][b c][d "e"][f g][$HOME][*]');
});

t.test('--timeout kills the job\'s process group; failures and --retries; exit 1 and the counts', async (t) => {
  const cwd = t.testdir({});
  const input = ['ok', 'fail', 'slow'].join('\n');
  // `slow` leaves a background child that would write a marker if the process group were not killed.
  // Jobs run in a directory of their own, so the files they write are named by absolute paths.
  const script = `case $0 in ok) exit 0;; fail) echo attempt >> '${cwd}/failures'; exit 3;; slow) (sleep 3; echo survived > '${cwd}/marker') & sleep 30;; esac`;
  const started = Date.now();
  const result = await drover(['batch', '--split', '3', '--timeout', '1', '--retries', '1', '--sessions', 'sessions', '--', 'sh', '-c', script], { cwd, input, env: { DROVER_KILL_GRACE: '0.5' } });
  t.equal(result.code, EXIT.FAILED, result.stderr);
  t.ok(Date.now() - started < 15_000, 'the timed-out job did not hold the batch');
  t.match(result.stdout, /^session 1 \(\d+ s\): 1\/3 OK - 0 pending, 1 timeout, 1 errors$/m);
  t.equal(readFileSync(join(cwd, 'failures'), 'utf8'), 'attempt\nattempt\n', '--retries 1: the failing job ran twice');
  const log = jobsLog(join(cwd, 'sessions', '1'));
  t.same(log.filter((line) => line.job === 2).map((line) => [line.attempt, line.status, line.exitCode]), [[1, 'failed', 3], [2, 'failed', 3]]);
  t.same(log.filter((line) => line.job === 3).map((line) => line.status), ['timeout', 'timeout']);
  await new Promise((resolve) => setTimeout(resolve, 3500));
  t.throws(() => readFileSync(join(cwd, 'marker')), 'the timed-out job\'s background child was killed with it');
});

t.test('--timeout longer than a worker can keep (MAX_RUN_TIME_SECONDS) is refused before any job runs, wherever it comes from', async (t) => {
  const cwd = t.testdir({ 'long.yaml': `timeout: ${MAX_RUN_TIME_SECONDS + 1}\n` });
  const sessionsDir = join(cwd, 'sessions');
  const limit = `must be at most ${MAX_RUN_TIME_SECONDS} seconds`;
  const cases: [string[], Record<string, string>, string][] = [
    [['--timeout', String(MAX_RUN_TIME_SECONDS + 1)], {}, `--timeout ${limit}`],
    [['--timeout', '3000000', '--strikes', '1'], {}, `--timeout ${limit} (about 24.8 days, the longest maxRunTime a worker can keep), not "3000000"\n`],
    [['--template', 'long.yaml'], {}, `--timeout ${limit} (about 24.8 days, the longest maxRunTime a worker can keep), not "${MAX_RUN_TIME_SECONDS + 1}" (from template "long.yaml")`],
    [[], { DROVER_TIMEOUT: '3000000' }, `--timeout ${limit} (about 24.8 days, the longest maxRunTime a worker can keep), not "3000000" (from DROVER_TIMEOUT)`],
  ];
  for (const [args, env, message] of cases) {
    const result = await drover(['batch', '--sessions', sessionsDir, ...args, '--', 'sh', '-c', 'echo ran >> ran'], { cwd, input: '1\n', env });
    t.equal(result.code, EXIT.CONFIG, `drover batch ${[...Object.entries(env).map(([name, value]) => `${name}=${value}`), ...args].join(' ')} exits 2`);
    t.match(result.stderr, message);
  }
  t.throws(() => readFileSync(join(cwd, 'ran')), 'no job ran');
  t.throws(() => readFileSync(join(sessionsDir, '1', 'params.json')), 'no session was made');

  // The longest a worker keeps is a timeout a job runs under.
  const longest = await drover(['batch', '--sessions', sessionsDir, '--timeout', String(MAX_RUN_TIME_SECONDS), 'echo'], { cwd, input: '1\n' });
  t.equal(longest.code, EXIT.OK, longest.stderr);
  t.match(longest.stdout, /^session 1 \(\d+ s\): 1\/1 OK/m);

  // A session stored with a longer timeout (before the bound) is refused on --resume, unless --timeout replaces it.
  createSession(['a'], { command: ['echo'], sessionsDir, timeout: 3_000_000 });
  const resumed = await drover(['batch', '--sessions', sessionsDir, '--resume', '2'], { cwd });
  t.equal(resumed.code, EXIT.CONFIG);
  t.match(resumed.stderr, `session 2 has timeout 3000000 (${join(sessionsDir, '2', 'params.json')}), above the most a job may run, ${MAX_RUN_TIME_SECONDS} seconds`);
  t.match(resumed.stderr, 'give --timeout S to replace it');
  const replaced = await drover(['batch', '--sessions', sessionsDir, '--resume', '2', '--timeout', '60'], { cwd });
  t.equal(replaced.code, EXIT.OK, replaced.stderr);
  t.match(replaced.stdout, /^session 2 \(\d+ s\): 1\/1 OK/m);
});

t.test('bad input exits 2 with a clear message', async (t) => {
  const cwd = t.testdir({});
  const cases: [string[], RegExp][] = [
    [['batch', '--colour', 'echo'], /Unknown option '--colour'[\s\S]*drover batch --help/],
    [['batch', '--split', '0', 'echo'], /--split must be a whole number of at least 1/],
    [['batch', '--hosts', '@missing-hosts', 'echo'], /hosts file "missing-hosts": not found/],
  ];
  for (const [args, message] of cases) {
    const result = await drover(args, { cwd, input: '1\n', env: { DROVER_SESSIONS: join(cwd, 'sessions') } });
    t.equal(result.code, EXIT.CONFIG, `drover ${args.join(' ')} exits 2`);
    t.match(result.stderr, message);
  }
  const unterminated = await drover(['batch', 'echo'], { cwd, input: "it's\n", env: { DROVER_SESSIONS: join(cwd, 'sessions') } });
  t.equal(unterminated.code, EXIT.CONFIG);
  t.match(unterminated.stderr, /unterminated ' quote in job line: it's/);
});

t.test('batch --help says how lines become words', async (t) => {
  const result = await drover(['batch', '--help'], { cwd: t.testdir({}) });
  t.equal(result.code, 0);
  t.match(result.stdout, /Usage: cat jobs \| drover batch/);
  t.match(result.stdout, /split into words as a shell/);
});

t.test('--report runs its command in the session directory with the session\'s figures', async (t) => {
  const cwd = t.testdir({});
  const report = 'sh: echo "$DROVER_SESSION_ID $DROVER_JOBS $DROVER_OK $DROVER_FAILED $DROVER_TIMEOUT $DROVER_PENDING" > report.txt; pwd >> report.txt';
  const result = await drover(['batch', '--split', '2', '--sessions', 'sessions', '--report', report, '--', 'sh', '-c', 'test $0 != 2'], { cwd, input: '1\n2\n3\n' });
  t.equal(result.code, EXIT.FAILED, result.stderr);
  const dir = join(cwd, 'sessions', '1');
  t.equal(readFileSync(join(dir, 'report.txt'), 'utf8'), `1 3 2 1 0 0\n${dir}\n`);
  const bad = await drover(['batch', '--report', 'echo hi', 'echo'], { cwd, input: '1\n' });
  t.equal(bad.code, EXIT.CONFIG);
  t.match(bad.stderr, /--report must be 'sh: COMMAND'/);
});
