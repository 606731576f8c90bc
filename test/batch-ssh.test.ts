/**
 * `drover batch --hosts` against three real sshd servers on loopback: 200
 * jobs run over SSH and each job's output lands in the session directory;
 * one host's sshd is killed while it runs two jobs, and every job still
 * completes: the dead host is retired and its two jobs run again on the
 * others. Then --pre, --post and --overlay, and --strikes.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { DROVER, drover, eventually, userEnv } from './helpers/drover.js';
import { requireSshd, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

interface JobLine {
  job: number;
  status: string;
  host: string;
}

const jobsLog = (dir: string): JobLine[] => readFileSync(join(dir, 'jobs.jsonl'), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as JobLine);

/** Three servers that trust one client key, and the environment that makes drover use that key and their host keys. */
async function threeHosts(t: Test, dir: string): Promise<{ servers: TestSshd[]; env: Record<string, string> }> {
  const first = await sshd(t);
  const servers = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  return {
    servers,
    env: {
      DROVER_SSH_IDENTITY_FILE: first.identityFile,
      DROVER_SSH_KNOWN_HOSTS: knownHosts,
      DROVER_SSH_WORK_DIR: `batch-${randomUUID().slice(0, 8)}`,
      SSH_AUTH_SOCK: '',
    },
  };
}

t.test('200 jobs on 3 SSH hosts; one sshd killed mid-batch: every job completes, the dead host is retired', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await threeHosts(t, cwd);
  writeFileSync(join(cwd, 'hosts'), `# the batch's hosts\n${servers.map((s) => s.address).join('\n')}\n`);
  const gate = join(cwd, 'gate');
  // Jobs 100-105 wait for the gate (at most 30 s): once all six run, they hold every slot, two on each host.
  const script = `case $0 in 10[0-5]) i=0; while [ ! -e '${gate}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done;; esac; echo "job $0 done"`;
  const sessions = join(cwd, 'sessions');
  const child = spawn(process.execPath, [DROVER, 'batch', '--hosts', '@hosts', '--split', '6', '--sessions', sessions, '--', 'sh', '-c', script], {
    cwd, env: userEnv(env), stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => child.kill('SIGKILL'));
  child.stdin.end(Array.from({ length: 200 }, (_, i) => `${i + 1}`).join('\n') + '\n');

  const dir = join(sessions, '1');
  const held = await eventually('jobs 100-105 to hold every slot', () => {
    if (!existsSync(join(dir, 'jobs.json'))) return false;
    const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as { n: number; status: string; host?: string }[];
    const waiting = jobs.filter((job) => job.n >= 100 && job.n <= 105 && job.status === 'running' && job.host !== undefined);
    return waiting.length === 6 && waiting;
  }, 60_000);
  const victim = servers[1]!;
  const onVictim = held.filter((job) => job.host === victim.address).map((job) => job.n);
  t.equal(onVictim.length, 2, 'the victim runs two of the waiting jobs');
  t.ok(jobsLog(dir).filter((line) => line.status === 'ok').length >= 99, 'the batch is well under way');
  await victim.crash();
  writeFileSync(gate, '');

  const code = await exited;
  t.equal(code, EXIT.OK, stderr);
  t.match(stdout, /^session 1 \(\d+ s\): 200\/200 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.match(stdout, new RegExp(`host ${victim.address.replace(/\./g, '\\.')} retired: \\d+ jobs ok, 0 failed`), 'the summary names the retired host');
  const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as { n: number; status: string; host: string; lost?: number }[];
  t.same(jobs.map((job) => job.status), Array(200).fill('ok'), 'every job completed');
  let right = 0;
  for (let n = 1; n <= 200; n++) if (readFileSync(join(dir, 'output', `${n}.log`), 'utf8').includes(`job ${n} done\n`)) right++;
  t.equal(right, 200, 'every job\'s own output is in output/N.log');
  const log = jobsLog(dir);
  t.same(log.filter((line) => line.status === 'lost').map((line) => [line.job, line.host]).sort(), onVictim.map((n) => [n, victim.address]).sort(), 'the two jobs on the dead host were lost there...');
  for (const n of onVictim) {
    t.not(jobs[n - 1]!.host, victim.address, `...and job ${n} ran again on another host`);
    t.equal(jobs[n - 1]!.lost, 1);
  }
  t.equal(log.filter((line) => line.status === 'ok').length, 200, 'no job succeeded twice');
  const afterCrash = log.slice(log.findIndex((line) => line.status === 'lost'));
  t.same(afterCrash.filter((line) => line.host === victim.address && line.status === 'ok'), [], 'no job ran on the dead host after it died');
  const hosts = new Set(log.filter((line) => line.status === 'ok').map((line) => line.host));
  t.same([...hosts].sort(), servers.map((s) => s.address).sort(), 'every host ran jobs');
  t.match(readFileSync(join(dir, 'session.log'), 'utf8'), /host retired for the rest of this run/);
});
