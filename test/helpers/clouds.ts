/**
 * Each provider on its loopback endpoint, for tests that launch instances
 * through the real SDK clients: the endpoint hands `sshPorts` to the
 * instances it launches (loopback sshd servers stand in for them), and the
 * provider retries quickly. Both are closed when `t` ends. The SDKs need
 * credentials: merge dummyCloudCredentials() into process.env first.
 */
import type { Test } from 'tap';
import { AwsProvider } from '../../src/cloud/aws.js';
import { GceProvider } from '../../src/cloud/gce.js';
import type { Provider } from '../../src/cloud/provider.js';
import type { CloudEndpoint, CloudFaults } from '../../src/testing/cloud-endpoint.js';
import { startComputeEndpoint } from '../../src/testing/compute-endpoint.js';
import { startEc2Endpoint } from '../../src/testing/ec2-endpoint.js';

export const RETRY = { attempts: 5, baseDelayMs: 5, maxDelayMs: 20, timeoutMs: 5000 };

export interface Cloud {
  readonly provider: Provider;
  readonly endpoint: CloudEndpoint;
  readonly faults: CloudFaults;
  alive(): unknown[];
  count(action: string): number;
  readonly launchCall: string;
  readonly terminateCall: string;
  /** A terminate error the provider does not retry by itself: the instance machine's retry must do it. */
  readonly refusal: string;
}

function cloud(t: Test, endpoint: CloudEndpoint, provider: Provider, calls: Pick<Cloud, 'launchCall' | 'terminateCall' | 'refusal'>): Cloud {
  t.teardown(async () => {
    provider.close();
    await endpoint.close();
  });
  return { provider, endpoint, faults: endpoint.faults, alive: () => endpoint.alive(), count: (action) => endpoint.count(action), ...calls };
}

export const CLOUDS: Record<'aws' | 'gce', (t: Test, sshPorts: number[]) => Promise<Cloud>> = {
  async aws(t, sshPorts) {
    const endpoint = await startEc2Endpoint({ sshPorts, bootMs: 50, shutdownMs: 50 });
    return cloud(t, endpoint, new AwsProvider({ endpoint: endpoint.url, retry: RETRY }), { launchCall: 'RunInstances', terminateCall: 'TerminateInstances', refusal: 'UnauthorizedOperation' });
  },
  async gce(t, sshPorts) {
    const endpoint = await startComputeEndpoint({ sshPorts, bootMs: 50, shutdownMs: 50, operationMs: 10 });
    return cloud(t, endpoint, new GceProvider({ zone: 'europe-west1-b', endpoint: endpoint.url, retry: RETRY }), { launchCall: 'instances.insert', terminateCall: 'instances.delete', refusal: '403' });
  },
};
