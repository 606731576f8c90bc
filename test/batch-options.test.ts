/**
 * `drover batch` options on this machine: --pre and --post, --overlay's
 * refusal without hosts, --template and DROVER_<NAME> with flag >
 * template > environment, the confirmation question and the live progress
 * line on a real pseudo-terminal, and bad input.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { createSession } from '../src/batch/run.js';
import { parameterTable, progressLine } from '../src/batch/progress.js';
import { EXIT } from '../src/cli/exit-codes.js';
import { DROVER, drover, userEnv } from './helpers/drover.js';

const PTY = fileURLToPath(new URL('./fixtures/batch-pty.py', import.meta.url));
const params = (cwd: string, id = 1) => JSON.parse(readFileSync(join(cwd, 'sessions', String(id), 'params.json'), 'utf8')) as Record<string, unknown>;

t.test('--pre runs before the first job and --post after the last; a failed --pre runs no job', async (t) => {
  const cwd = t.testdir({});
  const events = join(cwd, 'events');
  const result = await drover([
    'batch', '--split', '2', '--sessions', 'sessions', '--pre', `echo pre >> '${events}'; pwd >> '${events}'`, '--post', `echo post >> '${events}'`,
    '--', 'sh', '-c', `echo "job $0" >> '${events}'`,
  ], { cwd, input: '1\n2\n3\n' });
  t.equal(result.code, EXIT.OK, result.stderr);
  const lines = readFileSync(events, 'utf8').trim().split('\n');
  t.same(lines.slice(0, 2), ['pre', join(cwd, 'sessions', '1')], '--pre ran first, in the session directory');
  t.same(lines.slice(2, 5).sort(), ['job 1', 'job 2', 'job 3']);
  t.same(lines.slice(5), ['post'], '--post ran last, once');
  t.match(readFileSync(join(cwd, 'sessions', '1', 'session.log'), 'utf8'), /\[localhost\] running: echo pre/);

  const failed = await drover(['batch', '--sessions', 'sessions', '--pre', 'echo broken; exit 3', '--', 'sh', '-c', `echo "job $0" >> '${events}'`], { cwd, input: '4\n' });
  t.equal(failed.code, EXIT.FAILED);
  t.match(failed.stderr, /--pre failed on localhost \(exit 3\); 1 jobs are pending\. Resume them with: drover batch --resume 2/);
  t.notMatch(readFileSync(events, 'utf8'), 'job 4', 'no job ran');
});

t.test('--overlay needs hosts; a missing overlay directory is bad input', async (t) => {
  const cwd = t.testdir({ tree: { file: 'x' } });
  const local = await drover(['batch', '--sessions', 'sessions', '--overlay', 'tree', 'echo'], { cwd, input: '1\n' });
  t.equal(local.code, EXIT.CONFIG);
  t.match(local.stderr, /--overlay .*tree: an overlay is copied onto SSH hosts/);
  const missing = await drover(['batch', '--sessions', 'sessions', '--overlay', 'nowhere', '--hosts', 'me@127.0.0.1:1', 'echo'], { cwd, input: '1\n' });
  t.equal(missing.code, EXIT.CONFIG);
  t.match(missing.stderr, /--overlay "nowhere" is not a directory/);
});

t.test('--template and DROVER_<NAME>: flag > template > environment', async (t) => {
  const cwd = t.testdir({
    'task.yaml': 'split: 2\nretries: 1\ntimeout: 30\ncommand: [echo, from-template]\nsessions: sessions\n',
    'bad.yaml': 'split: 2\ncolour: blue\ncommand: {a: 1}\n',
  });
  const env = { DROVER_SPLIT: '3', DROVER_RETRIES: '4', DROVER_STRIKES: '5' };
  const fromEnv = await drover(['batch', '--sessions', 'sessions', 'echo'], { cwd, input: '1\n', env });
  t.equal(fromEnv.code, 0, fromEnv.stderr);
  t.match(params(cwd, 1), { split: 3, retries: 4, strikes: 5 }, 'the environment alone');
  const fromTemplate = await drover(['batch', '--template', 'task.yaml'], { cwd, input: '1\n', env });
  t.equal(fromTemplate.code, 0, fromTemplate.stderr);
  t.match(params(cwd, 2), { split: 2, retries: 1, timeout: 30, strikes: 5, command: ['echo', 'from-template'] }, 'the template over the environment; the template\'s sessions directory, relative to it');
  t.match(readFileSync(join(cwd, 'sessions', '2', 'output', '1.log'), 'utf8'), 'from-template 1\n', 'the template\'s command');
  const fromFlag = await drover(['batch', '--template', 'task.yaml', '--split', '1', '--', 'echo', 'from-flag'], { cwd, input: '1\n', env: { ...env, DROVER_TEMPLATE: 'bad.yaml' } });
  t.equal(fromFlag.code, 0, fromFlag.stderr);
  t.match(params(cwd, 3), { split: 1, retries: 1, strikes: 5, command: ['echo', 'from-flag'] }, 'flags over the template (--template over DROVER_TEMPLATE)');

  const bad = await drover(['batch', '--template', 'bad.yaml'], { cwd, input: '1\n' });
  t.equal(bad.code, EXIT.CONFIG);
  t.match(bad.stderr, /template "bad.yaml": colour: is not a batch option/);
  t.match(bad.stderr, /template "bad.yaml": command: must be a string or a list of strings/);
  const missing = await drover(['batch', '--template', 'missing.yaml'], { cwd, input: '1\n' });
  t.equal(missing.code, EXIT.CONFIG);
  t.match(missing.stderr, /template "missing.yaml": not found/);
  const badEnv = await drover(['batch', '--sessions', 'sessions', 'echo'], { cwd, input: '1\n', env: { DROVER_SPLIT: 'many' } });
  t.equal(badEnv.code, EXIT.CONFIG);
  t.match(badEnv.stderr, /--split must be a whole number of at least 1, not "many"/);
  const noJobs = await drover(['batch', '--sessions', 'sessions', 'echo'], { cwd, input: '\n' });
  t.equal(noJobs.code, EXIT.CONFIG);
  t.match(noJobs.stderr, /no jobs: pipe the job lines into drover batch/);
});

t.test('on a terminal: the parameter table and the question before a resume; no: nothing runs; yes: a live progress line', async (t) => {
  const cwd = t.testdir({});
  const sessionsDir = join(cwd, 'sessions');
  createSession(['a', 'b', 'c'], { command: ['echo', 'job'], split: 2, sessionsDir, timeout: 9 });
  const onTerminal = (answer: string) => new Promise<{ code: number | null; output: string }>((resolve) => {
    const child = spawn('python3', [PTY, answer, process.execPath, DROVER, 'batch', '--resume', '1', '--sessions', sessionsDir], { cwd, env: userEnv({ COLUMNS: '200' }), stdio: ['ignore', 'pipe', 'inherit'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.on('close', (code) => resolve({ code, output }));
  });
  const no = await onTerminal('no');
  t.equal(no.code, EXIT.FAILED, no.output);
  t.match(no.output, /About to run 3 of 3 jobs of session 1:/);
  t.match(no.output, /Parameter\s+Value\r?\n\s+-+\s+-+\r?\n\s+jobs\s+3 \(a \.\. c\)\r?\n\s+command\s+echo job\r?\n\s+hosts\s+this machine\r?\n\s+split\s+2\r?\n\s+timeout\s+9/);
  t.match(no.output, /strikes\s+-/);
  t.match(no.output, 'Is this really what you want? [yes/no]');
  t.match(no.output, 'you did not answer yes; nothing ran');
  t.notOk(JSON.parse(readFileSync(join(sessionsDir, '1', 'jobs.json'), 'utf8')).some((job: { status: string }) => job.status !== 'pending'), 'nothing ran');

  const ctrlC = await onTerminal('\x03');
  t.equal(ctrlC.code, EXIT.FAILED, 'Ctrl-C at the question is a no');
  t.match(ctrlC.output, 'you did not answer yes; nothing ran');

  const yes = await onTerminal('yes');
  t.equal(yes.code, EXIT.OK, yes.output);
  t.match(yes.output, '\r\x1b[K3 done, 0 failed, 0 running, 0 pending | localhost: 0 running, 3 ok', 'the live line is redrawn in place');
  t.match(yes.output, /session 1 \(\d+ s\): 3\/3 OK/);
  t.notMatch(yes.output, / job 1 ok slot/, 'no line per successful job on a terminal');

  const skipped = await drover(['batch', '--resume', '1', '--sessions', sessionsDir], { cwd });
  t.notMatch(skipped.stdout, 'About to run', 'no question when stdin is not a terminal');
});

t.test('the progress line and the parameter table', async (t) => {
  t.equal(progressLine({
    counts: { pending: 5, running: 3, ok: 10, failed: 1, timeout: 1 },
    hosts: [{ host: 'a', state: 'up', running: 3, ok: 6, failed: 0 }, { host: 'b', state: 'retired', running: 0, ok: 4, failed: 2 }],
  }), '10 done, 2 failed, 3 running, 5 pending | a: 3 running, 6 ok | b: retired, 4 ok, 2 failed');
  t.equal(parameterTable([['jobs', '2 (x .. y)'], ['timeout', undefined]]), '  Parameter  Value\n  ---------  -----\n  jobs       2 (x .. y)\n  timeout    -\n');
});

t.test('--hosts: a bad address is bad input; hosts that cannot be reached leave the jobs pending', async (t) => {
  const cwd = t.testdir({});
  const bad = await drover(['batch', '--sessions', 'sessions', '--hosts', 'me@127.0.0.1:99999', 'echo'], { cwd, input: '1\n' });
  t.equal(bad.code, EXIT.CONFIG);
  t.match(bad.stderr, /--hosts: SSH address "me@127.0.0.1:99999": port must be 1-65535/);
  const twice = await drover(['batch', '--sessions', 'sessions', '--hosts', 'me@127.0.0.1:22,me@127.0.0.1', 'echo'], { cwd, input: '1\n' });
  t.equal(twice.code, EXIT.CONFIG);
  t.match(twice.stderr, /--hosts: me@127\.0\.0\.1:22 is listed twice/);
  // Nothing listens on port 1 of the loopback.
  const unreachable = await drover(['batch', '--sessions', 'sessions', '--hosts', 'me@127.0.0.1:1', 'echo'], { cwd, input: '1\n2\n', env: { SSH_AUTH_SOCK: '' } });
  t.equal(unreachable.code, EXIT.FAILED);
  t.match(unreachable.stderr, /no SSH host can be reached:\n {2}- me@127\.0\.0\.1:1: [\s\S]*; 2 jobs are pending\. Resume them with: drover batch --resume 1/);
  t.match(unreachable.stdout, /host me@127\.0\.0\.1:1 retired: 0 jobs ok, 0 failed/);
  t.match(unreachable.stdout, /^session 1 \(\d+ s\): 0\/2 OK - 2 pending, 0 timeout, 0 errors$/m);
  t.match(params(cwd, 1), { hosts: [{ address: 'me@127.0.0.1:1' }], split: 1 }, 'the session keeps its hosts for --resume');
});
