/**
 * Ctrl-C on `drover worker` in a terminal: the terminal sends SIGINT to its
 * whole foreground process group. Only the worker may hear it (it starts
 * its graceful shutdown); the helper that starts its commands (the agent,
 * or the spawner on a machine without perl) and the commands themselves
 * run outside that group, so a running task finishes within the grace
 * period, or is aborted as exception/worker-shutdown after it, never
 * `failed`. Nothing is left running afterwards.
 *
 * Each worker here is started as the leader of a process group of its own,
 * as a shell starts a foreground job, and the group is sent SIGINT as the
 * terminal would.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { groupPids, isAlive, readProcStat } from '../src/hosts/proc.js';
import { eventually, readTask, runOutcomes, startWorker, submit, type WorkerProcess } from './helpers/drover.js';

/** `drover worker ARGS...` as the leader of a new process group (a foreground job), killed with its group at teardown. */
function startGroupLeader(t: Test, args: readonly string[], cwd: string, env: Record<string, string> = {}): WorkerProcess {
  const worker = startWorker(args, { cwd, env, detached: true });
  t.teardown(() => {
    try {
      process.kill(-worker.child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
  });
  return worker;
}

/** Waits for the pid file a task writes first (`echo $$ > FILE`): its process group. */
function pidFrom(file: string): Promise<number> {
  return eventually(`${file} to be written`, () => {
    if (!existsSync(file)) return undefined;
    const pid = Number(readFileSync(file, 'utf8').trim());
    return pid > 0 ? pid : undefined;
  });
}

/** A directory of symlinks to sh and sleep and no perl: as a worker's PATH, its commands go through the spawner. */
function pathWithoutPerl(t: Test): string {
  const bin = mkdtempSync(join(tmpdir(), 'drover-noperl-'));
  t.teardown(() => rmSync(bin, { recursive: true, force: true }));
  for (const tool of ['sh', 'sleep']) symlinkSync(execFileSync('/bin/sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim(), join(bin, tool));
  return bin;
}

const STARTERS = [
  { starter: 'agent', env: (_t: Test): Record<string, string> => ({}) },
  { starter: 'spawner', env: (t: Test): Record<string, string> => ({ PATH: pathWithoutPerl(t) }) },
] as const;

for (const { starter, env } of STARTERS) {
  t.test(`${starter}: Ctrl-C (SIGINT to the worker's process group) lets a running task complete within the grace period`, async (t) => {
    const cwd = t.testdir({});
    const workerEnv = env(t);
    // It runs until told to end, after the SIGINT: so it is surely running when the Ctrl-C comes.
    const go = join(cwd, 'go');
    const id = await submit(['--', `echo $$ > ${join(cwd, 'task.pid')}; while [ ! -e ${go} ]; do sleep 0.1; done; echo done`], { cwd });
    const worker = startGroupLeader(t, ['--shutdown-grace', '20'], cwd, workerEnv);
    const pgid = await pidFrom(join(cwd, 'task.pid'));
    const helper = readProcStat(pgid)?.ppid;
    t.ok(helper !== undefined && helper !== worker.child.pid, `the task was started by the ${starter}`);
    t.not(readProcStat(helper!)?.pgrp, worker.child.pid, `the ${starter} is not in the worker's process group`);
    t.not(readProcStat(pgid)?.pgrp, worker.child.pid, 'nor is the task');
    process.kill(-worker.child.pid!, 'SIGINT');
    await eventually('the worker to begin its graceful shutdown', () => worker.log().includes('shutting down gracefully'));
    writeFileSync(go, '');
    t.equal(await worker.exited, 4, 'exit code 4: stopped by a signal', { log: worker.log() });
    t.match(worker.log(), /shutting down gracefully/);
    t.same(runOutcomes(await readTask(join(cwd, '.drover'), id)), ['completed'], 'the task ran to its end, within the grace period');
    t.same(groupPids(pgid), [], 'nothing of the task is left');
    await eventually(`the ${starter} to exit`, () => !isAlive(helper!), 10_000);
    t.same(groupPids(worker.child.pid!), [], 'nothing is left in the worker\'s group');
  });

  t.test(`${starter}: Ctrl-C with a task that outlives the grace period: exception/worker-shutdown, not failed, and nothing left`, async (t) => {
    const cwd = t.testdir({});
    const workerEnv = env(t);
    const id = await submit(['--', `echo $$ > ${join(cwd, 'task.pid')}; sleep 1000 & sleep 1000; wait`], { cwd });
    const worker = startGroupLeader(t, ['--shutdown-grace', '0.5'], cwd, workerEnv);
    const pgid = await pidFrom(join(cwd, 'task.pid'));
    const helper = readProcStat(pgid)?.ppid;
    process.kill(-worker.child.pid!, 'SIGINT');
    t.equal(await worker.exited, 4, 'exit code 4: stopped by a signal', { log: worker.log() });
    const outcomes = runOutcomes(await readTask(join(cwd, '.drover'), id));
    t.same(outcomes.slice(0, 1), ['exception/worker-shutdown'], 'aborted after the grace period');
    t.same(outcomes.slice(1), ['pending'], 'to be run again');
    t.same(groupPids(pgid), [], 'nothing of the task is left');
    await eventually(`the ${starter} to exit`, () => helper === undefined || !isAlive(helper), 10_000);
    t.same(groupPids(worker.child.pid!), [], 'nothing is left in the worker\'s group');
  });
}
