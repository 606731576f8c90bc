/**
 * Options are compiled once: defaults, then the settings a cloud instance
 * was launched with (its user-data or attribute, when `host.type` is `aws`
 * or `gce`), then `DROVER_*` environment variables, then the config file
 * (YAML), then command-line flags; every problem is reported at once with
 * where it came from; the result is frozen. One table, SETTINGS, says everything about each setting; the
 * help text and README's config reference are made from it.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { ConfigError, errorMessage } from '../model/errors.js';
import { parseSshAddress } from '../hosts/ssh-address.js';
import type { InstanceConfig } from '../hosts/metadata.js';
import { EXTENSION_KEYS, extensionSettings, type ExtensionSettings } from './extension-settings.js';

type Kind = 'integer' | 'seconds' | 'boolean' | 'string' | 'signal' | 'level' | 'format' | 'queueType' | 'queueUrl' | 'engineType' | 'sshHosts' | 'selection' | 'hostKeyPolicy' | 'envMap' | 'hostType' | 'url' | 'provider';

/** One SSH host of `ssh.hosts`. */
export interface SshHostSetting {
  readonly address: string;
  readonly capacity?: number;
  readonly labels?: readonly string[];
}

export interface Setting {
  /** Dotted path in the config file: `queue.claimTimeout`. */
  readonly path: string;
  readonly env: string;
  readonly kind: Kind;
  readonly min?: number;
  readonly default: string | number | boolean;
  readonly description: string;
  /** The command-line flag, when it is not the last part of the path (`queue.url` is `--queue`). */
  readonly flag?: string;
}

export const SETTINGS: readonly Setting[] = [
  { path: 'workerId', env: 'DROVER_WORKER_ID', kind: 'string', default: '', description: 'Name of this worker in claims and logs; default `<hostname>-<pid>`.' },
  { path: 'capacity', env: 'DROVER_CAPACITY', kind: 'integer', min: 1, default: 1, description: 'How many tasks run at once; over SSH, by default the sum of the hosts\' capacities.' },
  { path: 'queue.type', env: 'DROVER_QUEUE_TYPE', kind: 'queueType', flag: 'queue-type', default: '', description: '`sqlite` or `postgres`; by default `postgres` when `queue.url` is set, else `sqlite`.' },
  { path: 'queue.dir', env: 'DROVER_QUEUE_DIR', kind: 'string', flag: 'queue-dir', default: '.drover', description: 'Directory of the embedded SQLite queue and its artifacts.' },
  { path: 'queue.url', env: 'DROVER_QUEUE', kind: 'queueUrl', flag: 'queue', default: '', description: 'The PostgreSQL queue that workers on many machines share: `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.' },
  { path: 'queue.schema', env: 'DROVER_QUEUE_SCHEMA', kind: 'string', flag: 'queue-schema', default: '', description: 'PostgreSQL schema of the queue\'s tables; default the URL\'s `?schema=`, else `drover`.' },
  { path: 'queue.artifactDir', env: 'DROVER_ARTIFACT_DIR', kind: 'string', default: '', description: 'PostgreSQL queue: keep artifacts as files in this directory, which every worker and reader must share; empty keeps them in PostgreSQL.' },
  { path: 'queue.claimTimeout', env: 'DROVER_CLAIM_TIMEOUT', kind: 'seconds', min: 1, default: 30, description: 'Length of a claim; workers renew it at half that. A dead worker\'s tasks return after at most this long.' },
  { path: 'queue.pollInterval', env: 'DROVER_POLL_INTERVAL', kind: 'seconds', min: 0.01, default: 0.2, description: 'How often an idle worker looks for new tasks; on PostgreSQL a new task wakes it at once and this is the fallback.' },
  { path: 'workDir', env: 'DROVER_WORK_DIR', kind: 'string', default: '.drover/work', description: 'Task directories and the crash journal.' },
  { path: 'requiredDiskSpaceMegabytes', env: 'DROVER_REQUIRED_DISK_SPACE_MEGABYTES', kind: 'integer', min: 0, default: 256, description: 'Free disk space (MB) the work directory must have before each claim: old task directories and idle caches are removed to make it, and while it cannot be made the worker claims nothing. 0 turns the check off.' },
  { path: 'pollWait', env: 'DROVER_POLL_WAIT', kind: 'seconds', min: 0.1, default: 10, description: 'How long one claim request waits for work (long poll).' },
  { path: 'shutdownGrace', env: 'DROVER_SHUTDOWN_GRACE', kind: 'seconds', min: 0, default: 30, description: 'After SIGTERM/SIGINT or a cloud instance\'s notice, how long running tasks may finish before they are aborted.' },
  { path: 'idleTimeout', env: 'DROVER_IDLE_TIMEOUT', kind: 'seconds', min: 0, default: 0, description: 'Stop after this long with nothing to do (exit code 3); 0 never stops.' },
  { path: 'numberOfTasksToRun', env: 'DROVER_NUMBER_OF_TASKS_TO_RUN', kind: 'integer', min: 0, default: 0, description: 'Stop after claiming this many tasks (exit code 0); 0 means no limit.' },
  { path: 'taskEnv', env: 'DROVER_TASK_ENV', kind: 'envMap', default: '', description: 'Environment variables of every task, under the payload\'s `env`: `NAME=value`, separated by commas; in the config file also a mapping.' },
  { path: 'secretTaskEnv', env: 'DROVER_SECRET_TASK_ENV', kind: 'envMap', default: '', description: 'Like `taskEnv`, but the values are secrets: masked as `[secret]` in live logs and in the worker\'s log.' },
  { path: 'engine.type', env: 'DROVER_ENGINE', kind: 'engineType', flag: 'engine', default: 'process', description: '`process` (the payload\'s command) or `script` (a script and its DEPS/ files, geto-style).' },
  { path: 'engine.killSignal', env: 'DROVER_KILL_SIGNAL', kind: 'signal', default: 'SIGTERM', description: 'First signal sent to a task\'s process group when it is aborted.' },
  { path: 'engine.killGrace', env: 'DROVER_KILL_GRACE', kind: 'seconds', min: 0, default: 5, description: 'How long after that signal before SIGKILL.' },
  { path: 'ssh.hosts', env: 'DROVER_SSH_HOSTS', kind: 'sshHosts', flag: 'ssh-hosts', default: '', description: 'Run tasks over SSH on these hosts: `user@name:port`, separated by commas; in the config file also a list of `{ address, capacity, labels }`.' },
  { path: 'ssh.hostsFile', env: 'DROVER_SSH_HOSTS_FILE', kind: 'string', flag: 'ssh-hosts-file', default: '', description: 'Or a file of SSH hosts, one `user@name:port [capacity=N] [labels=a,b]` a line.' },
  { path: 'ssh.capacity', env: 'DROVER_SSH_CAPACITY', kind: 'integer', min: 1, flag: 'ssh-capacity', default: 4, description: 'Tasks at once on an SSH host that does not say.' },
  { path: 'ssh.selection', env: 'DROVER_SSH_SELECTION', kind: 'selection', flag: 'selection', default: 'least-loaded', description: 'How an SSH host is chosen: `least-loaded` (fewest runs of the same script name), `round-robin` or `random`.' },
  { path: 'ssh.identityFile', env: 'DROVER_SSH_IDENTITY_FILE', kind: 'string', flag: 'identity-file', default: '', description: 'Private key files, separated by commas; default `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`. ssh-agent (`SSH_AUTH_SOCK`) is tried too.' },
  { path: 'ssh.knownHosts', env: 'DROVER_SSH_KNOWN_HOSTS', kind: 'string', flag: 'known-hosts', default: '', description: 'known_hosts file; default `~/.ssh/known_hosts`.' },
  { path: 'ssh.hostKeyPolicy', env: 'DROVER_SSH_HOST_KEY_POLICY', kind: 'hostKeyPolicy', flag: 'host-key-policy', default: 'strict', description: '`strict`: hosts must be in known_hosts; `accept-new`: unknown hosts\' keys are recorded; `off`: no check. A changed key is always refused.' },
  { path: 'ssh.maxChannels', env: 'DROVER_SSH_MAX_CHANNELS', kind: 'integer', min: 3, flag: 'max-channels', default: 8, description: 'Channels of an SSH connection, below the server\'s MaxSessions (10); one is SFTP, one is kept for control, the rest run commands.' },
  { path: 'ssh.remoteAgent', env: 'DROVER_SSH_REMOTE_AGENT', kind: 'boolean', flag: 'ssh-remote-agent', default: true, description: 'Start each SSH connection\'s commands through one remote agent (Perl) when the host has perl; `false`: each through the shell wrapper, in a channel of its own.' },
  { path: 'ssh.strikes', env: 'DROVER_SSH_STRIKES', kind: 'integer', min: 1, flag: 'strikes', default: 3, description: 'Failures in a row (lost connection, failed connect or probe) that retire an SSH host until the worker stops.' },
  { path: 'ssh.probation', env: 'DROVER_SSH_PROBATION', kind: 'seconds', min: 0, flag: 'probation', default: 30, description: 'How long a down SSH host rests before it is probed again.' },
  { path: 'ssh.keepalive', env: 'DROVER_SSH_KEEPALIVE', kind: 'seconds', min: 0.1, flag: 'keepalive', default: 5, description: 'SSH keepalive interval; three unanswered ones mark the host down.' },
  { path: 'ssh.workDir', env: 'DROVER_SSH_WORK_DIR', kind: 'string', flag: 'ssh-work-dir', default: '.drover/work', description: 'Task directories on each SSH host; relative to the remote home unless absolute.' },
  { path: 'cloud.provider', env: 'DROVER_CLOUD_PROVIDER', kind: 'provider', flag: 'provider', default: '', description: 'The cloud drover launches instances on: `aws` (EC2) or `gce` (Compute Engine); `drover instances` looks there.' },
  { path: 'aws.region', env: 'DROVER_AWS_REGION', kind: 'string', flag: 'aws-region', default: '', description: 'EC2 region; default the AWS SDK\'s (`AWS_REGION`, the profile\'s).' },
  { path: 'aws.endpoint', env: 'DROVER_AWS_ENDPOINT', kind: 'url', flag: 'aws-endpoint', default: '', description: 'EC2 API endpoint; default EC2\'s own for the region (a VPC endpoint, or the loopback one of `drover/testing`).' },
  { path: 'gce.project', env: 'DROVER_GCE_PROJECT', kind: 'string', flag: 'gce-project', default: '', description: 'Compute Engine project; default the credentials\' project.' },
  { path: 'gce.zone', env: 'DROVER_GCE_ZONE', kind: 'string', flag: 'gce-zone', default: '', description: 'Compute Engine zone (`europe-west1-b`); needed for `gce`.' },
  { path: 'gce.endpoint', env: 'DROVER_GCE_ENDPOINT', kind: 'url', flag: 'gce-endpoint', default: '', description: 'Compute Engine API endpoint; default Google\'s own.' },
  { path: 'host.type', env: 'DROVER_HOST', kind: 'hostType', flag: 'host', default: 'hardware', description: 'The machine the worker runs on: `hardware`, or a cloud instance, `aws` (EC2) or `gce` (Compute Engine), whose metadata gives settings and warns of a spot interruption or preemption.' },
  { path: 'host.metadataUrl', env: 'DROVER_METADATA_URL', kind: 'url', flag: 'metadata-url', default: 'http://169.254.169.254', description: '`aws`, `gce`: the instance metadata server.' },
  { path: 'host.noticeMargin', env: 'DROVER_NOTICE_MARGIN', kind: 'seconds', min: 0, flag: 'notice-margin', default: 20, description: '`aws`, `gce`: tasks still running this long before the instance is taken away are aborted (and re-queued), leaving time to upload their logs.' },
  { path: 'host.spotPollInterval', env: 'DROVER_SPOT_POLL_INTERVAL', kind: 'seconds', min: 0.1, flag: 'spot-poll-interval', default: 5, description: '`aws`: how often the spot interruption notice is looked for.' },
  { path: 'host.configAttribute', env: 'DROVER_CONFIG_ATTRIBUTE', kind: 'string', flag: 'config-attribute', default: 'drover-config', description: '`gce`: the instance attribute that holds drover settings (YAML or JSON).' },
  { path: 'logLevel', env: 'DROVER_LOG_LEVEL', kind: 'level', default: 'info', description: 'debug, info, warn or error.' },
  { path: 'logFormat', env: 'DROVER_LOG_FORMAT', kind: 'format', default: 'text', description: 'text or json.' },
];

export interface Config {
  readonly workerId: string;
  readonly capacity: number;
  readonly queue: {
    readonly type: 'sqlite' | 'postgres';
    readonly dir: string;
    /** The PostgreSQL URL; empty for SQLite. */
    readonly url: string;
    /** Empty: the URL's `?schema=`, else `drover`. */
    readonly schema: string;
    /** Empty: artifacts in PostgreSQL. */
    readonly artifactDir: string;
    readonly claimTimeout: number;
    readonly pollInterval: number;
  };
  readonly workDir: string;
  readonly requiredDiskSpaceMegabytes: number;
  readonly pollWait: number;
  readonly shutdownGrace: number;
  readonly idleTimeout: number;
  readonly numberOfTasksToRun: number;
  /** Empty: none. */
  readonly taskEnv: Readonly<Record<string, string>>;
  readonly secretTaskEnv: Readonly<Record<string, string>>;
  readonly engine: { readonly type: 'process' | 'script'; readonly killSignal: NodeJS.Signals; readonly killGrace: number };
  readonly ssh: {
    readonly hosts: readonly SshHostSetting[];
    /** Empty: none. */
    readonly hostsFile: string;
    readonly capacity: number;
    readonly selection: 'least-loaded' | 'round-robin' | 'random';
    /** Empty: the defaults. */
    readonly identityFiles: readonly string[];
    /** Empty: ~/.ssh/known_hosts. */
    readonly knownHosts: string;
    readonly hostKeyPolicy: 'strict' | 'accept-new' | 'off';
    readonly maxChannels: number;
    readonly remoteAgent: boolean;
    readonly strikes: number;
    readonly probation: number;
    readonly keepalive: number;
    readonly workDir: string;
  };
  /** Where instances are launched and looked for; empty strings: the SDKs' defaults (or not set). */
  readonly cloud: { readonly provider: '' | 'aws' | 'gce' };
  readonly aws: { readonly region: string; readonly endpoint: string };
  readonly gce: { readonly project: string; readonly zone: string; readonly endpoint: string };
  readonly host: {
    readonly type: 'hardware' | 'aws' | 'gce';
    readonly metadataUrl: string;
    readonly noticeMargin: number;
    readonly spotPollInterval: number;
    readonly configAttribute: string;
  };
  /** Paths of the settings given by a flag, the config file, the environment or the instance (not defaults). */
  readonly given: readonly string[];
  readonly logLevel: 'debug' | 'info' | 'warn' | 'error';
  readonly logFormat: 'text' | 'json';
  /** The config file it was read from, if any. */
  readonly file?: string;
  /** Where the instance's settings came from, and which of them no local source overrides (names only: values may be secret). */
  readonly instance?: { readonly source: string; readonly settings: readonly string[] };
  /** Engines and plugins loaded from npm modules the config file names (src/runtime/extensions.ts). */
  readonly extensions: ExtensionSettings;
}

export interface ConfigSources {
  /** Path of a YAML config file; a missing file is an error. */
  readonly file?: string;
  /** Values from command-line flags, by setting path; strings are parsed like env values. */
  readonly flags?: Readonly<Record<string, string | number | undefined>>;
  readonly env?: NodeJS.ProcessEnv;
  /**
   * Settings from the cloud instance (YAML or JSON), under every other source
   * but the defaults. When it is a mapping with a `drover` key, only that
   * section is read (so cloud-init's `#cloud-config` can carry it; one
   * without it holds no drover settings). Settings under `host` say where
   * this comes from and cannot be in it.
   */
  readonly instance?: InstanceConfig;
}

const SIGNALS = new Set(['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2', 'SIGKILL']);

export function loadConfig(sources: ConfigSources = {}): Config {
  const env = sources.env ?? process.env;
  const values = new Map<string, unknown>(SETTINGS.map((s) => [s.path, s.default]));
  const given = new Set<string>();
  /** The settings the instance gave that no local source overrides. */
  const fromInstance = new Set<string>();
  const problems: string[] = [];
  const take = (where: string, setting: Setting, raw: unknown) => {
    const parsed = coerce(setting, raw);
    if ('problem' in parsed) problems.push(`${where}: ${parsed.problem}`);
    else {
      values.set(setting.path, parsed.value);
      given.add(setting.path);
      fromInstance.delete(setting.path);
    }
  };
  /** A document's settings (flattened), `where` naming it in messages. */
  const takeAll = (where: string, settings: Record<string, unknown>, isInstance: boolean) => {
    for (const [path, raw] of Object.entries(settings)) {
      const setting = SETTINGS.find((s) => s.path === path);
      if (setting === undefined) problems.push(`${where}: ${path}: is not a known setting`);
      else if (isInstance && path.startsWith('host.')) problems.push(`${where}: ${path}: cannot be set by the instance; set it on the command line, in the environment or the config file`);
      else take(`${where}: ${path}`, setting, raw);
    }
  };
  if (sources.instance !== undefined) {
    takeAll(sources.instance.source, parseSettings(sources.instance.text, sources.instance.source, 'drover'), true);
    given.forEach((path) => fromInstance.add(path));
  }
  for (const setting of SETTINGS) {
    const raw = env[setting.env];
    if (raw !== undefined && raw !== '') take(`environment variable ${setting.env}`, setting, raw);
  }
  const file = sources.file ?? (env['DROVER_CONFIG'] || undefined);
  let extensions: ExtensionSettings = { plugins: [] };
  if (file !== undefined) {
    const settings = readConfigFile(file);
    const named = Object.fromEntries(Object.entries(settings).filter(([path]) => EXTENSION_KEYS.includes(path)));
    extensions = extensionSettings(file, named, problems);
    if (extensions.engine !== undefined && settings['engine.type'] !== undefined) problems.push(`config file "${file}": engine.type and engine.module both choose the engine; keep one`);
    takeAll(`config file "${file}"`, Object.fromEntries(Object.entries(settings).filter(([path]) => !EXTENSION_KEYS.includes(path))), false);
  }
  for (const [path, raw] of Object.entries(sources.flags ?? {})) {
    const setting = SETTINGS.find((s) => s.path === path);
    if (setting === undefined) throw new Error(`no setting ${path}`);
    if (raw !== undefined) take(`option --${flagName(setting)}`, setting, raw);
  }
  const get = <T>(path: string) => values.get(path) as T;
  // An engine named on the command line beats the config file's engine module.
  if (sources.flags?.['engine.type'] !== undefined) extensions = { plugins: extensions.plugins };
  // A URL says which queue is meant; a type that contradicts it is a mistake worth naming.
  const url = get<string>('queue.url');
  const type = get<string>('queue.type') || (url ? 'postgres' : 'sqlite');
  if (type === 'postgres' && !url) problems.push('queue.type is postgres, but no queue.url is set (--queue, DROVER_QUEUE or queue.url in the config file)');
  if (type === 'sqlite' && url) problems.push(`queue.type is sqlite, but queue.url is set to a PostgreSQL URL; drop one of them`);
  const hostType = get<Config['host']['type']>('host.type');
  if (hostType !== 'hardware' && (given.has('ssh.hosts') || given.has('ssh.hostsFile'))) {
    problems.push(`host.type is ${hostType}, which runs tasks on this instance, but SSH hosts are set (ssh.hosts, ssh.hostsFile); drop one of them`);
  }
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
  return Object.freeze({
    workerId: get<string>('workerId'),
    capacity: get<number>('capacity'),
    queue: Object.freeze({
      type: type as Config['queue']['type'],
      dir: get<string>('queue.dir'),
      url,
      schema: get<string>('queue.schema'),
      artifactDir: get<string>('queue.artifactDir'),
      claimTimeout: get<number>('queue.claimTimeout'),
      pollInterval: get<number>('queue.pollInterval'),
    }),
    workDir: get<string>('workDir'),
    requiredDiskSpaceMegabytes: get<number>('requiredDiskSpaceMegabytes'),
    pollWait: get<number>('pollWait'),
    shutdownGrace: get<number>('shutdownGrace'),
    idleTimeout: get<number>('idleTimeout'),
    numberOfTasksToRun: get<number>('numberOfTasksToRun'),
    taskEnv: Object.freeze({ ...(get<Record<string, string> | string>('taskEnv') || {}) as Record<string, string> }),
    secretTaskEnv: Object.freeze({ ...(get<Record<string, string> | string>('secretTaskEnv') || {}) as Record<string, string> }),
    engine: Object.freeze({ type: get<Config['engine']['type']>('engine.type'), killSignal: get<NodeJS.Signals>('engine.killSignal'), killGrace: get<number>('engine.killGrace') }),
    ssh: Object.freeze({
      hosts: Object.freeze(get<SshHostSetting[] | string>('ssh.hosts') || []) as readonly SshHostSetting[],
      hostsFile: get<string>('ssh.hostsFile'),
      capacity: get<number>('ssh.capacity'),
      selection: get<Config['ssh']['selection']>('ssh.selection'),
      identityFiles: Object.freeze(get<string>('ssh.identityFile').split(',').map((file) => file.trim()).filter(Boolean)),
      knownHosts: get<string>('ssh.knownHosts'),
      hostKeyPolicy: get<Config['ssh']['hostKeyPolicy']>('ssh.hostKeyPolicy'),
      maxChannels: get<number>('ssh.maxChannels'),
      remoteAgent: get<boolean>('ssh.remoteAgent'),
      strikes: get<number>('ssh.strikes'),
      probation: get<number>('ssh.probation'),
      keepalive: get<number>('ssh.keepalive'),
      workDir: get<string>('ssh.workDir'),
    }),
    cloud: Object.freeze({ provider: get<Config['cloud']['provider']>('cloud.provider') }),
    aws: Object.freeze({ region: get<string>('aws.region'), endpoint: get<string>('aws.endpoint') }),
    gce: Object.freeze({ project: get<string>('gce.project'), zone: get<string>('gce.zone'), endpoint: get<string>('gce.endpoint') }),
    host: Object.freeze({
      type: hostType,
      metadataUrl: get<string>('host.metadataUrl'),
      noticeMargin: get<number>('host.noticeMargin'),
      spotPollInterval: get<number>('host.spotPollInterval'),
      configAttribute: get<string>('host.configAttribute'),
    }),
    given: Object.freeze([...given]),
    logLevel: get<Config['logLevel']>('logLevel'),
    logFormat: get<Config['logFormat']>('logFormat'),
    ...(file === undefined ? {} : { file }),
    ...(sources.instance === undefined ? {} : { instance: Object.freeze({ source: sources.instance.source, settings: Object.freeze([...fromInstance]) }) }),
    extensions: Object.freeze(extensions),
  });
}

/** The flag that sets a setting: `queue.claimTimeout` -> `claim-timeout`. */
export function flagName(setting: Setting): string {
  if (setting.flag !== undefined) return setting.flag;
  return setting.path.split('.').pop()!.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}

/** Reads a YAML file into `{ 'queue.dir': value, ... }`. */
function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(`config file "${file}": ${code === 'ENOENT' ? 'not found' : `cannot be read (${code ?? String(error)})`}`);
  }
  return parseSettings(text, `config file "${file}"`);
}

/**
 * Parses a YAML (or JSON) document of settings into `{ 'queue.dir': value, ... }`;
 * `section`: when the document has this key, only what is under it.
 * Messages name `where` and never quote the document (it may hold secrets).
 */
function parseSettings(text: string, where: string, section?: string): Record<string, unknown> {
  let document: unknown;
  try {
    // Loaded only when a document is read: most commands never need a YAML parser.
    const { parse } = createRequire(import.meta.url)('yaml') as typeof import('yaml');
    document = parse(text);
  } catch (error) {
    throw new ConfigError(`${where}: not valid YAML or JSON: ${(error as Error).message.split('\n')[0]}`);
  }
  if (section !== undefined && isMapping(document) && section in document) document = document[section];
  // cloud-init's own settings, without a drover section, are not drover's.
  else if (section !== undefined && text.startsWith('#cloud-config')) return {};
  if (document === null || document === undefined) return {};
  if (!isMapping(document)) throw new ConfigError(`${where}: must be a mapping of settings`);
  const flat: Record<string, unknown> = {};
  const walk = (prefix: string, object: Record<string, unknown>) => {
    for (const [key, value] of Object.entries(object)) {
      const path = prefix ? `${prefix}.${key}` : key;
      const isSection = SETTINGS.some((s) => s.path.startsWith(path + '.'));
      if (isSection && isMapping(value)) walk(path, value);
      else flat[path] = value;
    }
  };
  walk('', document);
  return flat;
}

function isMapping(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** The value, or what is wrong with it. */
function coerce(setting: Setting, raw: unknown): { value: unknown } | { problem: string } {
  const text = typeof raw === 'string' ? raw.trim() : raw;
  switch (setting.kind) {
    case 'integer':
    case 'seconds': {
      const value = typeof text === 'number' ? text : typeof text === 'string' && text !== '' ? Number(text) : NaN;
      const unit = setting.kind === 'seconds' ? 'a number of seconds' : 'a whole number';
      if (!Number.isFinite(value) || (setting.kind === 'integer' && !Number.isInteger(value))) return { problem: `must be ${unit}, not ${JSON.stringify(raw)}` };
      if (setting.min !== undefined && value < setting.min) return { problem: `must be at least ${setting.min}, not ${value}` };
      return { value };
    }
    case 'boolean': {
      const word = typeof text === 'string' ? text.toLowerCase() : text;
      if (word === true || ['true', 'yes', 'on', '1'].includes(String(word))) return { value: true };
      if (word === false || ['false', 'no', 'off', '0'].includes(String(word))) return { value: false };
      return { problem: `must be true or false, not ${JSON.stringify(raw)}` };
    }
    case 'string':
      return typeof text === 'string' && text !== '' ? { value: text } : { problem: `must be a non-empty string, not ${JSON.stringify(raw)}` };
    case 'signal':
      return typeof text === 'string' && SIGNALS.has(text.toUpperCase()) ? { value: text.toUpperCase() } : { problem: `must be one of ${[...SIGNALS].join(', ')}, not ${JSON.stringify(raw)}` };
    case 'level':
      return ['debug', 'info', 'warn', 'error'].includes(String(text)) ? { value: text } : { problem: `must be debug, info, warn or error, not ${JSON.stringify(raw)}` };
    case 'queueType':
      return ['sqlite', 'postgres'].includes(String(text)) ? { value: text } : { problem: `must be sqlite or postgres, not ${JSON.stringify(raw)}` };
    case 'queueUrl':
      // The URL's password stays out of the message.
      return typeof text === 'string' && /^postgres(ql)?:\/\/./.test(text)
        ? { value: text }
        : { problem: `must be a PostgreSQL URL, postgres://USER@HOST:PORT/DATABASE, not ${JSON.stringify(String(raw).replace(/:[^:@/]*@/, ':***@'))}` };
    case 'format':
      return ['text', 'json'].includes(String(text)) ? { value: text } : { problem: `must be text or json, not ${JSON.stringify(raw)}` };
    case 'engineType':
      return ['process', 'script'].includes(String(text)) ? { value: text } : { problem: `must be process or script, not ${JSON.stringify(raw)}` };
    case 'selection':
      return ['least-loaded', 'round-robin', 'random'].includes(String(text)) ? { value: text } : { problem: `must be least-loaded, round-robin or random, not ${JSON.stringify(raw)}` };
    case 'hostKeyPolicy':
      return ['strict', 'accept-new', 'off'].includes(String(text)) ? { value: text } : { problem: `must be strict, accept-new or off, not ${JSON.stringify(raw)}` };
    case 'provider':
      return ['aws', 'gce'].includes(String(text)) ? { value: text } : { problem: `must be aws or gce, not ${JSON.stringify(raw)}` };
    case 'sshHosts':
      return sshHosts(text);
    case 'envMap':
      return envMap(raw);
    case 'hostType':
      return ['hardware', 'aws', 'gce'].includes(String(text)) ? { value: text } : { problem: `must be hardware, aws or gce, not ${JSON.stringify(raw)}` };
    case 'url':
      return typeof text === 'string' && /^https?:\/\/[^/\s]+/.test(text) ? { value: text } : { problem: `must be an http:// or https:// URL, not ${JSON.stringify(raw)}` };
  }
}

/** `taskEnv`: `NAME=value` separated by commas, or a mapping of names to strings; values stay out of messages. */
function envMap(raw: unknown): { value: Record<string, string> } | { problem: string } {
  const entries: [string, unknown][] = typeof raw === 'string'
    ? raw.split(',').map((item) => item.trim()).filter(Boolean).map((item) => {
      const at = item.indexOf('=');
      return at < 0 ? [item, undefined] : [item.slice(0, at).trim(), item.slice(at + 1)];
    })
    : raw !== null && typeof raw === 'object' && !Array.isArray(raw) ? Object.entries(raw) : [];
  if (entries.length === 0) return { problem: 'must be NAME=value pairs separated by commas, or a mapping of names to values' };
  const value: Record<string, string> = {};
  const problems: string[] = [];
  for (const [name, item] of entries) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) problems.push(`${JSON.stringify(name)} is not an environment variable name`);
    else if (typeof item !== 'string' && typeof item !== 'number') problems.push(`${name} must have a value (NAME=value)`);
    else value[name] = String(item);
  }
  return problems.length > 0 ? { problem: problems.join('; ') } : { value };
}

/** `ssh.hosts`: a comma-separated string of addresses, or a list of addresses and `{ address, capacity, labels }`. */
function sshHosts(raw: unknown): { value: SshHostSetting[] } | { problem: string } {
  const items: unknown[] = typeof raw === 'string' ? raw.split(/[\s,]+/).filter(Boolean) : Array.isArray(raw) ? raw : [];
  if (items.length === 0) return { problem: 'must list SSH hosts: user@name:port, separated by commas, or a list of { address, capacity, labels }' };
  const hosts: SshHostSetting[] = [];
  const problems: string[] = [];
  items.forEach((item, i) => {
    const entry = typeof item === 'string' ? { address: item } : item;
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) {
      problems.push(`[${i}]: must be an address or { address, capacity, labels }`);
      return;
    }
    const { address, capacity, labels, ...rest } = entry as Record<string, unknown>;
    for (const key of Object.keys(rest)) problems.push(`[${i}].${key}: is not a known property (address, capacity, labels)`);
    if (typeof address !== 'string') {
      problems.push(`[${i}].address: must be user@name:port`);
      return;
    }
    try {
      parseSshAddress(address);
    } catch (error) {
      problems.push(`[${i}]: ${errorMessage(error)}`);
      return;
    }
    if (capacity !== undefined && (!Number.isInteger(capacity) || (capacity as number) < 1)) problems.push(`[${i}].capacity: must be a whole number of at least 1`);
    if (labels !== undefined && !(Array.isArray(labels) && labels.every((label) => typeof label === 'string'))) problems.push(`[${i}].labels: must be a list of strings`);
    hosts.push({ address, ...(capacity === undefined ? {} : { capacity: capacity as number }), ...(labels === undefined ? {} : { labels: labels as string[] }) });
  });
  return problems.length > 0 ? { problem: problems.join('; ') } : { value: hosts };
}

/** The config reference, as a Markdown table (README) or aligned text (--help). */
export function describeSettings(format: 'markdown' | 'text', skipFlags: readonly string[] = []): string {
  if (format === 'markdown') {
    const rows = SETTINGS.map((s) => `| \`${s.path}\` | \`--${flagName(s)}\` | \`${s.env}\` | ${s.default === '' ? '' : `\`${s.default}\``} | ${s.description} |`);
    return ['| setting | flag | environment | default | meaning |', '| --- | --- | --- | --- | --- |', ...rows].join('\n');
  }
  return SETTINGS.filter((s) => !skipFlags.includes(flagName(s))).map((s) => `  --${flagName(s).padEnd(22)} ${s.description}${s.default === '' ? '' : ` [${s.default}]`}`).join('\n');
}
