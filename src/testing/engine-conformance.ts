/**
 * The engine conformance suite (drover/testing): what every engine must do,
 * checked against a real one. drover's own process and script engines
 * pass it, locally and over SSH; an extension author runs it against theirs:
 *
 *     import t from 'tap';
 *     import { engineConformance } from 'drover/testing';
 *     import { MyEngine } from '../src/engine.js';
 *
 *     engineConformance(t, (t) => ({
 *       engine: new MyEngine({ killGraceMs: 200 }),
 *       payload: (script) => ({ image: 'alpine', run: ['sh', '-c', script] }),
 *       malformedPayloads: [{}, { image: '' }],
 *     }));
 *
 * The suite speaks of commands in one neutral way: a POSIX shell script
 * (`sh`, with `sleep`, `head`, `tr`, `cut`), run in the task directory;
 * `payload(script)` says how the engine is asked to run one. It checks:
 * start and result, setEnv reaching the command, exit codes and signals,
 * stdout and stderr, abort leaving no process behind (a process group that
 * ignores SIGTERM, children and grandchildren too), dispose killing what
 * the command left running, extractFile (and its refusal of paths outside
 * the task directory), a builder discarded unstarted, and bad payloads
 * refused with MalformedPayloadError.
 *
 * Make the engine with a short kill grace: abort waits for it. Processes
 * are looked for on the engine's host by a probe script run through the
 * engine itself (in /proc, zombies not counted: they are dead), unless the
 * fixture says how (`alive`).
 */
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Test } from 'tap';
import type { Engine, Sandbox, SandboxBuilder } from '../engines/engine.js';
import { LocalTransport } from '../hosts/local.js';
import type { Transport } from '../hosts/transport.js';
import type { Claim, Payload, RunResult } from '../model/task.js';
import { silentLogger } from '../runtime/logger.js';
import { compilePayloadValidator, joinPayloadSchemas } from '../runtime/schema.js';

export interface EngineFixture {
  readonly engine: Engine;
  /** The payload that makes the engine run `script`, a POSIX shell script, in the task directory. */
  payload(script: string): Payload;
  /** Payloads that prepare() must refuse with MalformedPayloadError. */
  readonly malformedPayloads: readonly Payload[];
  /** The transport the engine gets; default this machine's. */
  readonly transport?: Transport;
  /** A directory on the transport's host for task directories; default a fresh one here (`t.testdir()`). */
  readonly workDir?: string;
  /** Which of `pids` still run (zombies do not) on the engine's host; default a probe script run through the engine. */
  alive?(pids: readonly number[]): Promise<number[]>;
}

export type MakeEngine = (t: Test) => EngineFixture | Promise<EngineFixture>;

/** How long the suite waits for any one thing: only a failing engine makes it wait that long. */
const WAIT_MS = 20_000;

interface Output {
  /** What arrived so far. */
  text(): string;
  /** Everything, once the stream ends. */
  readonly done: Promise<string>;
}

function collect(stream: Readable): Output {
  let text = '';
  stream.setEncoding('utf8');
  const done = new Promise<string>((resolve, reject) => {
    stream.on('data', (chunk: string) => (text += chunk));
    stream.on('end', () => resolve(text));
    stream.on('error', reject);
  });
  done.catch(() => {});
  return { text: () => text, done };
}

async function until<T>(what: string, check: () => T | undefined): Promise<T> {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`engine conformance: timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** The promise's value, or a clear failure once WAIT_MS passed: a broken engine fails the suite instead of hanging it. */
async function within<T>(what: string, promise: Promise<T>): Promise<T> {
  const timeout = new AbortController();
  try {
    return await Promise.race([
      promise,
      sleep(WAIT_MS, undefined, { signal: timeout.signal }).then(() => {
        throw new Error(`engine conformance: ${what} did not finish within ${WAIT_MS / 1000} s`);
      }),
    ]);
  } finally {
    timeout.abort();
  }
}

/** One task's worth of engine use: a task directory, prepare options, and teardown of what it started. */
class Harness {
  #count = 0;
  constructor(
    readonly t: Test,
    readonly fixture: EngineFixture,
    readonly transport: Transport,
    readonly workDir: string,
  ) {}

  async prepare(payload: Payload): Promise<{ builder: SandboxBuilder; taskDir: string }> {
    const taskId = `conformance-${randomBytes(6).toString('hex')}-${this.#count++}`;
    const taskDir = this.transport.join(this.workDir, taskId);
    await this.transport.mkdir(taskDir);
    this.t.teardown(() => this.transport.remove(taskDir).catch(() => {}));
    const claim: Claim = { taskId, runId: 0, workerId: 'conformance', payload, deadline: Date.now() + 3_600_000, takenUntil: Date.now() + 600_000, retriesLeft: 0 };
    const builder = await this.fixture.engine.prepare(payload, {
      claim, transport: this.transport, taskDir, cookie: `conformance-${randomBytes(8).toString('hex')}`, logger: silentLogger, signal: new AbortController().signal,
    });
    this.t.teardown(() => builder.discard());
    return { builder, taskDir };
  }

  /** Starts `script`; the sandbox is disposed at teardown. */
  async start(script: string, env: readonly [string, string][] = []): Promise<{ sandbox: Sandbox; stdout: Output; stderr: Output; taskDir: string }> {
    const { builder, taskDir } = await this.prepare(this.fixture.payload(script));
    for (const [name, value] of env) builder.setEnv(name, value);
    const sandbox = await builder.start();
    this.t.teardown(() => sandbox.dispose());
    return { sandbox, stdout: collect(sandbox.stdout), stderr: collect(sandbox.stderr), taskDir };
  }

  /** Runs `script` to its end. */
  async run(script: string, env: readonly [string, string][] = []): Promise<{ result: RunResult; stdout: string; stderr: string; sandbox: Sandbox }> {
    const { sandbox, stdout, stderr } = await this.start(script, env);
    const [result, out, err] = await Promise.all([sandbox.wait(), stdout.done, stderr.done]);
    return { result, stdout: out, stderr: err, sandbox };
  }

  /** Which of `pids` still run on the engine's host. */
  async alive(pids: readonly number[]): Promise<number[]> {
    if (this.fixture.alive) return this.fixture.alive(pids);
    const probe = `for p in ${pids.join(' ')}; do
  if [ -r /proc/$p/stat ]; then
    state=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f1)
    [ "$state" = Z ] || echo $p
  elif [ ! -d /proc/self ] && kill -0 $p 2>/dev/null; then echo $p; fi
done`;
    const { result, stdout, stderr } = await this.run(probe);
    if (result.exitCode !== 0) throw new Error(`engine conformance: the process probe failed (${result.exitCode ?? result.signal}): ${stderr}`);
    return stdout.split(/\s+/).filter(Boolean).map(Number);
  }

  /** At teardown, SIGKILLs whichever of `pids` an engine that failed the test left running. */
  reapAtTeardown(pids: readonly number[]): void {
    this.t.teardown(async () => {
      const left = await this.alive(pids).catch(() => []);
      if (left.length > 0) await this.run(`kill -KILL ${left.join(' ')} 2>/dev/null; true`).catch(() => {});
    });
  }
}

/** Pids the script prints on a line `pids 1 2 3`. */
function pidsIn(text: string): number[] | undefined {
  const line = /^pids ([\d ]+)$/m.exec(text);
  return line ? line[1]!.trim().split(/\s+/).map(Number) : undefined;
}

function isMalformedPayload(error: unknown): boolean {
  return (error as { code?: unknown } | undefined)?.code === 'DROVER_MALFORMED_PAYLOAD';
}

export function engineConformance(t: Test, makeEngine: MakeEngine): void {
  const setup = async (t: Test): Promise<Harness> => {
    const fixture = await makeEngine(t);
    return new Harness(t, fixture, fixture.transport ?? new LocalTransport(), fixture.workDir ?? t.testdir({}));
  };

  t.test('payloadSchema: a JSON Schema object that a runnable payload passes', async (t) => {
    const { fixture } = await setup(t);
    const schema = joinPayloadSchemas([{ owner: `engine ${fixture.engine.name}`, schema: fixture.engine.payloadSchema }]);
    t.doesNotThrow(() => compilePayloadValidator(schema)(fixture.payload('true')), 'payload(script) is valid');
    t.type(fixture.engine.name, 'string');
    t.type(fixture.engine.needs.exec, 'boolean');
    t.type(fixture.engine.needs.files, 'boolean');
  });

  t.test('start: the command runs and its result is reported once', async (t) => {
    const h = await setup(t);
    const { result, stdout, sandbox } = await h.run('echo started');
    t.equal(stdout, 'started\n');
    t.equal(result.exitCode, 0);
    t.equal(result.signal, null);
    t.equal(result.startError, undefined);
    t.type(result.durationMs, 'number');
    t.ok(result.durationMs >= 0, 'a duration');
    t.same(await sandbox.wait(), result, 'wait() gives the same result again');
  });

  t.test('env: setEnv reaches the command, and a later setEnv wins', async (t) => {
    const h = await setup(t);
    const { stdout } = await h.run('printf "%s|%s" "$CONFORMANCE_A" "$CONFORMANCE_B"', [
      ['CONFORMANCE_A', 'first'],
      ['CONFORMANCE_B', 'b'],
      ['CONFORMANCE_A', 'spaces, $dollar and \'quotes\''],
    ]);
    t.equal(stdout, 'spaces, $dollar and \'quotes\'|b');
  });

  t.test('exit codes and signals are reported as they happened', async (t) => {
    const h = await setup(t);
    for (const code of [0, 1, 3, 255]) {
      const { result } = await h.run(`exit ${code}`);
      t.same({ exitCode: result.exitCode, signal: result.signal }, { exitCode: code, signal: null }, `exit ${code}`);
    }
    const { result } = await h.run('kill -KILL $$');
    t.same({ exitCode: result.exitCode, signal: result.signal }, { exitCode: null, signal: 'SIGKILL' }, 'killed by a signal');
  });

  t.test('stdout and stderr: separate streams, complete, ending with the command', async (t) => {
    const h = await setup(t);
    const { stdout, stderr, result } = await h.run('echo out; echo err >&2; head -c 1048576 /dev/zero | tr "\\0" x; echo; echo done >&2');
    t.equal(result.exitCode, 0);
    t.equal(stdout.length, 'out\n'.length + 1048576 + 1, 'a MiB of stdout arrives whole');
    t.ok(stdout.startsWith('out\nxxx'));
    t.equal(stderr, 'err\ndone\n');
  });

  t.test('abort: every process of the command goes, also ones that ignore SIGTERM, and children of children', async (t) => {
    const h = await setup(t);
    const { sandbox, stdout } = await h.start([
      'trap "" TERM',
      'sleep 300 & a=$!',
      'sh -c \'trap "" TERM; sleep 300 & echo $! > grandchild.pid; wait\' & b=$!',
      'while [ ! -s grandchild.pid ]; do sleep 0.05; done',
      'echo "pids $$ $a $b $(cat grandchild.pid)"',
      'wait',
    ].join('\n'));
    const pids = await until('the command to start its children', () => pidsIn(stdout.text()));
    h.reapAtTeardown(pids);
    t.equal(pids.length, 4, 'the command, two children, a grandchild');
    t.same(await h.alive(pids), pids, 'all of them run');
    await within('abort()', sandbox.abort());
    t.same(await h.alive(pids), [], 'none is left once abort() resolved');
    const result = await within('wait() after abort()', sandbox.wait());
    t.not(result.exitCode, 0, 'the result is not a success');
    await within('a second abort()', sandbox.abort());
    t.pass('abort() again resolves');
  });

  t.test('dispose: what the command left running goes with the sandbox', async (t) => {
    const h = await setup(t);
    const { sandbox, stdout } = await h.start('sleep 300 >/dev/null 2>&1 & echo "pids $!"; exit 0');
    const result = await within('wait()', sandbox.wait());
    t.equal(result.exitCode, 0, 'the main process exited');
    const pids = await until('the pid of the background process', () => pidsIn(stdout.text()));
    h.reapAtTeardown(pids);
    t.same(await h.alive(pids), pids, 'its background process still runs');
    await within('dispose()', sandbox.dispose());
    t.same(await h.alive(pids), [], 'none is left once dispose() resolved');
    await within('a second dispose()', sandbox.dispose());
    t.pass('dispose() again resolves');
  });

  t.test('extractFile: files of the task directory; paths outside it are refused', async (t) => {
    const h = await setup(t);
    const { sandbox, result } = await h.run('mkdir -p sub && printf data > sub/file.txt && printf top > top.txt');
    t.equal(result.exitCode, 0);
    const read = async (path: string) => collect(await sandbox.extractFile(path)).done;
    t.equal(await read('sub/file.txt'), 'data');
    t.equal(await read('top.txt'), 'top');
    t.equal(await read('sub/../top.txt'), 'top', 'a path that stays inside');
    await t.rejects(read('missing.txt'), 'a missing file is an error');
    for (const outside of ['../outside.txt', 'sub/../../outside.txt', '/etc/passwd']) {
      const error = await sandbox.extractFile(outside).then(() => undefined, (error: unknown) => error);
      t.ok(isMalformedPayload(error), `${outside} is refused with MalformedPayloadError`);
    }
  });

  t.test('malformed payloads: prepare() refuses each with MalformedPayloadError naming the payload path', async (t) => {
    const h = await setup(t);
    t.ok(h.fixture.malformedPayloads.length > 0, 'the fixture names malformed payloads');
    for (const payload of h.fixture.malformedPayloads) {
      const error = await h.prepare(payload).then(() => undefined, (error: unknown) => error);
      t.ok(isMalformedPayload(error), `${JSON.stringify(payload)} is refused`);
      const problems = (error as { problems?: readonly { path: string }[] } | undefined)?.problems ?? [];
      t.ok(problems.length > 0 && problems.every((problem) => problem.path.startsWith('payload')), 'each problem has its path in the payload');
    }
  });

  t.test('a builder that never starts: discard() is idempotent, and start() after it is refused', async (t) => {
    const h = await setup(t);
    const { builder } = await h.prepare(h.fixture.payload('echo never'));
    await builder.discard();
    await builder.discard();
    await t.rejects(builder.start(), 'start() after discard()');
  });
}
