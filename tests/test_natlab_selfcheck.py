"""
Self-check of tests/natlab.py: the NAT laboratory really behaves like
the NATs the hole-punching tests rely on.

All traffic stays inside the lab's own network namespaces.  Needs root;
skipped otherwise (a failure instead when P2PFT_NATLAB_REQUIRED=1).
"""

import os
import secrets
import selectors
import subprocess
import sys
import time
import unittest as pyunit

from twisted.trial import unittest

from tests import natlab
from tests.natlab import Nat, NatLab

PY = sys.executable

# listen on host:port, print READY, accept one connection, echo
# "pong:<data>" and report the peer address the kernel saw.
LISTEN = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(5)
s.settimeout(timeout)
print("READY", flush=True)
c, addr = s.accept()
c.settimeout(5)
data = c.recv(100)
c.sendall(b"pong:" + data)
print("PEER", addr[0], addr[1], data.decode(), flush=True)
c.close()
"""

# one connect attempt to host:port (optionally from a fixed local port)
# with a connect timeout; report TIMEOUT / REFUSED / CONNECTED + reply.
CONNECT = r"""
import socket, sys, time
host, port, lport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
if lport:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", lport))
s.settimeout(timeout)
t0 = time.monotonic()
try:
    s.connect((host, port))
except socket.timeout:
    print("TIMEOUT %.2f" % (time.monotonic() - t0), flush=True)
    sys.exit(0)
except ConnectionRefusedError:
    print("REFUSED %.2f" % (time.monotonic() - t0), flush=True)
    sys.exit(0)
except OSError as e:
    print("ERROR", e.errno, e, flush=True)
    sys.exit(0)
me = s.getsockname()
s.settimeout(5)
s.sendall(b"ping")
print("CONNECTED", me[0], me[1], s.recv(100).decode(), flush=True)
"""

# TCP simultaneous open: bind lport, connect to peer repeatedly until
# deadline; once connected send "hello-from-<tag>" and read the peer's.
SIMOPEN = r"""
import socket, sys, time
lport, host, port, budget, tag, other = (
    int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
    sys.argv[5], sys.argv[6])
deadline = time.monotonic() + budget
attempts, last = 0, None
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        print("FAIL", attempts, last, flush=True)
        sys.exit(1)
    attempts += 1
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", lport))
    s.settimeout(min(2.0, left))
    t0 = time.monotonic()
    try:
        s.connect((host, port))
        break
    except OSError as e:
        last = repr(e)
        s.close()
        if time.monotonic() - t0 < 0.05:
            time.sleep(0.05)  # back off after an instant RST, don't spin
msg = ("hello-from-" + tag).encode()
want = len("hello-from-" + other)
s.settimeout(5)
s.sendall(msg)
data = b""
while len(data) < want:
    chunk = s.recv(want - len(data))
    if not chunk:
        break
    data += chunk
me, peer = s.getsockname(), s.getpeername()
print("OK", attempts, me[0], me[1], peer[0], peer[1], data.decode(), flush=True)
s.close()
"""


class _Proc:
    """A lab process whose merged stdout/stderr we read with deadlines."""

    def __init__(self, lab, name, script, *args):
        self.name = name
        self.proc = lab.popen(
            name, [PY, "-u", "-c", script] + [str(a) for a in args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.buf = b""
        self.eof = False

    def _fill(self, deadline):
        if self.eof:
            return False
        left = max(0.0, deadline - time.monotonic())
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(left):
                return False
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError(
                    f"{self.name}: no complete line within {timeout}s; output so far "
                    f"{self.buf!r}")
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def finish(self, timeout):
        """Wait for exit; return (returncode, all remaining output)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline) and not self.eof:
                self.proc.kill()
                raise AssertionError(
                    f"{self.name}: did not finish within {timeout}s; output {self.buf!r}")
        rc = self.proc.wait(max(0.1, deadline - time.monotonic()))
        return rc, self.buf.decode()


class NatLabSelfCheck(unittest.TestCase):

    def setUp(self):
        natlab.require_lab(self)
        natlab.cleanup_stale()

    def _lab(self, **kwargs):
        lab = NatLab(**kwargs)
        self.addCleanup(lab.down)
        lab.up()
        return lab

    def _listen(self, lab, name, port, host="0.0.0.0", timeout=10):
        p = _Proc(lab, name, LISTEN, host, port, timeout)
        self.assertEqual(p.readline(10), "READY")
        return p

    def _connect_via(self, lab, name, host, port, lport=0, timeout=5.0):
        return _Proc(lab, name, CONNECT, host, port, lport, timeout)

    def _connect(self, lab, name, host, port, lport=0, timeout=5.0):
        rc, out = self._connect_via(lab, name, host, port, lport, timeout).finish(timeout + 5)
        self.assertEqual(rc, 0, out)
        return out.strip()

    def _outbound_seen_as(self, lab, name, lport, port):
        """Connect name -> server:port from lport; return (ip, port) the
        server saw."""
        listener = self._listen(lab, "server", port)
        out = self._connect(lab, name, lab.server_ip, port, lport)
        self.assertTrue(out.startswith("CONNECTED"), out + "\n" + lab.dump())
        self.assertTrue(out.endswith("pong:ping"), out)
        rc, seen = listener.finish(10)
        self.assertEqual(rc, 0, seen)
        words = seen.split()
        self.assertEqual(words[0], "PEER", seen)
        return words[1], int(words[2])

    # (1) -------------------------------------------------------------------
    def test_masquerade_outbound(self):
        lab = self._lab()
        for name in ("a", "b"):
            ip, port = self._outbound_seen_as(lab, name, 40100, 7000)
            self.assertEqual(ip, lab.public_ip(name))
            self.assertNotEqual(ip, lab.private_ip(name))
            # MASQUERADE keeps a free source port - hole punching relies on it
            self.assertEqual(port, 40100)
        self.assertEqual(lab.public_ip("a"), "203.0.113.21")
        self.assertEqual(lab.private_ip("a"), "10.201.1.10")

    # (2) -------------------------------------------------------------------
    def test_unsolicited_inbound_silently_dropped(self):
        lab = self._lab()
        # something listens on a, so any answer would be visible
        listener = _Proc(lab, "a", LISTEN, "0.0.0.0", 7100, 10)
        self.assertEqual(listener.readline(10), "READY")
        # to the router's public address (router INPUT chain) ...
        to_router = self._connect_via(lab, "server", lab.public_ip("a"), 7100, 0, 1.5)
        # ... and, with a route an on-link attacker could add, straight to
        # the private address (router FORWARD chain)
        lab.run("server", ["ip", "route", "add", "10.201.1.0/24",
                           "via", lab.public_ip("a")], check=True)
        forwarded = self._connect_via(lab, "server", lab.private_ip("a"), 7100, 0, 1.5)
        for p in (to_router, forwarded):
            rc, out = p.finish(10)
            self.assertEqual(rc, 0, out)
            self.assertTrue(out.startswith("TIMEOUT"), out + "\n" + lab.dump(["natA"]))
        # nothing reached the listener (poll its output without waiting)
        listener._fill(time.monotonic())
        self.assertEqual(listener.buf, b"")
        self.assertIsNone(listener.proc.poll())

    # (3) -------------------------------------------------------------------
    def test_simultaneous_open_through_two_nats(self):
        lab = self._lab()
        pa, pb = 40001, 40002
        a = _Proc(lab, "a", SIMOPEN, pa, lab.public_ip("b"), pb, 10, "a", "b")
        b = _Proc(lab, "b", SIMOPEN, pb, lab.public_ip("a"), pa, 10, "b", "a")
        ra, oa = a.finish(15)
        rb, ob = b.finish(15)
        results = {}
        for tag, rc, out in (("a", ra, oa), ("b", rb, ob)):
            if rc == 0 and out.startswith("OK"):
                results[tag] = out.split()
        self.assertTrue(results, f"no side connected:\na: {oa}\nb: {ob}\n{lab.dump()}")
        for tag, words in results.items():
            other = "b" if tag == "a" else "a"
            _, _, my_ip, my_port, peer_ip, peer_port, data = words
            self.assertEqual(data, "hello-from-" + other)
            self.assertEqual((my_ip, int(my_port)),
                             (lab.private_ip(tag), pa if tag == "a" else pb))
            self.assertEqual((peer_ip, int(peer_port)),
                             (lab.public_ip(other), pa if other == "a" else pb))

    # (4) -------------------------------------------------------------------
    def test_down_removes_everything(self):
        lab = NatLab()
        self.addCleanup(lab.down)
        lab.down()  # before up(): harmless
        lab.up()
        existing = set(natlab._list_netns())
        self.assertTrue(set(lab.namespaces) <= existing, (lab.namespaces, existing))
        self.assertEqual(len(lab.namespaces), 6)
        self.assertTrue(os.path.exists(natlab._pidfile(lab.prefix)))
        sleeper = lab.popen("a", [PY, "-c", "import time; time.sleep(60)"])
        lab.down()
        self.assertIsNotNone(sleeper.poll())
        left = set(natlab._list_netns())
        self.assertFalse(set(lab.namespaces) & left, left)
        self.assertFalse([n for n in left if n.startswith(lab.prefix)], left)
        self.assertFalse(os.path.exists(natlab._pidfile(lab.prefix)))
        lab.down()  # idempotent

    def test_failed_up_tears_down(self):
        lab = NatLab()
        self.addCleanup(lab.down)
        # sabotage the router configuration: up() fails after it has
        # already created all namespaces and bridges

        def broken(kind, **kw):
            raise natlab.NatLabError("sabotaged")
        self.patch(natlab, "_router_rules", broken)
        self.assertRaises(natlab.NatLabError, lab.up)
        left = natlab._list_netns()
        self.assertFalse([n for n in left if n.startswith(lab.prefix)], left)
        self.assertFalse(os.path.exists(natlab._pidfile(lab.prefix)))

    def test_cleanup_stale(self):
        live = self._lab()
        tag = secrets.token_hex(3)
        stale = f"p2l{tag}-a"        # our pattern, no live owner
        foreign = f"p2lx{tag}-other"  # not our pattern: must survive
        for ns in (stale, foreign):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", foreign])
        self.addCleanup(subprocess.run, ["ip", "netns", "del", stale],
                        stderr=subprocess.DEVNULL)
        removed = natlab.cleanup_stale()
        left = set(natlab._list_netns())
        # (a concurrent trial -j worker may have beaten us to it)
        self.assertTrue(stale in removed or stale not in left, removed)
        self.assertNotIn(stale, left)
        for ns in removed:
            self.assertRegex(ns, natlab._OUR_NS_RE)
        self.assertIn(foreign, left)
        self.assertTrue(set(live.namespaces) <= left)

    # other NAT kinds ---------------------------------------------------------
    def test_reject_answers_with_rst(self):
        lab = self._lab(a=Nat("reject"))
        out = self._connect(lab, "server", lab.public_ip("a"), 7200, 0, 1.5)
        self.assertTrue(out.startswith("REFUSED"), out)
        ip, port = self._outbound_seen_as(lab, "a", 40200, 7201)
        self.assertEqual((ip, port), (lab.public_ip("a"), 40200))

    def test_symmetric_and_none(self):
        lab = self._lab(a=Nat("symmetric"), b=Nat("none"))
        ports = [self._outbound_seen_as(lab, "a", lp, 7300 + i)
                 for i, lp in enumerate((40301, 40302))]
        self.assertEqual({ip for ip, _ in ports}, {lab.public_ip("a")})
        # --random-fully: source ports are not preserved (2^-31 flake odds)
        self.assertNotEqual([p for _, p in ports], [40301, 40302])
        self.assertEqual(lab.public_ip("b"), lab.private_ip("b"))
        self.assertEqual(self._outbound_seen_as(lab, "b", 40303, 7303),
                         (lab.public_ip("b"), 40303))
        # b is public, so the server can reach it unsolicited
        listener = self._listen(lab, "b", 7304)
        self.assertTrue(
            self._connect(lab, "server", lab.public_ip("b"), 7304).startswith("CONNECTED"))
        listener.finish(10)

    def test_cgnat_shared_lan(self):
        lab = self._lab(a=Nat("masquerade", cgnat="masquerade"), shared_lan=True)
        self.assertEqual(lab.public_ip("a"), lab.public_ip("b"))
        self.assertEqual(lab.public_ip("a"), lab.private_ip("cgnA"))
        self.assertEqual(self._outbound_seen_as(lab, "a", 40401, 7400),
                         (lab.public_ip("a"), 40401))
        self.assertEqual(self._outbound_seen_as(lab, "b", 40402, 7401),
                         (lab.public_ip("b"), 40402))
        # same LAN: b reaches a's private address directly
        listener = self._listen(lab, "a", 7402)
        self.assertTrue(
            self._connect(lab, "b", lab.private_ip("a"), 7402).startswith("CONNECTED"))
        rc, seen = listener.finish(10)
        self.assertEqual(seen.split()[1], lab.private_ip("b"))


class RequireLabTests(unittest.SynchronousTestCase):
    """The skip-or-fail policy; no root needed."""

    def setUp(self):
        self._saved = os.environ.get(natlab.REQUIRED_ENV)
        self.patch(natlab, "unavailable_reason", lambda: "no lab for you")

    def tearDown(self):
        if self._saved is None:
            os.environ.pop(natlab.REQUIRED_ENV, None)
        else:
            os.environ[natlab.REQUIRED_ENV] = self._saved

    def test_skip_by_default(self):
        for value in (None, "", "0"):
            if value is None:
                os.environ.pop(natlab.REQUIRED_ENV, None)
            else:
                os.environ[natlab.REQUIRED_ENV] = value
            exc = self.assertRaises(pyunit.SkipTest, natlab.require_lab, self)
            self.assertIn("no lab for you", str(exc))

    def test_fail_when_required(self):
        os.environ[natlab.REQUIRED_ENV] = "1"
        exc = self.assertRaises(self.failureException, natlab.require_lab, self)
        self.assertIn("no lab for you", str(exc))
        self.assertIn(natlab.REQUIRED_ENV, str(exc))
