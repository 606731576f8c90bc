/**
 * Regression: `drover batch --config FILE` reads FILE (its ssh.*, engine.*
 * and cloud settings), as DROVER_CONFIG does; it used to be accepted and
 * silently ignored. The queue flags (--queue-dir, --queue...), which
 * batch has no use for (a session has a queue of its own), are refused
 * and not listed in its --help.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { EXIT } from '../src/cli/exit-codes.js';
import { drover } from './helpers/drover.js';

t.test('batch --config: a bad file is refused naming it; its engine.killSignal stops a timed-out job', async (t) => {
  const cwd = t.testdir({
    'bad.yaml': 'colour: red\n',
    'sigint.yaml': 'engine:\n  killSignal: SIGINT\n  killGrace: 5\n',
  });
  const bad = await drover(['batch', '--config', 'bad.yaml', '--sessions', 'sessions', '--', 'echo'], { cwd, input: '1\n' });
  t.equal(bad.code, EXIT.CONFIG, bad.stderr);
  t.match(bad.stderr, 'config file "bad.yaml": colour: is not a known setting');

  // The job says which signal stopped it; with the default (SIGTERM) it would say nothing and die.
  const job = `trap 'echo caught INT; exit 7' INT; trap 'echo caught TERM; exit 8' TERM; i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`;
  const result = await drover(['batch', '--config', 'sigint.yaml', '--timeout', '1', '--sessions', 'sessions', '--', 'sh', '-c', job], { cwd, input: 'x\n' });
  t.equal(result.code, EXIT.FAILED, result.stderr);
  t.match(result.stdout, /^session 1 \(\d+ s\): 0\/1 OK - 0 pending, 1 timeout, 0 errors$/m);
  const output = readFileSync(join(cwd, 'sessions', '1', 'output', '1.log'), 'utf8');
  t.match(output, /^caught INT$/m, 'the timed-out job got the config file\'s kill signal');
  t.notMatch(output, /caught TERM/);
});

t.test('batch and sessions refuse the queue flags, and their --help does not list them', async (t) => {
  const cwd = t.testdir({});
  for (const args of [['batch', '--queue-dir', 'q', '--', 'echo'], ['batch', '--queue', 'postgres://x@127.0.0.1/y', '--', 'echo'], ['sessions', '--queue-dir', 'q']]) {
    // Its own sessions directory: a batch that took the flag would run, and write its session there.
    const result = await drover(args, { cwd, input: '1\n', env: { DROVER_SESSIONS: join(cwd, 'sessions') } });
    t.equal(result.code, EXIT.CONFIG, `${args.join(' ')}: exit 2`);
    t.match(result.stderr, new RegExp(`^drover ${args[0]}: ${args[1]} is not an option of drover ${args[0]}: it does not use the task queue$`, 'm'));
  }
  const help = await drover(['batch', '--help'], { cwd });
  t.equal(help.code, EXIT.OK);
  t.match(help.stdout, /-c, --config FILE/);
  t.notMatch(help.stdout, /--queue-dir/);
  const workerHelp = await drover(['worker', '--help'], { cwd });
  t.match(workerHelp.stdout, /--queue-dir DIR/, 'other commands still list them');
});
