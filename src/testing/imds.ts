/**
 * An EC2 instance metadata service (IMDSv2 only, as an instance with
 * `HttpTokens: required`) on a loopback port, for tests of drover's `aws`
 * host and of your own configurations:
 *
 *   const imds = await startImds({ userData: 'capacity: 2\n' });
 *   // drover worker --host aws --metadata-url <imds.url>
 *   imds.injectSpotNotice(new Date(Date.now() + 120_000));
 *
 * The wire protocol is EC2's: `PUT /latest/api/token` with
 * `X-aws-ec2-metadata-token-ttl-seconds` (1 to 21600) answers a token; every
 * GET needs it in `X-aws-ec2-metadata-token` (401 without, or once it
 * expired); a PUT that carries `X-Forwarded-For` is refused (403).
 * Directories (`/latest/meta-data/`, `.../placement/`) list their entries,
 * one a line. `spot/instance-action` is 404 until a notice is injected,
 * then `{"action":"terminate","time":"2026-01-01T12:00:00Z"}`.
 *
 * Faults: failing token requests, slow answers, expired tokens.
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { startLoopbackServer } from './metadata-server.js';

export interface ImdsOptions {
  readonly instanceId?: string;
  readonly instanceType?: string;
  readonly availabilityZone?: string;
  readonly localHostname?: string;
  /** The instance's user-data; none (404) when undefined. */
  readonly userData?: string;
}

export interface ImdsRequest {
  readonly method: string;
  readonly path: string;
  readonly status: number;
}

export interface SpotNotice {
  readonly action?: 'terminate' | 'stop' | 'hibernate';
  readonly time: Date;
}

export interface TestImds {
  /** `http://127.0.0.1:PORT`: the base URL to give as the metadata URL. */
  readonly url: string;
  /** Every request so far, in order (tokens and bodies are not kept). */
  readonly requests: readonly ImdsRequest[];
  /** From now on `spot/instance-action` answers this notice. */
  injectSpotNotice(notice: SpotNotice | Date): void;
  /** The next `count` token requests answer `status` (default 500); Infinity: all of them. */
  failTokenRequests(count: number, status?: number): void;
  /** Every answer waits this long first (0: none). */
  setDelay(ms: number): void;
  /** Every token handed out so far stops being valid (401), as when its TTL ran out. */
  expireTokens(): void;
  /** Changes the user-data (undefined: none). */
  setUserData(userData: string | undefined): void;
  close(): Promise<void>;
}

const MAX_TTL_S = 21_600;

/** Seconds precision, as EC2 writes times: `2026-01-01T12:00:00Z`. */
function ec2Time(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

export async function startImds(options: ImdsOptions = {}): Promise<TestImds> {
  const instanceId = options.instanceId ?? 'i-0123456789abcdef0';
  const zone = options.availabilityZone ?? 'us-east-1a';
  let userData = options.userData;
  let spotNotice: SpotNotice | undefined;
  let tokenFailures = 0;
  let tokenFailureStatus = 500;
  const tokens = new Map<string, number>(); // token -> expiry (epoch ms)
  const requests: ImdsRequest[] = [];

  /** Leaves under /latest/meta-data/; a function is read at request time. */
  const metaData: Record<string, () => string | undefined> = {
    'instance-id': () => instanceId,
    'instance-type': () => options.instanceType ?? 'm5.large',
    'local-hostname': () => options.localHostname ?? `ip-10-0-0-1.${zone.slice(0, -1)}.compute.internal`,
    'placement/availability-zone': () => zone,
    'placement/region': () => zone.slice(0, -1),
    'spot/instance-action': () => spotNotice && JSON.stringify({ action: spotNotice.action ?? 'terminate', time: ec2Time(spotNotice.time) }),
  };

  const answer = (request: IncomingMessage, response: ServerResponse, path: string, status: number, body = '', headers: Record<string, string> = {}) => {
    requests.push({ method: request.method ?? '', path, status });
    response.writeHead(status, { 'Content-Type': 'text/plain', ...headers });
    response.end(body);
  };

  const handle = (request: IncomingMessage, response: ServerResponse) => {
    const path = new URL(request.url ?? '/', 'http://imds').pathname;
    if (path === '/latest/api/token') {
      if (request.method !== 'PUT') return answer(request, response, path, 405);
      if (request.headers['x-forwarded-for'] !== undefined) return answer(request, response, path, 403);
      if (tokenFailures > 0) {
        tokenFailures--;
        return answer(request, response, path, tokenFailureStatus);
      }
      const ttl = Number(request.headers['x-aws-ec2-metadata-token-ttl-seconds']);
      if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_TTL_S) return answer(request, response, path, 400);
      const token = randomBytes(24).toString('base64');
      tokens.set(token, Date.now() + ttl * 1000);
      return answer(request, response, path, 200, token, { 'X-aws-ec2-metadata-token-ttl-seconds': String(ttl) });
    }
    if (request.method !== 'GET' && request.method !== 'HEAD') return answer(request, response, path, 405);
    const token = request.headers['x-aws-ec2-metadata-token'];
    const expiry = typeof token === 'string' ? tokens.get(token) : undefined;
    if (expiry === undefined || expiry <= Date.now()) return answer(request, response, path, 401);
    if (path === '/latest/user-data') return userData === undefined ? answer(request, response, path, 404) : answer(request, response, path, 200, userData, { 'Content-Type': 'application/octet-stream' });
    const prefix = '/latest/meta-data/';
    if (!path.startsWith(prefix)) return answer(request, response, path, 404);
    const key = path.slice(prefix.length);
    if (key === '' || key.endsWith('/')) {
      // A directory: its entries, subdirectories with a trailing slash.
      const entries = new Set<string>();
      for (const [leaf, read] of Object.entries(metaData)) {
        if (!leaf.startsWith(key) || read() === undefined) continue;
        const rest = leaf.slice(key.length);
        entries.add(rest.includes('/') ? rest.slice(0, rest.indexOf('/') + 1) : rest);
      }
      return entries.size === 0 ? answer(request, response, path, 404) : answer(request, response, path, 200, [...entries].join('\n'));
    }
    const value = metaData[key]?.();
    return value === undefined ? answer(request, response, path, 404) : answer(request, response, path, 200, value);
  };

  const server = await startLoopbackServer(handle);
  return {
    url: server.url,
    requests,
    injectSpotNotice(notice) {
      spotNotice = notice instanceof Date ? { time: notice } : notice;
    },
    failTokenRequests(count, status = 500) {
      tokenFailures = count;
      tokenFailureStatus = status;
    },
    setDelay: server.setDelay,
    expireTokens() {
      tokens.clear();
    },
    setUserData(value) {
      userData = value;
    },
    close: server.close,
  };
}
