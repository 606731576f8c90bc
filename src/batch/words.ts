/**
 * Job lines into words, and words back into a shell command line.
 *
 * A line is split as a POSIX shell splits words, without any expansion:
 * blanks separate words; '...' keeps everything literally; "..." keeps
 * everything but a backslash before " \ $ or `; outside quotes a backslash
 * keeps the next character. `$`, `*`, `~` and the like stay as they are.
 * Each word is then quoted again for `sh -c` (as cloudtask does), so the
 * command sees exactly the words of the line.
 */
import { ConfigError } from '../model/errors.js';

export class JobLineError extends ConfigError {
  constructor(message: string) {
    super(message);
  }
}

export function splitWords(line: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (c === ' ' || c === '\t' || c === '\r') {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
      continue;
    }
    inWord = true;
    if (c === '\\') {
      if (i + 1 < line.length) word += line[++i]!;
      continue;
    }
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      if (end < 0) throw new JobLineError(`unterminated ' quote in job line: ${line}`);
      word += line.slice(i + 1, end);
      i = end;
      continue;
    }
    if (c === '"') {
      let j = i + 1;
      for (; j < line.length && line[j] !== '"'; j++) {
        const d = line[j]!;
        if (d === '\\' && j + 1 < line.length && '"\\$`'.includes(line[j + 1]!)) word += line[++j]!;
        else word += d;
      }
      if (j >= line.length) throw new JobLineError(`unterminated " quote in job line: ${line}`);
      i = j;
      continue;
    }
    word += c;
  }
  if (inWord) words.push(word);
  return words;
}

/** One word for `sh -c`: as is when it is plainly safe, else in single quotes. */
export function quoteWord(word: string): string {
  if (/^[\w./=:,@%+-]+$/.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * The shell command line of one job. One command argument is a shell
 * command line of its own (kept as is); several are words (quoted). No
 * command: the job's words are the whole command.
 */
export function jobCommand(command: readonly string[], line: string): string {
  const words = splitWords(line).map(quoteWord);
  const head = command.length === 1 ? command[0]! : command.map(quoteWord).join(' ');
  return [head, ...words].filter((part) => part.length > 0).join(' ');
}
