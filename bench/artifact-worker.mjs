#!/usr/bin/env node
/**
 * One case of the artifacts benchmark, in a process of its own so that its
 * peak RSS is its own (bench/artifacts.mjs forks it with an IPC channel).
 * It sets up (queue, claim, connection), says `ready`, waits for `go`, moves
 * the file once, and reports `{ done, seconds, bytes, rssBefore, maxRss, cpuSeconds }`:
 * the RSS when the move started and the process's peak RSS (the kernel's
 * ru_maxrss), both in bytes, and the process's CPU time (user + system, all
 * its threads) during the move (not its children's: `cat` runs in one).
 *
 * Kinds (FILE is the source, DEST a local path):
 *   cat               `cat FILE > DEST` (a raw local copy)
 *   stream-copy       Node: fs.createReadStream(FILE) -> fs.createWriteStream(DEST)
 *   local-sqlite      drover: LocalTransport.readFile(FILE) -> SqliteQueue.uploadArtifact
 *   local-postgres    drover: LocalTransport.readFile(FILE) -> PostgresQueue.uploadArtifact (chunks in PostgreSQL)
 *   pg-raw            raw pg: FILE read 1 MiB at a time, each piece one bytea row of a plain table, 8 rows to a
 *                     transaction (the plain way to keep a file in PostgreSQL; the chunk store's floor)
 *   sftp-fastget      raw ssh2: sftp.fastGet(FILE, DEST) over the loopback sshd
 *   sftp-stream       raw ssh2: sftp.createReadStream(FILE) -> fs.createWriteStream(DEST)
 *   ssh-sqlite        drover: SshTransport.readFile(FILE) -> SqliteQueue.uploadArtifact
 *
 * The drover kinds are the pieces an artifacts plugin uses: a sandbox's
 * extractFile() is the transport's readFile() of a file of the task
 * directory (src/engines/process.ts), and its stream goes to the queue's
 * uploadArtifact().
 *
 * Usage: node artifact-worker.mjs '{"kind":..., "root":..., "file":..., "dest":..., "size":N, ...}'
 */
import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream, readFileSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';

const config = JSON.parse(process.argv[2] ?? '{}');
if (!process.send || !config.kind) {
  process.stderr.write('artifact-worker.mjs: run by bench/artifacts.mjs (fork with IPC), with a JSON config\n');
  process.exit(2);
}

const move = await prepare(config);
process.send({ ready: true });
await new Promise((resolve) => process.once('message', resolve));
const rssBefore = process.memoryUsage.rss();
const cpuBefore = process.cpuUsage();
const start = performance.now();
let bytes;
try {
  bytes = await move.run();
  const seconds = (performance.now() - start) / 1000;
  if (bytes !== config.size) throw new Error(`${config.kind} moved ${bytes} bytes, not ${config.size}`);
  const cpu = process.cpuUsage(cpuBefore);
  process.send({ done: true, seconds, bytes, rssBefore, maxRss: process.resourceUsage().maxRSS * 1024, cpuSeconds: (cpu.user + cpu.system) / 1e6 });
} finally {
  await move.close();
}
process.disconnect();

/** Sets up what `kind` needs; `run()` moves the file once and resolves with the bytes moved. */
async function prepare({ kind, root, file, dest, pgUrl, pgSchema, queueDir, ssh }) {
  const imported = (path) => import(join(root, 'dist', path));
  switch (kind) {
    case 'cat':
      return {
        run: () => new Promise((resolve, reject) => {
          const child = spawn('sh', ['-c', 'cat "$1" > "$2"', 'sh', file, dest], { stdio: 'ignore' });
          child.on('error', reject);
          child.on('close', (code) => (code === 0 ? resolve(statSync(dest).size) : reject(new Error(`cat exited ${code}`))));
        }),
        close: async () => {},
      };
    case 'stream-copy':
      return {
        run: async () => {
          await pipeline(createReadStream(file), createWriteStream(dest));
          return statSync(dest).size;
        },
        close: async () => {},
      };
    case 'sftp-fastget':
    case 'sftp-stream': {
      const { Client } = (await import('ssh2')).default;
      const client = new Client();
      await new Promise((resolve, reject) => {
        client.once('ready', resolve).once('error', reject);
        client.connect({ host: ssh.host, port: ssh.port, username: ssh.user, privateKey: readFileSync(ssh.identityFile) });
      });
      const sftp = await new Promise((resolve, reject) => client.sftp((error, session) => (error ? reject(error) : resolve(session))));
      return {
        run: async () => {
          if (kind === 'sftp-fastget') await new Promise((resolve, reject) => sftp.fastGet(file, dest, (error) => (error ? reject(error) : resolve())));
          else await pipeline(sftp.createReadStream(file), createWriteStream(dest));
          return statSync(dest).size;
        },
        close: async () => client.end(),
      };
    }
    case 'pg-raw': {
      const pg = (await import('pg')).default;
      const client = new pg.Client({ connectionString: pgUrl });
      await client.connect();
      await client.query(`CREATE SCHEMA "${pgSchema}"`);
      await client.query(`CREATE TABLE "${pgSchema}".blobs (id integer PRIMARY KEY, data bytea NOT NULL)`);
      return {
        run: async () => {
          const source = await open(file, 'r');
          let bytes = 0;
          try {
            for (let id = 0, more = true; more; ) {
              await client.query('BEGIN');
              for (let row = 0; row < 8; row++, id++) {
                const { bytesRead, buffer } = await source.read(Buffer.allocUnsafe(1024 * 1024), 0, 1024 * 1024, null);
                if (bytesRead === 0) {
                  more = false;
                  break;
                }
                await client.query(`INSERT INTO "${pgSchema}".blobs (id, data) VALUES ($1, $2)`, [id, buffer.subarray(0, bytesRead)]);
                bytes += bytesRead;
              }
              await client.query('COMMIT');
            }
          } finally {
            await source.close();
          }
          return bytes;
        },
        close: () => client.end(),
      };
    }
    case 'local-sqlite':
    case 'local-postgres':
    case 'ssh-sqlite': {
      const queue = kind === 'local-postgres'
        ? await (await imported('queues/postgres.js')).PostgresQueue.open({ url: pgUrl, schema: pgSchema, poolSize: 2 })
        : (await imported('queues/sqlite.js')).SqliteQueue.open({ dir: queueDir });
      const transport = kind === 'ssh-sqlite'
        ? new (await imported('hosts/ssh-transport.js')).SshTransport({
          address: `${ssh.user}@${ssh.host}:${ssh.port}`, identityFiles: [ssh.identityFile], knownHostsFile: ssh.knownHostsFile, agent: false,
        })
        : new (await imported('hosts/local.js')).LocalTransport({});
      if (kind === 'ssh-sqlite') await transport.connect();
      await queue.submit({ payload: {}, deadline: Date.now() + 3_600_000, retries: 0 });
      const [claim] = await queue.claimWork({ workerId: 'bench', count: 1, waitMs: 0 });
      return {
        run: async () => {
          const source = await transport.readFile(file);
          const info = await queue.uploadArtifact(claim, 'bench', { name: 'public/big.bin', contentType: 'application/octet-stream' }, source);
          return info.size;
        },
        close: async () => {
          await transport.close?.();
          await queue.close();
        },
      };
    }
    default:
      throw new Error(`artifact-worker.mjs: unknown kind ${JSON.stringify(kind)}`);
  }
}
