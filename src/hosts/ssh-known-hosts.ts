/**
 * known_hosts checking for the SSH transport, the way OpenSSH does it.
 *
 * Reads OpenSSH's known_hosts format: `PATTERNS KEYTYPE BASE64 [COMMENT]`,
 * where PATTERNS is a comma-separated list of names (`name` for port 22,
 * `[name]:port` otherwise) with `*` and `?` wildcards and `!` negations, or
 * one hashed name (`|1|salt|hmac`, as written by `HashKnownHosts yes`).
 * `@revoked` lines refuse a key; `@cert-authority` lines are not supported
 * and skipped.
 *
 * Policies:
 *   strict      the host's key must be in the file; an unknown host is refused
 *   accept-new  an unknown host's key is appended to the file; a known host's key must match
 *   off         no check (for throw-away test machines only)
 * A key that differs from the one on file is refused under strict and
 * accept-new alike, with an error that says so; so is a key of a type the
 * file has none of, for a host it has keys for (accept-new appends only for
 * a host with no entry at all).
 */
import { createHash, createHmac } from 'node:crypto';
import { appendFileSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { DroverError } from '../model/errors.js';

export type HostKeyPolicy = 'strict' | 'accept-new' | 'off';
export const HOST_KEY_POLICIES: readonly HostKeyPolicy[] = ['strict', 'accept-new', 'off'];

/** The server's host key was refused: unknown under `strict`, changed, or revoked. */
export class HostKeyError extends DroverError {
  constructor(message: string) {
    super('DROVER_SSH_HOST_KEY', message);
  }
}

interface KnownHostEntry {
  readonly line: number;
  readonly marker: '' | '@revoked' | '@cert-authority';
  readonly patterns: string;
  readonly keyType: string;
  readonly key: Buffer;
}

/** The name OpenSSH looks a host up by: `name`, or `[name]:port` when the port is not 22. */
export function knownHostName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

/** OpenSSH's fingerprint of a key blob: `SHA256:` and unpadded base64. */
export function fingerprint(key: Buffer): string {
  return `SHA256:${createHash('sha256').update(key).digest('base64').replace(/=+$/, '')}`;
}

/** The key type named at the start of an SSH wire-format key blob (`ssh-ed25519`...). */
export function keyTypeOf(key: Buffer): string {
  if (key.length < 4) return 'unknown';
  const length = key.readUInt32BE(0);
  return key.subarray(4, 4 + length).toString('latin1');
}

function parse(text: string): KnownHostEntry[] {
  const entries: KnownHostEntry[] = [];
  text.split('\n').forEach((raw, index) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const fields = line.split(/\s+/);
    let marker: KnownHostEntry['marker'] = '';
    if (fields[0] === '@revoked' || fields[0] === '@cert-authority') marker = fields.shift() as KnownHostEntry['marker'];
    const [patterns, keyType, base64] = fields;
    if (patterns === undefined || keyType === undefined || base64 === undefined) return;
    entries.push({ line: index + 1, marker, patterns, keyType, key: Buffer.from(base64, 'base64') });
  });
  return entries;
}

function wildcard(pattern: string, name: string): boolean {
  const regex = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`, 'i');
  return regex.test(name);
}

function matches(patterns: string, name: string): boolean {
  if (patterns.startsWith('|1|')) {
    const [, , salt, hash] = patterns.split('|');
    if (salt === undefined || hash === undefined) return false;
    const mac = createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64');
    return mac === hash;
  }
  let matched = false;
  for (const pattern of patterns.split(',')) {
    if (pattern.startsWith('!')) {
      if (wildcard(pattern.slice(1), name)) return false;
    } else if (wildcard(pattern, name)) {
      matched = true;
    }
  }
  return matched;
}

export interface HostKeyCheck {
  readonly file: string;
  readonly policy: HostKeyPolicy;
  readonly host: string;
  readonly port: number;
  /** Names the host in messages: `user@name:port`. */
  readonly address: string;
}

/** Key types on file for the host, best first: the client offers them first so a known key is the one negotiated. */
export function knownKeyTypes(check: Pick<HostKeyCheck, 'file' | 'host' | 'port'>): string[] {
  const name = knownHostName(check.host, check.port);
  return [...new Set(readEntries(check.file).filter((e) => e.marker === '' && matches(e.patterns, name)).map((e) => e.keyType))];
}

function readEntries(file: string): KnownHostEntry[] {
  try {
    return parse(readFileSync(file, 'utf8'));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new HostKeyError(`known_hosts file "${file}" cannot be read: ${(error as Error).message}`);
  }
}

/**
 * Checks the key the server offered; throws HostKeyError when it is refused.
 * Under accept-new an unknown host's key is recorded in the file.
 */
export function verifyHostKey(check: HostKeyCheck, key: Buffer): void {
  if (check.policy === 'off') return;
  const name = knownHostName(check.host, check.port);
  const type = keyTypeOf(key);
  const entries = readEntries(check.file).filter((entry) => matches(entry.patterns, name));
  const revoked = entries.find((entry) => entry.marker === '@revoked' && entry.key.equals(key));
  if (revoked !== undefined) {
    throw new HostKeyError(`host key of ${check.address} (${type} ${fingerprint(key)}) is marked @revoked in "${check.file}" line ${revoked.line}; refusing to connect`);
  }
  const plain = entries.filter((entry) => entry.marker === '');
  if (plain.some((entry) => entry.keyType === type && entry.key.equals(key))) return;
  const other = plain.find((entry) => entry.keyType === type);
  if (other !== undefined) {
    throw new HostKeyError(
      `host key of ${check.address} has CHANGED: "${check.file}" line ${other.line} has ${type} ${fingerprint(other.key)}, ` +
        `but the server offered ${fingerprint(key)}. Someone may be intercepting the connection, or the host was reinstalled; ` +
        `if you trust the new key, remove the old one with: ssh-keygen -R '${name}' -f '${check.file}'`,
    );
  }
  if (plain.length > 0) {
    // A known host that offers a key of another type only: under accept-new too, it is not "new"
    // (a man in the middle would offer just the type the file lacks).
    throw new HostKeyError(
      `host key of ${check.address} (${type} ${fingerprint(key)}) is not in "${check.file}", which has ` +
        `${[...new Set(plain.map((e) => e.keyType))].join(', ')} keys for it (line ${plain.map((e) => e.line).join(', ')}); ` +
        `a known host must offer a key on file. Someone may be intercepting the connection, or the host's keys changed; ` +
        `if you trust the new key, remove the old ones with: ssh-keygen -R '${name}' -f '${check.file}'`,
    );
  }
  if (check.policy === 'strict') {
    throw new HostKeyError(
      `host key of ${check.address} (${type} ${fingerprint(key)}) is not in "${check.file}"` +
        `; add it (ssh-keyscan -p ${check.port} ${check.host} >> '${check.file}') or set hostKeyPolicy: accept-new`,
    );
  }
  mkdirSync(dirname(check.file), { recursive: true, mode: 0o700 });
  appendFileSync(check.file, `${name} ${type} ${key.toString('base64')}\n`, { mode: 0o600 });
}
