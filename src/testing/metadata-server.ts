/** What the test metadata servers (imds.ts, gce-metadata.ts) share: an HTTP server on a loopback port that can answer slowly. */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface LoopbackServer {
  /** `http://127.0.0.1:PORT`. */
  readonly url: string;
  /** Every answer waits this long first (0: none). */
  setDelay(ms: number): void;
  /** Ends open connections (hanging requests too) and stops listening. */
  close(): Promise<void>;
}

export async function startLoopbackServer(handle: (request: IncomingMessage, response: ServerResponse) => void): Promise<LoopbackServer> {
  let delayMs = 0;
  const server = createServer((request, response) => {
    // The body (none is expected) is drained so the connection can be reused.
    request.resume();
    if (delayMs > 0) setTimeout(() => handle(request, response), delayMs);
    else handle(request, response);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    setDelay(ms) {
      delayMs = ms;
    },
    close() {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
