"""
Real p2pft processes for end-to-end tests, driven by Twisted's process
support: wait for output or exit with bounded deadlines, never sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
DEADLINE = 60.0


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("P2PFT_CODE", None)
    e.update(extra)
    return e


def p2pft_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "p2pft", *args]


def twistd_argv(*args: str) -> list[str]:
    return [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", *args]


class Proc(ProcessProtocol):
    """Collects output; lets tests wait for a regex on stdout/stderr or exit."""

    def __init__(self, name: str):
        self.name = name
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: int | None = None
        self._waiters: list[tuple[str, re.Pattern, defer.Deferred]] = []

    # -- waiting

    def wait_for(self, pattern: str, stream: str = "any", timeout: float = DEADLINE) -> defer.Deferred:
        """Fire with the match object once C{pattern} appears."""
        d = defer.Deferred()
        self._waiters.append((stream, re.compile(pattern), d))
        self._check()
        return _deadline(d, timeout, f"{self.name}: {pattern!r} not seen", self)

    def wait_until(self, check, what: str, timeout: float = DEADLINE) -> defer.Deferred:
        """Fire with C{check(self)} once it is true, checked on each output."""
        d = defer.Deferred()
        self._waiters.append((check, None, d))
        self._check()
        return _deadline(d, timeout, f"{self.name}: {what} not seen", self)

    def wait_exit(self, timeout: float = DEADLINE) -> defer.Deferred:
        d = defer.Deferred()
        self.ended.addBoth(lambda code: (d.callback(code) if not d.called else None, code)[1])
        return _deadline(d, timeout, f"{self.name}: did not exit", self)

    def events(self) -> list[dict]:
        complete = self.out.decode(errors="replace").split("\n")[:-1]  # not a line still arriving
        return [json.loads(line) for line in complete if line.startswith("{")]

    def progress(self) -> int:
        """Bytes done in the last JSON progress event."""
        done = [e["bytes"] for e in self.events() if e["event"] == "progress"]
        return done[-1] if done else 0

    def text(self) -> str:
        return f"--- {self.name} exit={self.exit_code}\nstdout:\n{self.out.decode(errors='replace')}\nstderr:\n{self.err.decode(errors='replace')}"

    def _check(self) -> None:
        streams = {"out": self.out, "err": self.err, "any": self.out + b"\n" + self.err}
        for item in list(self._waiters):
            stream, pattern, d = item
            if pattern is None:
                m, what = stream(self), "the awaited condition"
            else:
                m, what = pattern.search(streams[stream].decode(errors="replace")), repr(pattern.pattern)
            if m:
                self._waiters.remove(item)
                d.callback(m)
            elif self.exit_code is not None:
                self._waiters.remove(item)
                d.errback(AssertionError(f"{self.name} exited ({self.exit_code}) before {what}\n{self.text()}"))

    # -- ProcessProtocol

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason) -> None:
        self.exit_code = reason.value.exitCode if reason.value.exitCode is not None else -(reason.value.signal or 0)
        self._check()
        self.ended.callback(self.exit_code)

    # -- control

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.exit_code is None:
            try:
                self.transport.signalProcess({signal.SIGKILL: "KILL", signal.SIGTERM: "TERM", signal.SIGINT: "INT"}[sig])
            except Exception:
                pass

    def write(self, data: bytes) -> None:
        self.transport.write(data)


def _deadline(d: defer.Deferred, seconds: float, what: str, proc: Proc) -> defer.Deferred:
    def timed_out(f):
        f.trap(defer.CancelledError)
        raise AssertionError(f"{what} within {seconds} s\n{proc.text()}")

    return d.addTimeout(seconds, reactor).addErrback(timed_out)


def spawn(testcase, name: str, argv: list[str], cwd: str | None = None, childFDs=None, **envs) -> Proc:
    """Start a process; it is killed and reaped when the test ends."""
    proc = Proc(name)
    reactor.spawnProcess(proc, argv[0], argv, env=env(**envs), path=cwd, childFDs=childFDs)

    async def reap():
        proc.kill()
        if proc.exit_code is None:
            await proc.ended

    testcase.addCleanup(lambda: defer.ensureDeferred(reap()))
    return proc


class Workspace:
    """A test's folders: C{src} to send from, C{out} to receive into."""

    def __init__(self, testcase):
        self.root = os.path.abspath(testcase.mktemp())
        self.src = os.path.join(self.root, "src")
        self.out = os.path.join(self.root, "out")
        os.makedirs(self.src)
        os.makedirs(self.out)


def older_checkout(testcase, commit: str, what: str, check: tuple[str, str]) -> str:
    """The p2pft package of C{commit} (C{what}: its name in skip reasons),
    in a temporary folder removed after the test: the folder, to run
    C{python -m p2pft} from.  Skips the test if git is missing, the commit
    cannot be had, or the file C{check[0]} (relative to the package) does
    not contain C{check[1]}."""
    git = shutil.which("git")
    if git is None:
        raise SkipTest(f"git is not available to get {what}")
    folder = tempfile.mkdtemp(prefix="p2pft-older-")
    testcase.addCleanup(shutil.rmtree, folder, True)
    archive = subprocess.run([git, "-C", ROOT, "archive", commit, "p2pft"], capture_output=True)
    if archive.returncode != 0:
        raise SkipTest(f"cannot get {what} ({commit}): {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    with open(os.path.join(folder, "p2pft", check[0])) as f:
        if check[1] not in f.read():
            raise SkipTest(f"{commit} is not {what}")
    return folder


async def start_server(testcase, name="server", argv=None):
    """A real rendezvous server on loopback: (its process, its HOST:PORT)."""
    server = spawn(testcase, name, argv or p2pft_argv("server", "--port", "tcp:0:interface=127.0.0.1"))
    m = await server.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
    return server, f"127.0.0.1:{m.group(1)}"


#: The port a standalone relay listens on in the lab (p2pft's default).
RELAY_PORT = 9001


class LabRelay:
    """A standalone C{p2pft relay} in a NAT lab's server namespace, on
    C{tcp:PORT:interface=SERVER_IP}, that a test can kill and start again on
    the same port (Twisted listening ports set SO_REUSEADDR, so connections
    of the killed one lingering in TIME_WAIT do not stop the new bind).

        relay = await start_relay(self, lab)
        ... peers use relay.address ...
        await relay.stop()            # SIGKILL, as a crash; waits for the exit
        await relay.start()           # same port again

    Each start() spawns a new process (C{relay.proc}, a L{Proc}; earlier
    ones stay in C{relay.history}); every one is killed and reaped when the
    test ends.
    """

    def __init__(self, testcase, lab, port: int = RELAY_PORT, args=(), name: str = "relay", **envs):
        self.testcase = testcase
        self.lab = lab
        self.port = port
        self.args = list(args)
        self.name = name
        self.envs = envs
        self.proc: Proc | None = None
        self.history: list[Proc] = []

    @property
    def address(self) -> str:
        return f"{self.lab.server_ip}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.exit_code is None

    async def start(self, timeout: float = DEADLINE) -> "LabRelay":
        """Spawn the relay and wait for its C{listening on IP:PORT} line."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        n = len(self.history)
        proc = spawn(self.testcase, self.name if n == 0 else f"{self.name}#{n + 1}",
                     self.lab.exec_argv("server", p2pft_argv(
                         "relay", "--port", f"tcp:{self.port}:interface={self.lab.server_ip}",
                         *self.args)), **self.envs)
        self.proc = proc
        self.history.append(proc)
        await proc.wait_for(r"listening on " + re.escape(self.address), timeout=timeout)
        return self

    async def stop(self, sig=signal.SIGKILL, timeout: float = DEADLINE) -> int:
        """Send C{sig} (default SIGKILL) and wait for the exit; its code."""
        proc = self.proc
        if proc is None:
            raise RuntimeError(f"{self.name} was never started")
        proc.kill(sig)
        return await proc.wait_exit(timeout)

    async def restart(self, sig=signal.SIGKILL, timeout: float = DEADLINE) -> "LabRelay":
        if self.running:
            await self.stop(sig, timeout)
        return await self.start(timeout)


async def start_relay(testcase, lab, port: int = RELAY_PORT, *args: str, name: str = "relay",
                      **envs) -> LabRelay:
    """A running L{LabRelay} (extra C{args} go to C{p2pft relay}, e.g.
    C{"--relay-idle-timeout", "5"})."""
    return await LabRelay(testcase, lab, port, args, name, **envs).start()
