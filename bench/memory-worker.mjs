#!/usr/bin/env node
/**
 * The worker process of the memory benchmark (bench/memory.mjs forks it
 * with an IPC channel and --expose-gc): a whole drover worker as
 * `drover worker` composes it (hardware host with its crash journal,
 * livelog plugin, the embedded SQLite queue), with the mock engine or, when
 * that is not built, the process engine. It reports process.memoryUsage()
 * after full GCs:
 *
 *   -> { idle }       once booted, with nothing claimed
 *   <- { load: N }    the parent has submitted N long tasks
 *   -> { loaded }     once N runs are in flight (started, not ended)
 *   <- { stop: true } shut down now: every run is aborted and resolved
 *   -> { stopped }    the worker stopped; the process then exits
 *
 * Usage: node --expose-gc memory-worker.mjs '{"root":..., "dir":..., "workDir":..., "engine":"mock"|"process", "capacity":N, "plugins":bool}'
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const config = JSON.parse(process.argv[2] ?? '{}');
if (!process.send || typeof globalThis.gc !== 'function') {
  process.stderr.write('memory-worker.mjs: run by bench/memory.mjs (fork with IPC and --expose-gc)\n');
  process.exit(2);
}
/** Every wait below gives up after this long, so the process never lingers. */
const WAIT_LIMIT_MS = 180_000;

const { root } = config;
const { startWorker } = await import(join(root, 'dist/runtime/worker.js'));
const { SqliteQueue } = await import(join(root, 'dist/queues/sqlite.js'));
const { HardwareHost } = await import(join(root, 'dist/hosts/local.js'));
const { livelogPlugin } = await import(join(root, 'dist/plugins/livelog.js'));
const { maxruntimePlugin } = await import(join(root, 'dist/plugins/maxruntime.js'));
const { createLogger } = await import(join(root, 'dist/runtime/logger.js'));

const engine = config.engine === 'mock'
  ? new (await import(join(root, 'dist/engines/mock.js'))).MockEngine()
  : new (await import(join(root, 'dist/engines/process.js'))).ProcessEngine({ killSignal: 'SIGKILL', killGraceMs: 1000 });
/** Runs started and not yet ended: the mock engine records its runs; the process engine's are our descendants. */
const inFlight = config.engine === 'mock'
  ? () => engine.runs.filter((run) => run.state === 'started').length
  : () => childProcesses();

const queue = SqliteQueue.open({ dir: config.dir, pollIntervalMs: 100 });
const worker = startWorker({
  workerId: 'bench-memory',
  queue,
  host: new HardwareHost({ workDir: config.workDir }),
  engine,
  // maxRunTime in the payloads is the maxruntime plugin's field; `plugins` adds the live log.
  plugins: config.plugins ? [maxruntimePlugin(), livelogPlugin()] : [maxruntimePlugin()],
  workDir: config.workDir,
  logger: createLogger({ level: 'warn' }),
  capacity: config.capacity,
  maxTasks: 0,
  once: false,
  idleTimeoutMs: 0,
  // The shutdown at the end aborts every run at once.
  shutdownGraceMs: 0,
  pollWaitMs: 1000,
});
worker.stopped.catch((error) => {
  process.stderr.write(`memory-worker.mjs: the worker failed: ${error?.stack ?? error}\n`);
  process.exit(70);
});

const messages = [];
let wake = () => {};
process.on('message', (m) => {
  messages.push(m);
  wake();
});
async function next(key) {
  const giveUpAt = performance.now() + WAIT_LIMIT_MS;
  for (;;) {
    const i = messages.findIndex((m) => m?.[key] !== undefined);
    if (i >= 0) return messages.splice(i, 1)[0][key];
    if (performance.now() > giveUpAt) throw new Error(`memory-worker.mjs: no "${key}" message within ${WAIT_LIMIT_MS / 1000} s`);
    await new Promise((resolve) => {
      wake = resolve;
      setTimeout(resolve, 1000);
    });
  }
}

await waitFor(() => worker.state() !== 'booting', 'the worker to boot');
await sleep(500); // a few idle polls
process.send({ idle: await settled() });

const tasks = await next('load');
await waitFor(() => inFlight() >= tasks, `${tasks} runs in flight`, () => `${inFlight()} in flight, worker ${worker.state()}`);
await sleep(500);
const loaded = await settled();
process.send({ loaded: { ...loaded, inFlight: inFlight() } });

await next('stop');
worker.shutdown({ kind: 'signal', signal: 'SIGTERM' });
worker.shutdown({ kind: 'signal', signal: 'SIGTERM' }); // the second one aborts what still runs, at once
const { reason } = await Promise.race([worker.stopped, sleep(WAIT_LIMIT_MS, undefined, { ref: false }).then(() => { throw new Error('the worker did not stop'); })]);
await queue.close();
process.send({ stopped: { reason: reason.kind, inFlight: inFlight() } });
process.disconnect();

/** process.memoryUsage() after full collections, when two in a row agree on the heap within 1%. */
async function settled() {
  let last;
  for (let i = 0; i < 10; i++) {
    for (let j = 0; j < 3; j++) globalThis.gc();
    await sleep(100);
    const usage = process.memoryUsage();
    if (last && Math.abs(usage.heapUsed - last.heapUsed) < last.heapUsed * 0.01) return usage;
    last = usage;
  }
  return last;
}

async function waitFor(condition, what, status = () => '') {
  const giveUpAt = performance.now() + WAIT_LIMIT_MS;
  while (!condition()) {
    if (performance.now() > giveUpAt) throw new Error(`memory-worker.mjs: gave up waiting for ${what} after ${WAIT_LIMIT_MS / 1000} s (${status()})`);
    await sleep(50);
  }
}

/**
 * How many `sleep` processes descend from this one: the process engine's
 * commands, children of the local transport's spawner, itself a child of
 * this process.
 */
function childProcesses() {
  const parents = new Map();
  const names = new Map();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
      parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
      names.set(Number(entry), stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')));
    } catch {
      // gone meanwhile
    }
  }
  const descends = (pid) => {
    for (let up = parents.get(pid), hops = 0; up !== undefined && hops < 3; up = parents.get(up), hops++) {
      if (up === process.pid) return true;
    }
    return false;
  };
  return [...names].filter(([pid, name]) => name === 'sleep' && descends(pid)).length;
}
