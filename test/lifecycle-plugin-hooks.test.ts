/**
 * Regression: a plain-JavaScript plugin's worker hooks that throw
 * synchronously or return no promise. `plugin.hook(...).catch(...)` threw a
 * TypeError before `.catch` was attached: a beforeClaim hook made every
 * claim request fail with nothing logged (the worker looked idle and never
 * claimed), and a shutdown hook ended the worker's dispose early, so later
 * plugins were never shut down and the host never disposed. A real worker
 * in this process: the embedded queue, this machine's host, real commands.
 */
import { existsSync } from 'node:fs';
import t, { type Test } from 'tap';
import type { Plugin } from '../src/plugins/plugin.js';
import { instantiate } from '../src/runtime/extensions.js';
import { createLogger } from '../src/runtime/logger.js';
import { eventually } from './helpers/drover.js';
import { localWorker } from './helpers/worker.js';

/** A worker with `plugins` (and livelog) on a fresh queue; its log lines, its host and its queue. */
function worker(t: Test, plugins: readonly Plugin[]) {
  const dir = t.testdir({});
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => lines.push(line) });
  const { worker: running, queue, host } = localWorker(t, dir, { plugins, logger, workerId: 'hooks-worker', pollWaitMs: 100 });
  const submit = () => queue.submit({ payload: { command: 'echo ran' }, deadline: Date.now() + 60_000, retries: 0 });
  return { worker: running, lines, host, queue, submit };
}

t.test('a beforeClaim that throws synchronously holds claims off, logged with the plugin\'s name; the worker claims once it stops', async (t) => {
  let jammed = true;
  // Not async: a plain JavaScript function.
  const doorman = {
    name: 'doorman',
    beforeClaim() {
      if (jammed) throw new Error('the door is jammed');
      return undefined;
    },
  } as unknown as Plugin;
  const { worker: w, lines, queue, submit } = worker(t, [doorman]);
  const id = await submit();
  const held = await eventually('the worker to hold off', () => w.heldOff());
  t.equal(held, 'doorman: beforeClaim failed: the door is jammed');
  await eventually('the log to say so', () => lines.find((line) => /warn\s+holding off claiming plugin=doorman reason="beforeClaim failed: the door is jammed"/.test(line)));
  t.pass('the log names the plugin and the error');
  t.equal((await queue.task(id)).state, 'pending', 'nothing was claimed');
  jammed = false;
  await eventually('the task to complete', async () => (await queue.task(id)).state === 'completed');
  t.ok(lines.some((line) => /info\s+claiming again plugin=doorman/.test(line)), 'the log says the worker claims again');
  t.equal(w.heldOff(), undefined);
});

t.test('a beforeClaim that returns a plain value, not a promise, is heard', async (t) => {
  let full = true;
  const disk = {
    name: 'disk',
    beforeClaim: () => (full ? 'the disk is full' : undefined),
  } as unknown as Plugin;
  const { worker: w, queue, submit } = worker(t, [disk]);
  const id = await submit();
  t.equal(await eventually('the worker to hold off', () => w.heldOff()), 'disk: the disk is full');
  t.equal((await queue.task(id)).state, 'pending');
  full = false;
  await eventually('the task to complete', async () => (await queue.task(id)).state === 'completed');
  t.pass('claimed once the plugin had no reason');
});

t.test('a shutdown that throws synchronously is logged naming the plugin; the other plugins shut down and the host is disposed', async (t) => {
  const shutDown: string[] = [];
  const recorder: Plugin = { name: 'recorder', shutdown: async () => void shutDown.push('recorder') };
  // Plain functions: one returns nothing, one throws before it could return anything.
  const plain = { name: 'plain', shutdown: () => void shutDown.push('plain') } as unknown as Plugin;
  const broken = {
    name: 'broken',
    shutdown() {
      throw new Error('no handle to close');
    },
  } as unknown as Plugin;
  // Shutdown goes in reverse order: broken first.
  const { worker: w, lines, host, queue, submit } = worker(t, [recorder, plain, broken]);
  const id = await submit();
  await eventually('the task to complete', async () => (await queue.task(id)).state === 'completed');
  const journal = host.journal.path;
  t.ok(existsSync(journal), 'the host has a crash journal open (a run was recorded)');
  w.shutdown({ kind: 'signal', signal: 'SIGTERM' });
  t.same(await w.stopped, { reason: { kind: 'signal', signal: 'SIGTERM' } });
  t.same(shutDown, ['plain', 'recorder'], 'the plugins after the broken one were shut down');
  t.equal(lines.filter((line) => /error\s+plugin broken: shutdown failed error="no handle to close"/.test(line)).length, 1, 'the failure is logged once, naming the plugin');
  t.notOk(lines.some((line) => /plugin plain: shutdown failed/.test(line)), 'a shutdown that returns nothing is no failure');
  t.notOk(existsSync(journal), 'the host was disposed: its journal is closed and gone');
});

t.test('a plugin module whose beforeClaim is not a function is refused when it is loaded', async (t) => {
  const created = await instantiate(
    { default: { createPlugin: () => ({ name: 'gatekeeper', beforeClaim: 'not now' }) } },
    'plugin',
    undefined,
    { configDir: t.testdir({}), remote: false, killSignal: 'SIGTERM', killGraceMs: 1000 },
  );
  t.same(created, { problem: 'createPlugin returned no valid plugin: beforeClaim must be a function' });
});
