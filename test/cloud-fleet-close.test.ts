/**
 * Regressions of a batch's close on cloud instances (providerHosts):
 *  - a launch of unknown outcome (the cloud made the instance, drover never
 *    learnt its id) ended `leaked` without an id, which nobody adopts, and
 *    the final sweep ran only for adopted instances: the instance ran on.
 *    Now close() sweeps then too, and finds it by its tags once the
 *    session is closed;
 *  - the final sweep joined a sweep already under way, which had listed
 *    and judged before the instance was adopted: it missed it. Now it waits
 *    for that one and sweeps afresh.
 * Real SDK clients against the loopback endpoints; the instances never
 * answer over SSH, so no sshd is needed.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { providerHosts, type ProviderHostsOptions } from '../src/batch/provider-hosts.js';
import { AwsProvider } from '../src/cloud/aws.js';
import type { Provider } from '../src/cloud/provider.js';
import { ownerId, SessionRegistry } from '../src/cloud/sessions.js';
import { Watchdog } from '../src/cloud/watchdog.js';
import { ResourceUnavailableError } from '../src/model/errors.js';
import { createLogger, type Logger } from '../src/runtime/logger.js';
import { dummyCloudCredentials, type CloudEndpoint } from '../src/testing/cloud-endpoint.js';
import { startEc2Endpoint } from '../src/testing/ec2-endpoint.js';
import { CLOUDS } from './helpers/clouds.js';
import { until } from './helpers/sshd.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-fleet-close-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

const TIMING = { bootTimeoutMs: 10_000, sshTimeoutMs: 10_000, drainTimeoutMs: 100, terminateAttempts: 2, terminateBackoffMs: 10, terminateMaxBackoffMs: 20 };

let count = 0;
function sourceOptions(t: Test, provider: Provider, extra: Partial<ProviderHostsOptions> = {}): { options: ProviderHostsOptions; registry: SessionRegistry; lines: string[]; logger: Logger } {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => lines.push(line) });
  t.teardown(() => t.comment(lines.join('\n')));
  const registry = new SessionRegistry(join(dir, `cloud-sessions-${++count}`));
  return {
    registry, lines, logger,
    options: {
      provider,
      spec: { image: 'image-1', instanceType: 'type-1' },
      session: `fleet-close-${process.pid}-${count}`,
      sshUser: 'nobody',
      ssh: { agent: false, hostKeyPolicy: 'off' },
      registry,
      timing: TIMING,
      pollMs: 20,
      logger,
      ...extra,
    },
  };
}

/** open() with one slot, which must fail for want of a host. */
async function openFails(t: Test, source: ReturnType<typeof providerHosts>, logger: Logger): Promise<void> {
  const error = await source.open({ split: 1, signal: AbortSignal.timeout(30_000), logger }).then(() => undefined, (e: unknown) => e);
  t.type(error, ResourceUnavailableError, 'no instance came up');
}

const unknownOutcome: Record<'aws' | 'gce', (t: Test) => Promise<{ provider: Provider; endpoint: CloudEndpoint }>> = {
  // RunInstances reaches EC2, but both attempts' answers come too late: the instance exists, its id is never heard of.
  async aws(t) {
    const endpoint = await startEc2Endpoint({ bootMs: 50, shutdownMs: 50 });
    const provider = new AwsProvider({ endpoint: endpoint.url, retry: { attempts: 2, baseDelayMs: 5, maxDelayMs: 5, timeoutMs: 150 } });
    t.teardown(async () => {
      provider.close();
      await endpoint.close();
    });
    endpoint.faults.slow(400, { action: 'RunInstances', count: 2 });
    return { provider, endpoint };
  },
  // The insert is accepted, then waiting for its operation is refused (a missing permission).
  async gce(t) {
    const cloud = await CLOUDS.gce(t, []);
    cloud.faults.refuse(1, { action: 'zoneOperations.wait' });
    return { provider: cloud.provider, endpoint: cloud.endpoint };
  },
};

for (const name of ['aws', 'gce'] as const) {
  t.test(`${name}: an instance made by a launch of unknown outcome is terminated by the final sweep at close`, async (t) => {
    const { provider, endpoint } = await unknownOutcome[name](t);
    const { options, registry, lines, logger } = sourceOptions(t, provider);
    const source = providerHosts(options);
    await openFails(t, source, logger);
    await until('the instance to exist', () => endpoint.alive().length === 1);
    t.same(source.fleet()?.states().map((s) => s.state), ['leaked'], 'the launch ended leaked');
    t.equal(source.fleet()?.states()[0]?.id, undefined, 'with no instance id');
    await source.close();
    t.equal(endpoint.count(name === 'aws' ? 'TerminateInstances' : 'instances.delete'), 1, 'the final sweep terminated it');
    await until('the instance to be gone', () => endpoint.alive().length === 0);
    t.same(registry.list(), [], 'the session is closed');
    t.ok(lines.some((line) => line.includes('a launch of unknown outcome may have made an instance')), 'the log says what becomes of it');
    t.ok(lines.some((line) => line.includes('final sweep') && line.includes('launchesOfUnknownOutcome')), 'and that the final sweep ran for it');
    t.notOk(lines.some((line) => line.includes('instances are left running')), 'nothing is said to be left');
  });
}

t.test('the final sweep does not join a sweep under way that judged before an instance was adopted', async (t) => {
  const cloud = await CLOUDS.aws(t, []);
  const { options, registry, lines, logger } = sourceOptions(t, cloud.provider, {});
  const watchdog = new Watchdog({ providers: [cloud.provider], registry, logger });
  const source = providerHosts({ ...options, watchdog, timing: { ...TIMING, bootTimeoutMs: 300 } });
  // A leftover of a crashed batch, for the sweep under way to be slow about.
  const leftover = await cloud.provider.launch({ image: 'image-1', instanceType: 'type-1', session: 'crashed-batch', owner: ownerId(), token: 'left-behind' });

  // The batch's instance never starts, and both terminate calls are refused: it leaks, with its id.
  cloud.faults.neverStart(1);
  cloud.faults.failTerminate(2, { code: cloud.refusal });
  await openFails(t, source, logger);
  const batchInstance = cloud.endpoint.alive().find((i) => i.id !== leftover.id)!;
  t.ok(batchInstance, 'the batch\'s instance runs on');

  // A periodic sweep: it lists and judges now, then takes its time terminating the leftover.
  cloud.faults.slow(1500, { action: 'TerminateInstances', count: 1 });
  const terminates = cloud.endpoint.arrived('TerminateInstances');
  const answered = cloud.count('TerminateInstances');
  const underWay = watchdog.sweep();
  // The sweep judges every instance it listed before its first terminate: that call's arrival proves it judged.
  await until('the sweep under way to have judged (its terminate call to reach the endpoint)', () => cloud.endpoint.arrived('TerminateInstances') > terminates);
  t.equal(cloud.count('TerminateInstances'), answered, 'its terminate call is held by the slow fault: the sweep is still under way');

  await source.close();
  t.same(watchdog.adopted(), [], 'the adopted instance was terminated before close() returned');
  t.match((await cloud.provider.describe(batchInstance.id))?.state, /^(shutting-down|terminated)$/, 'the batch\'s instance is terminated');
  t.same((await underWay).terminated.map((r) => r.instance.id), [leftover.id], 'the sweep under way terminated only what it had listed');
  await until('every instance to be gone', () => cloud.alive().length === 0);
  t.notOk(lines.some((line) => line.includes('instances are left running')), 'nothing is said to be left');
});
