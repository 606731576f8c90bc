#!/usr/bin/env node
/**
 * The floor for SSH jobs: raw ssh2, ONE persistent connection, COMMAND run
 * JOBS times through at most CHANNELS concurrent exec channels, each
 * channel's output read and its exit status awaited; nothing else.
 * NODELAY `on` sets TCP_NODELAY on the connection (as drover's SSH
 * transport does), `off` leaves Nagle's algorithm on. A channel the server
 * refuses (sshd may still count a just-closed session) is asked for again
 * after a short pause, as drover's transport does.
 *
 * Usage: node ssh-floor.mjs HOST PORT USER KEYFILE JOBS CHANNELS on|off -- COMMAND
 */
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import ssh2 from 'ssh2';

const [host, port, username, keyFile, jobs, channels, nodelay] = process.argv.slice(2, 9);
const command = process.argv.slice(process.argv.indexOf('--') + 1).join(' ');
const total = Number(jobs);
const client = new ssh2.Client();
await new Promise((resolve, reject) => {
  client.once('ready', resolve).once('error', reject);
  client.connect({ host, port: Number(port), username, privateKey: readFileSync(keyFile) });
});
client.setNoDelay(nodelay === 'on');

let started = 0;
const failures = [];
const OPEN_RETRIES = 50;
const one = (attempt = 0) => new Promise((resolve, reject) => {
  client.exec(command, (error, channel) => {
    if (error && attempt < OPEN_RETRIES && /open failed/.test(error.message)) return resolve(sleep(10).then(() => one(attempt + 1)));
    if (error) return reject(error);
    let code = null;
    channel.on('exit', (exitCode) => (code = exitCode));
    channel.on('data', () => {});
    channel.stderr.on('data', () => {});
    channel.on('close', () => (code === 0 ? resolve() : reject(new Error(`${command} exited ${code}`))));
  });
});
const lane = async () => {
  while (started < total) {
    started++;
    await one().catch((error) => failures.push(error));
  }
};
await Promise.all(Array.from({ length: Number(channels) }, lane));
client.end();
if (failures.length > 0) {
  process.stderr.write(`${failures.length} of ${total} jobs failed: ${failures[0].message}\n`);
  process.exit(1);
}
