/**
 * What a running batch shows: on a terminal one live line that is redrawn
 * in place (done / failed / running / pending, then each host), otherwise
 * one timestamped line per event; and before it starts, on a terminal, the
 * parameter table that the confirmation question asks about.
 */
import type { JobStatus } from './session.js';

export interface HostProgress {
  readonly host: string;
  readonly state: 'up' | 'down' | 'retired';
  readonly running: number;
  readonly ok: number;
  readonly failed: number;
}

export interface Progress {
  readonly counts: Readonly<Record<JobStatus, number>>;
  readonly hosts: readonly HostProgress[];
}

/** `12 done, 1 failed, 4 running, 183 pending | a: 2 running, 7 ok | b: retired, 5 ok, 1 failed`. */
export function progressLine(progress: Progress): string {
  const { counts } = progress;
  const head = `${counts.ok} done, ${counts.failed + counts.timeout} failed, ${counts.running} running, ${counts.pending} pending`;
  const hosts = progress.hosts.map((h) => {
    const parts = [h.state === 'up' ? `${h.running} running` : h.state, `${h.ok} ok`, ...(h.failed > 0 ? [`${h.failed} failed`] : [])];
    return `${h.host}: ${parts.join(', ')}`;
  });
  return [head, ...hosts].join(' | ');
}

/** The question's table: one `name  value` row per parameter, `-` for those not set (as cloudtask shows it). */
export function parameterTable(rows: readonly (readonly [string, string | number | undefined])[]): string {
  const width = Math.max(9, ...rows.map(([name]) => name.length)) + 2;
  const lines = [`  ${'Parameter'.padEnd(width)}Value`, `  ${'---------'.padEnd(width)}-----`];
  for (const [name, value] of rows) lines.push(`  ${name.padEnd(width)}${value === undefined || value === '' ? '-' : String(value)}`);
  return lines.join('\n') + '\n';
}

/** A live line for a terminal: each call redraws it, cut to the terminal's width. */
export class LiveLine {
  #shown = false;
  constructor(private readonly out: NodeJS.WriteStream) {}

  draw(text: string): void {
    const width = this.out.columns || 80;
    this.out.write(`\r\x1b[K${text.length >= width ? text.slice(0, width - 1) : text}`);
    this.#shown = true;
  }

  /** Prints a whole line above the live line (which the next draw() brings back). */
  print(text: string): void {
    this.clear();
    this.out.write(text + '\n');
  }

  clear(): void {
    if (this.#shown) this.out.write('\r\x1b[K');
    this.#shown = false;
  }
}
