/**
 * `drover instances [--cleanup]`, the built CLI against each loopback
 * endpoint, with throw-away credentials in its environment: it lists every
 * drover instance with its verdict (owner gone, session over, live,
 * foreign), terminates exactly the leftovers, exits 1 when one cannot be
 * terminated, and 2 on bad usage.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { AwsProvider } from '../src/cloud/aws.js';
import { GceProvider } from '../src/cloud/gce.js';
import type { Provider } from '../src/cloud/provider.js';
import { ownerId, SessionRegistry } from '../src/cloud/sessions.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startComputeEndpoint } from '../src/testing/compute-endpoint.js';
import { startEc2Endpoint } from '../src/testing/ec2-endpoint.js';
import { drover } from './helpers/drover.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-instances-cli-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const credentials = dummyCloudCredentials(dir);
Object.assign(process.env, credentials);

/** A pid no process has any more (its process ran and was reaped). */
async function deadPid(): Promise<number> {
  const child = spawn('true');
  await new Promise((resolve) => child.once('exit', resolve));
  return child.pid!;
}

const RETRY = { attempts: 3, baseDelayMs: 5, maxDelayMs: 20, timeoutMs: 5000 };

const CLOUDS = {
  async aws() {
    const endpoint = await startEc2Endpoint({ bootMs: 10, shutdownMs: 10 });
    return { endpoint, provider: new AwsProvider({ endpoint: endpoint.url, retry: RETRY }) as Provider, env: { DROVER_AWS_ENDPOINT: endpoint.url }, refusal: 'UnauthorizedOperation' };
  },
  async gce() {
    const endpoint = await startComputeEndpoint({ bootMs: 10, shutdownMs: 10, operationMs: 5 });
    return { endpoint, provider: new GceProvider({ zone: 'europe-west1-b', endpoint: endpoint.url, retry: RETRY }) as Provider, env: { DROVER_GCE_ENDPOINT: endpoint.url, DROVER_GCE_ZONE: 'europe-west1-b' }, refusal: '403' };
  },
};

t.test('bad usage exits 2 and says what is wrong', async (t) => {
  const cwd = mkdtempSync(join(dir, 'usage-'));
  const none = await drover(['instances'], { cwd, env: credentials });
  t.equal(none.code, 2);
  t.match(none.stderr, /which cloud\? give --provider aws\|gce/);
  const bad = await drover(['instances', '--provider', 'azure'], { cwd, env: credentials });
  t.equal(bad.code, 2);
  t.match(bad.stderr, /option --provider: must be aws or gce, not "azure"/);
  const zoneless = await drover(['instances', '--provider', 'gce'], { cwd, env: credentials });
  t.equal(zoneless.code, 2);
  t.match(zoneless.stderr, /gce: no zone is set/);
  const endpoint = await drover(['instances', '--provider', 'aws', '--aws-endpoint', 'nowhere'], { cwd, env: credentials });
  t.equal(endpoint.code, 2);
  t.match(endpoint.stderr, /option --aws-endpoint: must be an http:\/\/ or https:\/\/ URL/);
  const help = await drover(['instances', '--help'], { cwd, env: credentials });
  t.equal(help.code, 0);
  t.match(help.stdout, /Usage: drover instances \[--provider aws\|gce\] \[--cleanup\]/);
});

for (const [name, make] of Object.entries(CLOUDS)) {
  t.test(`${name}: lists drover's instances with verdicts, and --cleanup terminates exactly the leftovers`, async (t) => {
    const { endpoint, provider, env: endpointEnv, refusal } = await make();
    t.teardown(async () => {
      provider.close();
      await endpoint.close();
    });
    const cwd = mkdtempSync(join(dir, `${name}-`));
    const registry = new SessionRegistry(join(cwd, 'cloud-sessions'));
    const env = { ...endpointEnv, DROVER_CLOUD_SESSIONS: registry.dir };
    registry.open({ session: 'open-session', owner: ownerId(), provider: provider.name });
    const spec = { image: 'ami-1', instanceType: 't3.micro' };
    const dead = ownerId(await deadPid());
    const launch = (session: string, owner: string, n: number) => provider.launch({ ...spec, session, owner, token: `${session}/${n}` });
    const gone = await launch('crashed-session', dead, 1);
    const over = await launch('finished-session', ownerId(), 2);
    const live = await launch('open-session', ownerId(), 3);
    const foreign = await launch('their-session', 'another-machine/4242', 4);
    const args = ['instances', '--provider', name];

    const listed = await drover(args, { cwd, env: { ...credentials, ...env } });
    t.equal(listed.code, 0, listed.stderr);
    const line = (id: string) => listed.stdout.split('\n').find((l) => l.startsWith(id)) ?? '';
    t.match(line(gone.id), /leftover: its owner \S+ is gone/);
    t.match(line(over.id), /leftover: its session finished-session is over/);
    t.match(line(live.id), /live: session open-session of \S+ is open/);
    t.match(line(foreign.id), /foreign: launched from another machine \(another-machine.4242\)/);
    t.match(listed.stdout, /^INSTANCE\s+STATE\s+SESSION\s+OWNER\s+ADDRESS\s+LAUNCHED\s+VERDICT/);

    endpoint.faults.failTerminate(1, { code: refusal });
    const failing = await drover([...args, '--cleanup'], { cwd, env: { ...credentials, ...env } });
    t.equal(failing.code, 1, 'exit 1: one leftover could not be terminated');
    t.match(failing.stderr, /could not terminate/);
    t.match(failing.stdout, /1 terminated, 1 failed, 2 left alone/);

    const cleaned = await drover([...args, '--cleanup'], { cwd, env: { ...credentials, ...env } });
    t.equal(cleaned.code, 0, cleaned.stderr);
    t.match(cleaned.stdout, /1 terminated, 0 failed, 2 left alone/);
    const alive = () => endpoint.alive().map((i) => i.id).sort();
    for (let i = 0; i < 100 && alive().length > 2; i++) await new Promise((resolve) => setTimeout(resolve, 20));
    t.same(alive(), [live.id, foreign.id].sort(), 'the live and the foreign instance are left alone');

    registry.close('open-session');
    const after = await drover([...args, '--cleanup'], { cwd, env: { ...credentials, ...env } });
    t.match(after.stdout, new RegExp(`terminated ${live.id} \\(its session open-session is over\\)`), 'once its session closes, it is a leftover too');
  });
}

t.test('with no instances it says so', async (t) => {
  const { endpoint, provider, env } = await CLOUDS.aws();
  t.teardown(async () => {
    provider.close();
    await endpoint.close();
  });
  const result = await drover(['instances', '--provider', 'aws'], { cwd: mkdtempSync(join(dir, 'empty-')), env: { ...credentials, ...env } });
  t.equal(result.code, 0);
  t.match(result.stdout, /^no drover instances on aws \(us-east-1\)/);
});
