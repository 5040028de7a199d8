"""
A hostile rendezvous server, built here, against real p2pft processes.

The server is assumed hostile (docs/SECURITY.md): whatever it does to the
messages it forwards -- alter, drop, replay, reorder, or run its own SPAKE2
with a guessed code -- both peers must end with a clean one-line error and a
non-zero exit, and the receiver must write nothing.
"""

from __future__ import annotations

import base64
import os
import re

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from p2pft.secure import RECEIVER, SENDER, Pake
from p2pft.server.rendezvous import RendezvousServer, RendezvousServerFactory
from tests.procs import p2pft_argv, spawn
from tests.files import make_file
from tests.procs import Workspace

CODE = "31-honest-words"


class HostileServer(RendezvousServer):
    """
    Forwards messages through C{self.tamper(index, payload)}, where index
    counts every message the server has received from either peer (0-based)
    and the return value is the list of payloads to forward.
    """

    def __init__(self, clock, tamper):
        super().__init__(clock)
        self.tamper = tamper
        self.seen = 0
        self.held = []

    def message(self, conn, payload):
        member = self._members[conn]
        nameplate = member.nameplate
        if nameplate is None or not nameplate.paired:
            return super().message(conn, payload)
        index, self.seen = self.seen, self.seen + 1
        for other in nameplate.members:
            if other is not member:
                for out in self.tamper(index, payload, other.connection):
                    other.connection.sendLine(f"MSG {out}".encode("ascii"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def flip(payload: str, at: int = -1) -> str:
    raw = bytearray(base64.b64decode(payload))
    raw[at] ^= 0x01
    return b64(bytes(raw))


class HostileServerTests(TestCase):
    timeout = 90

    async def run_against(self, tamper, expect: str):
        """C{expect}: a regex one of the two error lines must match (the
        side that got the tampered message detects it; the other may just
        see its partner leave)."""
        factory = RendezvousServerFactory(reactor)
        factory.state = HostileServer(reactor, tamper)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        addr = f"127.0.0.1:{port.getHost().port}"
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "secret.bin"), 100_000)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--timeout", "3", "--code", CODE, addr, src))
        receiver = spawn(self, "receiver", p2pft_argv(
            "receive", "--json", "--yes", "--timeout", "3", "-o", ws.out, addr, CODE))
        codes = (await sender.wait_exit(timeout=45), await receiver.wait_exit(timeout=45))
        text = sender.text() + receiver.text()
        self.assertEqual(codes, (1, 1), text)
        for proc in (sender, receiver):
            err_lines = proc.err.decode().strip().splitlines()
            self.assertTrue(err_lines[-1].startswith("p2pft: error: "), text)
            events = proc.events()
            self.assertEqual(events[-1]["event"], "error", text)
            self.assertNotIn("connected", [e["event"] for e in events], text)
        self.assertTrue(re.search(expect, receiver.err.decode() + sender.err.decode()), text)
        self.assertEqual(os.listdir(ws.out), [])
        return sender, receiver

    async def test_altered_pake_message(self):
        await self.run_against(lambda i, p, to: [flip(p)] if i == 0 else [p],
                                "wrong code|malformed key exchange")

    async def test_altered_key_confirmation(self):
        await self.run_against(lambda i, p, to: [flip(p, 3)] if i in (2, 3) else [p], "wrong code: ")

    async def test_altered_candidates(self):
        await self.run_against(lambda i, p, to: [flip(p)] if i >= 4 else [p], "failed authentication")

    async def test_dropped_message(self):
        """A dropped confirmation: the next message takes its place and
        fails to open (counter nonces), or the wait times out."""
        await self.run_against(lambda i, p, to: [] if i == 2 else [p], "wrong code: |timed out after 3 s")

    async def test_dropped_last_message(self):
        await self.run_against(lambda i, p, to: [] if i == 5 else [p], "timed out after 3 s")

    async def test_replayed_pake_message(self):
        await self.run_against(lambda i, p, to: [p, p] if i == 0 else [p], "wrong code")

    async def test_reordered_messages(self):
        """Message 2 (a key confirmation) is held back and delivered after
        the same peer's next message (its candidates)."""
        held = []

        def reorder(i, p, to):
            if i == 2:
                held.append(to)
                held.append(p)
                return []
            if held and held[0] is to:
                late = held[1]
                held.clear()
                return [p, late]
            return [p]

        await self.run_against(reorder, "wrong code: ")

    async def test_server_runs_its_own_spake2(self):
        """A man in the middle with a guessed code: wrong code on both sides."""
        fakes = {}

        def mitm(i, p, to):
            if i in (0, 1):
                role_byte = base64.b64decode(p)[:1]
                # Replace each peer's message with one of the same role, from
                # a SPAKE2 run on a guessed code.
                role = SENDER if role_byte == b"S" else RECEIVER
                fake = Pake("guessed-words", "31", role)
                fakes[role] = fake
                return [b64(fake.start())]
            return [p]

        sender, receiver = await self.run_against(mitm, "wrong code")
        self.assertIn("wrong code", sender.err.decode(), sender.text() + receiver.text())
        self.assertIn("wrong code", receiver.err.decode(), sender.text() + receiver.text())
