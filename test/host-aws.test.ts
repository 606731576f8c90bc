/**
 * The `aws` host: drover on an EC2 instance, against the IMDSv2 endpoint of
 * drover/testing on loopback. The endpoint speaks EC2's protocol; the host
 * reads identity and user-data through it with a session token, and turns a
 * spot interruption notice into a shutdown that ends before the instance goes.
 */
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import t from 'tap';
import { AwsHost, Ec2Metadata } from '../src/hosts/aws.js';
import { MetadataTimeoutError } from '../src/hosts/metadata.js';
import { loadConfig } from '../src/runtime/config.js';
import { createLogger } from '../src/runtime/logger.js';
import { startImds } from '../src/testing/imds.js';
import { drover, eventually, readTask, runOutcomes, startWorker, submit } from './helpers/drover.js';
import { join } from 'node:path';

const lines: string[] = [];
const logger = createLogger({ level: 'debug', write: (line) => lines.push(line) });
const FAST_RETRY = { attempts: 3, baseDelayMs: 10, maxDelayMs: 20 };
const signal = new AbortController().signal;

t.test('the IMDSv2 endpoint speaks EC2\'s protocol: token first, 401 without it', async (t) => {
  const imds = await startImds({ instanceId: 'i-0abc', userData: 'capacity: 2\n' });
  t.teardown(() => imds.close());
  const get = (path: string, headers: Record<string, string> = {}) => fetch(imds.url + path, { headers });

  t.equal((await get('/latest/meta-data/instance-id')).status, 401, 'no token: 401');
  t.equal((await get('/latest/meta-data/instance-id', { 'X-aws-ec2-metadata-token': 'forged' })).status, 401, 'an unknown token: 401');
  t.equal((await fetch(`${imds.url}/latest/api/token`, { method: 'PUT' })).status, 400, 'a token request without a TTL: 400');
  t.equal((await fetch(`${imds.url}/latest/api/token`, { method: 'PUT', headers: { 'X-aws-ec2-metadata-token-ttl-seconds': '21601' } })).status, 400, 'a TTL above 6 h: 400');
  t.equal(
    (await fetch(`${imds.url}/latest/api/token`, { method: 'PUT', headers: { 'X-aws-ec2-metadata-token-ttl-seconds': '60', 'X-Forwarded-For': '10.0.0.1' } })).status,
    403,
    'a forwarded token request: 403',
  );
  const tokenResponse = await fetch(`${imds.url}/latest/api/token`, { method: 'PUT', headers: { 'X-aws-ec2-metadata-token-ttl-seconds': '60' } });
  t.equal(tokenResponse.status, 200);
  t.equal(tokenResponse.headers.get('x-aws-ec2-metadata-token-ttl-seconds'), '60');
  const token = { 'X-aws-ec2-metadata-token': await tokenResponse.text() };

  t.equal(await (await get('/latest/meta-data/instance-id', token)).text(), 'i-0abc');
  t.equal(await (await get('/latest/meta-data/placement/region', token)).text(), 'us-east-1');
  t.equal(await (await get('/latest/user-data', token)).text(), 'capacity: 2\n');
  t.same((await (await get('/latest/meta-data/', token)).text()).split('\n').sort(), ['instance-id', 'instance-type', 'local-hostname', 'placement/'], 'the directory lists its entries; spot/ only once there is a notice');
  t.equal((await get('/latest/meta-data/spot/instance-action', token)).status, 404, 'no spot notice: 404');
  imds.injectSpotNotice({ action: 'stop', time: new Date('2026-03-01T12:00:00.250Z') });
  t.same(await (await get('/latest/meta-data/spot/instance-action', token)).json(), { action: 'stop', time: '2026-03-01T12:00:00Z' }, 'the notice, with EC2\'s time format');
  imds.expireTokens();
  t.equal((await get('/latest/meta-data/instance-id', token)).status, 401, 'an expired token: 401');
});

t.test('Ec2Metadata reads identity with one session token, and gets a new one when it expired', async (t) => {
  const imds = await startImds({ instanceId: 'i-0def', instanceType: 'c7g.xlarge', availabilityZone: 'eu-west-1b', localHostname: 'ip-10-1-2-3.eu-west-1.compute.internal' });
  t.teardown(() => imds.close());
  const metadata = new Ec2Metadata({ url: imds.url, retry: FAST_RETRY });
  t.same(await metadata.identity({ signal }), {
    hostname: 'ip-10-1-2-3.eu-west-1.compute.internal',
    facts: { cloud: 'aws', instanceId: 'i-0def', instanceType: 'c7g.xlarge', zone: 'eu-west-1b', region: 'eu-west-1' },
  });
  t.equal(imds.requests.filter((r) => r.method === 'PUT').length, 1, 'five reads, one token');
  t.notOk(imds.requests.some((r) => r.status === 401), 'every read carried the token');

  imds.expireTokens();
  t.equal(await metadata.get('/latest/meta-data/instance-id', signal), 'i-0def', 'a 401 gets a new token and one more try');
  t.same(imds.requests.slice(-3).map((r) => `${r.method} ${r.status}`), ['GET 401', 'PUT 200', 'GET 200']);
  t.equal(await metadata.userConfig(signal), undefined, 'no user-data: no settings');
  for (const cloudInitOnly of ['#!/bin/sh\necho hi\n', 'Content-Type: multipart/mixed; boundary="b"\nMIME-Version: 1.0\n', '#include\nhttps://example.invalid/x\n', '\u001f\u008b\u0008compressed']) {
    imds.setUserData(cloudInitOnly);
    t.equal(await metadata.userConfig(signal), undefined, `user-data for cloud-init alone (${JSON.stringify(cloudInitOnly.slice(0, 12))}...) holds no settings`);
  }
  imds.setUserData('{"capacity": 2}');
  t.same(await metadata.userConfig(signal), { source: 'the instance\'s user-data', text: '{"capacity": 2}' });
});

t.test('Ec2Metadata renews its token before the TTL runs out', async (t) => {
  const imds = await startImds();
  t.teardown(() => imds.close());
  // A 2 s token is renewed half a second before it ends.
  const metadata = new Ec2Metadata({ url: imds.url, tokenTtlS: 2, retry: FAST_RETRY });
  await metadata.get('/latest/meta-data/instance-id', signal);
  await metadata.get('/latest/meta-data/instance-id', signal);
  t.equal(imds.requests.filter((r) => r.method === 'PUT').length, 1, 'the token is reused while fresh');
  await new Promise((resolve) => setTimeout(resolve, 1600));
  await metadata.get('/latest/meta-data/instance-id', signal);
  t.same(imds.requests.map((r) => `${r.method} ${r.status}`), ['PUT 200', 'GET 200', 'GET 200', 'PUT 200', 'GET 200'], 'a new token before the old one expired, and no 401');
});

t.test('metadata calls retry transient failures, time out, and say what failed', async (t) => {
  const imds = await startImds();
  t.teardown(() => imds.close());
  const metadata = new Ec2Metadata({ url: imds.url, timeoutMs: 200, retry: FAST_RETRY });

  imds.failTokenRequests(2, 503);
  t.equal(await metadata.get('/latest/meta-data/instance-type', signal), 'm5.large', 'two failed token requests, then success');
  t.same(imds.requests.map((r) => r.status), [503, 503, 200, 200]);

  const fresh = new Ec2Metadata({ url: imds.url, timeoutMs: 200, retry: FAST_RETRY });
  imds.failTokenRequests(Infinity, 500);
  await t.rejects(fresh.get('/latest/meta-data/instance-id', signal), { message: `PUT ${imds.url}/latest/api/token: HTTP 500` }, 'every try failed: the last error');
  imds.failTokenRequests(0);

  imds.setDelay(1000);
  await t.rejects(fresh.get('/latest/meta-data/instance-id', signal), MetadataTimeoutError, 'a slow service: each call times out');
  imds.setDelay(0);
  t.equal(await fresh.get('/latest/meta-data/instance-id', signal), 'i-0123456789abcdef0', 'and works again once it answers');

  const port = await freePort();
  const nobody = new Ec2Metadata({ url: `http://127.0.0.1:${port}`, timeoutMs: 200, retry: FAST_RETRY });
  await t.rejects(nobody.get('/latest/user-data', signal), { message: new RegExp(`PUT http://127.0.0.1:${port}/latest/api/token: .*ECONNREFUSED`) }, 'nobody listening: the address and the cause');
});

t.test('AwsHost: identity at boot, a spot notice aborts `shutdown` with the instance\'s end as deadline, dispose stops polling', async (t) => {
  const imds = await startImds({ instanceId: 'i-0spot' });
  t.teardown(() => imds.close());
  const host = new AwsHost({ url: imds.url, spotPollMs: 20, retry: FAST_RETRY, workDir: t.testdir({}) });
  const identity = await host.boot({ logger, signal });
  t.equal(identity.facts['instanceId'], 'i-0spot');
  t.ok(identity.facts['platform'], 'the machine\'s own facts are there too');
  t.equal(host.transport().capabilities.exec, true, 'tasks run on this machine');
  await eventually('a few polls', () => imds.requests.filter((r) => r.path.endsWith('/spot/instance-action')).length >= 3);
  t.notOk(host.shutdown.aborted);
  t.equal(host.shutdownDeadline, undefined);

  const goneAt = new Date(Math.floor(Date.now() / 1000) * 1000 + 120_000);
  imds.injectSpotNotice(goneAt);
  await eventually('the shutdown signal', () => host.shutdown.aborted);
  t.equal(host.shutdownDeadline, goneAt.getTime(), 'the deadline is the notice\'s time');
  t.match(String(host.shutdown.reason), `spot interruption: the instance will terminate at ${goneAt.toISOString()}`);

  await host.dispose();
  // A request in flight at dispose may still land; a running watch would poll five times in 100 ms.
  await new Promise((resolve) => setTimeout(resolve, 50));
  const after = imds.requests.length;
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.equal(imds.requests.length, after, 'no request after dispose');
  await host.dispose();
  t.pass('dispose is idempotent');
});

t.test('AwsHost: the spot watch outlives a metadata service that does not answer for a while', async (t) => {
  const imds = await startImds();
  t.teardown(() => imds.close());
  const host = new AwsHost({ url: imds.url, spotPollMs: 20, timeoutMs: 200, retry: FAST_RETRY, workDir: t.testdir({}) });
  t.teardown(() => host.dispose());
  await host.boot({ logger, signal });
  imds.setDelay(400);
  await eventually('the failures to be logged', () => lines.some((line) => line.includes('cannot read the spot interruption notice; still trying')));
  imds.setDelay(0);
  await eventually('the watch to recover', () => lines.some((line) => line.includes('the spot interruption notice can be read again')));
  t.notOk(host.shutdown.aborted, 'a slow metadata service is no interruption');
  imds.injectSpotNotice(new Date(Date.now() + 120_000));
  await eventually('the notice to be seen', () => host.shutdown.aborted);
  t.pass('and a notice after it is still seen');
});

t.test('user-data settings come under the local ones, YAML or JSON, and are checked like any', async (t) => {
  const instance = (text: string) => ({ source: 'the instance\'s user-data', text });
  const yaml = loadConfig({ env: {}, instance: instance('capacity: 3\nqueue:\n  claimTimeout: 12\ntaskEnv:\n  FROM: user-data\n') });
  t.equal(yaml.capacity, 3);
  t.equal(yaml.queue.claimTimeout, 12);
  t.same(yaml.taskEnv, { FROM: 'user-data' });
  t.ok(yaml.given.includes('capacity'), 'instance settings count as given');

  const json = loadConfig({ env: {}, instance: instance('{"capacity": 4, "idleTimeout": 60}') });
  t.equal(json.capacity, 4);
  t.equal(json.idleTimeout, 60);

  const cloudInit = loadConfig({ env: {}, instance: instance('#cloud-config\npackages: [git]\ndrover:\n  capacity: 5\n') });
  t.equal(cloudInit.capacity, 5, 'a `drover` section beside cloud-init\'s keys');
  t.same(loadConfig({ env: {}, instance: instance('#cloud-config\npackages: [git]\n') }).instance?.settings, [], 'cloud-init\'s settings alone are not drover\'s');

  const cwd = t.testdir({ 'local.yaml': 'idleTimeout: 7\n' });
  const local = loadConfig({
    env: { DROVER_CAPACITY: '9' },
    file: join(cwd, 'local.yaml'),
    flags: { 'queue.claimTimeout': '20' },
    instance: instance('capacity: 3\nidleTimeout: 60\nqueue:\n  claimTimeout: 12\npollWait: 4\n'),
  });
  t.same([local.capacity, local.idleTimeout, local.queue.claimTimeout, local.pollWait], [9, 7, 20, 4], 'environment, file and flags win; the rest comes from the instance');
  t.same(local.instance, { source: 'the instance\'s user-data', settings: ['pollWait'] }, 'the config says which settings the instance gave');

  t.throws(() => loadConfig({ env: {}, instance: instance('capacity: none\nhost:\n  type: hardware\ncolour: red\n') }), {
    message: [
      'the instance\'s user-data: capacity: must be a whole number, not "none"',
      'the instance\'s user-data: host.type: cannot be set by the instance; set it on the command line, in the environment or the config file',
      'the instance\'s user-data: colour: is not a known setting',
    ].join('\n'),
  });
  t.throws(() => loadConfig({ env: {}, instance: instance('queue: [secret-value\n') }), { message: /^the instance's user-data: not valid YAML or JSON: / });
  try {
    loadConfig({ env: {}, instance: instance('queue: [secret-value\n') });
  } catch (error) {
    t.notMatch((error as Error).message, 'secret-value', 'a broken document is not quoted');
  }
  t.throws(() => loadConfig({ env: {}, flags: { 'host.type': 'aws', 'ssh.hosts': 'me@box' } }), { message: /host.type is aws, which runs tasks on this instance, but SSH hosts are set/ });
});

t.test('drover worker --host aws: a spot notice mid-task aborts it before the instance goes, with its log kept', async (t) => {
  const cwd = t.testdir({});
  const imds = await startImds({ instanceId: 'i-0worker', userData: 'taskEnv:\n  GREETING: hello-from-user-data\nsecretTaskEnv:\n  TOKEN: s3cr3t-user-data\n' });
  t.teardown(() => imds.close());
  const id = await submit(['--', 'echo "$GREETING"; echo started > started; sleep 600'], { cwd });
  // The grace period alone would let the task run for 10 minutes: only the notice's deadline stops it in time.
  const worker = startWorker(['--host', 'aws', '--metadata-url', imds.url, '--spot-poll-interval', '0.1', '--shutdown-grace', '600', '--notice-margin', '10'], { cwd });
  await eventually('the task to start', async () => (await readTask(join(cwd, '.drover'), id)).state === 'running' && (await drover(['logs', id], { cwd })).stdout.includes('hello-from-user-data'));
  t.match(worker.log(), /worker booted .*instanceId=i-0worker/, 'the instance\'s identity is in the log');
  t.match(worker.log(), /settings from the instance source="the instance's user-data" settings="taskEnv,secretTaskEnv"/, 'the names of the settings the user-data gave');

  const goneAt = Date.now() + 13_000;
  imds.injectSpotNotice(new Date(goneAt));
  const code = await worker.exited;
  t.ok(Date.now() < goneAt, 'the worker stopped before the instance went');
  t.equal(code, 5, 'exit code 5: the host asked it to stop', { log: worker.log() });
  t.match(worker.log(), /the instance is being taken away; shutting down/);
  t.match(worker.log(), /the shutdown deadline is here: aborting the tasks still running/);
  t.notMatch(worker.log(), 's3cr3t-user-data', 'the user-data\'s secrets are not in the worker\'s log');

  const task = await readTask(join(cwd, '.drover'), id);
  t.same(runOutcomes(task).slice(0, 1), ['exception/worker-shutdown'], 'the run resolved worker-shutdown');
  t.equal(task.runs[1]?.state, 'pending', 'and the task is queued again for another worker');
  const log = await drover(['logs', id, '--run', '0'], { cwd });
  t.match(log.stdout, 'hello-from-user-data', 'run 0\'s live log was uploaded');
});

t.test('drover worker --host aws without a metadata service says so and exits 1', async (t) => {
  const cwd = t.testdir({});
  const port = await freePort();
  const result = await drover(['worker', '--host', 'aws', '--metadata-url', `http://127.0.0.1:${port}`], { cwd });
  t.equal(result.code, 1, result.stderr);
  t.match(result.stderr, `host.type is aws, but its settings could not be read from the metadata server at http://127.0.0.1:${port}`);
  const bad = await drover(['worker', '--host', 'ec2'], { cwd });
  t.equal(bad.code, 2);
  t.match(bad.stderr, 'option --host: must be hardware, aws or gce, not "ec2"');
});

/** A loopback port nobody listens on (it was free a moment ago). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}
