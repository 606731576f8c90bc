/**
 * The agent: a Perl program (core modules only) that starts every command
 * itself, so that a command costs its host one fork and one exec. The SSH
 * transport runs it in ONE exec channel per connection, instead of an sshd
 * session, a login shell and the wrapper's programs per command
 * (ssh-remote.ts, still used where the host has no perl); the local
 * transport runs it as a child process, instead of forking the worker.
 *
 * The program is sent over the channel's stdin by a short bootstrap (the
 * remote command line stays short and readable in `ps`); see
 * agentCommandLine(). ssh-agent.ts is the client side.
 */
import { shellQuote } from './ssh-address.js';

/** The protocol version: the agent says it in its hello frame, the client checks it. */
export const AGENT_PROTOCOL = 'drover-agent 1';

/** What the remote command line prints on stderr, before exiting 127, when the host has no perl. */
export const NO_PERL = 'drover-agent: perl is not installed on this host';

/** Reads the program (10 decimal digits of length, then the source) from stdin and runs it. */
const BOOTSTRAP = 'my ($s, $n) = ("", -1); while ($n < 0 || length($s) < 10 + $n) { sysread(STDIN, $s, 1 << 16, length $s) or exit 111; $n = substr($s, 0, 10) if $n < 0 && length($s) >= 10 } eval substr($s, 10); die $@ if $@; exit 0';

/** The command line of the agent's channel: perl if the host has it, else exit 127 saying NO_PERL. */
export function agentCommandLine(killSignal: string, killGraceMs: number): string {
  const perl = `exec perl -e ${shellQuote(BOOTSTRAP)} ${shellQuote(killSignal)} ${Math.max(0, Math.round(killGraceMs))}`;
  return `if command -v perl >/dev/null 2>&1; then ${perl}; else echo ${shellQuote(NO_PERL)} >&2; exit 127; fi`;
}

/** What the client writes first on the agent's stdin: the program, behind its length. */
export function agentProgramMessage(): Buffer {
  const source = Buffer.from(AGENT_PROGRAM, 'utf8');
  return Buffer.concat([Buffer.from(String(source.length).padStart(10, '0')), source]);
}

const AGENT_PROGRAM = String.raw`
# drover-agent: runs commands for one SSH connection of drover.
#
# Started as  perl -e BOOTSTRAP KILL_SIGNAL KILL_GRACE_MS
# in an exec channel; stdin and stdout carry frames, stderr only the
# agent's own complaints (the client logs them).
#
# FRAMES, both ways: TYPE (1 byte) ID (uint32, big-endian) LENGTH (uint32,
# big-endian) PAYLOAD (LENGTH bytes). ID names a command (or a flush of
# changes); the client picks it. Lists in payloads are NUL-separated.
#
# Client -> agent:
#   C  start a command. Payload: FRESH CWD LOOKUP N_REMOVALS REMOVAL...
#      N_DIRS DIR... N_ENV NAME=VALUE... ARGV... where FRESH is 1 when a
#      removal covers CWD, and LOOKUP the PATH argv[0] is looked up in.
#      The agent applies the removals (rm -rf) and then the directories
#      (mkdir -p) itself, in the order the frames come (so the client may
#      send a command that needs the changes an earlier one carries); then
#      it forks. The child makes a session of its own (its pid is the
#      process group), enters CWD, sets exactly the environment given,
#      stdin /dev/null, stdout and stderr to pipes, and execs. (A huge tree
#      to remove holds the agent up meanwhile; task directories are small.)
#   F  apply changes only: N_REMOVALS REMOVAL... N_DIRS DIR...
#   K  signal the command's process group: payload TERM, KILL, ... (unless
#      the group is known to be gone: its id may be reused).
#   Q  is the group gone? Payload: milliseconds to wait for it.
#   A  B  credit: the client consumed that many (decimal) bytes of stdout
#      (A) or stderr (B) of the command.
#   P  nothing: the client sends it when frames came, so that its TCP ACK
#      goes at once (sshd's Nagle's algorithm would hold the next frames
#      until then, and the client's kernel may delay a bare ACK by 40 ms).
#
# Agent -> client:
#   H  hello, id 0: "drover-agent 1" (the protocol version).
#   U  M  a removal (U) or directory (M) that could not be made: its index.
#      Before the command's S or N, or the flush's D.
#   S  the command started: its pid (= its process group).
#   N  it did not start: "error WHY" or "workdir WHY" (the working directory
#      could not be cleared or made). Nothing more comes for that id.
#   O  E  stdout (O) or stderr (E) bytes; o e: that stream ended.
#   X  the main process ended: "code N" or "signal SIGNAME".
#   G  right after X: "gone" (nothing of the group is left) or "alive".
#   R  the answer to Q: "gone" or "alive".
#   D  the flush is done.
#
# FLOW CONTROL: at most WINDOW bytes of a stream may be sent and not yet
# credited; then the agent stops reading that pipe, and the command blocks
# on it as on a full local pipe. Output is read in CHUNK bytes at a time, in
# turn over all commands, so a chatty command delays no one's exit report.
#
# WHEN THE CHANNEL GOES (stdin ends: the client closed it, or the
# connection broke) or the agent gets SIGTERM/SIGHUP/SIGINT, every group it
# started that is not known to be gone gets KILL_SIGNAL, then SIGKILL after
# KILL_GRACE_MS, and the agent exits.
use strict;
use warnings;
use Config;
use Errno qw(EAGAIN EINTR);
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
use IO::Select;
use POSIX ();
use Time::HiRes ();

use constant { WINDOW => 256 * 1024, CHUNK => 64 * 1024, MAX_FRAME => 64 * 1024 * 1024, EXEC_WAIT_MS => 50 };

my ($KILL_SIGNAL, $KILL_GRACE_MS) = @ARGV;
$KILL_SIGNAL = 'TERM' unless defined $KILL_SIGNAL && $KILL_SIGNAL =~ /^[A-Z0-9]+$/;
$KILL_GRACE_MS = 5000 unless defined $KILL_GRACE_MS && $KILL_GRACE_MS =~ /^\d+$/;
$0 = 'drover-agent';

my %SIGNAL_NAME;
@SIGNAL_NAME{split ' ', $Config{sig_num}} = split ' ', $Config{sig_name};

my $stopping = 0;
$SIG{PIPE} = 'IGNORE';
# Only to interrupt select() when a child ends.
$SIG{CHLD} = sub {};
$SIG{$_} = sub { $stopping = 1 } for qw(TERM HUP INT);

# Once here, not in every child: an empty signal mask to inherit, and the commands' stdin.
POSIX::sigprocmask(POSIX::SIG_SETMASK(), POSIX::SigSet->new);
open(my $NULL, '<', '/dev/null') or die "drover-agent: cannot open /dev/null: $!\n";

binmode STDIN;
binmode STDOUT;
my $select = IO::Select->new(\*STDIN);
my %reader;     # fileno -> [handler, target, stream]
my %commands;   # id -> command
my %children;   # pid -> command
my $inbox = '';
my $outbox = '';

sub frame {
  my ($type, $id, $payload) = @_;
  $payload = '' unless defined $payload;
  $outbox .= pack('a1 N N', $type, $id, length $payload) . $payload;
}

sub flush_outbox {
  while (length $outbox) {
    my $written = syswrite(STDOUT, $outbox);
    if (!defined $written) {
      next if $! == EINTR;
      $stopping = 1;
      $outbox = '';
      return;
    }
    substr($outbox, 0, $written, '');
  }
}

sub nonblocking {
  my ($fh) = @_;
  fcntl($fh, F_SETFL, fcntl($fh, F_GETFL, 0) | O_NONBLOCK);
}

sub watch {
  my ($fh, @what) = @_;
  $reader{fileno $fh} = [@what];
  $select->add($fh);
}

sub unwatch {
  my ($fh) = @_;
  delete $reader{fileno $fh};
  $select->remove($fh);
}

# Whether a live (not zombie) process is left in group $pgid.
sub group_alive {
  my ($pgid) = @_;
  return 0 unless kill 0, -$pgid;
  opendir(my $proc, '/proc') or return 1;
  for my $pid (readdir $proc) {
    next unless $pid =~ /^\d+$/;
    open(my $stat, '<', "/proc/$pid/stat") or next;
    my $line = <$stat>;
    next unless defined $line && $line =~ /^.*\)\s+(\S+)\s+\S+\s+(\d+)/s;
    return 1 if $2 == $pgid && $1 ne 'Z' && $1 ne 'X';
  }
  return 0;
}

sub path_exists { return -e $_[0] || -l $_[0] }

# rm -rf: removes what it can; whether the path is gone is checked after.
sub remove_path {
  my ($path) = @_;
  if (lstat($path) && -d _) {
    if (opendir(my $dir, $path)) {
      remove_path("$path/$_") for grep { $_ ne '.' && $_ ne '..' } readdir $dir;
    }
    rmdir $path;
  } else {
    unlink $path;
  }
}

# mkdir -p.
sub make_path {
  my ($path) = @_;
  return if -d $path;
  (my $parent = $path) =~ s{/+[^/]*/*$}{};
  make_path($parent) if length $parent && $parent ne $path;
  mkdir $path;
}

# rm -rf of each path, then a look: says which are still there (frames U).
sub apply_removals {
  my ($id, $removals) = @_;
  for my $i (0 .. $#$removals) {
    remove_path($removals->[$i]) if path_exists($removals->[$i]);
    frame('U', $id, $i) if path_exists($removals->[$i]);
  }
}

# mkdir -p of each directory; says which are not directories then (frames M).
sub apply_dirs {
  my ($id, $dirs) = @_;
  for my $i (0 .. $#$dirs) {
    make_path($dirs->[$i]);
    frame('M', $id, $i) unless -d $dirs->[$i];
  }
}

sub take_list {
  my ($fields) = @_;
  my $count = shift @$fields;
  return [splice @$fields, 0, $count || 0];
}

# Where the child will find argv[0]: the path to exec, or undef. Relative paths count from CWD, where
# the child will be.
sub find_command {
  my ($command, $cwd, $lookup) = @_;
  if ($command =~ m{/}) {
    return -f under($cwd, $command) ? $command : undef;
  }
  for my $dir (split /:/, $lookup) {
    my $candidate = (length $dir ? $dir : '.') . "/$command";
    return $candidate if -f under($cwd, $candidate) && -x _;
  }
  return undef;
}

sub under { return $_[1] =~ m{^/} ? $_[1] : "$_[0]/$_[1]" }

# The child of a command, up to its exec. It does only what the parent cannot do for it: every page
# it writes before the exec is copied, which made the child cost its host more than the command.
# Says why it failed on $status ("N why", "W why").
sub run_child {
  my ($status, $out, $err, $spec, $path) = @_;
  POSIX::setsid();
  # The signals the agent handles are reset by the exec; an ignored one would stay ignored.
  $SIG{PIPE} = 'DEFAULT';
  if (chdir $spec->{cwd}) {
    POSIX::dup2(fileno $NULL, 0);
    POSIX::dup2(fileno $out, 1);
    POSIX::dup2(fileno $err, 2);
    # $status is close-on-exec: it ends, with nothing said, when the exec works.
    { no warnings 'exec'; exec { $path } @{$spec->{argv}}; }
    syswrite($status, "N $spec->{argv}[0]: $!\n");
  } else {
    syswrite($status, (@{$spec->{dirs}} ? 'W cannot make' : 'N cannot enter') . " the working directory $spec->{cwd}\n");
  }
  POSIX::_exit(127);
}

sub start_command {
  my ($id, $payload) = @_;
  my @fields = split /\0/, $payload, -1;
  my %spec = (fresh => shift(@fields), cwd => shift(@fields), lookup => shift(@fields));
  $spec{removals} = take_list(\@fields);
  $spec{dirs} = take_list(\@fields);
  $spec{env} = take_list(\@fields);
  $spec{argv} = \@fields;
  unless (@fields) {
    frame('N', $id, 'error no command given');
    return;
  }
  apply_removals($id, $spec{removals});
  if ($spec{fresh} && path_exists($spec{cwd})) {
    frame('N', $id, "workdir cannot clear the working directory $spec{cwd}");
    return;
  }
  apply_dirs($id, $spec{dirs});
  unless (-d $spec{cwd}) {
    frame('N', $id, @{$spec{dirs}} ? "workdir cannot make the working directory $spec{cwd}" : "error cannot enter the working directory $spec{cwd}");
    return;
  }
  my $path = find_command($spec{argv}[0], $spec{cwd}, $spec{lookup});
  unless (defined $path) {
    frame('N', $id, "error $spec{argv}[0]: " . ($spec{argv}[0] =~ m{/} ? 'no such file' : 'command not found'));
    return;
  }
  # The command's environment is set here, not in the child (the agent itself reads none of it).
  %ENV = map { my ($name, $value) = split /=/, $_, 2; ($name, $value // '') } @{$spec{env}};
  my ($out_r, $out_w, $err_r, $err_w, $status_r, $status_w);
  unless (pipe($out_r, $out_w) && pipe($err_r, $err_w) && pipe($status_r, $status_w)) {
    frame('N', $id, "error cannot make a pipe: $!");
    return;
  }
  my $pid = fork;
  unless (defined $pid) {
    frame('N', $id, "error cannot fork: $!");
    return;
  }
  if ($pid == 0) {
    close $_ for $out_r, $err_r, $status_r;
    run_child($status_w, $out_w, $err_w, \%spec, $path);
  }
  close $_ for $out_w, $err_w, $status_w;
  my $command = { id => $id, pid => $pid, status => $status_r, said => '', out => { O => $out_r, E => $err_r },
    sent => { O => 0, E => 0 }, paused => {}, queries => [] };
  $commands{$id} = $command;
  $children{$pid} = $command;
  nonblocking($_) for $out_r, $err_r, $status_r;
  # A child execs within a millisecond or so: the agent waits for that, up to EXEC_WAIT_MS, because every
  # page it writes while the child still shares it is copied. One that takes longer (a program on a slow
  # file system) is followed like the others' output, so that it holds no one up.
  if (status_within($status_r, EXEC_WAIT_MS)) {
    finish_status($command);
    return if $command->{failed};
  } else {
    watch($status_r, \&on_status, $command);
  }
  watch($out_r, \&on_output, $command, 'O');
  watch($err_r, \&on_output, $command, 'E');
}

# Whether $fh is readable (data, or its end) within $ms milliseconds.
sub status_within {
  my ($fh, $ms) = @_;
  my $bits = '';
  vec($bits, fileno $fh, 1) = 1;
  my $until = time_ms() + $ms;
  while (1) {
    my $left = $until - time_ms();
    return 0 if $left < 0;
    my $ready = select(my $readable = $bits, undef, undef, $left / 1000);
    return 1 if $ready > 0;
    return 0 unless $ready < 0 && $! == EINTR;
  }
}

sub start_flush {
  my ($id, $payload) = @_;
  my @fields = split /\0/, $payload, -1;
  my ($removals, $dirs) = (take_list(\@fields), take_list(\@fields));
  apply_removals($id, $removals);
  apply_dirs($id, $dirs);
  frame('D', $id);
}

# Reads a child's status pipe; at its end, says what it says.
sub on_status {
  my ($command) = @_;
  my $read = sysread($command->{status}, my $data, 4096);
  return if !defined $read && ($! == EAGAIN || $! == EINTR);
  if ($read) {
    $command->{said} .= $data;
    return;
  }
  status_ended($command);
}

# The whole status of a child that exec'd or exited (its end of the pipe is closed).
sub finish_status {
  my ($command) = @_;
  return unless $command->{status};
  my $fh = $command->{status};
  fcntl($fh, F_SETFL, fcntl($fh, F_GETFL, 0) & ~O_NONBLOCK);
  while (1) {
    my $read = sysread($fh, my $data, 4096);
    next if !defined $read && $! == EINTR;
    last unless $read;
    $command->{said} .= $data;
  }
  status_ended($command);
}

sub status_ended {
  my ($command) = @_;
  my $fh = delete $command->{status} or return;
  unwatch($fh);
  close $fh;
  my $id = $command->{id};
  my $failure;
  for my $line (split /\n/, $command->{said}) {
    my ($kind, $text) = split / /, $line, 2;
    if ($kind eq 'N') { $failure = "error $text" }
    elsif ($kind eq 'W') { $failure = "workdir $text" }
  }
  if (defined $failure) {
    frame('N', $id, $failure);
    $command->{failed} = 1;
    for my $fh (values %{$command->{out}}) {
      unwatch($fh);
      close $fh;
    }
    $command->{out} = {};
    $command->{gone} = 1;
    delete $commands{$id};
    return;
  }
  $command->{started} = 1;
  frame('S', $id, $command->{pid});
}

sub on_output {
  my ($command, $stream) = @_;
  finish_status($command);
  my $fh = $command->{out}{$stream} or return;
  my $read = sysread($fh, my $data, CHUNK);
  return if !defined $read && ($! == EAGAIN || $! == EINTR);
  if (!$read) {
    unwatch($fh);
    close $fh;
    delete $command->{out}{$stream};
    frame(lc $stream, $command->{id});
    forget_if_done($command);
    return;
  }
  frame($stream, $command->{id}, $data);
  $command->{sent}{$stream} += $read;
  if ($command->{sent}{$stream} >= WINDOW) {
    unwatch($fh);
    $command->{paused}{$stream} = 1;
  }
}

sub on_credit {
  my ($command, $stream, $bytes) = @_;
  $command->{sent}{$stream} -= $bytes;
  if ($command->{paused}{$stream} && $command->{sent}{$stream} < WINDOW && $command->{out}{$stream}) {
    delete $command->{paused}{$stream};
    watch($command->{out}{$stream}, \&on_output, $command, $stream);
  }
}

# Once the main process ended, its output ended and its group is gone, the command is forgotten.
sub forget_if_done {
  my ($command) = @_;
  delete $commands{$command->{id}} if $command->{exited} && $command->{gone} && !%{$command->{out}} && !@{$command->{queries}};
}

sub reap {
  while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
    my $status = $?;
    my $command = delete $children{$pid} or next;
    finish_status($command);
    next if $command->{failed};
    # What the main process wrote before it ended goes before its exit, as far as the window allows.
    for my $stream ('O', 'E') {
      for (1 .. 4) {
        last unless $command->{out}{$stream} && !$command->{paused}{$stream};
        on_output($command, $stream);
      }
    }
    my $signal = $status & 127;
    frame('X', $command->{id}, $signal ? 'signal SIG' . ($SIGNAL_NAME{$signal} || $signal) : 'code ' . ($status >> 8));
    $command->{exited} = 1;
    $command->{gone} = !group_alive($command->{pid});
    frame('G', $command->{id}, $command->{gone} ? 'gone' : 'alive');
    forget_if_done($command);
  }
}

# Answers the queries whose group is gone or whose wait is over; says when to look again.
sub answer_queries {
  my $now = time_ms();
  my $next;
  for my $command (values %commands) {
    next unless @{$command->{queries}};
    $command->{gone} ||= !group_alive($command->{pid});
    my @waiting;
    for my $deadline (@{$command->{queries}}) {
      if ($command->{gone} || $deadline <= $now) { frame('R', $command->{id}, $command->{gone} ? 'gone' : 'alive') }
      else { push @waiting, $deadline }
    }
    $command->{queries} = \@waiting;
    forget_if_done($command);
    $next = 50 if @waiting;
  }
  return $next;
}

sub time_ms { return POSIX::floor(1000 * Time::HiRes::time()) }

sub on_frame {
  my ($type, $id, $payload) = @_;
  if ($type eq 'C') {
    start_command($id, $payload);
    return;
  }
  if ($type eq 'F') {
    start_flush($id, $payload);
    return;
  }
  return if $type eq 'P';
  my $command = $commands{$id};
  if ($type eq 'K') {
    kill "-$payload", $command->{pid} if $command && !$command->{gone} && $payload =~ /^[A-Z0-9]+$/;
  } elsif ($type eq 'Q') {
    if ($command) { push @{$command->{queries}}, time_ms() + ($payload =~ /^\d+$/ ? $payload : 0) }
    else { frame('R', $id, 'gone') }
  } elsif ($type eq 'A' || $type eq 'B') {
    on_credit($command, $type eq 'A' ? 'O' : 'E', $payload) if $command && $payload =~ /^\d+$/;
  } else {
    warn "drover-agent: unknown frame type '$type'\n";
  }
}

sub on_stdin {
  my $read = sysread(STDIN, $inbox, CHUNK, length $inbox);
  return if !defined $read && ($! == EAGAIN || $! == EINTR);
  unless ($read) {
    $stopping = 1;
    return;
  }
  while (length($inbox) >= 9) {
    my ($type, $id, $length) = unpack('a1 N N', $inbox);
    if ($length > MAX_FRAME) {
      warn "drover-agent: a frame of $length bytes: the client does not speak this protocol\n";
      $stopping = 1;
      return;
    }
    last if length($inbox) < 9 + $length;
    my $payload = substr($inbox, 9, $length);
    substr($inbox, 0, 9 + $length, '');
    on_frame($type, $id, $payload);
  }
}

# The channel is gone: stop every group that may be left (signal, grace period, SIGKILL).
sub stop_everything {
  my @groups = map { $_->{pid} } grep { !$_->{gone} } values %commands;
  kill "-$KILL_SIGNAL", $_ for @groups;
  my $deadline = time_ms() + $KILL_GRACE_MS;
  while (1) {
    1 while waitpid(-1, POSIX::WNOHANG()) > 0;
    @groups = grep { group_alive($_) } @groups;
    last if !@groups || time_ms() >= $deadline;
    select(undef, undef, undef, 0.05);
  }
  kill '-KILL', $_ for @groups;
}

nonblocking(\*STDIN);
frame('H', 0, 'drover-agent 1');
while (!$stopping) {
  reap();
  my $wait = answer_queries();
  flush_outbox();
  last if $stopping;
  # SIGCHLD interrupts select(); the bound covers one that comes just before it.
  $wait = 200 if !defined $wait && %children;
  my @ready = $select->can_read(defined $wait ? $wait / 1000 : undef);
  for my $fh (@ready) {
    # A handle closed by an earlier handler in this round has no number any more.
    my $fd = fileno $fh;
    next unless defined $fd;
    if ($fd == 0) {
      on_stdin();
      next;
    }
    my $what = $reader{$fd} or next;
    my ($handler, @arguments) = @$what;
    $handler->(@arguments);
  }
}
stop_everything();
exit 0;
`;
