#!/usr/bin/env node
/**
 * drover's benchmarks: each one measures drover next to its floor and its
 * peers in the same run, on the same machine, and writes bench/REPORT.md and
 * bench/results.json. `npm run bench` (full) or `npm run bench -- --quick`.
 * `--only local,ssh,queues,memory,artifacts` runs some of them, and
 * `--before DIR` measures the queues and local tasks of another build (a
 * checkout with dist/ built) beside this one; both print the report
 * without writing it.
 * The suite starts what it needs on loopback (PostgreSQL, sshd) and stops
 * it afterwards. bench/ANALYSIS.md says what bounds the missed targets.
 *
 * Each case runs a warm-up, then `reps` repetitions; the report gives the
 * median, the spread (min..max) and the ratio against the baseline.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, constants, cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { artifacts } from './artifacts.mjs';
import { localTasks } from './local-tasks.mjs';
import { memory } from './memory.mjs';
import { startPostgres } from './postgres.mjs';
import { queues } from './queues.mjs';
import { ssh } from './ssh.mjs';

const USAGE = `usage: npm run bench [-- [--quick] [--only local,ssh,queues,memory,artifacts] [--before DIR]]
  --quick        200 tasks, one repetition (under 3 minutes)
  --only A,B     run only these benchmarks; the report is printed, not written
  --before DIR   also measure the queues and local tasks of the build in DIR (a checkout with dist/ built)
`;
/** The command line, read once: `--quick`, and the values of `--only` and `--before`. */
const given = {};
for (let args = process.argv.slice(2), at = 0; at < args.length; at++) {
  const arg = args[at];
  if (arg === '--help' || arg === '-h') {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  if (arg === '--quick') given.quick = true;
  else if ((arg === '--only' || arg === '--before') && args[at + 1] !== undefined && !args[at + 1].startsWith('--')) given[arg.slice(2)] = args[++at];
  else {
    process.stderr.write(`bench: ${arg === '--only' || arg === '--before' ? `${arg} needs a value` : `unknown argument "${arg}"`}\n${USAGE}`);
    process.exit(2);
  }
}
// Ctrl-C, a kill or a closed pipe still stops the servers the suite started: their 'exit' hooks run.
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.once(signal, () => process.exit(128 + constants.signals[signal]));
for (const stream of [process.stdout, process.stderr]) stream.on('error', () => process.exit(141));

const root = fileURLToPath(new URL('..', import.meta.url));
const quick = given.quick === true;
const settings = quick ? { tasks: 200, reps: 1 } : { tasks: 1000, reps: 3 };
/** `--only a,b` runs only the named benchmarks (local, queues, memory, ...); the report then holds only those. */
const only = given.only?.split(',');
/** `--before DIR`: another build of drover (a checkout with dist/ built) whose queues and local tasks are measured beside this one. */
const before = given.before;
const BENCHMARKS = { local: localTasks, ssh, queues, memory, artifacts };
for (const name of only ?? []) {
  if (name in BENCHMARKS) continue;
  process.stderr.write(`bench: --only: no benchmark "${name}"; there are ${Object.keys(BENCHMARKS).join(', ')}\n`);
  process.exit(2);
}

const started = Date.now();
const results = { settings: { quick, ...settings }, machine: machine(), benchmarks: [] };
const scratch = mkdtempSync(join(tmpdir(), 'drover-bench-'));
process.once('exit', () => rmSync(scratch, { recursive: true, force: true }));
const postgres = only && !only.some((name) => ['queues', 'artifacts'].includes(name)) ? undefined : await ownPostgres();
try {
  for (const [name, bench] of Object.entries(BENCHMARKS)) {
    if (only && !only.includes(name)) continue;
    // The machine is shared: the load average (1 min) before and after each benchmark goes into its report.
    const loadBefore = loadavg()[0];
    const measured = await bench({ root, scratch, quick, before, pg: postgres, ...settings });
    const load = `load average ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after`;
    results.benchmarks.push(...measured.map((each) => ({ ...each, load })));
  }
} finally {
  await postgres?.stop?.();
}
results.seconds = Math.round((Date.now() - started) / 1000);
// A partial run (--only, --before) is printed, not written over the committed report.
if (!only && !before) {
  writeFileSync(join(root, 'bench', 'results.json'), JSON.stringify(results, null, 2) + '\n');
  writeFileSync(join(root, 'bench', 'REPORT.md'), report(results));
}
process.stdout.write(report(results));

/**
 * The suite's own PostgreSQL server, or (when it cannot start one) the fallback: DROVER_TEST_PG_URL or
 * the local server at 127.0.0.1:5432. `about` says which, for the report.
 */
async function ownPostgres() {
  const server = await startPostgres();
  if (server.url) {
    process.stderr.write(`bench: started its own PostgreSQL (${server.version}) at ${server.url}\n`);
    return { ...server, about: `the suite's own ${server.version}, default settings, on a loopback port` };
  }
  const url = process.env.DROVER_TEST_PG_URL || 'postgres://postgres@127.0.0.1:5432/test';
  const display = url.replace(/:[^:@/]*@/, ':***@');
  process.stderr.write(`bench: ${server.problem}; falling back to the PostgreSQL at ${display}\n`);
  return { url, about: `${display} (fallback: ${server.problem})` };
}

function machine() {
  const version = (cmd, args) => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n')[0].trim();
    } catch {
      return 'not found';
    }
  };
  return {
    cores: availableParallelism(),
    cpu: cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    parallel: version('parallel', ['--version']),
    commit: version('git', ['-C', root, 'rev-parse', '--short', 'HEAD']),
    date: new Date().toISOString().slice(0, 10),
  };
}

function report({ machine: m, settings: s, benchmarks, seconds }) {
  const lines = [
    '# drover benchmarks',
    '',
    `Generated by \`npm run bench${s.quick ? ' -- --quick' : ''}\` in ${seconds} s on ${m.date} (commit ${m.commit}).`,
    `Machine: ${m.cores} cores (${m.cpu}), ${m.memoryGiB} GiB, Node ${m.node}, ${m.parallel}.`,
    `Each case: one warm-up, then ${s.reps} repetition${s.reps === 1 ? '' : 's'}; median (min..max); ratio = against the floor in the same run.`,
    'The machine is shared: each benchmark gives the load average around it, and only ratios within one run compare.',
    'What bounds each target that is not met, with profiles, and what would close the gap: [ANALYSIS.md](ANALYSIS.md).',
    '',
  ];
  for (const bench of benchmarks) {
    lines.push(`## ${bench.title}`, '', bench.description, '', `Machine load: ${bench.load}.`, '');
    lines.push(`| case | ${bench.unit} | spread | ratio to floor | ${bench.extraHeader ?? ''} |`, '| --- | --- | --- | --- | --- |');
    for (const row of bench.rows) {
      lines.push(`| ${row.name} | ${row.median.toFixed(1)} | ${row.min.toFixed(1)}..${row.max.toFixed(1)} | ${row.ratio.toFixed(2)} | ${row.extra ?? ''} |`);
    }
    lines.push('');
    for (const target of bench.targets ?? []) lines.push(`- Target: ${target.text} — **${target.met ? 'met' : 'not met'}** (${target.measured}).`);
    lines.push('');
  }
  return lines.join('\n');
}
