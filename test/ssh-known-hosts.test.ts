/**
 * Regression: hostKeyPolicy accept-new records only hosts that have no
 * entry at all. A known host (an ssh-ed25519 key on file) that offers only
 * a key of another type (ecdsa, as a man in the middle would) is refused,
 * and the file is left as it was, against a real sshd with an ecdsa host key.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { HostKeyError } from '../src/hosts/ssh-known-hosts.js';
import { requireSshd, sshd, sshTransport } from './helpers/sshd.js';

if (!requireSshd(t)) process.exit(0);

const dir = mkdtempSync(join(tmpdir(), 'drover-known-types-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

function publicKey(name: string, type: string): string {
  execFileSync('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', name, '-f', join(dir, name)]);
  return readFileSync(join(dir, `${name}.pub`), 'utf8').trim().split(/\s+/).slice(0, 2).join(' ');
}

t.test('accept-new refuses a key of another type from a host already known, and leaves the file alone', async (t) => {
  publicKey('host_ecdsa', 'ecdsa');
  const server = await sshd(t, { hostKeyFile: join(dir, 'host_ecdsa') });
  t.match(server.hostPublicKey, /^ecdsa-sha2-nistp256 /, 'the server has only an ecdsa host key');

  const onFile = `[127.0.0.1]:${server.port} ${publicKey('known_ed25519', 'ed25519')}\n`;
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, `# the host as first seen\n${onFile}`);
  for (const policy of ['accept-new', 'strict'] as const) {
    const error = await sshTransport(t, server, { knownHostsFile: knownHosts, hostKeyPolicy: policy }).connect().then(() => undefined, (e: unknown) => e);
    t.type(error, HostKeyError, `${policy}: refused`);
    const message = (error as Error).message;
    t.match(message, `host key of ${server.address} (ecdsa-sha2-nistp256 SHA256:`, `${policy}: names the host and the key offered`);
    t.match(message, 'which has ssh-ed25519 keys for it (line 2)', `${policy}: names the key types on file, and where`);
    t.match(message, `ssh-keygen -R '[127.0.0.1]:${server.port}'`, `${policy}: says how to remove the old keys`);
  }
  t.equal(readFileSync(knownHosts, 'utf8'), `# the host as first seen\n${onFile}`, 'nothing was appended');
  t.equal(server.logins(), 0, 'nothing was sent to the host');

  // A host with no entry at all is still recorded under accept-new, whatever its key type.
  const fresh = join(dir, 'fresh_known_hosts');
  writeFileSync(fresh, `[127.0.0.1]:1 ${publicKey('elsewhere', 'ed25519')}\n`);
  await sshTransport(t, server, { knownHostsFile: fresh, hostKeyPolicy: 'accept-new' }).connect();
  t.match(readFileSync(fresh, 'utf8'), `[127.0.0.1]:${server.port} ${server.hostPublicKey}\n`, 'an unknown host is recorded');
});
