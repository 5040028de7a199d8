"""
A hostile peer, or someone who can create entries in the output folder
(security review, issue 12):

- a hard link found in the output folder -- at a partial name or at a
  destination -- is never read, hashed or written through;
- the peer's candidate addresses are checked for type and range, loopback
  ones are dropped unless the server is on loopback, and attempts at
  non-public addresses are capped and paced;
- relays the server advertises by name are resolved first and what the
  name resolves to is filtered like a literal address.
"""

from __future__ import annotations

import os

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2pft.transfer.resume import BLOCK
from p2pft.errors import Declined, TransferFailed
from p2pft.transfer.manifest import PARTIAL_SUFFIX
from p2pft.punch import PunchConnector, PunchFailed, PunchSchedule
from p2pft.candidates import parse_candidates, relays, resolve_relays
from p2pft.peer import SessionError, Settings
from p2pft.transfer.store import OutputDir
from p2pft.transfer.records import HAVE

from .files import without_proc_links, write
from .memlink import start_pair
from .test_punch import FakeCandidate


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class HardLinkTests(SynchronousTestCase):
    """OUT and OUTSIDE are sibling folders of one temporary folder (one
    file system): a hard link in OUT can name a file in OUTSIDE."""

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.src, self.out, self.outside = (os.path.join(root, d) for d in ("src", "out", "outside"))
        for d in (self.src, self.out, self.outside):
            os.makedirs(d)

    def outside_file(self, data: bytes) -> str:
        return write(os.path.join(self.outside, "secret"), data)

    def transfer(self, data: bytes, overwrite=False):
        """Send src/r.bin (C{data}) into OUT: (link, sender's, receiver's outcome)."""
        path = write(os.path.join(self.src, "r.bin"), data)
        link, _, _, sd, rd = start_pair([path], self.out, overwrite=overwrite, clock=Clock())
        link.pump()
        return link, sd, rd

    def test_partial_hard_link_is_not_hashed_nor_written(self):
        secret = os.urandom(BLOCK + 10)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX))
        link, sd, rd = self.transfer(os.urandom(BLOCK * 2))
        f = self.failureResultOf(rd, Declined)
        self.assertIn(f"r.bin{PARTIAL_SUFFIX} has 2 hard links", str(f.value))
        self.assertIn("delete or move it, then try again", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(link.sent(HAVE), [], "no hash of the outside file went to the sender")
        self.assertEqual(content(outside), secret, "the outside file is untouched")
        self.assertFalse(os.path.exists(os.path.join(self.out, "r.bin")))

    def test_small_partial_hard_link_is_not_written_through(self):
        # Smaller than a block: nothing to hash, but the old code cut it and
        # wrote the sender's bytes into it (and then linked it into place).
        outside = self.outside_file(b"do not touch")
        os.link(outside, os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX))
        link, sd, rd = self.transfer(b"sender's bytes")
        self.failureResultOf(rd, Declined)
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(content(outside), b"do not touch")
        self.assertEqual(os.stat(outside).st_nlink, 2, "no third name for it in OUT")

    def test_hard_linked_destination_is_not_hashed(self):
        secret = os.urandom(BLOCK * 2)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin"))
        link, sd, rd = self.transfer(secret)  # identical: the old code hashed it and skipped
        f = self.failureResultOf(rd, Declined)
        self.assertIn("r.bin already exists (use --overwrite", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(link.sent(HAVE), [])
        self.assertEqual(content(outside), secret)

    def test_overwrite_replaces_the_name_not_the_linked_file(self):
        secret = os.urandom(BLOCK + 3)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin"))
        new = os.urandom(BLOCK + 3)  # same size: the old code hashed it
        link, sd, rd = self.transfer(new, overwrite=True)
        self.successResultOf(rd)
        self.assertEqual(link.sent(HAVE), [], "a linked destination is not proven to the sender")
        self.assertEqual(content(os.path.join(self.out, "r.bin")), new)
        self.assertEqual(content(outside), secret, "nothing written through the other link")
        self.assertEqual(os.stat(outside).st_nlink, 1)

    # -- place(): the partial name swapped for a link while receiving

    def swapped(self, existing: bytes | None = None, keep: bool = True):
        """A partial file being received, whose name then becomes a hard
        link to the outside file; with C{keep}, the file being received
        keeps another name in OUT (so it still has one link)."""
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        if existing is not None:
            write(os.path.join(self.out, "r.bin"), existing)
        f = out.open_partial("r.bin", 0)
        f.write(b"received")
        outside = self.outside_file(b"outside")
        partial = os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX)
        if keep:
            os.link(partial, os.path.join(self.out, "kept"))
        os.link(outside, os.path.join(self.out, "planted"))
        os.rename(os.path.join(self.out, "planted"), partial)
        return out, f, outside

    def test_place_moves_the_file_written_not_what_the_name_became(self):
        out, f, outside = self.swapped()
        out.place("r.bin", f, 0o644, None, overwrite=False)
        dest = os.path.join(self.out, "r.bin")
        self.assertEqual(content(dest), b"received")
        self.assertFalse(os.path.samefile(dest, outside), "the outside file did not become r.bin")
        self.assertEqual(content(outside), b"outside")
        self.assertTrue(os.path.samefile(os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX), outside),
                        "a partial name that is not ours is left alone")

    def test_place_refuses_a_partial_whose_file_lost_its_name(self):
        out, f, outside = self.swapped(keep=False)
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=False)
        self.assertIn(f"r.bin{PARTIAL_SUFFIX} was deleted or replaced while receiving", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.out, "r.bin")))

    def test_place_with_overwrite_moves_the_file_written_not_what_the_name_became(self):
        # The old code checked the partial name, then renamed it: a swap in
        # between put the outside file at r.bin.  Now the descriptor is
        # linked to a fresh name, and that is renamed over r.bin.
        out, f, outside = self.swapped(existing=b"old")
        out.place("r.bin", f, 0o644, None, overwrite=True)
        dest = os.path.join(self.out, "r.bin")
        self.assertEqual(content(dest), b"received")
        self.assertFalse(os.path.samefile(dest, outside))
        self.assertEqual(content(outside), b"outside")
        self.assertTrue(os.path.samefile(os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX), outside),
                        "a partial name that is not ours is left alone")
        self.assertEqual(sorted(os.listdir(self.out)), ["kept", "r.bin", "r.bin" + PARTIAL_SUFFIX])

    def test_place_without_proc_checks_the_partial_name(self):
        without_proc_links(self)
        out, f, outside = self.swapped()
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=False)
        self.assertIn(f"r.bin{PARTIAL_SUFFIX} was replaced by another file", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.out, "r.bin")))

    def test_open_read_refuses_a_link_on_the_descriptor(self):
        outside = self.outside_file(b"x" * 10)
        os.link(outside, os.path.join(self.out, "r.bin"))
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        self.assertRaises(Declined, out.open_read, "r.bin")


SERVER = "198.51.100.7"  # a rendezvous server that is not on loopback


class CandidateTypeTests(SynchronousTestCase):
    """PROTOCOL.md section 2: only well-typed candidates that can be another
    computer's address are kept."""

    def usable(self, item, server=SERVER):
        try:
            return parse_candidates({"candidates": [item]}, server)
        except SessionError:
            return []

    def test_ill_typed_entries_dropped(self):
        for item in (["10.0.0.1", True], ["10.0.0.1", False], ["10.0.0.1", 80.0], ["10.0.0.1", 5.9],
                     ["10.0.0.1", "80"], [2130706433, 80], [None, 80], ["10.0.0.1", 80, 1],
                     ("10.0.0.1", 80), {"10.0.0.1": 1, "x": 2}, "ab", ["10.0.0.1", [80]]):
            self.assertEqual(self.usable(item), [], item)
        self.assertEqual(self.usable(["10.0.0.1", 80]), [("10.0.0.1", 80)])

    def test_addresses_that_are_this_host_dropped(self):
        for host in ("127.0.0.1", "127.5.6.7", "::1", "::ffff:127.0.0.1", "0.1.2.3", "::127.0.0.1",
                     "fe80::1%eth0", "2001:db8::1%1", " 10.0.0.1"):
            self.assertEqual(self.usable([host, 80]), [], host)
        for host in ("169.254.1.2", "192.168.1.20", "100.64.0.1", "fd00::1", "2001:db8::1"):
            self.assertEqual(self.usable([host, 80]), [(host, 80)], "a peer's LAN addresses are kept")

    def test_loopback_kept_when_the_server_is_on_loopback(self):
        self.assertEqual(self.usable(["127.0.0.1", 80], server="127.0.0.1"), [("127.0.0.1", 80)])
        self.assertEqual(self.usable(["::1", 80], server="::ffff:127.0.0.1"), [("::1", 80)])

    def test_duplicates_do_not_use_up_the_cap(self):
        out = parse_candidates({"candidates": [["203.0.113.1", 1]] * 20 + [["203.0.113.2", 2]]}, SERVER)
        self.assertEqual(out, [("203.0.113.1", 1), ("203.0.113.2", 2)])


class PacingTests(SynchronousTestCase):
    """Default schedule: only the peer's public address (its first
    candidate) is raced after RSTs; others are capped and paced."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.failed = 0

    def start(self, candidates, relays=()):
        c = PunchConnector(self.reactor, 5555, candidates, FakeCandidate, True, PunchSchedule(),
                           relays=list(relays))
        # These tests stop looking before or at the deadline, when the
        # attempt fails: that failure is expected, not an unhandled error.
        c.run().addErrback(lambda f: f.trap(PunchFailed))
        return c

    def refuse_for(self, seconds, step=0.001):
        """Every attempt is answered with RST, for C{seconds}."""
        end = self.reactor.seconds() + seconds
        while self.reactor.seconds() < end:
            clients = self.reactor.tcpClients
            for i in range(self.failed, len(clients)):
                if clients[i][4] is not None:  # not a relay
                    clients[i][2].clientConnectionFailed(
                        self.reactor.connectors[i], Failure(error.ConnectionRefusedError()))
            self.failed = len(clients)
            self.reactor.advance(step)

    def dials(self, host):
        return [i for i, c in enumerate(self.reactor.tcpClients) if c[0] == host]

    def test_private_address_answering_rst_is_paced_and_capped(self):
        self.start([("198.51.100.1", 4000), ("10.0.0.2", 4000), ("2001:db8::2", 4000)])
        self.refuse_for(4)
        public, private, v6 = (len(self.dials(h)) for h in ("198.51.100.1", "10.0.0.2", "2001:db8::2"))
        self.assertGreater(public, 1000, "the peer's public address is raced")
        self.assertEqual(private, v6)
        self.assertTrue(15 <= private <= 17, f"one attempt every 0.25 s, not {private} in 4 s")
        self.refuse_for(16)
        self.assertEqual((len(self.dials("10.0.0.2")), len(self.dials("2001:db8::2"))), (20, 20))

    def test_same_lan_peer_is_tried_again_within_a_quarter_second(self):
        self.start([("203.0.113.5", 4000), ("192.168.1.20", 4000)])
        lan = self.dials("192.168.1.20")[0]
        self.reactor.tcpClients[lan][2].clientConnectionFailed(
            self.reactor.connectors[lan], Failure(error.ConnectionRefusedError()))  # not listening yet
        self.reactor.advance(0.24)
        self.assertEqual(len(self.dials("192.168.1.20")), 1)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.dials("192.168.1.20")), 2)

    def test_private_first_candidate_is_not_raced(self):
        # A peer whose "public" address is private (a server on the LAN, or
        # a peer lying): resets from it neither speed up nor hold back.
        self.start([("10.0.0.2", 4000)], relays=[("203.0.113.9", 9000)])
        self.refuse_for(2.1)
        self.assertEqual(len(self.dials("10.0.0.2")), 9)
        self.assertIn(("203.0.113.9", 9000), [c[:2] for c in self.reactor.tcpClients],
                      "the relay is not held back by resets from a private address")


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves names from a table, at once (or never, for names not in
    it and not in C{fail})."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for host in self.table.get(hostName, []):
            receiver.addressResolved((IPv6Address if ":" in host else IPv4Address)("TCP", host, portNumber))
        receiver.resolutionComplete()
        return receiver


class RelayNameTests(SynchronousTestCase):
    settings = Settings(server=(SERVER, 9000))
    hostile = ["localhost:9001", "127.1:9001", "2130706433:9001", "0x7f.1:9001", "0x7f000001:9001",
               "[::ffff:127.0.0.1]:9001", "[::1]:9001", "0.0.0.0:9001", "[::127.0.0.1]:9001",
               "\x1bc\x07.example:9001"]

    def test_numeric_forms_and_mapped_addresses_are_never_dialled(self):
        addresses, names = relays(self.settings, self.hostile + ["*", "203.0.113.9:9001"], SERVER)
        self.assertEqual(addresses, [(SERVER, 9000), ("203.0.113.9", 9001)])
        self.assertEqual(names, [("localhost", 9001)], "only a host name is left to resolve")

    def test_what_a_name_resolves_to_is_filtered(self):
        resolver = FakeResolver({
            "localhost": ["127.0.0.1", "::1"],
            "relay.example": ["::ffff:127.0.0.1", "169.254.1.1", "fe80::1%2", "203.0.113.10",
                              "2001:db8::10", "203.0.113.11"],
        })
        names = [("localhost", 9001), ("relay.example", 9002)]
        found = self.successResultOf(resolve_relays(resolver, names, SERVER))
        self.assertEqual(found, [("203.0.113.10", 9002), ("2001:db8::10", 9002)])
        self.assertEqual(resolver.asked, ["localhost", "relay.example"])

    def test_loopback_relays_allowed_for_a_loopback_server(self):
        addresses, names = relays(self.settings, ["127.0.0.1:9001", "[::ffff:127.0.0.1]:9002"], "127.0.0.1")
        self.assertEqual(addresses, [("127.0.0.1", 9001), ("127.0.0.1", 9002)])
        found = self.successResultOf(resolve_relays(FakeResolver({"localhost": ["127.0.0.1"]}),
                                                     [("localhost", 9003)], "127.0.0.1"))
        self.assertEqual(found, [("127.0.0.1", 9003)])

    def test_the_users_relay_is_trusted_as_given(self):
        settings = Settings(server=(SERVER, 9000), relay=("localhost", 9001))
        self.assertEqual(relays(settings, self.hostile, SERVER), ([("localhost", 9001)], []))

    def test_resolved_relays_are_dialled_by_address(self):
        reactor = MemoryReactorClock()
        connector = PunchConnector(reactor, 5555, [("203.0.113.5", 4000)], FakeCandidate, True,
                                   PunchSchedule())
        connector.run()
        connector.add_relays([("203.0.113.10", 9002)])  # resolved before the relay delay
        reactor.advance(2.01)
        self.assertIn(("203.0.113.10", 9002, None), [(c[0], c[1], c[4]) for c in reactor.tcpClients])
        connector.add_relays([("203.0.113.11", 9002)])  # resolved after it: dialled at once
        self.assertEqual(reactor.tcpClients[-1][:2], ("203.0.113.11", 9002))


class MirroredCandidateTests(SynchronousTestCase):
    """A peer that sends our own addresses back: never dialled at our own
    port, and our own public address is never raced."""

    MINE = [["198.51.100.7", 40000], ["192.168.1.5", 40000], ["2001:db8::5", 40000]]

    def test_our_own_candidates_are_dropped(self):
        out = parse_candidates({"candidates": [["198.51.100.7", 40000], ["192.168.1.5", 40000],
                                                ["2001:db8::5", 40000], ["203.0.113.9", 5000]]},
                                SERVER, self.MINE)
        self.assertEqual(out, [("203.0.113.9", 5000)])

    def test_our_public_address_on_another_port_is_paced_not_raced(self):
        # A peer behind our own NAT legitimately has our public address, so
        # it is kept -- but at the pace of "other" candidates, so a hostile
        # peer cannot aim 6,000 fast attempts at our own port 22.
        reactor = MemoryReactorClock()
        c = PunchConnector(reactor, 5555, [("198.51.100.7", 22)], FakeCandidate, True, PunchSchedule(),
                           own_hosts=frozenset(["198.51.100.7"]))
        c.run().addErrback(lambda f: f.trap(PunchFailed))
        failed = 0
        while reactor.seconds() < 4:
            for i in range(failed, len(reactor.tcpClients)):
                reactor.tcpClients[i][2].clientConnectionFailed(
                    reactor.connectors[i], Failure(error.ConnectionRefusedError()))
            failed = len(reactor.tcpClients)
            reactor.advance(0.001)
        self.assertLessEqual(len(reactor.tcpClients), 17)
        self.assertEqual(c.refused, 0, "its resets do not hold the relay back either")
