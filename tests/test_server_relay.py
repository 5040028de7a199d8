"""
The relay server (L{p2pft.server.relay}, L{p2pft.server.splice}): pairing
and limits (L{RelayServer}), the splice with its flow control and caps
(L{Splice}), the standalone protocol and the C{RELAY} line on a rendezvous
port -- on a fake clock and in-memory transports; then the splice over real
loopback sockets.  The relay from the peer's side, through the CLI and the
NAT lab, is tests/test_relay.py.

Tests marked C{# Regression:} failed before the fix they describe.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from p2pft.server import splice as splice_module
from p2pft.server import zerocopy
from p2pft.server.events import NO_EVENTS, IServerEvents
from p2pft.server.relay import MAX_LEGS, MAX_PAIRS, RelayFactory, RelayLimits, RelayServer
from p2pft.server.rendezvous import RendezvousServerFactory
from p2pft.server.splice import SPLICE_BUFFER

TOKEN = "0123456789abcdef" * 4

OTHER_TOKEN = "fedcba9876543210" * 4

#: Every byte value, newlines and protocol words included: after OK the
#: relay must not parse anything.
PAYLOAD = bytes(range(256)) * 8 + b"\nRELAY x y\nERROR no\nOK\n\r\n"


# ---------------------------------------------------------------------------
# in-memory harness


class Transport(StringTransport):
    """
    A StringTransport that behaves like a real TCP transport where the relay
    relies on it: unregisterProducer without a registered producer is a
    no-op (as in L{twisted.internet.abstract.FileDescriptor}), and pausing
    or resuming a closing transport is allowed (lenient).
    """

    def __init__(self, host: str, port: int):
        super().__init__(peerAddress=IPv4Address("TCP", host, port), lenient=True)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    #: Whether the relay shut its sending side (loseWriteConnection).
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def lose(proto) -> None:
    """The connection under C{proto} is gone (as the reactor would report)."""
    proto.transport.connected = False
    proto.transport.disconnected = True
    proto.connectionLost(Failure(error.ConnectionDone()))


class Recording:
    """Every server event, as (name, args...).  (tests/test_observe.py has
    its own, and imports this module.)"""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name not in IServerEvents:
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))

    def named(self, name: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == name]


def per_ip(server: RelayServer) -> dict:
    # No public accessor for the per-address counts.
    return dict(server._per_ip)


class Harness:
    """A standalone relay (RelayFactory) on a fake clock."""

    def __init__(self, events=NO_EVENTS, **limits):
        self.clock = Clock()
        self.factory = RelayFactory(self.clock, RelayLimits(**limits), events)
        self.server: RelayServer = self.factory.relay
        self._port = 40000

    def connect(self, host: str = "198.51.100.1"):
        self._port += 1
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, self._port))
        transport = Transport(host, self._port)
        proto.makeConnection(transport)
        return proto, transport

    def join(self, side: str, token: str = TOKEN, host: str = "198.51.100.1", leg: int = 0):
        """A connection sending the RELAY line of C{leg} (leg 0: the v1 line)."""
        proto, transport = self.connect(host)
        field = f" {leg}" if leg else ""
        proto.dataReceived(f"RELAY {token} {side}{field}\n".encode("ascii"))
        return proto, transport

    def pair(self, token: str = TOKEN, hosts=("198.51.100.1", "198.51.100.2"), leg: int = 0):
        a, ta = self.join("sender", token, hosts[0], leg)
        b, tb = self.join("receiver", token, hosts[1], leg)
        return a, ta, b, tb


class PairingTests(SynchronousTestCase):
    def test_pair_gets_ok_and_splices_both_ways_byte_exact(self):
        h = Harness()
        a, ta = h.join("sender")
        self.assertEqual(ta.value(), b"", "nothing before the other side arrives")
        self.assertFalse(ta.disconnecting)
        self.assertEqual((h.server.sessions, h.server.spliced), (1, 0))
        b, tb = h.join("receiver", host="198.51.100.2")
        self.assertEqual(take(ta), b"OK\n")
        self.assertEqual(take(tb), b"OK\n")
        self.assertEqual((h.server.sessions, h.server.spliced), (1, 1))
        # Spliced legs read and send in bigger pieces than Twisted's defaults.
        self.assertEqual({(t.bufferSize, t.SEND_LIMIT) for t in (ta, tb)}, {(SPLICE_BUFFER, SPLICE_BUFFER)})

        a.rawDataReceived(PAYLOAD)
        self.assertEqual(take(tb), PAYLOAD)
        self.assertEqual(ta.value(), b"", "nothing echoed to the writer")
        b.rawDataReceived(PAYLOAD[::-1])
        self.assertEqual(take(ta), PAYLOAD[::-1])
        self.assertEqual(tb.value(), b"")
        # Through dataReceived too (the path the reactor takes), many chunks.
        sent = b""
        for i in range(50):
            chunk = bytes([i]) * (i + 1) + b"\n"
            sent += chunk
            b.dataReceived(chunk)
        self.assertEqual(take(ta), sent)
        self.assertFalse(ta.disconnecting or tb.disconnecting)

    def test_receiver_may_come_first(self):
        h = Harness()
        b, tb = h.join("receiver")
        a, ta = h.join("sender")
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))
        a.dataReceived(b"x")
        self.assertEqual(tb.value(), b"x")

    def test_crlf_line_accepted(self):
        h = Harness()
        a, ta = h.connect()
        a.dataReceived(f"RELAY {TOKEN} sender\r\n".encode())
        b, tb = h.join("receiver")
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))

    def test_line_split_across_segments(self):
        h = Harness()
        a, ta = h.connect()
        line = f"RELAY {TOKEN} sender\n".encode()
        for i in range(len(line)):
            a.dataReceived(line[i:i + 1])
        self.assertEqual(h.server.sessions, 1)
        self.assertEqual(ta.value(), b"")

    def test_second_arrival_data_in_the_same_segment_is_forwarded(self):
        h = Harness()
        a, ta = h.join("sender")
        b, tb = h.connect()
        b.dataReceived(f"RELAY {TOKEN} receiver\n".encode() + b"early bytes")
        self.assertEqual(take(tb), b"OK\n")
        self.assertEqual(take(ta), b"OK\nearly bytes")

    def test_different_tokens_do_not_pair(self):
        h = Harness()
        a, ta = h.join("sender", TOKEN)
        b, tb = h.join("receiver", OTHER_TOKEN)
        self.assertEqual((ta.value(), tb.value()), (b"", b""))
        self.assertEqual((h.server.sessions, h.server.spliced), (2, 0))

    def test_two_sessions_are_independent(self):
        h = Harness()
        a1, ta1, b1, tb1 = h.pair(TOKEN)
        a2, ta2, b2, tb2 = h.pair(OTHER_TOKEN)
        for t in (ta1, tb1, ta2, tb2):
            take(t)
        a1.dataReceived(b"one")
        a2.dataReceived(b"two")
        self.assertEqual((tb1.value(), tb2.value()), (b"one", b"two"))
        lose(a1)
        self.assertTrue(tb1.disconnecting)
        self.assertFalse(ta2.disconnecting or tb2.disconnecting)
        self.assertEqual(h.server.sessions, 1)


class RefusalTests(SynchronousTestCase):
    def assertRefused(self, transport, reason: str) -> None:
        data = transport.value()
        self.assertEqual(data, f"ERROR {reason}\n".encode(), data)
        self.assertTrue(transport.disconnecting)

    def check_malformed(self, raw: bytes, reason: str) -> None:
        h = Harness()
        p, t = h.connect()
        p.dataReceived(raw)
        self.assertRefused(t, reason)
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual(per_ip(h.server), {})
        # A client that never closes is aborted after a grace period...
        h.clock.advance(10)
        self.assertTrue(t.disconnected, "refused connection aborted after 10 s")
        # ...and once the connection is gone no timer is left behind.
        lose(p)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_bad_tokens(self):
        for token in ("0123", TOKEN[:-1], TOKEN + "0", TOKEN.upper(), "g" * 64, "-" * 64, ""):
            with self.subTest(token=token):
                self.check_malformed(f"RELAY {token} sender\n".encode(), "malformed RELAY line")

    def test_bad_sides(self):
        for side in ("Sender", "RECEIVER", "both", "", "sender\x00"):
            with self.subTest(side=side):
                self.check_malformed(f"RELAY {TOKEN} {side}\n".encode(), "malformed RELAY line")

    def test_wrong_word_counts(self):
        for line in ("RELAY", f"RELAY {TOKEN}", f"RELAY {TOKEN} sender extra",
                     f"RELAY  {TOKEN} sender", f"RELAY {TOKEN} sender "):
            with self.subTest(line=line):
                self.check_malformed(line.encode() + b"\n", "malformed RELAY line")

    def test_not_relay_first(self):
        for line in (b"", b"relay " + TOKEN.encode() + b" sender", b"ALLOCATE", b"GET / HTTP/1.1",
                     b"\xff\xfe RELAY", b" RELAY " + TOKEN.encode() + b" sender"):
            with self.subTest(line=line):
                self.check_malformed(line + b"\n", "expected RELAY")

    def test_overlong_line(self):
        self.check_malformed(b"RELAY " + b"a" * 300 + b" sender\n", "line too long")

    def test_overlong_line_without_newline(self):
        self.check_malformed(b"R" * 1000, "line too long")

    def test_only_the_first_line_counts(self):
        """A refused line ends the connection: a good line after it in the
        same segment is not admitted."""
        h = Harness()
        p, t = h.connect()
        p.dataReceived(b"HELLO\n" + f"RELAY {TOKEN} sender\n".encode())
        self.assertRefused(t, "expected RELAY")
        self.assertEqual(h.server.sessions, 0)

    def test_same_side_twice_is_refused(self):
        h = Harness()
        a, ta = h.join("sender")
        c, tc = h.join("sender", host="198.51.100.3")
        self.assertRefused(tc, "this session already has a sender")
        self.assertEqual(ta.value(), b"")
        self.assertFalse(ta.disconnecting)
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 1})
        lose(c)
        # The first sender still waits and pairs with the receiver.
        self.assertEqual(h.server.sessions, 1)
        b, tb = h.join("receiver", host="198.51.100.2")
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))
        a.dataReceived(b"still works")
        self.assertEqual(tb.value(), b"still works")

    def test_same_receiver_twice_is_refused(self):
        h = Harness()
        h.join("receiver")
        c, tc = h.join("receiver")
        self.assertRefused(tc, "this session already has a receiver")

    def test_data_before_ok_is_refused(self):
        h = Harness()
        a, ta = h.join("sender")
        a.dataReceived(b"too early")
        self.assertRefused(ta, "data before OK")
        lose(a)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        # The token is free again: nobody pairs with the refused sender.
        b, tb = h.join("receiver")
        self.assertEqual(tb.value(), b"")
        self.assertEqual(h.server.sessions, 1)

    def test_bad_leg_fields(self):
        """A leg field that is not plain decimal is malformed, as a v1 relay
        says of any third word."""
        for leg in ("01", "00", "-1", "+1", "1.0", "0x1", "a", "\u0661", "1 2", "1 "):
            with self.subTest(leg=leg):
                self.check_malformed(f"RELAY {TOKEN} sender {leg}\n".encode(), "malformed RELAY line")

    def test_leg_out_of_range(self):
        """Legs are 1 to 15 on the wire; leg 0 is the line without the field."""
        for leg in ("0", str(MAX_LEGS), "99", "9" * 100):
            with self.subTest(leg=leg):
                self.check_malformed(f"RELAY {TOKEN} receiver {leg}\n".encode(),
                                     "relay leg out of range: 1 to 15 (leg 0 has no leg field)")

    def test_every_leg_in_range_is_admitted(self):
        h = Harness()
        for leg in range(MAX_LEGS):
            h.join("sender", leg=leg)
        self.assertEqual(len(h.server.pairing._waiting), MAX_LEGS)
        self.assertEqual(h.server.sessions, 1)

    def test_same_side_twice_on_a_leg_is_refused(self):
        h = Harness()
        h.join("sender", leg=3)
        c, tc = h.join("sender", leg=3, host="198.51.100.3")
        self.assertRefused(tc, "this session already has a sender on leg 3")
        # The same side on another leg is another leg.
        d, td = h.join("sender", leg=4, host="198.51.100.3")
        self.assertEqual(td.value(), b"")
        self.assertFalse(td.disconnecting)

    def test_data_in_the_relay_segment_of_the_first_arrival_is_refused(self):
        h = Harness()
        a, ta = h.connect()
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode() + b"HELLO")
        self.assertRefused(ta, "data before OK")


class LimitTests(SynchronousTestCase):
    def test_per_ip_cap(self):
        h = Harness(max_per_ip=2)
        p1, t1 = h.join("sender", TOKEN)
        p2, t2 = h.join("sender", OTHER_TOKEN)
        p3, t3 = h.join("sender", "ab" * 32)
        self.assertEqual(t3.value(), b"ERROR too many relay connections from your address\n")
        self.assertTrue(t3.disconnecting)
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 2})
        lose(p3)  # a refused connection does not give back what it never got
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 2})
        # Other addresses are not affected; the partner of a waiting
        # session from a full address is refused too (it is per address).
        q, tq = h.join("receiver", TOKEN, host="198.51.100.9")
        self.assertEqual(tq.value(), b"OK\n")
        p4, t4 = h.join("receiver", OTHER_TOKEN)
        self.assertIn(b"too many relay connections", t4.value())
        # One leaves: its address may connect again.
        lose(p1)
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 1, "198.51.100.9": 1})
        p5, t5 = h.join("receiver", OTHER_TOKEN)
        self.assertEqual((t5.value(), take(t2)), (b"OK\n", b"OK\n"))
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 2, "198.51.100.9": 1})

    def test_max_sessions_cap(self):
        h = Harness(max_sessions=1)
        a, ta = h.join("sender", TOKEN)
        c, tc = h.join("sender", OTHER_TOKEN, host="198.51.100.3")
        self.assertEqual(tc.value(), b"ERROR relay is full, try again later\n")
        self.assertTrue(tc.disconnecting)
        lose(c)
        # The waiting session's partner needs no new session: admitted.
        b, tb = h.join("receiver", TOKEN, host="198.51.100.2")
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))
        self.assertEqual(h.server.sessions, 1)
        d, td = h.join("sender", OTHER_TOKEN, host="198.51.100.3")
        self.assertIn(b"relay is full", td.value())
        lose(d)
        # The spliced pair ends: room again.
        lose(a)
        self.assertEqual(h.server.sessions, 0)
        e, te = h.join("sender", OTHER_TOKEN, host="198.51.100.3")
        self.assertEqual(te.value(), b"")
        self.assertFalse(te.disconnecting)
        self.assertEqual(h.server.sessions, 1)

    def test_counts_when_a_waiting_member_leaves(self):
        h = Harness()
        a, ta = h.join("sender")
        self.assertEqual((h.server.sessions, per_ip(h.server)), (1, {"198.51.100.1": 1}))
        lose(a)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [], "waiting timer cancelled")
        # The same side on the same token may come back (a new waiting member).
        a2, ta2 = h.join("sender")
        self.assertEqual(ta2.value(), b"")
        self.assertEqual(h.server.sessions, 1)

    def test_counts_when_a_spliced_pair_ends(self):
        h = Harness()
        a, ta, b, tb = h.pair()
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 1, "198.51.100.2": 1})
        lose(b)
        # The partner is closed and the session is over at once; its own
        # address is counted until its connection is gone.
        self.assertTrue(ta.disconnecting)
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 1})
        lose(a)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [], "idle timer cancelled")

    def test_counts_same_address_both_sides(self):
        h = Harness()
        a, ta, b, tb = h.pair(hosts=("198.51.100.1", "198.51.100.1"))
        self.assertEqual(per_ip(h.server), {"198.51.100.1": 2})
        lose(a)
        lose(b)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))

    def test_unadmitted_connection_changes_no_count(self):
        h = Harness()
        p, t = h.connect()
        lose(p)
        p, t = h.connect()
        p.dataReceived(b"nonsense\n")
        lose(p)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_waiting_timeout(self):
        h = Harness(waiting_timeout=5)
        a, ta = h.join("sender")
        h.clock.advance(4.9)
        self.assertEqual(ta.value(), b"")
        self.assertFalse(ta.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(ta.value(), b"ERROR the other side never came\n")
        self.assertTrue(ta.disconnecting)
        lose(a)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_waiting_timeout_default_is_60_seconds(self):
        h = Harness()
        a, ta = h.join("sender")
        h.clock.advance(59.9)
        self.assertFalse(ta.disconnecting)
        h.clock.advance(0.2)
        self.assertIn(b"the other side never came", ta.value())

    def test_waiting_timer_cancelled_when_paired(self):
        h = Harness(waiting_timeout=5, idle_timeout=1000)
        a, ta, b, tb = h.pair()
        h.clock.advance(100)
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))
        self.assertFalse(ta.disconnecting or tb.disconnecting)

    def test_hello_timeout(self):
        h = Harness()
        p, t = h.connect()
        h.clock.advance(29.9)
        self.assertFalse(t.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(t.value(), b"ERROR timed out waiting for RELAY\n")
        self.assertTrue(t.disconnecting)
        lose(p)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_hello_timer_stops_at_the_relay_line(self):
        h = Harness(waiting_timeout=100)
        a, ta = h.join("sender")
        h.clock.advance(50)
        self.assertEqual(ta.value(), b"")
        self.assertFalse(ta.disconnecting)

    def test_partial_line_does_not_stop_hello_timer(self):
        h = Harness()
        p, t = h.connect()
        p.dataReceived(b"RELAY " + TOKEN.encode())
        h.clock.advance(30)
        self.assertEqual(t.value(), b"ERROR timed out waiting for RELAY\n")


class LegTests(SynchronousTestCase):
    """Several legs of one session (one token): paired by (token, leg),
    limited as one session (docs/PROTOCOL.md §6)."""

    def legs(self, legs=(0, 1), events=NO_EVENTS, **limits):
        """A harness and, for each of C{legs}, its spliced pair (a, ta, b, tb),
        OK lines taken."""
        h = Harness(events, **limits)
        pairs = {}
        for leg in legs:
            pairs[leg] = h.pair(leg=leg)
            self.assertEqual((take(pairs[leg][1]), take(pairs[leg][3])), (b"OK\n", b"OK\n"))
        return h, pairs

    def assertOpen(self, *transports):
        for t in transports:
            self.assertFalse(t.disconnecting, t)

    def assertCut(self, *transports):
        for t in transports:
            self.assertTrue(t.disconnecting, t)

    def test_two_legs_of_one_token_are_spliced_independently(self):
        h = Harness()
        a0, ta0 = h.join("sender", leg=0)
        a1, ta1 = h.join("sender", leg=1)
        b1, tb1 = h.join("receiver", leg=1, host="198.51.100.2")
        # Leg 1 is spliced; leg 0 still waits for its receiver.
        self.assertEqual((take(ta1), take(tb1), ta0.value()), (b"OK\n", b"OK\n", b""))
        b0, tb0 = h.join("receiver", leg=0, host="198.51.100.2")
        self.assertEqual((take(ta0), take(tb0)), (b"OK\n", b"OK\n"))
        self.assertEqual((h.server.sessions, h.server.spliced), (1, 1))
        a0.dataReceived(b"zero")
        a1.dataReceived(PAYLOAD)
        b0.dataReceived(b"back on zero")
        self.assertEqual((take(tb0), take(tb1)), (b"zero", PAYLOAD))
        self.assertEqual((take(ta0), ta1.value()), (b"back on zero", b""))
        # Flow control is per leg: leg 1's slow reader pauses leg 1 only.
        tb1.producer.pauseProducing()
        self.assertEqual((ta1.producerState, ta0.producerState), ("paused", "producing"))
        tb1.producer.resumeProducing()
        self.assertEqual(ta1.producerState, "producing")

    def test_legs_pair_on_a_rendezvous_port_too(self):
        clock = Clock()
        factory = RendezvousServerFactory(clock, relay=RelayServer(clock, RelayLimits()))
        transports = {}
        for n, (side, leg) in enumerate((("sender", 5), ("sender", 0), ("receiver", 5), ("receiver", 0))):
            proto = factory.buildProtocol(IPv4Address("TCP", "203.0.113.5", 50000 + n))
            t = Transport("203.0.113.5", 50000 + n)
            proto.makeConnection(t)
            take(t)  # WELCOME
            field = f" {leg}" if leg else ""
            proto.dataReceived(f"RELAY {TOKEN} {side}{field}\n".encode())
            transports[side, leg] = proto, t
        self.assertEqual({k: take(t) for k, (p, t) in transports.items()}, dict.fromkeys(transports, b"OK\n"))
        transports["sender", 5][0].dataReceived(b"five")
        self.assertEqual(transports["receiver", 5][1].value(), b"five")
        self.assertEqual(transports["receiver", 0][1].value(), b"")
        self.assertEqual((factory.relay.sessions, factory.relay.spliced), (1, 1))

    def test_max_sessions_counts_a_token_once_however_many_legs(self):
        h = Harness(max_sessions=1)
        for leg in range(MAX_LEGS):
            h.join("sender", leg=leg)
        self.assertEqual(h.server.sessions, 1)
        for leg in range(MAX_LEGS):
            b, tb = h.join("receiver", leg=leg, host="198.51.100.2")
            self.assertEqual(tb.value(), b"OK\n", leg)
        self.assertEqual(h.server.sessions, 1)
        c, tc = h.join("sender", OTHER_TOKEN, host="198.51.100.3", leg=1)
        self.assertEqual(tc.value(), b"ERROR relay is full, try again later\n")

    def test_the_rate_bucket_is_shared_by_every_leg(self):
        h, pairs = self.legs(rate=1000)
        (a0, ta0, _, tb0), (_, ta1, b1, tb1) = pairs[0], pairs[1]
        a0.dataReceived(b"x" * 300)
        # One leg's debt pauses every leg of the session, both ways.
        self.assertEqual({t.producerState for t in (ta0, tb0, ta1, tb1)}, {"paused"})
        b1.dataReceived(b"y" * 300)  # read before the pause took effect: still forwarded
        self.assertEqual((take(tb0), take(ta1)), (b"x" * 300, b"y" * 300))
        h.clock.advance(0.59)
        self.assertEqual({t.producerState for t in (ta0, tb0, ta1, tb1)}, {"paused"}, "600 bytes owed")
        h.clock.advance(0.02)
        self.assertEqual({t.producerState for t in (ta0, tb0, ta1, tb1)}, {"producing"})

    def test_the_rate_caps_the_sum_of_the_legs(self):
        """Four legs sending as fast as allowed: together they get the
        rate, not four times it."""
        h, pairs = self.legs(legs=(0, 1, 2, 3), rate=10_000)
        forwarded = 0
        start = h.clock.seconds()
        while h.clock.seconds() - start < 5:
            sent = False
            for a, ta, b, tb in pairs.values():
                if ta.producerState == "producing":
                    a.dataReceived(b"z" * 1000)
                    forwarded += 1000
                    sent = True
            if not sent:
                h.clock.advance(0.01)
        elapsed = h.clock.seconds() - start
        self.assertLessEqual(forwarded, 10_000 * elapsed + 4 * 1000)
        self.assertGreaterEqual(forwarded, 10_000 * elapsed * 0.8)
        self.assertEqual(sum(len(take(tb)) for a, ta, b, tb in pairs.values()), forwarded)

    def test_a_leg_joining_a_throttled_session_starts_paused(self):
        h, pairs = self.legs(rate=1000)
        pairs[0][0].dataReceived(b"x" * 500)
        a2, ta2, b2, tb2 = h.pair(leg=2)
        self.assertEqual((take(ta2), take(tb2)), (b"OK\n", b"OK\n"))
        self.assertEqual((ta2.producerState, tb2.producerState), ("paused", "paused"))
        h.clock.advance(0.51)
        self.assertEqual((ta2.producerState, tb2.producerState), ("producing", "producing"))

    def test_max_bytes_is_summed_over_the_legs(self):
        events = Recording()
        h, pairs = self.legs(legs=(0, 1, 2), events=events, max_bytes=1000)
        (a0, ta0, b0, tb0), (a1, ta1, b1, tb1), (a2, ta2, b2, tb2) = pairs.values()
        a0.dataReceived(b"a" * 500)
        b1.dataReceived(b"b" * 300)
        # A leg that ended still counted: its bytes were the session's.
        a2.dataReceived(b"c" * 100)
        lose(a2)
        lose(b2)
        a1.dataReceived(b"d" * 100)
        self.assertEqual((take(tb0), take(ta1), take(tb1)), (b"a" * 500, b"b" * 300, b"d" * 100))
        self.assertOpen(ta0, tb0, ta1, tb1)
        a0.dataReceived(b"!")  # 1001
        self.assertEqual((tb0.value(), ta0.value(), tb1.value(), ta1.value()), (b"",) * 4,
                         "the excess is not forwarded")
        self.assertCut(ta0, tb0, ta1, tb1)
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual(events.named("relaySessionEnded"), [(1, 1000, 0.0, "byte-cap")])

    def test_idle_only_when_every_leg_is_idle(self):
        events = Recording()
        h, pairs = self.legs(events=events, idle_timeout=10)
        (a0, ta0, b0, tb0), (a1, ta1, b1, tb1) = pairs[0], pairs[1]
        for _ in range(6):  # 30 s of traffic on leg 1 only
            h.clock.advance(5)
            b1.dataReceived(b"keepalive")
        self.assertOpen(ta0, tb0, ta1, tb1)
        h.clock.advance(9.9)
        self.assertOpen(ta0, tb0, ta1, tb1)
        h.clock.advance(0.2)
        self.assertCut(ta0, tb0, ta1, tb1)
        self.assertEqual(h.server.sessions, 0)
        [(number, count, seconds, why)] = events.named("relaySessionEnded")
        self.assertEqual((number, count, why), (1, 6 * len(b"keepalive"), "idle"))
        for p in (a0, b0, a1, b1):
            lose(p)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_one_leg_ending_does_not_end_the_others(self):
        events = Recording()
        h, pairs = self.legs(legs=(0, 1, 2), events=events)
        (a0, ta0, b0, tb0), (a1, ta1, b1, tb1), (a2, ta2, b2, tb2) = pairs.values()
        lose(a1)  # leg 1 cut
        self.assertCut(tb1)
        self.assertOpen(ta0, tb0, ta2, tb2)
        a0.readConnectionLost()  # leg 0 closed in order, both ways
        self.assertTrue(tb0.write_closed)
        self.assertOpen(tb0)
        b0.readConnectionLost()
        self.assertCut(ta0, tb0)
        self.assertOpen(ta2, tb2)
        a2.dataReceived(b"still")
        self.assertEqual(tb2.value(), b"still")
        self.assertEqual(h.server.sessions, 1)
        self.assertEqual(events.named("relaySessionEnded"), [], "the session goes on")
        lose(b2)
        self.assertCut(ta2)
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual(events.named("relaySessionStarted"), [(1, ("198.51.100.1", "198.51.100.2"))])
        self.assertEqual(events.named("relaySessionEnded"), [(1, 5, 0.0, "lost")])
        for p in (b1, a0, b0, a2):
            lose(p)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_leg_is_reused_after_its_pair_ended(self):
        """Both sides reconnect leg 1 after a cut: a new pair on the same
        (token, leg), in the same session while leg 0 goes on."""
        events = Recording()
        h, pairs = self.legs(events=events)
        (a0, ta0, b0, tb0), (a1, ta1, b1, tb1) = pairs[0], pairs[1]
        lose(a1)
        lose(b1)
        a1, ta1, b1, tb1 = h.pair(leg=1)
        self.assertEqual((take(ta1), take(tb1)), (b"OK\n", b"OK\n"))
        a1.dataReceived(b"again")
        self.assertEqual(tb1.value(), b"again")
        self.assertEqual((h.server.sessions, h.server.spliced), (1, 1))
        # Once the whole session is over, the token makes a new one.
        for p in (a0, b0, a1, b1):
            lose(p)
        self.assertEqual(h.server.sessions, 0)
        a0, ta0, b0, tb0 = h.pair()
        self.assertEqual((take(ta0), take(tb0)), (b"OK\n", b"OK\n"))
        self.assertEqual((h.server.sessions, h.server.spliced), (1, 2))
        self.assertEqual([e[0] for e in events.named("relaySessionEnded")], [1])

    def test_a_leg_may_reconnect_before_the_relay_notices_its_cut(self):
        """After a silent cut the relay still has the old pair spliced: the
        new pair of that leg meets anyway, and the old one is unaffected."""
        h, pairs = self.legs(legs=(1,))
        old_a, old_ta, old_b, old_tb = pairs[1]
        a, ta, b, tb = h.pair(leg=1, hosts=("198.51.100.3", "198.51.100.4"))
        self.assertEqual((take(ta), take(tb)), (b"OK\n", b"OK\n"))
        a.dataReceived(b"new")
        old_a.dataReceived(b"old")
        self.assertEqual((tb.value(), old_tb.value()), (b"new", b"old"))
        self.assertOpen(old_ta, old_tb)
        self.assertEqual(h.server.sessions, 1)

    def test_a_session_holds_a_bounded_number_of_pairs(self):
        h = Harness(max_per_ip=1000)
        for round in range(MAX_PAIRS // MAX_LEGS):
            for leg in range(MAX_LEGS):
                a, ta, b, tb = h.pair(leg=leg)
                self.assertEqual(tb.value(), b"OK\n")
        c, tc = h.join("sender", leg=7)
        self.assertEqual(tc.value(), b"ERROR this session has too many legs\n")
        self.assertTrue(tc.disconnecting)
        # A pair ends: room for one again.
        lose(a)
        c, tc = h.join("sender", leg=7)
        self.assertFalse(tc.disconnecting)

    def test_a_waiting_leg_keeps_the_session_after_its_splices_ended(self):
        events = Recording()
        h, pairs = self.legs(legs=(0,), events=events, waiting_timeout=5)
        a2, ta2 = h.join("sender", leg=2)
        pairs[0][0].dataReceived(b"xy")
        lose(pairs[0][0])
        lose(pairs[0][2])
        self.assertEqual(h.server.sessions, 1)
        self.assertEqual(events.named("relaySessionEnded"), [])
        h.clock.advance(5)
        self.assertEqual(ta2.value(), b"ERROR the other side never came\n")
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual(events.named("relaySessionEnded"), [(1, 2, 5.0, "lost")])
        lose(a2)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class SpliceTests(SynchronousTestCase):
    def paired(self, **limits):
        h = Harness(**limits)
        a, ta, b, tb = h.pair()
        take(ta), take(tb)
        return h, a, ta, b, tb

    def test_flow_control_pauses_the_source(self):
        h, a, ta, b, tb = self.paired()
        # Each transport's producer is the direction that writes to it.
        self.assertTrue(tb.streaming and ta.streaming)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        tb.producer.pauseProducing()           # b cannot keep up...
        self.assertEqual(ta.producerState, "paused")   # ...so a is not read
        self.assertEqual(tb.producerState, "producing")
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")
        ta.producer.pauseProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "paused"))
        tb.producer.pauseProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "paused"))
        ta.producer.resumeProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "producing"))
        tb.producer.resumeProducing()
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))

    def test_pause_after_the_source_is_gone_is_harmless(self):
        h, a, ta, b, tb = self.paired()
        producer = tb.producer
        lose(a)
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()

    def test_max_bytes_counts_both_directions_and_closes_both(self):
        h, a, ta, b, tb = self.paired(max_bytes=1000)
        a.dataReceived(b"a" * 600)
        b.dataReceived(b"b" * 400)
        self.assertEqual((take(tb), take(ta)), (b"a" * 600, b"b" * 400))
        self.assertFalse(ta.disconnecting or tb.disconnecting, "exactly the cap is allowed")
        a.dataReceived(b"!")
        self.assertEqual((ta.value(), tb.value()), (b"", b""), "the excess is not forwarded")
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        self.assertEqual(h.server.sessions, 0)
        lose(a)
        lose(b)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_rate_pauses_both_sources_and_the_clock_resumes_them(self):
        h, a, ta, b, tb = self.paired(rate=1000)
        a.dataReceived(b"x" * 500)  # half a second's worth, at once
        self.assertEqual(tb.value(), b"x" * 500, "what was read is forwarded")
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "paused"))
        h.clock.advance(0.49)
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "paused"))
        h.clock.advance(0.02)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        # Within the allowance: no pause.
        h.clock.advance(1.0)
        b.dataReceived(b"y" * 100)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))

    def test_rate_over_time(self):
        """Sending as fast as allowed, the average stays at the rate."""
        h, a, ta, b, tb = self.paired(rate=10_000)
        forwarded = 0
        start = h.clock.seconds()
        while h.clock.seconds() - start < 5:
            if ta.producerState == "producing":
                a.dataReceived(b"z" * 4096)
                forwarded += 4096
            else:
                h.clock.advance(0.01)
        elapsed = h.clock.seconds() - start
        self.assertLessEqual(forwarded, 10_000 * elapsed + 4096)
        self.assertGreaterEqual(forwarded, 10_000 * elapsed * 0.8)
        self.assertEqual(len(take(tb)), forwarded)

    def test_rate_resume_keeps_flow_control_pause(self):
        h, a, ta, b, tb = self.paired(rate=1000)
        tb.producer.pauseProducing()   # b's output is full
        a.dataReceived(b"x" * 500)
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "paused"))
        h.clock.advance(1)
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "producing"))
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")

    def test_rate_timer_cancelled_when_the_session_ends(self):
        h, a, ta, b, tb = self.paired(rate=10)
        a.dataReceived(b"x" * 1000)  # 100 s ahead
        lose(a)
        lose(b)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_idle_timeout_closes_both(self):
        h, a, ta, b, tb = self.paired(idle_timeout=10)
        h.clock.advance(9)
        a.dataReceived(b"keep")      # traffic restarts the idle clock
        h.clock.advance(9.9)
        self.assertFalse(ta.disconnecting or tb.disconnecting)
        b.dataReceived(b"alive")
        h.clock.advance(9.9)
        self.assertFalse(ta.disconnecting or tb.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        self.assertEqual(h.server.sessions, 0)
        self.assertEqual((take(tb), take(ta)), (b"keep", b"alive"))
        lose(a)
        lose(b)
        self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))

    def test_ended_session_connections_are_aborted_if_the_close_stalls(self):
        # Regression: _Splice.end() (p2pft/relay.py, end) only called loseConnection
        # on both members.  A member that stops reading keeps the relay's
        # write buffer full, so the close never completes: its socket and
        # its per-address slot (RelayServer._per_ip, released only in
        # connectionLost) are held for ever.  relayRefuse() and the
        # rendezvous server's refuse() both abort after a 10 s grace
        # period; end() should too.
        h, a, ta, b, tb = self.paired(idle_timeout=10)
        b.dataReceived(b"x" * 100_000)   # a's reader is stuck; nothing more moves
        h.clock.advance(10)              # the idle timeout ends the session
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        h.clock.advance(60)              # a's close has not completed by now
        self.assertTrue(ta.disconnected, "a stalled member is aborted after a grace period")
        self.assertTrue(tb.disconnected)

    def test_close_from_either_side_closes_the_other(self):
        for first in (0, 1):
            with self.subTest(first=first):
                h, a, ta, b, tb = self.paired()
                members = [(a, ta), (b, tb)]
                gone, gone_t = members[first]
                other, other_t = members[1 - first]
                lose(gone)
                self.assertTrue(other_t.disconnecting)
                self.assertFalse(other_t.disconnected, "closed gracefully, pending bytes flushed")
                self.assertIsNone(other_t.producer)
                lose(other)
                self.assertEqual((h.server.sessions, per_ip(h.server)), (0, {}))


# ---------------------------------------------------------------------------
# the RELAY line on a rendezvous port


def welcome_then(transport) -> list[bytes]:
    return take(transport).split(b"\n")


class RendezvousPortTests(SynchronousTestCase):
    def harness(self, relay=True, relays=()):
        clock = Clock()
        factory = RendezvousServerFactory(
            clock, relay=RelayServer(clock, RelayLimits()) if relay else None, relays=relays)
        port = [50000]

        def connect(host="203.0.113.5"):
            port[0] += 1
            proto = factory.buildProtocol(IPv4Address("TCP", host, port[0]))
            t = Transport(host, port[0])
            proto.makeConnection(t)
            return proto, t

        return clock, factory, connect

    def test_relay_as_first_line(self):
        clock, factory, connect = self.harness(relays=("*",))
        a, ta = connect()
        self.assertEqual(factory.state.connections, 1)
        self.assertIs(ta.producer, a, "the rendezvous protocol is its own output's producer")
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        self.assertEqual(factory.state.connections, 0, "a relay leg is not a rendezvous client")
        self.assertEqual(factory.relay.sessions, 1)
        self.assertEqual(take(ta), b"WELCOME p2pft 1 203.0.113.5 50001 *\n")
        b, tb = connect("203.0.113.6")
        b.dataReceived(f"RELAY {TOKEN} receiver\n".encode())
        self.assertEqual(take(tb), b"WELCOME p2pft 1 203.0.113.6 50002 *\nOK\n")
        self.assertEqual(take(ta), b"OK\n")
        self.assertEqual(factory.state.connections, 0)
        self.assertEqual(factory.relay.spliced, 1)
        # The splice replaced the rendezvous protocol as producer.
        self.assertIsNot(ta.producer, a)
        self.assertIsNot(tb.producer, b)
        a.dataReceived(PAYLOAD)
        self.assertEqual(take(tb), PAYLOAD)
        b.dataReceived(PAYLOAD[::-1])
        self.assertEqual(take(ta), PAYLOAD[::-1])
        # No rendezvous timer (hello timeout) fires on a relay leg.
        clock.advance(61)
        self.assertFalse(ta.disconnecting or tb.disconnecting)
        # Flow control works the same on this port.
        tb.producer.pauseProducing()
        self.assertEqual(ta.producerState, "paused")
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")
        lose(a)
        self.assertTrue(tb.disconnecting)
        lose(b)
        self.assertEqual((factory.relay.sessions, per_ip(factory.relay)), (0, {}))
        self.assertEqual(factory.state.connections, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_relay_leg_meets_standalone_style_leg_rules(self):
        clock, factory, connect = self.harness()
        a, ta = connect()
        take(ta)
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        c, tc = connect()
        take(tc)
        c.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        self.assertEqual(tc.value(), b"ERROR this session already has a sender\n")
        a.dataReceived(b"early")
        self.assertEqual(ta.value(), b"ERROR data before OK\n")
        m, tm = connect()
        take(tm)
        m.dataReceived(b"RELAY nothex sender\n")
        self.assertEqual(tm.value(), b"ERROR malformed RELAY line\n")
        self.assertEqual(factory.state.connections, 0)
        for p in (a, c, m):
            lose(p)
        self.assertEqual((factory.relay.sessions, per_ip(factory.relay)), (0, {}))

    def test_relay_waiting_timeout_on_rendezvous_port(self):
        clock, factory, connect = self.harness()
        a, ta = connect()
        take(ta)
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        clock.advance(60.1)
        self.assertEqual(ta.value(), b"ERROR the other side never came\n")
        self.assertTrue(ta.disconnecting)
        lose(a)
        self.assertEqual(factory.relay.sessions, 0)

    def test_without_relay_relay_is_an_unknown_command(self):
        clock, factory, connect = self.harness(relay=False)
        a, ta = connect()
        self.assertEqual(take(ta), b"WELCOME p2pft 1 203.0.113.5 50001 -\n")
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        self.assertEqual(ta.value(), b"ERROR unknown command 'RELAY'\n")
        self.assertTrue(ta.disconnecting)
        self.assertEqual(factory.state.connections, 0)

    def test_relay_after_a_rendezvous_command_is_refused(self):
        # Regression: docs/PROTOCOL.md says RELAY is accepted "only as the first
        # line", but RendezvousServerProtocol.lineReceived
        # (p2pft/rendezvous.py, the `command == "RELAY"` branch) accepts it
        # at any time: a client that already holds a nameplate (or is
        # paired) silently turns into a relay leg.  Suggested fix: remember
        # that a line was received (e.g. self._lines += 1 at the top of
        # lineReceived) and only take RELAY as the first one; refuse it
        # otherwise ("RELAY must be the first line").
        clock, factory, connect = self.harness()
        a, ta = connect()
        a.dataReceived(b"ALLOCATE\n")
        self.assertEqual(welcome_then(ta)[1], b"NAMEPLATE 1")
        a.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        self.assertEqual(factory.relay.sessions, 0, "RELAY after ALLOCATE must not be admitted")
        self.assertTrue(ta.value().startswith(b"ERROR "), ta.value())

    def test_welcome_advertises_relays(self):
        for relay, relays, expected in (
            (False, (), "-"),
            (True, ("*",), "*"),
            (True, ("*", "192.0.2.7:9001"), "*,192.0.2.7:9001"),
            (False, ("192.0.2.7:9001", "[2001:db8::1]:9001"), "192.0.2.7:9001,[2001:db8::1]:9001"),
        ):
            with self.subTest(relays=relays):
                clock, factory, connect = self.harness(relay=relay, relays=relays)
                a, ta = connect()
                self.assertEqual(ta.value(), f"WELCOME p2pft 1 203.0.113.5 50001 {expected}\n".encode())


class ConnectionCountTests(SynchronousTestCase):
    def test_idle_connections_count_against_their_address(self):
        """Connections that never send RELAY are capped per address too."""
        clock = Clock()
        factory = RelayFactory(clock, RelayLimits(max_per_ip=2))
        transports = []
        for _ in range(3):
            p = factory.buildProtocol(None)
            t = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.8", 1234))
            p.makeConnection(t)
            transports.append((p, t))
        self.assertFalse(transports[0][1].disconnecting)
        self.assertTrue(transports[2][1].value().startswith(b"ERROR too many relay connections"))
        self.assertEqual(per_ip(factory.relay), {"198.51.100.8": 2})
        for p, t in transports:
            p.connectionLost(None)
        self.assertEqual(per_ip(factory.relay), {})

    def test_ipv6_addresses_count_per_64(self):
        from p2pft.addresses import ip_key

        self.assertEqual(ip_key("2001:db8:1:2::5"), ip_key("2001:db8:1:2:ffff::9"))
        self.assertNotEqual(ip_key("2001:db8:1:2::5"), ip_key("2001:db8:1:3::5"))
        self.assertEqual(ip_key("::ffff:198.51.100.8"), "198.51.100.8")
        self.assertEqual(ip_key("198.51.100.8"), "198.51.100.8")


# ---------------------------------------------------------------------------
# real sockets on loopback


DEADLINE = 15.0


class _Leg(protocol.Protocol):
    """A plain relay client: sends RELAY, waits for OK, collects bytes."""

    def __init__(self, token: str, side: str, expect: int):
        self.token, self.side, self.expect = token, side, expect
        self.ok = defer.Deferred()
        self.complete = defer.Deferred()
        self.closed = defer.Deferred()
        self.buffer = b""
        self.received = bytearray()
        self._ok = False

    def connectionMade(self):
        self.transport.write(f"RELAY {self.token} {self.side}\n".encode())

    def dataReceived(self, data):
        if not self._ok:
            self.buffer += data
            line, nl, rest = self.buffer.partition(b"\n")
            if not nl:
                return
            self._ok = True
            self.ok.callback(line)
            data = rest
        self.received += data
        if len(self.received) >= self.expect and not self.complete.called:
            self.complete.callback(bytes(self.received))

    def connectionLost(self, reason=None):
        if not self.ok.called:
            self.ok.errback(reason)
        self.closed.callback(None)


def bounded(d: defer.Deferred, what: str, seconds: float = DEADLINE) -> defer.Deferred:
    def timed_out(f):
        f.trap(defer.TimeoutError)
        raise AssertionError(f"{what}: not within {seconds} s")

    return d.addTimeout(seconds, reactor).addErrback(timed_out)


class LoopbackRelayTests(TestCase):
    timeout = 60
    def listen(self, factory):
        """Listen on 127.0.0.1, port 0.  The relay's server-side protocols
        are recorded in C{self.built} as they are made; when the test ends
        the port is closed and every one of them is gone."""
        self.built = built = []
        original = factory.buildProtocol

        def buildProtocol(addr):
            p = original(addr)
            p.lost = lost = defer.Deferred()
            connectionLost = p.connectionLost

            def lost_and_told(reason=None):
                try:
                    connectionLost(reason)
                finally:
                    lost.callback(None)

            p.connectionLost = lost_and_told
            built.append(p)
            return p

        factory.buildProtocol = buildProtocol
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def down():
            await port.stopListening()
            for p in built:
                if not p.lost.called:
                    p.transport.abortConnection()
            await bounded(defer.DeferredList([p.lost for p in built]), "relay connections close")

        self.addCleanup(lambda: defer.ensureDeferred(down()))
        return port.getHost().port

    async def all_lost(self):
        await bounded(defer.DeferredList([p.lost for p in self.built]), "relay connections close")

    async def leg(self, port, side, expect, token=TOKEN):
        leg = _Leg(token, side, expect)
        connected = defer.Deferred()

        class F(protocol.ClientFactory):
            def buildProtocol(self, addr):
                reactor.callLater(0, connected.callback, leg)
                return leg

            def clientConnectionFailed(self, connector, reason):
                connected.errback(reason)

        reactor.connectTCP("127.0.0.1", port, F(), timeout=5)
        await bounded(connected, f"{side} connects")

        def close():
            leg.ok.addErrback(lambda f: None)  # a leg that never got OK
            leg.transport.abortConnection()
            return leg.closed

        self.addCleanup(close)
        return leg

    async def test_splice_over_real_sockets_both_ways(self):
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        up, down = os.urandom(3 * 1024 * 1024 + 5), os.urandom(2 * 1024 * 1024 + 11)
        a = await self.leg(port, "sender", len(down))
        b = await self.leg(port, "receiver", len(up))
        self.assertEqual(await bounded(a.ok, "a OK"), b"OK")
        self.assertEqual(await bounded(b.ok, "b OK"), b"OK")
        a.transport.write(up)
        b.transport.write(down)
        self.assertEqual(await bounded(b.complete, "b receives"), up)
        self.assertEqual(await bounded(a.complete, "a receives"), down)
        self.assertEqual((factory.relay.sessions, factory.relay.spliced), (1, 1))
        # The relay's spliced legs forward small records at once (no Nagle).
        self.assertEqual([p.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                          for p in self.built], [1, 1])
        # One side closes: the relay passes the FIN on (b sees the end of
        # the stream), and once both directions are done the session ends
        # and the counts drop to zero.
        a.transport.loseConnection()
        await bounded(b.closed, "the relay closes b")
        await bounded(a.closed, "a closed")
        await self.all_lost()
        self.assertEqual(factory.relay.sessions, 0)
        self.assertEqual(per_ip(factory.relay), {})

    async def test_slow_reader_pauses_the_writer_over_real_sockets(self):
        """b stops reading: the relay stops reading a instead of buffering
        what a sends; when b reads again, every byte arrives in order.
        (Bytes moved through Twisted: see the zero-copy test for the
        kernel's way.)"""
        self.patch(zerocopy, "available", lambda *transports: False)
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        paused = defer.Deferred()
        original = splice_module._Direction.pauseProducing

        def pauseProducing(direction):
            original(direction)
            if not paused.called:
                paused.callback(direction)

        self.patch(splice_module._Direction, "pauseProducing", pauseProducing)
        data = os.urandom(32 * 1024 * 1024)
        a = await self.leg(port, "sender", 0)
        b = await self.leg(port, "receiver", len(data))
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        b.transport.pauseProducing()        # b's application stops reading
        a.transport.write(data)
        direction = await bounded(paused, "the relay pauses a")
        relay_a, relay_b = self.built
        self.assertIs(direction.src.transport, relay_a.transport)
        self.assertIs(direction.dst.transport, relay_b.transport)
        # The relay's own buffer towards b stays small (Twisted's write
        # buffer is private; inspected here on purpose).
        t = relay_b.transport
        buffered = len(t.dataBuffer) - t.offset + t._tempDataLen
        self.assertLess(buffered, 1024 * 1024, "relay buffered without bound")
        self.assertNotIn(relay_a.transport, reactor.getReaders(), "the relay still reads a")
        self.assertLess(len(b.received), len(data))
        b.transport.resumeProducing()
        self.assertEqual(await bounded(b.complete, "b receives everything", 30), data)
        self.assertIn(relay_a.transport, reactor.getReaders(), "a is read again")

    async def held_idle_session(self):
        """a and b spliced through a relay that cuts idle sessions after
        0.5 s; b stops reading and a sends 16 MiB: (a, b, the
        L{zerocopy.ZeroCopy} whose pipe holds bytes for b)."""
        port = self.listen(RelayFactory(reactor, RelayLimits(idle_timeout=0.5)))
        a = await self.leg(port, "sender", 0)
        b = await self.leg(port, "receiver", 1 << 40)
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        held = self.held_pipe()
        b.transport.pauseProducing()
        a.transport.write(b"A" * (16 << 20))
        return a, b, await bounded(held, "a pipe holds bytes for b")

    def held_pipe(self) -> defer.Deferred:
        """Fires with the first L{zerocopy.ZeroCopy} whose pipe holds bytes
        its destination has not taken yet."""
        held = defer.Deferred()
        update = zerocopy.ZeroCopy.update

        def hooked(zc):
            update(zc)
            if zc.in_pipe and not held.called:
                held.callback(zc)

        self.patch(zerocopy.ZeroCopy, "update", hooked)
        return held

    async def test_zero_copy_slow_reader_and_limits(self):
        """The kernel moves the bytes (splice through a pipe): b stops
        reading and the relay stops reading a with at most a pipe's worth
        held; every byte arrives in order once b reads again, both ways;
        and the session's byte cap still counts every byte."""
        self.assertTrue(hasattr(os, "splice"))
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        held = self.held_pipe()
        data, back = os.urandom(32 * 1024 * 1024), os.urandom(3 * 1024 * 1024 + 1)
        a = await self.leg(port, "sender", len(back))
        b = await self.leg(port, "receiver", len(data))
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        relay_a, relay_b = self.built
        b.transport.pauseProducing()        # b's application stops reading
        a.transport.write(data)
        zc = await bounded(held, "the relay holds bytes for b")
        self.assertLessEqual(zc.in_pipe, zerocopy.PIPE_SIZES[0])
        self.assertNotIn(relay_a.transport, reactor.getReaders(), "the relay still reads a")
        t = relay_b.transport
        self.assertEqual(len(t.dataBuffer) - t.offset + t._tempDataLen, 0)  # nothing copied into Twisted
        b.transport.resumeProducing()
        b.transport.write(back)
        self.assertEqual(await bounded(b.complete, "b receives everything", 30), data)
        self.assertEqual(await bounded(a.complete, "a receives everything", 30), back)

    async def test_zero_copy_byte_cap_closes_promptly(self):
        """A session cut for its byte cap while bytes wait in a pipe: the
        relay closes the legs at once (not by spinning on a writable socket
        until the close grace aborts them)."""
        calls = []
        original = zerocopy.ZeroCopy.doWrite
        self.patch(zerocopy.ZeroCopy, "doWrite", lambda zc: calls.append(1) or original(zc))
        factory = RelayFactory(reactor, RelayLimits(max_bytes=5 * 1024 * 1024))
        port = self.listen(factory)
        a = await self.leg(port, "sender", 0)
        b = await self.leg(port, "receiver", 10 * 1024 * 1024)
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        a.transport.write(os.urandom(10 * 1024 * 1024))
        await bounded(b.closed, "the relay cuts b", 5)  # CLOSE_GRACE is 10 s
        self.assertLess(len(calls), 1000)

    async def test_zero_copy_pipes_go_with_their_direction(self):
        """When a splice ends (here: idle) while one direction's pipe holds
        bytes, each direction's pipe is let go with its own connections,
        and the transports get their own reads and writes back: nothing is
        ever spliced through a descriptor that was closed (and may belong
        to another session by then)."""
        made = []
        original = zerocopy.ZeroCopy.install
        self.patch(zerocopy.ZeroCopy, "install", lambda zc: made.append(zc) or original(zc))
        a, b, forward = await self.held_idle_session()
        await bounded(a.closed, "the relay cuts a (idle)")
        b.transport.resumeProducing()
        await bounded(b.closed, "the relay cuts b (idle)", 15)
        self.assertLessEqual(len(b.received), 16 << 20)
        self.assertEqual(bytes(b.received), b"A" * len(b.received))  # only ever this session's bytes
        for zc in made:
            self.assertTrue(zc._closed)
            self.assertEqual(zc.in_pipe, 0)
            self.assertNotIn("doRead", zc._src.__dict__)
            self.assertNotIn("doWrite", zc._dst.__dict__)
        self.assertIn(forward, made)

    async def test_close_waits_for_the_pipe_behind_twisteds_own_bytes(self):
        """A splice ends (idle) while Twisted holds bytes of its own for b
        and the pipe holds more behind them: b still gets every byte the
        relay read, then the close."""
        carried = []
        carry = splice_module.Session.carry
        self.patch(splice_module.Session, "carry", lambda session, src, n: carried.append(n) or carry(session, src, n))
        a, b, _ = await self.held_idle_session()
        _, relay_b = self.built
        relay_b.transport.write(b"A" * 300_000)  # (as data forwarded before the pipes took over would be)
        await bounded(a.closed, "the relay cuts a (idle)")
        b.transport.resumeProducing()
        await bounded(b.closed, "the relay closes b", 15)
        self.assertEqual(len(b.received), sum(carried) + 300_000)

    async def test_out_of_descriptors_for_pipes_falls_back(self):
        """No descriptors left for the pipes: the splice moves the bytes
        through Twisted instead, and nothing is lost."""
        def no_pipes(flags):
            raise OSError(24, "Too many open files")
        self.patch(zerocopy.os, "pipe2", no_pipes)
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        data = os.urandom(3 * 1024 * 1024 + 7)
        a = await self.leg(port, "sender", 0)
        b = await self.leg(port, "receiver", len(data))
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        a.transport.write(data)
        self.assertEqual(await bounded(b.complete, "b receives everything"), data)

    async def test_zero_copy_byte_cap(self):
        """The byte cap cuts a session whose bytes the kernel moves, too."""
        factory = RelayFactory(reactor, RelayLimits(max_bytes=5 * 1024 * 1024))
        port = self.listen(factory)
        a = await self.leg(port, "sender", 0)
        b = await self.leg(port, "receiver", 10 * 1024 * 1024)
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        a.transport.write(os.urandom(10 * 1024 * 1024))
        await bounded(b.closed, "the relay cuts b")
        await bounded(a.closed, "the relay cuts a")
        self.assertLessEqual(len(b.received), 5 * 1024 * 1024 + 3)  # (+ "OK\n")


@implementer(IHalfCloseableProtocol)
class _HalfCloseLeg(_Leg):
    """A leg that sees the end of the other side's stream (not a close)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.eof = defer.Deferred()

    def readConnectionLost(self):
        self.eof.callback(bytes(self.received))

    def writeConnectionLost(self):
        pass


class HalfCloseTests(TestCase):
    timeout = 60
    listen = LoopbackRelayTests.listen
    leg = LoopbackRelayTests.leg
    all_lost = LoopbackRelayTests.all_lost

    async def test_last_words_then_half_close_are_delivered(self):
        """
        a sends its last record and shuts its sending side (what a peer
        does after an ABORT or ACK); b gets every byte and then the end of
        the stream -- not a reset -- and can still answer; the session ends
        once b closes too.
        """
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        last_words = os.urandom(200_000)
        a = await self.leg(port, "sender", 6)
        b = _HalfCloseLeg(TOKEN, "receiver", len(last_words))
        connected = defer.Deferred()

        class F(protocol.ClientFactory):
            def buildProtocol(self, addr):
                reactor.callLater(0, connected.callback, None)
                return b

        reactor.connectTCP("127.0.0.1", port, F())
        await bounded(connected, "b connects")
        await bounded(a.ok, "a OK")
        await bounded(b.ok, "b OK")
        a.transport.write(last_words)
        a.transport.loseWriteConnection()
        self.assertEqual(await bounded(b.eof, "b sees the end of the stream"), last_words)
        b.transport.write(b"answer")
        self.assertEqual(await bounded(a.complete, "a still hears b"), b"answer")
        self.assertEqual(factory.relay.sessions, 1)
        b.transport.loseConnection()
        await bounded(a.closed, "a closed")
        await self.all_lost()
        self.assertEqual(factory.relay.sessions, 0)
        self.assertEqual(per_ip(factory.relay), {})


class LegInterfaceTests(SynchronousTestCase):
    def test_transport_leg_provides_the_relay_leg_interface(self):
        """The relay reaches connections only through IRelayLeg; its TCP
        adapter provides all of it."""
        from zope.interface.verify import verifyObject

        from p2pft.server.splice import IRelayLeg, TransportLeg

        self.assertTrue(verifyObject(IRelayLeg, TransportLeg(Transport("198.51.100.1", 1))))


class PipeBudgetTests(SynchronousTestCase):
    def test_large_pipes_then_smaller_then_none(self):
        """The relay keeps its pipes to its budget (half the user's pipe
        allowance): 1 MiB pipes while they fit, then 256 KiB, then none
        (that splice moves bytes through Twisted)."""
        budget = zerocopy._Budget()
        self.patch(budget, "_start", lambda: 2 * 1024 * 1024 + 512 * 1024)
        sizes = [budget.take() for _ in range(5)]
        self.assertEqual(sizes, [1 << 20, 1 << 20, 256 << 10, 256 << 10, None])
        budget.give(1 << 20)
        self.assertEqual(budget.take(), 1 << 20)
