/**
 * The shell scripts the SSH transport runs on the remote host when it has
 * no remote agent there (no perl, or `remoteAgent: false`; see
 * ssh-agent.ts), and the command line that starts them. POSIX sh, plus
 * `setsid` (util-linux) and `env` there; nothing is installed on the
 * remote host.
 *
 * OpenSSH runs every exec channel's command in a new session (setsid), so
 * the login shell's pid P is also the id of a fresh process group. The
 * wrapper first applies the file changes the transport deferred
 * (ssh-pending.ts: `rm -rf` of removed paths, then `mkdir -p` of task
 * directories), so that a task costs one channel and not one per change.
 * Then it makes P the command itself (`exec env -i ...`), so OpenSSH
 * reports its exit status or signal exactly, and everything it starts
 * stays in group P. Before that exec it starts a watcher in a session of
 * its own (outside group P) that holds the channel's stdin and stderr:
 *
 *  - a line `TERM` (`KILL`, `INT`...) on stdin signals the whole group P;
 *  - stdin ends when the main process exits (sshd closes it then), or when
 *    the channel or the whole connection is gone. If the main process still
 *    runs at that point, its session is gone: the watcher stops group P
 *    (first signal, grace period, SIGKILL). Otherwise it says on stderr
 *    whether anything of group P is left (`<nonce> gone` or `<nonce>
 *    alive`), lets go of stderr, waits for what is left of the group, and
 *    stops it too if the SSH session process dies;
 *  - the watcher exits once no live process of group P is left. It holds
 *    no stdout, and stderr only until the main process exited, so the
 *    channel closes when the command and whatever inherited its output are
 *    done, as a local pipe would. What is left of the group after the main
 *    process exited is signalled and waited for with short control
 *    commands (groupControlLine); when nothing is left (`gone`), no
 *    control command is needed.
 *
 * Before the exec the wrapper writes header lines to stderr, which the
 * client strips: `<nonce> unremoved <i>` / `<nonce> unmade <i>` for a
 * deferred change that failed (by its index), then one of `<nonce> started
 * <P>`, `<nonce> error <why>` (the command cannot start) or `<nonce>
 * workdir <why>` (its working directory cannot be cleared or made).
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

/** Shell functions that apply deferred changes: `_drop PATH...` removes, `_make PATH...` makes directories; each reports a failure as `$n <what> <index>` on stdout or stderr ($to). */
const CHANGE_FUNCTIONS = `_exists() { [ -e "$1" ] || [ -h "$1" ]; }
_report() { printf '%s %s %s\\n' "$n" "$1" "$2" >&$to; }
_drop() {
  for p do
    if _exists "$p"; then
      rm -rf -- "$@" 2>/dev/null && return 0
      i=0
      for p do _exists "$p" && _report unremoved "$i"; i=$((i + 1)); done
      return 0
    fi
  done
}
_make() {
  mkdir -p -- "$@" 2>/dev/null && return 0
  i=0
  for p do [ -d "$p" ] || _report unmade "$i"; i=$((i + 1)); done
}`;

/** $1 main pid, $2 ssh session pid, $3 grace in tenths of a second, $4 first signal, $5 nonce. */
const WATCHER = `P=$1 S=$2 grace=$3 first=$4 n=$5
trap '' PIPE
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
if alive; then printf '%s alive\\n' "$n" >&2; else printf '%s gone\\n' "$n" >&2; exit 0; fi
exec 2>/dev/null
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

/**
 * $1 nonce, $2 cwd, $3 number of env assignments, $4 PATH to look the command up in, $5 watcher, $6 grace, $7 first signal,
 * $8 paths to remove and $9 directories to make (shell words, for eval), $10 whether a removal covers the cwd; then env assignments and argv.
 */
const WRAPPER = `n=$1 dir=$2 count=$3 lookup=$4 watch=$5 grace=$6 first=$7 drops=$8 makes=$9 fresh=\${10}
shift 10
to=2
fail() { printf '%s error %s\\n' "$n" "$1" >&2; exit 127; }
${CHANGE_FUNCTIONS}
[ -z "$drops" ] || eval "_drop $drops"
if [ "$fresh" = 1 ] && _exists "$dir"; then printf '%s workdir cannot clear the working directory %s\\n' "$n" "$dir" >&2; exit 127; fi
[ -z "$makes" ] || eval "_make $makes"
if ! cd -- "$dir" 2>/dev/null; then
  [ -z "$makes" ] || { printf '%s workdir cannot make the working directory %s\\n' "$n" "$dir" >&2; exit 127; }
  fail "cannot enter the working directory $dir"
fi
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
setsid /bin/sh -c "$watch" drover-watch "$$" "$PPID" "$grace" "$first" "$n" <&3 >/dev/null &
printf '%s started %s\\n' "$n" "$$" >&2
exec env -i -- "$@" </dev/null 3<&-
`;

/**
 * A control command that applies deferred changes (the same as a wrapper
 * does before its command) and reports each failure on stdout as
 * `<nonce> unremoved <i>` or `<nonce> unmade <i>`.
 */
export function changesCommandLine(nonce: string, changes: { readonly removals: readonly string[]; readonly dirs: readonly string[] }): string {
  const script = `n=$1 to=1\n${CHANGE_FUNCTIONS}\n[ -z "$2" ] || eval "_drop $2"\n[ -z "$3" ] || eval "_make $3"\n`;
  return `exec /bin/sh -c ${shellQuote(script)} drover-changes ${[nonce, words(changes.removals), words(changes.dirs)].map(shellQuote).join(' ')}`;
}

export interface RemoteCommand {
  readonly nonce: string;
  readonly cwd: string;
  readonly env: Readonly<Record<string, string>>;
  readonly argv: readonly string[];
  readonly killSignal: NodeJS.Signals;
  readonly killGraceMs: number;
  /** Deferred changes to apply before the command: paths to remove, then directories to make. */
  readonly removals?: readonly string[];
  readonly dirs?: readonly string[];
  /** A removal among them covers the cwd: it must be gone before the directories are made. */
  readonly freshCwd?: boolean;
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
    words(command.removals ?? []),
    words(command.dirs ?? []),
    command.freshCwd === true ? '1' : '0',
    ...assignments,
    ...argv,
  ];
  return `exec /bin/sh -c ${shellQuote(WRAPPER)} drover-run ${args.map(shellQuote).join(' ')}`;
}

/** Paths as shell words, for `eval`. */
function words(paths: readonly string[]): string {
  return paths.map(shellQuote).join(' ');
}

const SIGNALS = new Set(['TERM', 'KILL', 'INT', 'HUP', 'QUIT', 'USR1', 'USR2', 'CONT', 'STOP']);

/** `SIGTERM` -> `TERM`; throws for a signal the watcher does not relay. */
export function signalName(signal: NodeJS.Signals): string {
  const name = signal.replace(/^SIG/, '');
  if (!SIGNALS.has(name)) throw new Error(`signal ${signal} cannot be sent to a remote command`);
  return name;
}
