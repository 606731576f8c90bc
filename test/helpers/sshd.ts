/**
 * Test sshd servers for tap tests: started per test, stopped at its end.
 * Without OpenSSH's server installed, the SSH tests say so loudly and skip;
 * under CI=true they fail instead, since CI must run them.
 */
import type { Test } from 'tap';
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
