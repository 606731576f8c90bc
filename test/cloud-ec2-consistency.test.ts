/**
 * Regression: EC2 is eventually consistent. Right after RunInstances, the
 * calls naming the new id may answer InvalidInstanceID.NotFound while the
 * instance starts and runs. drover took that as "gone": the instance
 * machine went to terminating, the terminate's NotFound counted as done,
 * and the instance ran on with nobody to terminate it. Against the loopback
 * EC2 endpoint playing that delay (notFoundCalls): the new instance is
 * waited for and becomes an SSH host, and one terminated at once is really
 * terminated; only after the visibility grace does NotFound mean gone.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { AwsProvider } from '../src/cloud/aws.js';
import { InstanceFleet, type FleetOptions } from '../src/cloud/instance-runtime.js';
import { CloudError } from '../src/cloud/provider.js';
import { SessionRegistry } from '../src/cloud/sessions.js';
import { createLogger } from '../src/runtime/logger.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startEc2Endpoint, type Ec2Endpoint } from '../src/testing/ec2-endpoint.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { requireSshd, sshd, until } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const dir = mkdtempSync(join(tmpdir(), 'drover-ec2-consistency-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

const TIMING = { bootTimeoutMs: 10_000, sshTimeoutMs: 15_000, drainTimeoutMs: 1000, terminateAttempts: 10, terminateBackoffMs: 20, terminateMaxBackoffMs: 100 };
/** Two attempts per call: the provider alone cannot outwait four NotFound answers; the instance machine's retry has to. */
const RETRY = { attempts: 2, baseDelayMs: 5, maxDelayMs: 20, timeoutMs: 5000 };

async function ec2(t: Test, options: { sshPorts?: number[]; notFoundCalls: number; visibilityGraceMs?: number }): Promise<{ endpoint: Ec2Endpoint; provider: AwsProvider }> {
  const endpoint = await startEc2Endpoint({ bootMs: 50, shutdownMs: 50, notFoundCalls: options.notFoundCalls, ...(options.sshPorts ? { sshPorts: options.sshPorts } : {}) });
  const provider = new AwsProvider({ endpoint: endpoint.url, retry: RETRY, ...(options.visibilityGraceMs === undefined ? {} : { visibilityGraceMs: options.visibilityGraceMs }) });
  t.teardown(async () => {
    provider.close();
    await endpoint.close();
  });
  return { endpoint, provider };
}

let sessions = 0;
function fleetOptions(t: Test, provider: AwsProvider, server: TestSshd, extra: Partial<FleetOptions> = {}): FleetOptions {
  const lines: string[] = [];
  t.teardown(() => t.comment(lines.filter((line) => line.includes('instance')).join('\n')));
  return {
    provider,
    spec: { image: 'ami-0123456789abcdef0', instanceType: 't3.micro' },
    session: `ec2-consistency-${process.pid}-${++sessions}`,
    sshUser: server.user,
    ssh: { identityFiles: [server.identityFile], knownHostsFile: join(dir, `known_hosts-${sessions}`), hostKeyPolicy: 'accept-new', agent: false },
    timing: TIMING,
    pollMs: 20,
    probeIntervalMs: 50,
    registry: new SessionRegistry(join(dir, 'sessions')),
    logger: createLogger({ level: 'debug', write: (line) => lines.push(line) }),
    ...extra,
  };
}

t.test('a new instance that EC2 does not show yet is waited for, becomes an SSH host, and is terminated at the end', async (t) => {
  const server = await sshd(t);
  const { endpoint, provider } = await ec2(t, { sshPorts: [server.port], notFoundCalls: 3 });
  const fleet = new InstanceFleet(fleetOptions(t, provider, server));
  t.teardown(() => fleet.dispose());
  const hosts = await fleet.launch(1);
  t.same(hosts.map((h) => h.address), [server.address], 'the instance became an SSH host');
  t.equal(endpoint.calls.filter((c) => c.action === 'DescribeInstances' && c.error === 'InvalidInstanceID.NotFound').length, 3, 'after three NotFound answers');
  const [output] = await fleet.dispose();
  t.match(output, { outcome: 'terminated', reason: 'the session is over' });
  await until('the instance to be gone', () => endpoint.alive().length === 0);
});

t.test('an instance terminated right after its launch, while EC2 does not show it yet, is really terminated', async (t) => {
  const server = await sshd(t);
  const { endpoint, provider } = await ec2(t, { notFoundCalls: 4 });
  endpoint.faults.slow(300, { action: 'RunInstances', count: 1 });
  const fleet = new InstanceFleet(fleetOptions(t, provider, server));
  const launching = fleet.launch(1);
  await until('the launch call to be under way', () => fleet.states()[0]?.state === 'requested');
  const [output] = await fleet.dispose();
  t.same(await launching, []);
  t.match(output, { outcome: 'terminated', reason: 'disposed while launching' });
  const terminates = endpoint.calls.filter((c) => c.action === 'TerminateInstances');
  t.same(terminates.map((c) => c.error ?? 'accepted'), ['InvalidInstanceID.NotFound', 'InvalidInstanceID.NotFound', 'InvalidInstanceID.NotFound', 'InvalidInstanceID.NotFound', 'accepted'], 'retried until EC2 accepted it');
  t.equal(endpoint.instances()[0]?.terminatedAt !== undefined, true, 'the instance is shutting down');
  await until('the instance to be gone', () => endpoint.alive().length === 0);
});

t.test('the provider: not visible yet within the grace, gone after it', async (t) => {
  const { endpoint, provider } = await ec2(t, { notFoundCalls: 100 });
  const spec = { image: 'ami-1', instanceType: 't3.micro', session: 's', owner: 'here/1', token: 'one' };
  const launched = await provider.launch(spec);
  t.equal((await provider.describe(launched.id))?.state, 'pending', 'describe: pending, as the launch said');
  const error = await provider.terminate(launched.id).then(() => undefined, (e: unknown) => e);
  t.type(error, CloudError);
  t.equal((error as CloudError).refused, false, 'not a refusal: it may be running');
  t.match((error as Error).message, `ec2:TerminateInstances: instance ${launched.id}, launched`);
  t.match((error as Error).message, 'is not visible yet (InvalidInstanceID.NotFound');

  t.equal(endpoint.alive().length, 1);

  // The grace bounds the wait: past it, NotFound means gone again.
  const { endpoint: late, provider: forgetful } = await ec2(t, { notFoundCalls: 100, visibilityGraceMs: 0 });
  const other = await forgetful.launch({ ...spec, token: 'two' });
  t.equal(await forgetful.describe(other.id), undefined, 'past the grace, NotFound is gone');
  await forgetful.terminate(other.id);
  t.pass('and terminating it succeeds');
  t.equal(late.count('TerminateInstances'), 1, 'after one call');
});
