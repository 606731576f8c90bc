/**
 * Regression: the open cloud sessions are one registry per user on the
 * machine (DROVER_CLOUD_SESSIONS, ~/.drover/cloud-sessions), not one per
 * working directory. A `drover batch --provider aws` runs in one
 * directory; `drover instances --cleanup` run from another directory must
 * see its instance as live and leave it alone (it used to terminate it:
 * its session was not in *that* directory's .drover/cloud-sessions). A
 * session an earlier drover recorded in QUEUE-DIR/cloud-sessions is still
 * read there.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { ownerId, SessionRegistry } from '../src/cloud/sessions.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { CLOUDS } from './helpers/clouds.js';
import { DROVER, drover, eventually, processesWith, userEnv } from './helpers/drover.js';
import { remoteWorkDir, requireSshd, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

/** A batch's environment for `dir`: the local EC2 endpoint, the sshd's keys, and a registry of open sessions of the test's own. */
function batchEnv(t: Test, dir: string, server: TestSshd, endpoint: string, knownHosts: string): Record<string, string> {
  return {
    ...dummyCloudCredentials(dir),
    DROVER_AWS_ENDPOINT: endpoint,
    DROVER_CLOUD_SESSIONS: join(dir, 'cloud-sessions'),
    DROVER_SSH_IDENTITY_FILE: server.identityFile,
    DROVER_SSH_KNOWN_HOSTS: knownHosts,
    DROVER_SSH_WORK_DIR: remoteWorkDir(t, server.user),
    SSH_AUTH_SOCK: '',
  };
}


/** `drover batch --provider aws --split 1` in `cwd`, its one job a `sleep` of a marker found with processesWith(`sleep\0MARKER`). */
function sleepingBatch(t: Test, cwd: string, sessions: string, server: TestSshd, env: Record<string, string>) {
  const marker = `${Math.floor(Math.random() * 1e6)}.5`;
  const args = ['batch', '--provider', 'aws', '--instance-type', 't3.micro', '--image', 'ami-0123456789abcdef0', '--ssh-user', server.user, '--split', '1', '--sessions', sessions, '--', 'sleep'];
  const child = spawn(process.execPath, [DROVER, ...args], { cwd, env: userEnv(env), stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => child.kill('SIGKILL'));
  child.stdin.end(`${marker}\n`);
  return { child, marker, exited, stderr: () => stderr };
}

t.test('drover instances --cleanup from another directory leaves a running batch\'s instance alone', async (t) => {
  const base = t.testdir({ batch: {}, elsewhere: {} });
  const server = await sshd(t);
  const cloud = await CLOUDS.aws(t, [server.port]);
  const knownHosts = join(base, 'known_hosts');
  writeFileSync(knownHosts, `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`);
  // No DROVER_QUEUE_DIR: each directory has its own .drover, as for a user.
  const env = batchEnv(t, base, server, cloud.endpoint.url, knownHosts);
  const { child, marker, exited, stderr } = sleepingBatch(t, join(base, 'batch'), join(base, 'sessions'), server, env);
  await eventually('the job to sleep on the instance', () => processesWith(`sleep\0${marker}`).length === 1, 30_000);
  t.equal(cloud.alive().length, 1, 'the batch\'s instance runs');

  const elsewhere = join(base, 'elsewhere');
  const listed = await drover(['instances', '--provider', 'aws'], { cwd: elsewhere, env });
  t.equal(listed.code, EXIT.OK, listed.stderr);
  t.match(listed.stdout, /live: session batch-1-\S+ of \S+ is open/, 'listed from another directory, the instance is live');
  const cleaned = await drover(['instances', '--provider', 'aws', '--cleanup'], { cwd: elsewhere, env });
  t.equal(cleaned.code, EXIT.OK, cleaned.stderr);
  t.match(cleaned.stdout, /^0 terminated, 0 failed, 1 left alone/m);
  t.equal(cloud.count(cloud.terminateCall), 0, 'nothing was terminated');
  t.equal(cloud.alive().length, 1, 'the batch\'s instance still runs');
  t.equal(processesWith(`sleep\0${marker}`).length, 1, 'and so does its job');

  child.kill('SIGINT');
  t.equal(await exited, EXIT.SIGNAL, stderr());
  await eventually('the instance to be terminated', () => cloud.alive().length === 0, 10_000);
});

t.test('a session recorded in QUEUE-DIR/cloud-sessions (by an earlier drover) is still read there', async (t) => {
  const cwd = t.testdir({});
  const cloud = await CLOUDS.aws(t, []);
  Object.assign(process.env, dummyCloudCredentials(cwd));
  const legacy = join(cwd, '.drover', 'cloud-sessions');
  mkdirSync(legacy, { recursive: true });
  new SessionRegistry(legacy).open({ session: 'old-session', owner: ownerId(), provider: 'aws' });
  const live = await cloud.provider.launch({ image: 'ami-1', instanceType: 't3.micro', session: 'old-session', owner: ownerId(), token: 'old-1' });
  const over = await cloud.provider.launch({ image: 'ami-1', instanceType: 't3.micro', session: 'gone-session', owner: ownerId(), token: 'old-2' });
  const env = { ...dummyCloudCredentials(cwd), DROVER_AWS_ENDPOINT: cloud.endpoint.url, DROVER_CLOUD_SESSIONS: join(cwd, 'cloud-sessions') };
  const cleaned = await drover(['instances', '--provider', 'aws', '--cleanup'], { cwd, env });
  t.equal(cleaned.code, EXIT.OK, cleaned.stderr);
  t.match(cleaned.stdout, new RegExp(`terminated ${over.id} \\(its session gone-session is over\\)`));
  t.notMatch(cleaned.stdout, new RegExp(`terminated ${live.id}`), 'the legacy session\'s instance is live');
  t.match(cleaned.stdout, /^1 terminated, 0 failed, 1 left alone/m);
});

t.test('a batch\'s own watchdog reads QUEUE-DIR/cloud-sessions too, as drover instances does: the instance of a session recorded there is left alone', async (t) => {
  const cwd = t.testdir({});
  const server = await sshd(t);
  // The first two launches are the earlier drover's; the batch's instance is the third.
  const cloud = await CLOUDS.aws(t, [server.port, server.port, server.port]);
  Object.assign(process.env, dummyCloudCredentials(cwd));
  const legacy = join(cwd, '.drover', 'cloud-sessions');
  mkdirSync(legacy, { recursive: true });
  new SessionRegistry(legacy).open({ session: 'old-session', owner: ownerId(), provider: 'aws' });
  const live = await cloud.provider.launch({ image: 'ami-1', instanceType: 't3.micro', session: 'old-session', owner: ownerId(), token: 'old-1' });
  const over = await cloud.provider.launch({ image: 'ami-1', instanceType: 't3.micro', session: 'gone-session', owner: ownerId(), token: 'old-2' });
  const alive = (id: string) => (cloud.alive() as { id: string }[]).some((instance) => instance.id === id);
  const knownHosts = join(cwd, 'known_hosts');
  writeFileSync(knownHosts, `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`);
  // No DROVER_QUEUE_DIR: the batch's queue directory is ./.drover, where the earlier drover recorded its session.
  const env = batchEnv(t, cwd, server, cloud.endpoint.url, knownHosts);
  const { child, marker, exited, stderr } = sleepingBatch(t, cwd, join(cwd, 'sessions'), server, env);
  // The batch's watchdog sweeps as the batch starts: the gone session's instance is a leftover.
  await eventually('the batch\'s watchdog to terminate the leftover', () => !alive(over.id), 30_000);
  await eventually('the job to sleep on the batch\'s instance', () => processesWith(`sleep\0${marker}`).length === 1, 30_000);
  t.ok(alive(live.id), 'the instance of the session recorded in .drover/cloud-sessions is live, and left alone');

  child.kill('SIGINT');
  t.equal(await exited, EXIT.SIGNAL, stderr());
  await eventually('the batch\'s instance to be terminated', () => cloud.alive().length === 1, 10_000);
  t.ok(alive(live.id), 'and still is after the batch ended');
});
