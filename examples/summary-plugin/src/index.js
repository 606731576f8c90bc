/**
 * drover-plugin-summary: keeps a JSON summary of every run as the artifact
 * `public/summary.json`: how the run resolved, the command's exit code and
 * duration, labels from the worker's config and the task's payload, and
 * whatever the command wrote to the file named by $SUMMARY_FILE.
 *
 * Load it from a worker's config file:
 *
 *   plugins:
 *     - module: drover-plugin-summary
 *       config: { labels: { pool: builders } }
 *
 * and ask for labels in a task: `summary: { labels: { branch: main } }`.
 */
import { Readable } from 'node:stream';

/** The file, in the task directory, whose JSON the command may leave for the summary. */
export const COMMAND_SUMMARY_FILE = 'drover-summary.json';

const labels = { type: 'object', additionalProperties: { type: 'string' } };

/** @type {import('drover').PluginExtension<{ name: string, labels?: Record<string, string> }>} */
export default {
  configSchema: {
    type: 'object',
    additionalProperties: false,
    properties: {
      name: { type: 'string', pattern: '^[^/].*\\.json$', default: 'public/summary.json' },
      labels,
    },
  },

  createPlugin(config) {
    const name = config.name ?? 'public/summary.json';
    return {
      name: 'summary',
      payloadSchema: {
        type: 'object',
        properties: {
          summary: {
            description: 'What the run summary (public/summary.json) adds: labels of this task.',
            type: 'object',
            additionalProperties: false,
            properties: { labels },
          },
        },
      },

      newTask({ claim, payload, queue, workerId, log }) {
        let result;
        // The payload is checked after newTask: read it only once a hook runs, and only what is valid.
        const taskLabels = () => {
          const given = payload.summary?.labels;
          return given && typeof given === 'object' ? Object.fromEntries(Object.entries(given).filter(([, value]) => typeof value === 'string')) : {};
        };
        const upload = async (resolution, command) => {
          const summary = {
            taskId: claim.taskId,
            runId: claim.runId,
            workerId,
            resolution,
            ...(result === undefined ? {} : { exitCode: result.exitCode, signal: result.signal, durationMs: Math.round(result.durationMs) }),
            labels: { ...config.labels, ...taskLabels() },
            ...(command === undefined ? {} : { command }),
          };
          const text = JSON.stringify(summary, null, 2) + '\n';
          await queue.uploadArtifact(claim, workerId, { name, contentType: 'application/json' }, Readable.from([Buffer.from(text)]));
        };
        return {
          async buildSandbox(builder, { taskDir }) {
            builder.setEnv('SUMMARY_FILE', `${taskDir}/${COMMAND_SUMMARY_FILE}`);
            log.line(`summary: kept as ${name}; the command may add JSON of its own in $SUMMARY_FILE`);
          },
          async stopped(runResult) {
            result = runResult;
            return undefined; // no say on success: the exit status and other plugins decide
          },
          async finished(resolution, sandbox) {
            await upload(resolution, await commandSummary(sandbox));
            log.line(`summary: uploaded ${name}`);
          },
          async exception(reason) {
            await upload({ state: 'exception', reason });
          },
        };
      },
    };
  },
};

/** What the command left in $SUMMARY_FILE: its JSON, `{ error }` when it is not JSON, undefined when there is none. */
async function commandSummary(sandbox) {
  let text = '';
  try {
    for await (const chunk of await sandbox.extractFile(COMMAND_SUMMARY_FILE)) text += chunk;
  } catch (error) {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    return { error: `${COMMAND_SUMMARY_FILE} is not JSON: ${error.message}` };
  }
}
