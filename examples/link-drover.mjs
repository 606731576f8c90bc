// Makes `drover` resolvable from each example, as `npm install` inside it
// would: an example's devDependency `"drover": "file:../.."` becomes the
// symlink node_modules/drover -> the repository root (whose package.json
// `exports` lead to dist/, built by `npm test`'s pretest). No network, no
// install; `npm test` runs this first (package.json `pretest`), so it works
// on a fresh clone after `npm ci`. An example that has drover installed for
// real (a directory, not our link) is left alone.
import { lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const examples = dirname(fileURLToPath(import.meta.url));

for (const name of readdirSync(examples)) {
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(join(examples, name, 'package.json'), 'utf8'));
  } catch {
    continue; // not an example package
  }
  const spec = manifest.devDependencies?.drover ?? '';
  if (!spec.startsWith('file:')) continue;
  const link = join(examples, name, 'node_modules', 'drover');
  const target = relative(dirname(link), resolve(examples, name, spec.slice('file:'.length)));
  let existing;
  try {
    existing = lstatSync(link);
  } catch {
    existing = undefined;
  }
  if (existing?.isSymbolicLink() && readlinkSync(link) === target) continue;
  if (existing !== undefined && !existing.isSymbolicLink()) continue;
  if (existing !== undefined) rmSync(link);
  mkdirSync(dirname(link), { recursive: true });
  symlinkSync(target, link, 'dir');
}
