/**
 * How runs resolve, end to end: a real worker process, real commands, the
 * embedded queue. One worker serves every subtest, which also shows that it
 * keeps running after failures, bad payloads, cancels and timeouts.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { groupPids } from '../src/hosts/proc.js';
import { drover, eventually, readTask, resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';

const cwd = t.testdir({
  'bad-payload.yaml': 'command: [ls, 3]\nenv: { A: 1 }\nmaxRunTime: -4\ncolour: blue\n',
});
const queueDir = join(cwd, '.drover');
const worker = startWorker(['--capacity', '4'], { cwd });
t.teardown(async () => {
  worker.child.kill('SIGKILL');
  await worker.exited;
});

/** Waits for a file the task writes with its shell's pid (the process group leader), and returns it. */
function pidFrom(file: string): Promise<number> {
  return eventually(`${file} to be written`, () => existsSync(file) && Number(readFileSync(file, 'utf8').trim()) > 0 && Number(readFileSync(file, 'utf8').trim()));
}

t.test('a failing command resolves failed with its exit code', async (t) => {
  const id = await submit(['--', 'echo about to fail; exit 7'], { cwd });
  const task = await resolved(queueDir, id);
  t.same(runOutcomes(task), ['failed']);
  t.match(task.runs[0]!.message, /exited with code 7/);
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, 'about to fail');
});

t.test('a command that cannot start resolves failed and says why', async (t) => {
  const id = await submit(['--', 'no-such-command-here', 'arg'], { cwd });
  const task = await resolved(queueDir, id);
  t.same(runOutcomes(task), ['failed']);
  t.match(task.runs[0]!.message, 'the command could not start: no-such-command-here: command not found (on this machine)');
});

t.test('a malformed payload resolves exception/malformed-payload listing every problem', async (t) => {
  const id = await submit(['--payload', 'bad-payload.yaml'], { cwd });
  const task = await resolved(queueDir, id);
  t.same(runOutcomes(task), ['exception/malformed-payload'], 'not retried: the payload will not get better');
  const message = task.runs[0]!.message ?? '';
  for (const path of ['payload.command[1]', 'payload.env.A', 'payload.maxRunTime', 'payload.colour']) {
    t.match(message, path, `names ${path}`);
  }
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, 'payload.colour: is not a known property', 'the log says so too');
});

t.test('drover cancel kills the whole process tree and resolves exception/canceled', async (t) => {
  const pidFile = join(cwd, 'cancel.pid');
  const id = await submit(['--', `echo $$ > ${pidFile}; sleep 1000 & sleep 1000 & trap '' TERM; wait`], { cwd });
  const pgid = await pidFrom(pidFile);
  await eventually('the tree to start', () => groupPids(pgid).length >= 3);
  const cancel = await drover(['cancel', id], { cwd });
  t.equal(cancel.code, 0, cancel.stderr);
  await eventually('every process of the task to be gone', () => groupPids(pgid).length === 0, 10_000);
  const task = await readTask(queueDir, id);
  t.same(runOutcomes(task), ['exception/canceled']);
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, 'stopping the command: canceled', 'the log tells why the command stopped');
  const again = await drover(['cancel', id], { cwd });
  t.equal(again.code, 1, 'canceling a resolved task fails');
  t.match(again.stderr, id);
});

t.test('maxRunTime exceeded: the tree is killed and the run resolves failed, saying why', async (t) => {
  const pidFile = join(cwd, 'slow.pid');
  const id = await submit(['--max-run-time', '1', '--', `echo $$ > ${pidFile}; sleep 1000 & sleep 1000; wait`], { cwd });
  const pgid = await pidFrom(pidFile);
  const task = await resolved(queueDir, id);
  t.same(runOutcomes(task), ['failed']);
  t.match(task.runs[0]!.message, /maxRunTime of 1 s exceeded/);
  t.same(groupPids(pgid), [], 'no process of the task is left');
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, 'stopping the command: maxRunTime of 1 s exceeded');
});

t.test('the worker is still there and still works', async (t) => {
  const id = await submit(['--', 'echo', 'still', 'here'], { cwd });
  const task = await resolved(queueDir, id);
  t.same(runOutcomes(task), ['completed']);
  t.equal(worker.child.exitCode, null, 'the worker process has not exited');
  const logs = await drover(['logs', id], { cwd });
  t.match(logs.stdout, 'still here\n');
});
