/**
 * The gc plugin in `drover worker`, end to end: real worker processes, the
 * embedded queue, real commands. A cache one task fills is there for the
 * next task on the same worker; a worker that cannot have the free disk it
 * requires claims nothing, says why, and fails no task.
 */
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { drover, eventually, readTask, resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';

t.test('a cache used by one task is found by the next task on the same worker, until an exit code purges it', async (t) => {
  const cwd = t.testdir();
  const mounts = [{ cacheName: 'downloads', directory: 'dl' }];
  writeFileSync(join(cwd, 'fill.json'), JSON.stringify({ command: 'test ! -e dl/pkg.tar && echo "fetched once" > dl/pkg.tar', mounts }));
  writeFileSync(join(cwd, 'use.json'), JSON.stringify({ command: 'cat dl/pkg.tar', mounts }));
  writeFileSync(join(cwd, 'corrupt.json'), JSON.stringify({ command: 'exit 4', mounts, onExitStatus: { purgeCaches: [4] } }));
  const worker = startWorker(['--capacity', '1'], { cwd });
  t.teardown(async () => {
    worker.child.kill('SIGKILL');
    await worker.exited;
  });
  const queueDir = join(cwd, '.drover');
  const fill = await submit(['--payload', 'fill.json'], { cwd });
  t.same(runOutcomes(await resolved(queueDir, fill)), ['completed']);
  const use = await submit(['--payload', 'use.json'], { cwd });
  const task = await resolved(queueDir, use);
  t.same(runOutcomes(task), ['completed'], task.runs[0]?.message ?? '');
  const logs = await drover(['logs', use], { cwd });
  t.match(logs.stdout, 'fetched once', 'the second task printed the file the first one put in the cache');
  t.match(logs.stdout, 'cache downloads at dl: kept from an earlier task');
  const cacheDir = join(cwd, '.drover', 'work', 'caches', 'downloads');
  await eventually('the cache to be back home', () => existsSync(cacheDir) && readdirSync(cacheDir).length === 1);

  const corrupt = await submit(['--payload', 'corrupt.json'], { cwd });
  t.same(runOutcomes(await resolved(queueDir, corrupt)), ['failed']);
  await eventually('the cache to be purged', () => readdirSync(cacheDir).length === 0);
  const again = await submit(['--payload', 'fill.json'], { cwd });
  t.same(runOutcomes(await resolved(queueDir, again)), ['completed'], 'the next task fills a new, empty cache');
});

t.test('a worker short of disk claims nothing and says why; the task runs later, on a worker with room', async (t) => {
  const cwd = t.testdir();
  const queueDir = join(cwd, '.drover');
  const id = await submit(['--', 'echo ran'], { cwd });
  // No disk has this much room: the worker must hold off.
  const short = startWorker(['--capacity', '1', '--required-disk-space-megabytes', String(2 ** 40)], { cwd });
  t.teardown(async () => {
    short.child.kill('SIGKILL');
    await short.exited;
  });
  await eventually('the worker to say it holds off', () => /warn\s+holding off claiming plugin=gc/.test(short.log()));
  t.match(short.log(), /MB free in .*, below requiredDiskSpaceMegabytes \(1099511627776 MB\)/, 'naming free and required space');
  const task = await readTask(queueDir, id);
  t.equal(task.state, 'pending', 'the task was not claimed');
  t.same(runOutcomes(task), ['pending'], 'and no run of it failed');
  short.child.kill('SIGTERM');
  t.equal(await short.exited, 4, 'the held-off worker stops on SIGTERM as any other', { log: short.log() });

  const roomy = startWorker(['--once', '--required-disk-space-megabytes', '0'], { cwd });
  t.equal(await roomy.exited, 0, roomy.log());
  t.same(runOutcomes(await readTask(queueDir, id)), ['completed']);
});
