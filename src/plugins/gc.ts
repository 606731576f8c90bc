/**
 * gc: named caches that outlive tasks, and the free disk space they need,
 * the way Taskcluster's generic-worker keeps them.
 *
 * Payload `mounts: [{ cacheName, directory }]`: each named cache is lent
 * to the task at `directory` (relative to the task directory, confined to
 * it) before the command starts, and given back after the run (dispose),
 * whatever its end. A cache is lent to one task at a time; a task that asks
 * for a cache whose every instance is lent gets a fresh empty one (see
 * CacheStore). A cache that cannot be given back whole is dropped, and the
 * caches of a run whose exit code is in `onExitStatus.purgeCaches` are
 * purged (`purgeCaches`, the success plugin's callback).
 *
 * Before each claim (`beforeClaim`) the free space of the work directory
 * (statfs) is checked against `requiredDiskSpaceMegabytes`. When it falls
 * short, old task directories that no running task owns are removed (as
 * generic-worker does first: nobody reads them), then idle caches, least
 * recently used first, until it fits. When nothing is left to remove, the
 * plugin returns the reason, and the worker claims nothing until space is
 * back: tasks wait in the queue instead of failing for want of disk.
 *
 * Caches live in `<workDir>/caches`, beside `<workDir>/tasks`, so lending
 * is a rename on one filesystem. Tasks that run on other machines (SSH
 * hosts) get no caches: a payload with `mounts` is refused as
 * malformed-payload, and the local disk is not watched.
 */
import { lstat, mkdir, readdir, realpath, rm, statfs } from 'node:fs/promises';
import { dirname, isAbsolute, join, posix, resolve, sep } from 'node:path';
import { CrashJournal, ownerMayLive } from '../hosts/journal.js';
import { bootId } from '../hosts/proc.js';
import { MalformedPayloadError, errorMessage, type PayloadProblem } from '../model/errors.js';
import { runKey, type Payload } from '../model/task.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import { CACHE_NAME_PATTERN, CacheStore, type Loan } from './caches.js';
import type { BuildSandboxContext, Plugin, PluginWorkerOptions, TaskPlugin, TaskPluginOptions } from './plugin.js';

const MB = 2 ** 20;

export interface GcPluginOptions {
  /** The worker's work directory on this machine: caches go in `caches/`, task directories are in `tasks/`. */
  readonly workDir: string;
  /** Free space the work directory's filesystem must have before each claim; 0 turns the check off. */
  readonly requiredDiskSpaceMegabytes: number;
  /** Free bytes of the filesystem that holds `path`; default statfs (blocks available to this user). */
  readonly freeBytes?: (path: string) => Promise<number>;
  /** Tasks run on other machines (SSH): `mounts` are refused and the local disk is not watched. */
  readonly remote?: boolean;
}

export interface GcPlugin extends Plugin {
  /** Purges, instead of giving back, the caches the run has borrowed: the success plugin's `purgeCaches`. */
  purgeCaches(options: TaskPluginOptions, exitCode: number): void;
}

interface Mount {
  readonly cacheName: string;
  readonly directory: string;
}

interface Borrowing {
  readonly loans: Loan[];
  purge: boolean;
}

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    mounts: {
      description: 'Named caches kept between tasks on this worker and lent to one task at a time.',
      type: 'array',
      items: {
        type: 'object',
        additionalProperties: false,
        required: ['cacheName', 'directory'],
        properties: {
          cacheName: { type: 'string', pattern: CACHE_NAME_PATTERN, description: 'Name of the cache: letters, digits, `.`, `_` and `-`.' },
          directory: { type: 'string', minLength: 1, description: 'Where the cache appears, relative to the task directory.' },
        },
      },
    },
  },
};

export function gcPlugin(options: GcPluginOptions): GcPlugin {
  const workDir = resolve(options.workDir);
  const store = new CacheStore(join(workDir, 'caches'));
  const tasksDir = join(workDir, 'tasks');
  const freeBytes = options.freeBytes ?? statfsFreeBytes;
  /** The caches each run of this worker has borrowed, by run key, from newTask to dispose. */
  const borrowings = new Map<string, Borrowing>();

  /** Task directories no running task owns, oldest first: this worker's by its runs, another live worker's by its journal entries. */
  const leftoverTaskDirs = async (): Promise<string[]> => {
    const names = await readdir(tasksDir).catch(() => [] as string[]);
    const boot = bootId();
    const othersLive = new Set(
      new CrashJournal(join(workDir, 'journal'))
        .list()
        // A worker on another machine (a shared work directory) may be alive too: its directories are not ours to take.
        .filter((entry) => entry.owner.pid !== process.pid && ownerMayLive(entry.owner, boot))
        .flatMap((entry) => (entry.taskDir === undefined ? [] : [resolve(entry.taskDir)])),
    );
    const found = await Promise.all(names.map(async (name) => {
      const path = join(tasksDir, name);
      // The runtime names a run's directory `<taskId>-<runId>`.
      const [taskId, runId] = [name.slice(0, name.lastIndexOf('-')), name.slice(name.lastIndexOf('-') + 1)];
      if (borrowings.has(`${taskId}/${runId}`) || othersLive.has(path)) return [];
      const stats = await lstat(path).catch(() => undefined);
      return stats === undefined ? [] : [{ path, mtime: stats.mtimeMs }];
    }));
    return found.flat().sort((a, b) => a.mtime - b.mtime).map(({ path }) => path);
  };

  return {
    name: 'gc',
    payloadSchema: PAYLOAD_SCHEMA,

    async boot({ logger }: PluginWorkerOptions): Promise<void> {
      if (options.remote) return;
      await store.open();
      logger.info('gc: caches kept', { cachesDir: store.root, requiredDiskSpaceMegabytes: options.requiredDiskSpaceMegabytes });
    },

    async beforeClaim({ logger }: PluginWorkerOptions): Promise<string | undefined> {
      if (options.remote || options.requiredDiskSpaceMegabytes <= 0) return undefined;
      const required = options.requiredDiskSpaceMegabytes * MB;
      let free = await freeBytes(workDir);
      if (free >= required) return undefined;
      // One directory that cannot be removed does not stop the others from going.
      const cannotRemove = (what: string, data: Record<string, unknown>) => (error: unknown) => {
        logger.warn(`gc: cannot remove ${what}`, { ...data, error: errorMessage(error) });
        return false;
      };
      for (const taskDir of await leftoverTaskDirs()) {
        if (!(await rm(taskDir, { recursive: true, force: true }).then(() => true, cannotRemove('an old task directory', { taskDir })))) continue;
        free = await freeBytes(workDir);
        logger.info('gc: removed an old task directory', { taskDir, freeMegabytes: megabytes(free) });
        if (free >= required) return undefined;
      }
      for (const cache of await store.idle()) {
        if (!(await store.evict(cache).catch(cannotRemove('an idle cache', { cacheName: cache.cacheName })))) continue;
        free = await freeBytes(workDir);
        logger.info('gc: evicted the least recently used idle cache', {
          cacheName: cache.cacheName,
          lastUsed: new Date(cache.lastUsed).toISOString(),
          freeMegabytes: megabytes(free),
        });
        if (free >= required) return undefined;
      }
      return `${megabytes(free)} MB free in ${workDir}, below requiredDiskSpaceMegabytes (${options.requiredDiskSpaceMegabytes} MB), ` +
        'and no idle cache or old task directory is left to remove';
    },

    purgeCaches(taskOptions: TaskPluginOptions, exitCode: number): void {
      const borrowing = borrowings.get(runKey(taskOptions.claim));
      const names = borrowing?.loans.map((loan) => loan.cacheName) ?? [];
      if (borrowing === undefined || names.length === 0) {
        taskOptions.log.line(`exit code ${exitCode} is in onExitStatus.purgeCaches, but the task used no caches`);
        return;
      }
      borrowing.purge = true;
      taskOptions.log.line(`exit code ${exitCode} is in onExitStatus.purgeCaches: cache${names.length === 1 ? '' : 's'} ${names.join(', ')} will be purged`);
    },

    newTask(taskOptions: TaskPluginOptions): TaskPlugin {
      const { claim, log, logger } = taskOptions;
      const key = runKey(claim);
      const borrowing: Borrowing = { loans: [], purge: false };
      borrowings.set(key, borrowing);
      let mounts: readonly Mount[] = [];
      return {
        async prepare(): Promise<void> {
          mounts = readMounts(claim.payload);
          if (mounts.length > 0 && options.remote) {
            throw new MalformedPayloadError([{ path: 'payload.mounts', message: 'caches are kept only on the worker\'s own machine, and this worker runs tasks over SSH' }]);
          }
        },

        async buildSandbox(_builder, { taskDir }: BuildSandboxContext): Promise<void> {
          if (mounts.length === 0) return;
          const realTaskDir = await realpath(taskDir);
          for (const [i, mount] of mounts.entries()) {
            const target = join(taskDir, mount.directory);
            const at = `payload.mounts[${i}].directory`;
            // The engine may have put files (a symlink) here: what exists of the way must stay inside.
            let existing = dirname(target);
            while (!(await lstat(existing).then(() => true, () => false))) existing = dirname(existing);
            const inside = await realpath(existing);
            if (inside !== realTaskDir && !inside.startsWith(realTaskDir + sep)) {
              throw new MalformedPayloadError([{ path: at, message: `${mount.directory} leads out of the task directory` }]);
            }
            await mkdir(dirname(target), { recursive: true });
            if (await lstat(target).then(() => true, () => false)) {
              throw new MalformedPayloadError([{ path: at, message: `${mount.directory} already exists in the task directory` }]);
            }
            const loan = await store.lend(mount.cacheName, target);
            borrowing.loans.push(loan);
            log.line(`cache ${mount.cacheName} at ${mount.directory}: ${loan.fresh ? 'a new, empty one' : 'kept from an earlier task'}`);
          }
        },

        async dispose(): Promise<void> {
          try {
            for (const loan of [...borrowing.loans].reverse()) {
              if (borrowing.purge) {
                logger.info('gc: cache purged', { cacheName: loan.cacheName });
                continue;
              }
              const back = await store.giveBack(loan);
              if (!back.kept) logger.warn('gc: cache dropped: it could not be given back whole', { cacheName: loan.cacheName, reason: back.reason });
            }
          } finally {
            borrowings.delete(key);
          }
        },
      };
    },
  };
}

/** The payload's mounts, checked beyond the schema: confined to the task directory, one cache and one place each. */
function readMounts(payload: Payload): Mount[] {
  // The payload was validated against PAYLOAD_SCHEMA before prepare.
  const mounts = (payload['mounts'] ?? []) as Mount[];
  const problems: PayloadProblem[] = [];
  const seen: { name: string; directory: string }[] = [];
  const result = mounts.map((mount, i) => {
    const directory = posix.normalize(mount.directory).replace(/\/+$/, '');
    const at = `payload.mounts[${i}]`;
    if (isAbsolute(mount.directory) || directory === '..' || directory.startsWith('../')) {
      problems.push({ path: `${at}.directory`, message: `${mount.directory} is not inside the task directory (give a relative path without ..)` });
    } else if (directory === '.' || directory === '') {
      problems.push({ path: `${at}.directory`, message: 'a cache cannot be the task directory itself' });
    } else {
      const clash = seen.find((other) => other.directory === directory || directory.startsWith(other.directory + '/') || other.directory.startsWith(directory + '/'));
      if (clash !== undefined) problems.push({ path: `${at}.directory`, message: `${mount.directory} overlaps the directory of cache ${clash.name}` });
    }
    if (seen.some((other) => other.name === mount.cacheName)) {
      problems.push({ path: `${at}.cacheName`, message: `cache ${mount.cacheName} is mounted twice; a cache is lent to one place at a time` });
    }
    seen.push({ name: mount.cacheName, directory });
    return { cacheName: mount.cacheName, directory };
  });
  if (problems.length > 0) throw new MalformedPayloadError(problems);
  return result;
}

async function statfsFreeBytes(path: string): Promise<number> {
  const stats = await statfs(path);
  return stats.bavail * stats.bsize;
}

function megabytes(bytes: number): string {
  return (bytes / MB).toFixed(1);
}
