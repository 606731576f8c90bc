/**
 * The artifacts plugin: files and directories of the task directory stored
 * in the queue after the run, confined to the task directory. Through the
 * real task runner with the process engine (real commands, this machine's
 * transport), then end to end with a worker process and the embedded
 * SQLite queue, read back with `drover artifact`.
 */
import { execSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { text } from 'node:stream/consumers';
import t, { type Test } from 'tap';
import { ProcessEngine } from '../src/engines/process.js';
import { LocalTransport } from '../src/hosts/local.js';
import type { Payload } from '../src/model/task.js';
import { guessContentType } from '../src/plugins/artifacts.js';
import { LIVE_LOG_NAME } from '../src/plugins/livelog.js';
import { startTaskRun, type TaskRun } from '../src/testing/task-run.js';
import { drover, resolved, runOutcomes, startWorker, submit } from './helpers/drover.js';
import { LISTING_LAYOUT, checkListing } from './helpers/transport-listing.js';

const engine = new ProcessEngine({ killGraceMs: 500 });

async function runTask(t: Test, payload: Payload): Promise<{ run: TaskRun; resolution: { state: string; reason?: string; message?: string } }> {
  const run = await startTaskRun({ engine, payload });
  t.teardown(() => run.close());
  const output = await run.output;
  if (output.resolution === undefined) throw new Error(`the run was not reported: ${output.unreported}`);
  return { run, resolution: output.resolution };
}

async function stored(run: TaskRun): Promise<Record<string, { contentType: string; expires?: number; body: string }>> {
  const result: Record<string, { contentType: string; expires?: number; body: string }> = {};
  for (const info of await run.queue.listArtifacts(run.claim)) {
    if (info.name === LIVE_LOG_NAME) continue;
    result[info.name] = {
      contentType: info.contentType,
      ...(info.expires === undefined ? {} : { expires: info.expires }),
      body: await text(await run.queue.readArtifact(run.claim, info.name)),
    };
  }
  return result;
}

const liveLog = async (run: TaskRun) => text(await run.queue.readArtifact(run.claim, LIVE_LOG_NAME));

t.test('content types are guessed from the file name', async (t) => {
  t.equal(guessContentType('report.JSON'), 'application/json');
  t.equal(guessContentType('dir/app.tar.gz'), 'application/gzip');
  t.equal(guessContentType('notes.txt'), 'text/plain; charset=utf-8');
  t.equal(guessContentType('page.html'), 'text/html; charset=utf-8');
  t.equal(guessContentType('shot.png'), 'image/png');
  t.equal(guessContentType('Makefile'), 'application/octet-stream');
  t.equal(guessContentType('blob.bin'), 'application/octet-stream');
});

t.test('the local transport lists directories and resolves symlinks', async (t) => {
  const dir = join(t.testdir({}), 'listing');
  execSync(LISTING_LAYOUT(dir));
  const transport = new LocalTransport();
  await checkListing(t, transport, dir);
  await t.rejects(transport.list(join(dir, 'file.txt')), { code: 'ENOTDIR' });
});

t.test('a file and a directory: every file stored under its name, streamed, with its content type and expiry', async (t) => {
  const { run, resolution } = await runTask(t, {
    command: [
      'echo \'{"ok":true}\' > report.json',
      'mkdir -p out/sub out/empty',
      'echo alpha > out/a.txt',
      'head -c 300000 /dev/zero | tr "\\0" "z" > out/sub/big.bin',
      'ln -s a.txt out/link-to-a',
      'ln -s sub out/link-to-sub',
      'mkfifo out/pipe',
    ].join(' && '),
    artifacts: [
      { type: 'file', path: 'report.json', name: 'public/report.json', expires: '2031-01-02T03:04:05Z' },
      { type: 'directory', path: './out/', name: 'public/out' },
      { type: 'file', path: 'out/a.txt', name: 'private/a', contentType: 'text/x-alpha' },
    ],
  });
  t.same(resolution, { state: 'completed' });
  const artifacts = await stored(run);
  t.same(Object.keys(artifacts).sort(), ['private/a', 'public/out/a.txt', 'public/out/link-to-a', 'public/out/sub/big.bin', 'public/report.json']);
  t.same(artifacts['public/report.json'], { contentType: 'application/json', expires: Date.parse('2031-01-02T03:04:05Z'), body: '{"ok":true}\n' });
  t.same(artifacts['public/out/a.txt'], { contentType: 'text/plain; charset=utf-8', body: 'alpha\n' });
  t.same(artifacts['public/out/link-to-a'], { contentType: 'application/octet-stream', body: 'alpha\n' }, 'a symlink to a file inside is stored as that file');
  t.equal(artifacts['public/out/sub/big.bin']?.body, 'z'.repeat(300_000));
  t.equal(artifacts['private/a']?.contentType, 'text/x-alpha', 'the payload\'s contentType wins');
  const log = await liveLog(run);
  t.match(log, 'artifact "public/out": out/link-to-sub is a symlink to a directory; not followed');
  t.match(log, 'artifact "public/out": out/pipe is not a regular file (a fifo, socket or device); skipped');
  t.match(log, 'stored artifact public/out/sub/big.bin (300000 bytes, application/octet-stream)');
});

t.test('a missing artifact fails the run with a message naming its path; the others are still stored', async (t) => {
  const { run, resolution } = await runTask(t, {
    command: 'echo here > here.txt',
    artifacts: [
      { type: 'file', path: 'nowhere/result.txt', name: 'public/result.txt' },
      { type: 'directory', path: 'no-such-dir', name: 'public/dir' },
      { type: 'file', path: 'here.txt', name: 'public/here.txt' },
    ],
  });
  t.equal(resolution.state, 'failed');
  t.match(resolution.message, 'artifact "public/result.txt": file nowhere/result.txt is missing');
  t.match(resolution.message, 'artifact "public/dir": directory no-such-dir is missing');
  t.same(Object.keys(await stored(run)), ['public/here.txt']);
  t.match(await liveLog(run), 'file nowhere/result.txt is missing');
});

t.test('after a failed command the artifacts are stored too, and the command\'s failure is the message', async (t) => {
  const { run, resolution } = await runTask(t, {
    command: 'echo partial > log.txt; exit 3',
    artifacts: [{ type: 'file', path: 'log.txt', name: 'public/log.txt' }, { type: 'file', path: 'missing.txt', name: 'public/missing.txt' }],
  });
  t.equal(resolution.state, 'failed');
  t.match(resolution.message, /^the command exited with code 3/);
  t.same(await stored(run), { 'public/log.txt': { contentType: 'text/plain; charset=utf-8', body: 'partial\n' } });
});

t.test('after maxRunTime the run fails as before, and what the command left is stored', async (t) => {
  const { run, resolution } = await runTask(t, {
    command: 'echo early > early.txt; sleep 30',
    maxRunTime: 1,
    artifacts: [{ type: 'file', path: 'early.txt', name: 'public/early.txt' }],
  });
  t.same(resolution, { state: 'failed', message: 'maxRunTime of 1 s exceeded' });
  t.same(Object.keys(await stored(run)), ['public/early.txt']);
});

t.test('absolute paths and paths that lead out with .. are malformed-payload, before the command runs', async (t) => {
  const marker = join(t.testdir({}), 'ran');
  const { run, resolution } = await runTask(t, {
    command: ['touch', marker],
    artifacts: [
      { type: 'file', path: '/etc/hostname', name: 'public/a' },
      { type: 'directory', path: 'out/../../..', name: 'public/b' },
      { type: 'file', path: 'ok.txt', name: 'public/../c' },
      { type: 'file', path: 'ok.txt', name: 'public/d', expires: 'next week' },
      { type: 'file', path: 'ok2.txt', name: 'public/d' },
    ],
  });
  t.equal(resolution.state, 'exception');
  t.equal(resolution.reason, 'malformed-payload');
  for (const problem of [
    'payload.artifacts[0].path: "/etc/hostname" is absolute; artifact paths are relative to the task directory',
    'payload.artifacts[1].path: "out/../../.." leads outside the task directory',
    'payload.artifacts[2].name: "public/../c" has an empty, "." or ".." part',
    'payload.artifacts[3].expires: "next week" is not a date-time',
    'payload.artifacts[4].name: "public/d" is the name of an earlier artifact too',
  ]) t.match(resolution.message, problem);
  t.notOk(existsSync(marker), 'the command never ran');
  t.same(await stored(run), {});
});

t.test('symlinks that resolve outside the task directory fail the run; nothing outside is stored', async (t) => {
  const outside = t.testdir({ 'secret.txt': 'outside the task directory' });
  const { run, resolution } = await runTask(t, {
    command: [
      `ln -s ${join(outside, 'secret.txt')} leak.txt`,
      'mkdir d && echo fine > d/ok.txt',
      'ln -s ../../ d/up',
      `ln -s ${outside} d/outdir`,
      `ln -s ${outside} whole`,
    ].join(' && '),
    artifacts: [
      { type: 'file', path: 'leak.txt', name: 'public/leak.txt' },
      { type: 'directory', path: 'd', name: 'public/d' },
      { type: 'directory', path: 'whole', name: 'public/whole' },
      { type: 'file', path: 'whole/secret.txt', name: 'public/secret.txt' },
    ],
  });
  t.equal(resolution.state, 'failed');
  for (const leaking of ['"public/leak.txt": file leak.txt', '"public/d": d/up', '"public/d": d/outdir', '"public/whole": directory whole', '"public/secret.txt": file whole/secret.txt']) {
    t.match(resolution.message, `artifact ${leaking} resolves (through a symlink) outside the task directory`);
  }
  const artifacts = await stored(run);
  t.same(Object.keys(artifacts), ['public/d/ok.txt'], 'only the file inside');
  t.notMatch(JSON.stringify(artifacts), 'outside the task directory');
});

t.test('the wrong type: a directory named as a file, a file named as a directory', async (t) => {
  const { resolution } = await runTask(t, {
    command: 'mkdir adir && echo x > afile',
    artifacts: [{ type: 'file', path: 'adir', name: 'public/adir' }, { type: 'directory', path: 'afile', name: 'public/afile' }],
  });
  t.equal(resolution.state, 'failed');
  t.match(resolution.message, 'artifact "public/adir": file adir is a directory, not a file');
  t.match(resolution.message, 'artifact "public/afile": directory afile is not a directory');
});

t.test('end to end: a worker process and the embedded queue, each case as documented', async (t) => {
  const cwd = t.testdir({});
  // Not a second testdir: tap gives a test one.
  const outside = mkdtempSync(join(tmpdir(), 'drover-outside-'));
  t.teardown(() => rmSync(outside, { recursive: true, force: true }));
  writeFileSync(join(outside, 'secret.txt'), 'outside');
  const worker = startWorker(['--capacity', '2'], { cwd });
  t.teardown(async () => {
    worker.child.kill('SIGKILL');
    await worker.exited;
  });
  const submitYaml = (yaml: string) => submit(['--payload', '-'], { cwd, input: yaml });
  const good = await submitYaml([
    'command: mkdir -p dist/docs && echo app > dist/app.js && echo "# hi" > dist/docs/readme.md && echo done > result.txt',
    'artifacts:',
    '  - { type: file, path: result.txt, name: public/result.txt }',
    '  - { type: directory, path: dist, name: public/dist }',
  ].join('\n'));
  const missing = await submitYaml('command: "true"\nartifacts: [{ type: file, path: build/out.tar.gz, name: public/out.tar.gz }]\n');
  const escape = await submitYaml('command: "true"\nartifacts: [{ type: file, path: ../x, name: public/x }, { type: directory, path: /tmp, name: public/tmp }]\n');
  const symlink = await submitYaml(`command: ln -s ${join(outside, 'secret.txt')} out.txt\nartifacts: [{ type: file, path: out.txt, name: public/out.txt }]\n`);
  const queueDir = join(cwd, '.drover');

  const goodTask = await resolved(queueDir, good);
  t.same(runOutcomes(goodTask), ['completed']);
  t.equal((await drover(['artifact', good, 'public/result.txt'], { cwd })).stdout, 'done\n');
  t.equal((await drover(['artifact', good, 'public/dist/app.js'], { cwd })).stdout, 'app\n');
  t.equal((await drover(['artifact', good, 'public/dist/docs/readme.md'], { cwd })).stdout, '# hi\n');
  const shown = JSON.parse((await drover(['task', good, '--json'], { cwd })).stdout) as { runs: { artifacts: { name: string; contentType: string }[] }[] };
  t.same(shown.runs[0]!.artifacts.map((a) => [a.name, a.contentType]).sort(), [
    ['public/dist/app.js', 'text/javascript; charset=utf-8'],
    ['public/dist/docs/readme.md', 'text/markdown; charset=utf-8'],
    [LIVE_LOG_NAME, 'text/plain; charset=utf-8'],
    ['public/result.txt', 'text/plain; charset=utf-8'],
  ]);

  const missingTask = await resolved(queueDir, missing);
  t.same(runOutcomes(missingTask), ['failed']);
  t.match(missingTask.runs[0]!.message, 'artifact "public/out.tar.gz": file build/out.tar.gz is missing');

  const escapeTask = await resolved(queueDir, escape);
  t.same(runOutcomes(escapeTask), ['exception/malformed-payload']);
  t.match(escapeTask.runs[0]!.message, 'payload.artifacts[0].path: "../x" leads outside the task directory');
  t.match(escapeTask.runs[0]!.message, 'payload.artifacts[1].path: "/tmp" is absolute');

  const symlinkTask = await resolved(queueDir, symlink);
  t.same(runOutcomes(symlinkTask), ['failed']);
  t.match(symlinkTask.runs[0]!.message, 'artifact "public/out.txt": file out.txt resolves (through a symlink) outside the task directory');
  const refused = await drover(['artifact', symlink, 'public/out.txt'], { cwd });
  t.not(refused.code, 0, 'the file outside was not stored');
  t.notMatch(refused.stdout, 'outside');
});
