/**
 * Payload schemas: the engine and every plugin each own some top-level
 * properties of the payload; they are joined into one JSON Schema that
 * refuses unknown keys, and a payload is checked against it once, with
 * every problem reported at once, each at its JSON path.
 */
import { Ajv, type ErrorObject } from 'ajv';
import type { Engine } from '../engines/engine.js';
import { MalformedPayloadError, type PayloadProblem } from '../model/errors.js';
import type { Plugin } from '../plugins/plugin.js';

/** A JSON Schema for an object: its properties and which are required. */
export interface JsonSchemaObject {
  readonly type: 'object';
  readonly properties: Readonly<Record<string, unknown>>;
  readonly required?: readonly string[];
  readonly [keyword: string]: unknown;
}

export interface SchemaPart {
  /** Who owns these properties, for error messages: `engine process`, `plugin livelog`. */
  readonly owner: string;
  readonly schema: JsonSchemaObject;
}

/** Joins the parts into one payload schema; two owners of one property is a configuration error. */
export function joinPayloadSchemas(parts: readonly SchemaPart[]): JsonSchemaObject {
  const properties: Record<string, unknown> = {};
  const owners: Record<string, string> = {};
  const required = new Set<string>();
  for (const { owner, schema } of parts) {
    for (const [key, value] of Object.entries(schema.properties)) {
      if (owners[key] !== undefined) {
        throw new Error(`payload property "${key}" is declared by both ${owners[key]} and ${owner}`);
      }
      owners[key] = owner;
      properties[key] = value;
    }
    for (const key of schema.required ?? []) required.add(key);
  }
  return { type: 'object', properties, required: [...required].sort(), additionalProperties: false };
}

/** The payload schema of an engine and its plugins, joined as the worker checks payloads. */
export function joinedPayloadSchema(parts: { readonly engine: Engine; readonly plugins: readonly Plugin[] }): JsonSchemaObject {
  return joinPayloadSchemas([
    { owner: `engine ${parts.engine.name}`, schema: parts.engine.payloadSchema },
    ...parts.plugins.flatMap((plugin) => (plugin.payloadSchema ? [{ owner: `plugin ${plugin.name}`, schema: plugin.payloadSchema }] : [])),
  ]);
}

export type PayloadValidator = (payload: unknown) => void;

/**
 * Compiles a schema once; the validator throws MalformedPayloadError listing every problem.
 * `checked`: jsonSchemaProblems() found none already, so ajv need not check it against the
 * meta-schema again (compiling that costs 20-25 ms per call).
 */
export function compilePayloadValidator(schema: JsonSchemaObject, { checked = false } = {}): PayloadValidator {
  const ajv = new Ajv({ allErrors: true, strict: false, verbose: true, validateSchema: !checked });
  const validate = ajv.compile(schema);
  return (payload) => {
    if (validate(payload)) return;
    throw new MalformedPayloadError(collapseAlternatives(validate.errors ?? []).map((error) => toProblem(error)));
  };
}

let metaChecker: Ajv | undefined;

/**
 * What is wrong with `schema` as a JSON Schema (draft-07), each problem at its path under `root`
 * (`payloadSchema.properties.note.minLength: must be integer`); none when it is one. For schemas
 * that come from outside drover (extensions), checked where they come in, so the message can say whose.
 */
export function jsonSchemaProblems(schema: object, root: string): string[] {
  // One checker for every call: it compiles the meta-schema once (20-25 ms).
  const ajv = (metaChecker ??= new Ajv({ allErrors: true, strict: false }));
  let valid: unknown;
  try {
    valid = ajv.validateSchema(schema);
  } catch (error) {
    // A $schema of another JSON Schema version: ajv has no meta-schema to check it with.
    return [`${root}.$schema: drover reads JSON Schema draft-07 (${error instanceof Error ? error.message : String(error)})`];
  }
  if (valid === true) return [];
  const errors = collapseAlternatives(ajv.errors ?? []);
  const isAlternatives = (error: ErrorObject) => error.keyword === 'anyOf' || error.keyword === 'oneOf';
  // The meta-schema's alternatives reach their branches by $ref, which collapsing does not follow:
  // where a branch said what is wrong, "matches none of the allowed forms" says nothing more.
  const said = new Set(errors.filter((error) => !isAlternatives(error)).map((error) => error.instancePath));
  return errors
    .filter((error) => !(isAlternatives(error) && said.has(error.instancePath)))
    .map((error) => toProblem(error, root))
    .map(({ path, message }) => `${path}: ${message}`);
}

/**
 * An `anyOf` that fails reports each alternative's failure and then its own.
 * People need one answer: when exactly one alternative has the value's type
 * (`command: [ls, 3]` is an array, so the argv form was meant), that
 * alternative's problems; otherwise one sentence, the anyOf's description.
 */
function collapseAlternatives(errors: readonly ErrorObject[]): ErrorObject[] {
  let kept = [...errors];
  for (const alt of errors.filter((error) => error.keyword === 'anyOf' || error.keyword === 'oneOf')) {
    const inside = (error: ErrorObject) => error !== alt && error.schemaPath.startsWith(alt.schemaPath + '/');
    const branches = new Map<string, ErrorObject[]>();
    for (const error of errors.filter(inside)) {
      const branch = error.schemaPath.slice(alt.schemaPath.length + 1).split('/')[0]!;
      branches.set(branch, [...(branches.get(branch) ?? []), error]);
    }
    const typeMismatch = (list: ErrorObject[]) => list.some((e) => e.keyword === 'type' && e.instancePath === alt.instancePath);
    const meant = [...branches.values()].filter((list) => !typeMismatch(list));
    kept = meant.length === 1
      ? kept.filter((error) => error !== alt && (!inside(error) || meant[0]!.includes(error)))
      : kept.filter((error) => !inside(error));
  }
  return kept;
}

function toProblem(error: ErrorObject, root = 'payload'): PayloadProblem {
  const path = root + error.instancePath.split('/').slice(1).map(segment).join('');
  if (error.keyword === 'additionalProperties') {
    const extra = String((error.params as { additionalProperty: string }).additionalProperty);
    return { path: `${path}.${extra}`, message: 'is not a known property' };
  }
  if (error.keyword === 'required') {
    const missing = String((error.params as { missingProperty: string }).missingProperty);
    return { path: `${path}.${missing}`, message: 'is required' };
  }
  if (error.keyword === 'anyOf' || error.keyword === 'oneOf') {
    const description = (error.parentSchema as { description?: unknown } | undefined)?.description;
    return { path, message: typeof description === 'string' ? `must be ${lowerFirst(description)}` : 'matches none of the allowed forms' };
  }
  if (error.keyword === 'enum') {
    const allowed = (error.params as { allowedValues?: unknown[] }).allowedValues ?? [];
    return { path, message: `must be one of ${allowed.map((value) => JSON.stringify(value)).join(', ')}` };
  }
  return { path, message: error.message ?? error.keyword };
}

function segment(part: string): string {
  const key = part.replace(/~1/g, '/').replace(/~0/g, '~');
  return /^\d+$/.test(key) ? `[${key}]` : `.${key}`;
}

function lowerFirst(text: string): string {
  return text.charAt(0).toLowerCase() + text.slice(1).replace(/\.$/, '');
}
