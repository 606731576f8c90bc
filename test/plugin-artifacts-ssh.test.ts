/**
 * Artifacts over SSH: the transport lists directories and resolves
 * symlinks through SFTP, and a worker on the `ssh` host stores a task's
 * file and directory artifacts from the remote task directory (and refuses
 * a symlink that leads out of it), against a real OpenSSH server.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { text } from 'node:stream/consumers';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import { ProcessEngine } from '../src/engines/process.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import { SshTransport } from '../src/hosts/ssh-transport.js';
import { shippedPlugins } from '../src/plugins/index.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import type { TaskStatus } from '../src/queues/queue.js';
import { silentLogger } from '../src/runtime/logger.js';
import { inProcessWorker } from './helpers/worker.js';
import { runOutcomes } from './helpers/drover.js';
import { requireSshd, sshd } from './helpers/sshd.js';
import { LISTING_LAYOUT, checkListing } from './helpers/transport-listing.js';

if (!requireSshd(t)) process.exit(0);

const server = await sshd(t);
const transport = new SshTransport({ address: server.address, identityFiles: [server.identityFile], knownHostsFile: server.knownHostsFile, agent: false });
t.teardown(() => transport.close());
const home = await transport.home();
const remoteDir = posix.join(home, `drover-artifacts-${randomUUID().slice(0, 8)}`);
t.teardown(() => transport.remove(remoteDir));

t.test('the SSH transport lists a remote directory and resolves symlinks (SFTP)', async (t) => {
  const dir = posix.join(remoteDir, 'listing');
  const made = await transport.run(LISTING_LAYOUT(dir));
  t.equal(made.exitCode, 0, made.stderr);
  await checkListing(t, transport, dir);
});

t.test('a worker on the ssh host stores a file and a directory artifact, and refuses a symlink out', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'drover-artifacts-ssh-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'known_hosts'), `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`);
  const host = new SshHost({
    hosts: [{ address: server.address, capacity: 2 }],
    identityFiles: [server.identityFile],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    killGraceMs: 500,
    workDir: posix.join(remoteDir, 'work'),
    logger: silentLogger,
  });
  const queue = SqliteQueue.open({ dir: join(dir, 'queue'), claimTimeoutMs: 10_000, pollIntervalMs: 50 });
  inProcessWorker(t, {
    workerId: 'ssh-artifacts',
    queue,
    host,
    engine: new ProcessEngine({ killGraceMs: 500, env: { PATH: '/usr/bin:/bin' } }),
    plugins: shippedPlugins(),
    workDir: join(dir, 'work'),
    logger: silentLogger,
    capacity: 2,
  });
  const deadline = Date.now() + 120_000;
  const good = await queue.submit({
    payload: {
      command: 'mkdir -p site/css && echo "<h1>hi</h1>" > site/index.html && echo "h1{}" > site/css/main.css && uname -s > os.txt',
      artifacts: [{ type: 'file', path: 'os.txt', name: 'public/os.txt' }, { type: 'directory', path: 'site', name: 'public/site' }],
    },
    deadline,
    retries: 0,
  });
  const leak = await queue.submit({
    payload: { command: 'echo outside > ../outside.txt && ln -s ../outside.txt out.txt', artifacts: [{ type: 'file', path: 'out.txt', name: 'public/out.txt' }] },
    deadline,
    retries: 0,
  });
  const resolvedTask = async (taskId: string): Promise<TaskStatus> => {
    for (let i = 0; i < 600; i++) {
      const task = await queue.task(taskId);
      if (task.state !== 'pending' && task.state !== 'running') return task;
      await sleep(50);
    }
    throw new Error(`task ${taskId} did not resolve in 30 s`);
  };

  const goodTask = await resolvedTask(good);
  t.same(runOutcomes(goodTask), ['completed'], goodTask.runs[0]?.message ?? '');
  const read = async (name: string) => text(await queue.readArtifact({ taskId: good, runId: 0 }, name));
  t.equal(await read('public/os.txt'), 'Linux\n');
  t.equal(await read('public/site/index.html'), '<h1>hi</h1>\n');
  t.equal(await read('public/site/css/main.css'), 'h1{}\n');
  const types = Object.fromEntries((await queue.listArtifacts({ taskId: good, runId: 0 })).map((info) => [info.name, info.contentType]));
  t.equal(types['public/site/index.html'], 'text/html; charset=utf-8');
  t.equal(types['public/site/css/main.css'], 'text/css; charset=utf-8');

  const leakTask = await resolvedTask(leak);
  t.same(runOutcomes(leakTask), ['failed']);
  t.match(leakTask.runs[0]!.message, 'artifact "public/out.txt": file out.txt resolves (through a symlink) outside the task directory');
  t.notOk((await queue.listArtifacts({ taskId: leak, runId: 0 })).some((info) => info.name === 'public/out.txt'), 'nothing from outside was stored');
});
