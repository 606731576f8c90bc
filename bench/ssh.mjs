/**
 * SSH: trivial jobs (`true`) on the suite's loopback sshd (a throw-away
 * user whose login shell is /bin/sh, src/testing/sshd.ts) with 8 slots.
 *
 * - floor: raw ssh2, one persistent connection, 8 concurrent exec channels,
 *   TCP_NODELAY on (bench/ssh-floor.mjs); and the same with Nagle's
 *   algorithm left on, to show what a client without TCP_NODELAY pays.
 * - GNU parallel `-S` with `-j8`, with and without ControlMaster (`-M`).
 * - drover's SSH transport alone, in this process: per job what the
 *   runtime asks of it (remove and mkdir of a task directory, exec through
 *   the remote agent, kill, waitGone, remove), 8 at a time.
 * - drover worker over SSH: the jobs submitted to the embedded queue, then
 *   `drover worker --once --capacity 8` with the sshd as its SSH host
 *   (SshHost + process engine: a task directory, the command through the
 *   remote agent, live log, cleanup, per job).
 * - drover batch --hosts: `seq N | drover batch --hosts ... --split 8 -- true`
 *   (a drover without batch over SSH exits 2, and the row says so).
 *
 * Every case's time includes starting its program and connecting.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { repeat, summary, timed } from './lib.mjs';

const SLOTS = 8;

export async function ssh({ root, scratch, reps, quick }) {
  started = performance.now();
  const jobs = quick ? 200 : 500;
  const { startSshd } = await import(join(root, 'dist/testing/sshd.js'));
  const { SqliteQueue } = await import(join(root, 'dist/queues/sqlite.js'));
  const { SshTransport } = await import(join(root, 'dist/hosts/ssh-transport.js'));
  // Room for 8 command channels plus drover's SFTP and control channels, and sessions sshd is still closing.
  const sshd = await startSshd({ maxSessions: 4 * SLOTS });
  try {
    progress(`sshd on 127.0.0.1:${sshd.port} as ${sshd.user}; ${jobs} jobs per case`);
    const sshCommand = `ssh -F /dev/null -p ${sshd.port} -i ${sshd.identityFile} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=${sshd.knownHostsFile}`;
    const sshlogin = `${SLOTS}/${sshCommand} ${sshd.user}@127.0.0.1`;
    const droverEnv = {
      ...process.env,
      DROVER_SSH_HOSTS: sshd.address,
      DROVER_SSH_IDENTITY_FILE: sshd.identityFile,
      DROVER_SSH_KNOWN_HOSTS: sshd.knownHostsFile,
      DROVER_SSH_CAPACITY: String(SLOTS),
      // The remote agent's channel (or, on a host without perl, 8 command channels), the SFTP session and the control channel.
      DROVER_SSH_MAX_CHANNELS: String(SLOTS + 2),
      DROVER_LOG_LEVEL: 'warn',
    };
    const drover = join(root, 'bin/drover.js');
    const floor = join(root, 'bench/ssh-floor.mjs');
    const floorArgs = (nodelay) => [floor, '127.0.0.1', String(sshd.port), sshd.user, sshd.identityFile, String(jobs), String(SLOTS), nodelay, '--', 'true'];
    const cases = {
      'floor: raw ssh2, 1 connection, 8 channels, TCP_NODELAY': () => timed(process.execPath, floorArgs('on')),
      'raw ssh2 as above, without TCP_NODELAY': () => timed(process.execPath, floorArgs('off')),
      // A fresh SSH login per job: a quarter of the jobs, so the case stays within minutes; rates compare.
      'GNU parallel -S -j8': () => timed('sh', ['-c', `seq ${jobs / 4} | parallel -j${SLOTS} -N0 -S "$1" true`, 'sh', sshlogin]).then((s) => s * 4),
      'GNU parallel -S -j8 -M (ControlMaster)': () => timed('sh', ['-c', `seq ${jobs / 4} | parallel -M -j${SLOTS} -N0 -S "$1" true`, 'sh', sshlogin]).then((s) => s * 4),
      'drover\'s SSH transport alone (remove, mkdir, exec, kill, waitGone, remove)': async () => {
        const start = performance.now();
        const transport = new SshTransport({ address: sshd.address, identityFiles: [sshd.identityFile], knownHostsFile: sshd.knownHostsFile, agent: false, maxChannels: SLOTS + 2 });
        try {
          const base = `${await transport.home()}/bench-transport`;
          let next = 0;
          const lane = async (slot) => {
            const dir = `${base}/${slot}`;
            while (next < jobs) {
              next++;
              await transport.remove(dir);
              await transport.mkdir(dir);
              const execution = await transport.exec(['true'], { cwd: dir, env: { PATH: '/usr/bin:/bin' }, cookie: 'bench-transport' });
              execution.stdout.resume();
              execution.stderr.resume();
              const { exitCode } = await execution.exited;
              if (exitCode !== 0) throw new Error(`true exited ${exitCode}`);
              await execution.kill('SIGKILL');
              await execution.waitGone(5000);
              await transport.remove(dir);
            }
          };
          await Promise.all(Array.from({ length: SLOTS }, (_, slot) => lane(slot)));
          await transport.remove(base);
        } finally {
          await transport.close();
        }
        return (performance.now() - start) / 1000;
      },
      'drover worker over SSH (SshHost + process engine)': async () => {
        const dir = join(scratch, 'ssh-queue');
        rmSync(dir, { recursive: true, force: true });
        mkdirSync(dir, { recursive: true });
        const start = performance.now();
        const queue = SqliteQueue.open({ dir });
        for (let i = 0; i < jobs; i++) await queue.submit({ payload: { command: ['true'] }, deadline: Date.now() + 3_600_000, retries: 0 });
        await queue.close();
        await timed(process.execPath, [drover, 'worker', '--once', '--capacity', String(SLOTS)], {
          env: { ...droverEnv, DROVER_QUEUE_DIR: dir, DROVER_WORK_DIR: join(dir, 'work') },
        });
        return (performance.now() - start) / 1000;
      },
      'drover batch --hosts': async () => {
        const sessions = join(scratch, 'ssh-sessions');
        rmSync(sessions, { recursive: true, force: true });
        const start = performance.now();
        const { code, stderr } = await batch(drover, ['batch', '--hosts', sshd.address, '--split', '8', '--sessions', sessions, '--', 'true'], jobs, droverEnv);
        if (code === 2) throw Object.assign(new Error(`not available: \`drover batch --hosts\` exits 2 (${stderr.trim().split('\n').pop()})`), { unavailable: true });
        if (code !== 0) throw new Error(`drover batch --hosts exited ${code}: ${stderr.trim().slice(-300)}`);
        return (performance.now() - start) / 1000;
      },
    };
    const measured = {};
    for (const [name, run] of Object.entries(cases)) {
      progress(name);
      try {
        measured[name] = summary((await repeat(reps, run)).map((seconds) => jobs / seconds));
      } catch (error) {
        measured[name] = { error };
        progress(`${name}: ${firstLine(error)}`);
      }
    }
    const [floorName] = Object.keys(cases);
    const floorRate = measured[floorName].median;
    const parallelRate = measured['GNU parallel -S -j8'].median;
    const rows = Object.entries(measured).map(([name, s]) => s.error
      ? { name: `${name}: ${s.error.unavailable ? 'not available' : 'not measured'}`, median: NaN, min: NaN, max: NaN, ratio: NaN, extra: firstLine(s.error) }
      : { name, ...s, ratio: s.median / floorRate, extra: `${(1000 / s.median).toFixed(2)} ms; ${(s.median / parallelRate).toFixed(1)}x GNU parallel -S -j8` });
    const batchRate = measured['drover batch --hosts'];
    const targets = batchRate.error
      ? [{ text: 'drover batch reaches at least 2/3 of the raw ssh2 pooled floor, and at least 30x GNU parallel -S -j8', met: false, measured: firstLine(batchRate.error) }]
      : [
          { text: 'drover batch reaches at least 2/3 of the raw ssh2 pooled floor', met: batchRate.median / floorRate >= 2 / 3, measured: `${(batchRate.median / floorRate).toFixed(2)} of the floor` },
          { text: 'and at least 30x GNU parallel -S -j8', met: batchRate.median / parallelRate >= 30, measured: `${(batchRate.median / parallelRate).toFixed(1)}x` },
        ];
    return [{
      title: `SSH: ${jobs} trivial jobs on a loopback sshd, 8 slots`,
      description: `${jobs} runs of \`true\` on the suite's own sshd on 127.0.0.1 (OpenSSH, a throw-away user whose login shell is /bin/sh), 8 at a time. Every case's time includes starting its program and connecting. `
        + 'Floor: raw ssh2 in a minimal Node program (bench/ssh-floor.mjs), one persistent connection, 8 concurrent exec channels, TCP_NODELAY on; then the same with Nagle\'s algorithm on. '
        + `GNU parallel: \`seq ${jobs / 4} | parallel -j8 -N0 -S "8/ssh -p PORT -i KEY ... user@127.0.0.1" true\`, with and without \`-M\` (ControlMaster): a quarter of the jobs, as each is a new SSH login (or channel, with -M), so that the case stays within minutes. `
        + 'drover\'s SSH transport alone: in the benchmark\'s own process, per job what the runtime asks of it (remove and mkdir of a task directory, exec of `true` through the remote agent, kill, waitGone, remove), 8 at a time. '
        + `drover worker over SSH: the jobs submitted to the embedded queue, then \`drover worker --once --capacity 8\` with the sshd as its one SSH host (${SLOTS} slots), through the process engine (task directory, remote agent, live log, cleanup). `
        + 'drover batch --hosts: `seq N | drover batch --hosts user@127.0.0.1:PORT --split 8 -- true`, with the same SSH settings in the environment.',
      unit: 'jobs/s',
      extraHeader: 'per job; against GNU parallel',
      rows,
      targets,
    }];
  } finally {
    await sshd.stop();
  }
}

/** Runs `drover batch` with `seq 1..jobs` on its stdin; resolves with its exit code and stderr. */
function batch(drover, args, jobs, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [drover, ...args], { env, stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stderr }));
    child.stdin.on('error', () => {}); // it may exit before reading its input
    child.stdin.end(Array.from({ length: jobs }, (_, i) => `${i + 1}\n`).join(''));
  });
}

function firstLine(error) {
  return String(error?.message ?? error).split('\n')[0];
}

let started = performance.now();
function progress(line) {
  process.stderr.write(`bench ssh [${((performance.now() - started) / 1000).toFixed(0)} s]: ${line}\n`);
}
