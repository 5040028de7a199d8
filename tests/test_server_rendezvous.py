"""
The rendezvous server (L{p2pft.server.rendezvous}) through its protocol,
on a fake clock and in-memory transports: pairing, timeouts, refusals, and
one misbehaving client against the others.
"""

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2pft.rendezvous import MAX_LINE, encode_payload
from p2pft.server.rendezvous import MAX_MESSAGES, RendezvousServerFactory


class ServerHarness:
    """A rendezvous server factory plus helpers to attach fake clients."""

    def __init__(self, **options):
        self.clock = Clock()
        self.factory = RendezvousServerFactory(self.clock, **options)
        self.state = self.factory.state

    def connect(self, host="203.0.113.5", port=40000, v6=False):
        proto = self.factory.buildProtocol(None)
        addr = IPv6Address("TCP", host, port) if v6 else IPv4Address("TCP", host, port)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport


def lines(transport) -> list[str]:
    data = transport.value().decode("utf-8")
    transport.clear()
    # PAIRED's fields (the partner's address) are checked where they matter.
    return [line.split(" ")[0] if line.startswith("PAIRED ") else line for line in data.split("\n") if line]


def send(proto, text: str):
    proto.dataReceived(text.encode("utf-8") + b"\n")


class ServerProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.h = ServerHarness(hello_timeout=30, waiting_timeout=100, paired_timeout=50)

    def test_welcome_reports_observed_address(self):
        _, t = self.h.connect("198.51.100.7", 5555)
        self.assertEqual(lines(t), ["WELCOME p2pft 1 198.51.100.7 5555 -"])

    def test_welcome_unmaps_ipv4_mapped_ipv6(self):
        _, t = self.h.connect("::ffff:198.51.100.7", 5555, v6=True)
        self.assertEqual(lines(t), ["WELCOME p2pft 1 198.51.100.7 5555 -"])

    def test_allocate_then_claim_pairs_both(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect(port=40001)
        lines(ta), lines(tb)
        send(a, "ALLOCATE")
        self.assertEqual(lines(ta), ["NAMEPLATE 1"])
        send(b, "CLAIM 1")
        self.assertEqual(lines(ta), ["PAIRED"])
        self.assertEqual(lines(tb), ["PAIRED"])
        self.assertEqual(self.h.state.pairings, 1)

    def test_paired_tells_each_where_the_server_sees_the_other(self):
        a, ta = self.h.connect("198.51.100.7", 5555)
        b, tb = self.h.connect("203.0.113.9", 40001)
        ta.clear(), tb.clear()
        send(a, "ALLOCATE")
        ta.clear()
        send(b, "CLAIM 1")
        self.assertEqual(ta.value(), b"PAIRED 203.0.113.9 40001\n")
        self.assertEqual(tb.value(), b"PAIRED 198.51.100.7 5555\n")

    def test_allocations_are_distinct_and_reused_after_free(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "ALLOCATE")
        send(b, "ALLOCATE")
        self.assertIn("NAMEPLATE 1", lines(ta))
        self.assertIn("NAMEPLATE 2", lines(tb))
        a.connectionLost(None)
        self.assertEqual(self.h.state.nameplates, {"2"})
        c, tc = self.h.connect()
        send(c, "ALLOCATE")
        self.assertIn("NAMEPLATE 1", lines(tc))

    def test_claim_creates_nameplate_for_chosen_code(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "CLAIM 77")
        self.assertEqual(self.h.state.nameplates, {"77"})
        send(b, "CLAIM 77")
        self.assertEqual(lines(ta)[-1], "PAIRED")
        self.assertEqual(lines(tb)[-1], "PAIRED")

    def test_messages_are_forwarded_to_the_partner_only(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        c, tc = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        send(c, "CLAIM 4")
        for t in (ta, tb, tc):
            lines(t)
        payload = encode_payload(b"\x00opaque\xff")
        send(a, f"MSG {payload}")
        self.assertEqual(lines(tb), [f"MSG {payload}"])
        self.assertEqual(lines(ta), [])
        self.assertEqual(lines(tc), [])

    def test_third_peer_is_refused_and_pair_unaffected(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        c, tc = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta), lines(tb), lines(tc)
        send(c, "CLAIM 3")
        self.assertEqual(lines(tc), ["ERROR nameplate 3 is in use"])
        self.assertTrue(tc.disconnecting)
        c.connectionLost(None)
        send(a, f"MSG {encode_payload(b'hi')}")
        self.assertEqual(lines(tb), [f"MSG {encode_payload(b'hi')}"])
        self.assertFalse(ta.disconnecting or tb.disconnecting)

    def test_empty_seat_of_a_broken_pair_cannot_be_taken(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta)
        b.connectionLost(None)
        self.assertEqual(lines(ta), ["GONE"])
        c, tc = self.h.connect()
        lines(tc)
        send(c, "CLAIM 3")
        self.assertEqual(lines(tc), ["ERROR nameplate 3 is in use"])
        a.connectionLost(None)
        self.assertEqual(self.h.state.nameplates, frozenset())

    def test_waiting_peer_vanishing_frees_nameplate(self):
        a, ta = self.h.connect()
        send(a, "ALLOCATE")
        a.connectionLost(None)
        self.assertEqual(self.h.state.nameplates, frozenset())
        self.assertEqual(self.h.state.connections, 0)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_bad_input_gets_error_and_close(self):
        cases = [
            (b"FROB\n", "ERROR unknown command 'FROB'"),
            (b"ALLOCATE extra\n", "ERROR unknown command 'ALLOCATE'"),
            (b"CLAIM\n", "ERROR unknown command 'CLAIM'"),
            (b"CLAIM abc\n", "ERROR invalid nameplate"),
            (b"CLAIM 0\n", "ERROR invalid nameplate"),
            (b"\xff\xfe\n", "ERROR line is not UTF-8"),
            (b"MSG aGk=\n", "ERROR MSG before PAIRED"),
            (b"A" * (MAX_LINE + 10), "ERROR line too long"),
        ]
        for data, expected in cases:
            p, t = self.h.connect()
            lines(t)
            p.dataReceived(data)
            self.assertEqual(lines(t), [expected], data[:20])
            self.assertTrue(t.disconnecting)
            p.connectionLost(None)
        self.assertEqual(self.h.state.connections, 0)

    def test_malformed_payload_refused(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta), lines(tb)
        send(a, "MSG not*base64")
        self.assertEqual(lines(ta), ["ERROR malformed message payload"])
        self.assertEqual(lines(tb), ["GONE"])
        self.assertFalse(tb.disconnecting)

    def test_lines_after_refusal_are_ignored(self):
        a, ta = self.h.connect()
        lines(ta)
        a.dataReceived(b"NOPE\nALLOCATE\n")
        self.assertEqual(lines(ta), ["ERROR unknown command 'NOPE'"])
        self.assertEqual(self.h.state.nameplates, frozenset())

    def test_second_allocate_refused(self):
        a, ta = self.h.connect()
        send(a, "ALLOCATE")
        lines(ta)
        send(a, "CLAIM 9")
        self.assertEqual(lines(ta), ["ERROR already on a nameplate"])

    def test_message_flood_refused(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta)
        for _ in range(MAX_MESSAGES + 1):
            send(a, "MSG aGk=")
        self.assertEqual(lines(ta), ["ERROR too many messages"])

    def test_silent_client_times_out(self):
        a, ta = self.h.connect()
        lines(ta)
        self.h.clock.advance(29)
        self.assertFalse(ta.disconnecting)
        self.h.clock.advance(2)
        self.assertEqual(lines(ta), ["ERROR timed out waiting for ALLOCATE or CLAIM"])
        self.assertTrue(ta.disconnecting)

    def test_unclaimed_nameplate_times_out(self):
        a, ta = self.h.connect()
        send(a, "ALLOCATE")
        lines(ta)
        self.h.clock.advance(101)
        self.assertEqual(lines(ta), ["ERROR nobody claimed the nameplate in time"])
        a.connectionLost(None)
        self.assertEqual(self.h.state.nameplates, frozenset())

    def test_pair_times_out(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta), lines(tb)
        self.h.clock.advance(51)
        self.assertEqual(lines(ta), ["ERROR pairing lasted too long"])
        self.assertEqual(lines(tb), ["ERROR pairing lasted too long"])

    def test_refused_client_that_never_closes_is_aborted(self):
        a, ta = self.h.connect()
        send(a, "NOPE")
        self.assertTrue(ta.disconnecting)
        self.assertFalse(ta.disconnected)
        self.h.clock.advance(11)
        self.assertTrue(ta.disconnected)

    def test_ping(self):
        a, ta = self.h.connect()
        lines(ta)
        send(a, "PING 42")
        self.assertEqual(lines(ta), ["PONG 42"])

    def test_full_server_refuses(self):
        h = ServerHarness(max_nameplates=1)
        a, ta = h.connect()
        b, tb = h.connect()
        send(a, "ALLOCATE")
        lines(tb)
        send(b, "ALLOCATE")
        self.assertEqual(lines(tb), ["ERROR server is full, try again later"])
        c, tc = h.connect()
        lines(tc)
        send(c, "CLAIM 5")
        self.assertEqual(lines(tc), ["ERROR server is full, try again later"])


class ServerProtectionTests(SynchronousTestCase):
    """One misbehaving client cannot hurt the server or other clients."""

    def test_client_that_stops_reading_stops_being_read(self):
        h = ServerHarness()
        a, ta = h.connect()
        self.assertIs(ta.producer, a)
        self.assertTrue(ta.streaming)
        # The transport's buffer filled up: the server stops reading.
        a.pauseProducing()
        self.assertEqual(ta.producerState, "paused")
        a.resumeProducing()
        self.assertEqual(ta.producerState, "producing")

    def test_refused_client_is_not_read_again(self):
        h = ServerHarness()
        a, ta = h.connect()
        send(a, "NOPE")
        a.resumeProducing()
        self.assertIsNone(ta.producer)

    def test_per_ip_cap(self):
        h = ServerHarness(max_per_ip=2)
        p1, t1 = h.connect("198.51.100.9")
        p2, t2 = h.connect("198.51.100.9")
        p3, t3 = h.connect("198.51.100.9")
        self.assertEqual(lines(t3)[-1], "ERROR too many connections from your address")
        q, tq = h.connect("198.51.100.10")
        self.assertFalse(tq.disconnecting)
        p1.connectionLost(None)
        p4, t4 = h.connect("198.51.100.9")
        self.assertFalse(t4.disconnecting)
        self.assertFalse(t2.disconnecting)

    def test_global_cap(self):
        h = ServerHarness(max_connections=2)
        h.connect("198.51.100.1")
        h.connect("198.51.100.2")
        p, t = h.connect("198.51.100.3")
        self.assertEqual(lines(t)[-1], "ERROR server is busy, try again later")
        self.assertEqual(h.state.connections, 2)

    def test_refused_waiting_member_cannot_be_paired(self):
        h = ServerHarness()
        a, ta = h.connect()
        send(a, "CLAIM 5")
        send(a, "FROB")  # refused; has not closed yet
        b, tb = h.connect()
        lines(tb)
        send(b, "CLAIM 5")
        self.assertEqual(lines(tb), [])  # waiting alone on a fresh nameplate
        self.assertEqual(h.state.nameplates, {"5"})

    def test_abort_timer_cancelled_when_closed(self):
        h = ServerHarness()
        a, ta = h.connect()
        send(a, "NOPE")
        a.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_oversized_decoded_message_refused(self):
        h = ServerHarness()
        a, ta = h.connect()
        b, tb = h.connect()
        send(a, "CLAIM 3")
        send(b, "CLAIM 3")
        lines(ta)
        import base64
        send(a, "MSG " + base64.b64encode(b"x" * 4097).decode())
        self.assertEqual(lines(ta), ["ERROR message too large"])
