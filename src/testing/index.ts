/** drover/testing: the conformance kits and fakes drover exports to extension authors. */
export { queueConformance, type MakeQueue, type QueueFixture } from './queue-conformance.js';
export {
  checkMachine, checkModel, formatPath, formatViolation, stateName, summarize, violated, Violated,
  type ActorModel, type CheckKind, type CheckResult, type ChildView, type Happening, type LeadsTo, type LiveChild, type MachineModel,
  type ModelEvent, type ModelPath, type ModelStep, type Outcomes, type PathInvariant, type StepFacts, type Violation,
} from './model-check.js';
export { allStateNodes, allTransitions, cloneConfig, instrumentMachine, isIgnored, rebuildMachine, stateConfig, transitionKey, type StateConfig } from './machine-config.js';
export { instanceInvariants, instanceModel, MACHINE_MODELS, taskInvariants, taskModel, workerInvariants, workerModel } from './machine-models.js';
export { localTestHost, startTaskRun, type TaskRun, type TaskRunOptions } from './task-run.js';
export { expectedHooks, replayTaskPath, unrealizable, type ReplayResult } from './task-replay.js';
export { MockEngine, type MockClock, type MockEngineOptions, type MockPoint, type MockRun, type MockScript } from '../engines/mock.js';
export { MemoryQueue, MemoryStore, type MemoryQueueHooks, type MemoryQueueOptions } from '../queues/memory.js';
export { findSshd, startSshd, TEST_SSH_USER, type StartSshdOptions, type TestSshd } from './sshd.js';
export { startEc2Endpoint, type Ec2Endpoint, type Ec2EndpointOptions } from './ec2-endpoint.js';
export { startComputeEndpoint, type ComputeEndpoint, type ComputeEndpointOptions } from './compute-endpoint.js';
export { CloudFaults, dummyCloudCredentials, type CallRecord, type CloudEndpoint, type FakeCloudOptions, type FakeInstance, type FakeInstanceState } from './cloud-endpoint.js';
export { startImds, type ImdsOptions, type ImdsRequest, type SpotNotice, type TestImds } from './imds.js';
export { startGceMetadata, type GceMetadataServerOptions, type GceMetadataRequest, type MaintenanceEvent, type TestGceMetadata } from './gce-metadata.js';
export {
  pluginHarness, runPluginLifecycle,
  type PluginHarness, type PluginHarnessOptions, type PluginRunOptions, type PluginRunOutcome, type TaskHook,
} from './plugin-harness.js';
export { engineConformance, type EngineFixture, type MakeEngine } from './engine-conformance.js';
export { engineFromModule, pluginFromModule } from './from-module.js';
