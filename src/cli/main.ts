/**
 * The `drover` command. Each subcommand parses its own flags strictly,
 * compiles the configuration once (flag > config file > DROVER_* env), and
 * maps errors to the exit codes in exit-codes.ts: bad usage or config is 2,
 * a failed request 1, an internal error 70.
 */
import { createWriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { ConfigError, DroverError, TaskStateError, errorMessage } from '../model/errors.js';
import type { Payload } from '../model/task.js';
import { LIVE_LOG_NAME } from '../plugins/livelog.js';
import type { Queue, RunStatus, TaskStatus } from '../queues/queue.js';
import { SqliteQueue } from '../queues/sqlite.js';
import { createLogger, type Logger } from '../runtime/logger.js';
import { SETTINGS, describeSettings, flagName, loadConfig, type Config } from '../runtime/config.js';
import type { InstanceConfig } from '../hosts/metadata.js';
import { MAX_RUN_TIME_BOUND, UsageError, whole, type Command, type Options, type Values } from './command.js';
import { batchCommand, sessionsCommand } from './batch.js';
import { diagramCommand } from './diagram.js';
import { instancesCommand } from './instances.js';
import { EXIT } from './exit-codes.js';


/** Default task deadline: one day, as in Taskcluster. */
const DEFAULT_DEADLINE_S = 24 * 3600;
const DEFAULT_RETRIES = 5;

/** The common flags that choose the task queue: a command with `usesQueue: false` refuses them. */
const QUEUE_FLAGS = ['queue-dir', 'queue', 'queue-type', 'queue-schema', 'artifact-dir'] as const;

const common: Options = {
  config: { type: 'string', short: 'c' },
  'queue-dir': { type: 'string' },
  // Every command reads and writes either queue, so the queue's own settings are common flags.
  queue: { type: 'string' },
  'queue-type': { type: 'string' },
  'queue-schema': { type: 'string' },
  'artifact-dir': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

function configFrom(values: Values, flags: Record<string, string | undefined> = {}, instance?: InstanceConfig): Config {
  return loadConfig({
    ...(instance ? { instance } : {}),
    file: values['config'] as string | undefined,
    flags: {
      'queue.dir': values['queue-dir'] as string | undefined,
      'queue.url': values['queue'] as string | undefined,
      'queue.type': values['queue-type'] as string | undefined,
      'queue.schema': values['queue-schema'] as string | undefined,
      'queue.artifactDir': values['artifact-dir'] as string | undefined,
      ...flags,
    },
  });
}

/** The queue the config names; PostgreSQL's client loads only when it is the one. */
export async function openQueue(config: Config, logger?: Logger): Promise<Queue> {
  const timing = { claimTimeoutMs: config.queue.claimTimeout * 1000, pollIntervalMs: config.queue.pollInterval * 1000 };
  if (config.queue.type === 'postgres') {
    const { PostgresQueue } = await import('../queues/postgres.js');
    // A worker says in its log when the queue is away and its writes are being retried.
    const onRetry = logger && ((error: unknown) => logger.warn('the queue is unreachable; retrying', { error: errorMessage(error) }));
    return PostgresQueue.open({ url: config.queue.url, ...postgresPlace(config), ...timing, ...(onRetry ? { onRetry } : {}) });
  }
  return SqliteQueue.open({ dir: config.queue.dir, ...timing });
}

function postgresPlace(config: Config): { schema?: string; artifactDir?: string } {
  return {
    ...(config.queue.schema ? { schema: config.queue.schema } : {}),
    ...(config.queue.artifactDir ? { artifactDir: config.queue.artifactDir } : {}),
  };
}

async function withQueue<T>(values: Values, use: (queue: Queue) => Promise<T>): Promise<T> {
  const queue = await openQueue(configFrom(values));
  try {
    return await use(queue);
  } finally {
    await queue.close();
  }
}

const commands: Record<string, Command> = {
  worker: {
    usage: 'drover worker [--config FILE] [--capacity N] [--once] [options]',
    summary: 'claim tasks from the queue and run them',
    options: {
      once: { type: 'boolean' },
      ...Object.fromEntries(SETTINGS.map((setting) => [flagName(setting), { type: 'string' as const }])),
    },
    async run(values) {
      // Every setting has a flag of the same name (queue.claimTimeout: --claim-timeout).
      const flags = Object.fromEntries(SETTINGS.map((setting) => [setting.path, values[flagName(setting)] as string | undefined]));
      // The worker's stack (xstate, ajv, the engine) loads only for this command, so the others start fast.
      const { runWorker, withInstanceConfig } = await import('./worker-command.js');
      // On a cloud instance, the settings it was launched with come under the local ones, before the queue opens.
      const config = await withInstanceConfig(configFrom(values, flags), (instance) => configFrom(values, flags, instance));
      const logger = createLogger({ level: config.logLevel, format: config.logFormat });
      return runWorker(config, await openQueue(config, logger), values['once'] === true, logger);
    },
  },
  migrate: {
    usage: 'drover migrate [--queue URL] [--queue-schema NAME]',
    summary: 'bring the queue\'s schema up to date, and do nothing else',
    options: {},
    async run(values) {
      const config = configFrom(values);
      if (config.queue.type === 'postgres') {
        const { PostgresQueue } = await import('../queues/postgres.js');
        const { schema, from, to } = await PostgresQueue.migrate({ url: config.queue.url, ...postgresPlace(config) });
        process.stdout.write(from === to ? `schema "${schema}" is up to date (version ${to})\n` : `schema "${schema}" migrated from version ${from} to ${to}\n`);
      } else {
        // The embedded queue migrates whenever it opens.
        await (await openQueue(config)).close();
        process.stdout.write(`queue "${config.queue.dir}" is up to date\n`);
      }
      return EXIT.OK;
    },
  },
  submit: {
    usage: 'drover submit [--max-run-time S] [--retries N] [--deadline S] -- CMD [ARGS...]\n       drover submit --payload FILE|-',
    summary: 'add a task to the queue and print its id',
    details: `One argument after -- is a shell command line (run by sh -c); several are
the command's argv, run without a shell.

Options:
  --max-run-time S         stop the command after S seconds, at most ${MAX_RUN_TIME_BOUND.max}
                           (about 24.8 days); the run resolves failed
                           (with --payload, it replaces the payload's maxRunTime)
  --retries N              how many more runs after worker-shutdown, claim-expired or
                           intermittent-task (onExitStatus.retry) [5]
  --deadline S             resolve exception/deadline-exceeded if not done within S seconds [86400]
  --payload FILE|-         a whole payload as JSON or YAML: command, env, maxRunTime,
                           artifacts, mounts, onExitStatus (drover schema prints them all)`,
    options: {
      payload: { type: 'string' },
      'max-run-time': { type: 'string' },
      retries: { type: 'string' },
      deadline: { type: 'string' },
    },
    async run(values, positionals) {
      const payload = await payloadFrom(values, positionals);
      const retries = integerOption(values, 'retries', DEFAULT_RETRIES, 0);
      const deadline = Date.now() + integerOption(values, 'deadline', DEFAULT_DEADLINE_S, 1) * 1000;
      const taskId = await withQueue(values, (queue) => queue.submit({ payload, deadline, retries }));
      process.stdout.write(taskId + '\n');
      return EXIT.OK;
    },
  },
  tasks: {
    usage: 'drover tasks [--state STATE] [--limit N] [--json]',
    summary: 'list tasks, newest first',
    details: `Options:
  --state STATE            only pending, running, completed, failed or exception tasks
  --limit N                at most N tasks [100]
  --json                   the full task records, as JSON`,
    options: { state: { type: 'string' }, limit: { type: 'string' }, json: { type: 'boolean' } },
    async run(values) {
      const state = values['state'] as TaskStatus['state'] | undefined;
      if (state !== undefined && !['pending', 'running', 'completed', 'failed', 'exception'].includes(state)) {
        throw new UsageError(`--state must be pending, running, completed, failed or exception, not "${state}"`);
      }
      const limit = integerOption(values, 'limit', 100, 1);
      const tasks = await withQueue(values, (queue) => queue.listTasks({ ...(state ? { state } : {}), limit }));
      if (values['json']) {
        process.stdout.write(JSON.stringify(tasks, null, 2) + '\n');
        return EXIT.OK;
      }
      const rows = tasks.map((task) => [task.taskId, task.state, lastResolution(task), String(task.runs.length), new Date(task.created).toISOString(), commandOf(task.payload)]);
      process.stdout.write(table(['TASK', 'STATE', 'RESOLUTION', 'RUNS', 'CREATED', 'COMMAND'], rows));
      return EXIT.OK;
    },
  },
  task: {
    usage: 'drover task ID [--json]',
    summary: 'show a task: its payload, runs, resolutions and artifacts',
    details: `Options:
  --json                   the full task record with runs and artifacts, as JSON`,
    options: { json: { type: 'boolean' } },
    async run(values, positionals) {
      const taskId = onePositional(positionals, 'ID');
      const { task, artifacts } = await withQueue(values, async (queue) => {
        const task = await queue.task(taskId);
        const artifacts = await Promise.all(task.runs.map((run) => queue.listArtifacts({ taskId, runId: run.runId })));
        return { task, artifacts };
      });
      if (values['json']) {
        const runs = task.runs.map((run, i) => ({ ...run, artifacts: artifacts[i] }));
        process.stdout.write(JSON.stringify({ ...task, runs }, null, 2) + '\n');
        return EXIT.OK;
      }
      const lines = [
        `task      ${task.taskId}`,
        `state     ${task.state}`,
        `command   ${commandOf(task.payload)}`,
        `payload   ${JSON.stringify(task.payload)}`,
        `created   ${new Date(task.created).toISOString()}`,
        `deadline  ${new Date(task.deadline).toISOString()}`,
        `retries   ${task.retriesLeft} left`,
      ];
      task.runs.forEach((run, i) => {
        lines.push('', `run ${run.runId}  ${runResolution(run)}  (${run.reasonCreated})`);
        if (run.workerId) lines.push(`  worker    ${run.workerId}`);
        if (run.started) lines.push(`  started   ${new Date(run.started).toISOString()}`);
        if (run.resolved) lines.push(`  resolved  ${new Date(run.resolved).toISOString()}`);
        if (run.message) lines.push(`  message   ${run.message.replace(/\n/g, '\n            ')}`);
        for (const artifact of artifacts[i] ?? []) {
          lines.push(`  artifact  ${artifact.name}  ${artifact.size} B  ${artifact.contentType}${artifact.state === 'streaming' ? '  (streaming)' : ''}`);
        }
      });
      process.stdout.write(lines.join('\n') + '\n');
      return EXIT.OK;
    },
  },
  logs: {
    usage: 'drover logs ID [-f] [--run N]',
    summary: 'print a task\'s log; -f follows it while it runs (and into its retries)',
    details: `Prints the latest run's log (public/logs/live.log).

Options:
  -f, --follow             keep printing while the task runs, and follow its retries
  --run N                  that run's log instead of the latest`,
    options: { follow: { type: 'boolean', short: 'f' }, run: { type: 'string' } },
    async run(values, positionals) {
      const taskId = onePositional(positionals, 'ID');
      const follow = values['follow'] === true;
      const interrupt = new AbortController();
      const stop = () => interrupt.abort();
      process.once('SIGINT', stop);
      try {
        return await withQueue(values, (queue) => printLogs(queue, taskId, values['run'] === undefined ? undefined : integerOption(values, 'run', 0, 0), follow, interrupt.signal));
      } finally {
        process.off('SIGINT', stop);
      }
    },
  },
  cancel: {
    usage: 'drover cancel ID',
    summary: 'cancel a task: its run resolves exception/canceled and its processes are killed',
    details: `The current run resolves exception/canceled at once; a worker running it
kills the command's whole process tree within about a poll interval.`,
    options: {},
    async run(values, positionals) {
      const taskId = onePositional(positionals, 'ID');
      await withQueue(values, (queue) => queue.cancel(taskId));
      process.stdout.write(`canceled ${taskId}\n`);
      return EXIT.OK;
    },
  },
  schema: {
    usage: 'drover schema [--engine process|script] [--config FILE]',
    summary: 'print the JSON Schema of task payloads: the worker\'s engine\'s and plugins\' joined',
    details: `The schema a worker with this config checks every payload against: each
top-level property is owned by the engine or by one plugin, unknown keys are
refused. Point an editor at it to check task files as you write them.

Options:
  --engine process|script  that engine's schema instead of the configured one`,
    options: { engine: { type: 'string' } },
    async run(values) {
      const config = configFrom(values, { 'engine.type': values['engine'] as string | undefined });
      const { workerPayloadSchema } = await import('./worker-command.js');
      const schema = await workerPayloadSchema(config);
      const document = { $schema: 'http://json-schema.org/draft-07/schema#', title: `drover task payload (engine ${config.engine.type})`, ...schema };
      process.stdout.write(JSON.stringify(document, null, 2) + '\n');
      return EXIT.OK;
    },
  },
  artifact: {
    usage: 'drover artifact ID NAME [--run N] [-o FILE]',
    summary: 'write an artifact of a task\'s run (the latest by default) to stdout or a file',
    details: `Options:
  --run N                  that run's artifact instead of the latest run's
  -o, --output FILE        write to FILE instead of stdout`,
    options: { run: { type: 'string' }, output: { type: 'string', short: 'o' } },
    async run(values, positionals) {
      if (positionals.length !== 2) throw new UsageError('expected a task ID and an artifact NAME');
      const [taskId, name] = positionals as [string, string];
      await withQueue(values, async (queue) => {
        const task = await queue.task(taskId);
        const runId = values['run'] === undefined ? latestRun(task).runId : integerOption(values, 'run', 0, 0);
        const source = await queue.readArtifact({ taskId, runId }, name);
        const output = values['output'] as string | undefined;
        await pipeline(source, output === undefined ? process.stdout : createWriteStream(output), { end: output !== undefined });
      });
      return EXIT.OK;
    },
  },
  batch: batchCommand,
  sessions: sessionsCommand,
  diagram: diagramCommand,
  instances: instancesCommand,
};

export async function main(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(overview());
    return name === undefined ? EXIT.CONFIG : EXIT.OK;
  }
  if (name === '--version') {
    const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    process.stdout.write(pkg.version + '\n');
    return EXIT.OK;
  }
  const command = commands[name];
  if (command === undefined) {
    process.stderr.write(`drover: unknown command "${name}"\n\n${overview()}`);
    return EXIT.CONFIG;
  }
  try {
    const { values, positionals } = parseArgs({ args: [...rest], options: { ...common, ...command.options }, allowPositionals: true, strict: true });
    if (values['help']) {
      process.stdout.write(help(name, command));
      return EXIT.OK;
    }
    const queueFlag = command.usesQueue === false ? QUEUE_FLAGS.find((flag) => values[flag] !== undefined) : undefined;
    if (queueFlag !== undefined) throw new UsageError(`--${queueFlag} is not an option of drover ${name}: it does not use the task queue`);
    return await command.run(values as Values, positionals);
  } catch (error) {
    return reportError(name, error);
  }
}

function reportError(name: string, error: unknown): number {
  const code = (error as { code?: string }).code ?? '';
  if (error instanceof UsageError || code.startsWith('ERR_PARSE_ARGS')) {
    process.stderr.write(`drover ${name}: ${errorMessage(error)}\nSee "drover ${name} --help".\n`);
    return EXIT.CONFIG;
  }
  if (error instanceof ConfigError) {
    process.stderr.write(`drover ${name}: ${error.message}\n`);
    return EXIT.CONFIG;
  }
  if (error instanceof DroverError && !(error.code === 'DROVER_INTERNAL')) {
    process.stderr.write(`drover ${name}: ${error.message}\n`);
    return EXIT.FAILED;
  }
  process.stderr.write(`drover ${name}: internal error: ${errorMessage(error)}\n`);
  if (process.env['DROVER_LOG_LEVEL'] === 'debug') process.stderr.write(`${(error as Error).stack ?? ''}\n`);
  return EXIT.INTERNAL;
}

async function payloadFrom(values: Values, positionals: string[]): Promise<Payload> {
  const file = values['payload'] as string | undefined;
  const maxRunTime = values['max-run-time'] === undefined ? undefined : integerOption(values, 'max-run-time', 0, 1, MAX_RUN_TIME_BOUND);
  if (file !== undefined) {
    if (positionals.length > 0) throw new UsageError('give either --payload or a command, not both');
    const text = file === '-' ? await readStdin() : await readFile(file, 'utf8').catch((error: NodeJS.ErrnoException) => {
      throw new UsageError(`payload file "${file}": ${error.code === 'ENOENT' ? 'not found' : error.message}`);
    });
    let payload: unknown;
    try {
      const { parse } = await import('yaml');
      payload = parse(text);
    } catch (error) {
      throw new UsageError(`payload ${file === '-' ? 'on stdin' : `file "${file}"`} is neither JSON nor YAML: ${errorMessage(error).split('\n')[0]}`);
    }
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) throw new UsageError('a payload must be a JSON or YAML object');
    // As --retries and --deadline go with a payload file, so does --max-run-time: the flag beats the file.
    return maxRunTime === undefined ? payload as Payload : { ...payload, maxRunTime };
  }
  if (positionals.length === 0) throw new UsageError('give a command after --, or --payload FILE');
  // One argument is a shell command line; several are the argv of the command itself.
  const command = positionals.length === 1 ? positionals[0]! : positionals;
  return maxRunTime === undefined ? { command } : { command, maxRunTime };
}

async function printLogs(queue: Queue, taskId: string, runId: number | undefined, follow: boolean, signal: AbortSignal): Promise<number> {
  let next = runId ?? (await queue.task(taskId)).runs.length - 1;
  for (let runs = 0; runs < 1000 && !signal.aborted; runs++) {
    const task = await queue.task(taskId);
    const run = task.runs[next];
    if (run === undefined) throw new TaskStateError(`task ${taskId} has no run ${next}`);
    const artifacts = await queue.listArtifacts({ taskId, runId: next });
    if (!artifacts.some((artifact) => artifact.name === LIVE_LOG_NAME)) {
      if (!follow) throw new TaskStateError(`task ${taskId} run ${next} has no log (the run is ${run.state})`);
      await delay(250, signal);
      runs--; // waiting for the log to appear is not a new run
      continue;
    }
    await pipeline(await queue.readArtifact({ taskId, runId: next }, LIVE_LOG_NAME, { follow, signal }), process.stdout, { end: false });
    if (!follow || runId !== undefined) return EXIT.OK;
    // The log is whole (or its worker is gone): follow into the retry, if the queue schedules one. Never this
    // run's log again, which would print it twice.
    const after = await resolvedTask(queue, taskId, next, signal);
    if (after === undefined || after.runs.length - 1 <= next) return EXIT.OK;
    next++;
  }
  return EXIT.OK;
}

/**
 * The task once run `runId` is resolved: its worker reports right after it ends the log; a run whose
 * worker died is resolved by a sweep, which this asks for (its claim has run out by the time its
 * log was given up). Undefined if that takes more than a minute, or the signal aborts.
 */
async function resolvedTask(queue: Queue, taskId: string, runId: number, signal: AbortSignal): Promise<TaskStatus | undefined> {
  for (let i = 0; i < 240 && !signal.aborted; i++) {
    const task = await queue.task(taskId);
    const state = task.runs[runId]?.state;
    if (state !== 'pending' && state !== 'running') return task;
    if (i > 0) await queue.sweep();
    await delay(250, signal);
  }
  return undefined;
}

function delay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function integerOption(values: Values, name: string, fallback: number, min: number, bound?: { readonly max: number; readonly unit: string }): number {
  return whole(values[name] as string | undefined, name, fallback, min, bound);
}

function onePositional(positionals: string[], what: string): string {
  if (positionals.length !== 1) throw new UsageError(`expected one ${what}, got ${positionals.length}`);
  return positionals[0]!;
}

function latestRun(task: TaskStatus): RunStatus {
  const run = task.runs[task.runs.length - 1];
  if (run === undefined) throw new TaskStateError(`task ${task.taskId} has no runs`);
  return run;
}

function runResolution(run: RunStatus): string {
  if (run.state === 'exception') return `exception/${run.reasonResolved ?? '?'}`;
  return run.state;
}

function lastResolution(task: TaskStatus): string {
  const run = task.runs[task.runs.length - 1];
  return run && run.resolved ? runResolution(run) : '';
}

function commandOf(payload: Payload): string {
  const command = payload['command'];
  const text = Array.isArray(command) ? command.map((arg) => (/^[\w./=:,@-]+$/.test(String(arg)) ? String(arg) : JSON.stringify(arg))).join(' ') : String(command ?? '');
  return text.length > 60 ? text.slice(0, 57) + '...' : text;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => (row[i] ?? '').length)));
  return [header, ...rows].map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}

function overview(): string {
  const list = Object.entries(commands).map(([name, command]) => `  ${name.padEnd(10)} ${command.summary}`).join('\n');
  // Which commands refuse the queue flags comes from the table, so that the sentence stays true.
  const refusing = Object.entries(commands).filter(([, command]) => command.usesQueue === false).map(([name]) => name);
  const queue = `Every command takes --config FILE and --help. --queue URL (PostgreSQL) or\n--queue-dir DIR (SQLite) chooses the task queue; ${refusing.join(' and ')}\nrefuse these flags (a batch session has a queue of its own).`;
  return `drover: a task worker engine\n\nUsage: drover COMMAND [options]\n\nCommands:\n${list}\n\n${queue}\n"drover COMMAND --help" tells more.\n`;
}

function help(name: string, command: Command): string {
  const text = `Usage: ${command.usage}\n\n${command.summary[0]!.toUpperCase()}${command.summary.slice(1)}.\n\n` +
    (command.details ? `${command.details}\n\n` : '') +
    `Common options:\n  -c, --config FILE        YAML config file (also DROVER_CONFIG)\n` +
    (command.usesQueue === false ? '' : `  --queue-dir DIR          the embedded queue's directory [.drover]\n  --queue URL              a PostgreSQL queue, postgres://USER@HOST:PORT/DATABASE (also DROVER_QUEUE)\n  --queue-schema NAME      its schema [drover]; --artifact-dir DIR: its shared artifact directory\n`) +
    `  -h, --help               this text\n`;
  if (name !== 'worker') return text;
  return text + `\nWorker options (flag > config file > DROVER_* environment):\n  --once                   run what is pending, then exit 0\n${describeSettings('text', Object.keys(common))}\n\nExit codes: 0 tasks done, 2 bad config or usage, 3 idle timeout,\n4 stopped by SIGTERM/SIGINT, 5 stopped by the host, 70 internal error.\n`;
}

