/** What every transport's `list` and `realpath` must do, checked on a prepared directory. */
import type { Test } from 'tap';
import type { Transport } from '../../src/hosts/transport.js';

/** The shell command that lays out `dir` for checkListing. */
export const LISTING_LAYOUT = (dir: string) => `mkdir -p '${dir}/a' && echo x > '${dir}/a/f.txt' && echo y > '${dir}/file.txt' && ln -s a '${dir}/link' && ln -s gone '${dir}/dangling'`;

export async function checkListing(t: Test, transport: Transport, dir: string): Promise<void> {
  const entries = (await transport.list(dir)).sort((a, b) => a.name.localeCompare(b.name));
  t.same(entries, [
    { name: 'a', type: 'directory' },
    { name: 'dangling', type: 'symlink' },
    { name: 'file.txt', type: 'file' },
    { name: 'link', type: 'symlink' },
  ], 'entries with their own types: symlinks are not followed');
  const real = await transport.realpath(dir);
  t.equal(await transport.realpath(transport.join(dir, 'link', 'f.txt')), transport.join(real, 'a', 'f.txt'), 'realpath follows links');
  await t.rejects(transport.realpath(transport.join(dir, 'dangling')), { code: 'ENOENT' }, 'a dangling link');
  await t.rejects(transport.realpath(transport.join(dir, 'missing')), { code: 'ENOENT' }, 'a missing last part');
  await t.rejects(transport.list(transport.join(dir, 'nothing')), { code: 'ENOENT' }, 'listing a missing directory');
}
