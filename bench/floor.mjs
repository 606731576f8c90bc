#!/usr/bin/env node
/**
 * The floor for local tasks: a minimal Node program that spawns the same
 * commands at the same concurrency, each in its own process group with its
 * output read, as drover's process engine does, and nothing else.
 * Usage: node floor.mjs TASKS CONCURRENCY -- CMD [ARGS...]
 */
import { spawn } from 'node:child_process';

const [tasks, concurrency] = process.argv.slice(2, 4).map(Number);
const command = process.argv.slice(process.argv.indexOf('--') + 1);
let started = 0;
let finished = 0;
await new Promise((resolve, reject) => {
  const next = () => {
    if (started >= tasks) return;
    started++;
    const child = spawn(command[0], command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    child.stdout.resume();
    child.stderr.resume();
    child.on('error', reject);
    child.on('close', () => (++finished === tasks ? resolve() : next()));
  };
  for (let i = 0; i < concurrency; i++) next();
});
