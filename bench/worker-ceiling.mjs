#!/usr/bin/env node
/**
 * drover's own cost per task, with nothing to run: N tasks whose payload is
 * `{ mock: {} }` (the mock engine ends each at once) through a worker in this
 * process, on the embedded queue, with the shipped plugins and task
 * directories on this machine. What it prints is the ceiling the worker's
 * main thread sets on any engine's tasks/s (its event loop is busy all along),
 * and the process's CPU per task:
 *
 *   npm run -s build && node bench/worker-ceiling.mjs 6000 8
 *   node --cpu-prof --cpu-prof-dir=/tmp/prof bench/worker-ceiling.mjs 6000 8
 *   node bench/worker-ceiling.mjs --allocations 3000 8
 *
 * `--allocations` also samples what the worker allocates (V8's sampling heap
 * profiler, counting objects the garbage collector has freed since, which a
 * heap snapshot or `--heap-prof` leave out) and prints the bytes per task, by
 * package and by function: what makes the scavenges. The worker's start (its
 * payload schema's compilation, some 5 MB) is counted too: use a few thousand
 * tasks, so that it weighs little.
 *
 * `--without-machines` runs the same work without the worker and task
 * machines: the runtime's functions that the task machine's actors run (load,
 * run, upload, report, cleanup; and reclaim beside them, from the claim to
 * the report) in that order for each claim, up to CAPACITY runs at once,
 * with the plugins' beforeClaim before each claim. The difference to a run
 * without it is what the machines cost (xstate: the actors, events and
 * snapshots of a task's life).
 *
 * Usage: node worker-ceiling.mjs [--allocations] [--without-machines] [TASKS [CAPACITY [ROOT]]] (6000, 8, this checkout)
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const flags = new Set();
while (['--allocations', '--without-machines'].includes(args[0])) flags.add(args.shift());
const [tasksArg = '6000', capacityArg = '8', rootArg, ...rest] = args;
const tasks = Number(tasksArg);
const capacity = Number(capacityArg);
const valid = Number.isInteger(tasks) && tasks > 0 && tasks <= 1_000_000 && Number.isInteger(capacity) && capacity > 0;
if (!valid || rest.length > 0 || args.some((arg) => arg.startsWith('--'))) {
  process.stderr.write('usage: node worker-ceiling.mjs [--allocations] [--without-machines] [TASKS (1..1000000) [CAPACITY [ROOT]]]\n');
  process.exit(2);
}
const root = rootArg ?? join(dirname(fileURLToPath(import.meta.url)), '..');
const load = (path) => import(join(root, 'dist', path));
const [{ startWorker }, { SqliteQueue }, { HardwareHost }, { MockEngine }, { shippedPlugins }, { createLogger }, { createTaskActors }, { compilePayloadValidator, joinedPayloadSchema }] = await Promise.all(
  ['runtime/worker.js', 'queues/sqlite.js', 'hosts/local.js', 'engines/mock.js', 'plugins/index.js', 'runtime/logger.js', 'runtime/task-actors.js', 'runtime/schema.js'].map(load),
);

const dir = mkdtempSync(join(tmpdir(), 'drover-ceiling-'));
try {
  const queue = SqliteQueue.open({ dir: join(dir, 'queue') });
  const definitions = Array.from({ length: tasks }, () => ({ payload: { mock: {} }, deadline: Date.now() + 3_600_000, retries: 0 }));
  // A ROOT built before submitMany (b7fc4e1) queues them one at a time.
  if (queue.submitMany) await queue.submitMany(definitions);
  else for (const definition of definitions) await queue.submit(definition);
  const sampler = flags.has('--allocations') ? await startSampling() : undefined;
  const cpu = process.cpuUsage();
  const loop = performance.eventLoopUtilization();
  const start = performance.now();
  const options = {
    workerId: 'ceiling', queue, host: new HardwareHost({ workDir: join(dir, 'work') }), engine: new MockEngine(), plugins: shippedPlugins(),
    workDir: join(dir, 'work'), logger: createLogger({ level: 'warn' }), capacity, maxTasks: 0, once: true, idleTimeoutMs: 0, shutdownGraceMs: 0, pollWaitMs: 1000,
  };
  if (flags.has('--without-machines')) {
    await withoutMachines(options);
  } else {
    const { reason } = await startWorker(options).stopped;
    if (reason.kind !== 'drained') throw new Error(`the worker stopped: ${JSON.stringify(reason)}`);
  }
  const ms = performance.now() - start;
  const used = process.cpuUsage(cpu);
  const allocated = await sampler?.stop();
  const unresolved = (await queue.listTasks({ limit: tasks })).filter((task) => task.state !== 'completed').length;
  if (unresolved > 0) throw new Error(`${unresolved} of ${tasks} tasks did not complete`);
  console.log(`${tasks} tasks at capacity ${capacity}${flags.has('--without-machines') ? ' without the machines' : ''}: `
    + `${((tasks / ms) * 1000).toFixed(0)} tasks/s, ${((used.user + used.system) / 1000 / tasks).toFixed(3)} ms of CPU per task, `
    + `event loop ${(100 * performance.eventLoopUtilization(loop).utilization).toFixed(0)}% busy`);
  if (allocated) printAllocations(allocated, tasks);
  await queue.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}

/** Starts V8's sampling heap profiler on this process, garbage included; `stop()` gives the profile. */
async function startSampling() {
  const session = new Session();
  session.connect();
  await session.post('HeapProfiler.startSampling', {
    samplingInterval: 4096, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true,
  });
  return {
    async stop() {
      const { profile } = await session.post('HeapProfiler.stopSampling');
      session.disconnect();
      return profile;
    },
  };
}

/** Bytes allocated per task, by package (or drover's file) and by function, largest first. */
function printAllocations(profile, count) {
  const byPackage = new Map();
  const byFunction = new Map();
  let total = 0;
  const add = (map, key, bytes) => map.set(key, (map.get(key) ?? 0) + bytes);
  // A built-in (Set, Map, sort: no script of its own) is counted with the function that called it.
  const visit = (node, caller) => {
    const { functionName, url, lineNumber } = node.callFrame;
    const name = `${functionName || '(anonymous)'}${url ? ` ${url.split('/').slice(-2).join('/')}:${lineNumber + 1}` : ''}`;
    const where = !url && caller ? caller.where
      : url.includes('node_modules/') ? url.split('node_modules/')[1].split('/')[0]
        : url.includes('/dist/') ? `drover ${url.split('/dist/')[1]}` : url || `(${functionName || 'native'})`;
    add(byPackage, where, node.selfSize);
    add(byFunction, !url && caller ? `${functionName || '(native)'} in ${caller.name}` : name, node.selfSize);
    total += node.selfSize;
    for (const child of node.children) visit(child, { where, name });
  };
  visit(profile.head);
  const perTask = (bytes) => `${(bytes / count / 1024).toFixed(1).padStart(6)} KiB`;
  console.log(`allocated: ${perTask(total).trim()} per task (sampled), by package:`);
  for (const [key, bytes] of [...byPackage].sort((a, b) => b[1] - a[1]).slice(0, 8)) console.log(`${perTask(bytes)}  ${key}`);
  console.log('by function:');
  for (const [key, bytes] of [...byFunction].sort((a, b) => b[1] - a[1]).slice(0, 15)) console.log(`${perTask(bytes)}  ${key}`);
}

/** The worker's work for every task, in the machines' order, with no machine: see `--without-machines`. */
async function withoutMachines({ workerId, queue, host, engine, plugins, workDir, logger, capacity }) {
  const signal = new AbortController().signal;
  await host.boot({ logger, signal });
  for (const plugin of plugins) await plugin.boot?.({ workerId, logger });
  const validatePayload = compilePayloadValidator(joinedPayloadSchema({ engine, plugins }));
  // What each of the task machine's actors runs (fromPromise's and fromCallback's logic keep it as `config`).
  const actors = createTaskActors({ workerId, queue, host, engine, plugins, validatePayload, workDir, logger });
  const stage = (name, input) => actors[name].config({ input, signal });
  const runOne = async (claim) => {
    const stopReclaim = actors.reclaim.config({ input: { claim }, sendBack: (event) => { throw new Error(`the run was lost: ${event.type}`); } });
    try {
      let result;
      let resolution;
      try {
        await stage('load', { claim });
        result = await stage('run', { claim });
      } catch (error) {
        resolution = { state: 'exception', reason: 'internal-error', message: String(error) };
      }
      resolution = await stage('upload', { claim, result, resolution });
      await stage('report', { claim, resolution });
    } finally {
      stopReclaim();
      await stage('cleanup', { claim });
    }
  };
  const running = new Set();
  for (;;) {
    for (const plugin of plugins) {
      const reason = await plugin.beforeClaim?.({ workerId, logger });
      if (reason !== undefined) throw new Error(`plugin ${plugin.name} holds off claiming, which this loop does not: ${reason}`);
    }
    const claims = await queue.claimWork({ workerId, count: capacity - running.size, waitMs: 0, signal });
    for (const claim of claims) {
      const one = runOne(claim).finally(() => running.delete(one));
      running.add(one);
    }
    if (running.size === 0) break;
    if (running.size === capacity || claims.length === 0) await Promise.race(running);
  }
  for (const plugin of [...plugins].reverse()) await plugin.shutdown?.({ workerId, logger });
  await host.dispose();
}
