/**
 * A worker on the `ssh` host, in process, against three real sshd servers
 * and one address where nothing listens: the unreachable host is reported
 * and skipped; scripts run remotely with env and DEPS/; when one sshd is
 * killed (with its session processes) mid-task, its runs resolve
 * exception/worker-shutdown and run again, and complete, on the others; the
 * dead host is marked down, and none of its task processes survive.
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { ScriptEngine } from '../src/engines/script.js';
import { isZombie, readProcStat } from '../src/hosts/proc.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import { livelogPlugin, LIVE_LOG_NAME } from '../src/plugins/livelog.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { createLogger } from '../src/runtime/logger.js';
import { inProcessWorker } from './helpers/worker.js';
import { remoteWorkDir, requireSshd, sshd } from './helpers/sshd.js';
import { runOutcomes } from './helpers/drover.js';

if (!requireSshd(t)) process.exit(0);

/** Live processes whose environment holds NAME=VALUE exactly. */
function pidsWithEnv(entry: string): number[] {
  const needle = Buffer.from(`${entry}\0`);
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const environ = readFileSync(`/proc/${name}/environ`);
      const at = environ.indexOf(needle);
      if (at < 0 || (at > 0 && environ[at - 1] !== 0)) continue;
      const stat = readProcStat(Number(name));
      if (stat !== undefined && !isZombie(stat)) pids.push(Number(name));
    } catch {
      // gone
    }
  }
  return pids;
}

async function eventually<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

async function text(stream: NodeJS.ReadableStream): Promise<string> {
  let out = '';
  for await (const chunk of stream) out += String(chunk);
  return out;
}

t.test('a worker on three SSH hosts: one unreachable, one killed mid-task; every task completes', async (t) => {
  const first = await sshd(t);
  const servers = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
  const nowhere = await sshd(t, { identityFile: first.identityFile });
  const nowherePort = nowhere.port;
  await nowhere.stop();

  const dir = mkdtempSync(join(tmpdir(), 'drover-ssh-host-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'known_hosts'), servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  writeFileSync(join(dir, 'words.txt'), 'one\ntwo\nthree\n');
  const logLines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => logLines.push(line) });
  const host = new SshHost({
    hosts: [...servers.map((s) => ({ address: s.address, capacity: 2 })), { address: `${first.user}@127.0.0.1:${nowherePort}`, capacity: 2 }],
    identityFiles: [first.identityFile],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    selection: 'least-loaded',
    killGraceMs: 500,
    probationMs: 60_000,
    workDir: remoteWorkDir(t, first.user, 'work'),
    logger,
  });
  t.equal(host.capacity, 8, 'the worker\'s capacity is the sum of the hosts\'');
  const queue = SqliteQueue.open({ dir: join(dir, 'queue'), claimTimeoutMs: 10_000, pollIntervalMs: 50 });
  const worker = inProcessWorker(t, {
    workerId: 'ssh-worker',
    queue,
    host,
    engine: new ScriptEngine({ killGraceMs: 500, env: { PATH: '/usr/bin:/bin' } }),
    plugins: [livelogPlugin()],
    workDir: join(dir, 'work'),
    logger,
    capacity: host.capacity,
  });

  const mark = `DROVER_TEST_MARK=${randomUUID()}`;
  const ids = await Promise.all(Array.from({ length: 6 }, (_, i) => queue.submit({
    payload: {
      name: 'job',
      script: ['#!/bin/sh', 'echo "task $N: $(wc -l < DEPS/words.txt) words"', 'sleep 2', 'echo "task $N done"'],
      deps: [join(dir, 'words.txt')],
      env: { N: String(i), DROVER_TEST_MARK: mark.split('=')[1]! },
    },
    deadline: Date.now() + 120_000,
    retries: 2,
  })));

  const unreachable = await eventually('the unreachable host to be reported', () => host.status().find((m) => m.state !== 'up'));
  t.match(unreachable, { address: `${first.user}@127.0.0.1:${nowherePort}`, state: 'down', error: /connection refused/ });
  await eventually('the log to name the unreachable host', () => logLines.some((line) => line.includes('ssh host unreachable; going on without it') && line.includes(String(nowherePort))));
  t.pass('the log says so, naming the host');

  // Every reachable host runs two tasks; kill the second one's sshd with its session processes.
  await eventually('two remote scripts on every host', () => pidsWithEnv(mark).length >= 6 * 2 && host.status().slice(0, 3).every((m) => m.running === 2));
  const victim = servers[1]!;
  await victim.crash();

  await eventually('the killed host to be marked down', () => host.status()[1]!.state === 'down');
  t.match(host.status()[1], { address: victim.address, state: 'down', error: new RegExp(`connection to ${victim.address.replace(/\./g, '\\.')} was lost`) });

  const tasks = await eventually('every task to resolve', async () => {
    const all = await Promise.all(ids.map((id) => queue.task(id)));
    return all.every((task) => task.state !== 'pending' && task.state !== 'running') && all;
  }, 40_000);
  const outcomes = tasks.map((task) => runOutcomes(task));
  t.same(outcomes.filter((o) => o.length === 2), [['exception/worker-shutdown', 'completed'], ['exception/worker-shutdown', 'completed']], 'the two runs on the dead host ran again and completed');
  t.equal(outcomes.filter((o) => o.length === 1 && o[0] === 'completed').length, 4, 'the other four completed at once');

  for (const task of tasks) {
    const last = task.runs.length - 1;
    const log = await text(await queue.readArtifact({ taskId: task.taskId, runId: last }, LIVE_LOG_NAME));
    const n = (task.payload['env'] as Record<string, string>)['N'];
    t.match(log, `task ${n}: 3 words\n`, 'env and DEPS/ reached the script');
    t.match(log, `task ${n} done\n`);
    t.notMatch(log, victim.address, 'the last run ran on a live host');
    if (last === 1) {
      const first = await text(await queue.readArtifact({ taskId: task.taskId, runId: 0 }, LIVE_LOG_NAME));
      t.match(first, `[drover] running on ${victim.address}`);
      t.match(first, /went down.*stopping the run so that it runs again elsewhere/);
    }
  }
  await eventually('no task process of the dead host to survive', () => pidsWithEnv(mark).length === 0, 10_000);
  t.pass('no remote task process is left');
  t.match(worker.state(), /^claiming/, 'the worker keeps running');
});

t.test('drover worker over SSH: --ssh-hosts-file, --engine script, a task submitted with drover submit; ssh.remoteAgent', async (t) => {
  const server = await sshd(t);
  // The script's ancestors, nearest first: the remote agent names itself drover-agent.
  const ancestors = `p=$PPID; for i in 1 2 3 4; do printf "ancestor: "; tr "\\000" " " < /proc/$p/cmdline; echo; p=$(cut -d" " -f4 /proc/$p/stat); done`;
  const cwd = t.testdir({
    'hosts': `# build machines\n${server.address} capacity=2 labels=linux\n`,
    'job.yaml': `name: hello\nscript:\n  - '#!/bin/sh'\n  - 'echo "hello from $(pwd | sed s,.*/tasks/.*,task-dir,) $WHO"'\n  - '${ancestors}'\nenv:\n  WHO: ssh\nhostLabels: [linux]\n`,
  });
  const { drover, resolved, runOutcomes: outcomes, startWorker: startWorkerProcess } = await import('./helpers/drover.js');
  const id = (await drover(['submit', '--payload', 'job.yaml'], { cwd })).stdout.trim();
  const env = {
    DROVER_SSH_HOSTS_FILE: join(cwd, 'hosts'),
    DROVER_SSH_IDENTITY_FILE: server.identityFile,
    DROVER_SSH_KNOWN_HOSTS: server.knownHostsFile,
    DROVER_SSH_WORK_DIR: remoteWorkDir(t, server.user, 'cli'),
    DROVER_ENGINE: 'script',
    SSH_AUTH_SOCK: '',
  };
  const worker = startWorkerProcess(['--once'], { cwd, env });
  t.equal(await worker.exited, 0, 'the worker ran the task and exited', { log: worker.log() });
  const task = await resolved(join(cwd, '.drover'), id);
  t.same(outcomes(task), ['completed']);
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, `[drover] running on ${server.address}`);
  t.match(logs.stdout, 'hello from task-dir ssh\n');
  t.match(logs.stdout, /\nancestor: drover-agent/, 'the remote agent started it');
  t.match(worker.log(), /ssh host up .*capacity=2/);

  // ssh.remoteAgent false: the same task through the shell wrapper.
  const again = (await drover(['submit', '--payload', 'job.yaml'], { cwd })).stdout.trim();
  const wrapped = startWorkerProcess(['--once'], { cwd, env: { ...env, DROVER_SSH_REMOTE_AGENT: 'false' } });
  t.equal(await wrapped.exited, 0, 'the worker ran it through the wrapper', { log: wrapped.log() });
  const wrappedLogs = (await drover(['logs', again], { cwd })).stdout;
  t.match(wrappedLogs, 'hello from task-dir ssh\n');
  t.equal(wrappedLogs.split('\n').filter((line) => line.startsWith('ancestor: ')).length, 4, 'its ancestors were listed');
  t.notMatch(wrappedLogs, /ancestor: drover-agent/, 'and no agent was among them');

  const unknownKey = await drover(['worker', '--once'], { cwd, env: { ...env, DROVER_SSH_KNOWN_HOSTS: join(cwd, 'empty_known_hosts') } });
  t.not(unknownKey.code, 0, 'no host can be trusted: the worker stops');
  t.match(unknownKey.stderr, new RegExp(`host key of ${server.address.replace(/\./g, '\\.')} \\(ssh-ed25519 SHA256:[^)]+\\) is not in`));
});
