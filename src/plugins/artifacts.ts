/**
 * artifacts: files the command leaves in its task directory, stored in the
 * queue's artifact store after the run (also after a failed one), one
 * stream per file, never a whole file in memory.
 *
 * Payload: `artifacts: [{ type, path, name, expires?, contentType? }]`
 *   type         `file`, or `directory`: every file under it, stored as
 *                `<name>/<path relative to the directory>`
 *   path         relative to the task directory
 *   name         the artifact's name in the queue (`public/build/app.tar.gz`)
 *   expires      an ISO date-time; default: kept as long as the task
 *   contentType  default: guessed from the file name (CONTENT_TYPES),
 *                else application/octet-stream
 *
 * What happens to a path, after Taskcluster's generic-worker (a problem the
 * payload shows before anything runs is the payload's; one that only the
 * files after the run show is the task's):
 *   - absolute, or leading out with `..`: `exception/malformed-payload`,
 *     before the command runs;
 *   - missing, the wrong type (a directory for a `file`), or a symlink that
 *     resolves outside the task directory: the run resolves `failed`, with
 *     a message naming the artifact and its path. Everything else is still
 *     uploaded, and a file outside the task directory never is.
 * Inside a directory artifact a symlink to a file inside the task directory
 * is uploaded as that file; a symlink to a directory, and a special file
 * (fifo, socket), are skipped with a line in the log.
 *
 * Files are found through the run's transport (`list`, `realpath`, `stat`),
 * so this works the same on this machine and over SSH, and read with the
 * sandbox's `extractFile`. The hooks: `prepare` checks the payload,
 * `stopped` finds the files (a problem is a `failed` verdict), `finished`
 * uploads them. Runs ended by an exception (shutdown, cancel) upload none.
 */
import { posix } from 'node:path';
import type { Sandbox } from '../engines/engine.js';
import type { Transport } from '../hosts/transport.js';
import { InternalError, MalformedPayloadError, errorMessage, type PayloadProblem } from '../model/errors.js';
import type { Payload } from '../model/task.js';
import { artifactNameProblem } from '../queues/sqlite.js';
import type { JsonSchemaObject } from '../runtime/schema.js';
import type { Plugin, TaskPlugin, TaskPluginOptions, Verdict } from './plugin.js';

const PAYLOAD_SCHEMA: JsonSchemaObject = {
  type: 'object',
  properties: {
    artifacts: {
      description: 'Files and directories of the task directory stored as artifacts after the run.',
      type: 'array',
      items: {
        type: 'object',
        additionalProperties: false,
        required: ['type', 'path', 'name'],
        properties: {
          type: { description: 'file, or directory: every file under it, named <name>/<relative path>.', enum: ['file', 'directory'] },
          path: { description: 'Relative to the task directory; it may not lead outside it.', type: 'string', minLength: 1 },
          name: { description: 'The artifact\'s name: slash-separated, relative (public/build/app.tar.gz).', type: 'string', minLength: 1 },
          expires: { description: 'An ISO date-time after which the artifact may be deleted; default: kept with the task.', type: 'string' },
          contentType: { description: 'Default: guessed from the file name, else application/octet-stream.', type: 'string', minLength: 1 },
        },
      },
    },
  },
};

/** Content types by file extension (lower case); anything else is application/octet-stream. */
export const CONTENT_TYPES: Readonly<Record<string, string>> = {
  '.txt': 'text/plain; charset=utf-8',
  '.log': 'text/plain; charset=utf-8',
  '.md': 'text/markdown; charset=utf-8',
  '.csv': 'text/csv; charset=utf-8',
  '.html': 'text/html; charset=utf-8',
  '.htm': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.json': 'application/json',
  '.xml': 'application/xml',
  '.yaml': 'application/yaml',
  '.yml': 'application/yaml',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.gif': 'image/gif',
  '.webp': 'image/webp',
  '.pdf': 'application/pdf',
  '.wasm': 'application/wasm',
  '.zip': 'application/zip',
  '.tar': 'application/x-tar',
  '.gz': 'application/gzip',
  '.tgz': 'application/gzip',
  '.bz2': 'application/x-bzip2',
  '.xz': 'application/x-xz',
  '.zst': 'application/zstd',
};

export const DEFAULT_CONTENT_TYPE = 'application/octet-stream';

export function guessContentType(fileName: string): string {
  return CONTENT_TYPES[posix.extname(fileName).toLowerCase()] ?? DEFAULT_CONTENT_TYPE;
}

/** One artifact of the payload, checked. */
interface ArtifactSpec {
  readonly type: 'file' | 'directory';
  readonly path: string;
  readonly name: string;
  readonly expires?: number;
  readonly contentType?: string;
}

/** A file to upload: where it really is (relative to the real task directory) and what to call it. */
interface FoundFile {
  readonly name: string;
  readonly relativePath: string;
  readonly contentType: string;
  readonly expires?: number;
}

interface Found {
  readonly files: readonly FoundFile[];
  /** Why the run fails: each names the artifact and its path. */
  readonly problems: readonly string[];
}

export function artifactsPlugin(): Plugin {
  return {
    name: 'artifacts',
    payloadSchema: PAYLOAD_SCHEMA,
    newTask(options: TaskPluginOptions): TaskPlugin {
      let specs: readonly ArtifactSpec[] = [];
      let place: { readonly taskDir: string; readonly transport: Transport } | undefined;
      let found: Promise<Found> | undefined;
      const find = (): Promise<Found> => {
        if (place === undefined) throw new InternalError('artifacts: the task directory is not known (buildSandbox never ran)');
        const note = (line: string) => options.log.line(line);
        // Once per run: `stopped` looks, `finished` uploads (and looks itself after maxRunTime, when `stopped` is not called).
        found ??= findFiles(specs, place.taskDir, place.transport, note).then((result) => {
          for (const problem of result.problems) note(problem);
          return result;
        });
        return found;
      };
      return {
        async prepare() {
          specs = readSpecs(options.payload);
        },
        async buildSandbox(_builder, { taskDir, transport }) {
          place = { taskDir, transport };
        },
        async stopped(): Promise<Verdict> {
          if (specs.length === 0) return undefined;
          const { problems } = await find();
          return problems.length === 0 ? undefined : { state: 'failed', message: problems.join('; ') };
        },
        async finished(_resolution, sandbox: Sandbox) {
          if (specs.length === 0) return;
          const { files } = await find();
          for (const file of files) {
            if (options.signal.aborted) return;
            await upload(options, sandbox, file);
          }
        },
      };
    },
  };
}

async function upload(options: TaskPluginOptions, sandbox: Sandbox, file: FoundFile): Promise<void> {
  const { claim, workerId, queue, log } = options;
  let info;
  try {
    const source = await sandbox.extractFile(file.relativePath);
    info = await queue.uploadArtifact(claim, workerId, {
      name: file.name,
      contentType: file.contentType,
      ...(file.expires === undefined ? {} : { expires: file.expires }),
    }, source);
  } catch (error) {
    throw new InternalError(`artifact "${file.name}" (${file.relativePath}) could not be stored: ${errorMessage(error)}`, { cause: error });
  }
  log.line(`stored artifact ${file.name} (${info.size} bytes, ${file.contentType})`);
}

/** The payload's artifacts, or every problem with them at once. */
function readSpecs(payload: Payload): ArtifactSpec[] {
  // The joined schema checked the shape; what it cannot say is checked here.
  const list = (payload['artifacts'] ?? []) as (Omit<ArtifactSpec, 'expires'> & { expires?: unknown })[];
  const problems: PayloadProblem[] = [];
  const names = new Set<string>();
  const specs = list.map((item, i): ArtifactSpec => {
    const at = `payload.artifacts[${i}]`;
    const pathProblem = relativePathProblem(item.path);
    if (pathProblem !== undefined) problems.push({ path: `${at}.path`, message: pathProblem });
    const nameProblem = artifactNameProblem(item.name);
    if (nameProblem !== undefined) problems.push({ path: `${at}.name`, message: `${JSON.stringify(item.name)} ${nameProblem}` });
    else if (names.has(item.name)) problems.push({ path: `${at}.name`, message: `"${item.name}" is the name of an earlier artifact too` });
    names.add(item.name);
    const expires = item.expires === undefined ? undefined : Date.parse(String(item.expires));
    if (expires !== undefined && Number.isNaN(expires)) {
      problems.push({ path: `${at}.expires`, message: `${JSON.stringify(item.expires)} is not a date-time such as 2030-01-31T12:00:00Z` });
    }
    return {
      type: item.type,
      path: item.path,
      name: item.name,
      ...(expires === undefined ? {} : { expires }),
      ...(item.contentType === undefined ? {} : { contentType: item.contentType }),
    };
  });
  if (problems.length > 0) throw new MalformedPayloadError(problems);
  return specs;
}

/** Why a payload's path cannot name something in the task directory: absolute, or leading out of it. */
function relativePathProblem(path: string): string | undefined {
  if (path.includes('\0')) return 'must not contain NUL characters';
  if (posix.isAbsolute(path)) return `${JSON.stringify(path)} is absolute; artifact paths are relative to the task directory`;
  const normalized = posix.normalize(path);
  if (normalized === '..' || normalized.startsWith('../')) return `${JSON.stringify(path)} leads outside the task directory`;
  return undefined;
}

/**
 * Finds every file the artifacts name, through the transport, with the
 * symlinks resolved: nothing that resolves outside the task directory is
 * taken. Problems are collected, not thrown: the run fails with all of them.
 */
async function findFiles(specs: readonly ArtifactSpec[], taskDir: string, transport: Transport, note: (line: string) => void): Promise<Found> {
  const root = await transport.realpath(taskDir);
  const files: FoundFile[] = [];
  const problems: string[] = [];

  /** The path's real location relative to root, or a problem. */
  const locate = async (path: string): Promise<{ relativePath: string } | { problem: string }> => {
    let real: string;
    try {
      real = await transport.realpath(transport.join(root, path));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { problem: 'is missing' };
      throw error;
    }
    const relativePath = posix.relative(root, real);
    if (relativePath === '..' || relativePath.startsWith('../') || posix.isAbsolute(relativePath)) {
      return { problem: 'resolves (through a symlink) outside the task directory; it is not uploaded' };
    }
    return { relativePath: relativePath === '' ? '.' : relativePath };
  };

  /** `shownPath`: the file's path as the task author knows it, whose name gives the content type. */
  const fileOf = (spec: ArtifactSpec, name: string, relativePath: string, shownPath: string): FoundFile => ({
    name,
    relativePath,
    contentType: spec.contentType ?? guessContentType(shownPath),
    ...(spec.expires === undefined ? {} : { expires: spec.expires }),
  });

  const walk = async (spec: ArtifactSpec, directory: string, shownPath: string, name: string): Promise<void> => {
    const entries = (await transport.list(transport.join(root, directory))).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const entry of entries) {
      const path = posix.join(directory, entry.name);
      const entryShown = posix.join(shownPath, entry.name);
      const entryName = `${name}/${entry.name}`;
      const nameProblem = artifactNameProblem(entryName);
      if (nameProblem !== undefined) {
        problems.push(`artifact "${name}": ${entryShown} cannot be stored: its name ${JSON.stringify(entryName)} ${nameProblem}`);
        continue;
      }
      if (entry.type === 'directory') await walk(spec, path, entryShown, entryName);
      else if (entry.type === 'file') files.push(fileOf(spec, entryName, path, entryShown));
      else if (entry.type === 'symlink') {
        const located = await locate(path);
        if ('problem' in located) problems.push(`artifact "${name}": ${entryShown} ${located.problem}`);
        else if ((await transport.stat(transport.join(root, located.relativePath)))?.type === 'file') files.push(fileOf(spec, entryName, located.relativePath, entryShown));
        else note(`artifact "${name}": ${entryShown} is a symlink to a directory; not followed`);
      } else note(`artifact "${name}": ${entryShown} is not a regular file (a fifo, socket or device); skipped`);
    }
  };

  for (const spec of specs) {
    const about = `artifact "${spec.name}": ${spec.type} ${spec.path}`;
    const located = await locate(spec.path);
    if ('problem' in located) {
      problems.push(`${about} ${located.problem}`);
      continue;
    }
    const type = (await transport.stat(transport.join(root, located.relativePath)))?.type;
    if (type === undefined) problems.push(`${about} is missing`);
    else if (spec.type === 'file' && type !== 'file') problems.push(`${about} is ${type === 'directory' ? 'a directory, not a file' : 'not a regular file'}`);
    else if (spec.type === 'directory' && type !== 'directory') problems.push(`${about} is not a directory`);
    else if (spec.type === 'file') files.push(fileOf(spec, spec.name, located.relativePath, spec.path));
    else await walk(spec, located.relativePath, spec.path, spec.name);
  }
  return { files, problems };
}
