/**
 * What both queues' migration tests check after migrating a queue seeded
 * with three tasks (running1 claimed by worker A, pending2, complete3):
 * each reads, and lists, in the state it had before.
 */
import type { Test } from 'tap';
import type { Queue } from '../../src/queues/queue.js';

export async function seededTasksReadAsBefore(t: Test, queue: Queue): Promise<void> {
  t.match(await queue.task('running1'), { state: 'running', runs: [{ state: 'running', workerId: 'A' }] });
  t.match(await queue.task('pending2'), { state: 'pending' });
  t.match(await queue.task('complete3'), { state: 'completed' });
  t.same((await queue.listTasks({ state: 'running' })).map((s) => s.taskId), ['running1']);
  t.same((await queue.listTasks({ state: 'pending' })).map((s) => s.taskId), ['pending2']);
  t.same((await queue.listTasks({ state: 'completed' })).map((s) => s.taskId), ['complete3']);
}
