/**
 * Named caches on this machine's disk, kept between tasks and lent to one
 * task at a time.
 *
 * A cache is a directory `<root>/<cacheName>/<instance>`. Lending renames
 * the instance into the task directory, and giving it back renames it home:
 * both are cheap (one rename on one filesystem, whatever the size) and
 * atomic, so the directory tree itself says which instances are idle, and
 * no instance can be lent twice at once, not even by two worker processes
 * that share a work directory: the second rename finds nothing and moves on.
 * When every instance of a name is lent, the task gets a fresh empty one, as
 * with Taskcluster's workers, and it joins the others when it comes back.
 *
 * An idle instance's mtime is when it was last given back, so the least
 * recently used one is evicted first, also after a worker restart. An
 * instance that cannot be given back whole is dropped, never half-kept; one
 * being evicted is first renamed out of sight (`.evicting-*`) so that a
 * crash mid-removal leaves nothing that looks like a cache.
 */
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, realpath, rename, rm, stat, utimes } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** What a cache name may be: it is a directory name under the cache root. */
export const CACHE_NAME_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$';
const CACHE_NAME = new RegExp(CACHE_NAME_PATTERN);
const INSTANCE = /^[0-9a-f]{12}$/;
const EVICTING = '.evicting-';

/** One cache instance lent to a task. */
export interface Loan {
  readonly cacheName: string;
  readonly instance: string;
  /** Where it is lent: a directory inside the task directory. */
  readonly path: string;
  /** No idle instance was there: this one started empty. */
  readonly fresh: boolean;
  /** The real path of `path`'s parent when it was lent; the cache goes home only from there. */
  readonly parent: string;
}

/** An instance that is not lent. */
export interface IdleCache {
  readonly cacheName: string;
  readonly instance: string;
  readonly path: string;
  /** When it was last given back (ms since the epoch). */
  readonly lastUsed: number;
}

export class CacheStore {
  readonly root: string;
  /** Give-back times, strictly increasing within this process so that LRU order has no ties. */
  #lastStamp = 0;

  constructor(root: string) {
    this.root = root;
  }

  /** Makes the root and removes what interrupted evictions left. */
  async open(): Promise<void> {
    await mkdir(this.root, { recursive: true });
    for (const name of await readdir(this.root)) {
      if (name.startsWith(EVICTING)) await rm(join(this.root, name), { recursive: true, force: true });
    }
  }

  /**
   * Moves the most recently used idle instance of `cacheName` to `target`,
   * or makes a fresh empty directory there when none is idle. The parent of
   * `target` must exist and `target` must not.
   */
  async lend(cacheName: string, target: string): Promise<Loan> {
    if (!CACHE_NAME.test(cacheName)) throw new Error(`not a cache name: ${JSON.stringify(cacheName)}`);
    const parent = await realpath(dirname(target));
    const idle = (await this.#instances(cacheName)).sort((a, b) => b.lastUsed - a.lastUsed);
    for (const cache of idle) {
      try {
        await rename(cache.path, target);
        return { cacheName, instance: cache.instance, path: target, fresh: false, parent };
      } catch (error) {
        // Lent to another task (or evicted) since the listing: try the next one.
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      }
    }
    await mkdir(target);
    return { cacheName, instance: randomBytes(6).toString('hex'), path: target, fresh: true, parent };
  }

  /**
   * Renames a lent instance home and marks it used now. It is dropped
   * instead (left in the task directory, which is removed after the run,
   * and the reason returned) when it is no longer the
   * directory that was lent (the task removed it or put a symlink in its
   * place or its parent's) or the rename fails.
   */
  async giveBack(loan: Loan): Promise<{ readonly kept: true } | { readonly kept: false; readonly reason: string }> {
    const home = join(this.root, loan.cacheName, loan.instance);
    try {
      const found = await lstat(loan.path).catch(() => undefined);
      if (found === undefined) return { kept: false, reason: `${loan.path} is gone` };
      if (!found.isDirectory() || (await realpath(dirname(loan.path))) !== loan.parent) {
        throw new Error(`${loan.path} is no longer the directory that was lent`);
      }
      await mkdir(dirname(home), { recursive: true });
      await rename(loan.path, home);
    } catch (error) {
      // Left where it is: the task directory goes, and the cache with it. (Not removed here:
      // the path may lead out of the task directory now.)
      return { kept: false, reason: (error as Error).message };
    }
    this.#lastStamp = Math.max(Date.now(), this.#lastStamp + 1);
    const seconds = this.#lastStamp / 1000;
    // Without the stamp it is still a whole cache, only older in the LRU order.
    await utimes(home, seconds, seconds).catch(() => {});
    return { kept: true };
  }

  /** Every idle instance, least recently used first. */
  async idle(): Promise<IdleCache[]> {
    const names = (await readdir(this.root).catch(() => [] as string[])).filter((name) => CACHE_NAME.test(name));
    const all = (await Promise.all(names.map((name) => this.#instances(name)))).flat();
    return all.sort((a, b) => a.lastUsed - b.lastUsed || a.path.localeCompare(b.path));
  }

  /** Removes an idle instance; false when it was lent meanwhile (nothing is removed then). */
  async evict(cache: IdleCache): Promise<boolean> {
    const aside = join(this.root, `${EVICTING}${randomBytes(6).toString('hex')}`);
    try {
      await rename(cache.path, aside);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw error;
    }
    await rm(aside, { recursive: true, force: true });
    return true;
  }

  async #instances(cacheName: string): Promise<IdleCache[]> {
    const dir = join(this.root, cacheName);
    const names = (await readdir(dir).catch(() => [] as string[])).filter((name) => INSTANCE.test(name));
    const found = await Promise.all(names.map(async (instance) => {
      const path = join(dir, instance);
      // Gone since the listing: lent or evicted.
      const stats = await stat(path).catch(() => undefined);
      return stats?.isDirectory() ? [{ cacheName, instance, path, lastUsed: stats.mtimeMs }] : [];
    }));
    return found.flat();
  }
}
