/** The package's entry points, as a user's program imports them: the built files behind package.json's `exports`. */
import { existsSync } from 'node:fs';
import t from 'tap';

const pkg = (await import('../package.json', { with: { type: 'json' } })).default as { exports: Record<string, string> };

for (const [entry, file] of Object.entries(pkg.exports)) {
  t.test(`drover${entry.slice(1)} resolves to a built module`, async (t) => {
    t.ok(existsSync(new URL(`../${file}`, import.meta.url)), `${file} exists (npm test builds dist first)`);
    const module = (await import(new URL(`../${file}`, import.meta.url).href)) as Record<string, unknown>;
    t.ok(Object.keys(module).length > 0, `${entry} exports something`);
    for (const [name, value] of Object.entries(module)) t.not(value, undefined, `${entry} export ${name} is defined`);
  });
}

t.test('the root entry composes a worker and runs a batch', async (t) => {
  const root = (await import(new URL('../dist/index.js', import.meta.url).href)) as typeof import('../src/index.js');
  for (const name of ['startWorker', 'SqliteQueue', 'PostgresQueue', 'ProcessEngine', 'HardwareHost', 'SshHost', 'runBatch', 'livelogPlugin', 'successPlugin', 'envPlugin']) {
    t.type(root[name as keyof typeof root], 'function', name);
  }
  const outcome = await root.runBatch(['x', 'y'], { command: ['test', 'y', '='], split: 1, sessionsDir: t.testdir({}) });
  t.same(outcome.jobs.map((job) => job.status), ['failed', 'ok']);
});
