/**
 * The script engine and the library API (drover/offload) against real sshd
 * servers: scripts with env, dependency files and shebangs, exit codes,
 * timeouts, files brought back over SFTP, and host selection by script name
 * that never exceeds maxConcurrent.
 */
import t, { type Test } from 'tap';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { interpreterOf } from '../src/engines/script.js';
import { Offloader, type OffloadResult } from '../src/offload.js';
import { pidsWithCookie } from '../src/hosts/proc.js';
import type { TestSshd } from '../src/testing/sshd.js';
import { requireSshd, sshd } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

async function offloaderFor(t: Test, servers: readonly TestSshd[], options: { maxConcurrentHost?: number; capacity?: number } = {}): Promise<Offloader> {
  const known = mkdtempSync(join(tmpdir(), 'drover-known-'));
  t.teardown(() => rmSync(known, { recursive: true, force: true }));
  // One known_hosts for all the servers, as a user would have.
  writeFileSync(join(known, 'known_hosts'), servers.map((s) => `[127.0.0.1]:${s.port} ${s.hostPublicKey}\n`).join(''));
  const offloader = await Offloader.connect({
    hosts: servers.map((s) => ({ address: s.address, capacity: options.capacity ?? 4 })),
    identityFiles: [servers[0]!.identityFile],
    knownHostsFile: join(known, 'known_hosts'),
    agent: false,
    killGraceMs: 500,
  });
  t.teardown(() => offloader.close());
  return offloader;
}

function localDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'drover-script-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('shebang parsing', async (t) => {
  t.same(interpreterOf('#!/bin/bash\necho'), ['/bin/bash']);
  t.same(interpreterOf('#!/usr/bin/env python3\nprint(1)'), ['/usr/bin/env', 'python3']);
  t.same(interpreterOf('#! /usr/bin/perl -w -s\n'), ['/usr/bin/perl', '-w -s'], 'the rest of the line is one argument, as on Linux');
  t.same(interpreterOf('echo no shebang'), ['/bin/sh']);
});

t.test('a script runs remotely with env, args and dependency files, and its outputs come back', async (t) => {
  const [server] = [await sshd(t)];
  // One client key for every server in these tests.
  const offloader = await offloaderFor(t, [server!]);
  const deps = localDir(t);
  writeFileSync(join(deps, 'table.txt'), 'alpha\nbeta\n');
  mkdirSync(join(deps, 'tools'));
  writeFileSync(join(deps, 'tools', 'shout.sh'), '#!/bin/sh\necho "$1" | tr a-z A-Z\n');
  chmodSync(join(deps, 'tools', 'shout.sh'), 0o755);
  const result = await offloader.runOnHost({
    name: 'deps-demo',
    script: ['#!/bin/sh', 'set -e', 'echo "greeting=$GREETING args=$*"', 'wc -l < DEPS/table.txt', 'DEPS/tools/shout.sh "$SCRIPT_NAME"', 'mkdir -p out && echo made > out/result.txt', 'echo to-stderr >&2', 'exit 4'],
    deps: [join(deps, 'table.txt'), join(deps, 'tools')],
    args: ['one', 'two words'],
    env: { GREETING: "hello 'world'" },
    files: ['out/result.txt'],
  }, server!.address);
  t.equal(result.host, server!.address);
  t.equal(result.stdout, "greeting=hello 'world' args=one two words\n2\nDEPS-DEMO\n");
  t.equal(result.stderr, 'to-stderr\n');
  t.equal(result.exitCode, 4);
  t.equal(result.signal, null);
  t.equal(result.timedOut, false);
  t.equal(result.files['out/result.txt']?.toString(), 'made\n', 'the file came back over SFTP');
  t.same(offloader.status().map((m) => m.running), [0], 'the slot was given back');
});

t.test('the shebang decides the interpreter; a timeout stops the script and leaves nothing behind', async (t) => {
  const server = await sshd(t);
  const offloader = await offloaderFor(t, [server]);
  const python = await offloader.runOnRandomHost({ name: 'py', script: '#!/usr/bin/env python3\nimport sys\nprint("python", sys.version_info[0])\n' });
  t.equal(python.stdout, 'python 3\n');
  const dir = localDir(t);
  writeFileSync(join(dir, 'job.sh'), 'echo "from a file: $0"\n');
  const fromFile = await offloader.runOnRandomHost({ name: 'file', scriptFile: join(dir, 'job.sh') });
  t.equal(fromFile.stdout, 'from a file: ./job.sh\n', 'no shebang: /bin/sh');
  const started = Date.now();
  const slow = await offloader.runOnRandomHost({ name: 'slow', script: ['trap "" TERM', 'sleep 1000 &', 'echo started', 'wait'], timeout: 0.5, env: { DROVER_PROBE: 'x' } });
  t.ok(slow.timedOut, 'timed out');
  t.equal(slow.stdout, 'started\n');
  t.match(slow.stderr, /the script timed out after 0\.5 s/);
  t.ok(Date.now() - started < 5000, 'stopped within the grace period');
  t.same(pidsWithCookie(`${'offload'}-x`), []);
  await t.rejects(offloader.runOnRandomHost({ name: 'bad', scriptFile: join(dir, 'missing.sh') }), { message: /payload.scriptFile: cannot be read on the worker: ENOENT/ });
});

/** The most runs of one name that overlapped in time on one host, from the start/end stamps the scripts print. */
function mostAtOnce(results: readonly OffloadResult[]): Map<string, number> {
  const events: { host: string; at: number; delta: number }[] = [];
  for (const result of results) {
    const [start, end] = result.stdout.trim().split(' ').map(Number);
    events.push({ host: result.host, at: start!, delta: 1 }, { host: result.host, at: end!, delta: -1 });
  }
  events.sort((a, b) => a.at - b.at || a.delta - b.delta);
  const now = new Map<string, number>();
  const most = new Map<string, number>();
  for (const event of events) {
    const value = (now.get(event.host) ?? 0) + event.delta;
    now.set(event.host, value);
    most.set(event.host, Math.max(most.get(event.host) ?? 0, value));
  }
  return most;
}

t.test('3 hosts, least-loaded: scripts spread by name and never exceed maxConcurrent', async (t) => {
  const first = await sshd(t);
  // Every server authorizes the first one's client key.
  const servers = [first, await sshd(t, { identityFile: first.identityFile }), await sshd(t, { identityFile: first.identityFile })];
  const offloader = await offloaderFor(t, servers, { capacity: 6 });
  t.same(offloader.status().map((m) => m.state), ['up', 'up', 'up'], 'every host is up', { status: offloader.status() });
  const script = ['s=$(date +%s%N)', 'sleep 0.3', 'echo "$s $(date +%s%N)"'];
  const renders = Array.from({ length: 12 }, () => offloader.runOnLeastLoadedHost({ name: 'render', script, maxConcurrent: 2 }));
  const encodes = Array.from({ length: 6 }, () => offloader.runOnLeastLoadedHost({ name: 'encode', script }));
  const [renderResults, encodeResults] = await Promise.all([Promise.all(renders), Promise.all(encodes)]);
  const perHost = (results: OffloadResult[]) => servers.map((s) => results.filter((r) => r.host === s.address).length);
  t.same(perHost(renderResults), [4, 4, 4], 'render: spread evenly');
  t.same(perHost(encodeResults), [2, 2, 2], 'encode: spread evenly too');
  for (const [host, most] of mostAtOnce(renderResults)) t.ok(most <= 2, `render never ran more than twice at once on ${host} (${most})`);
  t.ok(renderResults.every((r) => r.exitCode === 0) && encodeResults.every((r) => r.exitCode === 0));
});
