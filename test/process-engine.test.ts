import t, { type Test } from 'tap';
import { mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomUUID } from 'node:crypto';
import { ProcessEngine, type ProcessEngineOptions } from '../src/engines/process.js';
import type { RunResult, Sandbox, SandboxBuilder } from '../src/engines/engine.js';
import { LocalTransport } from '../src/hosts/local.js';
import { groupPids, pidsWithCookie, readProcStat } from '../src/hosts/proc.js';
import { MalformedPayloadError } from '../src/model/errors.js';
import type { Claim, Payload } from '../src/model/task.js';
import { silentLogger } from '../src/runtime/logger.js';
import { compilePayloadValidator } from '../src/runtime/schema.js';

// process-engine-spawner.test.ts runs this file once more with the spawner, as on a machine without perl.
const throughSpawner = process.env['DROVER_LOCAL_TEST_STARTER'] === 'spawner';
const transport = new LocalTransport({ agent: !throughSpawner });

interface Ctx {
  readonly taskDir: string;
  readonly cookie: string;
  readonly claim: Claim;
  prepare(payload: Payload, engineOptions?: ProcessEngineOptions): Promise<SandboxBuilder>;
}

/** A task directory and a cookie; everything carrying the cookie is killed at teardown. */
function setup(t: Test): Ctx {
  const taskDir = realpathSync(mkdtempSync(join(tmpdir(), 'drover-pe-')));
  const cookie = `test-${randomUUID()}`;
  const claim: Claim = {
    taskId: 'task-' + randomUUID().slice(0, 8),
    runId: 2,
    workerId: 'w1',
    payload: {},
    deadline: Date.now() + 60_000,
    takenUntil: Date.now() + 60_000,
    retriesLeft: 0,
  };
  t.teardown(() => {
    for (const pid of pidsWithCookie(cookie)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    rmSync(taskDir, { recursive: true, force: true });
  });
  return {
    taskDir,
    cookie,
    claim,
    prepare: (payload, engineOptions) =>
      new ProcessEngine(engineOptions).prepare(payload, {
        claim,
        transport,
        taskDir,
        cookie,
        logger: silentLogger,
        signal: new AbortController().signal,
      }),
  };
}

function collect(stream: Readable): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    stream.on('error', reject);
  });
}

async function run(
  ctx: Ctx,
  payload: Payload,
  engineOptions?: ProcessEngineOptions,
  build?: (b: SandboxBuilder) => void,
): Promise<{ result: RunResult; stdout: string; stderr: string }> {
  const builder = await ctx.prepare(payload, engineOptions);
  build?.(builder);
  const sandbox = await builder.start();
  try {
    const [result, stdout, stderr] = await Promise.all([sandbox.wait(), collect(sandbox.stdout), collect(sandbox.stderr)]);
    return { result, stdout, stderr };
  } finally {
    await sandbox.dispose();
  }
}

/** Polls (bounded) until `check` holds; fails the test if it never does. */
async function until(check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** The process group of the run (found through its cookie) once it has `count` live processes. */
async function groupOf(ctx: Ctx, count: number): Promise<number> {
  let pgid = 0;
  await until(() => {
    const pids = pidsWithCookie(ctx.cookie);
    if (pids.length < count) return false;
    const stats = pids.map(readProcStat);
    const first = stats[0];
    if (first === undefined) return false;
    pgid = first.pgrp;
    return stats.every((s) => s?.pgrp === pgid) && groupPids(pgid).length >= count;
  }, `${count} processes of the run`);
  return pgid;
}

/** Non-zombie processes of the group, or carrying the cookie. */
function leftovers(ctx: Ctx, pgid: number): number[] {
  return [...new Set([...groupPids(pgid), ...pidsWithCookie(ctx.cookie)])];
}

t.test('payload schema', async (t) => {
  const engine = new ProcessEngine();
  t.equal(engine.name, 'process');
  t.same(engine.needs, { exec: true, files: true });
  const validate = compilePayloadValidator(engine.payloadSchema);
  t.doesNotThrow(() => validate({ command: 'true' }));
  t.doesNotThrow(() => validate({ command: ['echo', 'a'], env: { A: 'b' } }));
  t.notOk('maxRunTime' in engine.payloadSchema.properties, 'maxRunTime is the maxruntime plugin\'s');
  for (const bad of [{}, { command: '' }, { command: [] }, { command: [1] }, { command: 'x', env: { A: 1 } }]) {
    t.throws(() => validate(bad), MalformedPayloadError, JSON.stringify(bad));
  }
});

t.test('prepare refuses what the schema cannot say', async (t) => {
  const ctx = setup(t);
  const problemPaths = async (payload: Payload): Promise<string[]> => {
    try {
      await ctx.prepare(payload);
    } catch (error) {
      if (error instanceof MalformedPayloadError) return error.problems.map((p) => p.path);
      throw error;
    }
    return [];
  };
  t.same(await problemPaths({ command: [''] }), ['payload.command[0]']);
  t.same(await problemPaths({ command: '   ' }), ['payload.command']);
  t.same(await problemPaths({ command: ['echo', 'a\0b'] }), ['payload.command[1]']);
  t.same(await problemPaths({ command: 'true', env: { 'A=B': 'x' } }), ['payload.env["A=B"]']);
});

t.test('argv command, stdout, exit code 0', async (t) => {
  const ctx = setup(t);
  const { result, stdout, stderr } = await run(ctx, { command: ['printf', '%s|', 'a b', '$HOME', "'q'"] });
  t.equal(stdout, "a b|$HOME|'q'|", 'argv is passed as is, no shell');
  t.equal(stderr, '');
  t.equal(result.exitCode, 0);
  t.equal(result.signal, null);
  t.equal(result.startError, undefined);
  t.ok(result.durationMs >= 0 && result.durationMs < 5000, 'durationMs');
});

t.test('shell string, stderr, exit code 3', async (t) => {
  const ctx = setup(t);
  const { result, stdout, stderr } = await run(ctx, { command: 'echo hello; echo oops >&2; for i in 1 2; do echo "line $i"; done; exit 3' });
  t.equal(stdout, 'hello\nline 1\nline 2\n');
  t.equal(stderr, 'oops\n');
  t.equal(result.exitCode, 3);
  t.equal(result.signal, null);
});

t.test('environment: base env, payload.env, setEnv (later wins), cookie; TASK_* are the env plugin\'s', async (t) => {
  const ctx = setup(t);
  const base = { PATH: process.env.PATH ?? '/usr/bin:/bin', BASE: 'base', A: 'base', B: 'base', TASK_ID: 'base' };
  const { result, stdout } = await run(
    ctx,
    { command: ['env'], env: { A: 'payload', B: 'payload', C: 'payload', RUN_ID: 'payload', 'WITH SPACE': 'x y' } },
    { env: base },
    (b) => {
      b.setEnv('B', 'plugin');
      b.setEnv('D', 'plugin');
      b.setEnv('D', 'plugin2');
      b.setEnv('TASK_DIR', '/plugin');
    },
  );
  t.equal(result.exitCode, 0);
  const env = Object.fromEntries(
    stdout
      .split('\n')
      .filter((l) => l.includes('='))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)])
      // tap's process tracking (@tapjs/processinfo) wraps spawn() and adds these.
      .filter(([name]) => !/^_TAPJS_PROCESSINFO_/.test(name!) && name !== 'NODE_OPTIONS'),
  );
  t.same(env, {
    PATH: base.PATH,
    BASE: 'base',
    A: 'payload',
    B: 'plugin',
    C: 'payload',
    D: 'plugin2',
    'WITH SPACE': 'x y',
    TASK_ID: 'base',
    RUN_ID: 'payload',
    TASK_DIR: '/plugin',
    DROVER_RUN_COOKIE: ctx.cookie,
  }, 'exactly these variables, nothing of the worker leaks');
});

t.test('default base env takes a few variables of the worker', async (t) => {
  const ctx = setup(t);
  const { stdout } = await run(ctx, { command: 'echo "$PATH|${TASK_ID:-none}|${TAP:-none}"' });
  t.equal(stdout, `${process.env.PATH}|none|none\n`);
});

t.test('runs in the task directory with stdin closed', async (t) => {
  const ctx = setup(t);
  const started = Date.now();
  const { result, stdout } = await run(ctx, { command: 'pwd; cat; echo done' });
  t.equal(result.exitCode, 0);
  t.equal(stdout, `${ctx.taskDir}\ndone\n`, 'cat read nothing and exited at once');
  t.ok(Date.now() - started < 5000);
});

t.test('a command that does not exist: exit code 127 with startError', async (t) => {
  const ctx = setup(t);
  const { result, stdout, stderr } = await run(ctx, { command: ['drover-no-such-command-xyz', 'a'] });
  t.equal(result.exitCode, 127);
  t.equal(result.signal, null);
  t.match(result.startError, throughSpawner ? /spawn drover-no-such-command-xyz ENOENT/ : /^drover-no-such-command-xyz: command not found \(on this machine\)$/);
  t.equal(stdout, '');
  t.equal(stderr, '');
});

t.test('abort kills the whole tree', async (t) => {
  const ctx = setup(t);
  const builder = await ctx.prepare({ command: 'sleep 1000 & sleep 1000 & wait' }, { killGraceMs: 2000 });
  const sandbox = await builder.start();
  sandbox.stdout.resume();
  sandbox.stderr.resume();
  const pgid = await groupOf(ctx, 3);
  t.equal(groupPids(pgid).length, 3, 'sh and two sleeps run');
  const started = Date.now();
  const first = sandbox.abort();
  t.equal(sandbox.abort(), first, 'abort is memoized');
  await first;
  t.same(leftovers(ctx, pgid), [], 'no non-zombie process of the group is left');
  t.ok(Date.now() - started < 2000, 'SIGTERM was enough: no wait for the grace period');
  const result = await sandbox.wait();
  t.equal(result.exitCode, null);
  t.equal(result.signal, 'SIGTERM');
  await sandbox.dispose();
  await sandbox.dispose();
});

t.test('abort: a child that ignores SIGTERM is SIGKILLed after the grace period', async (t) => {
  const ctx = setup(t);
  const builder = await ctx.prepare({ command: `sh -c 'trap "" TERM; sleep 1000; echo never' & sleep 1000 & wait` }, { killGraceMs: 300 });
  const sandbox = await builder.start();
  sandbox.stdout.resume();
  sandbox.stderr.resume();
  const pgid = await groupOf(ctx, 4);
  const started = Date.now();
  await sandbox.abort();
  const took = Date.now() - started;
  t.same(leftovers(ctx, pgid), [], 'nothing of the group is left');
  t.ok(took >= 280, `waited the grace period (${took} ms)`);
  t.ok(took < 3000, `and not much longer (${took} ms)`);
  const result = await sandbox.wait();
  t.equal(result.signal, 'SIGTERM', 'the main process died of SIGTERM');
  await sandbox.dispose();
});

t.test('dispose kills background processes left after the main process exited', async (t) => {
  const ctx = setup(t);
  const builder = await ctx.prepare({ command: 'sleep 1000 & echo started' });
  const sandbox = await builder.start();
  const stdout = collect(sandbox.stdout);
  sandbox.stderr.resume();
  const result = await sandbox.wait();
  t.equal(result.exitCode, 0);
  const pgid = await groupOf(ctx, 1);
  t.equal(groupPids(pgid).length, 1, 'the background sleep still runs');
  await sandbox.dispose();
  t.same(leftovers(ctx, pgid), [], 'dispose killed it');
  t.equal(await stdout, 'started\n', 'stdout ends once the sleep holding it is gone');
});

t.test('extractFile', async (t) => {
  const ctx = setup(t);
  const builder = await ctx.prepare({ command: 'mkdir -p out && echo content > out/a.txt' });
  const sandbox: Sandbox = await builder.start();
  sandbox.stdout.resume();
  sandbox.stderr.resume();
  t.equal((await sandbox.wait()).exitCode, 0);
  t.equal(await collect(await sandbox.extractFile('out/a.txt')), 'content\n');
  t.equal(await collect(await sandbox.extractFile('./out/../out/a.txt')), 'content\n');
  await t.rejects(sandbox.extractFile('out/missing.txt'), { code: 'ENOENT' });
  for (const bad of ['../x', 'out/../../x', '/etc/passwd', '']) {
    await t.rejects(sandbox.extractFile(bad), MalformedPayloadError, JSON.stringify(bad));
  }
  const refused = await sandbox.extractFile('../x').then(() => undefined, (error: unknown) => error);
  t.match(refused, { problems: [{ path: 'artifact "../x"', message: 'is outside the task directory' }] });
  await sandbox.dispose();
});

t.test('builder: start once, discard idempotent', async (t) => {
  const ctx = setup(t);
  const discarded = await ctx.prepare({ command: 'true' });
  await discarded.discard();
  await discarded.discard();
  await t.rejects(discarded.start(), /discarded/);

  const builder = await ctx.prepare({ command: 'true' });
  const sandbox = await builder.start();
  await t.rejects(builder.start(), /already started/);
  await builder.discard();
  sandbox.stdout.resume();
  sandbox.stderr.resume();
  t.equal((await sandbox.wait()).exitCode, 0);
  t.equal(sandbox.wait(), sandbox.wait(), 'wait is memoized');
  await sandbox.abort();
  await sandbox.dispose();
});
