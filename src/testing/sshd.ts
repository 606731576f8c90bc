/**
 * A private OpenSSH server for tests: `startSshd()` runs `sshd -D` on a free
 * loopback port with a throw-away host key, a throw-away client key and an
 * authorized_keys of its own, and `stop()` ends it and every process it
 * started. Nothing of the machine's own sshd configuration is used.
 *
 * Logins go to a test user whose login shell is /bin/sh: when the tests
 * run as root, the user `drover-ssh` (created on first use, no password,
 * reachable only with the keys a test server authorizes); otherwise the
 * current user, since an unprivileged sshd can only log that one in.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { liveProcesses, signalPid, type ProcStat } from '../hosts/proc.js';

export const TEST_SSH_USER = 'drover-ssh';

/** The sshd binary, or undefined when OpenSSH's server is not installed. */
export function findSshd(): string | undefined {
  return ['/usr/sbin/sshd', '/usr/local/sbin/sshd', '/sbin/sshd'].find((path) => existsSync(path));
}

export interface TestSshd {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly user: string;
  /** `user@127.0.0.1:port`. */
  readonly address: string;
  /** The client's private key (no passphrase), authorized on this server. */
  readonly identityFile: string;
  /** A known_hosts file that holds this server's key. */
  readonly knownHostsFile: string;
  /** The host's public key line (`ssh-ed25519 AAAA...`). */
  readonly hostPublicKey: string;
  /** The listening sshd. */
  readonly pid: number;
  /** Everything sshd logged. */
  log(): string;
  /** Logins so far (one per TCP connection that authenticated). */
  logins(): number;
  /** The sshd processes of this server: the listener and one or two per connection. */
  sshdProcesses(): ProcStat[];
  /** Kills the listener and its per-connection sshd processes with SIGKILL, as a crashed host would; the commands they started are left to fend for themselves. */
  crash(): Promise<void>;
  /** Stops the server and every process it started; idempotent. */
  stop(): Promise<void>;
}

export interface StartSshdOptions {
  /** Reuse this host key instead of making one (to restart "the same" host). */
  readonly hostKeyFile?: string;
  /** Authorize this client key instead of making one. */
  readonly identityFile?: string;
  /** sshd's MaxSessions; default 10, OpenSSH's own. */
  readonly maxSessions?: number;
  /** Variables sshd sets in every session (SetEnv), over its own (PATH among them): e.g. a PATH without some program. */
  readonly sessionEnv?: Readonly<Record<string, string>>;
  /** Flags of the SFTP server (internal-sftp), each without spaces: e.g. `-P posix-rename` for a server that refuses OpenSSH's rename. */
  readonly sftpFlags?: readonly string[];
}

let userReady: Promise<void> | undefined;

/** Makes sure the test user exists (as root); tolerant of another test process doing the same at once. */
function ensureTestUser(): Promise<void> {
  userReady ??= (async () => {
    for (let attempt = 0; attempt < 20; attempt++) {
      try {
        execFileSync('id', ['-u', TEST_SSH_USER], { stdio: 'ignore' });
        return;
      } catch {
        // not there yet
      }
      try {
        // Password "*": none can be typed, yet the account is not locked ("!"), which sshd would refuse.
        execFileSync('useradd', ['--create-home', '--shell', '/bin/sh', '--password', '*', '--comment', 'drover test sshd user', TEST_SSH_USER], { stdio: 'ignore' });
        return;
      } catch {
        await sleep(100 + Math.random() * 200);
      }
    }
    throw new Error(`cannot create the test user ${TEST_SSH_USER} (useradd failed)`);
  })();
  return userReady;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address !== null ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

function descendants(root: number, processes: readonly ProcStat[]): ProcStat[] {
  const found: ProcStat[] = [];
  const parents = new Set([root]);
  let grew = true;
  while (grew) {
    grew = false;
    for (const stat of processes) {
      if (parents.has(stat.ppid) && !parents.has(stat.pid)) {
        parents.add(stat.pid);
        found.push(stat);
        grew = true;
      }
    }
  }
  return found;
}

function comm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

export async function startSshd(options: StartSshdOptions = {}): Promise<TestSshd> {
  const sshd = findSshd();
  if (sshd === undefined) throw new Error('sshd is not installed (Debian: apt-get install openssh-server)');
  const root = process.getuid?.() === 0;
  const user = root ? TEST_SSH_USER : userInfo().username;
  if (root) {
    await ensureTestUser();
    // Debian's sshd refuses to start without its privilege separation directory.
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  }
  const dir = mkdtempSync(join(tmpdir(), 'drover-sshd-'));
  // sshd reads authorized_keys as the user.
  chmodSync(dir, 0o755);
  const hostKeyFile = options.hostKeyFile ?? join(dir, 'host_ed25519');
  if (options.hostKeyFile === undefined) execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'drover-test-host', '-f', hostKeyFile]);
  const identityFile = options.identityFile ?? join(dir, 'client_ed25519');
  if (options.identityFile === undefined) execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'drover-test-client', '-f', identityFile]);
  const authorizedKeys = join(dir, 'authorized_keys');
  writeFileSync(authorizedKeys, readFileSync(`${identityFile}.pub`), { mode: 0o644 });
  chmodSync(authorizedKeys, 0o644);
  const hostPublicKey = readFileSync(`${hostKeyFile}.pub`, 'utf8').trim().split(/\s+/).slice(0, 2).join(' ');

  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const config = join(dir, `sshd_config`);
    writeFileSync(config, [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      `HostKey ${hostKeyFile}`,
      `PidFile ${join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${authorizedKeys}`,
      `AllowUsers ${user}`,
      'StrictModes no',
      'UsePAM no',
      'PubkeyAuthentication yes',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'PermitRootLogin no',
      `MaxSessions ${options.maxSessions ?? 10}`,
      ...Object.entries(options.sessionEnv ?? {}).map(([name, value]) => `SetEnv ${JSON.stringify(`${name}=${value}`)}`),
      'MaxStartups 100:30:200',
      'UseDNS no',
      'PrintMotd no',
      'PrintLastLog no',
      'X11Forwarding no',
      'AllowTcpForwarding no',
      ['Subsystem sftp internal-sftp', ...(options.sftpFlags ?? [])].join(' '),
      'LogLevel INFO',
      '',
    ].join('\n'));
    writeFileSync(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${hostPublicKey}\n`);
    const child: ChildProcess = spawn(sshd, ['-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    child.stderr!.on('data', (data: Buffer) => (log += data.toString()));
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const ready = await Promise.race([
      (async () => {
        const until = Date.now() + 10_000;
        while (!log.includes('Server listening on')) {
          if (Date.now() > until) return false;
          await sleep(20);
        }
        return true;
      })(),
      exited.then(() => false),
    ]);
    if (!ready) {
      child.kill('SIGKILL');
      if (attempt < 3 && /Address already in use/.test(log)) continue;
      rmSync(dir, { recursive: true, force: true });
      throw new Error(`sshd did not start on 127.0.0.1:${port}:\n${log}`);
    }
    const pid = child.pid!;
    const sshdProcesses = () => {
      const all = liveProcesses();
      const self = all.filter((stat) => stat.pid === pid);
      return [...self, ...descendants(pid, all).filter((stat) => comm(stat.pid).startsWith('sshd'))];
    };
    // A process that ends without stop() (an error, a signal) must not leave the server behind.
    const killEverything = () => {
      for (const each of [pid, ...descendants(pid, liveProcesses()).map((stat) => stat.pid)]) signalPid(each, 'SIGKILL');
    };
    process.once('exit', killEverything);
    let stopped: Promise<void> | undefined;
    return {
      host: '127.0.0.1',
      port,
      user,
      address: `${user}@127.0.0.1:${port}`,
      identityFile,
      knownHostsFile: join(dir, 'known_hosts'),
      hostPublicKey,
      pid,
      log: () => log,
      logins: () => log.split('\n').filter((line) => line.includes('Accepted publickey for')).length,
      sshdProcesses,
      async crash() {
        for (const stat of sshdProcesses()) signalPid(stat.pid, 'SIGKILL');
        await exited;
      },
      stop() {
        stopped ??= (async () => {
          process.off('exit', killEverything);
          killEverything();
          const timer = new AbortController();
          await Promise.race([exited, sleep(5000, undefined, { signal: timer.signal }).catch(() => {})]);
          timer.abort();
          rmSync(dir, { recursive: true, force: true });
        })();
        return stopped;
      },
    };
  }
}
