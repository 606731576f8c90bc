/**
 * The spawner (src/hosts/spawner.ts): the small process that starts the
 * local transport's commands. Its pipes, its death, and the worker's.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Readable } from 'node:stream';
import { LocalTransport } from '../src/hosts/local.js';
import { groupPids, isAlive, liveProcesses, pidsWithCookie } from '../src/hosts/proc.js';
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

/** The spawner processes whose parent is `parent`: node children running `-e`. */
function spawnersOf(parent: number): number[] {
  return liveProcesses()
    .filter((stat) => stat.ppid === parent)
    .filter((stat) => {
      try {
        return readFileSync(`/proc/${stat.pid}/cmdline`, 'utf8').split('\0').includes('-e');
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

t.test('regression: output of a command that ended before its streams were handed out is whole, also to a late reader', async (t) => {
  const transport = new LocalTransport();
  t.teardown(() => transport.close());
  const cookie = `spawner-${randomUUID()}`;
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

t.test('start errors come back as the exit code 127 with the error', async (t) => {
  const transport = new LocalTransport();
  t.teardown(() => transport.close());
  const missing = await transport.exec(['drover-no-such-command'], { cwd: tmpdir(), env, cookie: 'c' });
  t.match(await missing.exited, { exitCode: 127, signal: null, startError: { code: 'ENOENT' } });
  const badCwd = await transport.exec(['true'], { cwd: join(tmpdir(), `missing-${randomUUID()}`), env, cookie: 'c' });
  t.match(await badCwd.exited, { exitCode: 127, startError: { code: 'ENOENT' } });
  const nul = await transport.exec(['true', 'a\0b'], { cwd: tmpdir(), env, cookie: 'c' });
  t.match(await nul.exited, { exitCode: 127, startError: Error });
  const after = await transport.exec(['sh', '-c', 'exit 4'], { cwd: tmpdir(), env, cookie: 'c' });
  t.same(await after.exited, { exitCode: 4, signal: null }, 'the spawner goes on after refusals');
});

t.test('the spawner dies: its running commands are killed and end so; the next command gets a new spawner', async (t) => {
  const lines: string[] = [];
  const transport = new LocalTransport({ logger: createLogger({ write: (line) => lines.push(line) }) });
  t.teardown(() => transport.close());
  const cookie = `spawner-${randomUUID()}`;
  killAtTeardown(cookie);
  const running = await transport.exec(['sh', '-c', 'sleep 300 & sleep 300; wait'], { cwd: tmpdir(), env, cookie });
  running.stdout.resume();
  running.stderr.resume();
  await until(() => groupPids(running.pgid!).length === 3, 'sh and two sleeps');
  const [spawner, ...others] = spawnersOf(process.pid);
  t.ok(spawner !== undefined && others.length === 0, 'one spawner process, a child of the worker');
  process.kill(spawner!, 'SIGKILL');
  t.same(await running.exited, { exitCode: null, signal: 'SIGKILL' }, 'the command ends as killed');
  await until(() => groupPids(running.pgid!).length === 0, 'the group gone');
  t.same(pidsWithCookie(cookie), [], 'no process of the command is left');
  t.ok(lines.some((line) => line.includes('the spawner process ended') && line.includes('killed')), 'the worker log says why');
  const next = await transport.exec(['sh', '-c', 'echo again'], { cwd: tmpdir(), env, cookie });
  const [status, stdout] = await Promise.all([next.exited, whole(next.stdout), whole(next.stderr)]);
  t.same([status, stdout], [{ exitCode: 0, signal: null }, 'again\n'], 'a later command runs');
  t.not(spawnersOf(process.pid)[0], spawner, 'in a new spawner');
});

t.test('the worker dies: the spawner exits, and the command stays for the crash journal', async (t) => {
  const cookie = `spawner-${randomUUID()}`;
  killAtTeardown(cookie);
  const loader = process.execArgv.find((arg) => arg.startsWith('--import=') && arg.includes('@tapjs/typescript')) ?? `--import=${import.meta.resolve('@tapjs/typescript/import')}`;
  const worker = spawn(process.execPath, [loader, join(here, 'fixtures', 'spawner-worker.mjs'), pathToFileURL(join(here, '..', 'src') + '/').href, tmpdir(), cookie], {
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
  const [spawner] = spawnersOf(worker.pid!);
  t.ok(spawner !== undefined, 'the fixture has a spawner');
  worker.kill('SIGKILL');
  await until(() => !isAlive(spawner!), 'the spawner to exit');
  t.pass('the spawner exited with its worker');
  t.same(groupPids(pgid).length, 1, 'the command still runs, in its own session');
  t.same(pidsWithCookie(cookie), groupPids(pgid), 'and carries its cookie, for the journal to find');
});
