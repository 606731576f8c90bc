/**
 * The SSH transport against a real OpenSSH server on loopback: commands with
 * their environment and exit status, the process engine running over SSH,
 * abort and dropped connections leaving no remote process, SFTP, connection
 * pooling, host keys, credentials and unreachable hosts.
 *
 * Commands go through the remote agent; test/ssh-transport-wrapper.test.ts
 * runs this very file with DROVER_SSH_TEST_PATH=wrapper, where they go
 * through the shell wrapper (the path of hosts without perl).
 */
import t, { type Test } from 'tap';
import { spawn, execFileSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client, type SFTPWrapper } from 'ssh2';
import { ProcessEngine } from '../src/engines/process.js';
import { pidsWithCookie, readProcStat, liveProcesses } from '../src/hosts/proc.js';
import { HostKeyError } from '../src/hosts/ssh-known-hosts.js';
import { SshConnectionError, SshTransport, type SshTransportOptions } from '../src/hosts/ssh-transport.js';
import type { Execution } from '../src/hosts/transport.js';
import type { Claim } from '../src/model/task.js';
import { createLogger, silentLogger } from '../src/runtime/logger.js';
import type { StartSshdOptions, TestSshd } from '../src/testing/sshd.js';
import { runNodeScript } from './helpers/node-script.js';
import { cookieFor, remoteDir, requireSshd, sshd, sshTransport, until } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const BASE_ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };
/** How commands reach the host in this run: through the remote agent, or the shell wrapper. */
const AGENT = process.env['DROVER_SSH_TEST_PATH'] !== 'wrapper';

function transportFor(t: Test, server: TestSshd, options: Partial<SshTransportOptions> = {}): SshTransport {
  return sshTransport(t, server, { remoteAgent: AGENT, ...options });
}

function collect(stream: Readable): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    stream.on('data', (chunk: Buffer) => (text += chunk.toString()));
    stream.on('end', () => resolve(text));
    stream.on('error', reject);
  });
}

async function runToEnd(execution: Execution) {
  const [status, stdout, stderr] = await Promise.all([execution.exited, collect(execution.stdout), collect(execution.stderr)]);
  return { status, stdout, stderr };
}

t.test('exec: exact environment, quoting, cwd, stdout, stderr, exit code, stdin closed', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const cookie = cookieFor(t);
  const tricky = `it's "quoted" $HOME \`x\` \\ ; | & * \n second line`;
  const env = { ...BASE_ENV, TRICKY: tricky, 'WITH SPACE': 'x y', EMPTY: '' };
  const shown = await runToEnd(await transport.exec(['sh', '-c', 'printf "[%s]\\n" "$TRICKY"; pwd; cat; echo oops >&2; exit 3'], { cwd: dir, env, cookie }));
  t.same(shown.status, { exitCode: 3, signal: null });
  t.equal(shown.stdout, `[${tricky}]\n${dir}\n`, 'the value arrives byte for byte; the command runs in cwd; stdin is closed (cat read nothing)');
  t.equal(shown.stderr, 'oops\n', 'stderr holds the command\'s output only');
  const listed = await runToEnd(await transport.exec(['env', '-0'], { cwd: dir, env, cookie }));
  const seen = Object.fromEntries(listed.stdout.split('\0').filter(Boolean).map((entry) => [entry.slice(0, entry.indexOf('=')), entry.slice(entry.indexOf('=') + 1)]));
  t.same(seen, { ...env, DROVER_RUN_COOKIE: cookie }, 'exactly the given variables, nothing of the SSH session');
});

t.test('exec: a signal ends the command; a missing command is a start error', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const killed = await runToEnd(await transport.exec(['sh', '-c', 'kill -KILL $$'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.same(killed.status, { exitCode: null, signal: 'SIGKILL' }, 'the signal, as OpenSSH reports it');
  const missing = await runToEnd(await transport.exec(['drover-no-such-command'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(missing.status.exitCode, 127);
  t.match(missing.status.startError?.message, /drover-no-such-command: command not found \(on drover-ssh@127\.0\.0\.1:\d+|command not found/);
  t.match(missing.status.startError?.message, server.address, 'the error names the host');
  const badDir = await runToEnd(await transport.exec(['true'], { cwd: `${dir}/missing`, env: BASE_ENV, cookie: cookieFor(t) }));
  t.match(badDir.status.startError?.message, /cannot enter the working directory/);
  const argvEquals = await runToEnd(await transport.exec(['sh', '-c', 'printf "%s|" "$@"', 'x', 'a=b', "c'd"], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(argvEquals.stdout, "a=b|c'd|", 'argv passes through untouched');
});

function engineContext(t: Test, transport: SshTransport, taskDir: string, cookie: string) {
  const claim: Claim = { taskId: 'ssh-task', runId: 0, workerId: 'w', payload: {}, deadline: Date.now() + 60_000, takenUntil: Date.now() + 60_000, retriesLeft: 0 };
  return { claim, transport, taskDir, cookie, logger: silentLogger, signal: new AbortController().signal };
}

t.test('the process engine over SSH: abort stops the whole remote tree, SIGKILL after the grace period', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const cookie = cookieFor(t);
  const engine = new ProcessEngine({ killGraceMs: 400, env: BASE_ENV });
  const builder = await engine.prepare({ command: `sh -c 'trap "" TERM; sleep 1000' & sleep 1000 & wait` }, engineContext(t, transport, dir, cookie));
  const sandbox = await builder.start();
  sandbox.stdout.resume();
  sandbox.stderr.resume();
  await until('4 remote processes', () => pidsWithCookie(cookie).length >= 4);
  const groups = new Set(pidsWithCookie(cookie).map((pid) => readProcStat(pid)?.pgrp));
  t.equal(groups.size, 1, 'the remote command is one process group');
  const started = Date.now();
  await sandbox.abort();
  const took = Date.now() - started;
  t.same(pidsWithCookie(cookie), [], 'no remote process is left (zombies do not count)');
  t.ok(took >= 350 && took < 5000, `TERM, the grace period, then KILL for the one that ignored TERM (${took} ms)`);
  t.equal((await sandbox.wait()).signal, 'SIGTERM');
  await sandbox.dispose();
});

t.test('the process engine over SSH: dispose kills what the command left running after it exited', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const cookie = cookieFor(t);
  const engine = new ProcessEngine({ killGraceMs: 1000, env: BASE_ENV });
  const builder = await engine.prepare({ command: 'sleep 1000 >/dev/null 2>&1 & echo started' }, engineContext(t, transport, dir, cookie));
  const sandbox = await builder.start();
  const stdout = collect(sandbox.stdout);
  sandbox.stderr.resume();
  t.equal((await sandbox.wait()).exitCode, 0);
  t.equal(await stdout, 'started\n');
  await sleep(300);
  t.equal(pidsWithCookie(cookie).length, 1, 'the background sleep still runs after the main process exited');
  await sandbox.dispose();
  t.same(pidsWithCookie(cookie), [], 'dispose killed it');
});

t.test('a dropped connection ends the remote command (the wrapper notices its session is gone)', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server, { killGraceMs: 300 });
  const dir = await remoteDir(t, transport, 't');
  const cookie = cookieFor(t);
  const lost: Error[] = [];
  transport.on('lost', (error) => lost.push(error));
  const execution = await transport.exec(['sh', '-c', 'trap "" TERM; sleep 1000 & sleep 1000; wait'], { cwd: dir, env: BASE_ENV, cookie });
  execution.stdout.resume();
  const stderr = collect(execution.stderr);
  await until('3 remote processes', () => pidsWithCookie(cookie).length >= 3);
  transport.dropConnection();
  const status = await execution.exited;
  t.same(status, { exitCode: 255, signal: null }, 'exited resolves (255, as ssh says) once the connection is gone');
  t.match(await stderr, /the connection to drover-ssh@127\.0\.0\.1:\d+ was lost while the command ran/);
  t.equal(lost.length, 1, 'the transport said the connection was lost');
  t.match(lost[0]?.message, server.address);
  t.ok(await execution.waitGone(100), 'waitGone does not hang on a lost connection');
  await until('the remote wrapper to stop the group (TERM, grace, KILL)', () => pidsWithCookie(cookie).length === 0, 10_000);
  t.pass('no remote process is left');
  // The next command reconnects.
  const again = await runToEnd(await transport.exec(['echo', 'back'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(again.stdout, 'back\n');
  t.equal(transport.stats.connectionsOpened, 2, 'one reconnect');
});

t.test('SFTP: mkdir -p, write, read, stat, errors, upload and download of trees with modes', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  await transport.mkdir(`${dir}/a/b/c`);
  await transport.mkdir(`${dir}/a/b/c`);
  t.same(await transport.stat(`${dir}/a/b`), { type: 'directory', size: (await transport.stat(`${dir}/a/b`))!.size });
  await transport.writeFile(`${dir}/a/text.txt`, 'hello\n');
  await transport.writeFile(`${dir}/a/stream.bin`, Readable.from([Buffer.alloc(300_000, 7), Buffer.from('end')]));
  t.equal(await collect(await transport.readFile(`${dir}/a/text.txt`)), 'hello\n');
  t.equal((await transport.stat(`${dir}/a/stream.bin`))?.size, 300_003);
  t.equal(await transport.stat(`${dir}/nothing`), undefined);
  await t.rejects(transport.readFile(`${dir}/nothing`), { code: 'ENOENT', message: new RegExp(`nothing' on ${server.address.replace(/[.]/g, '\\.')}`) });
  await t.rejects(transport.readFile(`${dir}/a`), { code: 'EISDIR' });

  const local = mkdtempSync(join(tmpdir(), 'drover-upload-'));
  t.teardown(() => rmSync(local, { recursive: true, force: true }));
  mkdirSync(join(local, 'tree/sub'), { recursive: true });
  writeFileSync(join(local, 'tree/run.sh'), '#!/bin/sh\necho ran\n');
  chmodSync(join(local, 'tree/run.sh'), 0o755);
  writeFileSync(join(local, 'tree/sub/data.txt'), 'data');
  await transport.upload(join(local, 'tree'), `${dir}/up`);
  const ran = await runToEnd(await transport.exec(['./up/run.sh'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(ran.stdout, 'ran\n', 'the executable bit survived the upload');
  await transport.download(`${dir}/up`, join(local, 'back'));
  t.equal(readFileSync(join(local, 'back/sub/data.txt'), 'utf8'), 'data');
  t.equal(statSync(join(local, 'back/run.sh')).isFile(), true);
  await transport.remove(`${dir}/up`);
  t.equal(await transport.stat(`${dir}/up`), undefined);
  await transport.remove(`${dir}/up`);
});

t.test('upload puts each file in place by a rename: a running program is replaced, a link to the old file keeps it', async (t) => {
  const { transport, dir, local } = await uploadSetup(t);
  mkdirSync(join(local, 'old'));
  writeFileSync(join(local, 'old', 'tool'), readFileSync('/bin/sleep'), { mode: 0o755 });
  await transport.upload(join(local, 'old'), `${dir}/bin`);
  const cookie = cookieFor(t);
  const running = await transport.exec(['./bin/tool', '30'], { cwd: dir, env: BASE_ENV, cookie });
  await until('the uploaded program runs', () => pidsWithCookie(cookie).length > 0);
  await runToEnd(await transport.exec(['ln', 'bin/tool', 'bin/link'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));

  // Writing into a program that runs fails (ETXTBSY); a job on a host that shares this home would run a half-written one.
  mkdirSync(join(local, 'new'));
  writeFileSync(join(local, 'new', 'tool'), '#!/bin/sh\necho new\n', { mode: 0o755 });
  await transport.upload(join(local, 'new'), `${dir}/bin`);
  const ran = await runToEnd(await transport.exec(['./bin/tool'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(ran.stdout, 'new\n', 'the new program is in place, executable');
  t.equal((await transport.stat(`${dir}/bin/link`))?.size, statSync('/bin/sleep').size, 'the old file is untouched: the new one is a new file');
  t.same((await transport.list(`${dir}/bin`)).map((entry) => entry.name).sort(), ['link', 'tool'], 'no partial file is left');
  await running.kill('SIGKILL');
  await running.exited;

  // A connection lost mid-file: the upload fails, and says where (its clean-up must not wait on the dead channel).
  // Sparse, so that making it costs nothing; the upload is cut off a few megabytes in.
  writeFileSync(join(local, 'big.bin'), '');
  truncateSync(join(local, 'big.bin'), 512 << 20);
  const upload = transport.upload(join(local, 'big.bin'), `${dir}/big.bin`);
  const partial = () => readdirSync(dir).some((name) => name.startsWith('.big.bin.drover-'));
  await until('the upload to begin', partial);
  transport.dropConnection();
  const timeout = sleep(10_000).then(() => 'still waiting after 10 s');
  t.match(await Promise.race([upload.then(() => 'resolved', (error: Error) => error.message), timeout]), /big\.bin' on drover-ssh@/, 'the upload rejects, naming the file');
  t.equal(statSync(`${dir}/big.bin`, { throwIfNoEntry: false }), undefined, 'nothing half-written is in its place');
  await transport.flush();
  t.notOk(partial(), 'the next connection removes the partial file');
});

t.test('upload copies a tree several files at a time: each whole, with its mode; a file that cannot be placed fails it, named, without partials', async (t) => {
  const { transport, dir, local } = await uploadSetup(t);
  const files: string[] = [];
  for (let d = 0; d < 5; d++) {
    mkdirSync(join(local, 'tree', `d${d}`, 'deep'), { recursive: true });
    for (let f = 0; f < 12; f++) {
      const name = join(`d${d}`, f % 3 === 0 ? 'deep' : '', `f${f}`);
      writeFileSync(join(local, 'tree', name), `${name}\n`.repeat(1 + f * 50), { mode: f % 2 ? 0o755 : 0o640 });
      files.push(name);
    }
  }
  // Two uploads at once share the transport's eight files in flight.
  await Promise.all([transport.upload(join(local, 'tree'), `${dir}/up`), transport.upload(join(local, 'tree'), `${dir}/again`)]);
  t.equal(transport.stats.uploadsAtOncePeak, 8, 'eight files in flight, not one after another, and not eight per upload');
  for (const name of files) {
    const there = statSync(join(dir, 'up', name));
    t.equal(readFileSync(join(dir, 'up', name), 'utf8'), readFileSync(join(local, 'tree', name), 'utf8'), `${name}: whole`);
    t.equal(there.mode & 0o777, statSync(join(local, 'tree', name)).mode & 0o777, `${name}: its mode`);
    t.equal(readFileSync(join(dir, 'again', name), 'utf8'), readFileSync(join(local, 'tree', name), 'utf8'), `${name}: whole in the other copy`);
  }

  // A directory where one file belongs (made as the remote user): that file cannot be renamed into place.
  await transport.remove(`${dir}/up/d2/f4`);
  await transport.mkdir(`${dir}/up/d2/f4/taken`);
  await transport.flush();
  await t.rejects(transport.upload(join(local, 'tree'), `${dir}/up`), { message: /d2\/f4' on drover-ssh@/ }, 'the upload fails, naming the file');
  await transport.flush();
  const left = (path: string): string[] => readdirSync(path, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? left(join(path, entry.name)) : entry.name.includes('.drover-') ? [join(path, entry.name)] : []);
  t.same(left(join(dir, 'up')), [], 'no partial file is left');

  // What is neither file nor directory refuses the tree before any file is copied.
  execFileSync('mkfifo', [join(local, 'tree', 'd0', 'pipe')]);
  writeFileSync(join(local, 'tree', 'd4', 'f1'), 'changed\n');
  await t.rejects(transport.upload(join(local, 'tree'), `${dir}/up`), { message: /pipe is neither a file nor a directory/ });
  t.equal(readFileSync(join(dir, 'up', 'd4', 'f1'), 'utf8'), 'd4/f1\n'.repeat(51), 'no file was copied');
});

t.test('upload to a server without OpenSSH\'s posix-rename: the file in place is removed, then the new one renamed into it', async (t) => {
  // OpenSSH's SFTP server neither offers nor serves the requests -P names.
  const { server, transport, dir, local } = await uploadSetup(t, { sftpFlags: ['-P', 'posix-rename'] });
  t.equal(await offersPosixRename(server), false, 'the server does not offer posix-rename: the fallback is what runs');
  writeFileSync(join(local, 'tool'), '#!/bin/sh\necho one\n', { mode: 0o755 });
  await transport.upload(join(local, 'tool'), `${dir}/tool`);
  t.equal((await runToEnd(await transport.exec(['./tool'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }))).stdout, 'one\n', 'a first upload: nothing to remove');
  await runToEnd(await transport.exec(['ln', 'tool', 'link'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  writeFileSync(join(local, 'tool'), '#!/bin/sh\necho two, longer\n', { mode: 0o755 });
  await transport.upload(join(local, 'tool'), `${dir}/tool`);
  t.equal((await runToEnd(await transport.exec(['./tool'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }))).stdout, 'two, longer\n', 'the new file is in place, executable');
  t.equal((await transport.stat(`${dir}/link`))?.size, '#!/bin/sh\necho one\n'.length, 'the old file is untouched: the new one is a new file');
  t.same((await transport.list(dir)).map((entry) => entry.name).sort(), ['link', 'tool'], 'no partial file is left');
});

/** An sshd, a transport to it, a remote directory and a local one for an upload test; all go when the test ends. */
async function uploadSetup(t: Test, options?: StartSshdOptions) {
  const server = await sshd(t, options);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const local = mkdtempSync(join(tmpdir(), 'drover-upload-'));
  t.teardown(() => rmSync(local, { recursive: true, force: true }));
  return { server, transport, dir, local };
}

/** Whether the server offers OpenSSH's posix-rename: ssh2 refuses, at once, a request the server did not offer. */
async function offersPosixRename(server: TestSshd): Promise<boolean> {
  const client = new Client();
  try {
    await new Promise<void>((resolve, reject) => {
      client.once('ready', resolve).once('error', reject);
      client.connect({ host: server.host, port: server.port, username: server.user, privateKey: readFileSync(server.identityFile) });
    });
    const sftp = await new Promise<SFTPWrapper>((resolve, reject) => client.sftp((error, opened) => (error ? reject(error) : resolve(opened))));
    try {
      sftp.ext_openssh_rename('.drover-no-such-file', '.drover-no-such-file-either', () => {});
      return true;
    } catch {
      return false;
    }
  } finally {
    client.end();
  }
}

t.test('100 commands share one TCP connection; channels stay within the limit', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server, { maxChannels: 8 });
  const dir = await remoteDir(t, transport, 't');
  let most = 0;
  const sample = () => (most = Math.max(most, transport.stats.channelsOpen));
  const sampler = setInterval(sample, 2);
  const started = performance.now();
  const results = await Promise.all(
    Array.from({ length: 100 }, async (_, i) => {
      const execution = await transport.exec(['sh', '-c', `echo ${i}; sleep 0.05`], { cwd: dir, env: BASE_ENV, cookie: 'pool' });
      sample();
      const { status, stdout } = await runToEnd(execution);
      await execution.waitGone(5000);
      return status.exitCode === 0 && stdout === `${i}\n`;
    }),
  );
  clearInterval(sampler);
  const seconds = (performance.now() - started) / 1000;
  t.ok(results.every(Boolean), 'every command ran with its own output');
  t.equal(transport.stats.connectionsOpened, 1, 'one TCP connection opened by the client');
  t.equal(server.logins(), 1, 'and one login seen by sshd');
  if (AGENT) {
    t.ok(most <= 2, `commands take no channel: the agent's and SFTP (at most ${most} open)`);
    // So they are not limited by channels: 20 run at once, each until a file appears (10 s at most).
    const gate = `${dir}/go`;
    const waiting = await Promise.all(
      Array.from({ length: 20 }, () => transport.exec(['sh', '-c', 'i=0; while [ ! -e "$0" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i + 1)); done; test -e "$0"', gate], { cwd: dir, env: BASE_ENV, cookie: 'pool' })),
    );
    t.ok(transport.stats.channelsOpen <= 2, '20 commands started at once, more than maxChannels, and still no channel of their own');
    await transport.writeFile(gate, '');
    t.same(await Promise.all(waiting.map(async (execution) => (await runToEnd(execution)).status.exitCode)), Array(20).fill(0), 'and they all saw the file');
  } else {
    t.ok(most <= 8 && most >= 6, `as many channels as allowed, never more than maxChannels (at most ${most} open)`);
  }
  // Regression: channels that close and reopen quickly can outrun the server's own count
  // (MaxSessions); a refused open is retried instead of failing the command.
  const burst = await Promise.all(Array.from({ length: 200 }, async () => (await runToEnd(await transport.exec(['true'], { cwd: dir, env: BASE_ENV, cookie: 'pool' }))).status.exitCode));
  t.ok(burst.every((code) => code === 0), '200 short commands at once all run');
  t.comment(`100 commands (50 ms each) over one connection: ${seconds.toFixed(2)} s, ${(100 / seconds).toFixed(0)} commands/s, at most ${most} channels`);
});

t.test('host keys: a changed key is refused and says so; strict refuses unknown hosts; accept-new records them', async (t) => {
  const server = await sshd(t);
  const dir = mkdtempSync(join(tmpdir(), 'drover-known-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'other')]);
  const otherKey = readFileSync(join(dir, 'other.pub'), 'utf8').split(' ').slice(0, 2).join(' ');
  const changed = join(dir, 'changed');
  writeFileSync(changed, `# a comment\n[127.0.0.1]:${server.port} ${otherKey}\n`);
  const refused = transportFor(t, server, { knownHostsFile: changed });
  const error = await refused.connect().then(() => undefined, (e: unknown) => e);
  t.type(error, HostKeyError);
  t.match((error as Error).message, /host key of drover-ssh@127\.0\.0\.1:\d+ has CHANGED/);
  t.match((error as Error).message, /line 2/);
  t.match((error as Error).message, /ssh-keygen -R/);
  t.equal(server.logins(), 0, 'nothing was sent to the host');

  const unknown = join(dir, 'unknown');
  await t.rejects(transportFor(t, server, { knownHostsFile: unknown }).connect(), { name: 'HostKeyError', message: /is not in ".*unknown"/ });

  const learned = join(dir, 'sub', 'learned');
  await transportFor(t, server, { knownHostsFile: learned, hostKeyPolicy: 'accept-new' }).connect();
  t.equal(readFileSync(learned, 'utf8'), `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`, 'accept-new recorded the key');
  await transportFor(t, server, { knownHostsFile: learned, hostKeyPolicy: 'strict' }).connect();
  t.pass('and strict then accepts it');
  await transportFor(t, server, { knownHostsFile: changed, hostKeyPolicy: 'accept-new' }).connect().then(
    () => t.fail('accept-new must still refuse a changed key'),
    (e: unknown) => t.type(e, HostKeyError),
  );
  await transportFor(t, server, { knownHostsFile: changed, hostKeyPolicy: 'off' }).connect();
  t.pass('off skips the check');

  // Hashed known_hosts entries (HashKnownHosts yes) are understood.
  const hashed = join(dir, 'hashed');
  writeFileSync(hashed, `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`);
  execFileSync('ssh-keygen', ['-H', '-f', hashed], { stdio: 'ignore' });
  t.notMatch(readFileSync(hashed, 'utf8'), /127\.0\.0\.1/, 'the file is hashed');
  await transportFor(t, server, { knownHostsFile: hashed }).connect();
  t.pass('a hashed entry matches');
});

t.test('credentials: ssh-agent; a wrong key is refused clearly without showing it', async (t) => {
  const server = await sshd(t);
  const dir = mkdtempSync(join(tmpdir(), 'drover-agent-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, 'agent.sock');
  const agent = spawn('ssh-agent', ['-D', '-a', socket], { stdio: 'ignore' });
  t.teardown(() => void agent.kill('SIGKILL'));
  await until('ssh-agent to listen', () => {
    try {
      return statSync(socket).isSocket();
    } catch {
      return false;
    }
  });
  execFileSync('ssh-add', ['-q', server.identityFile], { env: { ...process.env, SSH_AUTH_SOCK: socket }, stdio: 'ignore' });
  const viaAgent = transportFor(t, server, { identityFiles: [], agent: socket });
  const { stdout } = await runToEnd(await viaAgent.exec(['echo', 'agent'], { cwd: '.', env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(stdout, 'agent\n');

  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'stranger')]);
  const error = await transportFor(t, server, { identityFiles: [join(dir, 'stranger')] }).connect().then(() => undefined, (e: unknown) => e);
  t.type(error, SshConnectionError);
  t.match((error as Error).message, `cannot log in to ${server.address}: authentication failed (tried key ${join(dir, 'stranger')})`);
  t.notMatch((error as Error).message, /PRIVATE KEY/);
  await t.rejects(transportFor(t, server, { identityFiles: [join(dir, 'missing-key')] }).connect(), { message: /identity file ".*missing-key" cannot be read: ENOENT/ });
});

t.test('an unreachable host: a clear error, and reconnects back off', async (t) => {
  const server = await sshd(t);
  const gone = await sshd(t);
  const port = gone.port;
  await gone.stop();
  const transport = transportFor(t, server, { address: `${server.user}@127.0.0.1:${port}`, reconnectDelayMs: 200, maxReconnectDelayMs: 400 });
  const first = Date.now();
  await t.rejects(transport.connect(), { name: 'SshConnectionError', message: `cannot connect to drover-ssh@127.0.0.1:${port}: connection refused (is sshd running on that port?)` });
  t.ok(Date.now() - first < 2000, 'refused at once');
  const second = Date.now();
  await t.rejects(transport.connect(), SshConnectionError);
  t.ok(Date.now() - second >= 150, 'the second attempt waited for the backoff');
  await t.rejects(transport.exec(['true'], { cwd: '.', env: BASE_ENV, cookie: 'x' }), { message: /cannot connect to drover-ssh@127\.0\.0\.1/ });
  t.equal(liveProcesses().filter((p) => p.pid === gone.pid).length, 0, 'that sshd is really gone');
});

/** Waits for an asynchronous condition, bounded in time. */
async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

t.test('a task costs one channel (none with the agent): its directory is cleared and made with its command, its removal goes with the next command', async (t) => {
  // With the agent, commands and deferred changes take no channel at all.
  const perTask = AGENT ? 0 : 1;
  const server = await sshd(t);
  const transport = transportFor(t, server);
  // Another client: it sees the host as it is, whatever `transport` still holds back.
  const observer = transportFor(t, server);
  const base = await remoteDir(t, observer, 't');
  const first = `${base}/tasks/a`;
  // What a crashed run left: the runtime removes a task directory before it makes it.
  await observer.mkdir(`${first}/left`);
  await observer.writeFile(`${first}/left/over`, 'x');
  await transport.connect();
  const before = transport.stats.channelsOpened;
  await transport.remove(first);
  await transport.mkdir(first);
  const execution = await transport.exec(['sh', '-c', 'ls -A; pwd'], { cwd: first, env: BASE_ENV, cookie: cookieFor(t) });
  const ran = await runToEnd(execution);
  t.equal(ran.stdout, `${first}\n`, 'the command ran in a fresh, empty task directory');
  await execution.kill('SIGKILL');
  t.ok(await execution.waitGone(5000), 'its group is gone');
  t.equal(transport.stats.channelsOpened - before, perTask, `remove, mkdir, exec, kill and waitGone took ${perTask} channel (no rm, no SFTP mkdir, no control command)`);
  await transport.remove(first);
  t.equal((await observer.stat(first))?.type, 'directory', 'the removal waits');
  const second = `${base}/tasks/b`;
  await transport.remove(second);
  await transport.mkdir(second);
  const next = await runToEnd(await transport.exec(['true'], { cwd: second, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(next.status.exitCode, 0);
  t.equal(transport.stats.channelsOpened - before, 2 * perTask, 'the next task: as many more');
  t.equal(await observer.stat(first), undefined, 'the first task directory went with the second command');
  t.equal((await observer.stat(second))?.type, 'directory');
  await transport.remove(second);
  // No command follows: a control command applies it soon.
  await eventually('the last removal to be applied by itself', async () => (await observer.stat(second)) === undefined);
  t.equal(transport.stats.changeFlushes, 1, AGENT ? 'by one request to the agent' : 'by one control command');
  t.equal(transport.stats.channelsOpened - before, 3 * perTask);
});

t.test('deferred changes: every operation sees them, close() applies what is left, a lost connection keeps them for the next one', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const observer = transportFor(t, server);
  const base = await remoteDir(t, observer, 't');
  const cookie = cookieFor(t);
  await observer.mkdir(`${base}/x/sub`);
  await observer.mkdir(`${base}/y`);
  await transport.remove(`${base}/x`);
  t.equal(await transport.stat(`${base}/x`), undefined, 'stat after remove: gone');
  t.equal(await observer.stat(`${base}/x`), undefined, 'gone on the host too');
  await transport.remove(`${base}/y`);
  const seen = await runToEnd(await transport.exec(['sh', '-c', 'test -e "$0" && echo there || echo gone', `${base}/y`], { cwd: base, env: BASE_ENV, cookie }));
  t.equal(seen.stdout, 'gone\n', 'a command started after remove() does not see the path, wherever it runs');
  await transport.remove(`${base}/new`);
  await transport.mkdir(`${base}/new/deep`);
  t.same(await transport.list(`${base}/new`), [{ name: 'deep', type: 'directory' }], 'list after a deferred mkdir');
  await transport.writeFile(`${base}/new/deep/f`, 'data');
  t.equal(await collect(await transport.readFile(`${base}/new/deep/f`)), 'data');

  // A lost connection: what is asked for meanwhile waits for the next connection.
  transport.dropConnection();
  await until('the connection to be gone', () => !transport.connected);
  await observer.mkdir(`${base}/z`);
  await transport.remove(`${base}/z`);
  await eventually('the removal, over a new connection', async () => (await observer.stat(`${base}/z`)) === undefined);
  t.equal(transport.stats.connectionsOpened, 2, 'it reconnected for it');

  // close() (a host's dispose) applies what is left, before the delay would have.
  await observer.mkdir(`${base}/w`);
  await transport.remove(`${base}/w`);
  await transport.close();
  t.equal(await observer.stat(`${base}/w`), undefined, 'close() applied the removal');
  await t.rejects(transport.remove(`${base}/w`), { message: /the transport is closed/ });
});

t.test('deferred changes whose command never started are applied later', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const observer = transportFor(t, server);
  const base = await remoteDir(t, observer, 't');
  // Bounded: each round either applies the removal in the dropped command's channel or keeps it for the next one.
  for (let round = 0; round < 5; round++) {
    const path = `${base}/r${round}`;
    await observer.mkdir(path);
    await transport.connect();
    await transport.remove(path);
    const started = transport.exec(['true'], { cwd: base, env: BASE_ENV, cookie: cookieFor(t) }).then(
      async (execution) => (await runToEnd(execution)).status,
      (error: unknown) => error,
    );
    transport.dropConnection();
    await started;
    await eventually(`round ${round}: the removal`, async () => (await observer.stat(path)) === undefined);
  }
  t.pass('every removal was applied');
  // Two commands on their way with changes when the connection drops: a task directory made for the first, removed
  // with the second. What either did not apply is applied later, in the order it was asked for: the directory is gone.
  const statusOf = (started: Promise<Execution>) => started.then(async (execution) => (await runToEnd(execution)).status, (error: unknown) => error);
  for (let round = 0; round < 5; round++) {
    const path = `${base}/s${round}`;
    await transport.connect();
    await transport.remove(path);
    await transport.mkdir(path);
    const first = statusOf(transport.exec(['true'], { cwd: path, env: BASE_ENV, cookie: cookieFor(t) }));
    await new Promise((resolve) => setImmediate(resolve));
    await transport.remove(path);
    const second = statusOf(transport.exec(['true'], { cwd: base, env: BASE_ENV, cookie: cookieFor(t) }));
    transport.dropConnection();
    await Promise.all([first, second]);
    await eventually(`round ${round}: the directory made, then removed`, async () => (await observer.stat(path)) === undefined);
    await transport.flush();
    t.equal(await observer.stat(path), undefined, `round ${round}: and it stays removed once every change is applied`);
  }
});

t.test('a removal that fails is logged; a working directory that cannot be cleared or made rejects the exec', async (t) => {
  const server = await sshd(t);
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', write: (line) => lines.push(line) });
  const transport = transportFor(t, server, { logger });
  const observer = transportFor(t, server);
  const base = await remoteDir(t, observer, 't');
  const cookie = cookieFor(t);
  // A directory its owner cannot empty: a file in a read-only directory.
  await observer.mkdir(`${base}/stuck/ro`);
  await observer.writeFile(`${base}/stuck/ro/file`, 'x');
  const chmod = async (mode: string) => t.equal((await observer.run(`chmod ${mode} '${base}/stuck/ro'`)).exitCode, 0);
  await chmod('555');
  t.teardown(() => observer.run(`chmod 755 '${base}/stuck/ro'`).then(() => {}));
  await transport.remove(`${base}/stuck`);
  const other = await runToEnd(await transport.exec(['echo', 'ran'], { cwd: base, env: BASE_ENV, cookie }));
  t.equal(other.stdout, 'ran\n', 'another task\'s command runs all the same');
  t.equal(transport.stats.failedRemovals, 1);
  t.match(lines.join('\n'), new RegExp(`cannot remove a path.*${base}/stuck`), 'the failure is logged with the path');

  await transport.remove(`${base}/stuck`);
  await transport.mkdir(`${base}/stuck`);
  await t.rejects(transport.exec(['true'], { cwd: `${base}/stuck`, env: BASE_ENV, cookie }), { code: 'EIO', message: /cannot clear the working directory .*stuck on drover-ssh@127\.0\.0\.1/ }, 'a task directory that cannot be cleared');

  await observer.writeFile(`${base}/file`, 'not a directory');
  await transport.remove(`${base}/file/task`);
  await transport.mkdir(`${base}/file/task`);
  await t.rejects(transport.exec(['true'], { cwd: `${base}/file/task`, env: BASE_ENV, cookie }), { code: 'EIO', message: /cannot make the working directory .*file\/task/ }, 'a task directory that cannot be made');
  await chmod('755');
});

t.test('the watcher\'s report of the group is taken out of stderr, and saves the control command when the group is gone', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 't');
  const cookie = cookieFor(t);
  await transport.flush();
  const noNewline = await transport.exec(['sh', '-c', 'printf "no newline" >&2'], { cwd: dir, env: BASE_ENV, cookie });
  t.equal((await runToEnd(noNewline)).stderr, 'no newline', 'output without a final newline comes through whole');
  const before = transport.stats.channelsOpened;
  await noNewline.kill('SIGKILL');
  t.ok(await noNewline.waitGone(1000));
  t.equal(transport.stats.channelsOpened, before, 'nothing was left of the group: no control command');
  const late = await transport.exec(['sh', '-c', '(sleep 0.3; printf late >&2) & printf early >&2'], { cwd: dir, env: BASE_ENV, cookie });
  t.equal((await runToEnd(late)).stderr, 'earlylate', 'output after the main process exited comes through whole');
  t.ok(await late.waitGone(5000));
  const held = await transport.exec(['sh', '-c', 'sleep 1000 >/dev/null 2>&1 & echo $! >&2'], { cwd: dir, env: BASE_ENV, cookie });
  const shown = await runToEnd(held);
  t.match(shown.stderr, /^\d+\n$/, 'just the command\'s stderr');
  const channels = transport.stats.channelsOpened;
  t.notOk(await held.waitGone(200), 'the background sleep is left: the group is not gone');
  await held.kill('SIGKILL');
  t.ok(await held.waitGone(5000));
  if (AGENT) t.equal(transport.stats.channelsOpened, channels, 'which the agent checked and killed, without a channel');
  else t.ok(transport.stats.channelsOpened > channels, 'which control commands checked and killed');
  t.same(pidsWithCookie(cookie), []);
});

t.test('regression: a program that closes its transport exits at once (close left a 2 s timer running)', async (t) => {
  const server = await sshd(t);
  const script = [
    `const { SshTransport } = await import(${JSON.stringify(new URL('../src/hosts/ssh-transport.ts', import.meta.url).href)});`,
    `const transport = new SshTransport({ address: ${JSON.stringify(server.address)}, identityFiles: [${JSON.stringify(server.identityFile)}], knownHostsFile: ${JSON.stringify(server.knownHostsFile)}, agent: false, remoteAgent: ${AGENT} });`,
    `const execution = await transport.exec(['sh', '-c', 'echo ran'], { cwd: '/', env: ${JSON.stringify(BASE_ENV)}, cookie: 'c' });`,
    'execution.stdout.pipe(process.stdout);',
    'await execution.exited;',
    'await transport.close();',
    "process.stderr.write(`closed ${Date.now()}\\n`);",
  ].join('\n');
  const { stdout, stderr, exitedAt } = await runNodeScript(script, 30_000);
  t.equal(stdout, 'ran\n', 'the command ran');
  const closedAt = Number(/closed (\d+)/.exec(stderr)?.[1]);
  t.ok(Number.isFinite(closedAt), 'the transport closed', { stderr });
  t.ok(exitedAt - closedAt < 1000, `the process exited ${exitedAt - closedAt} ms after the transport closed`);
});
