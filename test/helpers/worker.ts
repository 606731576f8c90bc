/** A worker in the test's own process (runtime startWorker), with test defaults, shut down and its queue closed at teardown. */
import { join } from 'node:path';
import { ProcessEngine } from '../../src/engines/process.js';
import type { Host } from '../../src/hosts/host.js';
import { HardwareHost } from '../../src/hosts/local.js';
import { livelogPlugin } from '../../src/plugins/livelog.js';
import type { Plugin } from '../../src/plugins/plugin.js';
import { SqliteQueue } from '../../src/queues/sqlite.js';
import { createLogger, type Logger } from '../../src/runtime/logger.js';
import { startWorker, type Worker, type WorkerOptions } from '../../src/runtime/worker.js';

interface Teardown {
  teardown(fn: () => unknown): void;
}

export type InProcessWorkerOptions = Pick<WorkerOptions, 'workerId' | 'queue' | 'host' | 'engine' | 'plugins' | 'workDir' | 'logger'> & Partial<WorkerOptions>;

export function inProcessWorker(t: Teardown, options: InProcessWorkerOptions): Worker {
  const worker = startWorker({ capacity: 1, maxTasks: 0, once: false, idleTimeoutMs: 0, shutdownGraceMs: 2000, pollWaitMs: 500, ...options });
  t.teardown(async () => {
    worker.shutdown({ kind: 'signal', signal: 'SIGTERM' });
    await worker.stopped;
    await options.queue.close();
  });
  return worker;
}

/**
 * A worker of local commands (the process engine; livelog after `plugins`) on an embedded queue in `dir`,
 * on `host` (this machine by default); with its queue and host.
 */
export function localWorker<H extends Host = HardwareHost>(
  t: Teardown,
  dir: string,
  options: { readonly host?: H; readonly logger?: Logger; readonly plugins?: readonly Plugin[]; readonly workerId?: string; readonly pollWaitMs?: number; readonly claimTimeoutMs?: number } = {},
): { worker: Worker; queue: SqliteQueue; host: H } {
  const queue = SqliteQueue.open({ dir: join(dir, 'queue'), claimTimeoutMs: options.claimTimeoutMs ?? 10_000, pollIntervalMs: 50 });
  const host = options.host ?? (new HardwareHost({ workDir: join(dir, 'work') }) as Host as H);
  const worker = inProcessWorker(t, {
    workerId: options.workerId ?? 'local-worker',
    queue,
    host,
    engine: new ProcessEngine({ killGraceMs: 200 }),
    plugins: [...(options.plugins ?? []), livelogPlugin()],
    workDir: join(dir, 'work'),
    logger: options.logger ?? createLogger({ level: 'info', write: () => {} }),
    ...(options.pollWaitMs === undefined ? {} : { pollWaitMs: options.pollWaitMs }),
  });
  return { worker, queue, host };
}
