/**
 * Memory: what one in-flight task costs a worker. A worker process
 * (bench/memory-worker.mjs: hardware host, livelog, the embedded queue, and
 * the mock engine with long runs, or `sleep` through the process engine
 * when the mock engine is not built) reports process.memoryUsage() after
 * full GCs, idle and then with 1,000 runs in flight at capacity 1,000; the
 * difference divided by the runs in flight is the cost per task. A second
 * worker without plugins shows how much of it is the live log's.
 */
import { fork } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { summary } from './lib.mjs';

const WORKER = fileURLToPath(new URL('memory-worker.mjs', import.meta.url));
const IN_FLIGHT = 1000;
const TARGET_KIB = 50;
/** How long any one step (boot, loading 1,000 runs, stopping) may take before the run is called a failure. */
const STEP_TIMEOUT_MS = 180_000;
const KiB = 1024;
const MiB = 1024 * 1024;

export async function memory({ root, scratch, reps, quick }) {
  started = performance.now();
  const { SqliteQueue } = await import(join(root, 'dist/queues/sqlite.js'));
  // DROVER_BENCH_MEMORY_ENGINE=process checks the fallback on a tree that has the mock engine.
  const engine = process.env.DROVER_BENCH_MEMORY_ENGINE || (existsSync(join(root, 'dist/engines/mock.js')) ? 'mock' : 'process');
  const payload = engine === 'mock'
    ? { mock: { runFor: 3_600_000 }, maxRunTime: 7200 }
    : { command: ['sleep', '3600'], maxRunTime: 7200 };
  // The worker without plugins only says how much is the live log's: quick mode skips it.
  const variants = [
    { name: 'drover worker (livelog)', plugins: true },
    ...(quick ? [] : [{ name: 'drover worker, no plugins', plugins: false }]),
  ];
  const rows = [];
  let heapPerTask;
  for (const variant of variants) {
    progress(`${variant.name}: ${IN_FLIGHT} ${engine}-engine runs in flight`);
    // Each run is a fresh worker process, so there is nothing to warm up: `reps` runs, all measured.
    const runs = [];
    for (let i = 0; i < reps; i++) runs.push(await measure({ root, scratch, SqliteQueue, engine, payload, plugins: variant.plugins }));
    const heap = summary(runs.map((r) => (r.loaded.heapUsed - r.idle.heapUsed) / r.inFlight / KiB));
    const rss = summary(runs.map((r) => (r.loaded.rss - r.idle.rss) / r.inFlight / KiB));
    const typical = runs.toSorted((a, b) => a.loaded.heapUsed - b.loaded.heapUsed)[Math.floor(runs.length / 2)];
    const mib = (bytes) => (bytes / MiB).toFixed(1);
    rows.push(
      { name: `${variant.name}: heap used`, ...heap, ratio: heap.median / TARGET_KIB, extra: `${mib(typical.idle.heapUsed)} MiB idle -> ${mib(typical.loaded.heapUsed)} MiB with ${typical.inFlight} in flight` },
      { name: `${variant.name}: RSS`, ...rss, ratio: rss.median / TARGET_KIB, extra: `${mib(typical.idle.rss)} MiB idle -> ${mib(typical.loaded.rss)} MiB (external ${mib(typical.loaded.external)} MiB)` },
    );
    heapPerTask ??= heap.median;
  }
  progress('done');
  return [{
    title: 'Memory per in-flight task',
    description: `A worker at capacity ${IN_FLIGHT} (hardware host, embedded SQLite queue, ${engine === 'mock' ? 'the mock engine with hour-long runs' : '`sleep 3600` through the process engine (the mock engine is not built)'}), measured after full GCs idle and with ${IN_FLIGHT} runs in flight; per task = (in flight - idle) / runs in flight. ${quick ? '' : 'The second worker has no plugins, so the difference is the live log\'s share. '}Each run is a fresh worker process (no warm-up); spread over the runs. Ratio = against the ${TARGET_KIB} KiB target.`,
    unit: 'KiB per task',
    extraHeader: 'idle -> loaded (typical run)',
    rows,
    targets: [{ text: `at most ${TARGET_KIB} KiB of heap per in-flight task`, met: heapPerTask <= TARGET_KIB, measured: `${heapPerTask.toFixed(1)} KiB` }],
  }];
}

/** One worker process: idle, then IN_FLIGHT runs in flight, then stopped; returns its two readings. */
async function measure({ root, scratch, SqliteQueue, engine, payload, plugins }) {
  const dir = mkdtempSync(join(scratch, 'memory-'));
  const workDir = join(dir, 'work');
  mkdirSync(workDir);
  const queue = SqliteQueue.open({ dir: join(dir, 'queue') });
  const child = fork(WORKER, [JSON.stringify({ root, dir: join(dir, 'queue'), workDir, engine, capacity: IN_FLIGHT, plugins })], {
    stdio: ['ignore', 'inherit', 'pipe', 'ipc'],
    execArgv: ['--expose-gc'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-2000)));
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal)));
  const step = (key) => Promise.race([
    new Promise((resolve) => child.on('message', (m) => m?.[key] !== undefined && resolve(m[key]))),
    exited.then((how) => { throw new Error(`the memory worker exited (${how}) before "${key}": ${stderr.trim()}`); }),
    new Promise((_, reject) => setTimeout(() => reject(new Error(`no "${key}" from the memory worker within ${STEP_TIMEOUT_MS / 1000} s`)), STEP_TIMEOUT_MS).unref()),
  ]);
  try {
    const idle = await step('idle');
    const deadline = Date.now() + 3_600_000;
    for (let i = 0; i < IN_FLIGHT; i++) await queue.submit({ payload, deadline, retries: 0 });
    child.send({ load: IN_FLIGHT });
    const loaded = await step('loaded');
    child.send({ stop: true });
    const stopped = await step('stopped');
    if (stopped.inFlight !== 0) throw new Error(`the memory worker stopped with ${stopped.inFlight} runs still in flight`);
    const running = await queue.listTasks({ state: 'running', limit: 10 });
    if (running.length > 0) throw new Error(`${running.length}+ tasks still running after the worker stopped`);
    await exited;
    return { idle, loaded, inFlight: loaded.inFlight };
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await queue.close();
    if (engine === 'process') await reap(root, workDir);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Kills whatever the process engine's tasks left behind, through the worker's own crash journal. */
async function reap(root, workDir) {
  const { HardwareHost } = await import(join(root, 'dist/hosts/local.js'));
  const { silentLogger } = await import(join(root, 'dist/runtime/logger.js'));
  await new HardwareHost({ workDir }).boot({ logger: silentLogger, signal: new AbortController().signal });
}

let started = performance.now();
function progress(line) {
  process.stderr.write(`bench memory [${((performance.now() - started) / 1000).toFixed(0)} s]: ${line}\n`);
}
