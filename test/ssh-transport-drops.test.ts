/**
 * A connection that drops while a request is half-way: the SSH server has
 * the request (a command to exec, the SFTP subsystem) and never answers it
 * before the connection ends. ssh2 does not call such a request back, so
 * the transport must fail it itself; a worker whose host went down while a
 * task loaded waited on it for ever (its cleanup, then its shutdown, hung).
 * The server is ssh2's own, on loopback, so that it can leave a request
 * unanswered at will.
 */
import t, { type Test } from 'tap';
import { writeFileSync } from 'node:fs';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import ssh2 from 'ssh2';
import { SshTransport } from '../src/hosts/ssh-transport.js';

/** A server that accepts anyone and leaves every exec and subsystem request unanswered; `drop` ends the connection. */
async function stallingServer(t: Test, options: { remoteAgent: boolean }) {
  const hostKey = ssh2.utils.generateKeyPairSync('ed25519');
  const clientKey = ssh2.utils.generateKeyPairSync('ed25519');
  let stalled: () => void = () => {};
  const requested = new Promise<void>((resolve) => (stalled = resolve));
  const connections: ssh2.Connection[] = [];
  const server = new ssh2.Server({ hostKeys: [hostKey.private] }, (client) => {
    connections.push(client);
    client.on('error', () => {});
    client.on('authentication', (context) => context.accept());
    client.on('ready', () => {
      client.on('session', (accept) => {
        const session = accept();
        session.on('exec', () => stalled());
        session.on('subsystem', () => stalled());
      });
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => server.close());
  const { port } = server.address() as AddressInfo;
  const dir = t.testdir();
  writeFileSync(join(dir, 'id'), clientKey.private, { mode: 0o600 });
  writeFileSync(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostKey.public}\n`);
  const transport = new SshTransport({ address: `me@127.0.0.1:${port}`, identityFiles: [join(dir, 'id')], knownHostsFile: join(dir, 'known_hosts'), agent: false, remoteAgent: options.remoteAgent });
  t.teardown(() => transport.close());
  const lost: Error[] = [];
  transport.on('lost', (error) => lost.push(error));
  return { transport, requested, lost, drop: () => connections.forEach((client) => client.end()) };
}

/** How `work` settles within `ms`: its error's message, 'done', or 'still waiting'. */
async function settled(work: Promise<unknown>, ms: number): Promise<string> {
  return Promise.race([work.then(() => 'done', (error: Error) => error.message), sleep(ms, undefined, { ref: false }).then(() => 'still waiting')]);
}

for (const [what, remoteAgent, request] of [
  ['a file write (the SFTP subsystem)', false, (transport: SshTransport) => transport.writeFile('/tmp/never-written', 'x')],
  ['a command (exec)', false, (transport: SshTransport) => transport.run('true')],
  ['a command whose remote agent is starting (exec)', true, (transport: SshTransport) => transport.run('true')],
] as const) {
  t.test(`${what} that the connection drops under fails, and says the connection was lost`, async (t) => {
    const { transport, requested, lost, drop } = await stallingServer(t, { remoteAgent });
    const work = request(transport);
    work.catch(() => {});
    await requested; // the server has the request, unanswered
    drop();
    t.match(await settled(work, 5000), /^the connection to me@127\.0\.0\.1:\d+ was lost/);
    t.equal(lost.length, 1, 'and the transport said so');
  });
}
