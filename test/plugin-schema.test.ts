/**
 * `drover schema`: the payload schema a worker checks tasks against, printed
 * as one JSON Schema joined from the engine's and every plugin's parts, so
 * that editors and task authors can check task files before submitting them.
 */
import t from 'tap';
import { Ajv } from 'ajv';
import { drover } from './helpers/drover.js';

interface PrintedSchema {
  $schema: string;
  title: string;
  properties: Record<string, unknown>;
  required: string[];
  additionalProperties: boolean;
}

async function printedSchema(args: readonly string[] = []): Promise<PrintedSchema> {
  const result = await drover(['schema', ...args], { cwd: t.testdir({}) });
  if (result.code !== 0) throw new Error(`drover schema exited ${result.code}: ${result.stderr}`);
  return JSON.parse(result.stdout) as PrintedSchema;
}

t.test('prints the engine\'s and the plugins\' properties as one schema that refuses unknown keys', async (t) => {
  const schema = await printedSchema();
  t.equal(schema.$schema, 'http://json-schema.org/draft-07/schema#');
  t.match(schema.title, 'engine process');
  for (const property of ['command', 'env', 'maxRunTime', 'onExitStatus']) t.ok(property in schema.properties, `has ${property}`);
  t.same(schema.required, ['command']);
  t.equal(schema.additionalProperties, false);
});

t.test('the printed schema judges payloads as the worker does', async (t) => {
  const validate = new Ajv({ allErrors: true }).compile(await printedSchema());
  t.ok(validate({ command: 'make test', maxRunTime: 60, onExitStatus: { retry: [75] } }), 'a good payload passes');
  t.notOk(validate({ command: 'x', colour: 'blue' }), 'an unknown key is refused');
  t.notOk(validate({ command: 'x', onExitStatus: { retry: ['75'] } }), 'a plugin\'s part is checked too');
  t.notOk(validate({ env: {} }), 'command is required');
});

t.test('--engine picks another engine\'s schema; an unknown engine is a usage error', async (t) => {
  const script = await printedSchema(['--engine', 'script']);
  t.match(script.title, 'engine script');
  t.ok('onExitStatus' in script.properties, 'the plugins are the same');
  const bad = await drover(['schema', '--engine', 'nope'], { cwd: t.testdir({}) });
  t.equal(bad.code, 2);
  t.match(bad.stderr, 'must be process or script');
});

t.test('drover schema --help and the overview describe it', async (t) => {
  const help = await drover(['schema', '--help'], { cwd: t.testdir({}) });
  t.equal(help.code, 0);
  t.match(help.stdout, 'Usage: drover schema');
  const overview = await drover(['--help'], { cwd: t.testdir({}) });
  t.match(overview.stdout, '  schema ');
});
