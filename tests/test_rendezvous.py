"""
The rendezvous client (L{p2pft.rendezvous}) and the wire helpers, without
sockets; the client against the real server in memory.  The server's own
tests are in tests/test_server_rendezvous.py.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2pft.rendezvous import (
    PeerGone,
    RendezvousClientProtocol,
    RendezvousError,
    decode_payload,
    encode_payload,
    parse_server,
)
from p2pft.addresses import normalise_host
from tests.test_server_rendezvous import ServerHarness


class ClientServerTests(SynchronousTestCase):
    """The real client against the real server, in memory."""

    def setUp(self):
        self.h = ServerHarness()

    def pair(self):
        clients = []
        pumps = []
        for port in (1111, 2222):
            client = RendezvousClientProtocol()
            server = self.h.factory.buildProtocol(None)
            ct = iosim.FakeTransport(client, isServer=False, hostAddress=IPv4Address("TCP", "10.0.0.2", port))
            st = iosim.FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", "198.51.100.1", port + 1))
            pump = iosim.connect(server, st, client, ct)
            clients.append(client)
            pumps.append(pump)
        return clients, pumps

    def flush(self, pumps):
        for _ in range(3):
            for p in pumps:
                p.flush()

    def test_full_exchange(self):
        (a, b), pumps = self.pair()
        self.flush(pumps)
        self.assertEqual(self.successResultOf(a.welcomed()), ("198.51.100.1", 1112))
        d = a.allocate()
        self.flush(pumps)
        nameplate = self.successResultOf(d)
        b.claim(nameplate)
        self.flush(pumps)
        self.successResultOf(a.paired())
        self.successResultOf(b.paired())
        self.assertEqual((a.partner, b.partner), (("198.51.100.1", 2223), ("198.51.100.1", 1112)))
        got = b.receive()
        self.assertNoResult(got)
        a.send(b"hello")
        a.send(b"world")
        self.flush(pumps)
        self.assertEqual(self.successResultOf(got), b"hello")
        self.assertEqual(self.successResultOf(b.receive()), b"world")

    def test_paired_from_an_older_server_or_malformed(self):
        for line, partner in [(b"PAIRED", None), (b"PAIRED 203.0.113.5 4000", ("203.0.113.5", 4000)),
                              (b"PAIRED 203.0.113.5", None), (b"PAIRED 203.0.113.5 0", None),
                              (b"PAIRED fe80::1%eth0 4000", None), (b"PAIRED name 4000", None),
                              (b"PAIRED 2001:db8::1 65535", ("2001:db8::1", 65535))]:
            c = RendezvousClientProtocol()
            c.makeConnection(StringTransport())
            c.lineReceived(line)
            self.successResultOf(c.paired())
            self.assertEqual(c.partner, partner, line)

    def test_error_fails_pending(self):
        (a, b), pumps = self.pair()
        self.flush(pumps)
        a.claim("0")
        got = a.receive()
        self.flush(pumps)
        f = self.failureResultOf(a.paired(), RendezvousError)
        self.assertIn("invalid nameplate", str(f.value))
        self.failureResultOf(got, RendezvousError)
        self.failureResultOf(a.receive(), RendezvousError)

    def test_partner_leaving_reports_gone(self):
        (a, b), pumps = self.pair()
        self.flush(pumps)
        a.claim("8")
        b.claim("8")
        self.flush(pumps)
        got = a.receive()
        b.transport.loseConnection()
        self.flush(pumps)
        self.failureResultOf(got, PeerGone)

    def test_client_rejects_other_servers(self):
        c = RendezvousClientProtocol()
        t = StringTransport()
        c.makeConnection(t)
        c.dataReceived(b"WELCOME other 1 1.2.3.4 5\n")
        self.failureResultOf(c.welcomed(), RendezvousError)
        self.assertTrue(t.disconnecting)
        c2 = RendezvousClientProtocol()
        t2 = StringTransport()
        c2.makeConnection(t2)
        c2.dataReceived(b"SSH-2.0-OpenSSH\n")
        f = self.failureResultOf(c2.welcomed(), RendezvousError)
        self.assertIn("unknown", str(f.value))

    def test_client_refuses_oversized_message(self):
        c = RendezvousClientProtocol()
        c.makeConnection(StringTransport())
        self.assertRaises(ValueError, c.send, b"x" * 5000)


class HelperTests(SynchronousTestCase):
    def test_parse_server(self):
        self.assertEqual(parse_server("example.org:9000"), ("example.org", 9000))
        self.assertEqual(parse_server("[2001:db8::1]:9000"), ("2001:db8::1", 9000))
        for bad in ("example.org", "a:b", ":9000", "h:0", "h:70000", "2001:db8::1:9000"):
            self.assertRaises(ValueError, parse_server, bad)

    def test_payload_roundtrip_and_limits(self):
        self.assertEqual(decode_payload(encode_payload(b"\x00\x01")), b"\x00\x01")
        self.assertRaises(ValueError, decode_payload, "a" * 10000)
        self.assertRaises(ValueError, decode_payload, "a b")

    def test_normalise_host(self):
        self.assertEqual(normalise_host("::ffff:10.1.2.3"), "10.1.2.3")
        self.assertEqual(normalise_host("2001:db8::1"), "2001:db8::1")
        self.assertEqual(normalise_host("10.1.2.3"), "10.1.2.3")
