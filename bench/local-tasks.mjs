/**
 * Local tasks: trivial commands through drover's whole path (submit into
 * the embedded queue, claim, task machine, process engine, live log,
 * resolution) against the same commands spawned by a minimal Node program
 * (the floor), `xargs -P` and GNU parallel, at the same concurrency.
 */
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { summary, timed } from './lib.mjs';

const COMMANDS = [
  { label: '`true`', argv: ['true'] },
  { label: "`sh -c 'echo hi'`", argv: ['sh', '-c', 'echo hi'] },
];

/**
 * `before`: the root of another build of drover; its worker gets rows of its own ("drover before"),
 * measured in turn with the floor and this build, so a change is seen in one run.
 */
export async function localTasks({ root, scratch, tasks, reps, before }) {
  const floor = join(root, 'bench/floor.mjs');
  const cpuFile = join(scratch, 'worker-cpu.json');
  /** One drover build's whole path: submit `tasks` tasks, then drain them with one worker. Wall seconds, and the worker's own CPU. */
  const droverOf = (build) => async (argv, capacity) => {
    const { SqliteQueue } = await import(join(build, 'dist/queues/sqlite.js'));
    const dir = join(scratch, `queue-${capacity}`);
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    const start = performance.now();
    const queue = SqliteQueue.open({ dir });
    for (let i = 0; i < tasks; i++) await queue.submit({ payload: { command: argv }, deadline: Date.now() + 3_600_000, retries: 0 });
    await queue.close();
    const env = { ...process.env, DROVER_QUEUE_DIR: dir, DROVER_WORK_DIR: join(dir, 'work'), DROVER_LOG_LEVEL: 'warn', DROVER_BENCH_CPU_FILE: cpuFile };
    await timed(process.execPath, ['--import', pathToFileURL(join(root, 'bench/cpu-usage.mjs')).href, join(build, 'bin/drover.js'), 'worker', '--once', '--capacity', String(capacity)], { env });
    const { user, system } = JSON.parse(readFileSync(cpuFile, 'utf8'));
    return { seconds: (performance.now() - start) / 1000, cpuMsPerTask: (user + system) / 1000 / tasks };
  };
  const builds = before ? { drover: droverOf(root), [`drover before (${before})`]: droverOf(before) } : { drover: droverOf(root) };
  const benchmarks = [];
  for (const capacity of [1, 8]) {
    const rows = [];
    for (const { label, argv } of COMMANDS) {
      const quoted = argv.map((a) => (/^[\w./-]+$/.test(a) ? a : `'${a}'`)).join(' ');
      /** The worker's own CPU per task, by build, over the repetitions. */
      const cpu = {};
      const cases = {
        floor: () => timed(process.execPath, [floor, String(tasks), String(capacity), '--', ...argv]),
        ...Object.fromEntries(Object.entries(builds).map(([name, run]) => [name, async () => {
          const { seconds, cpuMsPerTask } = await run(argv, capacity);
          (cpu[name] ??= []).push(cpuMsPerTask);
          return seconds;
        }])),
        [`xargs -P${capacity}`]: () => timed('sh', ['-c', `seq ${tasks} | xargs -P${capacity} -n1 ${quoted} > /dev/null`]),
        [`GNU parallel -j${capacity}`]: () => timed('sh', ['-c', `seq ${tasks} | parallel -j${capacity} -N0 ${quoted} > /dev/null`]),
      };
      // Cases take turns (a warm-up round, then `reps` rounds), so a change in the machine's load reaches them all alike.
      const values = Object.fromEntries(Object.keys(cases).map((name) => [name, []]));
      for (let round = 0; round <= reps; round++) {
        for (const [name, run] of Object.entries(cases)) {
          const seconds = await run();
          if (round > 0) values[name].push(tasks / seconds);
        }
      }
      const measured = Object.fromEntries(Object.entries(values).map(([name, each]) => [name, summary(each)]));
      for (const [name, s] of Object.entries(measured)) {
        const droverCpu = cpu[name] ? summary(cpu[name].slice(1)) : undefined; // the warm-up's first value left out
        const extra = droverCpu
          ? `${((1 / s.median - 1 / measured.floor.median) * 1000).toFixed(2)} ms/task; worker CPU ${droverCpu.median.toFixed(2)} ms/task`
          : '';
        rows.push({ name: `${label}, ${name}`, ...s, ratio: s.median / measured.floor.median, extra });
      }
    }
    const droverRows = rows.filter((r) => r.name.endsWith(', drover'));
    const parallelRows = rows.filter((r) => r.name.includes('GNU parallel'));
    const worst = Math.min(...droverRows.map((r) => r.ratio));
    const vsParallel = Math.min(...droverRows.map((r, i) => r.median / parallelRows[i].median));
    benchmarks.push({
      title: `Local tasks, capacity ${capacity}`,
      description: `${tasks} trivial tasks at concurrency ${capacity}. drover's time includes submitting them to the embedded queue and starting the worker (\`drover worker --once --capacity ${capacity}\`). Overhead = drover's wall time per task minus the floor's; worker CPU = the worker process's own user and system time per task (its commands' not counted), which moves far less with the machine's load than wall time.`,
      unit: 'tasks/s',
      extraHeader: 'drover overhead',
      rows,
      targets: capacity === 8
        ? [
            { text: 'drover at capacity 8 runs at least 2/3 of the floor\'s tasks/s', met: worst >= 2 / 3, measured: `${worst.toFixed(2)} of the floor` },
            { text: 'and at least 2x GNU parallel', met: vsParallel >= 2, measured: `${vsParallel.toFixed(2)}x GNU parallel` },
          ]
        : [],
    });
  }
  return benchmarks;
}
