/** The exit codes of `drover`; README's table is checked against this one by test/cli.test.ts. */
import type { ShutdownReason } from '../machines/worker.js';

export const EXIT = {
  /** The command did what was asked; for `worker`: --once found nothing left, or numberOfTasksToRun was reached. */
  OK: 0,
  /** The command failed (no such task, a canceled task's artifact is missing...). */
  FAILED: 1,
  /** Bad usage or configuration: an unknown option, a bad config file or value. */
  CONFIG: 2,
  /** `worker`: stopped after idleTimeout with nothing to do. */
  IDLE: 3,
  /** `worker`: stopped by SIGTERM or SIGINT (tasks still running were re-queued). */
  SIGNAL: 4,
  /** `worker`: the host asked it to stop (spot interruption, preemption). */
  HOST_SHUTDOWN: 5,
  /** An internal error: a bug, or a broken environment (EX_SOFTWARE). */
  INTERNAL: 70,
} as const;

export function exitCodeFor(reason: ShutdownReason): number {
  switch (reason.kind) {
    case 'tasks-done':
    case 'drained':
      return EXIT.OK;
    case 'idle':
      return EXIT.IDLE;
    case 'signal':
      return EXIT.SIGNAL;
    case 'host':
      return EXIT.HOST_SHUTDOWN;
    case 'fatal':
      return EXIT.INTERNAL;
  }
}
