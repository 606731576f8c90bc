/** SSH addresses (`user@name:port`) and POSIX shell quoting, shared by the SSH transport and host. */
import { userInfo } from 'node:os';
import { ConfigError } from '../model/errors.js';

export interface SshTarget {
  readonly user: string;
  readonly host: string;
  readonly port: number;
}

/**
 * Parses `[user@]name[:port]` (`[::1]:2222` for IPv6). The user defaults
 * to the worker's, the port to 22.
 */
export function parseSshAddress(address: string): SshTarget {
  const match = /^(?:([^@\s]+)@)?(\[[^\]\s]+\]|[^:@\s[\]]+)(?::(\d+))?$/.exec(address.trim());
  if (match === null) throw new ConfigError(`SSH address "${address}": expected [user@]name[:port]`);
  const [, user, rawHost, rawPort] = match;
  const port = rawPort === undefined ? 22 : Number(rawPort);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new ConfigError(`SSH address "${address}": port must be 1-65535`);
  const host = rawHost!.startsWith('[') ? rawHost!.slice(1, -1) : rawHost!;
  return { user: user ?? userInfo().username, host, port };
}

/** `user@name:port`, as shown in logs and errors. */
export function formatSshAddress(target: SshTarget): string {
  const host = target.host.includes(':') ? `[${target.host}]` : target.host;
  return `${target.user}@${host}:${target.port}`;
}

/** One word for a POSIX shell, whatever it contains. */
export function shellQuote(word: string): string {
  if (/^[\w@%+=:,./-]+$/.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}
