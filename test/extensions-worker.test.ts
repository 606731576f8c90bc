/**
 * A worker loads the example extension (examples/summary-plugin) by its
 * path from a config file and runs tasks with it end to end: the plugin's
 * payload schema joins the worker's, its config is checked, and every run
 * leaves its summary as an artifact in the embedded queue.
 */
import { writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { drover, resolved, startWorker, submit } from './helpers/drover.js';

const EXAMPLE = fileURLToPath(new URL('../examples/summary-plugin', import.meta.url));

/** A directory with a config file that loads the example with `config`; the module path is relative to the file. */
function configured(t: Test, config: string): string {
  const cwd = t.testdir({});
  writeFileSync(join(cwd, 'drover.yaml'), `plugins:\n  - module: ${relative(cwd, EXAMPLE)}\n    config: ${config}\n`);
  return cwd;
}

t.test('a worker runs tasks with the example plugin loaded by path; each run leaves public/summary.json', async (t) => {
  const cwd = configured(t, '{ labels: { pool: e2e } }');
  const worker = startWorker(['--config', 'drover.yaml', '--capacity', '2'], { cwd });
  t.teardown(async () => {
    worker.child.kill('SIGKILL');
    await worker.exited;
  });
  writeFileSync(join(cwd, 'ok.json'), JSON.stringify({ command: 'echo \'{"tests": 3}\' > "$SUMMARY_FILE"', summary: { labels: { branch: 'main' } } }));
  writeFileSync(join(cwd, 'fails.json'), JSON.stringify({ command: 'exit 4' }));
  writeFileSync(join(cwd, 'bad.json'), JSON.stringify({ command: 'true', summary: { colour: 'red' } }));
  const ok = await submit(['--payload', 'ok.json'], { cwd });
  const fails = await submit(['--payload', 'fails.json'], { cwd });
  const bad = await submit(['--payload', 'bad.json'], { cwd });
  const summaryOf = async (id: string) => {
    await resolved(join(cwd, '.drover'), id);
    const artifact = await drover(['artifact', id, 'public/summary.json'], { cwd });
    t.equal(artifact.code, 0, artifact.stderr);
    return JSON.parse(artifact.stdout) as Record<string, unknown>;
  };
  t.match(await summaryOf(ok), { taskId: ok, resolution: { state: 'completed' }, exitCode: 0, labels: { pool: 'e2e', branch: 'main' }, command: { tests: 3 } });
  t.match(await summaryOf(fails), { resolution: { state: 'failed' }, exitCode: 4, labels: { pool: 'e2e' } });
  t.match(await summaryOf(bad), { resolution: { state: 'exception', reason: 'malformed-payload' } });
  const logs = await drover(['logs', bad], { cwd });
  t.match(logs.stdout, /payload\.summary\.colour: is not a known property/, 'the joined schema refuses what the plugin does not know');
  t.match((await drover(['logs', ok], { cwd })).stdout, /^\[drover\] summary: uploaded public\/summary\.json$/m, 'a loaded plugin\'s lines in its finished hook reach the live log (it runs before livelog)');
});

t.test('a bad config for the example: the worker exits 2 naming the module and the problem', async (t) => {
  const cwd = configured(t, '{ name: /absolute.json }');
  const result = await drover(['worker', '--once', '--config', 'drover.yaml'], { cwd });
  t.equal(result.code, 2);
  t.match(result.stderr, /plugins\[0\] \(module "[./]*\.\.\/.*examples\/summary-plugin"\): bad config: config\.name: must match pattern/);
});

t.test('a worker runs tasks with an engine module, which replaces the process engine', async (t) => {
  // Inside the repository, `drover` resolves to this package itself, as an installed one would for a user's module.
  const cwd = t.testdir({
    'echo-engine.mjs': `import { ProcessEngine } from 'drover';
export default {
  configSchema: { type: 'object', required: ['prefix'], properties: { prefix: { type: 'string' } } },
  createEngine(config, context) {
    const inner = new ProcessEngine({ killSignal: context.killSignal, killGraceMs: context.killGraceMs });
    return {
      name: 'echo',
      payloadSchema: { type: 'object', required: ['say'], properties: { say: { type: 'string' } } },
      needs: inner.needs,
      prepare: (payload, options) => inner.prepare({ command: ['echo', config.prefix + payload.say] }, options),
    };
  },
};
`,
    'drover.yaml': 'engine:\n  module: ./echo-engine.mjs\n  config: { prefix: "echo says " }\n',
  });
  const id = await submit(['--payload', '-'], { cwd, input: JSON.stringify({ say: 'hello' }) });
  const run = await drover(['worker', '--once', '--config', 'drover.yaml'], { cwd });
  t.equal(run.code, 0, run.stderr);
  const task = await resolved(join(cwd, '.drover'), id);
  t.equal(task.state, 'completed');
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, /^echo says hello$/m);
  const schema = await drover(['schema', '--config', 'drover.yaml'], { cwd });
  t.match(JSON.parse(schema.stdout), { title: 'drover task payload (engine echo)', required: ['say'] });
});
