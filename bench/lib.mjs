/** What the benchmarks share: timing a command, and summing up repetitions. */
import { spawn } from 'node:child_process';

/** Runs a command to completion and resolves with its wall time in seconds; a non-zero exit rejects. */
export function timed(command, args, options = {}) {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], ...options });
    let stderr = '';
    child.stderr?.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) reject(new Error(`${command} ${args.join(' ')} exited ${code}: ${stderr.slice(-500)}`));
      else resolve((performance.now() - start) / 1000);
    });
  });
}

/** Runs `once` for a warm-up and then `reps` times; returns the measured values. */
export async function repeat(reps, once) {
  await once();
  const values = [];
  for (let i = 0; i < reps; i++) values.push(await once());
  return values;
}

export function summary(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { median, min: sorted[0], max: sorted[sorted.length - 1], values };
}
