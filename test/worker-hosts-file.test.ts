/**
 * Regression: a worker given a hosts file (--ssh-hosts-file) with a bad
 * address names the file and line of every bad one, and exits 2 at once.
 * It used to say only `SSH address "me@b1:70000": port must be 1-65535`,
 * and on PostgreSQL it then hung for about 30 s: the queue it had opened
 * was not closed on this path.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { parseHostsFile } from '../src/hosts/ssh-host.js';
import { EXIT } from '../src/cli/exit-codes.js';
import { drover } from './helpers/drover.js';
import { freshSchema, PG_URL } from './helpers/postgres.js';

const HOSTS = 'me@b1:22 capacity=2\nme@b1:70000\n# a comment\nnot@valid@x labels=a\nme@b2\n';

t.test('parseHostsFile names the file and line of every bad address, at once', async (t) => {
  const file = join(t.testdir({}), 'hosts');
  writeFileSync(file, HOSTS);
  t.throws(() => parseHostsFile(file), {
    code: 'DROVER_CONFIG',
    message: `hosts file "${file}" line 2: SSH address "me@b1:70000": port must be 1-65535\nhosts file "${file}" line 4: SSH address "not@valid@x": expected [user@]name[:port]`,
  });
  writeFileSync(file, 'me@b1:22 capacity=2\n[::1]:2222\n');
  t.same(parseHostsFile(file), [{ address: 'me@b1:22', capacity: 2 }, { address: '[::1]:2222' }], 'good addresses pass');
});

for (const queue of ['sqlite', 'postgres'] as const) {
  t.test(`worker --ssh-hosts-file with a bad address (${queue} queue): exit 2 at once, naming the file and line`, async (t) => {
    const cwd = t.testdir({ hosts: HOSTS });
    const flags = queue === 'postgres' ? ['--queue', PG_URL, '--queue-schema', freshSchema(t)] : [];
    const started = Date.now();
    const result = await drover(['worker', ...flags, '--ssh-hosts-file', 'hosts'], { cwd, timeoutMs: 60_000 });
    const took = Date.now() - started;
    t.equal(result.code, EXIT.CONFIG, result.stderr);
    t.match(result.stderr, 'hosts file "hosts" line 2: SSH address "me@b1:70000": port must be 1-65535');
    t.match(result.stderr, 'hosts file "hosts" line 4: SSH address "not@valid@x": expected [user@]name[:port]');
    t.ok(took < 10_000, `the worker exited ${took} ms after it started (the queue is closed, nothing keeps it alive)`);
  });
}
