import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomUUID } from 'node:crypto';
import { COMPACT_BYTES, CrashJournal } from '../src/hosts/journal.js';
import { HardwareHost, LocalTransport } from '../src/hosts/local.js';
import { bootId, groupPids, isAlive, liveProcesses, parseProcStat, pidsWithCookie, processStartTime, readProcStat } from '../src/hosts/proc.js';
import { createLogger, type Logger } from '../src/runtime/logger.js';
import { tsLoaderArg } from './helpers/node-script.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const fixture = join(here, 'fixtures', 'crash-worker.mjs');

/**
 * How the fixture loads drover: by default src/ through tap's TypeScript
 * loader (always current, no build needed); DROVER_FIXTURE_MODULES=dist
 * uses the build in dist/ instead (run `npm run build` first).
 */
function fixtureCommand(): { nodeArgs: string[]; modulesBase: string } {
  if (process.env.DROVER_FIXTURE_MODULES === 'dist') {
    return { nodeArgs: [], modulesBase: pathToFileURL(join(here, '..', 'dist') + '/').href };
  }
  return { nodeArgs: [tsLoaderArg()], modulesBase: pathToFileURL(join(here, '..', 'src') + '/').href };
}

function captureLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: createLogger({ level: 'debug', write: (line) => lines.push(line) }), lines };
}

/** A scratch directory with journal/ and tasks/; every process with one of `cookies` is killed at teardown. */
function setup(t: Test): { root: string; journalDir: string; tasksDir: string; cookie(): string } {
  const root = realpathSync(mkdtempSync(join(tmpdir(), 'drover-cj-')));
  const cookies: string[] = [];
  t.teardown(() => {
    for (const cookie of cookies) {
      for (const pid of pidsWithCookie(cookie)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
    }
    rmSync(root, { recursive: true, force: true });
  });
  return {
    root,
    journalDir: join(root, 'journal'),
    tasksDir: join(root, 'tasks'),
    cookie: () => {
      const cookie = `test-${randomUUID()}`;
      cookies.push(cookie);
      return cookie;
    },
  };
}

async function until(check: () => boolean, what: string, timeoutMs = 8000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** Starts the fixture worker; resolves with its pid and its command's pgid once it reported them. */
async function startCrashWorker(
  t: Test,
  args: { journalDir: string; taskDir: string; cookie: string; script: string },
): Promise<{ worker: ChildProcess; pid: number; pgid: number }> {
  const { nodeArgs, modulesBase } = fixtureCommand();
  // A process group of its own, so that crash() kills the worker and its agent at once.
  const worker = spawn(process.execPath, [...nodeArgs, fixture, modulesBase, args.journalDir, args.taskDir, args.cookie, args.script], {
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  t.teardown(() => {
    if (worker.exitCode === null && worker.signalCode === null) process.kill(-worker.pid!, 'SIGKILL');
  });
  let stderr = '';
  worker.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`fixture did not report in time; stderr: ${stderr}`)), 15_000);
    worker.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(out.slice(0, nl));
      }
    });
    worker.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`fixture exited (${code}) before reporting; stderr: ${stderr}`));
    });
  });
  const { pid, pgid } = JSON.parse(line) as { pid: number; pgid: number };
  return { worker, pid, pgid };
}

/**
 * kill -9 of the worker and its agent together (the OOM killer, a container's stop): the commands,
 * each in a session of its own, are left to the journal. The agent (or the spawner) is in a session
 * of its own too, out of the worker's group: both are frozen first, so that neither sees the other
 * die and stops the commands itself. (The worker alone dying is the agent's to handle: it stops the
 * commands, see local-starters.test.ts.)
 */
async function crash(worker: ChildProcess): Promise<void> {
  const exited = new Promise((resolve) => worker.once('exit', resolve));
  const groups = [worker.pid!, ...liveProcesses().filter((stat) => stat.ppid === worker.pid).map((stat) => stat.pgrp)];
  for (const pgid of groups) process.kill(-pgid, 'SIGSTOP');
  for (const pgid of groups) process.kill(-pgid, 'SIGKILL');
  await exited;
}

t.test('parseProcStat reads fields after the last parenthesis', async (t) => {
  const text = '4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0';
  t.same(parseProcStat(text), { pid: 4242, state: 'S', ppid: 1, pgrp: 4240, session: 4240, startTime: 123456 });
  t.equal(parseProcStat('garbage'), undefined);
  const self = readProcStat(process.pid);
  t.equal(self?.pid, process.pid);
  t.equal(self?.state === 'R' || self?.state === 'S', true);
  t.ok(isAlive(process.pid));
  t.ok(isAlive(process.pid, processStartTime(process.pid)));
  t.notOk(isAlive(process.pid, (processStartTime(process.pid) ?? 0) + 1), 'another start time is another process');
  t.notOk(isAlive(2 ** 22 + 7), 'no such pid');
});

t.test('begin, noteProcessGroup, end', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const journal = new CrashJournal(journalDir);
  const cookie = newCookie();
  journal.begin({ cookie, runKey: 'T/1', taskDir: join(tasksDir, 'T') });
  journal.noteProcessGroup(cookie, process.pid);
  journal.noteProcessGroup(cookie, process.pid);
  const [entry, ...more] = new CrashJournal(journalDir).list();
  t.same(more, []);
  t.match(entry, {
    cookie,
    runKey: 'T/1',
    taskDir: join(tasksDir, 'T'),
    owner: { pid: process.pid, startTime: processStartTime(process.pid) },
    groups: [{ pgid: process.pid, startTime: processStartTime(process.pid) }],
  });
  t.equal(entry?.groups.length, 1, 'a group is noted once');
  t.same(readdirSync(journalDir), [basename(journal.path)], 'one file for the journal, no temporary files');
  journal.end(cookie);
  journal.end(cookie);
  t.same(journal.list(), [], 'end closes the entry; twice is fine');
  journal.close();
  t.same(readdirSync(journalDir), [], 'close removes the file when no entry is open');
});

t.test('a run creates no file; the file is compacted to the open entries as it grows', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const journal = new CrashJournal(journalDir);
  const open = newCookie();
  journal.begin({ cookie: open, runKey: 'open/0', taskDir: join(tasksDir, 'open') });
  journal.noteProcessGroup(open, process.pid);
  const runs = 2 * Math.ceil(COMPACT_BYTES / 300);
  let largest = 0;
  const files = new Set<string>();
  for (let i = 0; i < runs; i++) {
    const cookie = `ended-${i}`;
    journal.begin({ cookie, runKey: `ended/${i}`, taskDir: join(tasksDir, `ended-${i}`) });
    journal.noteProcessGroup(cookie, process.pid);
    journal.end(cookie);
    largest = Math.max(largest, statSync(journal.path).size);
    for (const name of readdirSync(journalDir)) files.add(name);
  }
  t.same([...files], [basename(journal.path)], `${runs} runs: never a file but the journal's own`);
  t.ok(largest <= COMPACT_BYTES + 1024, `the file stays near ${COMPACT_BYTES} bytes (largest ${largest})`);
  t.ok(statSync(journal.path).size < COMPACT_BYTES, 'it was compacted');
  t.match(new CrashJournal(journalDir).list(), [{ cookie: open, runKey: 'open/0', taskDir: join(tasksDir, 'open'), groups: [{ pgid: process.pid }] }], 'the open entry survived every compaction');
  t.equal(new CrashJournal(journalDir).list().length, 1, 'and only it');
  journal.end(open);
  journal.close();
  t.same(readdirSync(journalDir), []);
});

t.test('a torn last line is skipped; a file without its header is corrupt', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const journal = new CrashJournal(journalDir);
  const cookie = newCookie();
  journal.begin({ cookie, runKey: 'torn/0', taskDir: join(tasksDir, 'torn') });
  appendFileSync(journal.path, '{"op":"end","cook');
  t.match(new CrashJournal(journalDir).list(), [{ cookie, runKey: 'torn/0' }], 'the entry is still open');
  writeFileSync(join(journalDir, 'worker-1-deadbeef.jsonl'), '{"op":"begin","cookie":"x","runKey":"r","at":""}\n');
  const { logger, lines } = captureLogger();
  await new CrashJournal(journalDir).reap(logger);
  t.notOk(existsSync(join(journalDir, 'worker-1-deadbeef.jsonl')), 'the headless file was removed');
  t.ok(lines.some((l) => l.includes('removing corrupt entry')), 'and logged');
  t.ok(existsSync(journal.path), 'the live journal is kept');
  journal.end(cookie);
  journal.close();
});

t.test('reap after kill -9 of the worker: kills the group, removes the task dir and the entry', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const cookie = newCookie();
  const taskDir = join(tasksDir, 'crash-task');
  const { worker, pgid } = await startCrashWorker(t, { journalDir, taskDir, cookie, script: 'sleep 1000 & sleep 1000 & wait' });
  await until(() => groupPids(pgid).length === 3, 'sh and two sleeps');
  await crash(worker);
  await sleep(50);
  t.equal(groupPids(pgid).length, 3, 'the sleeps outlive their worker');
  t.ok(existsSync(join(taskDir, 'work.txt')));

  const { logger, lines } = captureLogger();
  const started = Date.now();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 1, processesKilled: 3, directoriesRemoved: 1 });
  t.same(groupPids(pgid), [], 'no non-zombie process of the group is left');
  t.same(pidsWithCookie(cookie), []);
  t.notOk(existsSync(taskDir), 'task directory removed');
  t.same(readdirSync(journalDir), [], 'entry removed');
  t.ok(lines.some((l) => l.includes('reaped run of a crashed worker') && l.includes('crash-task/0')), 'logged');
  t.ok(Date.now() - started < 3000, 'quick');

  const again = await new CrashJournal(journalDir).reap(logger);
  t.same(again, { entries: 0, processesKilled: 0, directoriesRemoved: 0 }, 'nothing left to reap');
});

t.test('reap finds a process that escaped to a new session through its cookie', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const cookie = newCookie();
  const taskDir = join(tasksDir, 'escape-task');
  const { worker, pgid } = await startCrashWorker(t, { journalDir, taskDir, cookie, script: 'setsid sleep 1000 & sleep 1000 & wait' });
  let escaped = 0;
  await until(() => {
    escaped = pidsWithCookie(cookie).find((pid) => readProcStat(pid)?.pgrp !== pgid) ?? 0;
    return escaped !== 0 && readProcStat(escaped)?.session === escaped && groupPids(pgid).length === 2;
  }, 'the escaped sleep');
  await crash(worker);
  t.ok(isAlive(escaped), 'the escapee runs, in a session of its own');

  const { logger } = captureLogger();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 1, processesKilled: 3, directoriesRemoved: 1 });
  t.notOk(isAlive(escaped), 'the escapee is gone');
  t.same(groupPids(pgid), []);
  t.same(pidsWithCookie(cookie), []);
  t.notOk(existsSync(taskDir));
});

t.test('an entry whose owner is alive is not reaped', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const cookie = newCookie();
  const taskDir = join(tasksDir, 'live-task');
  mkdirSync(taskDir, { recursive: true });
  const journal = new CrashJournal(journalDir);
  journal.begin({ cookie, runKey: 'live/0', taskDir });
  const execution = await new LocalTransport({ journal }).exec(['sleep', '1000'], { cwd: taskDir, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, cookie });
  t.teardown(async () => {
    await execution.kill('SIGKILL');
    await execution.waitGone(5000);
  });
  execution.stdout.resume();
  execution.stderr.resume();
  t.match(journal.list(), [{ cookie, groups: [{ pgid: execution.pgid }] }], 'the group was noted at spawn');

  const { logger } = captureLogger();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 0, processesKilled: 0, directoriesRemoved: 0 });
  t.same(groupPids(execution.pgid!).length, 1, 'its command still runs');
  t.ok(existsSync(taskDir));
  t.equal(journal.list().length, 1, 'its entry is kept');

  await execution.kill('SIGTERM');
  t.ok(await execution.waitGone(5000));
  t.match(await execution.exited, { exitCode: null, signal: 'SIGTERM' });
  await journal.end(cookie);
  t.same(journal.list(), []);
});

t.test('entries of a worker on another machine (a work directory shared over NFS) are left alone; this machine\'s are reaped', async (t) => {
  const { journalDir, tasksDir } = setup(t);
  mkdirSync(journalDir, { recursive: true });
  // A dead pid (above any pid_max), by default of another boot: gone, if it were this machine's.
  const write = (name: string, host: string, boot = 'another-boot') => {
    const taskDir = join(tasksDir, name);
    mkdirSync(taskDir, { recursive: true });
    writeFileSync(join(journalDir, `worker-${name}.jsonl`), [
      { journal: 2, owner: { pid: 2 ** 22 + 1, startTime: 1, bootId: boot, host }, createdAt: new Date().toISOString() },
      { op: 'begin', cookie: `cookie-${name}`, runKey: `${name}/0`, taskDir, at: new Date().toISOString() },
    ].map((line) => JSON.stringify(line) + '\n').join(''));
    return taskDir;
  };
  const elsewhere = write('elsewhere', `not-${hostname()}`);
  const here = write('here', hostname());
  // Another name on this kernel (the same boot id): a container made anew here; its predecessor's leftovers are ours.
  const container = write('container', `not-${hostname()}`, bootId()!);
  const { logger, lines } = captureLogger();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 2, processesKilled: 0, directoriesRemoved: 2 }, 'two entries reaped: this machine\'s');
  t.notOk(existsSync(here), 'the task directory of this machine\'s dead worker is gone');
  t.notOk(existsSync(container), 'and that of a dead worker of a container on this machine');
  t.ok(existsSync(elsewhere), 'the other machine\'s is still there');
  t.same(readdirSync(journalDir), ['worker-elsewhere.jsonl'], 'and so is its journal');
  t.match(lines.join('\n'), /entries of a worker on another machine left alone.*not-/);
  const mine = new CrashJournal(join(journalDir, '..', 'mine'));
  mine.begin({ cookie: 'c', runKey: 'r/0', taskDir: join(tasksDir, 'r-0') });
  t.match(mine.list(), [{ owner: { pid: process.pid, host: hostname() } }], 'a journal names the machine it was written on');
  mine.close();
});

t.test('a reused pid is not the owner, and a reused group id is not the run (an entry of the run-*.json layout before)', async (t) => {
  const { journalDir, tasksDir, cookie: newCookie } = setup(t);
  const cookie = newCookie();
  const taskDir = join(tasksDir, 'reused');
  mkdirSync(taskDir, { recursive: true });
  // An unrelated process group, alive, whose id the entry names with another leader start time.
  const unrelated = spawn('sleep', ['1000'], { detached: true, stdio: 'ignore' });
  t.teardown(() => void unrelated.kill('SIGKILL'));
  const unrelatedStart = processStartTime(unrelated.pid!)!;
  mkdirSync(journalDir, { recursive: true });
  writeFileSync(
    join(journalDir, 'run-0123456789abcdef0123456789abcdef.json'),
    JSON.stringify({
      version: 1,
      cookie,
      runKey: 'reused/0',
      taskDir,
      // this very process, but another start time: a pid reused since the entry was written
      owner: { pid: process.pid, startTime: processStartTime(process.pid)! + 1 },
      createdAt: new Date().toISOString(),
      groups: [{ pgid: unrelated.pid, startTime: Math.max(0, unrelatedStart - 1) }],
    }),
  );
  const { logger } = captureLogger();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 1, processesKilled: 0, directoriesRemoved: 1 });
  t.ok(isAlive(unrelated.pid!, unrelatedStart), 'the unrelated group was left alone');
  t.notOk(existsSync(taskDir));
  t.same(readdirSync(journalDir), []);
});

t.test('corrupt entries of the run-*.json layout before are logged and removed; stale temporary files too', async (t) => {
  const { journalDir } = setup(t);
  mkdirSync(journalDir, { recursive: true });
  writeFileSync(join(journalDir, 'run-corrupt.json'), '{"version":1,"cook');
  writeFileSync(join(journalDir, 'run-wrong.json'), JSON.stringify({ version: 1, cookie: 'x', runKey: 'r', owner: { pid: 'no' }, groups: [] }));
  writeFileSync(join(journalDir, 'run-x.json.tmp-999999999'), '{');
  writeFileSync(join(journalDir, 'README'), 'not an entry');
  const { logger, lines } = captureLogger();
  const report = await new CrashJournal(journalDir).reap(logger);
  t.same(report, { entries: 0, processesKilled: 0, directoriesRemoved: 0 });
  t.same(readdirSync(journalDir), ['README']);
  t.equal(lines.filter((l) => l.includes('removing corrupt entry')).length, 2);
  t.same(await new CrashJournal(join(journalDir, 'missing')).reap(logger), { entries: 0, processesKilled: 0, directoriesRemoved: 0 });
});

t.test('HardwareHost boots: identity, journal, reaps a crashed predecessor', async (t) => {
  const { root, tasksDir, cookie: newCookie } = setup(t);
  const cookie = newCookie();
  const taskDir = join(tasksDir, 'old-task');
  const journalDir = join(root, 'journal');
  const { worker, pgid } = await startCrashWorker(t, { journalDir, taskDir, cookie, script: 'sleep 1000 & wait' });
  await until(() => groupPids(pgid).length === 2, 'sh and its sleep');
  await crash(worker);

  const host = new HardwareHost({ workDir: root });
  t.equal(host.name, 'hardware');
  t.equal(host.journal.dir, journalDir);
  const { logger } = captureLogger();
  const identity = await host.boot({ logger, signal: new AbortController().signal });
  t.type(identity.hostname, 'string');
  t.match(identity.facts, { platform: 'linux', arch: String, cpus: /^\d+$/, memory: /GiB$/ });
  t.same(groupPids(pgid), [], 'the predecessor\'s command was reaped at boot');
  t.notOk(existsSync(taskDir));
  t.equal(host.shutdown.aborted, false);
  t.equal(host.transport(), host.transport(), 'one shared transport');
  t.same(host.transport().capabilities, { exec: true, files: true });
  await host.dispose();
  await host.dispose();
});

t.test('LocalTransport files', async (t) => {
  const { root } = setup(t);
  const transport = new LocalTransport();
  const dir = transport.join(root, 'a', 'b');
  await transport.mkdir(dir);
  await transport.mkdir(dir);
  t.same(await transport.stat(dir), { type: 'directory', size: (await transport.stat(dir))!.size });
  const file = transport.join(dir, 'f.txt');
  await transport.writeFile(file, 'hello');
  t.match(await transport.stat(file), { type: 'file', size: 5 });
  await transport.writeFile(transport.join(dir, 'bytes'), new Uint8Array([1, 2, 3]));
  t.match(await transport.stat(transport.join(dir, 'bytes')), { type: 'file', size: 3 });
  await transport.writeFile(transport.join(dir, 'copy'), await transport.readFile(file));
  const chunks: Buffer[] = [];
  for await (const chunk of await transport.readFile(transport.join(dir, 'copy'))) chunks.push(chunk as Buffer);
  t.equal(Buffer.concat(chunks).toString(), 'hello');
  await t.rejects(transport.readFile(transport.join(dir, 'missing')), { code: 'ENOENT' });
  await t.rejects(transport.readFile(dir), { code: 'EISDIR' });
  t.equal(await transport.stat(transport.join(dir, 'missing')), undefined);
  const { symlinkSync } = await import('node:fs');
  symlinkSync(file, transport.join(dir, 'link'));
  t.match(await transport.stat(transport.join(dir, 'link')), { type: 'symlink' });
  await transport.remove(transport.join(root, 'a'));
  await transport.remove(transport.join(root, 'a'));
  t.equal(await transport.stat(dir), undefined);
  // remove: an empty directory, a file, a symlink to a directory (its target stays)
  const empty = transport.join(root, 'empty');
  await transport.mkdir(empty);
  await transport.remove(empty);
  t.equal(await transport.stat(empty), undefined, 'an empty directory');
  const target = transport.join(root, 'target');
  await transport.mkdir(target);
  await transport.writeFile(transport.join(target, 'kept'), 'kept');
  const plain = transport.join(root, 'plain.txt');
  await transport.writeFile(plain, 'x');
  await transport.remove(plain);
  t.equal(await transport.stat(plain), undefined, 'a file');
  symlinkSync(target, transport.join(root, 'dirlink'));
  await transport.remove(transport.join(root, 'dirlink'));
  t.equal(await transport.stat(transport.join(root, 'dirlink')), undefined, 'a symlink to a directory');
  t.match(await transport.stat(transport.join(target, 'kept')), { type: 'file' }, 'whose target is left alone');
});
