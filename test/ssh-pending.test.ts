/**
 * The SSH transport's deferred removals and directories (ssh-pending.ts):
 * applying the pending set at once, removals then directories, must leave
 * the file system as the calls one by one would have, whatever the order of
 * calls, and also when a set taken to be applied is put back (its command
 * never ran) while more calls came.
 */
import t from 'tap';
import { PendingChanges, covers, normalizePath, type Changes } from '../src/hosts/ssh-pending.js';

/** A file system of directories only: what `rm -rf` and `mkdir -p` do to it. */
class Tree {
  readonly dirs = new Set<string>();
  remove(path: string): void {
    for (const dir of [...this.dirs]) if (covers(path, dir)) this.dirs.delete(dir);
  }
  mkdir(path: string): void {
    for (let dir = path; dir !== '/'; dir = dir.slice(0, dir.lastIndexOf('/')) || '/') this.dirs.add(dir);
  }
  apply(changes: Changes): void {
    for (const removal of changes.removals) this.remove(removal);
    for (const dir of changes.dirs) this.mkdir(dir);
  }
  key(): string {
    return [...this.dirs].sort().join(' ');
  }
}

const PATHS = ['/w', '/w/a', '/w/a/b', '/w/a/c', '/w/d', '/x'];

/** A small deterministic generator, so a failure names its seed. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state * 1664525 + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

t.test('applying the pending set at once equals the calls in order (10,000 random sequences)', async (t) => {
  let failures = 0;
  for (let seed = 1; seed <= 10_000 && failures < 3; seed++) {
    const next = random(seed);
    const pick = () => PATHS[Math.floor(next() * PATHS.length)]!;
    const sequential = new Tree();
    const remote = new Tree();
    const pending = new PendingChanges();
    // A set taken to be applied, not yet known to have been.
    let inFlight: Changes | undefined;
    const land = (applied: boolean) => {
      if (inFlight === undefined) return;
      if (applied) remote.apply(inFlight);
      else pending.restore(inFlight);
      inFlight = undefined;
    };
    const trace: string[] = [];
    for (let step = 0; step < 12; step++) {
      const roll = next();
      const path = pick();
      if (roll < 0.4) {
        trace.push(`remove ${path}`);
        sequential.remove(path);
        pending.remove(path);
      } else if (roll < 0.8) {
        trace.push(`mkdir ${path}`);
        sequential.mkdir(path);
        if (!pending.mkdir(path)) {
          // Made at once, after what was asked before it has landed.
          land(next() < 0.5);
          remote.apply(pending.take());
          remote.mkdir(path);
        }
      } else if (inFlight === undefined) {
        trace.push('take');
        inFlight = pending.take();
      } else {
        const applied = next() < 0.5;
        trace.push(applied ? 'applied' : 'put back');
        land(applied);
      }
    }
    land(next() < 0.5);
    remote.apply(pending.take());
    if (remote.key() !== sequential.key()) {
      failures++;
      t.fail(`seed ${seed}: ${trace.join(', ')}: got [${remote.key()}], calls in order give [${sequential.key()}]`);
    }
  }
  t.equal(failures, 0);
});

t.test('numbers: the oldest pending change, kept when a set is put back', async (t) => {
  const pending = new PendingChanges();
  t.equal(pending.oldest, Infinity);
  pending.remove('/w/a');
  t.equal(pending.mkdir('/w/a'), true, 'a directory a pending removal covers waits');
  t.equal(pending.mkdir('/y'), false, 'any other is made by the caller');
  t.equal(pending.count, 2);
  const taken = pending.take();
  t.same(taken, { removals: ['/w/a'], dirs: ['/w/a'], oldest: 1 });
  t.ok(pending.empty);
  pending.remove('/w/b');
  t.equal(pending.oldest, 3);
  pending.restore(taken);
  t.equal(pending.oldest, 1, 'put back, they are the oldest again');
  t.equal(pending.count, 3, 'and no new numbers were given out');
  t.same(pending.take(), { removals: ['/w/a', '/w/b'], dirs: ['/w/a'], oldest: 1 });
});

t.test('paths compare normalized', async (t) => {
  t.equal(normalizePath('/w/a/'), '/w/a');
  t.equal(normalizePath('/w//a/./b/..'), '/w/a');
  t.equal(normalizePath('/'), '/');
  t.ok(covers('/w', '/w/a'));
  t.notOk(covers('/w', '/wa'), 'a sibling with the same prefix is not under it');
  t.ok(covers('/', '/w'));
  const pending = new PendingChanges();
  pending.remove('/w/a');
  pending.remove('/w');
  t.same(pending.take().removals, ['/w'], 'a removal covers the ones under it');
});
