/**
 * Regression: a run whose SSH machine goes down mid-task was resolved
 * exception/worker-shutdown with the message "the worker shut down while
 * the task ran", which was false (the worker went on) and named no host.
 * Now the message says which host went down and why; the reason stays
 * worker-shutdown, so that the queue runs the task again. A worker in this
 * process on two real sshd servers; one is killed while it runs the task.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { ScriptEngine } from '../src/engines/script.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import { livelogPlugin } from '../src/plugins/livelog.js';
import { SqliteQueue } from '../src/queues/sqlite.js';
import { createLogger } from '../src/runtime/logger.js';
import { eventually, runOutcomes } from './helpers/drover.js';
import { remoteWorkDir, requireSshd, sshd } from './helpers/sshd.js';
import { inProcessWorker } from './helpers/worker.js';

if (!requireSshd(t)) process.exit(0);

t.test('a run whose host goes down resolves exception/worker-shutdown naming the host; it runs again on the other', async (t) => {
  const first = await sshd(t);
  const servers = [first, await sshd(t, { identityFile: first.identityFile })];
  const dir = mkdtempSync(join(tmpdir(), 'drover-host-lost-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'known_hosts'), servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => lines.push(line) });
  const host = new SshHost({
    hosts: servers.map((s) => ({ address: s.address, capacity: 1 })),
    identityFiles: [first.identityFile],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    killGraceMs: 500,
    probationMs: 60_000,
    workDir: remoteWorkDir(t, first.user, 'host-lost'),
    logger,
  });
  const queue = SqliteQueue.open({ dir: join(dir, 'queue'), claimTimeoutMs: 10_000, pollIntervalMs: 50 });
  inProcessWorker(t, {
    workerId: 'host-lost-worker',
    queue,
    host,
    engine: new ScriptEngine({ killGraceMs: 500, env: { PATH: '/usr/bin:/bin' } }),
    plugins: [livelogPlugin()],
    workDir: join(dir, 'work'),
    logger,
    capacity: 2,
  });
  const id = await queue.submit({
    payload: { name: 'job', script: ['#!/bin/sh', 'sleep 2', 'echo done'] },
    deadline: Date.now() + 120_000,
    retries: 1,
  });
  const busy = await eventually('the task to run on one host', () => host.status().find((m) => m.running === 1), 30_000);
  const victim = servers.find((server) => server.address === busy.address)!;
  await victim.crash();
  const task = await eventually('the task to resolve', async () => {
    const current = await queue.task(id);
    return current.state !== 'pending' && current.state !== 'running' && current;
  }, 30_000);
  t.same(runOutcomes(task), ['exception/worker-shutdown', 'completed'], 'retried, as after a shutdown');
  const message = task.runs[0]!.message ?? '';
  t.match(message, `host ${victim.address} went down: `, 'the first run\'s message names the host that went down');
  t.notMatch(message, 'the worker shut down', 'and does not say that the worker shut down');
  t.ok(lines.some((line) => /warn\s+the run's host went down/.test(line) && line.includes(`host=${victim.address}`)), 'the worker\'s log names the host too');
});
