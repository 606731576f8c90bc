/**
 * Regression: `drover batch --resume N` (or --retry N) of a session that
 * another drover still runs is refused, naming the session and the pid
 * that runs it. It used to reset the running jobs to pending, delete the
 * live session's queue and run those jobs a second time. A lock left by a
 * drover that is gone is taken over.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { DROVER, drover, eventually, processesWith, userEnv } from './helpers/drover.js';

/** A pid no process has any more (its process ran and was reaped). */
async function deadPid(): Promise<number> {
  const child = spawn('true');
  await new Promise((resolve) => child.once('exit', resolve));
  return child.pid!;
}

t.test('--resume and --retry of a running session are refused; every job runs once; a dead owner\'s lock is taken over', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const marker = `32.${Math.floor(Math.random() * 1e6)}`;
  const ran = join(cwd, 'ran');
  const flag = join(cwd, 'flag');
  // Each job records that it ran, then sleeps (found by the marker) until the flag exists.
  const command = ['sh', '-c', `echo "$0" >> ${ran}; while [ ! -e ${flag} ]; do sleep ${marker}; done; true`];
  const child = spawn(process.execPath, [DROVER, 'batch', '--split', '2', '--sessions', sessions, '--', ...command], { cwd, env: userEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const wakeJobs = () => {
    for (const pid of processesWith(`sleep\0${marker}`)) process.kill(pid, 'SIGKILL');
  };
  t.teardown(() => {
    child.kill('SIGKILL');
    wakeJobs();
  });
  child.stdin.end('1\n2\n3\n');
  await eventually('jobs 1 and 2 to run', () => processesWith(`sleep\0${marker}`).length === 2, 20_000);

  for (const option of ['--resume', '--retry']) {
    const again = await drover(['batch', option, '1', '--sessions', sessions], { cwd, timeoutMs: 15_000 });
    t.not(again.code, EXIT.OK, `${option}: refused`);
    t.equal(again.code, EXIT.CONFIG, `${option}: exit 2`);
    t.match(again.stderr, new RegExp(`^drover batch: session 1 is running \\(pid ${child.pid}, since [^)]+\\): resuming it now would run its jobs twice; wait for it to end, or stop it first \\(lock file ${join(sessions, '1', 'lock').replace(/[.]/g, '\\.')}\\)$`, 'm'), `${option}: says which session runs, and where`);
  }
  t.same(readFileSync(ran, 'utf8').trim().split('\n').sort(), ['1', '2'], 'no job started a second time');
  t.equal(processesWith(`sleep\0${marker}`).length, 2, 'the running jobs were left alone');

  writeFileSync(flag, '');
  wakeJobs();
  t.equal(await exited, EXIT.OK, stderr);
  t.same(readFileSync(ran, 'utf8').trim().split('\n').sort(), ['1', '2', '3'], 'every job ran exactly once');
  t.notOk(existsSync(join(sessions, '1', 'lock')), 'the lock is gone with the batch');

  // A drover that was killed leaves its lock behind: the next resume takes it over.
  const lock = join(sessions, '1', 'lock');
  writeFileSync(lock, JSON.stringify({ pid: await deadPid(), host: hostname(), since: new Date().toISOString() }) + '\n');
  const resumed = await drover(['batch', '--retry', '1', '--sessions', sessions], { cwd, timeoutMs: 15_000 });
  t.equal(resumed.code, EXIT.OK, resumed.stderr);
  t.match(resumed.stdout, /^session 1 \(\d+ s\): 3\/3 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.notOk(existsSync(lock), 'the taken-over lock is released at the end');
  t.same(readFileSync(ran, 'utf8').trim().split('\n').sort(), ['1', '2', '3'], 'nothing ran again');
});
