"""
Child processes for the benchmark suite, and the clocks that time them.

A L{Proc} is started with its output going to a log file, except for one
stream the harness reads: lines (timestamped as they arrive, so the suite
can wait for a JSON event or a "listening" line) or raw data (L{DataSink}:
discarded, timing its first byte).  A thread per process reads that stream
and then reaps the process with C{os.wait4}, which gives its CPU seconds
and peak RSS.  Signals go through a pidfd, so they can only ever reach the
process we started.  Nothing here sleeps: every wait is on a real event
with a deadline.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
MiB = 1 << 20
#: Read size of the harness's own pipe readers (bytes).
CHUNK = MiB


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


def p2pft_argv(*args: str, relay_only: bool = False) -> list[str]:
    """The p2pft CLI from this checkout (or the relay-only benchmark wrapper)."""
    entry = [os.path.join(ROOT, "bench", "relayonly_p2pft.py")] if relay_only else ["-m", "p2pft"]
    return [PYTHON, *entry, *args]


def p2pft_env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("P2PFT_CODE", None)
    # Run from compiled bytecode, as an installed p2pft does (the suite
    # compiles the checkout first): else every process compiles its
    # sources again, 0.2 CPU-s each.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now (in our own network
    namespace nobody else takes it before the tool does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_pipe() -> tuple[int, int]:
    """A pipe (read fd, write fd) holding 1 MiB rather than 64 KiB, so that
    neither end wakes up for every 64 KiB."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: keep the default
    return r, w


def left(deadline: float) -> float:
    """Seconds until a C{time.monotonic()} deadline, never negative."""
    return max(0.0, deadline - time.monotonic())


@dataclass
class Usage:
    """What one process cost: user + system CPU seconds, peak RSS in MiB."""

    cpu: float
    rss: float


@dataclass
class Exit:
    """How a process ended."""

    code: int
    usage: Usage
    #: C{time.monotonic()} when it was reaped.
    time: float


class Lines:
    """Timestamped lines of a child's stream; wait for one that matches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[tuple[float, str]] = []
        self._closed = False

    def consume(self, stream) -> None:
        for raw in io.BufferedReader(stream):
            now = time.monotonic()
            with self._cond:
                self.items.append((now, raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, pattern: str, deadline: float) -> tuple[float, re.Match]:
        """(arrival time, match) of the first line matching C{pattern}."""
        regex = re.compile(pattern)
        seen = 0
        with self._cond:
            while True:
                for t, line in self.items[seen:]:
                    m = regex.search(line)
                    if m:
                        return t, m
                seen = len(self.items)
                if self._closed:
                    raise BenchError(f"ended before {pattern!r}")
                if not self._cond.wait(left(deadline)) and time.monotonic() >= deadline:
                    raise BenchError(f"no {pattern!r} in time")

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.items)


class DataSink:
    """
    Reads a child's stdout in 1 MiB chunks and throws the bytes away,
    counting them and noting when the first one arrived.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.first: float | None = None

    def consume(self, stream) -> None:
        buf = bytearray(CHUNK)
        while n := stream.readinto(buf):
            if self.first is None:
                self.first = time.monotonic()
            self.bytes += n


class FirstWrite:
    """
    When data is first written to any file in a directory: an inotify
    IN_MODIFY watch on the directory (it reports writes to the files in it),
    woken by the kernel on the write itself rather than by polling.
    """

    IN_MODIFY = 0x2

    def __init__(self, directory: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.time: float | None = None
        self._fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, os.fsencode(directory), self.IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):  # ms; only bounds how late close() is noticed
                self.time = time.monotonic()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


class Proc:
    """
    One child process.  C{lines} ("stdout" or "stderr") makes that stream
    readable as timestamped L{Lines}; C{sink} consumes stdout instead (a
    L{DataSink}); C{stdout} sends it elsewhere (a pipe's fd).  Everything
    else goes to C{log}.
    """

    def __init__(self, name: str, argv: list[str], log: str, *, lines: str | None = None,
                 sink: DataSink | None = None, stdin=subprocess.DEVNULL, stdout=None,
                 env: dict | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.log = log
        self.lines = Lines() if lines else None
        self.exit: Exit | None = None
        data = big_pipe() if sink else None
        with open(log, "wb") as logfile:
            out = data[1] if data else subprocess.PIPE if lines == "stdout" else stdout or logfile
            err = subprocess.PIPE if lines == "stderr" else logfile
            self.started = time.monotonic()
            try:
                self._popen = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err, env=env,
                                               cwd=cwd, bufsize=0)
            except OSError as e:
                if data:
                    os.close(data[0])
                raise BenchError(f"{name}: cannot run {argv[0]}: {e.strerror}") from None
            finally:
                if data:
                    os.close(data[1])
        self.pid = self._popen.pid
        self._pidfd = os.pidfd_open(self.pid)
        self._reaped = threading.Event()
        if data:
            stream = os.fdopen(data[0], "rb", buffering=0)
        else:
            stream = self._popen.stdout if lines == "stdout" else self._popen.stderr
        threading.Thread(target=self._run, args=(sink or self.lines, stream), daemon=True).start()

    def _run(self, consumer, stream) -> None:
        if consumer is not None:
            consumer.consume(stream)
            stream.close()
        _, status, usage = os.wait4(self.pid, 0)
        now = time.monotonic()
        # Popen must not wait for this pid again (it may be reused by then).
        self._popen.returncode = code = os.waitstatus_to_exitcode(status)
        self.exit = Exit(code, Usage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024), now)
        self._reaped.set()

    def send(self, text: str) -> None:
        """Write a line to the child's stdin (started with C{stdin=subprocess.PIPE})."""
        self._popen.stdin.write(text.encode() + b"\n")

    def wait_line(self, pattern: str, deadline: float) -> tuple[float, re.Match]:
        try:
            return self.lines.wait(pattern, deadline)
        except BenchError as e:
            raise self.failed(str(e)) from None

    def wait(self, deadline: float) -> Exit:
        if not self._reaped.wait(left(deadline)):
            raise self.failed("did not exit in time")
        return self.exit

    def wait_ok(self, deadline: float) -> Exit:
        """Wait for an exit with status 0."""
        if self.wait(deadline).code != 0:
            raise self.failed(f"exit status {self.exit.code}")
        return self.exit

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if not self._reaped.is_set():
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass  # exited, not reaped yet

    def stop(self, grace: float = 10.0) -> Exit:
        """SIGTERM (SIGKILL after C{grace} seconds), then reap."""
        self.signal(signal.SIGTERM)
        if not self._reaped.wait(grace):
            self.signal(signal.SIGKILL)
            self._reaped.wait()
        return self.exit

    def close(self) -> None:
        """Stop it if it still runs; release the pidfd."""
        if self.exit is None:
            self.stop()
        os.close(self._pidfd)

    def failed(self, what: str) -> BenchError:
        """An error naming this process, with the end of its output."""
        tail = self.lines.text()[-1500:] if self.lines else ""
        try:
            with open(self.log, errors="replace") as f:
                tail += "\n" + f.read()[-1500:]
        except OSError:
            pass
        tail = "\n    ".join(line for line in tail.splitlines() if line.strip())
        return BenchError(f"{self.name}: {what}" + (f"\n    {tail}" if tail else ""))


class Procs:
    """Starts processes and, on leaving the C{with} block, stops any still running."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []
        os.makedirs(log_dir, exist_ok=True)

    def start(self, name: str, argv: list[str], **kw) -> Proc:
        proc = Proc(name, argv, os.path.join(self.log_dir, f"{name}.log"), **kw)
        self._procs.append(proc)
        return proc

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            proc.close()


def rss_kib(pid: int) -> int:
    """A running process's resident set (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
