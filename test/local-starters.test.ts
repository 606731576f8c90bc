/**
 * What starts the local transport's commands: the agent (the Perl program
 * that SSH hosts run too, here a child process) and, on machines without
 * perl, the spawner (src/hosts/spawner.ts). Their output, their start
 * errors, their death, and the worker's; the fallback to the spawner.
 */
import t, { type Test } from 'tap';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Readable } from 'node:stream';
import { LocalTransport, type LocalTransportOptions } from '../src/hosts/local.js';
import { runNodeScript, tsLoaderArg } from './helpers/node-script.js';
import { groupPids, isAlive, liveProcesses, pidsWithCookie, readProcStat } from '../src/hosts/proc.js';
import { createLogger } from '../src/runtime/logger.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const env = { PATH: process.env.PATH ?? '/usr/bin:/bin' };

async function until(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** Everything the stream gives, once it ends; listeners attached only when called. */
function whole(stream: Readable): Promise<string> {
  let text = '';
  stream.setEncoding('utf8');
  return new Promise((resolve, reject) => {
    stream.on('data', (chunk: string) => (text += chunk));
    stream.on('end', () => resolve(text));
    stream.on('error', reject);
  });
}

type Starter = 'agent' | 'spawner';
const STARTERS: readonly Starter[] = ['agent', 'spawner'];

/** The starter processes whose parent is `parent`: the agent names itself drover-agent, the spawner is node running `-e`. */
function startersOf(parent: number, starter: Starter): number[] {
  return liveProcesses()
    .filter((stat) => stat.ppid === parent)
    .filter((stat) => {
      try {
        const argv = readFileSync(`/proc/${stat.pid}/cmdline`, 'utf8').split('\0');
        return starter === 'agent' ? argv[0] === 'drover-agent' : argv.includes('-e');
      } catch {
        return false;
      }
    })
    .map((stat) => stat.pid);
}

function killAtTeardown(cookie: string): void {
  t.teardown(() => {
    for (const pid of pidsWithCookie(cookie)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
}

for (const starter of STARTERS) {
  const transportOf = (t: Test, options: Omit<LocalTransportOptions, 'agent'> = {}) => {
    const transport = new LocalTransport({ ...options, agent: starter === 'agent' });
    t.teardown(() => transport.close());
    return transport;
  };

  t.test(`${starter}: regression: output of a command that ended before its streams were handed out is whole, also to a late reader`, async (t) => {
    const transport = transportOf(t);
    const cookie = `starter-${randomUUID()}`;
    for (let i = 0; i < 50; i++) {
      const execution = await transport.exec(['sh', '-c', i % 2 === 0 ? 'exit 0' : `echo out${i}; echo err${i} >&2`], { cwd: tmpdir(), env, cookie });
      // The command is long done by now, and its pipes at their end: the reader comes late.
      await execution.exited;
      await tick();
      const [stdout, stderr] = await Promise.race([
        Promise.all([whole(execution.stdout), whole(execution.stderr)]),
        sleep(5000).then(() => ['(never ended)', '(never ended)']),
      ]);
      if (stdout !== (i % 2 === 0 ? '' : `out${i}\n`) || stderr !== (i % 2 === 0 ? '' : `err${i}\n`)) {
        t.fail(`command ${i}: stdout ${JSON.stringify(stdout)}, stderr ${JSON.stringify(stderr)}`);
        return;
      }
    }
    t.pass('50 commands: every stream ended, with all its output');
  });

  t.test(`${starter}: large binary output on both streams comes through byte for byte`, async (t) => {
    const transport = transportOf(t);
    const dir = t.testdir({});
    // Random bytes (frame headers, NULs, newlines among them), both streams at once, of sizes that straddle reads and frames.
    const script = 'head -c 3000001 /dev/urandom > out.bin; head -c 1500007 /dev/urandom > err.bin; cat out.bin & cat err.bin >&2; wait';
    const execution = await transport.exec(['sh', '-c', script], { cwd: dir, env, cookie: 'c' });
    const bytes = (stream: Readable) => new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      stream.on('data', (chunk: Buffer) => chunks.push(chunk));
      stream.on('end', () => resolve(Buffer.concat(chunks)));
      stream.on('error', reject);
    });
    const [status, stdout, stderr] = await Promise.all([execution.exited, bytes(execution.stdout), bytes(execution.stderr)]);
    t.same(status, { exitCode: 0, signal: null });
    t.ok(stdout.equals(readFileSync(join(dir, 'out.bin'))), `stdout, byte for byte (${stdout.length} bytes)`);
    t.ok(stderr.equals(readFileSync(join(dir, 'err.bin'))), `stderr, byte for byte (${stderr.length} bytes)`);
  });

  t.test(`${starter}: start errors come back as the exit code 127 with the error`, async (t) => {
    const transport = transportOf(t);
    const missingDir = join(tmpdir(), `missing-${randomUUID()}`);
    const missing = await transport.exec(['drover-no-such-command'], { cwd: tmpdir(), env, cookie: 'c' });
    const badCwd = await transport.exec(['true'], { cwd: missingDir, env, cookie: 'c' });
    if (starter === 'spawner') {
      t.match(await missing.exited, { exitCode: 127, signal: null, startError: { code: 'ENOENT' } });
      t.match(await badCwd.exited, { exitCode: 127, startError: { code: 'ENOENT' } });
    } else {
      t.match(await missing.exited, { exitCode: 127, signal: null, startError: { message: 'drover-no-such-command: command not found (on this machine)' } });
      t.match(await badCwd.exited, { exitCode: 127, startError: { message: `cannot enter the working directory ${missingDir} (on this machine)` } });
    }
    const nul = await transport.exec(['true', 'a\0b'], { cwd: tmpdir(), env, cookie: 'c' });
    t.match(await nul.exited, { exitCode: 127, startError: Error });
    const after = await transport.exec(['sh', '-c', 'exit 4'], { cwd: tmpdir(), env, cookie: 'c' });
    t.same(await after.exited, { exitCode: 4, signal: null }, `the ${starter} goes on after refusals`);
  });

  t.test(`${starter}: a command is found as execvp finds it, from its working directory, and gets exactly the environment given`, async (t) => {
    const transport = transportOf(t);
    const dir = mkdtempSync(join(tmpdir(), 'drover-find-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    mkdirSync(join(dir, 'bin'));
    writeFileSync(join(dir, 'bin', 'hello'), '#!/bin/sh\necho "hello from $0 with A=$A and HOME=${HOME-unset}"\n', { mode: 0o755 });
    writeFileSync(join(dir, 'plain'), 'echo not executable\n', { mode: 0o644 });
    const run = async (argv: string[], runEnv: Record<string, string>) => {
      const execution = await transport.exec(argv, { cwd: dir, env: runEnv, cookie: 'c' });
      const [status, stdout] = await Promise.all([execution.exited, whole(execution.stdout), whole(execution.stderr)]);
      return { status, stdout };
    };
    // A relative PATH entry and a relative command path count from the working directory.
    t.same(await run(['hello'], { PATH: 'bin', A: 'x=y' }), { status: { exitCode: 0, signal: null }, stdout: 'hello from bin/hello with A=x=y and HOME=unset\n' });
    t.same(await run(['./bin/hello'], { ...env, A: '' }), { status: { exitCode: 0, signal: null }, stdout: 'hello from ./bin/hello with A= and HOME=unset\n' });
    // A PATH entry whose file is not executable is passed over; a named file that is not executable does not start.
    t.match((await run(['plain'], { PATH: `.:${env.PATH}` })).status, { exitCode: 127, startError: Error });
    const notExecutable = (await run(['./plain'], env)).status;
    t.match(notExecutable, { exitCode: 127, startError: { message: starter === 'agent' ? /^\.\/plain: Permission denied/ : /EACCES/ } });
    t.match((await run(['./missing'], env)).status, { exitCode: 127, startError: { message: starter === 'agent' ? /^\.\/missing: no such file/ : /ENOENT/ } });
  });

  t.test(`${starter}: it dies: its running commands are killed and end so; the next command gets a new one`, async (t) => {
    const lines: string[] = [];
    const transport = transportOf(t, { logger: createLogger({ write: (line) => lines.push(line) }) });
    const cookie = `starter-${randomUUID()}`;
    killAtTeardown(cookie);
    const running = await transport.exec(['sh', '-c', 'sleep 300 & sleep 300; wait'], { cwd: tmpdir(), env, cookie });
    running.stdout.resume();
    const stderr = whole(running.stderr);
    await until(() => groupPids(running.pgid!).length === 3, 'sh and two sleeps');
    const helper = readProcStat(running.pgid!)?.ppid;
    t.ok(helper !== undefined && startersOf(process.pid, starter).includes(helper), `the command's parent is the ${starter}, a child of the worker`);
    process.kill(helper!, 'SIGKILL');
    if (starter === 'spawner') {
      t.same(await running.exited, { exitCode: null, signal: 'SIGKILL' }, 'the command ends as killed');
      t.ok(lines.some((line) => line.includes('the spawner process ended') && line.includes('killed')), 'the worker log says why');
    } else {
      t.same(await running.exited, { exitCode: 255, signal: null }, 'the command ends as one whose connection was lost');
      t.equal(await stderr, '[drover] the agent on this machine stopped while the command ran\n', 'its output says why');
      t.ok(lines.some((line) => line.includes('the agent ended while commands ran: they are killed') && line.includes('groups=1')), 'the worker log says why');
    }
    await until(() => groupPids(running.pgid!).length === 0, 'the group gone');
    t.same(pidsWithCookie(cookie), [], 'no process of the command is left');
    const next = await transport.exec(['sh', '-c', 'sleep 0.5; echo again'], { cwd: tmpdir(), env, cookie });
    const again = readProcStat(next.pgid!)?.ppid;
    t.ok(again !== undefined && again !== helper && startersOf(process.pid, starter).includes(again), `in a new ${starter}`);
    const [status, stdout] = await Promise.all([next.exited, whole(next.stdout), whole(next.stderr)]);
    t.same([status, stdout], [{ exitCode: 0, signal: null }, 'again\n'], 'a later command runs');
  });

  t.test(`${starter}: the worker dies: the ${starter} stops the command, then exits`, async (t) => {
    const cookie = `starter-${randomUUID()}`;
    killAtTeardown(cookie);
    const worker = spawn(process.execPath, [tsLoaderArg(), join(here, 'fixtures', 'starter-worker.mjs'), pathToFileURL(join(here, '..', 'src') + '/').href, tmpdir(), cookie, starter], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    t.teardown(() => void worker.kill('SIGKILL'));
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      worker.stdout!.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
      });
      worker.once('exit', (code) => reject(new Error(`the fixture exited (${code}) before reporting`)));
    });
    const { pgid } = JSON.parse(line) as { pgid: number };
    const [helper] = startersOf(worker.pid!, starter);
    t.ok(helper !== undefined, `the fixture has a ${starter}`);
    worker.kill('SIGKILL');
    await until(() => !isAlive(helper!), `the ${starter} to exit`);
    t.pass(`the ${starter} exited with its worker`);
    // Regression (spawner): it used to exit at once and leave the command running beside the task's re-run.
    t.same(groupPids(pgid), [], 'the command was stopped (sleep ends on SIGTERM)');
    t.same(pidsWithCookie(cookie), [], 'nothing with its cookie is left');
  });
}

const hasStrace = spawnSync('strace', ['-V'], { stdio: 'ignore' }).status === 0;

t.test('agent: a command whose exec is slow holds no other command up', { skip: hasStrace ? false : 'strace is not installed' }, async (t) => {
  const transport = new LocalTransport({ agent: true });
  t.teardown(() => transport.close());
  // Agents of transports closed by the tests before may be on their way out: this transport's is the new one.
  const others = new Set(startersOf(process.pid, 'agent'));
  const first = await transport.exec(['true'], { cwd: tmpdir(), env, cookie: 'c' });
  await first.exited;
  const ours = startersOf(process.pid, 'agent').filter((pid) => !others.has(pid));
  t.equal(ours.length, 1, 'the transport\'s agent runs');
  const agentPid = ours[0]!;
  const dir = mkdtempSync(join(tmpdir(), 'drover-slow-exec-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const slow = join(dir, 'slow');
  writeFileSync(slow, '#!/bin/sh\necho slow\n', { mode: 0o755 });
  // strace holds every execve of `slow` by the agent's children for 3 s: the child has forked and not yet exec'd.
  const tracer = spawn('strace', ['-f', '-P', slow, '-e', 'trace=execve', '-e', 'inject=execve:delay_enter=3000000', '-o', '/dev/null', '-p', String(agentPid)], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  t.teardown(() => tracer.kill('SIGKILL'));
  let traced = '';
  tracer.stderr!.on('data', (data: Buffer) => (traced += data.toString()));
  await until(() => traced.includes(`Process ${agentPid} attached`), 'strace to attach');

  let slowStarted = false;
  const slowExecution = transport.exec([slow], { cwd: dir, env, cookie: 'c' }).then((execution) => {
    slowStarted = true;
    return execution;
  });
  const quick = await transport.exec(['sh', '-c', 'echo quick'], { cwd: dir, env, cookie: 'c' });
  t.same(await Promise.all([quick.exited, whole(quick.stdout)]), [{ exitCode: 0, signal: null }, 'quick\n'], 'a command started after the slow one ran to its end');
  t.notOk(slowStarted, 'meanwhile the slow one had not exec\'d yet');
  const slowRun = await slowExecution;
  t.same(await Promise.all([slowRun.exited, whole(slowRun.stdout)]), [{ exitCode: 0, signal: null }, 'slow\n'], 'then the slow one started and ran');
});

t.test('a machine without perl: commands go through the spawner, and the log says so once', async (t) => {
  const lines: string[] = [];
  // The agent's shell looks perl up in the worker's PATH: a directory with sh's tools and no perl.
  const bin = mkdtempSync(join(tmpdir(), 'drover-noperl-'));
  t.teardown(() => rmSync(bin, { recursive: true, force: true }));
  for (const tool of ['sh', 'sleep']) symlinkSync(execFileSync('/bin/sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim(), join(bin, tool));
  const path = process.env['PATH'];
  process.env['PATH'] = bin;
  t.teardown(() => void (process.env['PATH'] = path));
  const transport = new LocalTransport({ logger: createLogger({ write: (line) => lines.push(line) }) });
  t.teardown(() => transport.close());
  for (let i = 0; i < 2; i++) {
    const execution = await transport.exec(['sh', '-c', 'sleep 0.2; echo $0', `run${i}`], { cwd: tmpdir(), env: { PATH: bin }, cookie: 'c' });
    const parent = readProcStat(execution.pgid!)?.ppid;
    t.ok(parent !== undefined && startersOf(process.pid, 'spawner').includes(parent), `command ${i} was started by a spawner`);
    const [status, stdout] = await Promise.all([execution.exited, whole(execution.stdout), whole(execution.stderr)]);
    t.same([status, stdout], [{ exitCode: 0, signal: null }, `run${i}\n`], `command ${i} runs`);
  }
  t.equal(lines.filter((line) => line.includes('this machine has no perl: commands are started by the spawner')).length, 1, 'said once');
});

t.test('an idle agent does not keep its process alive; one with a command in flight does', async (t) => {
  const script = [
    `const { LocalTransport } = await import(${JSON.stringify(pathToFileURL(join(here, '..', 'src', 'hosts', 'local.ts')).href)});`,
    'const transport = new LocalTransport();',
    "const env = { PATH: process.env.PATH };",
    "const first = await transport.exec(['sh', '-c', 'sleep 1; echo done'], { cwd: '/', env, cookie: 'c' });",
    "first.stdout.pipe(process.stdout);",
    "await first.exited;",
  ].join('\n');
  const started = Date.now();
  const { stdout, status } = await runNodeScript(script, 20_000);
  t.equal(stdout, 'done\n', 'the command in flight kept it alive to its end');
  t.equal(status, 0, 'then it exited by itself');
  t.ok(Date.now() - started < 15_000, 'without waiting for anything else');
});
