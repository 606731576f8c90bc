/**
 * The watchdog on its own: owners and sessions as it reads them, and its
 * periodic sweeps: it terminates a leftover on start, and one whose
 * terminate fails on the next sweep; live and foreign instances are left
 * alone; stop() ends the sweeps.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { AwsProvider } from '../src/cloud/aws.js';
import { CallTimeoutError, withRetry } from '../src/cloud/retry.js';
import { ownedHere, ownerGone, ownerId, parseOwner, SessionRegistry } from '../src/cloud/sessions.js';
import { Watchdog } from '../src/cloud/watchdog.js';
import { labelValue } from '../src/cloud/provider.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startEc2Endpoint } from '../src/testing/ec2-endpoint.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-watchdog-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

async function deadPid(): Promise<number> {
  const child = spawn('true');
  await new Promise((resolve) => child.once('exit', resolve));
  return child.pid!;
}

async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

t.test('owners: <host>/<pid> as EC2 stores it, and as GCE labels do', async (t) => {
  t.same(parseOwner('build-1.example/4242'), { host: 'build-1.example', pid: 4242 });
  t.same(parseOwner(labelValue('Build-1.Example/4242')), { host: 'build-1-example', pid: 4242 });
  t.equal(parseOwner('no-pid-here'), undefined);
  t.ok(ownedHere(ownerId()), 'this process is owned here');
  t.ok(ownedHere(labelValue(ownerId())), 'also in its GCE label form');
  t.notOk(ownedHere(`not-${hostname()}/1`));
  t.notOk(ownerGone(ownerId()), 'this process runs');
  t.ok(ownerGone(ownerId(await deadPid())), 'a reaped process is gone');
});

t.test('sessions: open until closed, found by their GCE label form too', async (t) => {
  const registry = new SessionRegistry(join(dir, 'registry'));
  registry.open({ session: 'Nightly Build/7', owner: ownerId(), provider: 'gce' });
  t.ok(registry.isOpen('Nightly Build/7'));
  t.ok(registry.isOpen(labelValue('Nightly Build/7')));
  t.same(registry.list().map((r) => r.session), ['Nightly Build/7']);
  registry.close('Nightly Build/7');
  t.notOk(registry.isOpen('Nightly Build/7'));
  t.same(new SessionRegistry(join(dir, 'nowhere')).list(), [], 'a registry that was never written is empty');
});

t.test('retries: the caller\'s signal stops a pause; an attempt that takes too long is abandoned and retried', async (t) => {  const controller = new AbortController();
  let calls = 0;
  const pending = withRetry(async () => {
    calls++;
    throw new Error('throttled');
  }, { what: 'test', policy: { attempts: 5, baseDelayMs: 60_000, maxDelayMs: 60_000, timeoutMs: 1000 }, transient: () => true, signal: controller.signal, random: () => 0.5 });
  await until('the first attempt', () => calls === 1);
  controller.abort(new Error('stopped by the caller'));
  await t.rejects(pending, { message: 'stopped by the caller' });
  t.equal(calls, 1, 'no attempt after the abort');

  const signals: AbortSignal[] = [];
  const slow = withRetry((signal) => {
    signals.push(signal);
    return new Promise<never>(() => {});
  }, { what: 'ec2:Slow', policy: { attempts: 2, baseDelayMs: 1, maxDelayMs: 1, timeoutMs: 50 }, transient: () => false });
  await t.rejects(slow, new CallTimeoutError('ec2:Slow', 50));
  t.equal(signals.length, 2, 'a timed-out attempt counts as transient');
  t.ok(signals.every((signal) => signal.aborted), 'each abandoned attempt\'s signal is aborted, so the SDK drops the request');
});

t.test('the watchdog sweeps on start and then periodically, until stopped', async (t) => {
  const endpoint = await startEc2Endpoint({ bootMs: 10, shutdownMs: 10 });
  const provider = new AwsProvider({ endpoint: endpoint.url, retry: { attempts: 2, baseDelayMs: 1, maxDelayMs: 5, timeoutMs: 5000 } });
  t.teardown(async () => {
    provider.close();
    await endpoint.close();
  });
  const registry = new SessionRegistry(join(dir, 'sweeps'));
  registry.open({ session: 'live', owner: ownerId(), provider: 'aws' });
  const spec = { image: 'ami-1', instanceType: 't3.micro' };
  const crashedOwner = ownerId(await deadPid());
  const first = await provider.launch({ ...spec, session: 'crashed', owner: crashedOwner, token: 'a' });
  const second = await provider.launch({ ...spec, session: 'crashed', owner: crashedOwner, token: 'b' });
  const live = await provider.launch({ ...spec, session: 'live', owner: ownerId(), token: 'c' });
  const foreign = await provider.launch({ ...spec, session: 'theirs', owner: 'elsewhere/1', token: 'd' });

  // The first sweep's first terminate is refused: that instance waits for the next sweep.
  endpoint.faults.failTerminate(1, { code: 'UnauthorizedOperation' });
  const lines: string[] = [];
  const watchdog = new Watchdog({ providers: [provider], registry, intervalMs: 150, logger: { debug() {}, info: (m) => lines.push(m), warn: (m) => lines.push(m), error: (m) => lines.push(m), child() { return this; } } });
  watchdog.start();
  await until('both leftovers to be terminated', () => endpoint.alive().every((i) => i.id !== first.id && i.id !== second.id), 10_000);
  t.ok(lines.includes('watchdog: could not terminate a leftover instance; the next sweep tries again'), 'the failure was logged');
  t.equal(lines.filter((l) => l === 'watchdog: terminated a leftover instance').length, 2, 'both terminated, one by a later sweep');
  t.same(endpoint.alive().map((i) => i.id).sort(), [live.id, foreign.id].sort(), 'live and foreign instances are left alone');
  await watchdog.stop();
  await watchdog.stop();
  const calls = endpoint.count('DescribeInstances');
  await new Promise((resolve) => setTimeout(resolve, 400));
  t.equal(endpoint.count('DescribeInstances'), calls, 'no sweep after stop()');
});
