#!/usr/bin/env node
/**
 * Where a task's wall time goes, by state of its task machine: reads a
 * worker's debug log (DROVER_LOG_LEVEL=debug logs every task state; `claimed`
 * and `resolved` are info lines) and prints, per state, how long tasks stayed
 * in it: mean, median and 90th percentile (the log has millisecond stamps).
 *
 *   DROVER_LOG_LEVEL=debug drover worker --once --capacity 8 2> worker.log
 *   node bench/task-phases.mjs worker.log
 */
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';

const file = process.argv[2];
if (file === undefined) {
  process.stderr.write('usage: node task-phases.mjs WORKER_LOG (written with DROVER_LOG_LEVEL=debug)\n');
  process.exit(2);
}
/** taskId/runId -> the state it entered last and when. */
const entered = new Map();
/** state -> milliseconds spent in it, one entry per task. */
const spent = new Map();
const line = /^(\S+) \w+\s+(task state|claimed|resolved) taskId=(\S+) runId=(\d+)(?:.* state=(\S+))?/;
for await (const text of createInterface({ input: createReadStream(file) })) {
  const match = line.exec(text);
  if (match === null) continue;
  const [, stamp, what, taskId, runId, state] = match;
  const at = Date.parse(stamp);
  const key = `${taskId}/${runId}`;
  const previous = entered.get(key);
  if (previous !== undefined) {
    if (!spent.has(previous.state)) spent.set(previous.state, []);
    spent.get(previous.state).push(at - previous.at);
  }
  entered.set(key, { state: what === 'task state' ? state : `${what} (until the next state)`, at });
}
if (spent.size === 0) {
  process.stderr.write(`task-phases.mjs: no task states in ${file}; was the worker's log at debug?\n`);
  process.exit(1);
}
for (const [state, values] of spent) {
  values.sort((a, b) => a - b);
  const mean = values.reduce((sum, v) => sum + v, 0) / values.length;
  const at = (q) => values[Math.min(values.length - 1, Math.floor(q * values.length))];
  console.log(`${state.padEnd(38)} ${String(values.length).padStart(6)} tasks  mean ${mean.toFixed(2).padStart(7)} ms  median ${String(at(0.5)).padStart(4)}  p90 ${String(at(0.9)).padStart(4)}`);
}
