/** `drover worker`: the composition of the shipped parts into one worker process, with its signals. */
import { hostname } from 'node:os';
import { resolve as resolvePath } from 'node:path';
import type { Engine } from '../engines/engine.js';
import { ProcessEngine, type ProcessEngineOptions } from '../engines/process.js';
import type { Host } from '../hosts/host.js';
import { HardwareHost } from '../hosts/local.js';
import { InstanceHost, type InstanceConfig, type InstanceMetadata } from '../hosts/metadata.js';
import { ResourceUnavailableError, errorMessage } from '../model/errors.js';
import type { Logger } from '../runtime/logger.js';
import { SecretMasker, maskedLogger } from '../plugins/env.js';
import { shippedPlugins } from '../plugins/index.js';
import type { Plugin } from '../plugins/plugin.js';
import type { Queue } from '../queues/queue.js';
import type { Config } from '../runtime/config.js';
import { withExtensions } from '../runtime/extensions.js';
import { joinedPayloadSchema } from '../runtime/schema.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import { startWorker } from '../runtime/worker.js';
import { EXIT, exitCodeFor } from './exit-codes.js';

export async function runWorker(config: Config, queue: Queue, once: boolean, workerLogger: Logger): Promise<number> {
  // Secret task env values stay out of the worker's log as well as the live logs.
  const logger = maskedLogger(workerLogger, new SecretMasker(Object.values(config.secretTaskEnv)));
  const workDir = resolvePath(config.workDir);
  if (config.instance) logger.info('settings from the instance', { source: config.instance.source, settings: config.instance.settings.join(',') || 'none' });
  // A set-up error (a bad hosts file, a module that cannot be loaded) is a config error: the queue
  // is closed so that the process can exit (a PostgreSQL pool would keep it alive).
  const closeQueue = async (error: unknown): Promise<never> => {
    await queue.close();
    throw error;
  };
  const { host, capacity, remote } = await hostFor(config, workDir, logger).catch(closeQueue);
  const { engine, plugins } = await workerParts(config, remote).catch(closeQueue);
  const worker = startWorker({
    workerId: config.workerId || `${hostname()}-${process.pid}`,
    queue,
    host,
    engine,
    plugins,
    workDir,
    logger,
    capacity,
    maxTasks: config.numberOfTasksToRun,
    once,
    idleTimeoutMs: config.idleTimeout * 1000,
    shutdownGraceMs: config.shutdownGrace * 1000,
    pollWaitMs: config.pollWait * 1000,
  });
  // Shutdown has a hard deadline: the grace period, then time for aborted tasks to report.
  let deadline: NodeJS.Timeout | undefined;
  const startDeadline = () => {
    deadline ??= setTimeout(() => {
      logger.error('shutdown did not finish within its deadline; exiting', { state: worker.state() });
      process.exit(EXIT.INTERNAL);
    }, (config.shutdownGrace + config.queue.claimTimeout + 10) * 1000).unref();
  };
  const onSignal = (signal: NodeJS.Signals) => {
    logger.info(deadline === undefined ? 'shutting down gracefully; send the signal again to abort tasks now' : 'aborting running tasks', { signal });
    startDeadline();
    worker.shutdown({ kind: 'signal', signal });
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  host.shutdown.addEventListener('abort', () => {
    startDeadline();
    // An instance that goes at a known time: the grace period ends early enough to abort, report and upload the rest.
    const goneAt = host.shutdownDeadline;
    worker.shutdown({ kind: 'host', message: String(host.shutdown.reason) }, goneAt === undefined ? {} : { abortTasksAt: goneAt - config.host.noticeMargin * 1000 });
  });
  try {
    const { reason } = await worker.stopped;
    const code = exitCodeFor(reason);
    logger.info('worker stopped', { reason: reason.kind, ...('message' in reason ? { message: reason.message } : {}), exitCode: code });
    return code;
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    clearTimeout(deadline);
    await queue.close();
  }
}

/** The engine and plugins a worker with this config runs tasks with, extensions included; `remote`: over SSH. */
export async function workerParts(config: Config, remote: boolean): Promise<{ engine: Engine; plugins: Plugin[] }> {
  const context = { remote, killSignal: config.engine.killSignal, killGraceMs: config.engine.killGrace * 1000 };
  return withExtensions(await shippedParts(config, remote), config.extensions, context);
}

async function shippedParts(config: Config, remote: boolean): Promise<{ engine: Engine; plugins: Plugin[] }> {
  const engineOptions: ProcessEngineOptions = {
    killSignal: config.engine.killSignal,
    killGraceMs: config.engine.killGrace * 1000,
    // The worker's own PATH, HOME... mean nothing on another machine.
    ...(remote ? { env: { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: process.env['LANG'] || 'C.UTF-8' } } : {}),
  };
  let engine: Engine;
  if (config.engine.type === 'script') {
    const { ScriptEngine } = await import('../engines/script.js');
    engine = new ScriptEngine(engineOptions);
  } else {
    engine = new ProcessEngine(engineOptions);
  }
  return { engine, plugins: shippedPlugins({ ...config, gc: { workDir: resolvePath(config.workDir), requiredDiskSpaceMegabytes: config.requiredDiskSpaceMegabytes, remote } }) };
}

/** The payload schema of a worker with this config: its engine's and plugins' joined, as the worker validates payloads. */
export async function workerPayloadSchema(config: Config): Promise<JsonSchemaObject> {
  const parts = await workerParts(config, false);
  return { title: `drover task payload (engine ${parts.engine.name})`, ...joinedPayloadSchema(parts) };
}

/**
 * On a cloud instance (`host.type` aws or gce), the config again with the
 * settings the instance was launched with under the local ones; `reload`
 * compiles the local sources with them. Elsewhere, `local` as it is.
 */
export async function withInstanceConfig(local: Config, reload: (instance: InstanceConfig) => Config): Promise<Config> {
  const metadata = await instanceMetadata(local);
  if (metadata === undefined) return local;
  const instance = await metadata.userConfig(AbortSignal.timeout(30_000)).catch((error: unknown) => {
    throw new ResourceUnavailableError(`host.type is ${local.host.type}, but its settings could not be read from the metadata server at ${metadata.url}: ${errorMessage(error)}`, { cause: error });
  });
  return instance === undefined ? local : reload(instance);
}

/** The metadata server of the cloud instance `host.type` names; undefined on `hardware`. */
async function instanceMetadata(config: Config): Promise<InstanceMetadata | undefined> {
  const { host } = config;
  if (host.type === 'aws') {
    const { Ec2Metadata } = await import('../hosts/aws.js');
    return new Ec2Metadata({ url: host.metadataUrl, spotPollMs: host.spotPollInterval * 1000 });
  }
  if (host.type === 'gce') {
    const { GceMetadata } = await import('../hosts/gce.js');
    return new GceMetadata({ url: host.metadataUrl, configAttribute: host.configAttribute });
  }
  return undefined;
}

/** This machine (a cloud instance with `host.type`), or the SSH hosts the config lists; over SSH the capacity defaults to the sum of the hosts'. */
async function hostFor(config: Config, workDir: string, logger: Logger): Promise<{ host: Host; capacity: number; remote: boolean }> {
  const { ssh } = config;
  if (ssh.hosts.length === 0 && !ssh.hostsFile) {
    const metadata = await instanceMetadata(config);
    const host = metadata === undefined ? new HardwareHost({ workDir }) : new InstanceHost(config.host.type, metadata, { workDir });
    return { host, capacity: config.capacity, remote: false };
  }
  // The SSH stack (ssh2) loads only for workers that use it.
  const { SshHost, parseHostsFile } = await import('../hosts/ssh-host.js');
  const host = new SshHost({
    hosts: [...ssh.hosts, ...(ssh.hostsFile ? parseHostsFile(ssh.hostsFile) : [])],
    defaultCapacity: ssh.capacity,
    selection: ssh.selection,
    ...(ssh.identityFiles.length > 0 ? { identityFiles: ssh.identityFiles } : {}),
    ...(ssh.knownHosts ? { knownHostsFile: ssh.knownHosts } : {}),
    hostKeyPolicy: ssh.hostKeyPolicy,
    maxChannels: ssh.maxChannels,
    remoteAgent: ssh.remoteAgent,
    strikes: ssh.strikes,
    probationMs: ssh.probation * 1000,
    keepaliveIntervalMs: ssh.keepalive * 1000,
    killSignal: config.engine.killSignal,
    killGraceMs: config.engine.killGrace * 1000,
    workDir: ssh.workDir,
    logger,
  });
  return { host, capacity: config.given.includes('capacity') ? config.capacity : host.capacity, remote: true };
}
