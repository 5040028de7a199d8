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

from tests.capture import start_capture
from tests.natlab import start_lab
from tests.procs import p2pft_argv, spawn
from tests.files import make_file, sha256_of
from tests.procs import Workspace

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

    async def test_no_plaintext_crosses_the_internet(self):
        """
        A packet capture on the lab's "internet" bridge (every byte between
        the NAT routers and the server) during a whole session: it holds the
        encrypted transfer, but not one copy of the file's contents, its name,
        or the peers' private addresses (candidates travel sealed).
        """
        lab = start_lab(self)
        ws = Workspace(self)
        marker = os.urandom(12).hex().encode()  # 24 printable bytes, unique
        name = f"secret-plans-{os.urandom(4).hex()}.txt"
        src = os.path.join(ws.src, name)
        with open(src, "wb") as f:
            for i in range(4096):
                f.write(marker + b" line %06d of the secret file " % i + os.urandom(200) + b"\n")
        capture = await start_capture(self, lab, os.path.join(ws.root, "internet.pcap"))

        server = spawn(self, "server", lab.exec_argv(
            "server", p2pft_argv("server", "--port", f"tcp:{PORT}:interface={lab.server_ip}")))
        await server.wait_for(r"listening on ")
        addr = f"{lab.server_ip}:{PORT}"
        sender = spawn(self, "sender", lab.exec_argv("a", p2pft_argv("send", "--code", "43-tap-test", addr, src)))
        receiver = spawn(self, "receiver", lab.exec_argv(
            "b", p2pft_argv("receive", "--yes", "-o", ws.out, addr, "43-tap-test")))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(sha256_of(os.path.join(ws.out, name)), sha256_of(src))

        stats = await capture.stop()
        self.assertEqual((stats["kernel_drops"], stats["truncated"]), (0, 0), stats)
        streams = capture.tcp_payloads()
        raw = capture.captured_bytes()
        # The capture saw the transfer itself: a stream from one NAT to the
        # other at least as large as the file.
        size = os.path.getsize(src)
        direct = {k: v for k, v in streams.items()
                  if {k[0], k[2]} == {lab.public_ip("a"), lab.public_ip("b")}}
        self.assertGreaterEqual(max(len(v) for v in direct.values()), size, sorted(streams))
        secrets = [marker, name.encode(), b"secret file",
                   lab.private_ip("a").encode(), lab.private_ip("b").encode()]
        for secret in secrets:
            self.assertNotIn(secret, raw)
            for key, stream in streams.items():
                self.assertNotIn(secret, stream, key)
        # The one thing the server sees in the clear: the nameplate.
        to_server = b"".join(v for k, v in streams.items() if k[2] == lab.server_ip)
        self.assertIn(b"CLAIM 43", to_server)
