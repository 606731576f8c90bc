/**
 * Regression: once Compute Engine accepted instances.insert, a later
 * failure that is not worth retrying (a 403 on zoneOperations.wait, or on
 * reading the instance back) was marked refused: the launch counted as
 * "nothing made", the instance machine ended `terminated`, and the
 * instance ran on. Now such a failure leaves the outcome unknown (refused:
 * false), names the instance, and the machine ends `leaked`; a refused
 * insert still counts as nothing made. Real client, loopback endpoint.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { GceProvider } from '../src/cloud/gce.js';
import { InstanceFleet } from '../src/cloud/instance-runtime.js';
import { CloudError, type LaunchSpec } from '../src/cloud/provider.js';
import { SessionRegistry } from '../src/cloud/sessions.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startComputeEndpoint, type ComputeEndpoint } from '../src/testing/compute-endpoint.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-gce-launch-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

const RETRY = { attempts: 3, baseDelayMs: 5, maxDelayMs: 20, timeoutMs: 5000 };
const spec = (token: string): LaunchSpec => ({ image: 'projects/debian-cloud/global/images/family/debian-12', instanceType: 'e2-small', session: 'gce-launch', owner: 'here/1', token });

async function gce(t: Test): Promise<{ endpoint: ComputeEndpoint; provider: GceProvider }> {
  // Operations take a while, so that the insert's answer is RUNNING and the provider has to wait for it.
  const endpoint = await startComputeEndpoint({ bootMs: 50, shutdownMs: 50, operationMs: 100 });
  const provider = new GceProvider({ zone: 'europe-west1-b', endpoint: endpoint.url, retry: RETRY });
  t.teardown(async () => {
    provider.close();
    await endpoint.close();
  });
  return { endpoint, provider };
}

async function launchError(provider: GceProvider, token: string): Promise<CloudError> {
  const error = await provider.launch(spec(token)).then(() => undefined, (e: unknown) => e);
  if (!(error instanceof CloudError)) throw new Error(`expected a CloudError, got ${String(error)}`);
  return error;
}

for (const action of ['zoneOperations.wait', 'instances.get']) {
  t.test(`a 403 on ${action} after the insert was accepted: outcome unknown, the instance named`, async (t) => {
    const { endpoint, provider } = await gce(t);
    endpoint.faults.refuse(1, { action });
    const error = await launchError(provider, `after-${action}`);
    t.equal(endpoint.count('instances.insert'), 1, 'the insert was accepted');
    const [made] = endpoint.instances();
    t.equal(error.refused, false, 'not a refusal: the instance may exist');
    t.match(error.message, `compute:instances.insert: instance ${made!.id} was accepted, then compute:${action} failed`);
    t.equal(endpoint.alive().length, 1, 'and it does exist');
  });
}

t.test('a refused insert still made nothing', async (t) => {
  const { endpoint, provider } = await gce(t);
  endpoint.faults.refuse(1, { action: 'instances.insert' });
  const error = await launchError(provider, 'refused');
  t.equal(error.refused, true);
  t.same(endpoint.instances(), [], 'no instance');
});

t.test('the instance machine ends leaked, not terminated, when the wait for the insert is refused', async (t) => {
  const { endpoint, provider } = await gce(t);
  endpoint.faults.refuse(1, { action: 'zoneOperations.wait' });
  const fleet = new InstanceFleet({
    provider,
    spec: { image: 'projects/debian-cloud/global/images/family/debian-12', instanceType: 'e2-small' },
    session: `gce-launch-${process.pid}`,
    sshUser: 'nobody',
    ssh: { agent: false, hostKeyPolicy: 'off' },
    timing: { bootTimeoutMs: 5000, sshTimeoutMs: 5000, drainTimeoutMs: 100, terminateAttempts: 2, terminateBackoffMs: 10, terminateMaxBackoffMs: 20 },
    registry: new SessionRegistry(join(dir, 'sessions')),
  });
  t.same(await fleet.launch(1), [], 'no host');
  const [output] = await fleet.dispose();
  const [made] = endpoint.instances();
  t.match(output, { outcome: 'leaked', reason: `the launch failed, and may have made an instance: compute:instances.insert: instance ${made!.id} was accepted` });
  t.equal(endpoint.alive().length, 1, 'the instance runs: it is the watchdog\'s (see cloud-fleet-close.test.ts)');
  for (const instance of endpoint.instances()) await provider.terminate(instance.id);
});
