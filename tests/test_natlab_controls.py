"""
Self-check of the NAT lab's controls (tests/natlab.py: block_direct,
cut/heal, renumber; tests/procs.py: LabRelay), with plain sockets only:
no p2pft code is involved except the relay process that LabRelay runs.

Each test says what it proves.  All traffic stays inside the lab's own
network namespaces.  Needs root; skipped otherwise (a failure instead when
P2PFT_NATLAB_REQUIRED=1).
"""

import os
import subprocess
import sys

from twisted.internet import defer
from twisted.trial import unittest

from tests import natlab, procs
from tests.natlab import Nat, NatLab
from tests.test_natlab_selfcheck import CONNECT, LISTEN, SIMOPEN, _Proc

PY = sys.executable
#: Seconds to wait for a segment stalled by a block or a cut to arrive
#: once the path is back: TCP retransmits it after a backoff that doubles
#: each time (0.2, 0.4, 0.8 ... s), so the wait can be as long as the path
#: was down; normally a few seconds.
RETRANSMIT = 25

# One TCP connection (connect to HOST PORT [from LPORT], or accept one on
# PORT), then commands on stdin, one answer line each:
#   send WORD    -> SENT | ERROR <errno name>
#   recv SECS    -> GOT WORD | TIMEOUT | EOF | ERROR <errno name>
CHAT = r"""
import errno, socket, sys
def name(e):
    return errno.errorcode.get(e.errno, str(e.errno))
if sys.argv[1] == "connect":
    host, port, lport = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    s = socket.socket()
    if lport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", lport))
    s.settimeout(5)
    try:
        s.connect((host, port))
    except socket.timeout:
        print("TIMEOUT", flush=True); sys.exit(0)
    except OSError as e:
        print("ERROR", name(e), flush=True); sys.exit(0)
else:
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(sys.argv[2])))
    l.listen(5)
    l.settimeout(20)
    print("READY", flush=True)
    s, _ = l.accept()
    l.close()   # the port is free for a new listener; s lives on
me, peer = s.getsockname(), s.getpeername()
print("CONNECTED", me[0], me[1], peer[0], peer[1], flush=True)
buf = b""
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "send":
        try:
            s.sendall(cmd[1].encode() + b"\n")
            print("SENT", flush=True)
        except OSError as e:
            print("ERROR", name(e), flush=True)
    elif cmd[0] == "recv":
        s.settimeout(float(cmd[1]))
        try:
            while b"\n" not in buf:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
            if b"\n" in buf:
                w, buf = buf.split(b"\n", 1)
                print("GOT", w.decode(), flush=True)
            else:
                print("EOF", flush=True)
        except socket.timeout:
            print("TIMEOUT", flush=True)
        except OSError as e:
            print("ERROR", name(e), flush=True)
"""

# A relay client: connect to HOST PORT, send "RELAY TOKEN SIDE", expect OK,
# send "from-SIDE", read the other side's word, then hold the connection
# until EOF (so a killed relay's socket is closed by us too: TIME_WAIT on
# the relay's side).
RELAY_CLIENT = r"""
import socket, sys
host, port, token, side = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
other = "receiver" if side == "sender" else "sender"
s = socket.create_connection((host, port), timeout=10)
s.sendall(("RELAY %s %s\n" % (token, side)).encode())
f = s.makefile("rb")
print("LINE", f.readline().decode().strip(), flush=True)
s.sendall(("from-%s\n" % side).encode())
print("PEER", f.readline().decode().strip(), flush=True)
s.settimeout(60)
try:
    rest = f.read()
    print("END eof", len(rest), flush=True)
except OSError as e:
    print("END", type(e).__name__, flush=True)
s.close()
"""


class Chat(_Proc):
    """A CHAT process: one connection, driven line by line."""

    def __init__(self, lab, name, *args):
        self.name = name
        self.proc = lab.popen(
            name, [PY, "-u", "-c", CHAT] + [str(a) for a in args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.buf = b""
        self.eof = False

    def ask(self, line, timeout=10):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.readline(timeout)

    def send(self, word):
        return self.ask(f"send {word}")

    def recv(self, secs):
        return self.ask(f"recv {secs}", secs + 10)


class _Base(unittest.TestCase):

    def setUp(self):
        natlab.require_lab(self)
        natlab.cleanup_stale()

    def _lab(self, **kwargs):
        lab = NatLab(**kwargs)
        self.addCleanup(lab.down)
        lab.up()
        return lab

    def _pair(self, lab, client, server, host, port, lport=0):
        """A CHAT connection client -> host:port, accepted on server; both
        ends, each past its CONNECTED line (words[1:])."""
        srv = Chat(lab, server, "listen", port)
        self.assertEqual(srv.readline(10), "READY")
        cli = Chat(lab, client, "connect", host, port, lport)
        c, s = cli.readline(15), srv.readline(15)
        self.assertTrue(c.startswith("CONNECTED"), c + "\n" + lab.dump())
        self.assertTrue(s.startswith("CONNECTED"), s)
        self.assertEqual(cli.send("hello"), "SENT")
        self.assertEqual(srv.recv(5), "GOT hello")
        return cli, srv, c.split()[1:], s.split()[1:]

    def _connect(self, lab, name, host, port, lport=0, timeout=3.0):
        rc, out = _Proc(lab, name, CONNECT, host, port, lport, timeout).finish(timeout + 10)
        self.assertEqual(rc, 0, out)
        return out.strip()

    def _reaches_server(self, lab, name, port):
        """name connects to a fresh listener on the server: the address the
        server saw."""
        listener = _Proc(lab, "server", LISTEN, "0.0.0.0", port, 10)
        self.assertEqual(listener.readline(10), "READY")
        out = self._connect(lab, name, lab.server_ip, port)
        self.assertTrue(out.startswith("CONNECTED") and out.endswith("pong:ping"),
                        out + "\n" + lab.dump())
        rc, seen = listener.finish(10)
        self.assertEqual(rc, 0, seen)
        return seen.split()[1], int(seen.split()[2])


class BlockDirect(_Base):

    def test_established_stalls_server_flows(self):
        """a behind home NAT + carrier NAT (public 203.0.113.41), b public
        (203.0.113.32): block_direct() stalls an established a->b
        connection in both directions and times out new connects a->b, while
        a and b still reach the server; unblock_direct() lets the stalled
        data through (retransmission) and new connects succeed; the
        nftables table is gone afterwards."""
        lab = self._lab(a=Nat("masquerade", cgnat="masquerade"), b=Nat("none"))
        self.assertEqual((lab.public_ip("a"), lab.public_ip("b")),
                         ("203.0.113.41", "203.0.113.32"))
        cli, srv, _, seen = self._pair(lab, "a", "b", lab.public_ip("b"), 7500)
        self.assertEqual(seen[2], lab.public_ip("a"))
        lab.block_direct()
        lab.block_direct()      # idempotent
        self.assertTrue(lab.direct_blocked)
        self.assertEqual(cli.send("blocked1"), "SENT")
        self.assertEqual(srv.recv(1.5), "TIMEOUT")
        self.assertEqual(srv.send("blocked2"), "SENT")
        self.assertEqual(cli.recv(1.0), "TIMEOUT")
        self.assertTrue(self._connect(lab, "a", lab.public_ip("b"), 7501).startswith("TIMEOUT"))
        for name, port in (("a", 7502), ("b", 7503)):
            self.assertEqual(self._reaches_server(lab, name, port)[0], lab.public_ip(name))
        lab.unblock_direct()
        lab.unblock_direct()    # idempotent
        self.assertFalse(lab.direct_blocked)
        self.assertEqual(srv.recv(RETRANSMIT), "GOT blocked1")
        self.assertEqual(cli.recv(RETRANSMIT), "GOT blocked2")
        tables = lab.run("inet", ["nft", "list", "tables"], check=True).stdout
        self.assertNotIn("p2pft_block", tables)
        listener = _Proc(lab, "b", LISTEN, "0.0.0.0", 7504, 10)
        self.assertEqual(listener.readline(10), "READY")
        self.assertTrue(self._connect(lab, "a", lab.public_ip("b"), 7504).startswith("CONNECTED"))

    def test_punching_fails_while_blocked(self):
        """Both behind masquerading NATs (publics .21/.22): a TCP
        simultaneous open - the direct path hole punching makes - fails
        while blocked and works once unblocked."""
        lab = self._lab()
        lab.block_direct()

        def simopen(pa, pb, budget):
            a = _Proc(lab, "a", SIMOPEN, pa, lab.public_ip("b"), pb, budget, "a", "b")
            b = _Proc(lab, "b", SIMOPEN, pb, lab.public_ip("a"), pa, budget, "b", "a")
            return a.finish(budget + 10), b.finish(budget + 10)

        (ra, oa), (rb, ob) = simopen(40011, 40012, 3)
        self.assertTrue(oa.startswith("FAIL") and ob.startswith("FAIL"), (oa, ob))
        self.assertEqual(self._reaches_server(lab, "a", 7510)[0], "203.0.113.21")
        lab.unblock_direct()
        (ra, oa), (rb, ob) = simopen(40013, 40014, 10)
        self.assertTrue(oa.startswith("OK") or ob.startswith("OK"), (oa, ob, lab.dump()))

    def test_shared_lan_refused(self):
        lab = self._lab(shared_lan=True)
        self.assertRaises(natlab.NatLabError, lab.block_direct)


class Cut(_Base):

    def test_rst_resets_both_ends_and_new_connects(self):
        """cut(a, "rst"): a segment from a on an established a<->server
        connection is answered with a reset to a, a segment from the server
        with a reset to the server (NATed back, so the server's socket
        accepts it); a new connect from a is refused at once; b is
        unaffected.  heal(a): new connects work again."""
        lab = self._lab()
        cli, srv, _, _ = self._pair(lab, "a", "server", lab.server_ip, 7600)
        bcli, bsrv, _, _ = self._pair(lab, "b", "server", lab.server_ip, 7601)
        lab.cut("a", "rst")
        self.assertEqual(lab.is_cut("a"), "rst")
        self.assertIsNone(lab.is_cut("b"))
        self.assertEqual(cli.send("x"), "SENT")
        self.assertEqual(cli.recv(3), "ERROR ECONNRESET")
        self.assertEqual(srv.send("y"), "SENT")
        self.assertEqual(srv.recv(3), "ERROR ECONNRESET")
        self.assertTrue(self._connect(lab, "a", lab.server_ip, 7602).startswith("REFUSED"))
        self.assertEqual(bcli.send("still"), "SENT")
        self.assertEqual(bsrv.recv(3), "GOT still")
        lab.heal("a")
        lab.heal("a")           # idempotent
        self.assertIsNone(lab.is_cut("a"))
        self.assertEqual(self._reaches_server(lab, "a", 7603)[0], lab.public_ip("a"))

    def test_rst_with_flush_empties_conntrack(self):
        """cut(a, "rst", flush_conntrack=True): natA's conntrack table is
        emptied (what a reboot loses) and the established connection is
        reset at both ends even though its mapping is gone: a's segment
        (a fresh conntrack pickup) and the server's (now addressed to the
        router itself) both meet the reset."""
        lab = self._lab()
        cli, srv, _, _ = self._pair(lab, "a", "server", lab.server_ip, 7610)
        self.assertTrue([ln for ln in lab.conntrack("natA") if "dport=7610" in ln])
        lab.cut("a", "rst", flush_conntrack=True)
        self.assertEqual(lab.conntrack("natA"), [])
        self.assertEqual(srv.send("y"), "SENT")
        self.assertEqual(srv.recv(3), "ERROR ECONNRESET")
        self.assertEqual(cli.send("x"), "SENT")
        self.assertEqual(cli.recv(3), "ERROR ECONNRESET")
        lab.heal("a")
        self.assertEqual([ln for ln in lab.conntrack("natA") if "dport=7610" in ln], [])
        self.assertEqual(self._reaches_server(lab, "a", 7611)[0], lab.public_ip("a"))

    def test_drop_stalls_then_resumes(self):
        """cut(a, "drop") without flush: nothing crosses natA (established
        data stalls, a new connect times out), no reset is sent; after
        heal(a) the stalled connection carries on (its conntrack entry
        survived)."""
        lab = self._lab()
        cli, srv, _, _ = self._pair(lab, "a", "server", lab.server_ip, 7620)
        lab.cut("a", "drop")
        self.assertEqual(cli.send("x"), "SENT")
        self.assertEqual(srv.recv(1.5), "TIMEOUT")
        self.assertEqual(srv.send("y"), "SENT")
        self.assertEqual(cli.recv(1.0), "TIMEOUT")
        self.assertTrue(self._connect(lab, "a", lab.server_ip, 7621, timeout=1.5)
                        .startswith("TIMEOUT"))
        lab.heal("a")
        self.assertEqual(srv.recv(RETRANSMIT), "GOT x")
        self.assertEqual(cli.recv(RETRANSMIT), "GOT y")

    def test_drop_with_flush_loses_the_mapping(self):
        """cut(a, "drop", flush_conntrack=True) then heal(a): the router
        comes back without the connection's mapping, so the server's data
        on it never reaches a (dropped as unsolicited at natA).  As on a
        real Linux router (nf_conntrack_tcp_loose=1), a's own next segment
        re-creates the mapping with the same public port and the connection
        lives again."""
        lab = self._lab()
        cli, srv, _, _ = self._pair(lab, "a", "server", lab.server_ip, 7630, lport=40630)
        lab.cut("a", "drop", flush_conntrack=True)
        lab.heal("a")
        self.assertEqual([ln for ln in lab.conntrack("natA") if "dport=7630" in ln], [])
        self.assertEqual(srv.send("lost"), "SENT")
        self.assertEqual(cli.recv(2.5), "TIMEOUT")
        self.assertEqual(cli.send("again"), "SENT")
        self.assertEqual(srv.recv(5), "GOT again")
        self.assertEqual(cli.recv(RETRANSMIT), "GOT lost")

    def test_cgnat_and_none(self):
        """The cut is on the outermost box: the carrier NAT behind a CGNAT
        (a's home router still forwards); a host with kind "none" and no
        carrier has no box to cut."""
        lab = self._lab(a=Nat("masquerade", cgnat="masquerade"), b=Nat("none"))
        self.assertEqual(lab.outer_box("a"), "cgnA")
        self.assertIsNone(lab.outer_box("b"))
        self.assertRaises(natlab.NatLabError, lab.cut, "b", "rst")
        self.assertRaises(ValueError, lab.cut, "a", "reboot")
        lab.cut("a", "rst")
        self.assertTrue(self._connect(lab, "a", lab.server_ip, 7640).startswith("REFUSED"))
        lab.heal("a")
        self.assertEqual(self._reaches_server(lab, "a", 7641)[0], lab.public_ip("a"))


class Renumber(_Base):

    def test_renumber(self):
        """renumber(a): a has only the new address and still its default
        route; the old connection is dead both ways (silence, no reset); a
        new connect from the *same local port* to the same server port gets
        a new NAT mapping (a different public port, since the old mapping
        still holds the old one)."""
        lab = self._lab()
        old = lab.private_ip("a")
        cli, srv, mine, seen = self._pair(lab, "a", "server", lab.server_ip, 7700, lport=40700)
        self.assertEqual(mine[:2], [old, "40700"])
        self.assertEqual(seen[2:], [lab.public_ip("a"), "40700"])
        new = lab.renumber("a")
        self.assertEqual(new, "10.201.1.100")
        self.assertEqual(lab.private_ip("a"), new)
        addrs = lab.run("a", ["ip", "-4", "-br", "addr", "show", "eth0"], check=True).stdout
        self.assertIn(new + "/24", addrs)
        self.assertNotIn(old + "/", addrs)
        self.assertIn("default via 10.201.1.1",
                      lab.run("a", ["ip", "route"], check=True).stdout)
        self.assertEqual(srv.send("to-old"), "SENT")
        self.assertEqual(cli.recv(1.5), "TIMEOUT")
        cli.send("from-old")    # SENT, or an error: either way it must not arrive
        self.assertEqual(srv.recv(1.5), "TIMEOUT")
        cli2, srv2, mine2, seen2 = self._pair(lab, "a", "server", lab.server_ip, 7700,
                                              lport=40700)
        self.assertEqual(mine2[:2], [new, "40700"])
        self.assertEqual(seen2[2], lab.public_ip("a"))
        self.assertNotEqual(seen2[3], "40700")
        self.assertEqual(lab.renumber("a"), "10.201.1.101")

    def test_renumber_public_host(self):
        """kind "none": the new address is b's public address too, and an
        active block_direct() follows it."""
        lab = self._lab(b=Nat("none"))
        lab.block_direct()
        new = lab.renumber("b")
        self.assertEqual(new, "203.0.113.150")
        self.assertEqual(lab.public_ip("b"), new)
        self.assertEqual(self._reaches_server(lab, "b", 7710)[0], new)
        listener = _Proc(lab, "b", LISTEN, "0.0.0.0", 7711, 10)
        self.assertEqual(listener.readline(10), "READY")
        self.assertTrue(self._connect(lab, "a", new, 7711, timeout=1.5).startswith("TIMEOUT"))
        lab.unblock_direct()
        self.assertTrue(self._connect(lab, "a", new, 7711).startswith("CONNECTED"))


class Relay(_Base):

    @defer.inlineCallbacks
    def test_relay_kill_and_restart_same_port(self):
        """procs.LabRelay: a standalone relay in the server namespace
        splices a (behind NAT) and b (behind NAT) with plain RELAY lines;
        SIGKILL ends both legs; while its connections linger in TIME_WAIT
        on the port, a restart on the same port listens again and splices
        the same token anew."""
        lab = self._lab()
        relay = yield defer.ensureDeferred(procs.start_relay(self, lab, 9001))
        self.assertEqual(relay.address, "203.0.113.10:9001")
        token = os.urandom(32).hex()

        def clients():
            host, port = relay.address.split(":")
            return [procs.spawn(self, side, lab.exec_argv(host_, [PY, "-u", "-c", RELAY_CLIENT,
                                                                  host, port, token, side]))
                    for host_, side in (("a", "sender"), ("b", "receiver"))]

        for round_ in range(2):
            snd, rcv = clients()
            for p, other in ((snd, "receiver"), (rcv, "sender")):
                yield p.wait_for(r"PEER from-" + other, timeout=20)
                self.assertIn("LINE OK", p.out.decode())
            yield defer.ensureDeferred(relay.stop())
            for p in (snd, rcv):
                yield p.wait_exit(20)
                self.assertIn("END ", p.out.decode())
            if round_ == 0:
                ss = lab.run("server", ["ss", "-tan", "state", "time-wait",
                                        "( sport = :9001 )"], check=True).stdout
                self.assertIn(":9001", ss, "no TIME_WAIT left; the restart proves less")
                yield defer.ensureDeferred(relay.start())
        self.assertEqual(len(relay.history), 2)
