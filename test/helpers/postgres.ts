/**
 * PostgreSQL for tests: the shared server (DROVER_TEST_PG_URL, default
 * postgres://postgres@127.0.0.1:5432/test) with a fresh schema per test, so
 * test files that run at once never see each other's rows; and a
 * throw-away server of a test's own (initdb into a temp dir, a free
 * loopback port) for tests that restart it.
 */
import { execFile } from 'node:child_process';
import { chownSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import pg from 'pg';
import type { Test } from 'tap';
import { PostgresQueue, type PostgresQueueOptions } from '../../src/queues/postgres.js';
import type { TaskStatus } from '../../src/queues/queue.js';

const run = promisify(execFile);

export const PG_URL = process.env['DROVER_TEST_PG_URL'] || 'postgres://postgres@127.0.0.1:5432/test';

/** A new schema name for one test; the schema (made by the queue's migrations) is dropped at teardown. */
export function freshSchema(t: Test, url = PG_URL): string {
  const schema = `t_${process.pid}_${randomBytes(4).toString('hex')}`;
  t.teardown(() => dropSchema(url, schema));
  return schema;
}

export async function dropSchema(url: string, schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  } catch {
    // a throw-away server that is already gone takes its schemas with it
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Opens a queue in `schema`, closed at teardown. */
export async function openQueue(t: Test, options: Partial<PostgresQueueOptions> & { schema: string }): Promise<PostgresQueue> {
  const queue = await PostgresQueue.open({ url: PG_URL, poolSize: 4, ...options });
  t.teardown(() => queue.close());
  return queue;
}

/** Reads every task of a schema (the way assertions want them). */
export async function allTasks(url: string, schema: string): Promise<TaskStatus[]> {
  const queue = await PostgresQueue.open({ url, schema, poolSize: 2 });
  try {
    return await queue.listTasks({ limit: 100_000 });
  } finally {
    await queue.close();
  }
}

export interface ThrowawayServer {
  readonly url: string;
  readonly port: number;
  /** Stops the server (fast: it ends every connection, as `pg_ctlcluster ... restart` does), waits `downMs`, starts it again. */
  restart(downMs?: number): Promise<void>;
  stop(): Promise<void>;
}

/** The directory of PostgreSQL's server binaries (initdb, pg_ctl), newest version first. */
function binDir(): string {
  const versions = readdirSync('/usr/lib/postgresql').sort((a, b) => Number(b) - Number(a));
  if (versions.length === 0) throw new Error('no PostgreSQL server under /usr/lib/postgresql: install postgresql');
  return join('/usr/lib/postgresql', versions[0]!, 'bin');
}

/** initdb and postgres refuse to run as root: as root, run them as the `postgres` user. */
function asServerUser(command: string, args: string[]): Promise<{ stdout: string; stderr: string }> {
  if (process.getuid?.() === 0) return run('runuser', ['-u', 'postgres', '--', command, ...args], { timeout: 60_000 });
  return run(command, args, { timeout: 60_000 });
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** A PostgreSQL server of the test's own, trust auth on 127.0.0.1; stopped and removed at teardown. */
export async function startThrowawayServer(t: Test): Promise<ThrowawayServer> {
  const bin = binDir();
  const dir = mkdtempSync(join(tmpdir(), 'drover-pg-'));
  if (process.getuid?.() === 0) {
    const { stdout } = await run('id', ['-u', 'postgres']);
    const { stdout: gid } = await run('id', ['-g', 'postgres']);
    chownSync(dir, Number(stdout.trim()), Number(gid.trim()));
  }
  const data = join(dir, 'data');
  const port = await freePort();
  await asServerUser(join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--no-sync']);
  const ctl = (...args: string[]) => asServerUser(join(bin, 'pg_ctl'), ['-D', data, '-l', join(dir, 'log'), ...args]);
  const serverOptions = `-p ${port} -c listen_addresses=127.0.0.1 -k ${dir} -c fsync=off -c max_connections=200`;
  await ctl('-o', serverOptions, '-w', 'start');
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await ctl('-m', 'immediate', '-w', 'stop').catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  };
  t.teardown(stop);
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    port,
    restart: async (downMs = 0) => {
      await ctl('-m', 'fast', '-w', 'stop');
      await new Promise((resolve) => setTimeout(resolve, downMs));
      await ctl('-o', serverOptions, '-w', 'start');
    },
    stop,
  };
}

/** One query on a connection of its own: for tests that look at the tables or the server directly. */
export async function sql<R extends pg.QueryResultRow>(text: string, values: unknown[] = [], url = PG_URL): Promise<R[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<R>(text, values)).rows;
  } finally {
    await client.end();
  }
}
