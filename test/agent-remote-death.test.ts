/**
 * The remote agent dies (SIGKILL: the OOM killer, an admin) while the SSH
 * connection stays up, against a real OpenSSH server on loopback. Its
 * commands, each in a session of its own, would run on unwatched: the
 * transport kills their groups over a control channel and reports the host
 * lost, so that a run there ends as exception/worker-shutdown and runs
 * again, never as `failed`.
 */
import t from 'tap';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { text } from 'node:stream/consumers';
import { ProcessEngine } from '../src/engines/process.js';
import { isZombie, pidsWithCookie, readProcStat } from '../src/hosts/proc.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { createLogger } from '../src/runtime/logger.js';
import { eventually, runOutcomes } from './helpers/drover.js';
import { cookieFor, remoteDir, remoteWorkDir, requireSshd, sharedHomeDir, sshd, sshTransport, until } from './helpers/sshd.js';
import { inProcessWorker } from './helpers/worker.js';

if (!requireSshd(t)) process.exit(0);

const BASE_ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };

/** The remote agent that started the process `pid` (the test's sshd runs on this machine): its parent, named drover-agent. */
function agentOf(pid: number): number {
  const parent = readProcStat(pid)?.ppid;
  if (parent === undefined) throw new Error(`process ${pid} is gone`);
  const name = readFileSync(`/proc/${parent}/cmdline`, 'utf8').split('\0')[0];
  if (name !== 'drover-agent') throw new Error(`the parent of ${pid} is ${name}, not the agent`);
  return parent;
}

/** Live processes whose environment holds NAME=VALUE exactly. */
function pidsWithEnv(entry: string): number[] {
  const needle = Buffer.from(`${entry}\0`);
  return readdirSync('/proc').filter((name) => /^\d+$/.test(name)).flatMap((name) => {
    try {
      const environ = readFileSync(`/proc/${name}/environ`);
      const at = environ.indexOf(needle);
      if (at < 0 || (at > 0 && environ[at - 1] !== 0)) return [];
      const stat = readProcStat(Number(name));
      return stat !== undefined && !isZombie(stat) ? [Number(name)] : [];
    } catch {
      return [];
    }
  });
}

t.test('the agent is killed (SIGKILL) under a running command: its group is killed, the host is reported lost, the next command starts another agent', async (t) => {
  const server = await sshd(t);
  const transport = sshTransport(t, server);
  const lost: Error[] = [];
  transport.on('lost', (error) => lost.push(error));
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  const running = await transport.exec(['sh', '-c', 'sleep 1000 & sleep 1000; wait'], { cwd: dir, env: BASE_ENV, cookie });
  running.stdout.resume();
  const stderr = text(running.stderr);
  await until('sh and two sleeps', () => pidsWithCookie(cookie).length === 3);
  const agent = agentOf(readProcStat(pidsWithCookie(cookie)[0]!)!.pgrp);
  const killedAt = Date.now();
  process.kill(agent, 'SIGKILL');

  t.same(await running.exited, { exitCode: 255, signal: null }, 'the command ends as on a lost connection');
  t.match(await stderr, /the agent on drover-ssh@127\.0\.0\.1:\d+ stopped while the command ran/, 'its output says why');
  t.equal(lost.length, 1, 'the host is reported lost, once');
  t.match(lost[0]?.message, new RegExp(`^the remote agent on ${server.address.replace(/\./g, '\\.')} stopped \\(signal SIGKILL\\) while 1 command\\(s\\) ran$`), 'naming the host and how the agent ended');
  t.ok(await running.waitGone(10_000), 'waitGone waits for the kill of the group, and sees it gone');
  t.same(pidsWithCookie(cookie), [], 'no process of the command is left');
  t.ok(Date.now() - killedAt < 10_000, `within a bounded time (${Date.now() - killedAt} ms)`);
  t.ok(transport.connected, 'the connection lives on');

  const again = await transport.exec(['echo', 'again'], { cwd: dir, env: BASE_ENV, cookie });
  const [status, stdout] = await Promise.all([again.exited, text(again.stdout), text(again.stderr)]);
  t.same([status, stdout], [{ exitCode: 0, signal: null }, 'again\n'], 'a later command runs');
  t.equal(transport.stats.agentsStarted, 2, 'through a new agent');
  t.equal(transport.stats.connectionsOpened, 1, 'on the same connection');
  t.equal(lost.length, 1, 'nothing more is reported');
});

t.test('a run whose remote agent is killed resolves exception/worker-shutdown, not failed, and runs again on the other host', async (t) => {
  const server = await sshd(t);
  const other = await sshd(t, { identityFile: server.identityFile });
  const dir = t.testdir({});
  writeFileSync(join(dir, 'known_hosts'), [server, other].map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  const logLines: string[] = [];
  const logger = createLogger({ level: 'warn', write: (line) => logLines.push(line) });
  const host = new SshHost({
    hosts: [server, other].map((s) => ({ address: s.address, capacity: 1 })),
    identityFiles: [server.identityFile],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    selection: 'round-robin',
    workDir: remoteWorkDir(t, server.user, 'agent-death'),
    logger,
  });
  const queue = SqliteQueue.open({ dir: join(dir, 'queue'), claimTimeoutMs: 10_000, pollIntervalMs: 50 });
  inProcessWorker(t, {
    workerId: 'agent-death',
    queue,
    host,
    engine: new ProcessEngine({ killGraceMs: 500, env: BASE_ENV }),
    plugins: [],
    workDir: join(dir, 'work'),
    logger,
    capacity: 1,
  });
  const shared = sharedHomeDir(t, server.user, 'agent-death-marker');
  const marker = join(shared.dir, 'first-run');
  const mark = `DROVER_TEST_MARK=${randomUUID()}`;
  // Whatever the test did, nothing of the task outlives it.
  t.teardown(() => {
    for (const pid of pidsWithEnv(mark)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
  const id = await queue.submit({
    payload: {
      command: `if [ -e ${marker} ]; then echo second run; else touch ${marker}; sleep 1000 & sleep 1000; wait; fi`,
      env: { DROVER_TEST_MARK: mark.split('=')[1]! },
    },
    deadline: Date.now() + 120_000,
    retries: 1,
  });
  const [pid] = await eventually('the first run\'s processes', () => (pidsWithEnv(mark).length >= 3 ? pidsWithEnv(mark) : undefined));
  const groups = new Set(pidsWithEnv(mark).map((pid) => readProcStat(pid)?.pgrp));
  const agent = agentOf(readProcStat(pid!)!.pgrp);
  const victim = host.status().find((machine) => machine.running === 1)!.address;
  process.kill(agent, 'SIGKILL');

  const task = await eventually('the task to resolve', async () => {
    const status = await queue.task(id);
    return status.state !== 'pending' && status.state !== 'running' ? status : undefined;
  }, 40_000);
  t.same(runOutcomes(task), ['exception/worker-shutdown', 'completed'], 'the run on the dead agent is re-run, not failed');
  t.match(host.status().find((machine) => machine.address === victim), { state: 'down', error: new RegExp(`the remote agent on ${victim.replace(/\./g, '\\.')} stopped \\(signal SIGKILL\\)`) }, 'its host is down for a while, saying why');
  t.ok(logLines.some((line) => line.includes('the remote agent stopped while commands ran') && line.includes(victim)), 'the worker log names the host');
  t.same(pidsWithEnv(mark), [], 'nothing of the first run is left');
  t.equal(groups.size, 1, 'the first run was one process group');
});
