/**
 * Local tasks: trivial commands through drover's whole path (submit into
 * the embedded queue, claim, task machine, process engine, live log,
 * resolution) against the same commands spawned by a minimal Node program
 * (the floor), `xargs -P` and GNU parallel, at the same concurrency.
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { repeat, summary, timed } from './lib.mjs';

const COMMANDS = [
  { label: '`true`', argv: ['true'] },
  { label: "`sh -c 'echo hi'`", argv: ['sh', '-c', 'echo hi'] },
];

export async function localTasks({ root, scratch, tasks, reps }) {
  const { SqliteQueue } = await import(join(root, 'dist/queues/sqlite.js'));
  const drover = join(root, 'bin/drover.js');
  const floor = join(root, 'bench/floor.mjs');
  const benchmarks = [];
  for (const capacity of [1, 8]) {
    const rows = [];
    for (const { label, argv } of COMMANDS) {
      const quoted = argv.map((a) => (/^[\w./-]+$/.test(a) ? a : `'${a}'`)).join(' ');
      const cases = {
        floor: () => timed(process.execPath, [floor, String(tasks), String(capacity), '--', ...argv]),
        drover: async () => {
          const dir = join(scratch, `queue-${capacity}`);
          rmSync(dir, { recursive: true, force: true });
          mkdirSync(dir, { recursive: true });
          const start = performance.now();
          const queue = SqliteQueue.open({ dir });
          for (let i = 0; i < tasks; i++) await queue.submit({ payload: { command: argv }, deadline: Date.now() + 3_600_000, retries: 0 });
          await queue.close();
          const env = { ...process.env, DROVER_QUEUE_DIR: dir, DROVER_WORK_DIR: join(dir, 'work'), DROVER_LOG_LEVEL: 'warn' };
          await timed(process.execPath, [drover, 'worker', '--once', '--capacity', String(capacity)], { env });
          return (performance.now() - start) / 1000;
        },
        [`xargs -P${capacity}`]: () => timed('sh', ['-c', `seq ${tasks} | xargs -P${capacity} -n1 ${quoted} > /dev/null`]),
        [`GNU parallel -j${capacity}`]: () => timed('sh', ['-c', `seq ${tasks} | parallel -j${capacity} -N0 ${quoted} > /dev/null`]),
      };
      const measured = {};
      for (const [name, run] of Object.entries(cases)) {
        measured[name] = summary((await repeat(reps, run)).map((seconds) => tasks / seconds));
      }
      for (const [name, s] of Object.entries(measured)) {
        const overheadMs = name === 'drover' ? ((1 / s.median - 1 / measured.floor.median) * 1000).toFixed(2) + ' ms/task' : '';
        rows.push({ name: `${label}, ${name}`, ...s, ratio: s.median / measured.floor.median, extra: overheadMs });
      }
    }
    const droverRows = rows.filter((r) => r.name.endsWith('drover'));
    const parallelRows = rows.filter((r) => r.name.includes('GNU parallel'));
    const worst = Math.min(...droverRows.map((r) => r.ratio));
    const vsParallel = Math.min(...droverRows.map((r, i) => r.median / parallelRows[i].median));
    benchmarks.push({
      title: `Local tasks, capacity ${capacity}`,
      description: `${tasks} trivial tasks at concurrency ${capacity}. drover's time includes submitting them to the embedded queue and starting the worker (\`drover worker --once --capacity ${capacity}\`). Overhead = drover's wall time per task minus the floor's.`,
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
