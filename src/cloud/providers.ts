/**
 * A provider from the settings (cloud.provider, aws.*, gce.*), its SDK
 * loaded only then: the SDKs are large, and most commands never need one.
 */
import { ConfigError } from '../model/errors.js';
import type { Config } from '../runtime/config.js';
import type { Logger } from '../runtime/logger.js';
import { PROVIDER_NAMES, type Provider, type ProviderName } from './provider.js';

export async function createProvider(name: string, config: Config, logger?: Logger): Promise<Provider> {
  if (!PROVIDER_NAMES.includes(name as ProviderName)) throw new ConfigError(`there is no cloud provider "${name}": use aws or gce`);
  if (name === 'aws') {
    const { AwsProvider } = await import('./aws.js');
    return new AwsProvider({
      ...(config.aws.region ? { region: config.aws.region } : {}),
      ...(config.aws.endpoint ? { endpoint: config.aws.endpoint } : {}),
      ...(logger ? { logger } : {}),
    });
  }
  if (!config.gce.zone) throw new ConfigError('gce: no zone is set (--gce-zone, DROVER_GCE_ZONE or gce.zone in the config file)');
  const { GceProvider } = await import('./gce.js');
  return new GceProvider({
    zone: config.gce.zone,
    ...(config.gce.project ? { project: config.gce.project } : {}),
    ...(config.gce.endpoint ? { endpoint: config.gce.endpoint } : {}),
    ...(logger ? { logger } : {}),
  });
}
