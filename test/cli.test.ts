/** The drover command as a user meets it: help, bad input, the read commands, and docs that match the code. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { MAX_RUN_TIME_SECONDS } from '../src/plugins/maxruntime.js';
import { describeSettings, loadConfig } from '../src/runtime/config.js';
import { drover, droverLoading, eventually, readTask, resolved, startWorker, submit } from './helpers/drover.js';

const README = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
const COMMANDS = ['worker', 'submit', 'tasks', 'task', 'logs', 'cancel', 'artifact', 'migrate', 'diagram'];

t.test('every command has --help', async (t) => {
  const cwd = t.testdir({});
  for (const command of COMMANDS) {
    const result = await drover([command, '--help'], { cwd });
    t.equal(result.code, 0, `${command} --help exits 0`);
    t.match(result.stdout, `Usage: drover ${command}`);
  }
  const overview = await drover(['--help'], { cwd });
  t.equal(overview.code, 0);
  for (const command of COMMANDS) t.match(overview.stdout, `  ${command} `, `the overview lists ${command}`);
});

t.test('submit and tasks load no JSON Schema compiler, SSH client or cloud SDK (ajv alone is 30-45 ms of a start)', async (t) => {
  const cwd = t.testdir({});
  const packages = ['ajv', 'ssh2', '@aws-sdk', '@google-cloud'];
  for (const args of [['submit', '--', 'true'], ['tasks']]) {
    const { code, stderr, loaded } = await droverLoading(args, packages, { cwd });
    t.equal(code, 0, stderr);
    t.same(loaded, [], `drover ${args[0]}`);
  }
});

t.test('bad usage exits 2 and says what was wrong', async (t) => {
  const cwd = t.testdir({});
  const cases: [string[], RegExp][] = [
    [['frobnicate'], /unknown command "frobnicate"/],
    [['tasks', '--colour'], /Unknown option '--colour'[\s\S]*drover tasks --help/],
    [['logs'], /expected one ID, got 0/],
    [['submit'], /give a command after --, or --payload FILE/],
    [['submit', '--retries', 'many', '--', 'true'], /--retries must be a whole number/],
    [['submit', '--payload', 'missing.json'], /payload file "missing.json": not found/],
    [['worker', '--capacity', '0'], /option --capacity: must be at least 1, not 0/],
  ];
  for (const [args, message] of cases) {
    const result = await drover(args, { cwd });
    t.equal(result.code, EXIT.CONFIG, `drover ${args.join(' ')} exits 2`);
    t.match(result.stderr, message);
  }
});

t.test('the overview says which commands refuse the queue flags, and they are the ones that do', async (t) => {
  const cwd = t.testdir({});
  const text = (await drover(['--help'], { cwd })).stdout;
  const overview = text.replace(/\s+/g, ' ');
  t.notMatch(overview, /Every command takes[^.]*--queue/, 'not every command takes the queue flags');
  const names = [...text.matchAll(/^ {2}([a-z]+) +\S/gm)].map((match) => match[1]!);
  t.ok(names.length >= COMMANDS.length, `the overview lists the commands (${names.join(', ')})`);
  const refusing: string[] = [];
  for (const name of names) {
    const help = await drover([name, '--help'], { cwd });
    if (help.stdout.includes('--queue-dir DIR')) continue;
    refusing.push(name);
    const result = await drover([name, '--queue-dir', 'q', '--', 'echo'], { cwd, input: '1\n', env: { DROVER_SESSIONS: join(cwd, 'sessions') } });
    t.equal(result.code, EXIT.CONFIG, `drover ${name} --queue-dir exits 2`);
    t.match(result.stderr, `--queue-dir is not an option of drover ${name}: it does not use the task queue`);
  }
  t.same(refusing, ['batch', 'sessions']);
  t.match(overview, `--queue URL (PostgreSQL) or --queue-dir DIR (SQLite) chooses the task queue; ${refusing.join(' and ')} refuse these flags`);
});

t.test('a bad config file is refused naming the file and every bad field', async (t) => {
  const cwd = t.testdir({
    'bad.yaml': 'capacity: lots\nqueue:\n  claimTimeout: -1\ncolour: red\n',
    'broken.yaml': 'capacity: [1\n',
  });
  const bad = await drover(['worker', '--config', 'bad.yaml'], { cwd });
  t.equal(bad.code, 2);
  t.match(bad.stderr, 'config file "bad.yaml": capacity: must be a whole number, not "lots"');
  t.match(bad.stderr, 'config file "bad.yaml": queue.claimTimeout: must be at least 1, not -1');
  t.match(bad.stderr, 'config file "bad.yaml": colour: is not a known setting');
  t.notMatch(bad.stderr, /\n\s+at /, 'no stack trace');

  const broken = await drover(['worker', '--config', 'broken.yaml'], { cwd });
  t.equal(broken.code, 2);
  t.match(broken.stderr, 'config file "broken.yaml": not valid YAML');

  const missing = await drover(['worker', '--config', 'nowhere.yaml'], { cwd });
  t.equal(missing.code, 2);
  t.match(missing.stderr, 'config file "nowhere.yaml": not found');

  const env = await drover(['worker'], { cwd, env: { DROVER_CAPACITY: 'two' } });
  t.equal(env.code, 2);
  t.match(env.stderr, 'environment variable DROVER_CAPACITY: must be a whole number, not "two"');
});

t.test('settings: a flag beats the config file, which beats the environment', async (t) => {
  const cwd = t.testdir({ 'drover.yaml': 'capacity: 3\nshutdownGrace: 7\nengine:\n  killSignal: sigint\n' });
  const file = join(cwd, 'drover.yaml');
  const env = { DROVER_CAPACITY: '2', DROVER_SHUTDOWN_GRACE: '9', DROVER_IDLE_TIMEOUT: '5' };
  const config = loadConfig({ file, env, flags: { capacity: '4' } });
  t.equal(config.capacity, 4, 'flag');
  t.equal(config.shutdownGrace, 7, 'file');
  t.equal(config.idleTimeout, 5, 'environment');
  t.equal(config.queue.claimTimeout, 30, 'default');
  t.equal(config.engine.killSignal, 'SIGINT');
  t.ok(Object.isFrozen(config) && Object.isFrozen(config.queue), 'the compiled config is frozen');
  t.equal(loadConfig({ env: { DROVER_CONFIG: file } }).capacity, 3, 'DROVER_CONFIG names the file');
});

t.test('a queue directory that cannot be created is a clear error, not a stack trace', async (t) => {
  const cwd = t.testdir({ 'a-file': 'not a directory' });
  const result = await drover(['tasks', '--queue-dir', 'a-file/queue'], { cwd });
  t.equal(result.code, 2);
  t.match(result.stderr, /queue directory ".*a-file\/queue"/);
  t.notMatch(result.stderr, /\n\s+at /, 'no stack trace');
  const worker = await drover(['worker', '--once', '--queue-dir', 'a-file/queue'], { cwd });
  t.equal(worker.code, 2, 'the worker refuses to start too');
});

t.test('README documents every exit code and every setting as the code has them', async (t) => {
  for (const [name, code] of Object.entries(EXIT)) {
    t.match(README, new RegExp(`\\n\\| ${code} \\| `), `README's exit code table has ${code} (${name})`);
  }
  t.ok(README.includes(describeSettings('markdown')), 'README\'s settings table is the one the code describes');
});

t.test('submit --payload FILE --max-run-time S: the flag is not dropped, it replaces the file\'s maxRunTime', async (t) => {
  const cwd = t.testdir({ 'plain.yaml': 'command: echo plain\n', 'long.yaml': 'command: echo long\nmaxRunTime: 3600\n' });
  const queueDir = join(cwd, '.drover');
  const plain = await submit(['--payload', 'plain.yaml', '--max-run-time', '5', '--retries', '1'], { cwd });
  const long = await submit(['--payload', 'long.yaml', '--max-run-time', '7'], { cwd });
  const kept = await submit(['--payload', 'long.yaml'], { cwd });
  t.same((await readTask(queueDir, plain)).payload, { command: 'echo plain', maxRunTime: 5 }, 'added to a payload without one');
  t.equal((await readTask(queueDir, plain)).retriesLeft, 1, 'beside --retries, which a payload file takes too');
  t.same((await readTask(queueDir, long)).payload, { command: 'echo long', maxRunTime: 7 }, 'the flag beats the file');
  t.same((await readTask(queueDir, kept)).payload, { command: 'echo long', maxRunTime: 3600 }, 'without the flag, the file\'s');
  const bad = await drover(['submit', '--payload', 'plain.yaml', '--max-run-time', '0'], { cwd });
  t.equal(bad.code, EXIT.CONFIG);
  t.match(bad.stderr, '--max-run-time must be a whole number of at least 1, not "0"');
});

t.test('submit --max-run-time longer than a worker can keep (MAX_RUN_TIME_SECONDS) is refused, and no task is queued', async (t) => {
  const cwd = t.testdir({ 'plain.yaml': 'command: echo plain\n' });
  const queueDir = join(cwd, '.drover');
  const message = `--max-run-time must be at most ${MAX_RUN_TIME_SECONDS} seconds (about 24.8 days, the longest maxRunTime a worker can keep), not "3000000"`;
  for (const args of [['--max-run-time', '3000000', '--', 'true'], ['--payload', 'plain.yaml', '--max-run-time', '3000000']]) {
    const result = await drover(['submit', ...args], { cwd });
    t.equal(result.code, EXIT.CONFIG, `drover submit ${args.join(' ')} exits 2`);
    t.match(result.stderr, message);
  }
  t.same(JSON.parse((await drover(['tasks', '--json'], { cwd })).stdout), [], 'no task was queued');
  const over = await drover(['submit', '--max-run-time', String(MAX_RUN_TIME_SECONDS + 1), '--', 'true'], { cwd });
  t.equal(over.code, EXIT.CONFIG, 'one second over is refused');
  // The longest a worker keeps is accepted, and a worker runs the task under it.
  const longest = await submit(['--max-run-time', String(MAX_RUN_TIME_SECONDS), '--', 'echo longest'], { cwd });
  t.same((await readTask(queueDir, longest)).payload, { command: 'echo longest', maxRunTime: MAX_RUN_TIME_SECONDS });
  const worker = await drover(['worker', '--once'], { cwd });
  t.equal(worker.code, EXIT.OK, worker.stderr);
  t.equal((await readTask(queueDir, longest)).state, 'completed');
});

t.test('submit, task, tasks, logs -f and artifact', async (t) => {
  const cwd = t.testdir({ 'payload.json': JSON.stringify({ command: ['sh', '-c', 'echo "$GREETING"'], env: { GREETING: 'hi from json' } }) });
  const queueDir = join(cwd, '.drover');
  const fromFile = await submit(['--payload', 'payload.json'], { cwd });
  const fromStdin = await submit(['--payload', '-'], { cwd, input: 'command: echo yaml on stdin\nmaxRunTime: 30\n' });
  const argv = await submit(['--', 'printf', '%s|', 'a b', '$HOME'], { cwd });
  const slow = await submit(['--', 'for i in 1 2 3 4; do echo tick $i; sleep 0.3; done'], { cwd });

  const listed = await drover(['tasks', '--json'], { cwd });
  t.same(JSON.parse(listed.stdout).map((task: { taskId: string }) => task.taskId), [slow, argv, fromStdin, fromFile], 'newest first');

  const worker = startWorker(['--capacity', '4'], { cwd });
  t.teardown(() => void worker.child.kill('SIGKILL'));
  // Follow the slow task's log from before it ends to its very end.
  await eventually('the slow task to start', async () => (await drover(['logs', slow], { cwd })).stdout.includes('tick 1'));
  const followed = await drover(['logs', slow, '-f'], { cwd });
  t.equal(followed.code, 0);
  t.match(followed.stdout, /tick 1\ntick 2\ntick 3\ntick 4\n[\s\S]*resolved completed\n$/, 'logs -f ends when the run does');

  for (const id of [fromFile, fromStdin, argv]) await resolved(queueDir, id);
  t.match((await drover(['logs', fromFile], { cwd })).stdout, 'hi from json\n');
  t.match((await drover(['logs', fromStdin], { cwd })).stdout, 'yaml on stdin\n');
  t.match((await drover(['logs', argv], { cwd })).stdout, 'a b|$HOME|', 'argv is passed as is, without a shell');

  const shown = await drover(['task', fromStdin], { cwd });
  t.match(shown.stdout, /state\s+completed/);
  t.match(shown.stdout, /artifact\s+public\/logs\/live\.log/);
  const json = JSON.parse((await drover(['task', fromStdin, '--json'], { cwd })).stdout);
  t.equal(json.payload.maxRunTime, 30);
  t.equal(json.runs[0].artifacts[0].name, 'public/logs/live.log');

  const saved = await drover(['artifact', fromFile, 'public/logs/live.log', '-o', 'live.log'], { cwd });
  t.equal(saved.code, 0, saved.stderr);
  t.match(readFileSync(join(cwd, 'live.log'), 'utf8'), 'hi from json');
  const missing = await drover(['artifact', fromFile, 'public/nope'], { cwd });
  t.equal(missing.code, 1);
  t.match(missing.stderr, 'public/nope');
  const unknown = await drover(['task', 'NoSuchTaskIdAtAll0000'], { cwd });
  t.equal(unknown.code, 1);
  t.match(unknown.stderr, 'NoSuchTaskIdAtAll0000');
});

t.test('logs -f of a task whose worker was killed prints that run\'s log once, then follows the retry', { timeout: 90_000 }, async (t) => {
  const cwd = t.testdir();
  const env = { DROVER_CLAIM_TIMEOUT: '2' };
  const marker = join(cwd, 'marker');
  // The first run prints, then waits to be killed; the retry prints something else and ends. The quotes keep the
  // words apart in the command line, which the log quotes too.
  const id = await submit(['--retries', '1', '--', `if [ -e ${marker} ]; then echo second" "run; else touch ${marker}; echo first" "run; sleep 100; fi`], { cwd, env });
  const first = startWorker([], { cwd, env });
  t.teardown(() => void first.child.kill('SIGKILL'));
  await eventually('the first run to print', async () => (await drover(['logs', id], { cwd, env })).stdout.includes('first run'));
  first.child.kill('SIGKILL'); // its live log is never finished
  await first.exited;
  // No worker sweeps meanwhile: the follower itself must see the run through (queue.task() does not sweep).
  const following = drover(['logs', id, '-f'], { cwd, env, timeoutMs: 60_000 });
  await eventually('the follower to sweep the lost run', async () => (await readTask(join(cwd, '.drover'), id)).runs[0]?.state === 'exception', 30_000);
  const second = startWorker([], { cwd, env });
  t.teardown(() => void second.child.kill('SIGKILL'));
  const followed = await following;
  t.equal(followed.code, 0, followed.stderr);
  t.equal(followed.stdout.split('first run').length - 1, 1, 'the first run\'s log, once');
  t.match(followed.stdout, /first run\n[\s\S]*second run\n[\s\S]*resolved completed\n$/, 'then the retry\'s, to its end');
});
