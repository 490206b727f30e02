"""PROTOTYPE of a persistent exec channel (docs/persistent-exec-design.md). Not product code.

One long-lived `podman exec -i CTR perl -e AGENT` per sandbox. The agent forks
`/bin/sh -lc COMMAND` itself (its own session and process group, stdout and stderr on one
pipe, stdin /dev/null, the exec id in the environment), and speaks a tiny framed protocol
over its stdin/stdout, so a command costs a fork+exec inside the container instead of a
podman CLI + conmon + runc round.

Frames (one ASCII header line, then an optional payload of exactly LEN bytes):
    host -> agent   R ID LEN EXECID\\n<command>     run a command
                    K ID SIG EXECID\\n              signal its process group and every
                                                  process carrying its exec id (KILL repeats)
    agent -> host   P ID PID\\n                     the shell started (leads its own group)
                    O ID LEN\\n<bytes>              merged output, in order
                    X ID STATUS\\n                  the shell exited (128+N if killed by N)

The agent is Perl only because Debian's perl-base is Essential (present in every Debian
image, this one included); a product version would inject a small static binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pod_exec_mcp.output import BoundedOutput

AGENT = r"""
use strict; use warnings;
use POSIX qw(WNOHANG setsid _exit dup2);
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
sub nonblock { my $f = fcntl($_[0], F_GETFL, 0); fcntl($_[0], F_SETFL, $f | O_NONBLOCK) }
$SIG{PIPE} = 'IGNORE';
pipe(my $sigr, my $sigw) or die "pipe: $!";
nonblock($sigr); nonblock($sigw);
$SIG{CHLD} = sub { syswrite($sigw, "c") };
binmode STDIN; binmode STDOUT;
my (%by_id, %by_pid);
my $in = ''; my $stdin_eof = 0;

sub out {
    my $data = shift;
    while (length $data) {
        my $n = syswrite(STDOUT, $data);
        if (!defined $n) { next if $!{EINTR} || $!{EAGAIN}; exit 0 }
        substr($data, 0, $n, '');
    }
}

sub start_job {
    my ($id, $execid, $cmd) = @_;
    my ($r, $w);
    if (!pipe($r, $w)) { out("X $id 255\n"); return }
    my $pid = fork();
    if (!defined $pid) { close $r; close $w; out("X $id 255\n"); return }
    if ($pid == 0) {
        setsid();
        $SIG{PIPE} = 'DEFAULT'; $SIG{CHLD} = 'DEFAULT';
        open(STDIN, '<', '/dev/null');
        dup2(fileno($w), 1); dup2(fileno($w), 2);
        $ENV{POD_EXEC_MCP_EXEC_ID} = $execid;
        exec('/bin/sh', '-lc', $cmd);
        _exit(127);
    }
    close $w;
    nonblock($r);
    my $job = { id => $id, pid => $pid, fh => $r, eof => 0, status => undef, execid => $execid };
    $by_id{$id} = $job; $by_pid{$pid} = $job;
    out("P $id $pid\n");
}

sub kill_tree {
    my ($sig, $pgid, $execid) = @_;
    for my $round (1 .. 10) {
        my $found = 0;
        $found = 1 if $pgid && kill($sig, -$pgid);
        if (opendir(my $d, '/proc')) {
            for my $p (grep { /^\d+$/ } readdir $d) {
                next if $p == $$;
                open(my $e, '<', "/proc/$p/environ") or next;
                my $env = do { local $/; <$e> }; close $e;
                next unless defined $env;
                $found = 1 if index("\0$env", "\0POD_EXEC_MCP_EXEC_ID=$execid\0") >= 0
                    && kill($sig, $p);
            }
            closedir $d;
        }
        last if !$found || $sig ne 'KILL';
        select(undef, undef, undef, 0.1);
    }
}

sub parse {
    while ((my $nl = index($in, "\n")) >= 0) {
        my ($op, $id, $arg, $execid) = split / /, substr($in, 0, $nl);
        if ($op eq 'R') {
            last if length($in) < $nl + 1 + $arg;
            my $cmd = substr($in, $nl + 1, $arg);
            substr($in, 0, $nl + 1 + $arg, '');
            start_job($id, $execid, $cmd);
        } else {
            substr($in, 0, $nl + 1, '');
            if ($op eq 'K') {
                my $job = $by_id{$id};
                kill_tree($arg, $job ? $job->{pid} : 0, $execid);
            }
        }
    }
}

sub drain {
    my $job = shift;
    while (1) {
        my $got = sysread($job->{fh}, my $buf, 65536);
        if ($got) { out("O $job->{id} " . length($buf) . "\n" . $buf); next }
        $job->{eof} = 1 if defined $got;
        last;
    }
}

while (1) {
    my $rin = '';
    vec($rin, fileno(STDIN), 1) = 1 unless $stdin_eof;
    vec($rin, fileno($sigr), 1) = 1;
    for my $job (values %by_id) { vec($rin, fileno($job->{fh}), 1) = 1 unless $job->{eof} }
    my $n = select(my $rout = $rin, undef, undef, 1.0);
    if ($n && $n > 0) {
        sysread($sigr, my $x, 512) if vec($rout, fileno($sigr), 1);
        if (!$stdin_eof && vec($rout, fileno(STDIN), 1)) {
            my $got = sysread(STDIN, $in, 65536, length $in);
            if (defined $got && $got == 0) {
                $stdin_eof = 1;
                kill_tree('KILL', $_->{pid}, $_->{execid}) for values %by_id;
                exit 0;
            }
            parse();
        }
        for my $job (values %by_id) {
            drain($job) if !$job->{eof} && vec($rout, fileno($job->{fh}), 1);
        }
    }
    while ((my $pid = waitpid(-1, WNOHANG)) > 0) {
        my $st = $?;
        my $job = delete $by_pid{$pid} or next;
        $job->{status} = ($st & 127) ? 128 + ($st & 127) : ($st >> 8);
    }
    for my $job (values %by_id) {
        next unless defined $job->{status};
        drain($job);
        close $job->{fh};
        delete $by_id{$job->{id}};
        out("X $job->{id} $job->{status}\n");
    }
}
"""


@dataclass
class _Job:
    output: BoundedOutput
    exec_id: str
    pid: int | None = None
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(frozen=True)
class ProtoResult:
    output: str
    retval: int
    truncated: bool
    timed_out: bool


class Channel:
    """The host side: one agent process, many concurrent commands multiplexed over it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.jobs: dict[int, _Job] = {}
        self.next_id = 0
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, podman: str, container: str) -> Channel:
        proc = await asyncio.create_subprocess_exec(
            podman, "exec", "-i", container, "perl", "-e", AGENT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,
        )  # fmt: skip
        channel = cls(proc)
        await channel.run("true")
        return channel

    async def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        try:
            while line := await stream.readline():
                op, ident, arg = line.split()
                job = self.jobs.get(int(ident))
                if op == b"O":
                    data = await stream.readexactly(int(arg))
                    if job is not None:
                        job.output.feed(data)
                elif job is None:
                    continue
                elif op == b"P":
                    job.pid = int(arg)
                elif op == b"X":
                    self.jobs.pop(int(ident), None)
                    job.done.set_result(int(arg))
        finally:
            for job in self.jobs.values():
                if not job.done.done():
                    job.done.set_exception(ConnectionError("the exec agent went away"))

    def _send(self, header: str, payload: bytes = b"") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(header.encode() + b"\n" + payload)

    async def run(
        self, command: str, timeout: float = 30.0, limit: int = 65536, grace: float = 3.0
    ) -> ProtoResult:
        self.next_id += 1
        ident = self.next_id
        job = _Job(BoundedOutput(limit), secrets.token_hex(12))
        self.jobs[ident] = job
        data = command.encode()
        self._send(f"R {ident} {len(data)} {job.exec_id}", data)
        timed_out = False
        try:
            status = await asyncio.wait_for(asyncio.shield(job.done), timeout)
        except TimeoutError:
            timed_out = True
            # The agent does the kill itself: no second podman exec, no kill script.
            self._send(f"K {ident} TERM {job.exec_id}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.done), grace)
            if not job.done.done():
                self._send(f"K {ident} KILL {job.exec_id}")
            status = await job.done
        return ProtoResult(
            output=job.output.text(),
            retval=124 if timed_out else status,
            truncated=job.output.truncated,
            timed_out=timed_out,
        )

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


async def _checks(channel: Channel, podman: str, container: str) -> dict[str, Any]:
    """Semantics the channel must keep; each returns what it observed."""
    checks: dict[str, Any] = {}
    r = await channel.run("echo out; echo err >&2; echo out2; exit 3")
    checks["merged_ordered_output"] = r.output == "out\nerr\nout2\n" and r.retval == 3
    # A login shell reads ~/.profile (this is the bench's own throwaway container).
    await channel.run("echo 'PROTO_LOGIN=yes' > \"$HOME/.profile\"")
    r = await channel.run("echo $0 $PROTO_LOGIN; pwd; cat")  # stdin is /dev/null: no output
    checks["login_shell_cwd_stdin_empty"] = r.output == "/bin/sh yes\n/workspace\n"
    started = time.perf_counter()
    r = await channel.run(
        "sleep 100 & setsid sleep 101 & echo started; sleep 102", timeout=1.0, grace=0.5
    )
    elapsed = time.perf_counter() - started
    proc = await asyncio.create_subprocess_exec(
        podman, "exec", container, "/bin/sh", "-c", "ps -eo args | grep -c '^sleep 10[012]'",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    left = (await proc.communicate())[0].decode().strip()
    checks["timeout_kills_tree"] = r.timed_out and r.retval == 124 and left == "0"
    checks["timeout_total_s"] = round(elapsed, 3)
    return checks


def _summary(values: list[float]) -> dict[str, float]:
    data = sorted(values)
    pos = (len(data) - 1) * 0.9
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return {
        "n": len(data),
        "median": statistics.median(data),
        "p90": data[lo] + (data[hi] - data[lo]) * (pos - lo),
        "min": data[0],
        "max": data[-1],
        "mean": statistics.fmean(data),
    }


async def measure_into(bench: Any, channel: Channel, container: str, reps: int) -> None:
    """The prototype's figures, interleaved with raw podman exec into the same container."""
    large_command, large_bytes = bench.large_command, bench.large_bytes

    async def proto_true() -> None:
        r = await channel.run("true")
        assert r.retval == 0, r

    async def raw_true() -> None:
        await bench.exec_raw(container)

    async def proto_large() -> None:
        r = await channel.run(large_command)
        assert r.retval == 0 and r.truncated, r

    async def raw_large() -> None:
        assert await bench.exec_raw(container, large_command) == large_bytes

    async def proto_16() -> None:
        results = await asyncio.gather(*(channel.run("true") for _ in range(16)))
        assert all(r.retval == 0 for r in results)

    async def raw_16() -> None:
        await asyncio.gather(*(bench.exec_raw(container) for _ in range(16)))

    groups = {
        "true": {"proto": proto_true, "raw": raw_true, "host": bench.host_sh},
        "large": {"proto": proto_large, "raw": raw_large},
        "burst16": {"proto": proto_16, "raw": raw_16},
    }
    counts = {"true": reps, "large": max(3, reps // 8), "burst16": max(2, reps // 10)}
    samples: dict[str, dict[str, list[float]]] = {g: {k: [] for k in v} for g, v in groups.items()}
    for group, variants in groups.items():
        for make in variants.values():
            await make()
        for _ in range(counts[group]):
            order = list(variants)
            random.shuffle(order)
            for name in order:
                started = time.perf_counter()
                await variants[name]()
                samples[group][name].append(time.perf_counter() - started)
    checks = await _checks(channel, bench.podman.path, container)
    bench.samples["proto"] = samples
    for group in groups:
        ours, raw = samples[group]["proto"], samples[group]["raw"]
        bench.results[f"proto.{group}"] = {
            "what": f"PROTOTYPE persistent channel: {group}",
            "ours": _summary(ours),
            "raw": _summary(raw),
            "raw_what": "podman exec into the same container",
            "ratio": statistics.median(ours) / statistics.median(raw),
        }
    bench.results["proto.true"]["host"] = _summary(samples["true"]["host"])
    bench.results["proto.checks"] = checks
