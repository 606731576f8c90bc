/**
 * The SSH transport's whole test file (ssh-transport.test.ts) once more,
 * with the remote agent off: every command through the shell wrapper, a
 * channel each, as on hosts without perl.
 */
process.env['DROVER_SSH_TEST_PATH'] = 'wrapper';
await import('./ssh-transport.test.js');
