/**
 * The loopback endpoints of drover/testing speak their wire protocols as
 * the clouds do: the real SDK clients work against them (CreateTags,
 * filters with wildcards, paging, zone operations), and raw requests see
 * the XML namespace, the error shapes and the refusals of unsigned or
 * unauthenticated requests.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CreateTagsCommand, DescribeInstancesCommand, EC2Client, RunInstancesCommand } from '@aws-sdk/client-ec2';
import { InstancesClient, ZoneOperationsClient } from '@google-cloud/compute';
import t from 'tap';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import { startComputeEndpoint } from '../src/testing/compute-endpoint.js';
import { startEc2Endpoint } from '../src/testing/ec2-endpoint.js';

const dir = mkdtempSync(join(tmpdir(), 'drover-endpoints-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const credentials = dummyCloudCredentials(dir);
Object.assign(process.env, credentials);

t.test('EC2: the SDK against the endpoint, and the wire as EC2 has it', async (t) => {
  const endpoint = await startEc2Endpoint({ accessKeyId: credentials['AWS_ACCESS_KEY_ID']!, bootMs: 0 });
  const ec2 = new EC2Client({ endpoint: endpoint.url, maxAttempts: 1 });
  t.teardown(async () => {
    ec2.destroy();
    await endpoint.close();
  });
  const ids: string[] = [];
  for (const n of [1, 2, 3]) {
    const out = await ec2.send(new RunInstancesCommand({ ImageId: 'ami-1', InstanceType: 't3.micro', MinCount: 1, MaxCount: 1, TagSpecifications: [{ ResourceType: 'instance', Tags: [{ Key: 'n', Value: `job-${n}` }] }] }));
    ids.push(out.Instances![0]!.InstanceId!);
  }
  await ec2.send(new CreateTagsCommand({ Resources: [ids[0]!, ids[2]!], Tags: [{ Key: 'team', Value: 'infra' }] }));
  const tagged = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: 'tag:team', Values: ['infra'] }] }));
  t.same(tagged.Reservations!.map((r) => r.Instances![0]!.InstanceId).sort(), [ids[0], ids[2]].sort(), 'CreateTags, then a tag filter');
  const wild = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: 'tag:n', Values: ['job-?'] }, { Name: 'instance-state-name', Values: ['running'] }] }));
  t.equal(wild.Reservations!.length, 3, 'wildcards and the state filter');
  const first = await ec2.send(new DescribeInstancesCommand({ MaxResults: 5, Filters: [{ Name: 'tag-key', Values: ['n'] }] }));
  t.equal(first.Reservations!.length, 3);
  const page = await ec2.send(new DescribeInstancesCommand({ MaxResults: 2 } as never));
  t.equal(page.Reservations!.length, 2);
  t.ok(page.NextToken, 'a next page');
  const rest = await ec2.send(new DescribeInstancesCommand({ MaxResults: 2, NextToken: page.NextToken } as never));
  t.equal(rest.Reservations!.length, 1);
  t.equal(rest.NextToken, undefined);
  const running = (await ec2.send(new DescribeInstancesCommand({ InstanceIds: [ids[1]!] }))).Reservations![0]!.Instances![0]!;
  t.match(running, { State: { Name: 'running', Code: 16 }, PublicIpAddress: '127.0.0.1', InstanceType: 't3.micro' });
  await t.rejects(ec2.send(new DescribeInstancesCommand({ InstanceIds: ['i-00000000000000000'] })), { name: 'InvalidInstanceID.NotFound' });

  const raw = await fetch(endpoint.url, { method: 'POST', body: 'Action=DescribeInstances&Version=2016-11-15', headers: { authorization: `AWS4-HMAC-SHA256 Credential=${credentials['AWS_ACCESS_KEY_ID']!}/x` } });
  const xml = await raw.text();
  t.match(xml, /^<\?xml version="1.0" encoding="UTF-8"\?>\n<DescribeInstancesResponse xmlns="http:\/\/ec2.amazonaws.com\/doc\/2016-11-15\/"><requestId>[0-9a-f-]{36}<\/requestId><reservationSet>/);
  const unsigned = await fetch(endpoint.url, { method: 'POST', body: 'Action=DescribeInstances' });
  t.equal(unsigned.status, 401);
  t.match(await unsigned.text(), /<Response><Errors><Error><Code>AuthFailure<\/Code>/);
  const other = new EC2Client({ endpoint: endpoint.url, maxAttempts: 1, credentials: { accessKeyId: 'AKIAOTHER', secretAccessKey: 'x' } });
  await t.rejects(other.send(new DescribeInstancesCommand({})), { name: 'AuthFailure' }, 'another key is refused');
  other.destroy();
  endpoint.faults.throttle(1, { action: 'DescribeInstances' });
  await t.rejects(ec2.send(new DescribeInstancesCommand({})), { name: 'RequestLimitExceeded', $metadata: { httpStatusCode: 503 } });
  t.same(endpoint.calls.at(-1), { action: 'DescribeInstances', at: endpoint.calls.at(-1)!.at, error: 'RequestLimitExceeded' });
});

t.test('Compute: the client against the endpoint, and the wire as Google has it', async (t) => {
  // The test's clock: operations are DONE only when the test moves it on.
  let now = Date.now();
  const endpoint = await startComputeEndpoint({ bootMs: 0, operationMs: 1000, clock: () => now });
  const options = { fallback: true, apiEndpoint: '127.0.0.1', port: endpoint.port, protocol: 'http', scopes: [] as string[] };
  const instances = new InstancesClient(options);
  const operations = new ZoneOperationsClient(options);
  t.teardown(async () => {
    await instances.close();
    await operations.close();
    await endpoint.close();
  });
  const place = { project: 'p', zone: 'europe-west1-b' };
  for (const n of [1, 2, 3]) {
    const [op] = await instances.insert({ ...place, instanceResource: { name: `vm-${n}`, machineType: 'zones/europe-west1-b/machineTypes/e2-small', labels: { job: `j${n}`, ...(n === 2 ? { keep: 'yes' } : {}) } } });
    const name = (op as unknown as { latestResponse: { name: string; status: string } }).latestResponse;
    t.equal(name.status, 'RUNNING', 'an operation runs at first');
    const [got] = await operations.get({ ...place, operation: name.name });
    t.equal(got.status, 'RUNNING');
    now += 1000;
    const [done] = await operations.wait({ ...place, operation: name.name });
    t.equal(done.status, 'DONE', 'wait answers once it is done');
  }
  const [kept] = await instances.list({ ...place, filter: 'labels.keep:*' }, { autoPaginate: false });
  t.same(kept.map((i) => i.name), ['vm-2']);
  const [one] = await instances.list({ ...place, filter: '(labels.job = "j3") AND (status = RUNNING)' }, { autoPaginate: false });
  t.same(one.map((i) => i.name), ['vm-3']);
  const [page, next, response] = await instances.list({ ...place, maxResults: 2 }, { autoPaginate: false });
  t.equal(page.length, 2);
  t.ok((response as { nextPageToken?: string }).nextPageToken ?? next, 'a next page');
  const [vm] = await instances.get({ ...place, instance: 'vm-1' });
  t.match(vm, { status: 'RUNNING', networkInterfaces: [{ accessConfigs: [{ natIP: '127.0.0.1' }] }] });
  const statusOf = (call: Promise<unknown>) => call.then(() => 'no error', (error: unknown) => (error as { status?: number }).status);
  t.equal(await statusOf(instances.insert({ ...place, instanceResource: { name: 'vm-1', machineType: 'zones/europe-west1-b/machineTypes/e2-small' } })), 409, 'a taken name');
  t.equal(await statusOf(instances.list({ ...place, filter: 'labels.job ~ x' }, { autoPaginate: false })), 400, 'a filter it cannot read is refused');

  const raw = await fetch(`${endpoint.url}/compute/v1/projects/p/zones/europe-west1-b/instances/nope`, { headers: { authorization: 'Bearer x' } });
  t.equal(raw.status, 404);
  t.match(await raw.json(), { error: { code: 404, errors: [{ reason: 'notFound' }], status: 'NOT_FOUND' } });
  const anonymous = await fetch(`${endpoint.url}/compute/v1/projects/p/zones/europe-west1-b/instances`);
  t.equal(anonymous.status, 401, 'a request without a token is refused');
  endpoint.faults.throttle(1);
  const throttled = await fetch(`${endpoint.url}/compute/v1/projects/p/zones/europe-west1-b/instances`, { headers: { authorization: 'Bearer x' } });
  t.equal(throttled.status, 429);
  t.match(await throttled.json(), { error: { code: 429, errors: [{ reason: 'rateLimitExceeded', domain: 'usageLimits' }], status: 'RESOURCE_EXHAUSTED' } });
});
