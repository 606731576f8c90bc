/**
 * Who owns a cloud instance, and whether its session is still on: what the
 * watchdog (watchdog.ts) reads to decide that an instance is a leftover.
 *
 * Owner: `<hostname>/<pid>` of the drover process that launched it (the
 * `drover:owner` tag). On the machine named there, the owner is gone when
 * no live process has that pid (a zombie counts as gone).
 *
 * Sessions: a registry directory with one file per open session
 * (`<session>.json`: owner, provider, when it opened). A session opens
 * before its first launch and closes only after every one of its
 * instances ended (terminated, or leaked and handed to the watchdog).
 * An instance whose session is not open in this machine's registry,
 * though its owner names this machine, belongs to a session that is over.
 *
 * Instances owned by other machines are never judged: their owner's
 * liveness and registry are out of sight. Run `drover instances --cleanup`
 * on the machine that launched them.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { isAlive } from '../hosts/proc.js';
import { labelValue, type ProviderName } from './provider.js';

/** This process as an owner: `<hostname>/<pid>`. */
export function ownerId(pid: number = process.pid): string {
  return `${hostname()}/${pid}`;
}

/** The host and pid of an owner tag, as EC2 stores it (`host/123`) or GCE (`host-123`). */
export function parseOwner(owner: string): { host: string; pid: number } | undefined {
  const match = /^(.+)[/-](\d+)$/.exec(owner);
  return match === null ? undefined : { host: match[1]!, pid: Number(match[2]) };
}

/** Whether an owner names this machine (compared as GCE stores it, which loses case and punctuation). */
export function ownedHere(owner: string | undefined, host: string = hostname()): boolean {
  const parsed = owner === undefined ? undefined : parseOwner(owner);
  return parsed !== undefined && labelValue(parsed.host) === labelValue(host);
}

/** Whether the owner's process is gone; only meaningful when ownedHere(). */
export function ownerGone(owner: string): boolean {
  const parsed = parseOwner(owner);
  return parsed === undefined || !isAlive(parsed.pid);
}

export interface SessionRecord {
  readonly session: string;
  readonly owner: string;
  readonly provider: ProviderName;
  readonly openedAt: string;
}

export class SessionRegistry {
  constructor(readonly dir: string) {}

  /** A file name for any session name. */
  #file(session: string): string {
    const safe = session.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 80);
    return join(this.dir, `${safe}-${createHash('sha256').update(session).digest('hex').slice(0, 12)}.json`);
  }

  open(record: Omit<SessionRecord, 'openedAt'>): SessionRecord {
    mkdirSync(this.dir, { recursive: true });
    const full: SessionRecord = { ...record, openedAt: new Date().toISOString() };
    const file = this.#file(record.session);
    writeFileSync(`${file}.tmp`, JSON.stringify(full) + '\n');
    renameSync(`${file}.tmp`, file);
    return full;
  }

  close(session: string): void {
    rmSync(this.#file(session), { force: true });
  }

  /** Every open session (unreadable files are skipped). */
  list(): SessionRecord[] {
    let names: string[];
    try {
      names = readdirSync(this.dir).filter((name) => name.endsWith('.json'));
    } catch {
      return [];
    }
    return names.flatMap((name) => {
      try {
        return [JSON.parse(readFileSync(join(this.dir, name), 'utf8')) as SessionRecord];
      } catch {
        return [];
      }
    });
  }

  /** Whether a session is open, by its name as a tag stores it (GCE's label form too). */
  isOpen(stored: string): boolean {
    return this.list().some((record) => record.session === stored || labelValue(record.session) === stored);
  }
}
