/**
 * Test sshd servers for tap tests: started per test, stopped at its end.
 * Without OpenSSH's server installed, the SSH tests say so loudly and skip;
 * under CI=true they fail instead, since CI must run them.
 */
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { chmodSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Test } from 'tap';
import { pidsWithCookie } from '../../src/hosts/proc.js';
import { SshTransport, type SshTransportOptions } from '../../src/hosts/ssh-transport.js';
import { findSshd, startSshd, type StartSshdOptions, type TestSshd } from '../../src/testing/sshd.js';

/** Why SSH tests cannot run here, or undefined when they can. */
export function sshdMissing(): string | undefined {
  return findSshd() === undefined ? 'sshd (OpenSSH server) is not installed: apt-get install openssh-server' : undefined;
}

/**
 * Call at the top of an SSH test file: returns false (after a loud message)
 * when the file must skip; fails the file under CI=true.
 */
export function requireSshd(t: Test): boolean {
  const missing = sshdMissing();
  if (missing === undefined) return true;
  if (process.env['CI'] === 'true') {
    t.fail(`${missing}; CI must run the SSH tests (.ci/run installs it)`);
    return false;
  }
  const banner = `\n*** SKIPPING SSH TESTS: ${missing} ***\n`;
  process.stderr.write(banner);
  t.comment(banner);
  t.pass('skipped: no sshd');
  return false;
}

/** Starts a test sshd that is stopped when `t` ends. */
export async function sshd(t: Test, options?: StartSshdOptions): Promise<TestSshd> {
  const server = await startSshd(options);
  t.teardown(() => server.stop());
  return server;
}

/** A transport to `server` with its throw-away key and host key (no ssh-agent), closed when `t` ends. */
export function sshTransport(t: Test, server: TestSshd, options: Partial<SshTransportOptions> = {}): SshTransport {
  const transport = new SshTransport({ address: server.address, identityFiles: [server.identityFile], knownHostsFile: server.knownHostsFile, agent: false, ...options });
  t.teardown(() => transport.close());
  return transport;
}

/** A fresh directory `~/<prefix>-XXXXXXXX` on the transport's host (the test user's home is shared by the test files), removed when `t` ends. */
export async function remoteDir(t: Test, transport: SshTransport, prefix: string): Promise<string> {
  const dir = transport.join(await transport.home(), `${prefix}-${randomUUID().slice(0, 8)}`);
  await transport.mkdir(dir);
  t.teardown(() => transport.remove(dir).catch(() => {}));
  return dir;
}

/** The test user's home directory (the test sshd logs everyone in as one user, on this machine). */
export function homeOf(user: string): string {
  return execFileSync('sh', ['-c', `getent passwd ${user} | cut -d: -f6`], { encoding: 'utf8' }).trim();
}

/** A fresh directory `~/<prefix>-XXXXXXXX` of the test user that every job may write, removed when `t` ends: its name in the home, and its path. */
export function sharedHomeDir(t: Test, user: string, prefix: string): { readonly name: string; readonly dir: string } {
  const name = `${prefix}-${randomUUID().slice(0, 8)}`;
  const dir = join(homeOf(user), name);
  mkdirSync(dir);
  chmodSync(dir, 0o777);
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return { name, dir };
}

/** A name for the remote work directory (DROVER_SSH_WORK_DIR, relative to the test user's home), removed when `t` ends. */
export function remoteWorkDir(t: Test, user: string, prefix = 'batch'): string {
  const name = `${prefix}-${randomUUID().slice(0, 8)}`;
  t.teardown(() => rmSync(join(homeOf(user), name), { recursive: true, force: true }));
  return name;
}

/** A run cookie (DROVER_RUN_COOKIE) whose processes are SIGKILLed when `t` ends, whatever the test did. */
export function cookieFor(t: Test): string {
  const cookie = `ssh-test-${randomUUID()}`;
  t.teardown(() => {
    for (const pid of pidsWithCookie(cookie)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
  return cookie;
}

/** Waits for `check` to hold, looking every 20 ms; throws after `timeoutMs`. */
export async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
