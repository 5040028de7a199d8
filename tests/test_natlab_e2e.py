"""
The real CLI through real NATs: a rendezvous server on a "public" network
namespace, sender and receiver each behind its own MASQUERADE router that
silently drops unsolicited inbound packets (tests/natlab.py).

Needs root: skipped with a reason elsewhere, a failure when
P2PFT_NATLAB_REQUIRED is set (as .ci/run does).
"""

from __future__ import annotations

import os
import pty
import signal

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.natlab import start_lab
from tests.procs import p2pft_argv, spawn
from tests.test_e2e import Workspace, make_file, sha256_of

PORT = 9000


class NatLabEndToEndTests(TestCase):
    timeout = 120

    async def test_direct_through_two_nats_survives_server_death(self):
        lab = start_lab(self)
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "lab.bin"), 4 * 1024 * 1024 + 3)
        server = spawn(self, "server", lab.exec_argv(
            "server", p2pft_argv("server", "--port", f"tcp:{PORT}:interface={lab.server_ip}")))
        await server.wait_for(r"listening on ")
        addr = f"{lab.server_ip}:{PORT}"

        # The receiver runs on a terminal without --yes: it asks about the
        # offer only once the direct connection is up, which is when we kill
        # the server -- everything after must travel peer to peer.
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        started = reactor.seconds()
        sender = spawn(self, "sender", lab.exec_argv(
            "a", p2pft_argv("send", "--json", "--code", "42-lab-test", addr, src)))
        receiver = spawn(self, "receiver", lab.exec_argv(
            "b", p2pft_argv("receive", "--json", "-o", ws.out, addr)),
            childFDs={0: slave, 1: "r", 2: "r"}, P2PFT_CODE="42-lab-test")
        os.close(slave)
        await receiver.wait_for(r"\[y/N\]", "err")
        await sender.wait_for(r'"event": "connected"', "out")
        connected_after = reactor.seconds() - started
        server.kill(signal.SIGKILL)
        await server.wait_exit()
        os.write(master, b"y\n")

        diagnostics = lambda: sender.text() + receiver.text() + lab.dump()
        self.assertEqual(await receiver.wait_exit(), 0, diagnostics())
        self.assertEqual(await sender.wait_exit(), 0, diagnostics())
        self.assertEqual(sha256_of(os.path.join(ws.out, "lab.bin")), sha256_of(src))

        # Each side saw the other's NAT router, not a private address, and
        # the path was direct.
        for proc, other in ((sender, "b"), (receiver, "a")):
            [connected] = [e for e in proc.events() if e["event"] == "connected"]
            self.assertEqual(connected["path"], "direct")
            host, port = connected["peer"].rsplit(":", 1)
            self.assertEqual(host, lab.public_ip(other), diagnostics())
            self.assertIn(f"Connected to {connected['peer']} successfully!", proc.err.decode())
            done = proc.events()[-1]
            self.assertEqual((done["event"], done["path"], done["bytes"]), ("done", "direct", os.path.getsize(src)))
        self.assertLess(connected_after, 30)
