/**
 * The rows the SQL queues (SQLite, PostgreSQL) share, and how they become
 * the contract's values: both keep runs and artifacts in the same columns.
 * How a run is described, and why a worker no longer holds it, is said once
 * here for every queue (the in-memory one too), from the contract's RunStatus.
 */
import { ClaimLostError, TaskStateError } from '../model/errors.js';
import type { Resolution } from '../model/resolution.js';
import { runKey, type RunRef, type RunState } from '../model/task.js';
import type { ArtifactInfo, RunStatus } from './queue.js';

export interface RunRow {
  task_id: string; run_id: number; state: RunState; reason_created: 'scheduled' | 'retry'; reason_resolved: string | null;
  message: string | null; worker_id: string | null; taken_until: number | null; scheduled: number; started: number | null; resolved: number | null;
}
export interface ArtifactRow {
  task_id: string; run_id: number; name: string; content_type: string; expires: number | null;
  state: 'streaming' | 'complete'; size: number; created: number;
}

/** A resolution as the runs table's state, reason_resolved and message columns hold it. */
export function columns(resolution: Resolution): { state: string; reason: string; message: string | null } {
  const reason = resolution.state === 'exception' ? resolution.reason : resolution.state;
  return { state: resolution.state, reason, message: resolution.message ?? null };
}

export function describeRun(run: Pick<RunStatus, 'state' | 'reasonResolved'>): string {
  return run.state === 'exception' ? `exception/${run.reasonResolved}` : run.state;
}

export function iso(ms: number | null | undefined): string {
  return ms === null || ms === undefined ? 'an unknown time' : new Date(ms).toISOString();
}

export function runStatus(row: RunRow): RunStatus {
  return {
    runId: row.run_id, state: row.state, reasonCreated: row.reason_created, scheduled: row.scheduled,
    reasonResolved: (row.reason_resolved ?? undefined) as RunStatus['reasonResolved'], message: row.message ?? undefined,
    workerId: row.worker_id ?? undefined, takenUntil: row.taken_until ?? undefined,
    started: row.started ?? undefined, resolved: row.resolved ?? undefined,
  };
}

export function artifactInfo(row: ArtifactRow): ArtifactInfo {
  return {
    taskId: row.task_id, runId: row.run_id, name: row.name, contentType: row.content_type,
    ...(row.expires !== null && { expires: row.expires }), state: row.state, size: row.size, created: row.created,
  };
}

/** Why `workerId` does not hold `run`: the error every queue gives, from the run as it is and the task's deadline. */
export function lostClaim(status: RunStatus | undefined, deadline: number | undefined, run: RunRef, workerId: string): Error {
  if (!status) return new TaskStateError(`there is no run ${runKey(run)}`);
  if (status.state === 'pending') return new ClaimLostError(run, 'resolved', 'the run is pending: no worker has claimed it');
  if (status.state === 'running') {
    return status.workerId === workerId
      ? new ClaimLostError(run, 'claim-expired', `claim expired at ${iso(status.takenUntil)}`)
      : new ClaimLostError(run, 'resolved', `held by worker ${status.workerId}, not ${workerId}`);
  }
  const was = `the run was resolved ${describeRun(status)}`;
  switch (status.reasonResolved) {
    case 'canceled': return new ClaimLostError(run, 'canceled', `the task was canceled at ${iso(status.resolved)}; ${was}`);
    case 'deadline-exceeded': return new ClaimLostError(run, 'deadline-exceeded', `the task deadline passed at ${iso(deadline)}; ${was}`);
    case 'claim-expired': return new ClaimLostError(run, 'claim-expired', `claim expired at ${iso(status.takenUntil)}; ${was}`);
    default: return new ClaimLostError(run, 'resolved', `already resolved: worker ${status.workerId} resolved it ${describeRun(status)} at ${iso(status.resolved)}`);
  }
}
