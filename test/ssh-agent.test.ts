/**
 * The SSH transport's remote agent against a real OpenSSH server on
 * loopback: framing of large and binary output, flow control, many
 * commands at once, kill of a group with grandchildren, the agent's channel
 * dropped (its groups are stopped), and the fallback to the shell wrapper
 * on a host without perl. The rest of the transport's behaviour, through
 * the agent and through the wrapper, is in ssh-transport.test.ts.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { chmodSync, mkdtempSync, readdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { pidsWithCookie, readProcStat } from '../src/hosts/proc.js';
import type { Execution } from '../src/hosts/transport.js';
import { createLogger } from '../src/runtime/logger.js';
import { cookieFor, remoteDir, requireSshd, sshd, sshTransport as transportFor, until } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const BASE_ENV = { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' };

function collect(stream: Readable): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.on('end', () => resolve(Buffer.concat(chunks)));
    stream.on('error', reject);
  });
}

async function runToEnd(execution: Execution) {
  const [status, stdout, stderr] = await Promise.all([execution.exited, collect(execution.stdout), collect(execution.stderr)]);
  return { status, stdout, stderr };
}

const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

t.test('large binary output on both streams comes through byte for byte, framed', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 'a');
  // Random bytes (frame headers, NULs, newlines among them), both streams at once, of sizes that straddle chunks.
  const script = 'head -c 3000001 /dev/urandom > out.bin; head -c 1500007 /dev/urandom > err.bin; cat out.bin & cat err.bin >&2; wait; sha256sum out.bin err.bin';
  const ran = await runToEnd(await transport.exec(['sh', '-c', script], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  t.equal(ran.status.exitCode, 0);
  const sums = await runToEnd(await transport.exec(['sha256sum', 'out.bin', 'err.bin'], { cwd: dir, env: BASE_ENV, cookie: cookieFor(t) }));
  const [outSum, errSum] = sums.stdout.toString().split('\n').map((line) => line.split(' ')[0]);
  t.equal(ran.stdout.length, 3_000_001 + sums.stdout.length, 'all of stdout');
  t.equal(sha256(ran.stdout.subarray(0, 3_000_001)), outSum, 'stdout, byte for byte');
  t.equal(ran.stderr.length, 1_500_007);
  t.equal(sha256(ran.stderr), errSum, 'stderr, byte for byte');
  t.equal(transport.stats.agentsStarted, 1, 'through the agent');
});

t.test('flow control: unread output stops its command at a bounded buffer; other commands go on', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  const size = 20 * 1024 * 1024;
  const chatty = await transport.exec(['sh', '-c', `head -c ${size} /dev/zero; echo done >&2`], { cwd: dir, env: BASE_ENV, cookie });
  let exited = false;
  void chatty.exited.then(() => (exited = true));
  // Nobody reads its stdout for a while: other commands start and end meanwhile.
  const others = await Promise.all(Array.from({ length: 20 }, async (_, i) => (await runToEnd(await transport.exec(['sh', '-c', `echo ${i}`], { cwd: dir, env: BASE_ENV, cookie }))).stdout.toString()));
  t.same(others, Array.from({ length: 20 }, (_, i) => `${i}\n`), 'their output and exits come while the chatty one is stalled');
  await sleep(500);
  t.notOk(exited, 'the chatty command is held back: its output is not read');
  t.ok(chatty.stdout.readableLength <= 512 * 1024, `what waits here is bounded (${chatty.stdout.readableLength} bytes of ${size})`);
  const [stdout, stderr] = await Promise.all([collect(chatty.stdout), collect(chatty.stderr)]);
  t.equal(stdout.length, size, 'once read, every byte comes');
  t.equal(stderr.toString(), 'done\n');
  t.same(await chatty.exited, { exitCode: 0, signal: null });
});

t.test('300 commands at once over one agent, each with its own output and exit code', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  const results = await Promise.all(
    Array.from({ length: 300 }, async (_, i) => {
      const execution = await transport.exec(['sh', '-c', 'echo "out $0"; echo "err $0" >&2; exit $(($0 % 7))', String(i)], { cwd: dir, env: BASE_ENV, cookie });
      const ran = await runToEnd(execution);
      const gone = await execution.waitGone(5000);
      return ran.status.exitCode === i % 7 && ran.stdout.toString() === `out ${i}\n` && ran.stderr.toString() === `err ${i}\n` && gone;
    }),
  );
  t.equal(results.filter(Boolean).length, 300, 'every command ran with its own output, exit code, and its group is gone');
  t.equal(transport.stats.agentsStarted, 1);
  t.equal(transport.stats.connectionsOpened, 1);
  t.equal(server.logins(), 1);
});

t.test('kill signals the whole group, grandchildren included; waitGone sees it gone', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server);
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  const execution = await transport.exec(['sh', '-c', 'sh -c "sleep 1000 & sleep 1000; wait" & sleep 1000 & wait'], { cwd: dir, env: BASE_ENV, cookie });
  execution.stdout.resume();
  execution.stderr.resume();
  await until('5 remote processes', () => pidsWithCookie(cookie).length >= 5);
  const groups = new Set(pidsWithCookie(cookie).map((pid) => readProcStat(pid)?.pgrp));
  t.equal(groups.size, 1, 'one process group');
  t.notOk(await execution.waitGone(100), 'not gone while it runs');
  await execution.kill('SIGTERM');
  t.same(await execution.exited, { exitCode: null, signal: 'SIGTERM' });
  t.ok(await execution.waitGone(5000), 'gone');
  t.same(pidsWithCookie(cookie), [], 'the grandchildren too');

  // What the command left running after it exited is signalled through the agent as well.
  const left = await transport.exec(['sh', '-c', 'sh -c "sleep 1000" >/dev/null 2>&1 &'], { cwd: dir, env: BASE_ENV, cookie });
  t.equal((await runToEnd(left)).status.exitCode, 0);
  await until('the left-over process', () => pidsWithCookie(cookie).length >= 1);
  t.notOk(await left.waitGone(200), 'the group lives on after the main process');
  await left.kill('SIGKILL');
  t.ok(await left.waitGone(5000));
  t.same(pidsWithCookie(cookie), []);
});

t.test('the agent\'s channel dropped: it stops every group it started; the next command starts another agent', async (t) => {
  const server = await sshd(t);
  const transport = transportFor(t, server, { killGraceMs: 300 });
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  const stubborn = await transport.exec(['sh', '-c', 'trap "" TERM; sleep 1000 & sleep 1000; wait'], { cwd: dir, env: BASE_ENV, cookie });
  const leftover = await transport.exec(['sh', '-c', 'sleep 1000 >/dev/null 2>&1 &'], { cwd: dir, env: BASE_ENV, cookie });
  stubborn.stdout.resume();
  const stderr = collect(stubborn.stderr);
  t.equal((await runToEnd(leftover)).status.exitCode, 0);
  await until('4 remote processes', () => pidsWithCookie(cookie).length >= 4);
  const stopped = Date.now();
  await transport.stopAgent();
  t.same(await stubborn.exited, { exitCode: 255, signal: null }, 'the running command ends as on a lost connection');
  t.match((await stderr).toString(), /the agent on drover-ssh@127\.0\.0\.1:\d+ stopped while the command ran/);
  await until('the agent to stop both groups (TERM, grace, KILL)', () => pidsWithCookie(cookie).length === 0, 10_000);
  const took = Date.now() - stopped;
  t.ok(took >= 250 && took < 3000, `no remote process is left, neither the running one nor what the exited one left: TERM, the grace period of 300 ms, KILL (${took} ms)`);
  t.ok(await stubborn.waitGone(100), 'waitGone does not hang');
  const again = await runToEnd(await transport.exec(['echo', 'again'], { cwd: dir, env: BASE_ENV, cookie }));
  t.equal(again.stdout.toString(), 'again\n');
  t.equal(transport.stats.agentsStarted, 2, 'a new agent');
  t.equal(transport.stats.connectionsOpened, 1, 'on the same connection');
});

t.test('a host without perl: the shell wrapper is chosen by itself, and does the same', async (t) => {
  // A PATH with every program of /usr/bin but perl, set by sshd for the session.
  const bin = mkdtempSync(join(tmpdir(), 'drover-noperl-'));
  t.teardown(() => rmSync(bin, { recursive: true, force: true }));
  chmodSync(bin, 0o755);
  for (const name of readdirSync('/usr/bin')) if (!name.startsWith('perl')) symlinkSync(join('/usr/bin', name), join(bin, name));
  const server = await sshd(t, { sessionEnv: { PATH: bin } });
  const lines: string[] = [];
  const transport = transportFor(t, server, { logger: createLogger({ level: 'info', write: (line) => lines.push(line) }) });
  const dir = await remoteDir(t, transport, 'a');
  const cookie = cookieFor(t);
  t.equal((await transport.run('command -v perl || echo none')).stdout, 'none\n', 'the host has no perl');
  const before = transport.stats.channelsOpened;
  const env = { ...BASE_ENV, ONLY: 'this' };
  const ran = await runToEnd(await transport.exec(['sh', '-c', 'echo "$ONLY"; pwd; exit 4'], { cwd: dir, env, cookie }));
  t.same(ran.status, { exitCode: 4, signal: null });
  t.equal(ran.stdout.toString(), `this\n${dir}\n`);
  t.equal(transport.stats.agentsStarted, 0, 'no agent');
  t.equal(transport.stats.channelsOpened - before, 1, 'the command took a channel of its own: the wrapper');
  t.match(lines.join('\n'), /no perl; commands go through the shell wrapper/, 'the choice is logged');
  const held = await transport.exec(['sh', '-c', 'sleep 1000 >/dev/null 2>&1 &'], { cwd: dir, env, cookie });
  await runToEnd(held);
  await held.kill('SIGKILL');
  t.ok(await held.waitGone(5000));
  t.same(pidsWithCookie(cookie), []);
});
