/** A worker in the test's own process (runtime startWorker), with test defaults, shut down and its queue closed at teardown. */
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
