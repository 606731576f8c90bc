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
 *
 * Usage: node worker-ceiling.mjs [TASKS [CAPACITY [ROOT]]] (6000, 8, this checkout)
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const [tasksArg = '6000', capacityArg = '8', rootArg] = process.argv.slice(2);
const tasks = Number(tasksArg);
const capacity = Number(capacityArg);
if (!(Number.isInteger(tasks) && tasks > 0 && tasks <= 1_000_000 && Number.isInteger(capacity) && capacity > 0)) {
  process.stderr.write('usage: node worker-ceiling.mjs [TASKS (1..1000000) [CAPACITY [ROOT]]]\n');
  process.exit(2);
}
const root = rootArg ?? join(dirname(fileURLToPath(import.meta.url)), '..');
const load = (path) => import(join(root, 'dist', path));
const [{ startWorker }, { SqliteQueue }, { HardwareHost }, { MockEngine }, { shippedPlugins }, { createLogger }] = await Promise.all(
  ['runtime/worker.js', 'queues/sqlite.js', 'hosts/local.js', 'engines/mock.js', 'plugins/index.js', 'runtime/logger.js'].map(load),
);

const dir = mkdtempSync(join(tmpdir(), 'drover-ceiling-'));
try {
  const queue = SqliteQueue.open({ dir: join(dir, 'queue') });
  const definitions = Array.from({ length: tasks }, () => ({ payload: { mock: {} }, deadline: Date.now() + 3_600_000, retries: 0 }));
  // A ROOT built before submitMany (b7fc4e1) queues them one at a time.
  if (queue.submitMany) await queue.submitMany(definitions);
  else for (const definition of definitions) await queue.submit(definition);
  const cpu = process.cpuUsage();
  const loop = performance.eventLoopUtilization();
  const start = performance.now();
  const worker = startWorker({
    workerId: 'ceiling', queue, host: new HardwareHost({ workDir: join(dir, 'work') }), engine: new MockEngine(), plugins: shippedPlugins(),
    workDir: join(dir, 'work'), logger: createLogger({ level: 'warn' }), capacity, maxTasks: 0, once: true, idleTimeoutMs: 0, shutdownGraceMs: 0, pollWaitMs: 1000,
  });
  const { reason } = await worker.stopped;
  const ms = performance.now() - start;
  const used = process.cpuUsage(cpu);
  if (reason.kind !== 'drained') throw new Error(`the worker stopped: ${JSON.stringify(reason)}`);
  console.log(`${tasks} tasks at capacity ${capacity}: ${((tasks / ms) * 1000).toFixed(0)} tasks/s, `
    + `${((used.user + used.system) / 1000 / tasks).toFixed(3)} ms of CPU per task, event loop ${(100 * performance.eventLoopUtilization(loop).utilization).toFixed(0)}% busy`);
  await queue.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
