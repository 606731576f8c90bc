/**
 * The `aws` and `gce` providers, each with the real SDK client against its
 * loopback endpoint (drover/testing), with throw-away credentials from the
 * environment: launch with drover's tags, wait until running, list by
 * session, terminate; throttling and failing terminates are retried, other
 * errors are not; slow answers time out; launches are idempotent; nothing
 * secret reaches the log.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { AwsProvider } from '../src/cloud/aws.js';
import { GceProvider } from '../src/cloud/gce.js';
import { CloudError, OWNER_TAG, SESSION_TAG, labelValue, sameTagValue, type LaunchSpec, type Provider } from '../src/cloud/provider.js';
import type { RetryPolicy } from '../src/cloud/retry.js';
import { createLogger } from '../src/runtime/logger.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startComputeEndpoint } from '../src/testing/compute-endpoint.js';
import { startEc2Endpoint } from '../src/testing/ec2-endpoint.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-cloud-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const credentials = dummyCloudCredentials(dir);
Object.assign(process.env, credentials);

const FAST: RetryPolicy = { attempts: 5, baseDelayMs: 5, maxDelayMs: 20, timeoutMs: 5000 };

interface Fixture {
  readonly provider: Provider;
  readonly endpoint: Awaited<ReturnType<typeof startEc2Endpoint>> | Awaited<ReturnType<typeof startComputeEndpoint>>;
  readonly calls: { insert: string; terminate: string; throttled: string };
  readonly log: string[];
}

const PROVIDERS: Record<string, (t: Test, options: { sshPorts?: number[]; retry?: RetryPolicy }) => Promise<Fixture>> = {
  async aws(t, options) {
    const endpoint = await startEc2Endpoint({ accessKeyId: credentials['AWS_ACCESS_KEY_ID']!, bootMs: 30, shutdownMs: 30, ...(options.sshPorts ? { sshPorts: options.sshPorts } : {}) });
    const log: string[] = [];
    const provider = new AwsProvider({ endpoint: endpoint.url, retry: options.retry ?? FAST, logger: createLogger({ level: 'debug', write: (line) => log.push(line) }) });
    t.teardown(async () => {
      provider.close();
      await endpoint.close();
    });
    return { provider, endpoint, log, calls: { insert: 'RunInstances', terminate: 'TerminateInstances', throttled: 'RequestLimitExceeded' } };
  },
  async gce(t, options) {
    const endpoint = await startComputeEndpoint({ bootMs: 30, shutdownMs: 30, operationMs: 10, ...(options.sshPorts ? { sshPorts: options.sshPorts } : {}) });
    const log: string[] = [];
    const provider = new GceProvider({ zone: 'europe-west1-b', endpoint: endpoint.url, retry: options.retry ?? FAST, logger: createLogger({ level: 'debug', write: (line) => log.push(line) }) });
    t.teardown(async () => {
      provider.close();
      await endpoint.close();
    });
    return { provider, endpoint, log, calls: { insert: 'instances.insert', terminate: 'instances.delete', throttled: 'rateLimitExceeded' } };
  },
};

const spec = (n: number, extra: Partial<LaunchSpec> = {}): LaunchSpec => ({
  image: 'ami-0123456789abcdef0',
  instanceType: 't3.micro',
  network: 'subnet-1',
  key: 'drover-key',
  userData: '#cloud-config\npassword: hunter2-user-data-secret\n',
  session: 'Session-42',
  owner: 'laptop.local/1234',
  token: `Session-42/${n}`,
  tags: { team: 'infra' },
  ...extra,
});

async function until<T>(what: string, check: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

for (const [name, make] of Object.entries(PROVIDERS)) {
  t.test(`${name}: launch three, wait until running, list by session, terminate`, async (t) => {
    const { provider, endpoint } = await make(t, { sshPorts: [2201, 2202, 2203] });
    const launched = await Promise.all([0, 1, 2].map((n) => provider.launch(spec(n))));
    t.equal(new Set(launched.map((i) => i.id)).size, 3, 'three instances');
    for (const instance of launched) {
      t.ok(sameTagValue(instance.session, 'Session-42'), `${instance.id} carries ${SESSION_TAG}`);
      t.ok(sameTagValue(instance.owner, 'laptop.local/1234'), `${instance.id} carries ${OWNER_TAG}`);
    }
    const running = await Promise.all(launched.map((i) => provider.waitUntilRunning(i.id, { pollMs: 10, signal: AbortSignal.timeout(10_000) })));
    t.same(running.map((i) => [i.state, i.publicIp]), [['running', '127.0.0.1'], ['running', '127.0.0.1'], ['running', '127.0.0.1']]);
    t.same(running.map((i) => i.sshPort).sort(), [2201, 2202, 2203], 'each with the ssh port its tag names');
    const fakes = endpoint.instances();
    t.same(fakes.map((i) => i.userData), [spec(0).userData, spec(0).userData, spec(0).userData], 'user-data reached the instance as it was');
    t.ok(fakes.every((i) => i.tags.get(name === 'aws' ? 'team' : 'team') === 'infra'), 'the spec\'s own tags too');

    await provider.launch(spec(9, { session: 'other' }));
    t.equal((await provider.list({ session: 'Session-42' })).length, 3, 'list by session');
    t.equal((await provider.list()).length, 4, 'list all drover instances');

    await Promise.all(launched.map((i) => provider.terminate(i.id)));
    await until('the three to be terminated', () => endpoint.alive().length === 1);
    t.same((await provider.list({ session: 'Session-42' })).map((i) => i.id), [], 'none left in the session');
    await provider.terminate(launched[0]!.id);
    t.pass('terminating a terminated instance succeeds');
    t.equal(await provider.describe(name === 'aws' ? 'i-00000000000000000' : 'drover-nosuchinstance'), undefined, 'an unknown instance is undefined');
    await provider.terminate(name === 'aws' ? 'i-00000000000000000' : 'drover-nosuchinstance');
    t.pass('terminating an unknown instance succeeds');
  });

  t.test(`${name}: a launch retried with the same token makes no second instance`, async (t) => {
    const { provider, endpoint } = await make(t, {});
    const first = await provider.launch(spec(1));
    const again = await provider.launch(spec(1));
    t.equal(again.id, first.id);
    t.equal(endpoint.instances().length, 1);
  });

  t.test(`${name}: throttling is retried with backoff; the log says so without secrets`, async (t) => {
    const { provider, endpoint, calls, log } = await make(t, {});
    endpoint.faults.throttle(3);
    const instance = await provider.launch(spec(1));
    t.ok(instance.id, 'launched after three throttled calls');
    t.equal(endpoint.calls.filter((c) => c.error === calls.throttled).length, 3, 'three throttled answers');
    t.equal(log.filter((line) => line.includes('cloud call failed; retrying')).length, 3, 'each retry logged');
    const all = log.join('\n');
    for (const secret of [credentials['AWS_SECRET_ACCESS_KEY']!, 'hunter2-user-data-secret', JSON.parse(readFileSync(credentials['GOOGLE_APPLICATION_CREDENTIALS']!, 'utf8')).private_key.split('\n')[1]]) {
      t.notOk(all.includes(secret), 'no secret in the log');
    }
    endpoint.faults.throttle(10);
    await t.rejects(provider.list(), CloudError, 'throttled beyond the attempts: a CloudError');
    endpoint.faults.clear();
  });

  t.test(`${name}: a terminate that fails twice with a server error succeeds on the third attempt`, async (t) => {
    const { provider, endpoint, calls } = await make(t, {});
    const instance = await provider.launch(spec(1));
    endpoint.faults.failTerminate(2);
    await provider.terminate(instance.id);
    t.equal(endpoint.count(calls.terminate), 3, 'three terminate calls');
    await until('the instance to be terminated', () => endpoint.alive().length === 0);
  });

  t.test(`${name}: a terminate refused for good is not retried`, async (t) => {
    const { provider, endpoint, calls } = await make(t, {});
    const instance = await provider.launch(spec(1));
    endpoint.faults.failTerminate(1, { code: name === 'aws' ? 'UnauthorizedOperation' : '403' });
    await t.rejects(provider.terminate(instance.id), CloudError);
    t.equal(endpoint.count(calls.terminate), 1, 'one call');
    t.equal(endpoint.alive().length, 1, 'the instance still runs');
  });

  t.test(`${name}: every call has a timeout`, async (t) => {
    const { provider, endpoint } = await make(t, { retry: { attempts: 2, baseDelayMs: 1, maxDelayMs: 1, timeoutMs: 150 } });
    endpoint.faults.slow(1000, { count: 2 });
    await t.rejects(provider.list(), { name: 'CloudError', message: /no answer within 150 ms/ });
  });

  t.test(`${name}: an instance that never starts is never reported running`, async (t) => {
    const { provider, endpoint } = await make(t, {});
    endpoint.faults.neverStart();
    const instance = await provider.launch(spec(1));
    await t.rejects(provider.waitUntilRunning(instance.id, { pollMs: 10, signal: AbortSignal.timeout(300) }), { name: 'TimeoutError' });
    t.equal((await provider.describe(instance.id))?.state, 'pending');
  });
}

t.test('gce: labels are what GCE allows', async (t) => {
  t.equal(labelValue('drover:session'), 'drover-session');
  t.equal(labelValue('Laptop.Local/1234'), 'laptop-local-1234');
  t.ok(sameTagValue('laptop-local-1234', 'Laptop.Local/1234'));
  t.notOk(sameTagValue(undefined, 'x'));
});
