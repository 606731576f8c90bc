/** `drover batch`: runs each line of stdin as a job, in a resumable session (src/batch). */
import { readFileSync, statSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import { dirname, isAbsolute, join, resolve as resolvePath } from 'node:path';
import { createInterface } from 'node:readline';
import { ConfigError, errorMessage } from '../model/errors.js';
import { CLOUD_SETTING_FLAGS, openCloudSessions } from './instances.js';
import type { Progress } from '../batch/progress.js';
import type { ProviderLaunch } from '../batch/provider-hosts.js';
import { PROVIDER_NAMES, type ProviderName } from '../cloud/provider.js';
import { jobsHash, type JobRecord, type Session, type SessionParams } from '../batch/session.js';
import { MAX_RUN_TIME_BOUND, UsageError, whole, type Command, type Values } from './command.js';
import { EXIT } from './exit-codes.js';

const DETAILS = `Each line of stdin is one job. The line is split into words as a shell
splits them, without expansion: blanks separate words, '...' and "..."
quote (in "..." a backslash keeps " \\ $ and \`), a backslash outside quotes
keeps the next character; $VAR, * and ~ are not expanded. Each word is
quoted again and appended to COMMAND, and the result runs with sh -c.
One COMMAND argument is a shell command line itself; without COMMAND the
line's words are the whole command. Blank lines are skipped. Each job
runs in an empty directory of its own (under the session's work/, or
under the SSH work directory on a host).

Every batch is a session, in SESSIONS/ID: params.json, jobs.json (each
job's status: pending, running, ok, failed, timeout), session.log,
slot-N.log (each slot's output, for tail -f), output/N.log (each job's
output) and jobs.jsonl (one JSON line per finished job: slot, host, start,
duration, exit code, signal).

Options (flag > --template file > DROVER_<NAME> environment variable):
  --hosts LIST|@FILE       run the jobs over SSH on these hosts: user@name:port,
                           separated by commas, or a hosts file, one
                           "user@name:port [capacity=N]" a line [this machine]
  --split N                jobs that run at once [number of CPUs; with --hosts,
                           one per host]; hosts without capacity=N share them
  --timeout S              kill a job's process group after S seconds (status timeout);
                           at most ${MAX_RUN_TIME_BOUND.max} (about 24.8 days)
  --retries N              run a failed or timed-out job up to N more times [0]
  --strikes N              retire a host after N failed or timed-out jobs in a
                           row on it [0: never]
  --pre CMD                shell command run on each host before its first job
                           (in the home directory; on this machine, in the
                           session directory); if it fails, the host is retired
  --post CMD               shell command run on each host after its last job
  --overlay DIR            copy DIR's contents into each SSH host's home
                           directory before its first job
  --sessions PATH          the sessions directory [~/.drover/sessions]
  --template FILE          a YAML file of these options (hosts, split, timeout,
                           retries, strikes, pre, post, overlay, sessions, report,
                           yes, provider, instance-type, ...) and of the command
                           (command: ...); relative paths in it are relative to
                           the file (DROVER_TEMPLATE); DROVER_INSTANCE_TYPE and the
                           like set an option from the environment
  --yes                    do not ask before starting
  --report 'sh: CMD'       when the session ends, run CMD with sh in the session
                           directory, with DROVER_SESSION_ID, DROVER_SESSION_DIR,
                           DROVER_JOBS, DROVER_OK, DROVER_FAILED, DROVER_TIMEOUT,
                           DROVER_PENDING and DROVER_ELAPSED (seconds) set
  --provider aws|gce       launch one cloud instance per slot of the split, run
                           the jobs over SSH on them, terminate them at the end
  --instance-type T        with --provider: EC2 t3.micro, GCE e2-small (needed)
  --image I                with --provider: an AMI id, a GCE source image (needed)
  --network N              with --provider: EC2 subnet id, GCE network
  --key K                  with --provider: EC2 key pair name, GCE ssh-keys line
  --ssh-user U             with --provider: the image's login user [aws: ec2-user,
                           gce: this user]
  --aws-region, --aws-endpoint, --gce-project, --gce-zone, --gce-endpoint
                           where the provider is (the cloud settings)
  --resume ID              run session ID's jobs that are still pending
  --retry ID               run session ID's failed and timed-out jobs again
                           (refused while another drover runs the session)

SSH hosts are reached with the worker's SSH settings: DROVER_SSH_IDENTITY_FILE,
DROVER_SSH_KNOWN_HOSTS, DROVER_SSH_HOST_KEY_POLICY, DROVER_SSH_WORK_DIR,
DROVER_SSH_KEEPALIVE and DROVER_SSH_MAX_CHANNELS (see drover worker --help),
or ssh.* in the --config file (DROVER_CONFIG); its engine.killSignal and
engine.killGrace stop timed-out jobs, and its aws.* and gce.* serve --provider.
A host that stops answering is retired at once, and its running jobs run
again on another host; the batch goes on while one host works.

With --provider, every instance is terminated when the batch ends, also
after an error, Ctrl-C or SIGTERM; one whose terminate keeps failing is
left for "drover instances --cleanup". Credentials come from the SDKs'
default chains. The session keeps the launch options (not credentials),
and --resume launches fresh instances.

With --resume or --retry the session keeps its command, jobs and options;
options given again replace the stored ones. Jobs on stdin are optional,
and when given they must be the session's jobs, line for line, or drover
refuses to run them.

On a terminal (stdin and stdout), drover shows the parameters and asks
before it starts, and keeps one progress line up to date; otherwise it
prints one timestamped line per finished job. Ctrl-C or SIGTERM kills
the running jobs, saves the session and prints how to resume it. At the
end: "session ID (T s): OK/ALL OK - P pending, T timeout, E errors".

Exit codes: 0 every job succeeded, 1 some job failed or timed out, or no
host was left to run on, 2 bad usage (unknown option, bad value,
unreadable input), 4 interrupted.`;

/** The options a template or DROVER_<NAME> can set, as a flag can. */
const SETTINGS = [
  'hosts', 'split', 'timeout', 'retries', 'strikes', 'pre', 'post', 'overlay', 'sessions', 'report', 'yes',
  'provider', 'instance-type', 'image', 'network', 'key', 'ssh-user', 'aws-region', 'aws-endpoint', 'gce-project', 'gce-zone', 'gce-endpoint',
] as const;
type SettingName = (typeof SETTINGS)[number];
/** Settings that name files: relative to the template when they come from one. */
const PATH_SETTINGS: readonly SettingName[] = ['overlay', 'sessions'];
/** What --provider launches, besides the provider. */
const LAUNCH_SETTINGS = ['instance-type', 'image', 'network', 'key', 'ssh-user'] as const;

export const batchCommand: Command = {
  usage: 'cat jobs | drover batch [options] [--] [COMMAND...]',
  summary: 'run each line of stdin as a job, in parallel, in a resumable session',
  details: DETAILS,
  // A session has a queue of its own (SESSIONS/ID/queue).
  usesQueue: false,
  options: {
    split: { type: 'string' },
    timeout: { type: 'string' },
    retries: { type: 'string' },
    strikes: { type: 'string' },
    sessions: { type: 'string' },
    hosts: { type: 'string' },
    pre: { type: 'string' },
    post: { type: 'string' },
    overlay: { type: 'string' },
    template: { type: 'string' },
    yes: { type: 'boolean', short: 'y' },
    resume: { type: 'string' },
    retry: { type: 'string' },
    report: { type: 'string' },
    ...Object.fromEntries(SETTINGS.slice(SETTINGS.indexOf('provider')).map((name) => [name, { type: 'string' as const }])),
  },
  async run(values, positionals) {
    const env = process.env;
    const templateFile = (values['template'] as string | undefined) ?? (env['DROVER_TEMPLATE'] || undefined);
    const template = templateFile === undefined ? undefined : readTemplate(templateFile);
    /** flag > template > environment. */
    const setting = (name: SettingName): string | undefined => {
      const flag = values[name];
      if (flag !== undefined) return String(flag);
      const fromTemplate = template?.settings[name];
      if (fromTemplate !== undefined) return fromTemplate;
      const fromEnv = env[`DROVER_${name.toUpperCase().replace(/-/g, '_')}`];
      return fromEnv === '' ? undefined : fromEnv;
    };
    const given = (name: SettingName) => setting(name) !== undefined;
    /** Where a setting's value came from, for an error about it: nothing for a flag (the message names the flag). */
    const origin = (name: SettingName): string | undefined => {
      if (values[name] !== undefined) return undefined;
      return template?.settings[name] !== undefined ? `template "${templateFile}"` : `DROVER_${name.toUpperCase().replace(/-/g, '_')}`;
    };
    const split = whole(setting('split'), 'split', undefined, 1, { from: origin('split') });
    // A job's timeout is its task's maxRunTime: a longer one would fail every job as a malformed payload.
    const timeout = whole(setting('timeout'), 'timeout', 0, 1, { from: origin('timeout'), ...MAX_RUN_TIME_BOUND });
    const retries = whole(setting('retries'), 'retries', 0, 0, { from: origin('retries') });
    const strikes = whole(setting('strikes'), 'strikes', 0, 0, { from: origin('strikes') });
    const yes = ['1', 'true', 'yes'].includes(setting('yes') ?? '');
    const report = setting('report');
    if (report !== undefined && !/^sh:\s*\S/.test(report)) throw new UsageError(`--report must be 'sh: COMMAND', not "${report}"`);
    const overlay = setting('overlay');
    if (overlay !== undefined && !isDirectory(overlay)) throw new ConfigError(`--overlay "${overlay}" is not a directory`);
    const hostsSpec = setting('hosts');
    const { parseHostList } = await import('../batch/hosts.js');
    const hosts = hostsSpec === undefined ? undefined : await parseHostList(hostsSpec);
    const pre = setting('pre');
    const post = setting('post');
    const resume = values['resume'] as string | undefined;
    const retry = values['retry'] as string | undefined;
    if (resume !== undefined && retry !== undefined) throw new UsageError('give either --resume or --retry, not both');
    const command = positionals.length > 0 ? positionals : template?.command ?? [];
    const providerName = setting('provider');
    if (providerName !== undefined && !(PROVIDER_NAMES as readonly string[]).includes(providerName)) throw new UsageError(`--provider must be aws or gce, not "${providerName}"`);
    if (providerName !== undefined && hosts !== undefined) throw new UsageError('give either --hosts or --provider, not both');

    const { createSession, runSession, sessionParams } = await import('../batch/run.js');
    const { Session, defaultSessionsDir } = await import('../batch/session.js');
    const sessionsDir = given('sessions') ? resolvePath(setting('sessions')!) : defaultSessionsDir(env);
    const interactive = process.stdin.isTTY === true && process.stdout.isTTY === true;
    const input = process.stdin.isTTY ? '' : await readStdin();
    const options = {
      ...(split === undefined ? {} : { split }), timeout, retries, strikes,
      ...(hosts === undefined ? {} : { hosts }), ...(pre === undefined ? {} : { pre }), ...(post === undefined ? {} : { post }), ...(overlay === undefined ? {} : { overlay }),
      ...(report === undefined ? {} : { report }),
    };
    let session: Session | undefined;
    let lines: string[];
    if (resume !== undefined || retry !== undefined) {
      // Locked before its jobs are read: a session that another drover runs is refused, not run twice.
      session = Session.open(sessionsDir, (resume ?? retry)!, { lock: true });
      checkSameJobs(session, input, positionals);
      // A session stored before maxRunTime had its bound would fail every job it runs.
      const storedTimeout = session.params.timeout;
      if (!given('timeout') && storedTimeout !== undefined && storedTimeout > MAX_RUN_TIME_BOUND.max) {
        throw new UsageError(`session ${session.id} has timeout ${storedTimeout} (${join(session.dir, 'params.json')}), above the most a job may run, ${MAX_RUN_TIME_BOUND.max}${MAX_RUN_TIME_BOUND.unit}; give --timeout S to replace it`);
      }
      lines = session.jobs.map((job) => job.line);
    } else {
      lines = input.split('\n').filter((line) => line.trim().length > 0);
      if (lines.length === 0) throw new UsageError('no jobs: pipe the job lines into drover batch (cat jobs | drover batch COMMAND)');
    }
    const stored = hosts !== undefined ? undefined : session?.params.provider;
    // The cloud's modules, and with them ssh2 (70 ms to load), load only for a batch that launches instances.
    const providerHosts = (setting('provider') ?? stored?.provider) === undefined ? undefined : await import('../batch/provider-hosts.js');
    const launch = launchOptions(setting, stored, (name) => providerHosts!.defaultSshUser(name));
    const { config, ...ssh } = await sshSettings(values['config'] as string | undefined, launch?.settings ?? {});
    if (launch !== undefined && session === undefined && split === undefined) throw new UsageError(`--provider ${launch.provider} needs --split N: how many instances to launch`);
    const { createProvider } = await import('../cloud/providers.js');
    const provider = launch === undefined ? undefined : await createProvider(launch.provider, config);
    const cloud = launch === undefined ? {} : { provider: launch, hostSource: providerHosts!.describeLaunch(launch, provider!.where) };
    if (interactive && !yes) {
      const params = session === undefined ? { command, ...sessionParams(options), ...cloud } : { ...session.params, ...resumeChanges(sessionParams(options), given), ...cloud };
      const todo = session === undefined ? lines.length : session.jobs.filter((job) => job.status === 'pending' || job.status === 'running' || (retry !== undefined && (job.status === 'failed' || job.status === 'timeout'))).length;
      if (!(await askFirst(params, lines, todo, sessionsDir, session?.id))) {
        provider?.close();
        session?.unlock();
        process.stderr.write('drover batch: you did not answer yes; nothing ran\n');
        return EXIT.FAILED;
      }
    }
    if (session === undefined) {
      session = createSession(lines, { command, sessionsDir, ...options });
      session.lock();
    } else {
      session.update(resumeChanges(sessionParams(options), given));
      if (retry !== undefined) {
        for (const job of session.jobs) if (job.status === 'failed' || job.status === 'timeout') job.status = 'pending';
      }
    }
    // The session says what it runs on: the instances of a provider, or hosts (which replace a provider's on --resume).
    if (launch !== undefined) session.update({ ...cloud, hosts: undefined });
    else if (hosts !== undefined) session.update({ provider: undefined, hostSource: undefined });
    const hostSource = launch === undefined ? undefined : providerHosts!.launchSource(provider!, launch, openCloudSessions(config), ssh.ssh, `batch-${session.id}-${randomUUID().slice(0, 8)}`);
    const interrupt = new AbortController();
    let signalName: string | undefined;
    const onSignal = (signal: NodeJS.Signals) => {
      signalName ??= signal;
      interrupt.abort();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    const display = await createDisplay(process.stdout.isTTY === true);
    const todo = session.jobs.filter((job) => job.status === 'pending' || job.status === 'running').length;
    display.say(`session ${session.id}: ${todo} of ${session.jobs.length} jobs to run, split ${session.params.split}, on ${session.params.hosts ? session.params.hosts.map((entry) => entry.address).join(', ') : session.params.hostSource ?? 'this machine'}, in ${session.dir}`);
    try {
      let outcome;
      try {
        outcome = await runSession(session, {
          signal: interrupt.signal,
          onJob: display.job,
          onProgress: display.progress,
          onHost: display.host,
          ...(hostSource === undefined ? {} : { hostSource }),
          ...ssh,
        });
      } catch (error) {
        // Interrupted before the first job (while instances launched, say): nothing ran, the session is as it was.
        if (!interrupt.signal.aborted) throw error;
        display.end();
        process.stderr.write(`drover batch: interrupted by ${signalName ?? 'a signal'} (${errorMessage(error)}); the session is saved. Resume it with: drover batch --resume ${session.id}\n`);
        return EXIT.SIGNAL;
      }
      display.end();
      const { counts, elapsedMs } = outcome;
      const total = session.jobs.length;
      for (const host of outcome.hosts) if (host.state !== 'up') display.say(`host ${host.host} ${host.state}: ${host.ok} jobs ok, ${host.failed} failed`);
      process.stdout.write(`session ${session.id} (${Math.round(elapsedMs / 1000)} s): ${counts.ok}/${total} OK - ${counts.pending + counts.running} pending, ${counts.timeout} timeout, ${counts.failed} errors\n`);
      if (session.params.report !== undefined) await runReport(session.params.report.replace(/^sh:\s*/, ''), session, outcome.elapsedMs);
      if (outcome.interrupted) {
        process.stderr.write(`drover batch: interrupted by ${signalName ?? 'a signal'}; the session is saved. Resume it with: drover batch --resume ${session.id}\n`);
        return EXIT.SIGNAL;
      }
      if (outcome.stranded !== undefined) {
        process.stderr.write(`drover batch: ${outcome.stranded}; ${counts.pending} jobs are pending. Resume them with: drover batch --resume ${session.id} (--hosts to run elsewhere)\n`);
        return EXIT.FAILED;
      }
      return counts.ok === total ? EXIT.OK : EXIT.FAILED;
    } finally {
      session.unlock();
      display.end();
      provider?.close();
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  },
};

/** Shows the parameter table and the job count (as cloudtask does) and asks; true for yes. */
async function askFirst(params: Omit<SessionParams, 'created' | 'jobsHash'>, lines: readonly string[], todo: number, sessionsDir: string, id: number | undefined): Promise<boolean> {
  const { parameterTable } = await import('../batch/progress.js');
  process.stdout.write(`About to run ${todo} of ${lines.length} jobs${id === undefined ? '' : ` of session ${id}`}:\n\n`);
  process.stdout.write(parameterTable([
    ['jobs', `${lines.length} (${lines.length > 1 ? `${lines[0]} .. ${lines[lines.length - 1]}` : lines[0]})`],
    ['command', params.command.join(' ')],
    ['hosts', params.hosts?.map((entry) => entry.address).join(' ') ?? params.hostSource ?? 'this machine'],
    ['split', params.split],
    ['timeout', params.timeout], ['retries', params.retries], ['strikes', params.strikes],
    ['pre', params.pre], ['post', params.post], ['overlay', params.overlay],
    ['report', params.report], ['sessions', sessionsDir],
  ]) + '\n');
  return confirm('Is this really what you want? [yes/no] ');
}

/** The session parameters that options set, by the option's name. */
const RESUMABLE = ['split', 'timeout', 'retries', 'strikes', 'hosts', 'pre', 'post', 'overlay', 'report'] as const;

/** On --resume, the options given again (by any source) replace the session's. */
function resumeChanges(params: Partial<Record<(typeof RESUMABLE)[number], unknown>>, given: (name: SettingName) => boolean): Partial<SessionParams> {
  return Object.fromEntries(RESUMABLE.filter((name) => given(name)).map((name) => [name, params[name]])) as Partial<SessionParams>;
}

interface Template {
  readonly settings: Partial<Record<SettingName, string>>;
  readonly command?: string[];
}

/** A --template file: a YAML mapping of batch options (and `command`); every problem named at once. */
function readTemplate(file: string): Template {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    throw new ConfigError(`template "${file}": ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : errorMessage(error)}`);
  }
  let document: unknown;
  try {
    const { parse } = createRequire(import.meta.url)('yaml') as typeof import('yaml');
    document = parse(text);
  } catch (error) {
    throw new ConfigError(`template "${file}": not valid YAML: ${errorMessage(error).split('\n')[0]}`);
  }
  if (document === null || typeof document !== 'object' || Array.isArray(document)) throw new ConfigError(`template "${file}": must be a mapping of options (split: 4, hosts: ..., command: ...)`);
  const settings: Partial<Record<SettingName, string>> = {};
  let command: string[] | undefined;
  const problems: string[] = [];
  for (const [key, value] of Object.entries(document)) {
    if (key === 'command') {
      if (typeof value === 'string') command = [value];
      else if (Array.isArray(value) && value.every((word) => typeof word === 'string')) command = value as string[];
      else problems.push(`template "${file}": command: must be a string or a list of strings`);
    } else if (!(SETTINGS as readonly string[]).includes(key)) {
      problems.push(`template "${file}": ${key}: is not a batch option (${[...SETTINGS, 'command'].join(', ')})`);
    } else if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') {
      problems.push(`template "${file}": ${key}: must be a string or a number`);
    } else {
      const name = key as SettingName;
      let text = String(value);
      if (PATH_SETTINGS.includes(name) && !isAbsolute(text)) text = resolvePath(dirname(file), text);
      if (name === 'hosts' && text.startsWith('@') && !isAbsolute(text.slice(1))) text = `@${resolvePath(dirname(file), text.slice(1))}`;
      settings[name] = text;
    }
  }
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
  return { settings, ...(command === undefined ? {} : { command }) };
}

/**
 * SSH settings and kill grace: the worker's own settings (DROVER_SSH_*,
 * DROVER_KILL_*, or the --config file's ssh.* and engine.*), so one set
 * serves both; and the config, with the cloud settings the batch options give.
 */
async function sshSettings(file: string | undefined, flags: Record<string, string | undefined>) {
  const { loadConfig } = await import('../runtime/config.js');
  // Without --config, loadConfig reads DROVER_CONFIG.
  const config = loadConfig({ ...(file === undefined ? {} : { file }), flags });
  const { ssh } = config;
  return {
    ssh: {
      ...(ssh.identityFiles.length > 0 ? { identityFiles: ssh.identityFiles } : {}),
      ...(ssh.knownHosts ? { knownHostsFile: ssh.knownHosts } : {}),
      hostKeyPolicy: ssh.hostKeyPolicy,
      maxChannels: ssh.maxChannels,
      remoteAgent: ssh.remoteAgent,
      keepaliveIntervalMs: ssh.keepalive * 1000,
      killSignal: config.engine.killSignal,
      workDir: ssh.workDir,
    },
    ...(config.given.includes('engine.killGrace') ? { killGraceMs: config.engine.killGrace * 1000 } : {}),
    config,
  };
}

/** The --provider launch: the options given, over the session's (on --resume, with the same provider). */
function launchOptions(setting: (name: SettingName) => string | undefined, stored: ProviderLaunch | undefined, defaultSshUser: (provider: ProviderName) => string): ProviderLaunch | undefined {
  const name = (setting('provider') ?? stored?.provider) as ProviderName | undefined;
  if (name === undefined) {
    const stray = LAUNCH_SETTINGS.find((option) => setting(option) !== undefined);
    if (stray !== undefined) throw new UsageError(`--${stray} is an option of --provider; give --provider aws|gce too`);
    return undefined;
  }
  const base = stored?.provider === name ? stored : undefined;
  const instanceType = setting('instance-type') ?? base?.instanceType;
  const image = setting('image') ?? base?.image;
  if (instanceType === undefined || image === undefined) throw new UsageError(`--provider ${name} needs --instance-type and --image (what to launch)`);
  const network = setting('network') ?? base?.network;
  const key = setting('key') ?? base?.key;
  const settings = { ...base?.settings };
  for (const [option, path] of Object.entries(CLOUD_SETTING_FLAGS)) {
    const value = setting(option as SettingName);
    if (value !== undefined) settings[path] = value;
  }
  return {
    provider: name, instanceType, image, ...(network === undefined ? {} : { network }), ...(key === undefined ? {} : { key }),
    sshUser: setting('ssh-user') ?? base?.sshUser ?? defaultSshUser(name),
    ...(Object.keys(settings).length === 0 ? {} : { settings }),
  };
}

/** Asks on the terminal; true for "yes" (or "y"). */
async function confirm(question: string): Promise<boolean> {
  const rl = createInterface({ input: process.stdin, output: process.stdout });
  try {
    const answer = await new Promise<string>((resolve) => {
      rl.question(question, resolve);
      rl.once('close', () => resolve(''));
      // Ctrl-C at the question is a no (readline would only pause).
      rl.once('SIGINT', () => rl.close());
    });
    return /^y(es)?$/i.test(answer.trim());
  } finally {
    rl.close();
  }
}

/** What the user sees while the batch runs: a live line on a terminal, timestamped lines otherwise. */
async function createDisplay(terminal: boolean) {
  const { LiveLine, progressLine } = await import('../batch/progress.js');
  const stamp = (text: string) => `${new Date().toISOString()} ${text}`;
  if (!terminal) {
    const say = (text: string) => process.stdout.write(stamp(text) + '\n');
    return {
      say,
      job: (job: JobRecord) => say(describeJob(job)),
      host: (host: string, text: string) => say(`[${host}] ${text.trimEnd()}`),
      progress: undefined,
      end: () => {},
    };
  }
  const live = new LiveLine(process.stdout);
  let last = '';
  return {
    say: (text: string) => live.print(stamp(text)),
    // On a terminal only the jobs that went wrong get a line of their own; the live line counts the rest.
    job: (job: JobRecord) => {
      if (job.status === 'ok') return;
      live.print(stamp(describeJob(job)));
      if (last) live.draw(last);
    },
    host: (host: string, text: string) => {
      live.print(stamp(`[${host}] ${text.trimEnd()}`));
      if (last) live.draw(last);
    },
    progress: (progress: Progress) => {
      last = progressLine(progress);
      live.draw(last);
    },
    end: () => live.clear(),
  };
}

function isDirectory(path: string): boolean {
  try {
    return statSync(path).isDirectory();
  } catch {
    return false;
  }
}

/** A resume must not run other commands than the session's: the jobs on stdin, if any, must be the stored ones. */
function checkSameJobs(session: Session, input: string, command: readonly string[]): void {
  if (command.length > 0 && JSON.stringify(command) !== JSON.stringify(session.params.command)) {
    throw new ConfigError(`session ${session.id} runs ${JSON.stringify(session.params.command)}, not ${JSON.stringify(command)}; leave the command out to keep the session's`);
  }
  const lines = input.split('\n').filter((line) => line.trim().length > 0);
  if (lines.length === 0) return;
  if (jobsHash(lines) === session.params.jobsHash) return;
  const stored = session.jobs.map((job) => job.line);
  const at = stored.findIndex((line, i) => lines[i] !== line);
  const where = at >= 0 ? `job ${at + 1} is ${JSON.stringify(stored[at])} in the session but ${JSON.stringify(lines[at] ?? '(missing)')} on stdin` : `stdin has ${lines.length - stored.length} more jobs`;
  throw new ConfigError(`the jobs on stdin are not session ${session.id}'s (${stored.length} stored, ${lines.length} given; ${where}); refusing to resume. Pipe the same jobs, or none`);
}

export const sessionsCommand: Command = {
  usage: 'drover sessions [--sessions PATH]',
  summary: 'list batch sessions with their job counts',
  details: `Options:
  --sessions PATH          the sessions directory [~/.drover/sessions] (DROVER_SESSIONS)`,
  usesQueue: false,
  options: { sessions: { type: 'string' } },
  async run(values) {
    const { Session, defaultSessionsDir, sessionIds } = await import('../batch/session.js');
    const dir = values['sessions'] !== undefined ? resolvePath(values['sessions'] as string) : defaultSessionsDir(process.env);
    const rows = sessionIds(dir).flatMap((id) => {
      try {
        const session = Session.open(dir, String(id));
        const counts = session.counts();
        const command = session.params.command.join(' ');
        return [[String(id), session.params.created, String(session.jobs.length), String(counts.ok), String(counts.failed), String(counts.timeout), String(counts.pending + counts.running), command.length > 50 ? command.slice(0, 47) + '...' : command]];
      } catch {
        return [];
      }
    });
    const header = ['ID', 'CREATED', 'JOBS', 'OK', 'FAILED', 'TIMEOUT', 'PENDING', 'COMMAND'];
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
    process.stdout.write([header, ...rows].map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ')).join('\n') + '\n');
    return EXIT.OK;
  },
};

/** The --report hook: its failure is reported, and does not change the batch's exit code. */
async function runReport(command: string, session: Session, elapsedMs: number): Promise<void> {
  const { runShell } = await import('../batch/run.js');
  const counts = session.counts();
  const env = {
    ...process.env,
    DROVER_SESSION_ID: String(session.id),
    DROVER_SESSION_DIR: session.dir,
    DROVER_JOBS: String(session.jobs.length),
    DROVER_OK: String(counts.ok),
    DROVER_FAILED: String(counts.failed),
    DROVER_TIMEOUT: String(counts.timeout),
    DROVER_PENDING: String(counts.pending + counts.running),
    DROVER_ELAPSED: String(Math.round(elapsedMs / 1000)),
  };
  const code = await runShell(command, session.dir, (text) => process.stdout.write(text), env);
  if (code !== 0) process.stderr.write(`drover batch: the --report command exited with ${code ?? 'a signal'}\n`);
}

function describeJob(job: JobRecord): string {
  const seconds = ((job.durationMs ?? 0) / 1000).toFixed(1);
  const end = job.signal ? `signal ${job.signal}` : `exit ${job.exitCode ?? '-'}`;
  return `job ${job.n} ${job.status === 'pending' ? 'stopped' : job.status} slot ${job.slot ?? '-'} (${seconds} s, ${end}): ${job.line}`;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export type { Values };
