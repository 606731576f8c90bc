/**
 * The worker's boot, regressions:
 *
 * - A boot failure said `boot failed: ECONNREFUSED ...` without saying
 *   whose: now `plugin NAME: boot failed: ...` or `host NAME: boot failed: ...`.
 * - A SHUTDOWN during boot cancels the host's boot: the boot actor used to
 *   pass host.boot a signal of its own that nothing ever aborted.
 * - An SSH host pool closed while its first probes ran (the worker stopped
 *   during boot) installed its probation timer anyway, after close(), and
 *   went on probing the disposed machines.
 */
import { execFileSync } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { connect, createServer as createTcpServer, type Socket } from 'node:net';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import type { Host, HostBootOptions, HostIdentity } from '../src/hosts/host.js';
import { HardwareHost, LocalTransport } from '../src/hosts/local.js';
import { MachinePool } from '../src/hosts/selection.js';
import { SshHost } from '../src/hosts/ssh-host.js';
import type { Transport } from '../src/hosts/transport.js';
import type { Plugin } from '../src/plugins/plugin.js';
import { createLogger, type Logger } from '../src/runtime/logger.js';
import { eventually } from './helpers/drover.js';
import { localWorker } from './helpers/worker.js';

/** Starts `server` on a loopback port (returned); it is closed, with every connection, when `t` ends. */
async function listening<S extends Server | ReturnType<typeof createTcpServer>>(t: Test, server: S): Promise<number> {
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy();
    server.close();
    await once(server, 'close').catch(() => undefined);
  });
  return (server.address() as { port: number }).port;
}

/** A worker on `host`, its queue and work directory in `dir`. */
function workerOn(t: Test, dir: string, host: Host, logger?: Logger, plugins: readonly Plugin[] = []) {
  return localWorker(t, dir, { host, plugins, workerId: 'boot-worker', ...(logger === undefined ? {} : { logger }) }).worker;
}

/**
 * A host as a library user might write one: this machine, whose config comes from a service on the
 * network at boot. It honours the boot's signal, as the Host contract asks.
 */
class ConfiguredHost implements Host {
  readonly name = 'configured';
  readonly shutdown = new AbortController().signal;
  readonly #inner: HardwareHost;
  constructor(readonly configUrl: string, workDir: string) {
    this.#inner = new HardwareHost({ workDir });
  }
  async boot(options: HostBootOptions): Promise<HostIdentity> {
    await fetch(this.configUrl, { signal: options.signal });
    return this.#inner.boot(options);
  }
  transport(): Transport {
    return this.#inner.transport();
  }
  dispose(): Promise<void> {
    return this.#inner.dispose();
  }
}

t.test('a SHUTDOWN while the host boots aborts the host\'s boot', async (t) => {
  // The config service never answers: the boot waits on it until the worker is told to stop.
  let asked = 0;
  let dropped = 0;
  const service = createServer((request) => {
    asked++;
    request.socket.on('close', () => dropped++);
  });
  const port = await listening(t, service);
  const dir = t.testdir({});
  const worker = workerOn(t, dir, new ConfiguredHost(`http://127.0.0.1:${port}/config`, join(dir, 'work')));
  await eventually('the boot to ask the config service', () => asked === 1);
  t.equal(worker.state(), 'booting');
  worker.shutdown({ kind: 'signal', signal: 'SIGTERM' });
  t.same(await worker.stopped, { reason: { kind: 'signal', signal: 'SIGTERM' } });
  await eventually('the boot\'s request to be given up', () => dropped === 1, 5000);
  t.pass('the host\'s boot saw the abort and gave its request up');
});

t.test('a machine pool closed while its first probes run starts no probation timer', async (t) => {
  const probes: (() => void)[] = [];
  const pool = new MachinePool([{ address: 'm0', transport: new LocalTransport(), capacity: 1 }], {
    probe: () => new Promise<void>((_, reject) => probes.push(() => reject(new Error('no answer')))),
    probationMs: 20,
    checkIntervalMs: 10,
    strikes: 10,
  });
  const started = pool.start();
  await eventually('the first probe', () => probes.length === 1);
  pool.close();
  probes[0]!();
  await started;
  t.match(pool.status()[0], { state: 'down', strikes: 1 });
  await sleep(300);
  t.equal(probes.length, 1, 'no probe after close');
  t.match(pool.status()[0], { state: 'down', strikes: 1 }, 'and no more strikes');
});

t.test('a worker on SSH hosts stopped while it boots leaves nothing probing the disposed hosts', async (t) => {
  // A machine that takes TCP connections but never speaks SSH: the boot's probe waits for its connect timeout.
  let connections = 0;
  const silent = createTcpServer(() => connections++);
  const port = await listening(t, silent);
  const dir = t.testdir({});
  writeFileSync(join(dir, 'known_hosts'), '');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'id')]);
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', write: (line) => lines.push(line) });
  const host = new SshHost({
    hosts: [{ address: `nobody@127.0.0.1:${port}` }],
    identityFiles: [join(dir, 'id')],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    connectTimeoutMs: 1000,
    probationMs: 20,
    checkIntervalMs: 10,
    logger,
  });
  const worker = workerOn(t, dir, host, logger);
  await eventually('the boot to connect', () => connections === 1);
  worker.shutdown({ kind: 'signal', signal: 'SIGTERM' });
  t.same(await worker.stopped, { reason: { kind: 'signal', signal: 'SIGTERM' } });
  await eventually('the boot\'s probe to time out', () => host.status()[0]!.strikes >= 1, 5000);
  await sleep(500);
  t.match(host.status()[0], { state: 'down', strikes: 1 }, 'the disposed host was not probed again');
  t.equal(connections, 1);
  t.equal(lines.filter((line) => line.includes('host still down')).length, 0, 'no probe failures logged after the worker stopped');
});

/** A loopback port where nothing listens (it did a moment ago). */
async function closedPort(): Promise<number> {
  const server = createTcpServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  server.close();
  await once(server, 'close');
  return port;
}

t.test('a plugin\'s boot failure stops the worker naming the plugin', async (t) => {
  const port = await closedPort();
  // A plugin that reports to a metrics service, which is not there.
  const metrics: Plugin = {
    name: 'metrics',
    boot: async () => {
      const socket = connect(port, '127.0.0.1');
      await once(socket, 'connect');
      socket.destroy();
    },
  };
  const dir = t.testdir({});
  const lines: string[] = [];
  const worker = workerOn(t, dir, new HardwareHost({ workDir: join(dir, 'work') }), createLogger({ level: 'info', write: (line) => lines.push(line) }), [metrics]);
  t.same(await worker.stopped, { reason: { kind: 'fatal', message: `plugin metrics: boot failed: connect ECONNREFUSED 127.0.0.1:${port}` } });
  t.notOk(lines.some((line) => line.includes('worker booted')), 'the worker never booted');
});

t.test('a plugin\'s boot that throws synchronously is a boot failure naming the plugin, too', async (t) => {
  const strict = {
    name: 'strict',
    boot() {
      throw new Error('LICENCE_KEY is not set');
    },
  } as unknown as Plugin;
  const dir = t.testdir({});
  const worker = workerOn(t, dir, new HardwareHost({ workDir: join(dir, 'work') }), undefined, [strict]);
  t.same(await worker.stopped, { reason: { kind: 'fatal', message: 'plugin strict: boot failed: LICENCE_KEY is not set' } });
});

t.test('a host\'s boot failure stops the worker naming the host', async (t) => {
  const port = await closedPort();
  const dir = t.testdir({});
  writeFileSync(join(dir, 'known_hosts'), '');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'id')]);
  const host = new SshHost({
    hosts: [{ address: `nobody@127.0.0.1:${port}` }],
    identityFiles: [join(dir, 'id')],
    knownHostsFile: join(dir, 'known_hosts'),
    agent: false,
    connectTimeoutMs: 2000,
  });
  const worker = workerOn(t, dir, host);
  const { reason } = await worker.stopped;
  t.equal(reason.kind, 'fatal');
  t.match(reason.kind === 'fatal' && reason.message, new RegExp(`^host ssh: boot failed: no SSH host can be reached:\\n {2}- nobody@127\\.0\\.0\\.1:${port}: .*connection refused`));
});
