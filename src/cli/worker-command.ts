/** `drover worker`: the composition of the shipped parts into one worker process, with its signals. */
import { hostname } from 'node:os';
import { resolve as resolvePath } from 'node:path';
import { ProcessEngine } from '../engines/process.js';
import { HardwareHost } from '../hosts/local.js';
import { livelogPlugin } from '../plugins/livelog.js';
import type { Queue } from '../queues/queue.js';
import type { Config } from '../runtime/config.js';
import { createLogger } from '../runtime/logger.js';
import { startWorker } from '../runtime/worker.js';
import { EXIT, exitCodeFor } from './exit-codes.js';

export async function runWorker(config: Config, queue: Queue, once: boolean): Promise<number> {
  const logger = createLogger({ level: config.logLevel, format: config.logFormat });
  const workDir = resolvePath(config.workDir);
  const host = new HardwareHost({ workDir });
  const worker = startWorker({
    workerId: config.workerId || `${hostname()}-${process.pid}`,
    queue,
    host,
    engine: new ProcessEngine({ killSignal: config.engine.killSignal, killGraceMs: config.engine.killGrace * 1000 }),
    plugins: [livelogPlugin()],
    workDir,
    logger,
    capacity: config.capacity,
    maxTasks: config.numberOfTasksToRun,
    once,
    idleTimeoutMs: config.idleTimeout * 1000,
    shutdownGraceMs: config.shutdownGrace * 1000,
    pollWaitMs: config.pollWait * 1000,
  });
  // Shutdown has a hard deadline: the grace period, then time for aborted tasks to report.
  let deadline: NodeJS.Timeout | undefined;
  const onSignal = (signal: NodeJS.Signals) => {
    logger.info(deadline === undefined ? 'shutting down gracefully; send the signal again to abort tasks now' : 'aborting running tasks', { signal });
    deadline ??= setTimeout(() => {
      logger.error('shutdown did not finish within its deadline; exiting', { state: worker.state() });
      process.exit(EXIT.INTERNAL);
    }, (config.shutdownGrace + config.queue.claimTimeout + 10) * 1000).unref();
    worker.shutdown({ kind: 'signal', signal });
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  host.shutdown.addEventListener('abort', () => worker.shutdown({ kind: 'host', message: String(host.shutdown.reason) }));
  try {
    const { reason } = await worker.stopped;
    const code = exitCodeFor(reason);
    logger.info('worker stopped', { reason: reason.kind, ...('message' in reason ? { message: reason.message } : {}), exitCode: code });
    return code;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    clearTimeout(deadline);
    await queue.close();
  }
}
