/**
 * runBatch on cloud instances (providerHosts, src/batch/provider-hosts.ts),
 * on each provider's loopback endpoint with real sshd servers standing in
 * for the instances: terminate calls that fail twice per instance are
 * retried and every instance is terminated, and the watchdog finds nothing
 * left; terminate calls that keep failing leak the instances to the
 * watchdog, which terminates them before the batch returns; an abort while
 * the instances launch terminates them too.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { providerHosts, type ProviderHostsOptions } from '../src/batch/provider-hosts.js';
import { runBatch } from '../src/batch/run.js';
import { ownerId, SessionRegistry } from '../src/cloud/sessions.js';
import { Watchdog } from '../src/cloud/watchdog.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { CLOUDS } from './helpers/clouds.js';
import { eventually } from './helpers/drover.js';
import { requireSshd, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const dir = mkdtempSync(join(tmpdir(), 'drover-batch-provider-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

const TIMING = { bootTimeoutMs: 10_000, sshTimeoutMs: 15_000, drainTimeoutMs: 1000, terminateAttempts: 10, terminateBackoffMs: 20, terminateMaxBackoffMs: 100 };

let count = 0;
/** Three sshd servers trusting one key, the cloud handing out their ports, and the source's options. */
async function setUp(t: Test, name: 'aws' | 'gce', extra: Partial<ProviderHostsOptions> = {}, leftovers = 0) {
  const first = await sshd(t);
  const servers: TestSshd[] = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
  // The endpoint hands out one port per launch: instances launched before the batch take the first server's.
  const cloud = await CLOUDS[name](t, [...Array.from({ length: leftovers }, () => first.port), ...servers.map((s) => s.port)]);
  const ssh = { identityFiles: [first.identityFile], knownHostsFile: join(dir, `known_hosts-${++count}`), hostKeyPolicy: 'accept-new' as const, agent: false as const };
  const registry = new SessionRegistry(join(dir, 'cloud-sessions'));
  const options: ProviderHostsOptions = {
    provider: cloud.provider,
    spec: { image: 'image-1', instanceType: 'type-1' },
    sshUser: first.user,
    ssh,
    registry,
    timing: TIMING,
    pollMs: 20,
    probeIntervalMs: 50,
    ...extra,
  };
  return { servers, cloud, ssh, registry, options, sessionsDir: join(dir, `sessions-${count}`) };
}

for (const name of ['aws', 'gce'] as const) {
  t.test(`${name}: terminate calls that fail twice per instance are retried; all 3 terminated, the watchdog finds nothing left`, async (t) => {
    const { servers, cloud, ssh, registry, options, sessionsDir } = await setUp(t, name);
    const source = providerHosts(options);
    cloud.faults.failTerminate(6, { code: cloud.refusal });
    const outcome = await runBatch(['1', '2', '3', '4', '5', '6'], { command: ['sh', '-c', 'echo "job $0"'], split: 3, sessionsDir, hostSource: source, ssh });
    t.same(outcome.counts, { pending: 0, running: 0, ok: 6, failed: 0, timeout: 0 }, 'every job ran');
    for (const job of outcome.jobs) t.match(readFileSync(join(outcome.session.dir, 'output', `${job.n}.log`), 'utf8'), new RegExp(`^job ${job.line}$`, 'm'));
    t.same([...new Set(outcome.jobs.map((job) => job.host))].sort(), servers.map((s) => s.address).sort(), 'on the three instances');
    t.match(outcome.session.params.hostSource, new RegExp(`^${name} \\(.+\\): type-1 instances of image-1, one per slot$`), 'the session says what it ran on');
    t.equal(cloud.count(cloud.launchCall), 3, 'three instances launched');
    t.equal(cloud.count(cloud.terminateCall), 9, 'six terminate calls refused, three accepted');
    t.same(source.fleet()?.states().map((s) => s.state), ['terminated', 'terminated', 'terminated']);
    await eventually('every instance to be gone', () => cloud.alive().length === 0, 10_000);
    t.same(registry.list(), [], 'the fleet\'s session is closed');
    const sweep = await new Watchdog({ providers: [cloud.provider], registry }).sweep();
    t.same(sweep.found, [], 'the watchdog finds nothing left');
  });

  t.test(`${name}: a batch's watchdog sweeps at the start: an instance a crashed batch left behind is terminated`, async (t) => {
    const { cloud, ssh, options, sessionsDir } = await setUp(t, name, {}, 1);
    const leftover = await cloud.provider.launch({ image: 'image-1', instanceType: 'type-1', session: 'crashed-batch', owner: ownerId(), token: 'left-behind' });
    t.equal(cloud.alive().length, 1, 'the leftover runs before the batch');
    const outcome = await runBatch(['1', '2', '3'], { command: ['true'], split: 3, sessionsDir, hostSource: providerHosts(options), ssh });
    t.equal(outcome.counts.ok, 3);
    t.equal(cloud.count(cloud.launchCall), 4, 'one leftover and three instances of the batch');
    await eventually('every instance to be gone, the leftover too', () => cloud.alive().length === 0, 10_000);
    t.equal(cloud.count(cloud.terminateCall), 4, `the leftover ${leftover.id} was terminated, with the batch's three`);
  });

  t.test(`${name}: terminate calls that keep failing leak the instances to the watchdog, which terminates them before the batch returns`, async (t) => {
    const { cloud, ssh, registry, options, sessionsDir } = await setUp(t, name, { timing: { ...TIMING, terminateAttempts: 2 } });
    const source = providerHosts(options);
    cloud.faults.failTerminate(6, { code: cloud.refusal });
    const outcome = await runBatch(['1', '2', '3'], { command: ['true'], split: 3, sessionsDir, hostSource: source, ssh });
    t.equal(outcome.counts.ok, 3);
    t.same(source.fleet()?.states().map((s) => s.state), ['leaked', 'leaked', 'leaked'], 'each machine gave up after two refusals');
    t.equal(cloud.count(cloud.terminateCall), 9, 'the watchdog\'s sweep terminated the three');
    await eventually('every instance to be gone', () => cloud.alive().length === 0, 10_000);
    t.same((await new Watchdog({ providers: [cloud.provider], registry }).sweep()).found, [], 'nothing left');
  });

  t.test(`${name}: an abort while the instances launch terminates them, and no job runs`, async (t) => {
    const { cloud, ssh, options, sessionsDir } = await setUp(t, name);
    cloud.faults.slow(300, { action: cloud.launchCall, count: 3 });
    const source = providerHosts(options);
    const abort = new AbortController();
    const running = runBatch(['1', '2', '3'], { command: ['true'], split: 3, sessionsDir, hostSource: source, ssh, signal: abort.signal });
    await eventually('the launches to be under way', () => source.fleet()?.states().length === 3, 10_000);
    abort.abort();
    await t.rejects(running, /interrupted while 3 .* instances launched; they are terminated/);
    t.same(source.fleet()?.states().map((s) => s.state), ['terminated', 'terminated', 'terminated']);
    await eventually('every instance to be gone', () => cloud.alive().length === 0, 10_000);
    t.equal(cloud.count(cloud.launchCall), 3);
  });
}
