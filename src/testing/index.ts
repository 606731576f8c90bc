/** drover/testing: the conformance kits and fakes drover exports to extension authors. */
export { queueConformance, type MakeQueue, type QueueFixture } from './queue-conformance.js';
