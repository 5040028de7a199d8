"""
Modification times: nanoseconds where both sides announced "mtime-ns",
whole seconds with a peer that did not (protocol v1 as first written).
"""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.errors import UnsafeName
from p2pft.transfer.manifest import Entry, FILE, entry_from_wire
from p2pft.transfer.scan import scan
from p2pft.peer import FEATURES, MTIME_NS
from p2pft.transfer import Receiver, Sender

from .files import write
from .memlink import Link, accept

WHEN = 1_700_000_000_123_456_789


class MtimeTests(SynchronousTestCase):
    def setUp(self):
        self.src, self.out = self.mktemp(), self.mktemp()
        os.makedirs(self.out)
        self.path = os.path.join(self.src, "a.txt")
        write(self.path, b"abc")
        os.utime(self.path, ns=(WHEN, WHEN))

    def transfer(self, ns: bool) -> int:
        link, clock = Link(), Clock()
        sd = Sender(link.a, clock, scan([self.path]), mtime_ns=ns).start()
        rd = Receiver(link.b, clock, self.out, accept, mtime_ns=ns).start()
        link.pump()
        self.successResultOf(sd)
        self.successResultOf(rd)
        return os.stat(os.path.join(self.out, "a.txt")).st_mtime_ns

    def test_nanoseconds_when_both_sides_have_them(self):
        self.assertIn(MTIME_NS, FEATURES)
        self.assertEqual(self.transfer(ns=True), WHEN)

    def test_whole_seconds_with_an_older_peer(self):
        self.assertEqual(self.transfer(ns=False), WHEN // 10**9 * 10**9)

    def test_wire_units(self):
        entry = Entry("a", FILE, 3, 0o644, WHEN)
        self.assertEqual(entry.wire()[4], WHEN // 10**9)
        self.assertEqual(entry.wire(ns=True)[4], WHEN)
        self.assertEqual(entry_from_wire(entry.wire()).mtime_ns, WHEN // 10**9 * 10**9)
        self.assertEqual(entry_from_wire(entry.wire(ns=True), ns=True).mtime_ns, WHEN)
        # Nanoseconds read as seconds would be 50 billion years: refused,
        # never wrapped into a wrong date.
        self.assertRaises(UnsafeName, entry_from_wire, entry.wire(ns=True))
        self.assertRaises(UnsafeName, entry_from_wire, ["a", FILE, 3, 0o644, 2**63], None, True)
