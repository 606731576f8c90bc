/**
 * The process engine's whole test file (process-engine.test.ts) once more,
 * with the local transport's commands started by the spawner, as on a
 * machine without perl.
 */
process.env['DROVER_LOCAL_TEST_STARTER'] = 'spawner';
await import('./process-engine.test.js');
