/**
 * The benchmarks' own PostgreSQL: initdb into a temporary directory, started
 * on a free loopback port with trust authentication, stopped and removed
 * afterwards. The server keeps its default settings (fsync and synchronous
 * commit on), so a commit costs what it costs a user. initdb and postgres
 * refuse to run as root: as root they run as the `postgres` user.
 *
 * The binaries come from `pg_config --bindir`, else the newest
 * /usr/lib/postgresql/VERSION/bin. Without them, startPostgres() returns a
 * reason instead of a server, and the suite falls back to
 * DROVER_TEST_PG_URL (or the local server at 127.0.0.1:5432) and says so.
 */
import { execFile, execFileSync } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** The directory holding initdb and pg_ctl, or undefined. */
export function postgresBinDir() {
  try {
    const dir = execFileSync('pg_config', ['--bindir'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    if (existsSync(join(dir, 'initdb'))) return dir;
  } catch {
    // no pg_config: look where Debian puts the server
  }
  let versions = [];
  try {
    versions = readdirSync('/usr/lib/postgresql').filter((v) => existsSync(join('/usr/lib/postgresql', v, 'bin', 'initdb')));
  } catch {
    return undefined;
  }
  versions.sort((a, b) => Number(b) - Number(a));
  return versions.length ? join('/usr/lib/postgresql', versions[0], 'bin') : undefined;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Starts a throw-away server. Resolves with `{ url, version, stop }`, or with
 * `{ problem }` (a sentence) when initdb is missing or the server will not start.
 */
export async function startPostgres() {
  const bin = postgresBinDir();
  if (!bin) return { problem: 'initdb not found (neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin): install the PostgreSQL server' };
  const root = process.getuid?.() === 0;
  const serverUser = (command, args) => (root ? ['runuser', ['-u', 'postgres', '--', command, ...args]] : [command, args]);
  const asServerUser = (command, args) => run(...serverUser(command, args), { timeout: 120_000 });
  const dir = mkdtempSync(join(tmpdir(), 'drover-bench-pg-'));
  const data = join(dir, 'data');
  const ctl = (...args) => asServerUser(join(bin, 'pg_ctl'), ['-D', data, '-l', join(dir, 'log'), ...args]);
  let started = false;
  try {
    if (root) {
      const uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
      const gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
      chownSync(dir, uid, gid);
    }
    await asServerUser(join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8']);
    const port = await freePort();
    await ctl('-o', `-p ${port} -c listen_addresses=127.0.0.1 -k ${dir}`, '-w', 'start');
    started = true;
    const { stdout } = await run(join(bin, 'postgres'), ['--version']);
    // pg_ctl leaves the server running on its own: a suite that ends without stop() (an error, a
    // signal, a closed pipe) stops it on the way out.
    const stopNow = () => {
      try {
        execFileSync(...serverUser(join(bin, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', 'stop']), { stdio: 'ignore', timeout: 30_000 });
      } catch {
        // already stopped
      }
      rmSync(dir, { recursive: true, force: true });
    };
    process.once('exit', stopNow);
    let stopped;
    return {
      url: `postgres://postgres@127.0.0.1:${port}/postgres`,
      version: stdout.trim(),
      stop: () =>
        (stopped ??= ctl('-m', 'fast', '-w', 'stop')
          .catch(() => undefined)
          .finally(() => {
            process.off('exit', stopNow);
            rmSync(dir, { recursive: true, force: true });
          })),
    };
  } catch (error) {
    if (started) await ctl('-m', 'immediate', '-w', 'stop').catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
    return { problem: `the benchmarks' own PostgreSQL did not start: ${String(error?.stderr || error?.message || error).trim().split('\n').slice(-3).join(' ')}` };
  }
}
