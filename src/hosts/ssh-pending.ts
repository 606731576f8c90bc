/**
 * Removals and directories that an SSH transport was asked for and has not
 * made yet. Rather than a round trip each (an `rm -rf` command, an SFTP
 * mkdir), the transport applies them all at once in the next command's own
 * channel, before the command starts, or in one control command when
 * another operation needs them (ssh-transport.ts says when).
 *
 * The set is kept so that applying it at once (every removal, `rm -rf`,
 * then every directory, `mkdir -p`) leaves the file system as the calls
 * would have, one by one in their order:
 *
 *  - a removal drops the pending directories at or under its path (the
 *    removal would have taken them away again; what `mkdir -p` made above
 *    the path stays: its parent joins the directories) and the pending
 *    removals under it (it covers them);
 *  - a directory is only kept pending when a pending removal covers it
 *    (`remove(dir)` then `mkdir(dir)`, what the runtime does for every
 *    task directory): then nothing that exists now can make it fail, but a
 *    parent that is not a directory, or a full disk. Any other mkdir is
 *    made at once by the caller.
 *
 * Every change gets a number, in call order, so that an operation can wait
 * for exactly the changes asked for before it began.
 */
import { posix } from 'node:path';

export interface Changes {
  /** Paths to remove (`rm -rf`), none under another. */
  readonly removals: readonly string[];
  /** Directories to make (`mkdir -p`) after the removals. */
  readonly dirs: readonly string[];
  /** The number of the oldest change among them; Infinity when there are none. */
  readonly oldest: number;
}

export const NO_CHANGES: Changes = { removals: [], dirs: [], oldest: Infinity };

/** The path as the pending set compares it: normalized, without a trailing slash. */
export function normalizePath(path: string): string {
  const normalized = posix.normalize(path);
  return normalized.length > 1 && normalized.endsWith('/') ? normalized.slice(0, -1) : normalized;
}

/** Whether `path` is `ancestor` or lies under it (both normalized). */
export function covers(ancestor: string, path: string): boolean {
  if (path === ancestor) return true;
  const prefix = ancestor.endsWith('/') ? ancestor : `${ancestor}/`;
  return path.startsWith(prefix);
}

export class PendingChanges {
  #removals: string[] = [];
  #dirs: string[] = [];
  #oldest = Infinity;
  #count = 0;

  /** How many changes were ever recorded: the number the next one gets is this plus one. */
  get count(): number {
    return this.#count;
  }

  /** The number of the oldest pending change; Infinity when none is pending. */
  get oldest(): number {
    return this.#oldest;
  }

  get empty(): boolean {
    return this.#removals.length === 0 && this.#dirs.length === 0;
  }

  /** Records a removal of `path` (normalized). */
  remove(path: string): void {
    this.#removals = this.#removals.filter((removal) => !covers(path, removal));
    const kept = this.#dirs.filter((dir) => !covers(path, dir));
    // `mkdir -p` of a directory under `path` also made the parents of `path`; those stay.
    const parent = posix.dirname(path);
    if (kept.length < this.#dirs.length && parent !== path && !kept.some((dir) => covers(parent, dir))) kept.push(parent);
    this.#dirs = kept;
    if (!this.#removals.some((removal) => covers(removal, path))) this.#removals.push(path);
    this.#touch();
  }

  /** Records `mkdir -p path` (normalized) when a pending removal covers it, and says whether it did. */
  mkdir(path: string): boolean {
    if (!this.#removals.some((removal) => covers(removal, path))) return false;
    if (!this.#dirs.includes(path)) this.#dirs.push(path);
    this.#touch();
    return true;
  }

  /** Whether a pending removal covers `path`. */
  removes(path: string): boolean {
    return this.#removals.some((removal) => covers(removal, path));
  }

  /** Hands out every pending change and forgets them. */
  take(): Changes {
    if (this.empty) return NO_CHANGES;
    const taken: Changes = { removals: this.#removals, dirs: this.#dirs, oldest: this.#oldest };
    this.#removals = [];
    this.#dirs = [];
    this.#oldest = Infinity;
    return taken;
  }

  /**
   * Takes back changes handed out earlier that may not have been applied
   * (their command never ran, or its connection broke): they go before
   * the ones recorded since, and keep their numbers.
   */
  restore(changes: Changes): void {
    if (changes.removals.length === 0 && changes.dirs.length === 0) return;
    const later = { removals: this.#removals, dirs: this.#dirs };
    const oldest = Math.min(this.#oldest, changes.oldest);
    this.#removals = [...changes.removals];
    this.#dirs = [...changes.dirs];
    // Replaying the later set as "its removals, then its directories" is the same as replaying its calls.
    const count = this.#count;
    for (const removal of later.removals) this.remove(removal);
    for (const dir of later.dirs) {
      // A parent that a removal left (see remove()) need not be covered by one.
      if (!this.mkdir(dir) && !this.#dirs.includes(dir)) this.#dirs.push(dir);
    }
    this.#count = count;
    this.#oldest = oldest;
  }

  #touch(): void {
    this.#count++;
    if (this.#oldest === Infinity) this.#oldest = this.#count;
  }
}
