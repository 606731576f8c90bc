#!/usr/bin/env node
/**
 * Where a whole machine's CPU went during a benchmark case, by process
 * name, and for multi-threaded ones (node) main thread apart from the
 * others (V8's compiler and GC helpers, libuv's pool). It reads perf's
 * samples of every CPU, so it also sees what no single process's own
 * profile shows: the agent's forks, the commands, sshd, the kernel's idle.
 *
 *   perf record -a -F 2000 -o /tmp/perf.data -- node bench/... (one case)
 *   perf script -i /tmp/perf.data -F comm,pid,tid,period | node bench/cpu-by-process.mjs --per 1000
 *
 * `--per N` divides by N (the case's tasks): milliseconds of CPU per task.
 * perf's software clock works where hardware counters are not offered (VMs).
 */
import { createInterface } from 'node:readline';

const at = process.argv.indexOf('--per');
const per = at === -1 ? 1 : Number(process.argv[at + 1]);
if (!(per > 0)) throw new Error('--per: a positive number of tasks');

const nanoseconds = new Map();
for await (const line of createInterface({ input: process.stdin })) {
  // "  comm  pid/tid  period"; a comm may hold spaces, the last two fields never do.
  const fields = line.trim().split(/\s+/);
  if (fields.length < 3) continue;
  const period = Number(fields.at(-1));
  const [pid, tid] = fields.at(-2).split('/');
  if (!Number.isFinite(period) || tid === undefined) continue;
  const comm = fields.slice(0, -2).join(' ');
  const key = comm === 'node' ? `node (${pid === tid ? 'main thread' : 'other threads'})` : comm;
  nanoseconds.set(key, (nanoseconds.get(key) ?? 0) + period);
}
const total = [...nanoseconds.values()].reduce((sum, ns) => sum + ns, 0);
for (const [key, ns] of [...nanoseconds].sort((a, b) => b[1] - a[1])) {
  if (ns / total < 0.005) continue;
  const label = key === 'swapper' ? 'swapper (idle)' : key;
  console.log(`${(ns / 1e6 / per).toFixed(3).padStart(9)} ms${per === 1 ? '' : ' per task'}  ${((100 * ns) / total).toFixed(1).padStart(5)}%  ${label}`);
}
