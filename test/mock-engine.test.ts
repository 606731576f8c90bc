/**
 * The mock engine: every part of a run scripted by the payload, time on an
 * injected clock, runs held or failed at chosen points; and, through the
 * real task runner, the resolutions those scripts lead to.
 */
import { Readable } from 'node:stream';
import t from 'tap';
import { SimulatedClock } from 'xstate';
import type { Engine, Sandbox, SandboxBuilder } from '../src/engines/engine.js';
import { MockEngine, type MockEngineOptions, type MockPoint } from '../src/engines/mock.js';
import { LocalTransport } from '../src/hosts/local.js';
import type { Payload } from '../src/model/task.js';
import { LIVE_LOG_NAME } from '../src/plugins/livelog.js';
import { silentLogger } from '../src/runtime/logger.js';
import { startTaskRun } from '../src/testing/task-run.js';

const CLAIM = { taskId: 'T', runId: 0, workerId: 'w', payload: {}, deadline: 0, takenUntil: 0, retriesLeft: 0 };

async function text(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks).toString();
}

function prepare(engine: MockEngine, payload: Payload, signal = new AbortController().signal) {
  return engine.prepare(payload, { claim: { ...CLAIM, payload }, transport: new LocalTransport(), taskDir: '/nonexistent', cookie: 'c', logger: silentLogger, signal });
}

async function started(payload: Payload, options: MockEngineOptions = {}) {
  const engine = new MockEngine(options);
  const sandbox = await (await prepare(engine, payload)).start();
  return { engine, sandbox, run: engine.runs[0]! };
}

const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

/** Waits, a turn at a time, for `predicate`; fails after two seconds of real time. */
async function until(predicate: () => boolean, what: string): Promise<void> {
  const giveUpAt = Date.now() + 2000;
  while (!predicate()) {
    if (Date.now() > giveUpAt) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

t.test('an empty script exits 0 at once, with closed streams', async (t) => {
  const { sandbox, run } = await started({});
  t.match(await sandbox.wait(), { exitCode: 0, signal: null });
  t.equal(await text(sandbox.stdout), '');
  t.equal(run.state, 'ended');
});

t.test('runFor on the injected clock; exit code and output as scripted', async (t) => {
  const clock = new SimulatedClock();
  const { sandbox } = await started({ mock: { runFor: 5000, exitCode: 3, stdout: 'out\n', stderr: 'err\n' } }, { clock });
  let result: unknown;
  void sandbox.wait().then((r) => (result = r));
  clock.increment(4999);
  await settle();
  t.equal(result, undefined, 'still running after 4999 ms');
  clock.increment(1);
  await settle();
  t.same(result, { exitCode: 3, signal: null, durationMs: 5000 });
  t.equal(await text(sandbox.stdout), 'out\n');
  t.equal(await text(sandbox.stderr), 'err\n');
});

t.test('how a command can end', async (t) => {
  t.match(await (await started({ mock: { exitSignal: 'SIGSEGV' } })).sandbox.wait(), { exitCode: null, signal: 'SIGSEGV' }, 'killed by a signal');
  t.match(await (await started({ mock: { startError: 'spawn nosuch ENOENT' } })).sandbox.wait(), { exitCode: 127, signal: null, startError: 'spawn nosuch ENOENT' }, 'could not start');
  const engine = new MockEngine();
  const builder = await prepare(engine, { mock: { startFailure: 'the engine broke' } });
  await t.rejects(builder.start(), { message: 'the engine broke' }, 'start() itself fails');
});

t.test('prepare fails as scripted, with the error that decides the resolution', async (t) => {
  const engine = new MockEngine();
  await t.rejects(prepare(engine, { mock: { prepareError: { kind: 'malformed-payload', message: 'no such image' } } }), { name: 'MalformedPayloadError', problems: [{ path: 'payload.mock', message: 'no such image' }] });
  await t.rejects(prepare(engine, { mock: { prepareError: { kind: 'resource-unavailable', message: 'no GPU' } } }), { name: 'ResourceUnavailableError', message: 'no GPU' });
  await t.rejects(prepare(engine, { mock: { prepareError: { kind: 'internal', message: 'disk full' } } }), { name: 'Error', message: 'disk full' });
  await t.rejects(prepare(engine, { mock: { runFor: -1, nonsense: true } }), { name: 'MalformedPayloadError', problems: [{ path: 'payload.mock.runFor' }, { path: 'payload.mock.nonsense' }] });
  t.equal(engine.runs.length, 0, 'no run is recorded for a refused payload');
});

t.test('a hanging command runs until aborted; abort is idempotent', async (t) => {
  const clock = new SimulatedClock();
  const { sandbox, run } = await started({ mock: { hang: true, runFor: 10 } }, { clock });
  clock.increment(1_000_000);
  await settle();
  t.equal(run.state, 'started');
  await Promise.all([sandbox.abort(), sandbox.abort()]);
  t.match(await sandbox.wait(), { exitCode: null, signal: 'SIGKILL' });
  t.ok(run.aborted);
  await sandbox.dispose();
  t.equal(run.state, 'disposed');
});

t.test('an abort that fails leaves the command running; dispose still ends it', async (t) => {
  const { sandbox, run } = await started({ mock: { hang: true, abortError: 'kill: EPERM' } });
  await t.rejects(sandbox.abort(), { message: 'kill: EPERM' });
  t.equal(run.state, 'started');
  await sandbox.dispose();
  t.match(await sandbox.wait(), { signal: 'SIGKILL' });
});

t.test('a dispose that fails fails every time it is asked', async (t) => {
  const { sandbox } = await started({ mock: { disposeError: 'rm: EBUSY' } });
  await t.rejects(sandbox.dispose(), { message: 'rm: EBUSY' });
  await t.rejects(sandbox.dispose(), { message: 'rm: EBUSY' });
});

t.test('files for artifacts, inside the task directory only', async (t) => {
  const { sandbox } = await started({ mock: { files: { 'out/report.txt': 'all good' } } });
  t.equal(await text(await sandbox.extractFile('out/report.txt')), 'all good');
  t.equal(await text(await sandbox.extractFile('out/../out/report.txt')), 'all good');
  await t.rejects(sandbox.extractFile('missing.txt'), { code: 'ENOENT' });
  await t.rejects(sandbox.extractFile('../etc/passwd'), { name: 'MalformedPayloadError' });
  await t.rejects(sandbox.extractFile('/etc/passwd'), { name: 'MalformedPayloadError' });
});

t.test('env: the payload\'s, then what plugins set before the start', async (t) => {
  const engine = new MockEngine();
  const builder = await prepare(engine, { env: { A: '1', B: '2' } });
  builder.setEnv('B', 'plugin');
  const sandbox = await builder.start();
  t.same(engine.runs[0]!.env, { A: '1', B: 'plugin' });
  t.throws(() => builder.setEnv('C', '3'), { message: /already/ });
  await sandbox.dispose();
  const discarded = await prepare(engine, {});
  await discarded.discard();
  t.equal(engine.runs[1]!.state, 'discarded');
});

t.test('intercept holds a run at a point, or fails it there', async (t) => {
  const seen: MockPoint[] = [];
  let releaseExit!: () => void;
  const exitGate = new Promise<void>((resolve) => (releaseExit = resolve));
  const engine = new MockEngine({
    intercept: (point) => {
      seen.push(point);
      if (point === 'exit') return exitGate;
      if (point === 'dispose') throw new Error('held up in dispose');
    },
  });
  const sandbox = await (await prepare(engine, {})).start();
  let ended = false;
  void sandbox.wait().then(() => (ended = true));
  await settle();
  t.notOk(ended, 'held at exit');
  releaseExit();
  await sandbox.wait();
  await t.rejects(sandbox.dispose(), { message: 'held up in dispose' });
  t.same(seen, ['prepare', 'start', 'exit', 'dispose']);

  const controller = new AbortController();
  const held = new MockEngine({ intercept: (point, run) => new Promise((_, reject) => run.signal?.addEventListener('abort', () => reject(new Error(`${point} abandoned`)))) });
  const preparing = prepare(held, {}, controller.signal);
  controller.abort();
  await t.rejects(preparing, { message: 'prepare abandoned' }, 'the prepare options\' signal reaches intercept');
});

t.test('through the real task runner', async (t) => {
  const cases: { name: string; payload: Payload; expect: object; log?: RegExp }[] = [
    { name: 'exit 0 completes', payload: { mock: { stdout: 'hello from mock\n' } }, expect: { resolution: { state: 'completed' } }, log: /hello from mock/ },
    { name: 'exit 1 fails', payload: { mock: { exitCode: 1 } }, expect: { resolution: { state: 'failed', message: /exited with code 1/ } } },
    { name: 'a payload the schema refuses', payload: { mock: { exitCode: 'one' }, extra: 1 }, expect: { resolution: { state: 'exception', reason: 'malformed-payload', message: /2 problems[\s\S]*payload\.extra: is not a known property[\s\S]*payload\.mock\.exitCode: must be integer/ } } },
    { name: 'a resource that is missing', payload: { mock: { prepareError: { kind: 'resource-unavailable', message: 'no GPU' } } }, expect: { resolution: { state: 'exception', reason: 'resource-unavailable' } } },
    { name: 'a command that cannot start fails', payload: { mock: { startError: 'spawn ENOENT' } }, expect: { resolution: { state: 'failed', message: /could not start: spawn ENOENT/ } } },
    { name: 'an engine whose start breaks', payload: { mock: { startFailure: 'the engine broke' } }, expect: { resolution: { state: 'exception', reason: 'internal-error', message: 'the engine broke' } } },
  ];
  for (const c of cases) {
    t.test(c.name, async (t) => {
      const run = await startTaskRun({ payload: c.payload });
      t.teardown(() => run.close());
      t.match(await run.output, c.expect);
      const status = await run.queue.task(run.claim.taskId);
      t.match(status.runs[0], { state: (c.expect as { resolution: { state: string } }).resolution.state }, 'the queue recorded it');
      if (c.log) t.match(await text(await run.queue.readArtifact(run.claim, LIVE_LOG_NAME)), c.log, 'the live log has the output');
    });
  }

  t.test('maxRunTime on a simulated clock: stopped, failed', async (t) => {
    const clock = new SimulatedClock();
    const engine = new MockEngine({ clock });
    const run = await startTaskRun({ payload: { mock: { runFor: 60_000 }, maxRunTime: 5 }, engine, clock });
    t.teardown(() => run.close());
    await until(() => engine.runs[0]?.state === 'started', 'the command to start');
    clock.increment(5000);
    t.match(await run.output, { resolution: { state: 'failed', message: 'maxRunTime of 5 s exceeded' } });
    t.ok(engine.runs[0]!.aborted, 'the command was aborted');
    t.equal(engine.runs[0]!.state, 'disposed', 'and disposed in cleanup');
  });
});

t.test('an engine that breaks its contract: the run says which engine and call, and what was missing', async (t) => {
  /** The mock engine, wrapped so that prepare gives nothing, or start gives a sandbox with parts missing. */
  let disposed = 0;
  const broken = (at: 'prepare' | 'start'): Engine => {
    const inner = new MockEngine();
    return {
      name: 'broken',
      payloadSchema: inner.payloadSchema,
      needs: inner.needs,
      async prepare(payload, options) {
        if (at === 'prepare') return undefined as unknown as SandboxBuilder;
        const builder = await inner.prepare(payload, options);
        return {
          setEnv: (name: string, value: string) => builder.setEnv(name, value),
          discard: () => builder.discard(),
          async start() {
            const sandbox = await builder.start();
            const dispose = async () => {
              disposed++;
              await sandbox.dispose();
            };
            return { stdout: sandbox.stdout, wait: () => sandbox.wait(), dispose } as unknown as Sandbox;
          },
        };
      },
    };
  };
  const cases = [
    { at: 'prepare' as const, message: 'engine broken: prepare gave undefined, not a sandbox builder' },
    { at: 'start' as const, message: 'engine broken: start gave a sandbox without abort, extractFile, stderr' },
  ];
  for (const { at, message } of cases) {
    const run = await startTaskRun({ payload: { mock: {} }, engine: broken(at) });
    t.teardown(() => run.close());
    t.match(await run.output, { resolution: { state: 'exception', reason: 'internal-error', message } }, at);
    t.match(await text(await run.queue.readArtifact(run.claim, LIVE_LOG_NAME)), message, 'the live log says it too');
  }
  t.equal(disposed, 1, 'the sandbox start gave was disposed: its command does not outlive the run');
});
