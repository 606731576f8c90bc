import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { drover, readTask, runOutcomes, startWorker, submit } from './helpers/drover.js';

t.test('50 tasks, two worker processes with capacity 4: each task completes exactly once, logs retrievable', async (t) => {
  const cwd = t.testdir({});
  const ledger = join(cwd, 'ledger');
  const ids: string[] = [];
  // Each task appends its number to one ledger file: a task run twice shows up twice.
  for (let batch = 0; batch < 5; batch++) {
    ids.push(...(await Promise.all(Array.from({ length: 10 }, (_, i) => {
      const n = batch * 10 + i;
      return submit(['--', `echo output-of-${n}; echo ${n} >> ${ledger}`], { cwd });
    }))));
  }
  t.equal(new Set(ids).size, 50, '50 distinct task ids');

  const workers = ['one', 'two'].map((name) => startWorker(['--once', '--capacity', '4', '--worker-id', name], { cwd }));
  const codes = await Promise.all(workers.map((w) => w.exited));
  t.same(codes, [0, 0], 'both workers drained the queue and exited 0', { logs: workers.map((w) => w.log()) });

  const ledgerLines = readFileSync(ledger, 'utf8').trim().split('\n').map(Number).sort((a, b) => a - b);
  t.same(ledgerLines, Array.from({ length: 50 }, (_, n) => n), 'every command ran exactly once');

  const byWorker = new Map<string, number>();
  for (const id of ids) {
    const task = await readTask(join(cwd, '.drover'), id);
    t.same(runOutcomes(task), ['completed'], `task ${id} has one completed run`);
    const worker = task.runs[0]!.workerId!;
    byWorker.set(worker, (byWorker.get(worker) ?? 0) + 1);
  }
  t.same([...byWorker.keys()].sort(), ['one', 'two'], 'both workers took tasks');

  for (let from = 0; from < ids.length; from += 10) {
    const batch = ids.slice(from, from + 10);
    const logs = await Promise.all(batch.map((id) => drover(['logs', id], { cwd })));
    logs.forEach((log, i) => {
      t.equal(log.code, 0);
      t.match(log.stdout, `output-of-${from + i}\n`, `drover logs shows task ${from + i}'s output`);
      t.match(log.stdout, '[drover] resolved completed');
    });
  }
});
