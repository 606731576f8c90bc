/**
 * `drover batch --hosts` against three real sshd servers on loopback: 200
 * jobs run over SSH and each job's output lands in the session directory;
 * one host's sshd is killed while it runs two jobs, and every job still
 * completes: the dead host is retired and its two jobs run again on the
 * others. Then --pre, --post and --overlay, and --strikes; SIGINT and
 * --resume; how often the session is written, and what a crash leaves.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { chmodSync, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { runSession } from '../src/batch/run.js';
import { jobsHash, SAVE_DELAY_MS, Session, type SessionParams } from '../src/batch/session.js';
import { EXIT } from '../src/cli/exit-codes.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { DROVER, drover, eventually, processesWith, userEnv } from './helpers/drover.js';
import { homeOf, remoteWorkDir, requireSshd, sharedHomeDir, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

interface JobLine {
  job: number;
  status: string;
  host: string;
}

const jobsLog = (dir: string): JobLine[] => readFileSync(join(dir, 'jobs.jsonl'), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as JobLine);

/** Servers (three by default) that trust one client key, and the environment that makes drover use that key and their host keys. */
async function startHosts(t: Test, dir: string, count = 3): Promise<{ servers: TestSshd[]; env: Record<string, string> }> {
  const first = await sshd(t);
  const servers = [first];
  while (servers.length < count) servers.push(await sshd(t, { identityFile: first.identityFile }));
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  return {
    servers,
    env: {
      DROVER_SSH_IDENTITY_FILE: first.identityFile,
      DROVER_SSH_KNOWN_HOSTS: knownHosts,
      DROVER_SSH_WORK_DIR: remoteWorkDir(t, first.user),
      SSH_AUTH_SOCK: '',
    },
  };
}

t.test('200 jobs on 3 SSH hosts; one sshd killed mid-batch: every job completes, the dead host is retired', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd);
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
  for (const n of onVictim) t.match(stdout, `[${victim.address}] went away during job ${n}, which runs again on another host`, 'the user hears of it as it happens');
});

t.test('ssh.remoteAgent: jobs start from the remote agent by default, and through the shell wrapper when it is false', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd, 1);
  // The job's ancestors, nearest first: the agent names itself drover-agent; the wrapper has no such process.
  const parent = `p=$PPID; for i in 1 2 3 4; do printf 'ancestor: '; tr '\\0' ' ' < /proc/$p/cmdline; echo; p=$(cut -d' ' -f4 /proc/$p/stat); done`;
  for (const [setting, expected] of [[undefined, true], ['false', false], ['true', true]] as const) {
    const sessions = `sessions-${setting ?? 'default'}`;
    const result = await drover(['batch', '--hosts', servers[0]!.address, '--split', '2', '--sessions', sessions, '--', 'sh', '-c', parent], {
      cwd, env: { ...env, ...(setting === undefined ? {} : { DROVER_SSH_REMOTE_AGENT: setting }) }, input: '1\n2\n', timeoutMs: 60_000,
    });
    t.equal(result.code, EXIT.OK, result.stderr);
    for (const n of [1, 2]) {
      const ancestors = readFileSync(join(cwd, sessions, '1', 'output', `${n}.log`), 'utf8').split('\n').filter((line) => line.startsWith('ancestor: '));
      t.equal(ancestors.length, 4, `job ${n} listed its ancestors`);
      t.equal(ancestors.some((line) => line.startsWith('ancestor: drover-agent')), expected, `DROVER_SSH_REMOTE_AGENT=${setting ?? '(unset)'}: job ${n}'s ancestors ${JSON.stringify(ancestors)}`);
    }
  }
  const refused = await drover(['batch', '--hosts', servers[0]!.address, '--', 'true'], { cwd, env: { ...env, DROVER_SSH_REMOTE_AGENT: 'maybe' }, input: '1\n', timeoutMs: 60_000 });
  t.equal(refused.code, EXIT.CONFIG);
  t.match(refused.stderr, 'environment variable DROVER_SSH_REMOTE_AGENT: must be true or false, not "maybe"');
});

t.test('--overlay, --pre and --post on SSH hosts: set-up before a host\'s first job, clean-up after its last; a failed --pre retires the host', async (t) => {
  const uniq = `overlay-${randomUUID().slice(0, 8)}`;
  const cwd = t.testdir({ overlay: { [uniq]: { 'tool.sh': `#!/bin/sh\necho "job $1" >> "$HOME/${uniq}/events"\necho "tool says $1"\n` } } });
  chmodSync(join(cwd, 'overlay', uniq, 'tool.sh'), 0o755);
  const { servers, env } = await startHosts(t, cwd);
  const home = homeOf(servers[0]!.user);
  t.teardown(() => rmSync(join(home, uniq), { recursive: true, force: true }));
  const bad = servers[2]!;
  const port = '${SSH_CONNECTION##* }';
  const result = await drover([
    'batch', '--hosts', servers.map((s) => s.address).join(','), '--split', '4', '--sessions', 'sessions', '--overlay', 'overlay',
    '--pre', `echo "pre ${port}" >> ~/${uniq}/events; test "${port}" != ${bad.port}`,
    '--post', `echo "post ${port}" >> ~/${uniq}/events`,
    '--', 'sh', '-c', `~/${uniq}/tool.sh "$0"`,
  ], { cwd, env, input: Array.from({ length: 12 }, (_, i) => `${i + 1}`).join('\n') + '\n', timeoutMs: 60_000 });
  t.equal(result.code, EXIT.OK, result.stderr);
  t.match(result.stdout, /^session 1 \(\d+ s\): 12\/12 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.match(result.stdout, new RegExp(`host ${bad.address.replace(/\./g, '\\.')} retired: 0 jobs ok`), 'the host whose --pre failed is retired');
  const dir = join(cwd, 'sessions', '1');
  for (let n = 1; n <= 12; n++) t.match(readFileSync(join(dir, 'output', `${n}.log`), 'utf8'), `tool says ${n}\n`, `job ${n} ran the overlay's tool`);
  const events = readFileSync(join(home, uniq, 'events'), 'utf8').trim().split('\n');
  t.same(events.filter((e) => e.startsWith('pre ')).sort(), servers.map((s) => `pre ${s.port}`).sort(), '--pre ran once on every host');
  t.same(events.filter((e) => e.startsWith('post ')).sort(), servers.slice(0, 2).map((s) => `post ${s.port}`).sort(), '--post ran once on every host that was set up, not on the retired one');
  t.same(events.filter((e) => e.startsWith('job ')).sort(), Array.from({ length: 12 }, (_, i) => `job ${i + 1}`).sort(), 'every job ran once');
  const jobs = JSON.parse(readFileSync(join(dir, 'jobs.json'), 'utf8')) as { n: number; host: string }[];
  for (const job of jobs) {
    const on = servers.find((s) => s.address === job.host)!;
    t.not(on, bad, `job ${job.n} did not run on the host whose --pre failed`);
    const at = events.indexOf(`job ${job.n}`);
    t.ok(events.indexOf(`pre ${on.port}`) < at && at < events.indexOf(`post ${on.port}`), `job ${job.n} ran after its host's --pre and before its --post`);
  }
  t.match(readFileSync(join(dir, 'session.log'), 'utf8'), `[${bad.address}] --pre:`);
});

t.test('--strikes 2: a host whose jobs fail twice in a row is retired; the failed jobs run again elsewhere', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd);
  const victim = servers[0]!;
  const result = await drover([
    'batch', '--hosts', servers.map((s) => s.address).join(','), '--split', '3', '--strikes', '2', '--retries', '2', '--sessions', 'sessions',
    '--', 'sh', '-c', `test "$DROVER_HOST" != '${victim.address}' && echo "job $0 on $DROVER_HOST"`,
  ], { cwd, env, input: Array.from({ length: 20 }, (_, i) => `${i + 1}`).join('\n') + '\n', timeoutMs: 60_000 });
  t.equal(result.code, EXIT.OK, result.stderr);
  t.match(result.stdout, /^session 1 \(\d+ s\): 20\/20 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.match(result.stdout, new RegExp(`host ${victim.address.replace(/\./g, '\\.')} retired: 0 jobs ok, 2 failed`));
  const log = jobsLog(join(cwd, 'sessions', '1'));
  t.same(log.filter((line) => line.status === 'failed').map((line) => line.host), [victim.address, victim.address], 'two failures in a row, then no job ran there');
  t.equal(log.filter((line) => line.status === 'ok').length, 20);
  t.notOk(log.some((line) => line.status === 'ok' && line.host === victim.address));
  t.match(readFileSync(join(cwd, 'sessions', '1', 'session.log'), 'utf8'), 'retired: 2 jobs in a row failed (--strikes 2)');
});

t.test('SIGINT over SSH kills the remote jobs and saves the session; --resume then runs every job exactly once', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd, 2);
  const hosts = servers.slice(0, 2).map((s) => s.address).join(',');
  const { name: uniq, dir: shared } = sharedHomeDir(t, servers[0]!.user, 'sigint');
  const marker = `29.${Math.floor(Math.random() * 1e6)}`;
  // Jobs 1 and 2 sleep (with a marker to find them by) until the flag exists; every job records that it finished.
  const command = ['sh', '-c', `if [ "$0" -le 2 ] && [ ! -e ~/${uniq}/flag ]; then sleep ${marker}; fi; echo "done $0" >> ~/${uniq}/done`];
  const sessions = join(cwd, 'sessions');
  const child = spawn(process.execPath, [DROVER, 'batch', '--hosts', hosts, '--sessions', sessions, '--', ...command], { cwd, env: userEnv(env), stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => child.kill('SIGKILL'));
  child.stdin.end('1\n2\n3\n4\n5\n6\n');
  await eventually('jobs 1 and 2 to sleep on the hosts', () => processesWith(`sleep\0${marker}`).length === 2, 30_000);
  child.kill('SIGINT');
  t.equal(await exited, EXIT.SIGNAL, stderr);
  t.match(stderr, /interrupted by SIGINT; the session is saved\. Resume it with: drover batch --resume 1/);
  await eventually('the remote jobs to be gone', () => processesWith(`sleep\0${marker}`).length === 0, 15_000);
  t.pass('no remote job process is left');
  const saved = JSON.parse(readFileSync(join(sessions, '1', 'jobs.json'), 'utf8')) as { n: number; status: string }[];
  t.same(saved.map((job) => job.status), Array(6).fill('pending'), 'the killed jobs (and those that never started) are pending');
  t.notOk(existsSync(join(shared, 'done')), 'no job finished');

  writeFileSync(join(shared, 'flag'), '');
  const resumed = await drover(['batch', '--resume', '1', '--sessions', sessions], { cwd, env, timeoutMs: 60_000 });
  t.equal(resumed.code, EXIT.OK, resumed.stderr);
  t.match(resumed.stdout, /^session 1 \(\d+ s\): 6\/6 OK - 0 pending, 0 timeout, 0 errors$/m);
  t.same(readFileSync(join(shared, 'done'), 'utf8').trim().split('\n').sort(), ['done 1', 'done 2', 'done 3', 'done 4', 'done 5', 'done 6'], 'every job ran exactly once in total, on the session\'s hosts');
});

t.test('--timeout over SSH kills the remote job\'s whole process group', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd, 1);
  const marker = `38.${Math.floor(Math.random() * 1e6)}`;
  // The job leaves a background child behind; the process group kill must take it too.
  const result = await drover(['batch', '--hosts', servers[0]!.address, '--timeout', '1', '--sessions', 'sessions', '--', 'sh', '-c', `(sleep ${marker}) & sleep ${marker}`], { cwd, env, input: 'x\n', timeoutMs: 60_000 });
  t.equal(result.code, EXIT.FAILED, result.stderr);
  t.match(result.stdout, /^session 1 \(\d+ s\): 0\/1 OK - 0 pending, 1 timeout, 0 errors$/m);
  t.same(jobsLog(join(cwd, 'sessions', '1')).map((line) => [line.status, line.host]), [['timeout', servers[0]!.address]]);
  await eventually('no process of the timed-out job to be left', () => processesWith(`sleep\0${marker}`).length === 0, 10_000);
  t.pass('the background child went with the job');
});

t.test('a batch over SSH: jobs.json is rewritten a few times a second, not three times per job; no task directory is left on the host', async (t) => {
  const cwd = t.testdir({});
  const { servers, env } = await startHosts(t, cwd, 1);
  const server = servers[0]!;
  const lines = Array.from({ length: 60 }, (_, i) => String(i + 1));
  const params: SessionParams = { command: ['true'], split: 4, retries: 0, hosts: [{ address: server.address }], created: new Date().toISOString(), jobsHash: jobsHash(lines) };
  const session = Session.create(join(cwd, 'sessions'), params, lines.map((line, i) => ({ n: i + 1, line, command: `true ${line}`, status: 'pending', attempts: 0 })));
  const saved = session.saves;
  const outcome = await runSession(session, { ssh: { identityFiles: [env.DROVER_SSH_IDENTITY_FILE!], knownHostsFile: env.DROVER_SSH_KNOWN_HOSTS!, agent: false, workDir: env.DROVER_SSH_WORK_DIR! } });
  t.same(outcome.counts, { pending: 0, running: 0, ok: 60, failed: 0, timeout: 0 });
  const saves = session.saves - saved;
  const bound = 2 + Math.ceil(outcome.elapsedMs / SAVE_DELAY_MS);
  t.ok(saves <= bound, `${saves} writes of jobs.json for 60 jobs in ${outcome.elapsedMs} ms (at most ${bound}; it was 3 per job)`);
  t.same(Session.open(join(cwd, 'sessions'), String(session.id)).counts(), outcome.counts, 'what was written at the end is the outcome');
  const tasks = join(homeOf(server.user), env.DROVER_SSH_WORK_DIR!, 'tasks');
  t.same(existsSync(tasks) ? readdirSync(tasks) : [], [], 'every task directory was removed, the last ones when the host was closed');
});

t.test('a crash between a job\'s end and the next rewrite of jobs.json: --resume does not run that job again', async (t) => {
  const cwd = t.testdir({});
  const lines = ['a', 'b', 'c'];
  const params: SessionParams = { command: ['true'], split: 2, retries: 0, created: new Date().toISOString(), jobsHash: jobsHash(lines) };
  const session = Session.create(join(cwd, 'sessions'), params, lines.map((line, i) => ({ n: i + 1, line, command: `true ${line}`, status: 'pending', attempts: 0 })));
  // As the crashed batch left it: job 1 ended ok and job 2 failed (both logged), job 3 ran; jobs.json still says running.
  for (const job of session.jobs) Object.assign(job, { status: 'running', attempts: 1, slot: job.n, host: 'localhost' });
  session.save();
  const logged = (n: number, status: string) => JSON.stringify({ job: n, attempt: 1, status, slot: n, host: 'localhost', start: '2026-01-01T00:00:00.000Z', durationMs: 12, exitCode: status === 'ok' ? 0 : 1, signal: null, line: lines[n - 1] });
  writeFileSync(join(session.dir, 'jobs.jsonl'), `${logged(1, 'ok')}\n${logged(2, 'failed')}\n{"job":3,"attem`);
  const reopened = Session.open(join(cwd, 'sessions'), String(session.id));
  t.match(reopened.jobs[0], { status: 'ok', attempts: 1, exitCode: 0, durationMs: 12, host: 'localhost' }, 'the job logged ok is done');
  t.equal(reopened.jobs[1]!.status, 'running', 'a failed attempt is left to the resume (it may be retried)');
  t.equal(reopened.jobs[2]!.status, 'running', 'a line cut short by the crash is ignored');
});
