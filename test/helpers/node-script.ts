/**
 * Child Node processes for the tests that need a program of their own (a
 * worker that dies, a program that must exit by itself): they load drover's
 * sources through tap's TypeScript loader, as the test itself does.
 */
import { spawn } from 'node:child_process';

/** The `--import=` argument of tap's TypeScript loader: the test's own, or resolved anew. */
export function tsLoaderArg(): string {
  return process.execArgv.find((arg) => arg.startsWith('--import=') && arg.includes('@tapjs/typescript')) ?? `--import=${import.meta.resolve('@tapjs/typescript/import')}`;
}

/**
 * Runs `script` as an ES module in a new Node process with that loader; SIGKILLs it after `timeoutMs`.
 * `wrapper` is a command that runs Node, such as `['faketime', '-f', '+40s']`.
 */
export function runNodeScript(script: string, timeoutMs: number, wrapper: readonly string[] = []): Promise<{ stdout: string; stderr: string; status: number | null; exitedAt: number }> {
  return new Promise((resolve) => {
    const [command, ...args] = [...wrapper, process.execPath, tsLoaderArg(), '--input-type=module', '-e', script];
    const child = spawn(command!, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('exit', (status) => {
      clearTimeout(timer);
      resolve({ stdout, stderr, status, exitedAt: Date.now() });
    });
  });
}
