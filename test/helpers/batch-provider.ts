/**
 * The tests of test/batch-provider-aws.test.ts and -gce.test.ts (one file
 * per provider, so that each stays short):
 * `drover batch --provider aws|gce`, a real drover process on each
 * provider's loopback endpoint, with three real sshd servers standing in
 * for the instances (each launched instance's drover:ssh-port tag names
 * one): `--split 3` launches 3 instances, runs every job on them and
 * terminates all 3; a SIGINT mid-batch still terminates all 3, and
 * `--resume` launches 3 fresh ones that finish the jobs.
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';
import { EXIT } from '../../src/cli/exit-codes.js';
import { dummyCloudCredentials, type CloudEndpoint } from '../../src/testing/cloud-endpoint.js';
import type { TestSshd } from '../../src/testing/sshd.js';
import { CLOUDS } from './clouds.js';
import { DROVER, drover, eventually, processesWith, userEnv } from './drover.js';
import { remoteWorkDir, sharedHomeDir, sshd } from './sshd.js';

/** How a batch reaches each provider's endpoint: the options, and the cloud settings' environment. */
const LAUNCH: Record<'aws' | 'gce', (endpoint: CloudEndpoint) => { args: string[]; env: Record<string, string> }> = {
  aws: (endpoint) => ({ args: ['--provider', 'aws', '--instance-type', 't3.micro', '--image', 'ami-0123456789abcdef0', '--key', 'drover'], env: { DROVER_AWS_ENDPOINT: endpoint.url } }),
  // The zone as a batch option, the endpoint as the cloud setting's variable.
  gce: (endpoint) => ({ args: ['--provider', 'gce', '--instance-type', 'e2-small', '--image', 'projects/debian-cloud/global/images/family/debian-12', '--gce-zone', 'europe-west1-b'], env: { DROVER_GCE_ENDPOINT: endpoint.url } }),
};

interface JobLine {
  job: number;
  status: string;
  host: string;
}
const jobsLog = (dir: string): JobLine[] => readFileSync(join(dir, 'jobs.jsonl'), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as JobLine);

/** Three sshd servers trusting one key; the endpoint hands their ports to the instances in turn, `rounds` times over. */
async function setUp(t: Test, name: 'aws' | 'gce', rounds: number) {
  const cwd = t.testdir({});
  const first = await sshd(t);
  const servers: TestSshd[] = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
  const cloud = await CLOUDS[name](t, Array.from({ length: rounds }, () => servers.map((s) => s.port)).flat());
  const launch = LAUNCH[name](cloud.endpoint);
  const knownHosts = join(cwd, 'known_hosts');
  writeFileSync(knownHosts, servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  const env = {
    ...dummyCloudCredentials(cwd),
    ...launch.env,
    DROVER_QUEUE_DIR: join(cwd, 'queue'),
    DROVER_CLOUD_SESSIONS: join(cwd, 'cloud-sessions'),
    DROVER_SSH_IDENTITY_FILE: first.identityFile,
    DROVER_SSH_KNOWN_HOSTS: knownHosts,
    DROVER_SSH_WORK_DIR: remoteWorkDir(t, first.user),
    SSH_AUTH_SOCK: '',
  };
  const args = [...launch.args, '--ssh-user', first.user, '--sessions', join(cwd, 'sessions')];
  return { cwd, servers, cloud, env, args, sessions: join(cwd, 'sessions') };
}


export function providerBatchTests(t: Test, name: 'aws' | 'gce'): void {
  t.test(`${name}: --split 3 launches 3 instances, runs every job on them, and terminates all 3`, async (t) => {
    const { cwd, servers, cloud, env, args, sessions } = await setUp(t, name, 1);
    const result = await drover(['batch', ...args, '--split', '3', '--', 'sh', '-c', 'echo "job $0 on $DROVER_HOST"'], { cwd, env, input: '1\n2\n3\n4\n5\n6\n', timeoutMs: 60_000 });
    t.equal(result.code, EXIT.OK, result.stderr);
    t.match(result.stdout, /^session 1 \(\d+ s\): 6\/6 OK - 0 pending, 0 timeout, 0 errors$/m);
    t.match(result.stdout, new RegExp(`on ${name} \\(.+\\): .+ instances of .+, one per slot`), 'the batch says what it runs on');
    const dir = join(sessions, '1');
    const addresses = servers.map((s) => s.address).sort();
    for (let n = 1; n <= 6; n++) t.match(readFileSync(join(dir, 'output', `${n}.log`), 'utf8'), new RegExp(`^job ${n} on ${anyOf(addresses)}$`, 'm'), `job ${n}'s output is in the session`);
    t.same([...new Set(jobsLog(dir).map((line) => line.host))].sort(), addresses, 'the jobs ran on the three instances');
    t.equal(cloud.count(cloud.launchCall), 3, 'three instances launched');
    await eventually('every instance to be terminated', () => cloud.alive().length === 0, 10_000);
    t.pass('all 3 terminated');
    const params = JSON.parse(readFileSync(join(dir, 'params.json'), 'utf8')) as { provider?: { provider: string }; hostSource?: string };
    t.equal(params.provider?.provider, name, 'the session records the provider');
    t.notMatch(readFileSync(join(dir, 'params.json'), 'utf8'), /AWS_SECRET|private_key|drover-test-secret/, 'no credentials in the session');
    const listed = await drover(['instances', '--provider', name, ...(name === 'gce' ? ['--gce-zone', 'europe-west1-b'] : [])], { cwd, env, timeoutMs: 30_000 });
    t.equal(listed.code, EXIT.OK, listed.stderr);
    t.match(listed.stdout, /^no drover instances on/, 'drover instances finds nothing left');
  });

  t.test(`${name}: SIGINT mid-batch terminates all 3 instances; --resume launches fresh ones and finishes the jobs`, async (t) => {
    const { cwd, cloud, env, args, sessions, servers } = await setUp(t, name, 2);
    const { name: uniq, dir: shared } = sharedHomeDir(t, servers[0]!.user, 'provider');
    const marker = `31.${Math.floor(Math.random() * 1e6)}`;
    // Jobs 1-3 sleep (with a marker to find them by) until the flag exists; every job records that it finished.
    const command = ['sh', '-c', `if [ "$0" -le 3 ] && [ ! -e ~/${uniq}/flag ]; then sleep ${marker}; fi; echo "done $0" >> ~/${uniq}/done`];
    const child = spawn(process.execPath, [DROVER, 'batch', ...args, '--split', '3', '--', ...command], { cwd, env: userEnv(env), stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout.resume();
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    t.teardown(() => child.kill('SIGKILL'));
    child.stdin.end('1\n2\n3\n4\n5\n6\n');
    await eventually('jobs 1-3 to sleep on the instances', () => processesWith(`sleep\0${marker}`).length === 3, 30_000);
    t.equal(cloud.alive().length, 3, 'three instances run');
    child.kill('SIGINT');
    t.equal(await exited, EXIT.SIGNAL, stderr);
    t.match(stderr, /interrupted by SIGINT; the session is saved\. Resume it with: drover batch --resume 1/);
    t.equal(cloud.count(cloud.terminateCall), 3, 'drover asked to terminate all 3 before it exited');
    await eventually('every instance to be terminated', () => cloud.alive().length === 0, 10_000);
    t.equal(cloud.count(cloud.launchCall), 3, 'all 3 launched are terminated');
    await eventually('the remote jobs to be gone', () => processesWith(`sleep\0${marker}`).length === 0, 15_000);
    const saved = JSON.parse(readFileSync(join(sessions, '1', 'jobs.json'), 'utf8')) as { status: string }[];
    t.same(saved.map((job) => job.status), Array(6).fill('pending'), 'the killed jobs (and those that never started) are pending');

    writeFileSync(join(shared, 'flag'), '');
    const resumed = await drover(['batch', '--resume', '1', '--sessions', sessions], { cwd, env, timeoutMs: 60_000 });
    t.equal(resumed.code, EXIT.OK, resumed.stderr);
    t.match(resumed.stdout, /^session 1 \(\d+ s\): 6\/6 OK - 0 pending, 0 timeout, 0 errors$/m);
    t.equal(cloud.count(cloud.launchCall), 6, 'the resume launched 3 fresh instances');
    t.same(readFileSync(join(shared, 'done'), 'utf8').trim().split('\n').sort(), ['done 1', 'done 2', 'done 3', 'done 4', 'done 5', 'done 6'], 'every job ran exactly once in total');
    await eventually('every instance to be terminated', () => cloud.alive().length === 0, 10_000);
    t.pass('the fresh instances are terminated too');
  });
}

/** A pattern matching any of the addresses. */
function anyOf(addresses: string[]): string {
  return `(${addresses.map((a) => a.replace(/[.]/g, '\\.')).join('|')})`;
}
