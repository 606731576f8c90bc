/**
 * The shell scripts the SSH transport runs on the remote host, and the
 * command line that starts them. POSIX sh, plus `setsid` (util-linux) and
 * `env` there; nothing is installed on the remote host.
 *
 * OpenSSH runs every exec channel's command in a new session (setsid), so
 * the login shell's pid P is also the id of a fresh process group. The
 * wrapper makes P the command itself (`exec env -i ...`), so OpenSSH
 * reports its exit status or signal exactly, and everything it starts
 * stays in group P. Before that exec it starts a watcher in a session of
 * its own (outside group P) that holds the channel's stdin and stdout:
 *
 *  - a line `TERM` (`KILL`, `INT`...) on stdin signals the whole group P;
 *  - stdin ends when the main process exits (sshd closes it then), or when
 *    the channel or the whole connection is gone. If the main process still
 *    runs at that point, its session is gone: the watcher stops group P
 *    (first signal, grace period, SIGKILL). Otherwise it waits for what is
 *    left of the group, and stops it too if the SSH session process dies;
 *  - the watcher exits once no live process of group P is left. It holds
 *    neither stdout nor stderr, so the channel closes when the command and
 *    whatever inherited its output are done, as a local pipe would. What is
 *    left of the group after the main process exited is signalled and
 *    waited for with short control commands (groupControlLine).
 *
 * Before the exec the wrapper writes one header line to stderr,
 * `<nonce> started <P>` or `<nonce> error <why>`, which the client strips.
 */
import { shellQuote } from './ssh-address.js';

/** A shell function: whether a live (non-zombie) process is left in group $P. */
export const ALIVE_FUNCTION = `alive() {
  kill -s 0 -- "-$P" 2>/dev/null || return 1
  [ -r /proc/self/stat ] || return 0
  for f in /proc/[0-9]*/stat; do
    read -r l 2>/dev/null <"$f" || continue
    l=\${l##*) }
    set -- $l
    [ "$3" = "$P" ] && [ "$1" != Z ] && [ "$1" != X ] && return 0
  done
  return 1
}`;

/** $1 main pid, $2 ssh session pid, $3 grace in tenths of a second, $4 first signal. */
const WATCHER = `P=$1 S=$2 grace=$3 first=$4
${ALIVE_FUNCTION}
stop() {
  kill -s "$first" -- "-$P" 2>/dev/null
  t=0
  while [ "$t" -lt "$grace" ] && alive; do sleep 0.1; t=$((t + 1)); done
  kill -s KILL -- "-$P" 2>/dev/null
  exit 0
}
while read -r sig; do
  case $sig in TERM|KILL|INT|HUP|QUIT|USR1|USR2|CONT|STOP) kill -s "$sig" -- "-$P" 2>/dev/null ;; esac
done
if kill -s 0 -- "-$P" 2>/dev/null && kill -0 "$P" 2>/dev/null; then stop; fi
while alive; do
  kill -0 "$S" 2>/dev/null || stop
  sleep 0.5
done
`;

/**
 * A control command: signals what is left of group `pgid` (when `signal` is
 * given), waits up to `waitMs` for it to be gone, and prints `gone` or `alive`.
 */
export function groupControlLine(pgid: number, signal: NodeJS.Signals | undefined, waitMs: number): string {
  const kill = signal === undefined ? '' : `kill -s ${signalName(signal)} -- "-$P" 2>/dev/null; `;
  return `P=${pgid}; ${ALIVE_FUNCTION}\n${kill}i=0; while [ "$i" -lt ${Math.ceil(Math.max(0, waitMs) / 50)} ] && alive; do sleep 0.05; i=$((i + 1)); done; if alive; then echo alive; else echo gone; fi`;
}

/** $1 nonce, $2 cwd, $3 number of env assignments, $4 PATH to look the command up in, $5 watcher, $6 grace, $7 first signal; then env assignments and argv. */
const WRAPPER = `n=$1 dir=$2 count=$3 lookup=$4 watch=$5 grace=$6 first=$7
shift 7
fail() { printf '%s error %s\\n' "$n" "$1" >&2; exit 127; }
cd -- "$dir" 2>/dev/null || fail "cannot enter the working directory $dir"
command -v setsid >/dev/null 2>&1 || fail "setsid (util-linux) is not installed on this host"
i=0
for a do
  if [ "$i" -eq "$count" ]; then cmd=$a; break; fi
  i=$((i + 1))
done
case $cmd in
  */*) [ -f "$cmd" ] || fail "$cmd: no such file" ;;
  *) PATH=$lookup command -v "$cmd" >/dev/null 2>&1 || fail "$cmd: command not found" ;;
esac
exec 3<&0
setsid /bin/sh -c "$watch" drover-watch "$$" "$PPID" "$grace" "$first" <&3 >/dev/null 2>&1 &
printf '%s started %s\\n' "$n" "$$" >&2
exec env -i -- "$@" </dev/null 3<&-
`;

export interface RemoteCommand {
  readonly nonce: string;
  readonly cwd: string;
  readonly env: Readonly<Record<string, string>>;
  readonly argv: readonly string[];
  readonly killSignal: NodeJS.Signals;
  readonly killGraceMs: number;
}

/** The command line of an exec channel (read by the login shell, which must be POSIX-like). */
export function remoteCommandLine(command: RemoteCommand): string {
  const assignments = Object.entries(command.env).map(([name, value]) => `${name}=${value}`);
  // env(1) would take an argv[0] with "=" in it for one more assignment.
  const argv = command.argv[0]?.includes('=') ? ['/bin/sh', '-c', 'exec "$0" "$@"', ...command.argv] : command.argv;
  const args = [
    command.nonce,
    command.cwd,
    String(assignments.length),
    command.env['PATH'] ?? '/usr/bin:/bin',
    WATCHER,
    String(Math.max(0, Math.round(command.killGraceMs / 100))),
    signalName(command.killSignal),
    ...assignments,
    ...argv,
  ];
  return `exec /bin/sh -c ${shellQuote(WRAPPER)} drover-run ${args.map(shellQuote).join(' ')}`;
}

const SIGNALS = new Set(['TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2', 'CONT', 'STOP']);

/** `SIGTERM` -> `TERM`; throws for a signal the watcher does not relay. */
export function signalName(signal: NodeJS.Signals): string {
  const name = signal.replace(/^SIG/, '');
  if (!SIGNALS.has(name)) throw new Error(`signal ${signal} cannot be sent to a remote command`);
  return name;
}
