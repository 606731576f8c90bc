/**
 * livelog: streams the run's log to the queue as `public/logs/live.log`
 * while the task runs (so `drover logs -f` can follow it), and completes it
 * before the resolution is reported. The upload starts when the plugin is
 * created, so the log exists on every path, also for a payload that is
 * refused; on cancel or claim loss the stream is closed in `dispose` with
 * what it had.
 */
import type { Plugin, TaskPlugin, TaskPluginOptions } from './plugin.js';

export const LIVE_LOG_NAME = 'public/logs/live.log';

export function livelogPlugin(): Plugin {
  return {
    name: 'livelog',
    newTask(options: TaskPluginOptions): TaskPlugin {
      const { queue, claim, workerId, log, logger } = options;
      // Settles to the upload's error, if any, so no rejection waits unhandled until the run ends.
      const failure = queue
        .uploadArtifact(claim, workerId, { name: LIVE_LOG_NAME, contentType: 'text/plain; charset=utf-8' }, log.stream)
        .then(
          () => undefined,
          (error: unknown) => {
            // Without an upload nobody reads the stream: drain it so the run does not stall on a full buffer.
            log.stream.resume();
            return error;
          },
        );
      const finish = async () => {
        log.end();
        const error = await failure;
        if (error !== undefined) throw error;
      };
      return {
        finished: finish,
        exception: finish,
        async dispose() {
          log.end();
          const error = await failure;
          if (error !== undefined) logger.warn('the live log could not be stored', { error });
        },
      };
    },
  };
}
