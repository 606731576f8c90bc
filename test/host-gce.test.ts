/**
 * The `gce` host: drover on a Compute Engine instance, against the metadata
 * server of drover/testing on loopback. The server speaks Compute Engine's
 * protocol (Metadata-Flavor, ETags, hanging GETs); the host reads identity
 * and its settings attribute, and watches `preempted` and
 * `maintenance-event` with `wait_for_change`.
 */
import { join } from 'node:path';
import t from 'tap';
import { GceHost, GceMetadata, MAINTENANCE_NOTICE_MS, PREEMPTION_NOTICE_MS } from '../src/hosts/gce.js';
import type { InterruptionNotice } from '../src/hosts/metadata.js';
import { createLogger } from '../src/runtime/logger.js';
import { startGceMetadata } from '../src/testing/gce-metadata.js';
import { drover, eventually, readTask, runOutcomes, startWorker, submit } from './helpers/drover.js';

const lines: string[] = [];
const logger = createLogger({ level: 'debug', write: (line) => lines.push(line) });
const FAST_RETRY = { attempts: 3, baseDelayMs: 10, maxDelayMs: 20 };
const signal = new AbortController().signal;
const FLAVOR = { 'Metadata-Flavor': 'Google' };

t.test('the metadata endpoint speaks Compute Engine\'s protocol: the flavor header, ETags, hanging GETs', async (t) => {
  const server = await startGceMetadata({ name: 'box', zone: 'europe-west4-b', attributes: { 'drover-config': 'capacity: 2\n', team: 'ml' } });
  t.teardown(() => server.close());
  const base = `${server.url}/computeMetadata/v1/instance`;

  const refused = await fetch(`${base}/name`);
  t.equal(refused.status, 403, 'no Metadata-Flavor: 403');
  t.equal((await fetch(`${base}/name`, { headers: { ...FLAVOR, 'X-Forwarded-For': '10.0.0.1' } })).status, 403, 'a forwarded request: 403');
  const name = await fetch(`${base}/name`, { headers: FLAVOR });
  t.equal(await name.text(), 'box');
  t.equal(name.headers.get('metadata-flavor'), 'Google');
  t.ok(name.headers.get('etag'), 'an ETag');
  t.equal(await (await fetch(`${base}/zone`, { headers: FLAVOR })).text(), 'projects/123456789012/zones/europe-west4-b');
  t.equal(await (await fetch(`${base}/attributes/`, { headers: FLAVOR })).text(), 'drover-config\nteam\n', 'a directory lists its keys');
  t.same(await (await fetch(`${base}/attributes/?recursive=true`, { headers: FLAVOR })).json(), { 'drover-config': 'capacity: 2\n', team: 'ml' }, 'recursively, as JSON');
  t.equal((await fetch(`${base}/attributes/nothing`, { headers: FLAVOR })).status, 404);

  const first = await fetch(`${base}/preempted`, { headers: FLAVOR });
  t.equal(await first.text(), 'FALSE');
  const etag = first.headers.get('etag')!;
  const stale = await fetch(`${base}/preempted?wait_for_change=true&last_etag=0000`, { headers: FLAVOR });
  t.equal(await stale.text(), 'FALSE', 'a last_etag that is not the current one answers at once');
  const timedOut = await fetch(`${base}/preempted?wait_for_change=true&last_etag=${etag}&timeout_sec=1`, { headers: FLAVOR });
  t.equal(await timedOut.text(), 'FALSE', 'timeout_sec ends the wait with the value unchanged');
  t.equal(timedOut.headers.get('etag'), etag);

  const waiting = fetch(`${base}/preempted?wait_for_change=true&last_etag=${etag}`, { headers: FLAVOR });
  const directory = fetch(`${base}/attributes/?recursive=true&wait_for_change=true`, { headers: FLAVOR });
  await eventually('the requests to hang', () => server.hanging() === 2);
  server.preempt();
  const changed = await waiting;
  t.equal(await changed.text(), 'TRUE', 'the hanging GET answers the change');
  t.not(changed.headers.get('etag'), etag, 'with a new ETag');
  server.setAttribute('team', 'infra');
  t.same(await (await directory).json(), { 'drover-config': 'capacity: 2\n', team: 'infra' }, 'a wait on a directory answers a change under it');
});

t.test('GceMetadata reads identity and the settings attribute', async (t) => {
  const server = await startGceMetadata({ id: '42', name: 'worker-7', zone: 'us-west1-c', machineType: 'n2-standard-8', projectId: 'acme', attributes: { 'my-config': '{"capacity": 8}' } });
  t.teardown(() => server.close());
  const metadata = new GceMetadata({ url: server.url, configAttribute: 'my-config', retry: FAST_RETRY });
  t.same(await metadata.identity({ signal }), {
    hostname: 'worker-7.us-west1-c.c.acme.internal',
    facts: { cloud: 'gce', instanceId: '42', name: 'worker-7', machineType: 'n2-standard-8', zone: 'us-west1-c', region: 'us-west1' },
  });
  t.same(await metadata.userConfig(signal), { source: 'the instance attribute my-config', text: '{"capacity": 8}' });
  t.equal(await new GceMetadata({ url: server.url, retry: FAST_RETRY }).userConfig(signal), undefined, 'no drover-config attribute: no settings');

  server.failRequests(2);
  t.equal((await metadata.get('instance/name', signal))?.value, 'worker-7', 'transient 503s are retried');
  server.failRequests(Infinity, 500);
  await t.rejects(metadata.get('instance/name', signal), { message: `GET ${server.url}/computeMetadata/v1/instance/name: HTTP 500` });
});

/** Watches until a notice comes (or the test aborts it), and returns it. */
function watchFor(metadata: GceMetadata, stop: AbortSignal): Promise<InterruptionNotice | undefined> {
  return new Promise((resolve) => {
    void metadata.watch({ signal: stop, logger, onNotice: resolve }).then(() => resolve(undefined));
  });
}

t.test('GceMetadata.watch: preemption and a terminating maintenance are notices; a live migration is not', async (t) => {
  const server = await startGceMetadata();
  t.teardown(() => server.close());
  const metadata = new GceMetadata({ url: server.url, retry: FAST_RETRY });

  const stop = new AbortController();
  let notice = watchFor(metadata, stop.signal);
  await eventually('both values to be read', () => server.requests.length >= 2);
  server.maintenanceEvent('MIGRATE_ON_HOST_MAINTENANCE');
  await eventually('the migration to be seen', () => lines.some((line) => line.includes('live-migrated')));
  // The woken request and both its retries fail: the watch backs off, then reads again.
  server.failRequests(3);
  server.maintenanceEvent('NONE');
  await eventually('the watch to recover from a failed hanging GET', () => lines.some((line) => line.includes('instance/maintenance-event can be read again')));
  const before = Date.now();
  server.maintenanceEvent('TERMINATE_ON_HOST_MAINTENANCE');
  const maintenance = await notice;
  t.equal(maintenance?.message, 'host maintenance: TERMINATE_ON_HOST_MAINTENANCE');
  t.ok(maintenance!.goneAt >= before + MAINTENANCE_NOTICE_MS, 'the instance goes a minute later');
  t.ok(server.requests.filter((r) => r.waitForChange).length >= 2, 'the values were watched with hanging GETs');
  await eventually('the notice to end the other value\'s wait', () => server.hanging() === 0);

  const second = await startGceMetadata();
  t.teardown(() => second.close());
  notice = watchFor(new GceMetadata({ url: second.url, retry: FAST_RETRY }), stop.signal);
  await eventually('the watch to hang', () => second.hanging() === 2);
  const preemptedAt = Date.now();
  second.preempt();
  const preemption = await notice;
  t.equal(preemption?.message, 'preemption: Compute Engine is stopping the instance');
  t.ok(preemption!.goneAt >= preemptedAt + PREEMPTION_NOTICE_MS, 'the instance goes 30 s later');

  const third = await startGceMetadata();
  t.teardown(() => third.close());
  const quiet = new AbortController();
  notice = watchFor(new GceMetadata({ url: third.url, retry: FAST_RETRY }), quiet.signal);
  await eventually('the watch to hang', () => third.hanging() === 2);
  quiet.abort();
  t.equal(await notice, undefined, 'aborting the watch ends its hanging GETs, without a notice');
});

t.test('GceHost: an instance preempted before boot shuts down at once; dispose ends the watch', async (t) => {
  const server = await startGceMetadata({ name: 'early' });
  t.teardown(() => server.close());
  server.preempt();
  const host = new GceHost({ url: server.url, retry: FAST_RETRY, workDir: t.testdir({}) });
  const identity = await host.boot({ logger, signal });
  t.equal(identity.hostname, 'early.us-central1-a.c.test-project.internal');
  await eventually('the shutdown signal', () => host.shutdown.aborted);
  t.ok(host.shutdownDeadline! > Date.now(), 'with the time the instance goes');
  await host.dispose();

  const calm = await startGceMetadata();
  t.teardown(() => calm.close());
  const other = new GceHost({ url: calm.url, retry: FAST_RETRY, workDir: t.testdir({}) });
  await other.boot({ logger, signal });
  await eventually('the watch to hang', () => calm.hanging() === 2);
  await other.dispose();
  t.notOk(other.shutdown.aborted, 'dispose is not a shutdown request');
  await eventually('the hanging GETs to be gone', () => calm.hanging() === 0);
});

t.test('drover worker --host gce: a preemption mid-task aborts it before the instance goes, with its log kept', async (t) => {
  const cwd = t.testdir({});
  const server = await startGceMetadata({ attributes: { 'drover-config': 'taskEnv:\n  GREETING: hello-from-attribute\n' } });
  t.teardown(() => server.close());
  const id = await submit(['--', 'echo "$GREETING"; sleep 600'], { cwd });
  // The grace period alone would let the task run 10 minutes; the preemption leaves 30 s, minus the margin.
  const worker = startWorker(['--host', 'gce', '--metadata-url', server.url, '--shutdown-grace', '600', '--notice-margin', '27'], { cwd });
  await eventually('the task to start', async () => (await readTask(join(cwd, '.drover'), id)).state === 'running' && (await drover(['logs', id], { cwd })).stdout.includes('hello-from-attribute'));
  t.match(worker.log(), /worker booted .*cloud=gce/, 'the instance\'s identity is in the log');

  const goneAt = Date.now() + PREEMPTION_NOTICE_MS;
  server.preempt();
  const code = await worker.exited;
  t.ok(Date.now() < goneAt, 'the worker stopped before the instance went');
  t.equal(code, 5, 'exit code 5: the host asked it to stop', { log: worker.log() });
  t.match(worker.log(), /preemption: Compute Engine is stopping the instance/);

  const task = await readTask(join(cwd, '.drover'), id);
  t.same(runOutcomes(task).slice(0, 1), ['exception/worker-shutdown'], 'the run resolved worker-shutdown');
  t.equal(task.runs[1]?.state, 'pending', 'and the task is queued again for another worker');
  t.match((await drover(['logs', id, '--run', '0'], { cwd })).stdout, 'hello-from-attribute', 'run 0\'s live log was uploaded');
});
