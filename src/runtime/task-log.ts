/**
 * The log of one run: the command's stdout and stderr, and the lines drover
 * and plugins write about the run, in one byte stream. The `livelog`
 * plugin streams it to the queue while it grows.
 */
import { PassThrough, type Readable } from 'node:stream';

export class TaskLog {
  readonly stream = new PassThrough();
  #ended = false;

  /** Writes one line of drover's own, marked so it stands out from the command's output. */
  line(text: string): void {
    if (this.#ended) return;
    this.stream.write(`[drover] ${text}\n`);
  }

  /** Copies a stream of the command into the log; resolves when it ends. */
  async pipeFrom(source: Readable): Promise<void> {
    for await (const chunk of source) {
      if (this.#ended) continue;
      this.stream.write(chunk as Buffer);
    }
  }

  get ended(): boolean {
    return this.#ended;
  }

  end(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.stream.end();
  }
}
