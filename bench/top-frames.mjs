#!/usr/bin/env node
/**
 * Summarizes V8 CPU profiles (`node --cpu-prof`): the functions that took the
 * most self time, with their share. For the benchmarks' "what bounds it":
 *
 *   DROVER_BENCH_WORKER_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" npm run bench -- --quick --only queues
 *   node bench/top-frames.mjs /tmp/prof/*.cpuprofile
 *
 * Usage: node top-frames.mjs [--top N] FILE.cpuprofile...
 */
import { readFileSync } from 'node:fs';

const args = process.argv.slice(2);
const at = args.indexOf('--top');
const top = at === -1 ? 12 : Number(args.splice(at, 2)[1]);
for (const file of args) {
  const profile = JSON.parse(readFileSync(file, 'utf8'));
  const selfTime = new Map();
  profile.samples.forEach((node, i) => selfTime.set(node, (selfTime.get(node) ?? 0) + (profile.timeDeltas[i] ?? 0)));
  const byFrame = new Map();
  let total = 0;
  for (const { id, callFrame: frame } of profile.nodes) {
    const us = selfTime.get(id) ?? 0;
    total += us;
    const where = frame.url ? ` ${frame.url.split('/').slice(-2).join('/')}:${frame.lineNumber + 1}` : '';
    const key = `${frame.functionName || '(anonymous)'}${where}`;
    byFrame.set(key, (byFrame.get(key) ?? 0) + us);
  }
  console.log(`${file}: ${(total / 1000).toFixed(0)} ms sampled`);
  for (const [key, us] of [...byFrame].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`${((100 * us) / total).toFixed(1).padStart(6)}% ${(us / 1000).toFixed(0).padStart(7)} ms  ${key}`);
  }
}
