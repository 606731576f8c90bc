/** Batch sessions: SIGINT then --resume runs every job exactly once; --retry re-runs exactly the failed ones; `drover sessions`. */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { jobsHash, SAVE_COST_SHARE, SAVE_DELAY_MS, SAVE_MAX_DELAY_MS, Session, type JobRecord } from '../src/batch/session.js';
import { EXIT } from '../src/cli/exit-codes.js';
import { DROVER, drover, eventually, userEnv } from './helpers/drover.js';

const lines = (file: string): string[] => (existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter(Boolean) : []);

t.test('a batch interrupted with SIGINT, then --resume: every job runs exactly once in total', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const done = join(cwd, 'done');
  const jobs = Array.from({ length: 8 }, (_, i) => `${i + 1}`);
  // Each job records itself only once it has finished its work, as a real job's effect would.
  const command = ['sh', '-c', `sleep 0.6; echo $0 >> '${done}'`];
  const child = spawn(process.execPath, [DROVER, 'batch', '--split', '2', '--sessions', sessions, '--', ...command], {
    cwd, env: userEnv(), stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  child.stdin.end(jobs.join('\n') + '\n');
  await eventually('two jobs done and more running', () => lines(done).length >= 2, 20_000);
  await new Promise((resolve) => setTimeout(resolve, 250)); // the next two are in their sleep
  child.kill('SIGINT');
  const code = await exited;
  t.equal(code, EXIT.SIGNAL, stderr);
  t.match(stderr, /interrupted by SIGINT; the session is saved\. Resume it with: drover batch --resume 1/);
  t.match(stdout, /^session 1 \(\d+ s\): \d\/8 OK - [1-9]\d* pending, 0 timeout, 0 errors$/m);
  const saved = JSON.parse(readFileSync(join(sessions, '1', 'jobs.json'), 'utf8')) as { n: number; status: string }[];
  const finishedBefore = lines(done).length;
  t.ok(finishedBefore < 8, `the interruption left jobs to do (${finishedBefore} done)`);
  t.same(saved.filter((job) => job.status === 'ok').length, finishedBefore, 'jobs.json says ok for exactly the jobs that finished');
  t.notOk(saved.some((job) => job.status === 'running'), 'no job is left running');

  const refused = await drover(['batch', '--resume', '1', '--sessions', sessions], { cwd, input: '1\n2\nX\n' });
  t.equal(refused.code, EXIT.CONFIG, 'a resume with other jobs is refused');
  t.match(refused.stderr, /the jobs on stdin are not session 1's \(8 stored, 3 given; job 3 is "3" in the session but "X" on stdin\); refusing to resume/);
  t.same(lines(done).length, finishedBefore, 'the refused resume ran nothing');

  const resumed = await drover(['batch', '--resume', '1', '--sessions', sessions], { cwd, input: jobs.join('\n') + '\n', timeoutMs: 30_000 });
  t.equal(resumed.code, 0, resumed.stderr);
  t.match(resumed.stdout, /^session 1 \(\d+ s\): 8\/8 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.same(lines(done).sort((a, b) => Number(a) - Number(b)), jobs, 'every job ran exactly once in total');

  const list = await drover(['sessions', '--sessions', sessions], { cwd });
  t.equal(list.code, 0);
  t.match(list.stdout, /^ID\s+CREATED\s+JOBS\s+OK\s+FAILED\s+TIMEOUT\s+PENDING\s+COMMAND$/m);
  t.match(list.stdout, /^1\s+\S+\s+8\s+8\s+0\s+0\s+0\s+sh -c/m);
});

t.test('--retry re-runs exactly the failed and timed-out jobs, with the options given again', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const ran = join(cwd, 'ran');
  const flag = join(cwd, 'flag');
  // Jobs named bad fail, and slow ones hang (and time out), until the flag file exists.
  const command = ['sh', '-c', `echo $0 >> '${ran}'; case $0 in bad*) test -e '${flag}';; slow*) test -e '${flag}' || sleep 30;; esac`];
  const input = ['good1', 'bad1', 'good2', 'bad2', 'slow1'].join('\n') + '\n';
  const first = await drover(['batch', '--split', '3', '--timeout', '1', '--sessions', sessions, '--', ...command], { cwd, input });
  t.equal(first.code, EXIT.FAILED, 'a batch with failures exits 1');
  t.match(first.stdout, /^session 1 \(\d+ s\): 2\/5 OK - 0 pending, 1 timeout, 2 errors$/m);
  writeFileSync(flag, '');
  const retried = await drover(['batch', '--retry', '1', '--timeout', '20', '--sessions', sessions], { cwd });
  t.equal(retried.code, 0, retried.stderr);
  t.match(retried.stdout, /^session 1 \(\d+ s\): 5\/5 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.same(lines(ran).sort(), ['bad1', 'bad1', 'bad2', 'bad2', 'good1', 'good2', 'slow1', 'slow1'], 'only the failed and the timed-out jobs ran again');
  t.match(JSON.parse(readFileSync(join(sessions, '1', 'params.json'), 'utf8')), { timeout: 20, split: 3 }, 'the option given again replaced the stored one');
  const again = await drover(['batch', '--retry', '1', '--sessions', sessions], { cwd });
  t.equal(again.code, 0);
  t.equal(lines(ran).length, 8, 'a retry with nothing failed runs nothing');
});

t.test('an unknown session id exits 2', async (t) => {
  const cwd = t.testdir({});
  for (const flag of ['--resume', '--retry']) {
    const result = await drover(['batch', flag, '42', '--sessions', join(cwd, 'sessions')], { cwd });
    t.equal(result.code, EXIT.CONFIG);
    t.match(result.stderr, /no session "42" in .*sessions \(see "drover sessions"\)/);
  }
});

t.test('a long job list: each rewrite of jobs.json waits 1/SAVE_COST_SHARE times what the last one took, and still happens', async (t) => {
  const cwd = t.testdir({});
  const lines = Array.from({ length: 100_000 }, (_, i) => String(i + 1));
  const jobs: JobRecord[] = lines.map((line, i) => ({ n: i + 1, line, command: `true ${line}`, status: 'pending', attempts: 0 }));
  const session = Session.create(join(cwd, 'sessions'), { command: ['true'], split: 8, retries: 0, created: new Date().toISOString(), jobsHash: jobsHash(lines) }, jobs);
  // Each rewrite: when it began and ended, and what it cost by the session's own measure.
  const rewrites = [{ began: Number.NaN, ended: performance.now(), cost: session.saveMs }];
  const save = session.save.bind(session);
  session.save = () => {
    const began = performance.now();
    const before = session.saveMs;
    save();
    rewrites.push({ began, ended: performance.now(), cost: session.saveMs - before });
  };
  // Jobs end every 5 ms for 1.2 s, each asking for a rewrite, as a busy batch does.
  const started = performance.now();
  let n = 0;
  let savesBeforeLastChange = 0;
  while (n < 240 && performance.now() - started < 1200) {
    jobs[n]!.status = 'ok';
    savesBeforeLastChange = session.saves;
    n++;
    session.saveSoon();
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  // The rewrite after the last change may have come in the loop's last pause already: a rewrite runs
  // whole between two changes, so any rewrite counted since the last change has it.
  await eventually('a rewrite after the last change', () => session.saves > savesBeforeLastChange, 30_000);
  const written = JSON.parse(readFileSync(join(session.dir, 'jobs.json'), 'utf8')) as JobRecord[];
  t.equal(written.filter((job) => job.status === 'ok').length, n, 'the rewrite has every change made before it');
  // The rule itself, not a share of one window's time: a share depends on how the costs of two rewrites
  // compare, which a busy machine changes. A rewrite of 100,000 jobs took 55-95 ms; a fixed 100 ms pause,
  // as before, spent 40% of a busy batch's time rewriting. A timer set in a turn of the loop that a
  // rewrite made late may fire that much early by the real clock: half the pause is what is checked.
  for (let i = 1; i < rewrites.length; i++) {
    const { cost, ended } = rewrites[i - 1]!;
    const pause = Math.min(SAVE_MAX_DELAY_MS, Math.max(SAVE_DELAY_MS, cost / SAVE_COST_SHARE));
    const gap = rewrites[i]!.began - ended;
    t.ok(gap >= pause / 2, `rewrite ${i} began ${gap.toFixed(0)} ms after the one before, which took ${cost.toFixed(0)} ms (a pause of ${pause.toFixed(0)} ms is due)`);
  }
});
