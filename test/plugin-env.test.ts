/**
 * The env plugin: the worker's base env under the payload's, TASK_ID,
 * RUN_ID and TASK_DIR on top, and secret values masked in the live log and
 * the worker's log. Through the real task runner with the mock engine, and
 * end to end with a real worker.
 */
import { text } from 'node:stream/consumers';
import { PassThrough } from 'node:stream';
import { join } from 'node:path';
import t from 'tap';
import { MockEngine } from '../src/engines/mock.js';
import { SecretMasker, envPlugin, maskedLogger } from '../src/plugins/env.js';
import { LIVE_LOG_NAME, livelogPlugin } from '../src/plugins/livelog.js';
import { createLogger } from '../src/runtime/logger.js';
import { loadConfig } from '../src/runtime/config.js';
import { startTaskRun } from '../src/testing/task-run.js';
import { drover, resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';

t.test('the payload\'s env over the worker\'s base env, with TASK_ID, RUN_ID and TASK_DIR on top', async (t) => {
  const engine = new MockEngine();
  const run = await startTaskRun({
    engine,
    plugins: [livelogPlugin(), envPlugin({ base: { A: 'base', B: 'base', TASK_ID: 'base' }, secret: { S: 'hush' } })],
    payload: { mock: {}, env: { B: 'payload', RUN_ID: 'payload' } },
  });
  t.teardown(() => run.close());
  t.equal((await run.output).resolution?.state, 'completed');
  const env = engine.runs[0]!.env;
  t.equal(env['A'], 'base');
  t.equal(env['B'], 'payload', 'the payload wins over the base');
  t.equal(env['S'], 'hush', 'secret variables reach the task');
  t.equal(env['TASK_ID'], run.claim.taskId);
  t.equal(env['RUN_ID'], String(run.claim.runId));
  t.match(env['TASK_DIR'], new RegExp(`/tasks/${run.claim.taskId}-${run.claim.runId}$`));
});

t.test('secret values are masked in the live log, in the output and in drover\'s lines', async (t) => {
  const run = await startTaskRun({
    plugins: [livelogPlugin(), envPlugin({ secret: { TOKEN: 's3cr3t-value' } })],
    payload: { mock: { stdout: 'token=s3cr3t-value\n', stderr: 'again s3cr3t-value\n', exitCode: 1 } },
  });
  t.teardown(() => run.close());
  await run.output;
  const log = await text(await run.queue.readArtifact(run.claim, LIVE_LOG_NAME));
  t.notMatch(log, 's3cr3t-value');
  t.match(log, 'token=[secret]');
  t.match(log, 'again [secret]');
});

t.test('a resolution message does not leak a secret value: the queue stores it masked', async (t) => {
  const run = await startTaskRun({
    plugins: [envPlugin({ secret: { TOKEN: 's3cr3t-value' } }), livelogPlugin()],
    payload: { mock: { startError: 'no program named s3cr3t-value' } },
  });
  t.teardown(() => run.close());
  await run.output;
  const [stored] = (await run.queue.task(run.claim.taskId)).runs;
  t.equal(stored?.state, 'failed');
  t.equal(stored?.message, 'the command could not start: no program named [secret]');
  t.notMatch(await text(await run.queue.readArtifact(run.claim, LIVE_LOG_NAME)), 's3cr3t-value');
});

t.test('a secret split across chunks of output is still masked; longer secrets first', async (t) => {
  const masker = new SecretMasker(['abcdef', 'abc', '']);
  const source = new PassThrough();
  const out = text(source.pipe(masker.transform()));
  for (const chunk of ['xx ab', 'cd', 'ef yy a', 'bc zz', ' é'.slice(0, 1)]) source.write(chunk);
  source.end(Buffer.from('é'));
  t.equal(await out, 'xx [secret] yy [secret] zz é');
  t.equal(masker.mask('abcdefabc'), '[secret][secret]');
  t.ok(new SecretMasker([]).empty);
});

t.test('the worker\'s logger masks messages and fields, errors and children included', async (t) => {
  const lines: string[] = [];
  const logger = maskedLogger(createLogger({ format: 'json', write: (line) => lines.push(line) }), new SecretMasker(['hush']));
  logger.info('said hush', { error: new Error('hush!'), nested: { list: ['hush'] } });
  logger.child({ who: 'hush' }).warn('x');
  t.notMatch(lines.join('\n'), 'hush');
  t.match(lines.join('\n'), '[secret]');
});

t.test('taskEnv and secretTaskEnv settings: NAME=value pairs, or a mapping in the config file', async (t) => {
  const config = loadConfig({ env: { DROVER_TASK_ENV: 'A=1, B=x=y', DROVER_SECRET_TASK_ENV: 'S=hush' } });
  t.same(config.taskEnv, { A: '1', B: 'x=y' });
  t.same(config.secretTaskEnv, { S: 'hush' });
  t.same(loadConfig({ env: {} }).taskEnv, {});
  const dir = t.testdir({ 'drover.yaml': 'taskEnv: { A: one, N: 2 }\n' });
  t.same(loadConfig({ env: {}, file: join(dir, 'drover.yaml') }).taskEnv, { A: 'one', N: '2' });
  t.throws(() => loadConfig({ env: { DROVER_TASK_ENV: '1A=x,B' } }), /"1A" is not an environment variable name; B must have a value/);
});

t.test('end to end: a worker gives tasks its base env and keeps secrets out of the logs', async (t) => {
  const cwd = t.testdir({});
  const worker = startWorker(['--capacity', '1'], { cwd, env: { DROVER_TASK_ENV: 'GREETING=hello', DROVER_SECRET_TASK_ENV: 'API_TOKEN=tok-123456' } });
  t.teardown(async () => {
    worker.child.kill('SIGKILL');
    await worker.exited;
  });
  const id = await submit(['--', 'echo "$GREETING $API_TOKEN $TASK_ID $RUN_ID"; test -d "$TASK_DIR"; echo "fails with tok-123456" >&2; exit 3'], { cwd });
  const task = await resolved(join(cwd, '.drover'), id);
  t.same(runOutcomes(task), ['failed']);
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, `hello [secret] ${id} 0`);
  t.match(logs.stdout, 'fails with [secret]');
  t.notMatch(logs.stdout, 'tok-123456');
  // A message drover writes about the payload (a missing artifact's path) is masked too.
  const artifactTask = await submit(['--payload', '-'], { cwd, input: 'command: "true"\nartifacts: [{ type: file, path: out-tok-123456.txt, name: public/out }]\n' });
  const failed = await resolved(join(cwd, '.drover'), artifactTask);
  t.same(runOutcomes(failed), ['failed']);
  t.equal(failed.runs[0]!.message, 'artifact "public/out": file out-[secret].txt is missing');
  t.notMatch(worker.log(), 'tok-123456');
});
