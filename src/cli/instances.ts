/**
 * `drover instances [--provider aws|gce] [--cleanup]`: lists the cloud
 * instances drover launched (tagged drover:session), says of each whether
 * it is live or a leftover and why (src/cloud/watchdog.ts), and with
 * --cleanup terminates the leftovers.
 */
import { join } from 'node:path';
import { cloudSessionRegistry } from '../batch/session.js';
import type { SessionRegistry } from '../cloud/sessions.js';
import { ConfigError } from '../model/errors.js';
import { flagName, loadConfig, SETTINGS, type Config } from '../runtime/config.js';
import { createLogger } from '../runtime/logger.js';
import { UsageError, type Command } from './command.js';
import { EXIT } from './exit-codes.js';

const DETAILS = `Lists every instance tagged drover:session on the provider, in any state but
terminated, with its verdict:
  live       its owner (the drover process that launched it) runs, and its
             session is open
  leftover   its owner is gone, or its session is over, on this machine
  ending     it is shutting down already
  foreign    launched from another machine: run the command there
Open sessions are recorded per user on this machine, in DROVER_CLOUD_SESSIONS
[~/.drover/cloud-sessions] (and, by earlier versions, in QUEUE-DIR/cloud-sessions,
which is read too).

Options:
  --provider aws|gce       where to look [cloud.provider]
  --cleanup                terminate every leftover (each call retried on
                           throttling); exit 1 when one could not be
  --aws-region, --aws-endpoint, --gce-project, --gce-zone, --gce-endpoint
                           where the provider is (see the settings)

Credentials come from the SDKs' default chains: AWS_* variables, profiles,
the instance role; GOOGLE_APPLICATION_CREDENTIALS, gcloud's, the metadata
server. Exit codes: 0 done, 1 a leftover could not be terminated, 2 usage.`;

/** The flags of the clouds' settings and their paths (`aws-region`: aws.region): drover instances and drover batch take them. */
export const CLOUD_SETTING_FLAGS: Readonly<Record<string, string>> = Object.fromEntries(
  SETTINGS.filter((setting) => /^(aws|gce)\./.test(setting.path)).map((setting) => [flagName(setting), setting.path]),
);
const SETTING_FLAGS: Readonly<Record<string, string>> = { provider: 'cloud.provider', ...CLOUD_SETTING_FLAGS };

export const instancesCommand: Command = {
  usage: 'drover instances [--provider aws|gce] [--cleanup]',
  summary: 'list the cloud instances drover launched; --cleanup terminates the leftovers',
  details: DETAILS,
  options: {
    cleanup: { type: 'boolean' },
    ...Object.fromEntries(Object.keys(SETTING_FLAGS).map((flag) => [flag, { type: 'string' as const }])),
  },
  async run(values, positionals) {
    if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]!}"`);
    const config = loadConfig({
      file: values['config'] as string | undefined,
      flags: {
        'queue.dir': values['queue-dir'] as string | undefined,
        ...Object.fromEntries(Object.entries(SETTING_FLAGS).map(([flag, path]) => [path, values[flag] as string | undefined])),
      },
    });
    if (!config.cloud.provider) throw new ConfigError('which cloud? give --provider aws|gce (or DROVER_CLOUD_PROVIDER, cloud.provider in the config file)');
    const logger = createLogger({ level: config.logLevel, format: config.logFormat });
    // The SDKs load only here.
    const [{ createProvider }, { Watchdog }] = await Promise.all([import('../cloud/providers.js'), import('../cloud/watchdog.js')]);
    const provider = await createProvider(config.cloud.provider, config, logger);
    try {
      const watchdog = new Watchdog({ providers: [provider], registry: openCloudSessions(config), logger });
      if (values['cleanup'] !== true) {
        const reports = await watchdog.survey();
        if (reports.length === 0) {
          process.stdout.write(`no drover instances on ${provider.name} (${provider.where})\n`);
          return EXIT.OK;
        }
        const rows = reports.map(({ instance, verdict, why }) => [
          instance.id, instance.state, instance.session ?? '', instance.owner ?? '',
          instance.publicIp ?? instance.privateIp ?? '', instance.launchedAt?.toISOString() ?? '', `${verdict}: ${why}`,
        ]);
        process.stdout.write(table(['INSTANCE', 'STATE', 'SESSION', 'OWNER', 'ADDRESS', 'LAUNCHED', 'VERDICT'], rows));
        return EXIT.OK;
      }
      const { found, terminated, failed } = await watchdog.sweep();
      for (const report of terminated) process.stdout.write(`terminated ${report.instance.id} (${report.why})\n`);
      for (const { report, error } of failed) process.stderr.write(`drover instances: could not terminate ${report.instance.id}: ${error}\n`);
      const kept = found.length - terminated.length - failed.length;
      process.stdout.write(`${terminated.length} terminated, ${failed.length} failed, ${kept} left alone (live, ending or foreign) on ${provider.name} (${provider.where})\n`);
      return failed.length > 0 ? EXIT.FAILED : EXIT.OK;
    } finally {
      provider.close();
    }
  },
};

/**
 * The open cloud sessions, as `drover instances` and a `drover batch --provider` both see them:
 * this user's registry (cloudSessionRegistry), and the config's QUEUE-DIR/cloud-sessions, where
 * earlier versions recorded them. Both commands take it from here: were one of them to miss a
 * directory, it would take the instances of a batch that still runs for leftovers, and terminate them.
 */
export function openCloudSessions(config: Config): SessionRegistry {
  return cloudSessionRegistry({ legacyDirs: [join(config.queue.dir, 'cloud-sessions')] });
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => (row[i] ?? '').length)));
  return [header, ...rows].map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}
