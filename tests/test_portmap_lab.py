"""
Port mapping against a real miniupnpd (tests/natlab_upnp.py) on a
symmetric NAT of the lab: each protocol (PCP, NAT-PMP, UPnP-IGD) maps a
port of host a, host b reaches a through it, and the mapping is gone from
miniupnpd's rules once deleted; and the real CLI behind that NAT goes
direct, its mapping deleted when the session ends.

Needs root, miniupnpd and nft (scripts/setup.sh installs them): skipped
with a reason elsewhere, a failure when P2PFT_NATLAB_REQUIRED is set.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import unittest

from twisted.internet import reactor
from twisted.python import log
from twisted.trial.unittest import TestCase

from tests import natlab_upnp
from tests.files import make_file, sha256_of
from tests.natlab import Nat, lab_required, start_lab
from tests.procs import ROOT, Workspace, p2pft_argv, spawn
from tests.test_session_lab import spawn as spawn_timed

PORT = 9000

#: Host a's side: listen on a port, map it with one protocol, print the
#: mapping, answer one connection through it, delete, say so.
MAPPER = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from twisted.internet import defer, task, threads
from p2pft.portmap.mapper import PortMapper

async def main(reactor):
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    listener.settimeout(15)
    port = listener.getsockname()[1]
    mapper = PortMapper(reactor, protocols=(sys.argv[1],))
    mapping = await mapper.map(port)
    print(json.dumps({"port": port, "mapping": mapping and [mapping.protocol, list(mapping.external),
                                                            mapping.seconds]}), flush=True)
    if mapping is None:
        return
    conn, peer = await threads.deferToThread(listener.accept)
    conn.sendall(b"hello from a\n")
    conn.close()
    await mapper.unmap()
    print(json.dumps({"accepted": peer[0], "unmapped": mapper.mapping is None}), flush=True)

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

DIAL = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.recv(100).decode().strip())
"""


def _line(proc, timeout=30.0) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise AssertionError(f"no line from the mapper within {timeout} s: {proc.stderr.read1(8000)!r}"
                             if proc.poll() is not None else f"no line within {timeout} s")
    return json.loads(line)


def _require_upnp_lab(testcase):
    reason = natlab_upnp.unavailable_reason()
    if reason is not None:
        if lab_required():
            testcase.fail(reason)
        raise unittest.SkipTest(reason)


class ProtocolTests(TestCase):
    """Each protocol maps, the other side gets through, and the mapping is
    deleted, against the real miniupnpd."""

    timeout = 90

    def check(self, protocol: str):
        _require_upnp_lab(self)
        lab = start_lab(self, a=Nat("symmetric", upnp=True))
        daemon = lab.upnp["natA"]
        proc = lab.popen("a", [sys.executable, "-c", MAPPER, protocol, ROOT], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = _line(proc)
        self.assertIsNotNone(first["mapping"], daemon.log_text()[-3000:])
        name, (ip, port), seconds = first["mapping"]
        self.assertEqual((name, ip), (protocol, lab.public_ip("a")))
        held = natlab_upnp.mappings(lab, "natA")
        self.assertEqual(len(held), 1, held)
        self.assertIn(f"{lab.private_ip('a')}:{first['port']}", held[0])
        # Through a symmetric NAT, from the other side.
        dialled = lab.run("b", [sys.executable, "-c", DIAL, ip, str(port)], timeout=20)
        self.assertEqual(dialled.stdout.strip(), "hello from a", dialled.stderr + lab.dump(["natA"]))
        last = _line(proc)
        self.assertEqual(last, {"accepted": lab.public_ip("b"), "unmapped": True})
        self.assertEqual(proc.wait(timeout=10), 0)
        self.assertEqual(natlab_upnp.mappings(lab, "natA"), [], daemon.log_text()[-3000:])
        note = f"{protocol}: mapped in {seconds * 1000:.1f} ms"
        log.msg(note)
        print(f"\n    {note}", end=" ")

    def test_pcp(self):
        self.check("pcp")

    def test_nat_pmp(self):
        self.check("nat-pmp")

    def test_upnp(self):
        self.check("upnp")


class SessionTests(TestCase):
    """The real CLI: a peer behind a symmetric NAT whose router maps goes
    direct, and its mapping is gone after the session."""

    timeout = 120

    async def test_symmetric_with_miniupnpd_goes_direct(self):
        _require_upnp_lab(self)
        lab = start_lab(self, a=Nat("symmetric", upnp=True))
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "mapped.bin"), 4 * 1024 * 1024 + 3)
        server = spawn(self, "server", lab.exec_argv("server", p2pft_argv(
            "server", "--relay", "--port", f"tcp:{PORT}:interface={lab.server_ip}")))
        await server.wait_for(r"listening on ")
        addr = f"{lab.server_ip}:{PORT}"
        started = reactor.seconds()
        sender = spawn_timed(self, "sender", lab.exec_argv(
            "a", p2pft_argv("send", "-v", "--json", "--limit-rate", "4M", "--code", "56-port-map", addr, src)))
        receiver = spawn_timed(self, "receiver", lab.exec_argv(
            "b", p2pft_argv("receive", "--json", "--yes", "-o", ws.out, addr, "56-port-map")))
        diagnostics = lambda: (sender.text() + receiver.text() + server.text()
                               + lab.upnp["natA"].log_text()[-4000:] + lab.dump(["natA"]))
        self.assertEqual(await receiver.wait_exit(), 0, diagnostics())
        self.assertEqual(await sender.wait_exit(), 0, diagnostics())
        self.assertEqual(sha256_of(os.path.join(ws.out, "mapped.bin")), sha256_of(src))
        mapped = [e for e in sender.events() if e["event"] == "port-mapping"]
        self.assertEqual([e["action"] for e in mapped], ["mapped", "deleted"], diagnostics())
        external = mapped[0]["external"]
        self.assertEqual(external.rsplit(":", 1)[0], lab.public_ip("a"))
        for proc in (sender, receiver):
            done = [e for e in proc.events() if e["event"] == "done"][-1]
            self.assertEqual(done["path"], "direct", diagnostics())
            # The mapping is the way in: no birthday punching, either side.
            self.assertEqual(done.get("birthday_attempts", 0), 0, diagnostics())
        # The receiver reached the sender through the mapped port.
        [*_, last] = [e for e in receiver.events() if e["event"] in ("connected", "path")]
        self.assertEqual(last["peer"], external, diagnostics())
        self.assertEqual(natlab_upnp.mappings(lab, "natA"), [], diagnostics())
        direct_at = next(t for t, e in receiver.stamps if e.get("path") == "direct" and e["event"] in
                         ("connected", "path"))
        note = (f"symmetric + miniupnpd: direct through {mapped[0]['protocol']} {external}, mapped in "
                f"{mapped[0]['seconds'] * 1000:.0f} ms, direct {direct_at - receiver.at('paired'):.3f} s "
                f"after pairing, session {reactor.seconds() - started:.1f} s")
        log.msg(note)
        print(f"\n    {note}", end=" ")
