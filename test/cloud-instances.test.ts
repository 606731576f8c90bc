/**
 * Launching instances, on each provider, against its loopback endpoint,
 * with real sshd servers standing in for the instances: three instances
 * launch (through throttling), each becomes an SSH host that answers, and
 * all three are terminated at the end, also when every terminate call
 * fails twice; the watchdog then finds nothing left. An instance that
 * never starts, and one whose SSH never answers, are terminated; one whose
 * terminate keeps failing leaks to the watchdog, which terminates it; a
 * DISPOSE during the launch terminates the instance as soon as it exists.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { InstanceFleet, type FleetOptions } from '../src/cloud/instance-runtime.js';
import { SessionRegistry } from '../src/cloud/sessions.js';
import { Watchdog } from '../src/cloud/watchdog.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import { createLogger } from '../src/runtime/logger.js';
import { dummyCloudCredentials } from '../src/testing/cloud-endpoint.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { CLOUDS, type Cloud } from './helpers/clouds.js';
import { requireSshd, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const dir = mkdtempSync(join(tmpdir(), 'drover-cloud-instances-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
Object.assign(process.env, dummyCloudCredentials(dir));

const TIMING = { bootTimeoutMs: 10_000, sshTimeoutMs: 15_000, drainTimeoutMs: 1000, terminateAttempts: 10, terminateBackoffMs: 20, terminateMaxBackoffMs: 100 };

async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

let sessions = 0;
function fleetOptions(t: Test, cloud: Cloud, server: TestSshd, extra: Partial<FleetOptions> = {}): FleetOptions {
  const knownHosts = join(dir, `known_hosts-${++sessions}`);
  const lines: string[] = [];
  t.teardown(() => t.comment(lines.filter((line) => line.includes('instance')).join('\n')));
  return {
    provider: cloud.provider,
    spec: { image: 'ami-0123456789abcdef0', instanceType: 't3.micro', key: 'drover', userData: '#!/bin/sh\necho hello\n' },
    session: `test-${process.pid}-${sessions}`,
    sshUser: server.user,
    ssh: { identityFiles: [server.identityFile], knownHostsFile: knownHosts, hostKeyPolicy: 'accept-new', agent: false },
    timing: TIMING,
    pollMs: 20,
    probeIntervalMs: 50,
    registry: new SessionRegistry(join(dir, 'sessions')),
    logger: createLogger({ level: 'info', write: (line) => lines.push(line) }),
    ...extra,
  };
}

for (const [name, makeCloud] of Object.entries(CLOUDS)) {
  t.test(`${name}: three instances become SSH hosts, and all three are terminated though each terminate fails twice`, async (t) => {
    const first = await sshd(t);
    const servers = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
    const cloud = await makeCloud(t, servers.map((s) => s.port));
    const options = fleetOptions(t, cloud, first);
    const fleet = new InstanceFleet(options);
    t.teardown(() => fleet.dispose());

    cloud.faults.throttle(3);
    const hosts = await fleet.launch(3);
    t.same(hosts.map((h) => h.address).sort(), servers.map((s) => s.address).sort(), 'each instance is an SSH host at its address');
    t.ok(hosts.every((h) => h.labels?.[0]?.startsWith('instance=')), 'labelled with its instance');
    t.ok(options.registry.isOpen(options.session), 'the session is open while its instances run');

    const host = new SshHost({ hosts, identityFiles: [first.identityFile], knownHostsFile: options.ssh.knownHostsFile!, agent: false });
    await host.boot({ logger: createLogger({ level: 'error', write: () => {} }), signal: AbortSignal.timeout(20_000) });
    t.same(host.status().map((m) => m.state), ['up', 'up', 'up'], 'the ssh host reaches all three');
    const answers = await Promise.all(host.pool.machines().map((m) => m.transport.run('echo instance-up')));
    t.same(answers.map((a) => a.stdout.trim()), ['instance-up', 'instance-up', 'instance-up']);
    await host.dispose();

    // Six terminate calls are refused, twice per instance on the average (not a throttle:
    // the provider does not retry a refusal, the machine's own retry has to).
    cloud.faults.failTerminate(6, { code: cloud.refusal });
    const outputs = await fleet.dispose();
    t.same(outputs.map((o) => o.outcome), ['terminated', 'terminated', 'terminated'], 'all three terminated');
    t.equal(cloud.count(cloud.terminateCall), 9, 'six calls refused, three accepted');
    await until('the instances to be gone', () => cloud.alive().length === 0);
    t.notOk(options.registry.isOpen(options.session), 'the session is closed');

    const watchdog = new Watchdog({ providers: [cloud.provider], registry: options.registry });
    const sweep = await watchdog.sweep();
    t.same(sweep.found, [], 'the watchdog finds nothing left');
  });

  t.test(`${name}: an instance that never starts and one whose SSH never answers are terminated`, async (t) => {
    const server = await sshd(t);
    const closed = await sshd(t, { identityFile: server.identityFile });
    await closed.stop();
    const cloud = await makeCloud(t, [closed.port, closed.port]);
    // Each timeout in a fleet of its own, so that a slow machine cannot make one look like the other.
    cloud.faults.neverStart(1);
    const neverStarts = new InstanceFleet(fleetOptions(t, cloud, server, { timing: { ...TIMING, bootTimeoutMs: 500 } }));
    t.same(await neverStarts.launch(1), [], 'the instance that never starts is no host');
    const noSsh = new InstanceFleet(fleetOptions(t, cloud, server, { timing: { ...TIMING, sshTimeoutMs: 800 } }));
    t.same(await noSsh.launch(1), [], 'the instance whose SSH never answers is no host');
    const outputs = [...await neverStarts.dispose(), ...await noSsh.dispose()];
    t.match(outputs, [
      { outcome: 'terminated', reason: 'it did not start in time (bootTimeout)' },
      { outcome: 'terminated', reason: 'it did not answer over SSH in time (sshTimeout)' },
    ]);
    await until('the instances to be gone', () => cloud.alive().length === 0);
  });

  t.test(`${name}: an instance whose terminate keeps failing leaks to the watchdog, which terminates it`, async (t) => {
    const server = await sshd(t);
    const cloud = await makeCloud(t, [server.port]);
    const watchdog = new Watchdog({ providers: [cloud.provider], registry: new SessionRegistry(join(dir, 'sessions')) });
    const fleet = new InstanceFleet(fleetOptions(t, cloud, server, { watchdog, timing: { ...TIMING, terminateAttempts: 2 } }));
    t.equal((await fleet.launch(1)).length, 1);
    cloud.faults.failTerminate(2, { code: cloud.refusal });
    const [output] = await fleet.dispose();
    t.match(output, { outcome: 'leaked', reason: /^2 terminate calls failed/ });
    t.same(watchdog.adopted(), [output!.instanceId], 'handed to the watchdog');
    t.equal(cloud.alive().length, 1, 'still running');
    const sweep = await watchdog.sweep();
    t.same(sweep.terminated.map((r) => r.instance.id), [output!.instanceId], 'the watchdog terminated it');
    await until('the instance to be gone', () => cloud.alive().length === 0);
    t.same(watchdog.adopted(), []);
    t.same((await watchdog.sweep()).found, [], 'nothing left');
  });

  t.test(`${name}: a DISPOSE while the launch call runs terminates the instance once it exists`, async (t) => {
    const server = await sshd(t);
    const cloud = await makeCloud(t, [server.port]);
    cloud.faults.slow(300, { action: name === 'aws' ? 'RunInstances' : 'instances.insert', count: 1 });
    const fleet = new InstanceFleet(fleetOptions(t, cloud, server));
    const launching = fleet.launch(1);
    await until('the launch call to be under way', () => fleet.states()[0]?.state === 'requested');
    const [output] = await fleet.dispose();
    t.match(output, { outcome: 'terminated', reason: 'disposed while launching' });
    t.same(await launching, []);
    await until('the instance to be gone', () => cloud.alive().length === 0);
  });
}
