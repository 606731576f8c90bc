/**
 * The gc plugin: named caches kept between tasks and lent to one task at a
 * time, purged on request, dropped when they cannot come back whole; and
 * the disk-space check before each claim, which removes old task
 * directories and least recently used caches, and holds the worker off
 * claiming while space cannot be made. Real commands in a real worker
 * (the runtime's, in this process) on an in-memory queue; the free-space
 * figure is injected so that a small threshold decides, but what is
 * evicted is real directories on disk.
 */
import { spawn } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { workerParts } from '../src/cli/worker-command.js';
import { ProcessEngine } from '../src/engines/process.js';
import { HardwareHost } from '../src/hosts/local.js';
import { processStartTime } from '../src/hosts/proc.js';
import type { Payload } from '../src/model/task.js';
import { CacheStore } from '../src/plugins/caches.js';
import { gcPlugin, type GcPlugin } from '../src/plugins/gc.js';
import type { Plugin } from '../src/plugins/plugin.js';
import { envPlugin } from '../src/plugins/env.js';
import { successPlugin } from '../src/plugins/success.js';
import { MemoryQueue } from '../src/queues/memory.js';
import type { TaskStatus } from '../src/queues/queue.js';
import { loadConfig } from '../src/runtime/config.js';
import { createLogger } from '../src/runtime/logger.js';
import type { Worker } from '../src/runtime/worker.js';
import { inProcessWorker } from './helpers/worker.js';
import { startTaskRun } from '../src/testing/task-run.js';
import { eventually, runOutcomes } from './helpers/drover.js';

const MB = 2 ** 20;

interface Harness {
  readonly workDir: string;
  readonly queue: MemoryQueue;
  readonly worker: Worker;
  readonly gc: GcPlugin;
  readonly lines: string[];
  /** A new directory beside the work directory, for a test's own files. */
  scratch(name: string): string;
  /** Submits a task and waits until it is resolved and cleaned up. */
  run(payload: Payload): Promise<TaskStatus>;
  submit(payload: Payload): Promise<string>;
  resolved(taskId: string): Promise<TaskStatus>;
}

interface HarnessOptions {
  readonly capacity?: number;
  readonly once?: boolean;
  readonly requiredDiskSpaceMegabytes?: number;
  readonly freeBytes?: (path: string) => Promise<number>;
}

/** A worker with the process engine, the success, env and gc plugins, in a fresh work directory. */
function gcWorker(t: Test, options: HarnessOptions = {}): Harness {
  // One test directory per test (a second t.testdir() call would empty it): the work directory and scratch beside it.
  const root = t.testdir();
  const workDir = join(root, 'work');
  mkdirSync(workDir);
  const queue = new MemoryQueue();
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', write: (line) => lines.push(line) });
  const gc = gcPlugin({
    workDir,
    requiredDiskSpaceMegabytes: options.requiredDiskSpaceMegabytes ?? 0,
    ...(options.freeBytes ? { freeBytes: options.freeBytes } : {}),
  });
  const worker = inProcessWorker(t, {
    workerId: 'gc-worker',
    queue,
    host: new HardwareHost({ workDir }),
    engine: new ProcessEngine({ killGraceMs: 500 }),
    // env: TASK_ID and friends, which commands here use, are the env plugin's.
    plugins: [successPlugin({ purgeCaches: gc.purgeCaches }), envPlugin(), gc],
    workDir,
    logger,
    capacity: options.capacity ?? 1,
    once: options.once ?? false,
    shutdownGraceMs: 1000,
    pollWaitMs: 200,
  });
  const submit = (payload: Payload) => queue.submit({ payload, deadline: Date.now() + 600_000, retries: 0 });
  const resolved = (taskId: string) =>
    eventually(`task ${taskId} to resolve`, async () => {
      const task = await queue.task(taskId);
      return task.state !== 'pending' && task.state !== 'running' ? task : undefined;
    });
  /** The run is reported before its cleanup gives the caches back: wait for that too (its task directory goes last). */
  const run = async (payload: Payload) => {
    const task = await resolved(await submit(payload));
    const taskDir = join(workDir, 'tasks', `${task.taskId}-${task.runs.length - 1}`);
    await eventually(`${taskDir} to be removed`, () => !existsSync(taskDir));
    return task;
  };
  const scratch = (name: string) => {
    mkdirSync(join(root, name));
    return join(root, name);
  };
  return { workDir, queue, worker, gc, lines, scratch, submit, resolved, run };
}

/** The idle instances of a cache on disk: `<workDir>/caches/<name>/<instance>`. */
function instances(workDir: string, cacheName: string): string[] {
  const dir = join(workDir, 'caches', cacheName);
  return existsSync(dir) ? readdirSync(dir).map((instance) => join(dir, instance)) : [];
}

function messageOf(task: TaskStatus): string {
  return task.runs.at(-1)?.message ?? '';
}

t.test('a cache one task wrote is found by the next task on the same worker', async (t) => {
  const h = gcWorker(t);
  const mounts = [{ cacheName: 'deps', directory: 'cache/deps' }];
  const first = await h.run({ command: 'test ! -e cache/deps/hello && echo hi > cache/deps/hello', mounts });
  t.same(runOutcomes(first), ['completed'], messageOf(first));
  t.equal(instances(h.workDir, 'deps').length, 1, 'the cache went home after the run');
  t.same(readdirSync(join(h.workDir, 'tasks')), [], 'and the task directory is gone');
  const second = await h.run({ command: 'cat cache/deps/hello > seen && test "$(cat seen)" = hi', mounts });
  t.same(runOutcomes(second), ['completed'], 'the second task read what the first wrote');
  t.equal(instances(h.workDir, 'deps').length, 1, 'still one instance: it was lent, not copied');
});

t.test('a cache is never lent to two tasks at once: the second gets a fresh instance', async (t) => {
  const h = gcWorker(t, { capacity: 2 });
  const sync = h.scratch('sync');
  // Each task marks the cache it got, then waits (bounded) until both run at once.
  const command = `ls cache > ${sync}/$TASK_ID.saw; touch cache/$TASK_ID; touch ${sync}/$TASK_ID.started; ` +
    `for i in $(seq 400); do [ $(ls ${sync} | grep -c started) -ge 2 ] && exit 0; sleep 0.05; done; exit 9`;
  const mounts = [{ cacheName: 'shared', directory: 'cache' }];
  const ids = await Promise.all([h.submit({ command, mounts }), h.submit({ command, mounts })]);
  const tasks = await Promise.all(ids.map((id) => h.resolved(id)));
  await eventually('both runs to be cleaned up', () => readdirSync(join(h.workDir, 'tasks')).length === 0);
  t.same(tasks.map(runOutcomes), [['completed'], ['completed']], 'both ran at the same time');
  for (const id of ids) t.equal(readFileSync(join(sync, `${id}.saw`), 'utf8'), '', `task ${id} got an empty cache of its own`);
  const homes = instances(h.workDir, 'shared');
  t.equal(homes.length, 2, 'both instances are kept');
  t.same(homes.map((home) => readdirSync(home)).sort((a, b) => a[0]!.localeCompare(b[0]!)), ids.map((id) => [id]).sort((a, b) => a[0]!.localeCompare(b[0]!)),
    'each instance holds the marks of exactly one task');
  const third = await h.run({ command: `ls cache > ${sync}/third.saw`, mounts });
  t.same(runOutcomes(third), ['completed']);
  t.equal(readFileSync(join(sync, 'third.saw'), 'utf8').trim().split('\n').length, 1, 'a later task gets one of them, whole');
});

t.test('the store lends an instance once: a second lend while it is out makes another', async (t) => {
  const dir = t.testdir({ tasks: { a: {}, b: {}, c: {} } });
  const store = new CacheStore(join(dir, 'caches'));
  await store.open();
  const first = await store.lend('x', join(dir, 'tasks/a/cache'));
  const second = await store.lend('x', join(dir, 'tasks/b/cache'));
  t.ok(first.fresh && second.fresh);
  t.not(first.instance, second.instance);
  writeFileSync(join(first.path, 'mark'), 'first');
  t.same(await store.giveBack(first), { kept: true });
  const third = await store.lend('x', join(dir, 'tasks/c/cache'));
  t.equal(third.instance, first.instance, 'the idle one is lent again');
  t.equal(readFileSync(join(third.path, 'mark'), 'utf8'), 'first');
  t.same((await store.idle()).length, 0, 'nothing is idle while both are out');
});

t.test('onExitStatus.purgeCaches purges the caches the task used; other codes keep them', async (t) => {
  const h = gcWorker(t);
  const mounts = [{ cacheName: 'build', directory: 'out' }];
  const kept = await h.run({ command: 'echo 1 > out/stamp; exit 5', mounts, onExitStatus: { purgeCaches: [4] } });
  t.same(runOutcomes(kept), ['failed']);
  t.equal(instances(h.workDir, 'build').length, 1, 'exit code 5 is not listed: the cache is kept');
  const purged = await h.run({ command: 'test -e out/stamp && echo 2 > out/stamp; exit 4', mounts, onExitStatus: { purgeCaches: [4] } });
  t.same(runOutcomes(purged), ['failed'], 'the verdict is still the exit code\'s');
  t.same(instances(h.workDir, 'build'), [], 'the cache is gone');
  const after = await h.run({ command: 'test ! -e out/stamp', mounts });
  t.same(runOutcomes(after), ['completed'], 'the next task starts with an empty cache');
  t.match(h.lines.join('\n'), /gc: cache purged.*cacheName=build/);
});

t.test('a cache that cannot come back whole is dropped, never half-kept', async (t) => {
  const h = gcWorker(t);
  const outside = h.scratch('outside');
  writeFileSync(join(outside, 'precious.txt'), 'not the cache');
  const mounts = [{ cacheName: 'fragile', directory: 'sub/cache' }];
  await h.run({ command: 'echo one > sub/cache/a', mounts });
  t.equal(instances(h.workDir, 'fragile').length, 1);
  const removed = await h.run({ command: 'rm -rf sub/cache', mounts });
  t.same(runOutcomes(removed), ['completed']);
  t.same(instances(h.workDir, 'fragile'), [], 'the task removed its cache: nothing to keep');
  // A task that puts a symlink in place of the cache's parent does not get the link's target kept as the cache.
  await h.run({ command: 'echo two > sub/cache/a', mounts });
  const swapped = await h.run({ command: `mv sub elsewhere && ln -s ${outside} sub && mkdir -p ${outside}/cache`, mounts });
  t.same(runOutcomes(swapped), ['completed']);
  t.same(instances(h.workDir, 'fragile'), [], 'dropped');
  t.ok(lstatSync(join(outside, 'cache')).isDirectory(), 'what the link pointed at stays where it was');
  t.equal(readFileSync(join(outside, 'precious.txt'), 'utf8'), 'not the cache');
  t.match(h.lines.join('\n'), /gc: cache dropped/);
});

t.test('mounts are checked: confined to the task directory, one place per cache, no overlaps', async (t) => {
  const h = gcWorker(t);
  const mounts = [
    { cacheName: 'a', directory: '../escape' },
    { cacheName: 'b', directory: '/abs' },
    { cacheName: 'c', directory: 'c/./..' },
    { cacheName: 'd', directory: 'x' },
    { cacheName: 'd', directory: 'y' },
    { cacheName: 'e', directory: 'x/inner' },
  ];
  const badName = await h.run({ command: 'true', mounts: [...mounts, { cacheName: 'no/slash', directory: 'z' }] });
  t.same(runOutcomes(badName), ['exception/malformed-payload']);
  t.match(messageOf(badName), /payload\.mounts\[6\]\.cacheName/, 'the schema refuses a name that is no directory name');
  const checked = await h.run({ command: 'true', mounts });
  const problems = messageOf(checked);
  t.same(runOutcomes(checked), ['exception/malformed-payload']);
  t.match(problems, /payload\.mounts\[0\]\.directory: \.\.\/escape is not inside the task directory/);
  t.match(problems, /payload\.mounts\[1\]\.directory: \/abs is not inside the task directory/);
  t.match(problems, /payload\.mounts\[2\]\.directory: a cache cannot be the task directory itself/);
  t.match(problems, /payload\.mounts\[4\]\.cacheName: cache d is mounted twice/);
  t.match(problems, /payload\.mounts\[5\]\.directory: x\/inner overlaps the directory of cache d/);
  t.notOk(existsSync(join(h.workDir, 'escape')), 'nothing was made outside');
});

t.test('a mount through a symlink in the task directory is refused, and nothing is made outside', async (t) => {
  const root = t.testdir({ outside: {}, work: {} });
  const outside = join(root, 'outside');
  // Stands for an engine that put a symlink in the task directory before the caches are lent.
  const linker: Plugin = { name: 'linker', newTask: () => ({ buildSandbox: async (_builder, { taskDir }) => symlinkSync(outside, join(taskDir, 'link')) }) };
  const gc = gcPlugin({ workDir: join(root, 'work'), requiredDiskSpaceMegabytes: 0 });
  const run = await startTaskRun({ payload: { mock: {}, mounts: [{ cacheName: 'a', directory: 'link/deep/cache' }] }, plugins: [linker, gc] });
  t.teardown(() => run.close());
  const { resolution } = await run.output;
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload');
  t.match(resolution?.message, /payload\.mounts\[0\]\.directory: link\/deep\/cache leads out of the task directory \(plugin gc\)/);
  t.same(readdirSync(outside), [], 'nothing was made at the link\'s target');
});

t.test('a worker that runs tasks over SSH refuses mounts, saying why', async (t) => {
  const { plugins } = await workerParts(loadConfig({ env: { DROVER_WORK_DIR: t.testdir(), DROVER_REQUIRED_DISK_SPACE_MEGABYTES: String(2 ** 40) } }), true);
  const gc = plugins.find((plugin) => plugin.name === 'gc')!;
  t.equal(await gc.beforeClaim!({ workerId: 'w', logger: createLogger({ write: () => {} }) }), undefined, 'the local disk is not watched');
  const run = await startTaskRun({ payload: { mock: {}, mounts: [{ cacheName: 'a', directory: 'a' }] }, plugins: [gc] });
  t.teardown(() => run.close());
  const { resolution } = await run.output;
  t.equal(resolution?.state === 'exception' && resolution.reason, 'malformed-payload');
  t.match(resolution?.message, /payload\.mounts: caches are kept only on the worker's own machine, and this worker runs tasks over SSH/);
});

t.test('disk pressure: old task directories go first, then idle caches, least recently used first', async (t) => {
  const h = gcWorker(t);
  const mountOf = (cacheName: string) => [{ cacheName, directory: 'c' }];
  // Three caches of 300 KB each, used in the order a, b, c, then a again: b is the least recently used.
  for (const name of ['a', 'b', 'c', 'a']) {
    const task = await h.run({ command: 'head -c 307200 /dev/zero > c/blob', mounts: mountOf(name) });
    t.same(runOutcomes(task), ['completed']);
  }
  // A task directory a crashed run left behind, 300 KB too, older than anything.
  mkdirSync(join(h.workDir, 'tasks', 'old-0'), { recursive: true });
  writeFileSync(join(h.workDir, 'tasks', 'old-0', 'blob'), Buffer.alloc(307200));
  // A task directory of another worker that is alive: never removed.
  const other = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.teardown(() => void other.kill('SIGKILL'));
  await eventually('the other worker to start', () => processStartTime(other.pid!) !== undefined);
  const busy = join(h.workDir, 'tasks', 'busy-0');
  mkdirSync(busy);
  writeFileSync(join(busy, 'blob'), Buffer.alloc(307200));
  mkdirSync(join(h.workDir, 'journal'), { recursive: true });
  writeFileSync(join(h.workDir, 'journal', 'run-other.json'), JSON.stringify({
    version: 1, cookie: 'other', runKey: 'busy/0', taskDir: busy, createdAt: new Date().toISOString(), groups: [],
    owner: { pid: other.pid, startTime: processStartTime(other.pid!) },
  }));
  // A task directory of a worker on another machine that shares this work directory (NFS): whether it lives
  // cannot be told from here, so it is never removed, though no process here has its pid.
  const remote = join(h.workDir, 'tasks', 'remote-0');
  mkdirSync(remote);
  utimesSync(remote, 0, 0);
  writeFileSync(join(h.workDir, 'journal', 'run-remote.json'), JSON.stringify({
    version: 1, cookie: 'remote', runKey: 'remote/0', taskDir: remote, createdAt: new Date().toISOString(), groups: [],
    owner: { pid: 2 ** 22 + 1, startTime: 1, bootId: 'another-boot', host: `not-${hostname()}` },
  }));
  // A task directory of a worker of this machine before a reboot, whose pid and start time a live process has now: gone.
  const rebooted = join(h.workDir, 'tasks', 'rebooted-0');
  mkdirSync(rebooted);
  utimesSync(rebooted, 0, 0);
  writeFileSync(join(h.workDir, 'journal', 'run-rebooted.json'), JSON.stringify({
    version: 1, cookie: 'rebooted', runKey: 'rebooted/0', taskDir: rebooted, createdAt: new Date().toISOString(), groups: [],
    owner: { pid: other.pid, startTime: processStartTime(other.pid!), bootId: 'another-boot', host: hostname() },
  }));

  // The disk, as the plugin sees it: 1.5 MB minus what the work directory holds (1.5 MB now).
  let budget = 1.75 * MB;
  const freeBytes = async () => budget - await diskUsage(h.workDir);
  const lines: string[] = [];
  const logger = createLogger({ write: (line) => lines.push(line) });
  const gc = gcPlugin({ workDir: h.workDir, requiredDiskSpaceMegabytes: 0.5, freeBytes });
  const exists = () => ({ old: existsSync(join(h.workDir, 'tasks', 'old-0')), a: instances(h.workDir, 'a').length, b: instances(h.workDir, 'b').length, c: instances(h.workDir, 'c').length });

  t.equal(await gc.beforeClaim!({ workerId: 'w', logger }), undefined, 'room enough after removing the old task directory');
  t.same(exists(), { old: false, a: 1, b: 1, c: 1 }, 'the leftover task directories went first; every cache is kept');
  t.notOk(existsSync(rebooted), 'also the one of a worker before a reboot, whose pid and start time a live process has');
  t.ok(existsSync(busy), 'the live worker\'s task directory stays');

  budget -= 0.3 * MB;
  t.equal(await gc.beforeClaim!({ workerId: 'w', logger }), undefined);
  t.same(exists(), { old: false, a: 1, b: 0, c: 1 }, 'b, the least recently used cache, was evicted, and only b');

  budget -= 0.3 * MB;
  t.equal(await gc.beforeClaim!({ workerId: 'w', logger }), undefined);
  t.same(exists(), { old: false, a: 1, b: 0, c: 0 }, 'then c');

  budget -= 0.6 * MB;
  const reason = await gc.beforeClaim!({ workerId: 'w', logger });
  t.same(exists(), { old: false, a: 0, b: 0, c: 0 }, 'then a, and still not enough');
  t.match(reason, /^0\.\d MB free in .*, below requiredDiskSpaceMegabytes \(0\.5 MB\), and no idle cache or old task directory is left to remove$/);
  t.ok(existsSync(busy), 'the live worker\'s task directory is still there');
  t.ok(existsSync(remote), 'the task directory of the worker on another machine too');
  const evicted = lines.filter((line) => line.includes('gc: ')).map((line) => /cacheName=(\w+)|taskDir=\S*((?:old|rebooted)-0)/.exec(line)?.slice(1).find(Boolean));
  t.same(evicted, ['rebooted-0', 'old-0', 'b', 'c', 'a'], 'the log names each eviction, in order');
  t.same(await readdir(join(h.workDir, 'caches')).then((names) => names.filter((name) => name.startsWith('.'))), [], 'no eviction leftovers');
});

t.test('disk pressure never takes a cache or a task directory from a running task', async (t) => {
  let free = 10 * MB;
  const h = gcWorker(t, { requiredDiskSpaceMegabytes: 1, freeBytes: async () => free });
  await h.run({ command: 'echo old > c/file', mounts: [{ cacheName: 'idle', directory: 'c' }] });
  const sync = h.scratch('sync');
  const id = await h.submit({
    command: `echo mine > c/file; touch ${sync}/started; for i in $(seq 400); do [ -e ${sync}/go ] && exit 0; sleep 0.05; done; exit 9`,
    mounts: [{ cacheName: 'busy', directory: 'c' }],
  });
  await eventually('the task to start', () => existsSync(join(sync, 'started')));
  free = 0;
  const reason = await h.gc.beforeClaim!({ workerId: 'w', logger: createLogger({ write: () => {} }) });
  t.match(reason, /0\.0 MB free/, 'nothing it may remove makes room');
  t.same(instances(h.workDir, 'idle'), [], 'the idle cache was evicted');
  const taskDir = join(h.workDir, 'tasks', `${id}-0`);
  t.equal(readFileSync(join(taskDir, 'c', 'file'), 'utf8'), 'mine\n', 'the running task keeps its directory and its cache');
  free = 10 * MB;
  writeFileSync(join(sync, 'go'), '');
  t.same(runOutcomes(await h.resolved(id)), ['completed']);
  await eventually('the busy cache to come home', () => instances(h.workDir, 'busy').length === 1);
});

t.test('the worker holds off claiming while space cannot be made, and claims again when it can; no task fails', async (t) => {
  let free = 0;
  let checks = 0;
  const h = gcWorker(t, {
    requiredDiskSpaceMegabytes: 1,
    freeBytes: async () => {
      checks += 1;
      return free;
    },
  });
  const id = await h.submit({ command: 'echo ran' });
  const reason = await eventually('the worker to hold off', () => h.worker.heldOff());
  t.match(reason, /^gc: 0\.0 MB free in .*, below requiredDiskSpaceMegabytes \(1 MB\)/);
  const before = checks;
  await eventually('a few more checks', () => checks >= before + 3);
  t.equal((await h.queue.task(id)).state, 'pending', 'the task waits in the queue, unclaimed');
  t.equal(h.worker.state(), 'claiming.polling', 'the worker machine is where it always is');
  const warnings = h.lines.filter((line) => line.includes('holding off claiming'));
  t.equal(warnings.length, 1, 'one warning while holding off, however many checks');
  t.match(warnings[0], /warn .*plugin=gc .*0\.0 MB free.*requiredDiskSpaceMegabytes \(1 MB\)/);

  free = 2 * MB;
  const task = await h.resolved(id);
  t.same(runOutcomes(task), ['completed'], 'the task ran once space was back');
  t.equal(h.worker.heldOff(), undefined);
  t.match(h.lines.join('\n'), /info .*claiming again plugin=gc/);
});

t.test('--once: a worker holding off does not take the queue for drained', async (t) => {
  let free = 0;
  const h = gcWorker(t, { once: true, requiredDiskSpaceMegabytes: 1, freeBytes: async () => free });
  const id = await h.submit({ command: 'true' });
  await eventually('the worker to hold off', () => h.worker.heldOff());
  t.equal(h.worker.state(), 'claiming.polling', 'not stopped');
  free = 2 * MB;
  t.same(runOutcomes(await h.resolved(id)), ['completed']);
  const { reason } = await h.worker.stopped;
  t.same(reason, { kind: 'drained' }, 'and then it stops as drained');
});

/** The bytes of the files under `path` (symlinks not followed). */
async function diskUsage(path: string): Promise<number> {
  const stats = await lstat(path).catch(() => undefined);
  if (stats === undefined) return 0;
  if (!stats.isDirectory()) return stats.size;
  const sizes = await Promise.all((await readdir(path)).map((name) => diskUsage(join(path, name))));
  return sizes.reduce((sum, size) => sum + size, 0);
}
