/**
 * drover's own engines pass the engine conformance suite of drover/testing:
 * the process and script engines on this machine, and over SSH against a
 * real OpenSSH server on loopback.
 */
import { randomUUID } from 'node:crypto';
import t from 'tap';
import { ProcessEngine } from '../src/engines/process.js';
import { ScriptEngine } from '../src/engines/script.js';
import { SshTransport } from '../src/hosts/ssh-transport.js';
import { engineConformance } from '../src/testing/engine-conformance.js';
import { engineFromModule } from '../src/testing/from-module.js';
import { requireSshd, sshd } from './helpers/sshd.js';

const KILL_GRACE_MS = 300;

const SCRIPT_MALFORMED = [{ name: 'conformance' }, { name: 'conformance', script: 'true', scriptFile: '/x' }, { name: 'conformance', scriptFile: '/nonexistent/script.sh' }];
const PROCESS_MALFORMED = [{}, { command: '' }, { command: '   ' }, { command: [] }, { command: [''] }, { command: 'true', env: { A: 1 } }];

t.test('process engine, local transport', async (t) => {
  engineConformance(t, () => ({
    engine: new ProcessEngine({ killGraceMs: KILL_GRACE_MS }),
    payload: (script) => ({ command: script }),
    malformedPayloads: PROCESS_MALFORMED,
  }));
});

t.test('script engine, local transport', async (t) => {
  engineConformance(t, () => ({
    engine: new ScriptEngine({ killGraceMs: KILL_GRACE_MS }),
    payload: (script) => ({ name: 'conformance', script }),
    malformedPayloads: SCRIPT_MALFORMED,
  }));
});

t.test('process and script engines over SSH', async (t) => {
  if (!requireSshd(t)) return;
  const server = await sshd(t);
  const transport = new SshTransport({ address: server.address, identityFiles: [server.identityFile], knownHostsFile: server.knownHostsFile, agent: false });
  t.teardown(() => transport.close());
  const workDir = transport.join(await transport.home(), `conformance-${randomUUID().slice(0, 8)}`);
  await transport.mkdir(workDir);
  t.teardown(() => transport.remove(workDir));
  // The worker's PATH, HOME... mean nothing on another machine, as in `drover worker` over SSH.
  const options = { killGraceMs: KILL_GRACE_MS, env: { PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8' } };
  t.test('process engine', async (t) => {
    engineConformance(t, () => ({ engine: new ProcessEngine(options), payload: (script) => ({ command: script }), malformedPayloads: PROCESS_MALFORMED, transport, workDir }));
  });
  t.test('script engine', async (t) => {
    engineConformance(t, () => ({ engine: new ScriptEngine(options), payload: (script) => ({ name: 'conformance', script }), malformedPayloads: SCRIPT_MALFORMED, transport, workDir }));
  });
});

t.test('engineFromModule makes an engine as the worker does', async (t) => {
  const module = {
    default: {
      configSchema: { type: 'object', properties: { killGraceMs: { type: 'integer' } } },
      createEngine: (config: { killGraceMs?: number }) => new ProcessEngine(config),
    },
  };
  t.equal((await engineFromModule(module, { killGraceMs: 100 })).name, 'process');
  await t.rejects(engineFromModule(module, { killGraceMs: 'soon' }), { code: 'DROVER_CONFIG', message: /config\.killGraceMs: must be integer/ });
  await t.rejects(engineFromModule({ default: { createEngine: () => ({ name: 'half' }) } }), { message: /needs must be \{ exec: boolean, files: boolean \}; prepare must be a function/ });
});
