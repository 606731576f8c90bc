/**
 * Regression: a SIGTERM (or Ctrl-C) that comes while a local --pre runs
 * stops the batch. It used to be lost: the batch's abort listener was only
 * added after --pre, and a listener added to an aborted signal never
 * fires, so every job ran after --pre and the batch exited 0.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { DROVER, eventually, processesWith, userEnv } from './helpers/drover.js';

t.test('SIGTERM during a local --pre: exit 4 at once, says how to resume, no job ran, --pre is stopped', async (t) => {
  const cwd = t.testdir({});
  const sessions = join(cwd, 'sessions');
  const marker = `30.${Math.floor(Math.random() * 1e6)}`;
  const child = spawn(process.execPath, [DROVER, 'batch', '--pre', `sleep ${marker}`, '--sessions', sessions, '--', 'echo'], { cwd, env: userEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => {
    child.kill('SIGKILL');
    for (const pid of processesWith(`sleep\0${marker}`)) process.kill(pid, 'SIGKILL');
  });
  child.stdin.end(Array.from({ length: 100 }, (_, i) => `${i + 1}`).join('\n') + '\n');
  await eventually('--pre to run', () => processesWith(`sleep\0${marker}`).length === 1, 20_000);

  const sent = Date.now();
  child.kill('SIGTERM');
  const code = await Promise.race([exited, new Promise<'late'>((resolve) => setTimeout(() => resolve('late'), 10_000).unref())]);
  t.equal(code, EXIT.SIGNAL, `exit 4 (${stderr})`);
  t.ok(Date.now() - sent < 10_000, `drover exited ${Date.now() - sent} ms after the signal, not after --pre's 30 s`);
  t.match(stderr, /interrupted by SIGTERM; the session is saved\. Resume it with: drover batch --resume 1/);
  t.match(stdout, /^session 1 \(\d+ s\): 0\/100 OK - 100 pending, 0 timeout, 0 errors$/m);
  const dir = join(sessions, '1');
  const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as { status: string; attempts: number }[];
  t.same(jobs.map((job) => job.status), Array(100).fill('pending'), 'every job is pending');
  t.same(jobs.filter((job) => job.attempts > 0), [], 'no job was attempted');
  t.same(readdirSync(join(dir, 'output')), [], 'no job wrote output');
  t.notOk(existsSync(join(dir, 'jobs.jsonl')) && readFileSync(join(dir, 'jobs.jsonl'), 'utf8').trim() !== '', 'no job finished');
  await eventually('--pre to be stopped', () => processesWith(`sleep\0${marker}`).length === 0, 5000);
  t.pass('the --pre command is gone');
});
