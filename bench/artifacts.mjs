/**
 * Artifacts: a large file of a task directory stored as an artifact, locally
 * and over SSH, next to a raw copy and raw SFTP in the same run; and the
 * uploading process's peak RSS, which must not grow with the artifact.
 *
 * Each case runs in a fresh process (bench/artifact-worker.mjs), timed from
 * `go` to done. drover's cases are the pieces an artifacts plugin uses: the
 * transport's readFile() (what a sandbox's extractFile() returns) piped into
 * the queue's uploadArtifact(): the SQLite queue's file store, and
 * PostgreSQL's chunk store. Over SSH the file sits in a directory on the
 * suite's own loopback sshd (src/testing/sshd.ts), logged in as a
 * throw-away user whose shell is /bin/sh.
 */
import { fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { summary } from './lib.mjs';

const WORKER = fileURLToPath(new URL('artifact-worker.mjs', import.meta.url));
const MiB = 1024 * 1024;
const SIZES = [64 * MiB, 256 * MiB];
const CASE_TIMEOUT_MS = 300_000;
/** How much more the peak RSS may be with 256 MiB than with 64 MiB and still count as independent of the size. */
const RSS_SLACK = 16 * MiB;

const CASES = {
  local: [
    { kind: 'cat', name: 'raw copy: `cat FILE > DEST`', floor: true },
    { kind: 'stream-copy', name: 'Node stream copy (fs read -> write stream)' },
    { kind: 'local-sqlite', name: 'drover: LocalTransport.readFile -> SQLite queue uploadArtifact', drover: true },
    { kind: 'pg-raw', name: 'raw PostgreSQL: 1 MiB bytea rows of a plain table, 8 to a transaction (pg)', postgres: true },
    // 80% of a file copy is not a realistic goal for a database: the chunk store's target is the plain pg program's speed.
    { kind: 'local-postgres', name: 'drover: LocalTransport.readFile -> PostgreSQL queue uploadArtifact (chunk store)', drover: true, postgres: true, against: 'pg-raw' },
  ],
  ssh: [
    { kind: 'sftp-fastget', name: 'raw SFTP: ssh2 sftp.fastGet -> local file', floor: true },
    { kind: 'sftp-stream', name: 'raw SFTP: ssh2 sftp.createReadStream -> local file' },
    { kind: 'ssh-sqlite', name: 'drover: SshTransport.readFile -> SQLite queue uploadArtifact', drover: true },
  ],
};

export async function artifacts({ root, scratch, reps, quick, pg: server }) {
  started = performance.now();
  const { startSshd } = await import(join(root, 'dist/testing/sshd.js'));
  // A directory the sshd's throw-away user may read: the "task directory" the files are extracted from.
  const taskDir = mkdtempSync(join(tmpdir(), 'drover-bench-artifacts-'));
  chmodSync(taskDir, 0o755);
  let sshd;
  try {
    const files = {};
    for (const size of SIZES) {
      files[size] = join(taskDir, `artifact-${size / MiB}MiB.bin`);
      writeRandomFile(files[size], size);
      chmodSync(files[size], 0o644);
    }
    sshd = await startSshd();
    const ssh = { host: sshd.host, port: sshd.port, user: sshd.user, identityFile: sshd.identityFile, knownHostsFile: sshd.knownHostsFile };
    progress(`sshd on 127.0.0.1:${sshd.port} as ${sshd.user}; files of ${SIZES.map((s) => `${s / MiB} MiB`).join(' and ')} in ${taskDir}`);

    const runCase = async (each, size) => {
      const dir = mkdtempSync(join(scratch, 'artifact-'));
      const schema = `bench_art_${process.pid}_${randomBytes(4).toString('hex')}`;
      try {
        return await once(WORKER, {
          kind: each.kind, root, size, file: files[size], dest: join(dir, 'copy.bin'), queueDir: dir, pgUrl: server?.url, pgSchema: schema, ssh,
        });
      } finally {
        rmSync(dir, { recursive: true, force: true });
        if (each.postgres) await dropSchema(server.url, schema).catch(() => {});
      }
    };

    const benchmarks = [];
    for (const [where, cases] of Object.entries(CASES)) {
      const rows = [];
      const targets = [];
      const throughput = {};
      const rss = {};
      // The largest size is the one timed; the drover cases also run the smaller sizes, as many times, for the peak RSS.
      const size = SIZES[SIZES.length - 1];
      for (const each of cases) {
        try {
          if (each.postgres && !server?.url) throw new Error('no PostgreSQL server');
          progress(`${where}: ${each.name}, ${size / MiB} MiB`);
          if (!quick) await runCase(each, size);
          const values = [];
          const peaks = {};
          for (let i = 0; i < reps; i++) {
            const report = await runCase(each, size);
            values.push(size / MiB / report.seconds);
            peaks[size] = Math.max(peaks[size] ?? 0, report.maxRss);
          }
          if (each.drover) {
            // Each size's peak is the highest of as many runs as the timed size had: one run against the
            // highest of three would make the larger size look hungrier by the spread alone.
            for (const other of SIZES.filter((s) => s !== size)) {
              for (let i = 0; i < reps; i++) peaks[other] = Math.max(peaks[other] ?? 0, (await runCase(each, other)).maxRss);
            }
            rss[each.kind] = peaks;
          }
          throughput[each.kind] = summary(values);
        } catch (error) {
          throughput[each.kind] = { error };
          progress(`${where}: ${each.name}: ${firstLine(error)}`);
        }
      }
      const floor = cases.find((each) => each.floor);
      const floorMedian = throughput[floor.kind]?.median;
      for (const each of cases) {
        const s = throughput[each.kind];
        if (s.error) {
          rows.push({ name: `${each.name}: not measured`, median: NaN, min: NaN, max: NaN, ratio: NaN, extra: firstLine(s.error) });
          continue;
        }
        const peaks = rss[each.kind];
        const extra = peaks ? `peak RSS ${SIZES.map((sz) => `${(peaks[sz] / MiB).toFixed(0)} MiB (${sz / MiB} MiB file)`).join(', ')}` : '';
        rows.push({ name: each.name, ...s, ratio: s.median / floorMedian, extra });
        if (!each.drover) continue;
        // The ratio column stays against the group's floor (a raw copy); a case may be held to another row.
        const target = cases.find((other) => other.kind === each.against) ?? floor;
        const ratio = s.median / throughput[target.kind]?.median;
        const measured = (Number.isNaN(ratio) ? `${target.name} not measured` : `${ratio.toFixed(2)} of it`)
          + (target === floor ? '' : `; ${(s.median / floorMedian).toFixed(2)} of ${floor.name}`);
        targets.push({ text: `${each.name}: at least 80% of ${target.name}`, met: ratio >= 0.8, measured });
        const [small, large] = [peaks[SIZES[0]], peaks[size]];
        targets.push({
          text: `${each.name}: peak memory independent of the artifact's size (peak RSS with ${size / MiB} MiB at most ${RSS_SLACK / MiB} MiB above that with ${SIZES[0] / MiB} MiB)`,
          met: large - small <= RSS_SLACK,
          measured: `${(small / MiB).toFixed(0)} MiB -> ${(large / MiB).toFixed(0)} MiB`,
        });
      }
      benchmarks.push({
        title: `Artifacts: a ${size / MiB} MiB file ${where === 'local' ? 'stored locally' : 'read over SSH'}`,
        description: `A ${size / MiB} MiB file of random bytes in a task directory ${where === 'local' ? 'on this machine' : `on the suite's loopback sshd (logged in as a throw-away user whose shell is /bin/sh)`}, moved once per case in a fresh process; MiB/s from start to finish. `
          + 'drover\'s rows are the pieces an artifacts plugin uses (the plugin itself is being written at the same time): the transport\'s `readFile()` — what a sandbox\'s `extractFile()` returns — piped into the queue\'s `uploadArtifact()`'
          + (where === 'local' ? ', for the SQLite queue (a file beside the database) and PostgreSQL\'s chunk store (rows of 1 MiB, several to a transaction; the suite\'s own server, default settings). The chunk store is held to a plain pg program that stores the same file in the same server (1 MiB bytea rows of a table with an integer key, 8 rows to a transaction, one insert at a time), not to the copy.' : ', for the SQLite queue.')
          + ` Peak RSS is the uploading process's (ru_maxrss), the highest of ${reps} run${reps === 1 ? '' : 's'} with the ${SIZES[0] / MiB} MiB file and of as many with the ${size / MiB} MiB one.`
          + (quick ? ' Quick mode: no warm-up (the files were just written, so they are in the page cache).' : ' One warm-up per case.'),
        unit: 'MiB/s',
        extraHeader: 'peak RSS of the uploading process',
        rows,
        targets,
      });
    }
    return benchmarks;
  } finally {
    await sshd?.stop();
    rmSync(taskDir, { recursive: true, force: true });
  }
}

/** Writes `size` bytes of random data (incompressible, so no layer can cheat), 1 MiB at a time. */
function writeRandomFile(path, size) {
  const fd = openSync(path, 'w');
  try {
    const block = randomBytes(MiB);
    for (let written = 0; written < size; written += MiB) {
      // A different first word per block: no two blocks are equal.
      block.writeUInt32LE(written / MiB, 0);
      writeSync(fd, block);
    }
  } finally {
    closeSync(fd);
  }
}

/** Forks one case, waits for `ready`, says `go`, and resolves with its report. */
function once(worker, config) {
  return new Promise((resolve, reject) => {
    const child = fork(worker, [JSON.stringify(config)], { stdio: ['ignore', 'inherit', 'pipe', 'ipc'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-2000)));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${config.kind}: not done within ${CASE_TIMEOUT_MS / 1000} s`));
    }, CASE_TIMEOUT_MS);
    child.on('message', (message) => {
      if (message?.ready) child.send('go');
      if (message?.done) resolve(message);
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${config.kind} exited (${code ?? signal}) before it was done: ${stderr.trim()}`));
    });
  });
}

async function dropSchema(url, schema) {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => {});
  await client.connect();
  try {
    await client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  } finally {
    await client.end().catch(() => {});
  }
}

function firstLine(error) {
  return String(error?.message ?? error).split('\n')[0];
}

let started = performance.now();
function progress(line) {
  process.stderr.write(`bench artifacts [${((performance.now() - started) / 1000).toFixed(0)} s]: ${line}\n`);
}
