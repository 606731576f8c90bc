/**
 * drover's public API: the contracts an extension implements, and the
 * shipped parts a program composes into a worker or a batch. Test helpers
 * live in `drover/testing`, the SSH offloader in `drover/offload`.
 */
export type { Engine, RunResult, Sandbox, SandboxBuilder } from './engines/engine.js';
export type { Host } from './hosts/host.js';
export type { Transport, DirectoryEntry } from './hosts/transport.js';
export type { Plugin, TaskPlugin, TaskPluginOptions, PluginWorkerOptions, Verdict, BuildSandboxContext } from './plugins/plugin.js';
export type { Queue, ArtifactMeta, ArtifactInfo, RunStatus, TaskStatus } from './queues/queue.js';
export type { Claim, Payload, TaskDefinition, TaskId, TaskState, RunRef } from './model/task.js';
export type { JsonSchemaObject } from './runtime/schema.js';
export type { EngineExtension, PluginExtension, ExtensionContext } from './runtime/extensions.js';
export type { Logger } from './runtime/logger.js';
export type { ExceptionReason, Resolution } from './model/resolution.js';
export { EXCEPTION_REASONS, describeResolution } from './model/resolution.js';
export {
  DroverError,
  MalformedPayloadError,
  InternalError,
  ResourceUnavailableError,
  ConfigError,
  ClaimLostError,
  QueueUnavailableError,
  TaskStateError,
} from './model/errors.js';

export { startWorker, type Worker, type WorkerOptions } from './runtime/worker.js';
export { SqliteQueue, type SqliteQueueOptions } from './queues/sqlite.js';
export { PostgresQueue, type PostgresQueueOptions } from './queues/postgres.js';
export { ProcessEngine, type ProcessEngineOptions } from './engines/process.js';
export { ScriptEngine, type ScriptEngineOptions } from './engines/script.js';
export { HardwareHost, type HardwareHostOptions } from './hosts/local.js';
export { SshHost, type SshHostOptions, type SshHostEntry } from './hosts/ssh-host.js';
export { AwsHost, Ec2Metadata, type AwsHostOptions, type Ec2MetadataOptions } from './hosts/aws.js';
export { GceHost, GceMetadata, type GceHostOptions, type GceMetadataOptions } from './hosts/gce.js';
export { InstanceHost, type InstanceMetadata, type InterruptionNotice } from './hosts/metadata.js';
export { livelogPlugin } from './plugins/livelog.js';
export { successPlugin, type SuccessPluginOptions } from './plugins/success.js';
export { envPlugin, type EnvPluginOptions } from './plugins/env.js';
export { maxruntimePlugin } from './plugins/maxruntime.js';
export { artifactsPlugin } from './plugins/artifacts.js';
export { shippedPlugins, type ShippedPluginsConfig } from './plugins/index.js';
export { gcPlugin, type GcPlugin, type GcPluginOptions } from './plugins/gc.js';
export { runBatch, type BatchOptions, type SessionOutcome } from './batch/run.js';
export type { BatchHostSource, BatchHostSet } from './batch/hosts.js';
export { providerHosts, type ProviderHostsOptions, type ProviderLaunch } from './batch/provider-hosts.js';
export type { Provider, ProviderName, LaunchSpec, CloudInstance } from './cloud/provider.js';
export { createProvider } from './cloud/providers.js';
export { InstanceFleet, type FleetOptions } from './cloud/instance-runtime.js';
export { SessionRegistry } from './cloud/sessions.js';
export { Watchdog, type WatchdogOptions } from './cloud/watchdog.js';
