"""
Text messages (C{p2pft send --text}): one TEXT record, shown by the
receiver, acknowledged; refused clearly by a receiver that lacks the
feature, and by the limits.
"""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pft.transfer import text
from p2pft.errors import TransferFailed
from p2pft.transfer import Receiver, TextSender
from p2pft.transfer.records import ABORT, ACK, OFFER

from .memlink import Link, accept
from .procs import p2pft_argv, spawn
from .procs import Workspace, start_server


class TextTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.out = self.mktemp()
        os.mkdir(self.out)
        self.link = Link()
        self.shown = []

    def pair(self, message, supported=True, show=True):
        sender = TextSender(self.link.a, self.clock, message, supported=supported)
        receiver = Receiver(self.link.b, self.clock, self.out, accept,
                            show_text=self.shown.append if show else None)
        rd = receiver.start()
        sd = sender.start()
        self.link.pump()
        return sd, rd

    def test_text_is_shown_and_acknowledged(self):
        sd, rd = self.pair("hello\nworld \u00e9")
        self.assertEqual(self.shown, ["hello\nworld \u00e9"])
        sent, received = self.successResultOf(sd), self.successResultOf(rd)
        self.assertEqual((sent.name, sent.size, sent.files), ("text", 14, 0))
        self.assertEqual(received.size, 14)
        self.assertEqual(os.listdir(self.out), [])  # nothing written
        self.assertEqual(len(self.link.sent(ACK)), 1)
        self.assertEqual(self.link.sent(OFFER), [])

    def test_receiver_without_the_feature_is_told_why(self):
        # An older receiver never sees TEXT: it gets an ABORT that says why,
        # and the sender fails with what to do.
        sd, rd = self.pair("hi", supported=False)
        failure = self.failureResultOf(sd, TransferFailed)
        self.assertIn("older p2pft that cannot receive text", str(failure.value))
        self.assertIn(b"cannot receive", self.link.sent(ABORT)[0])
        self.failureResultOf(rd, TransferFailed)
        self.assertEqual(self.shown, [])

    def test_receiver_that_takes_no_text(self):
        sd, rd = self.pair("hi", show=False)
        self.assertIn("does not take text", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)

    def test_limits(self):
        self.assertRaises(text.TextTooLong, text.encode_text, "x" * (text.MAX_TEXT + 1))
        self.assertEqual(len(text.encode_text("x" * text.MAX_TEXT)), text.MAX_TEXT)
        self.assertRaises(TransferFailed, text.encode_text, "")
        self.assertRaises(TransferFailed, text.encode_text, "\udcff")
        self.assertRaises(TransferFailed, text.decode_text, b"\xff\xfe")
        self.assertRaises(TransferFailed, text.decode_text, b"x" * (text.MAX_TEXT + 1))

    def test_hostile_text_is_escaped_for_the_terminal(self):
        shown = text.displayable("ok\n\ttab\x1b[31mred\u202eevil\rback")
        self.assertEqual(shown, "ok\n\ttab\\x1b[31mred\\u202eevil\\rback")


class TextEndToEndTests(TestCase):
    """Real processes on loopback: the text reaches the receiver's stdout."""

    timeout = 60

    async def test_send_text(self):
        ws = Workspace(self)
        server, addr = await start_server(self)
        message = "the wifi password is hunter2\n\x1b[31mnot red\n"
        sender = spawn(self, "sender", p2pft_argv("send", "--code", "82-text-text", addr, "--text", message))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "-o", ws.out, addr, "82-text-text"))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(receiver.out, b"the wifi password is hunter2\n\\x1b[31mnot red\n")
        self.assertIn("Received a text message (42 B, direct)", receiver.err.decode())
        self.assertIn("Sent a text message (42 B, direct)", sender.err.decode())
        self.assertEqual(os.listdir(ws.out), [])

    async def test_send_text_from_stdin_with_json(self):
        server, addr = await start_server(self)
        sender = spawn(self, "sender", p2pft_argv("send", "--code", "83-text-json", "--text", "-", addr),
                       childFDs={0: "w", 1: "r", 2: "r"})
        sender.transport.writeToChild(0, "caf\u00e9 \u2603".encode())
        sender.transport.closeChildFD(0)
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--json", "--yes", addr, "83-text-json"))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        events = receiver.events()
        self.assertIn({"event": "text", "text": "caf\u00e9 \u2603"}, events)
        self.assertEqual(events[-1]["event"], "done")
        self.assertTrue(events[-1]["text"])

    async def test_too_long_is_refused_before_connecting(self):
        proc = spawn(self, "sender", p2pft_argv("send", "127.0.0.1:9", "--text", "x" * (text.MAX_TEXT + 1)))
        self.assertEqual(await proc.wait_exit(), 2)
        self.assertIn("at most 65536 can be sent as text", proc.err.decode())
        proc = spawn(self, "sender", p2pft_argv("send", "127.0.0.1:9", "--text", "hi", "some-file"))
        self.assertEqual(await proc.wait_exit(), 2)
        self.assertIn("give no PATH", proc.err.decode())
