/**
 * Regression: an attempt the batch cut short (Ctrl-C, SIGTERM) does not
 * use up a retry. With --retries 1, a job interrupted on its first attempt
 * used to have attempts=1 on --resume, so its first real failure was
 * "attempt 2" and it was not run again: the user got one try, not two.
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { DROVER, drover, eventually, processesWith, userEnv } from './helpers/drover.js';

t.test('--retries 1: a job interrupted by SIGINT still gets two real tries on --resume', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const marker = `33.${Math.floor(Math.random() * 1e6)}`;
  const ran = join(cwd, 'ran');
  const flag = join(cwd, 'flag');
  // Until the flag exists the job sleeps (to be interrupted); after, each try records itself and fails.
  const command = ['sh', '-c', `if [ ! -e ${flag} ]; then sleep ${marker}; fi; echo "try $0" >> ${ran}; exit 1`];
  const child = spawn(process.execPath, [DROVER, 'batch', '--retries', '1', '--split', '1', '--sessions', sessions, '--', ...command], { cwd, env: userEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => {
    child.kill('SIGKILL');
    for (const pid of processesWith(`sleep\0${marker}`)) process.kill(pid, 'SIGKILL');
  });
  child.stdin.end('5\n');
  await eventually('job 5 to run', () => processesWith(`sleep\0${marker}`).length === 1, 20_000);
  child.kill('SIGINT');
  t.equal(await exited, EXIT.SIGNAL, stderr);
  const jobsFile = join(sessions, '1', 'jobs.json');
  const interrupted = (JSON.parse(readFileSync(jobsFile, 'utf8')) as { status: string; attempts: number; interrupted?: number }[])[0]!;
  t.match(interrupted, { status: 'pending', attempts: 1, interrupted: 1 }, 'the interrupted attempt is counted as such');

  writeFileSync(flag, '');
  const resumed = await drover(['batch', '--resume', '1', '--sessions', sessions], { cwd, timeoutMs: 20_000 });
  t.equal(resumed.code, EXIT.FAILED, resumed.stderr);
  t.match(resumed.stdout, /^session 1 \(\d+ s\): 0\/1 OK - 0 pending, 0 timeout, 1 errors$/m);
  t.same(readFileSync(ran, 'utf8').trim().split('\n'), ['try 5', 'try 5'], 'the job failed, and ran once more (--retries 1)');
  const job = (JSON.parse(readFileSync(jobsFile, 'utf8')) as { status: string; attempts: number; interrupted?: number }[])[0]!;
  t.match(job, { status: 'failed', attempts: 3, interrupted: 1 });
});
