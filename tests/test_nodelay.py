"""
Nagle's algorithm is off (TCP_NODELAY) on every connection whose small
messages wait for each other: the rendezvous connection at both ends, the
peers' connections (direct and relayed), and a relay's spliced legs.  With
it on, a 1-byte file took 120 ms longer from offer to done on loopback
(two small records each waiting out the other side's 40 ms delayed ACK).

Real sockets on 127.0.0.1: the option is read back from the kernel.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pft.rendezvous import RendezvousClientFactory
from p2pft.server.rendezvous import RendezvousServerFactory
from p2pft.util import no_delay
from tests.test_server_relay import bounded


def nodelay(transport) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class HelperTests(SynchronousTestCase):
    def test_not_tcp_is_left_alone(self):
        """Tests' transports (and anything but TCP) have no such option."""
        no_delay(StringTransport())

    def test_closed_socket_is_left_alone(self):
        class Closed:
            def setTcpNoDelay(self, on):
                raise OSError(9, "Bad file descriptor")

        no_delay(Closed())


class RendezvousTests(TestCase):
    timeout = 30

    async def test_both_ends_of_the_rendezvous_connection(self):
        built = []
        factory = RendezvousServerFactory(reactor)
        build = factory.buildProtocol

        def buildServerProtocol(addr):
            server = build(addr)
            built.append(server)
            self.addCleanup(lambda: server.transport.abortConnection())
            return server

        factory.buildProtocol = buildServerProtocol
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        client_factory = RendezvousClientFactory(reactor)
        connected = defer.Deferred()
        build_client = client_factory.buildProtocol

        def buildProtocol(addr):
            client = build_client(addr)
            made = client.connectionMade

            def connectionMade():
                made()
                connected.callback(client)

            client.connectionMade = connectionMade
            return client

        client_factory.buildProtocol = buildProtocol
        reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory, timeout=5)
        client = await bounded(connected, "the client connects")
        self.addCleanup(client.transport.abortConnection)
        await bounded(client.welcomed(), "WELCOME")
        self.assertEqual(nodelay(client.transport), 1)
        self.assertEqual(len(built), 1)
        self.assertEqual(nodelay(built[0].transport), 1)
