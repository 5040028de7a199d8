"""
The punching connector: its schedule and tie-break on a fake reactor, and
real shared-port sockets on loopback.
"""

import socket

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from p2pft.channel import PeerConnection
from p2pft.punch import ICandidate, PunchConnector, PunchFailed, PunchSchedule
from p2pft.secure import RECEIVER, SENDER, Pake

SCHEDULE = PunchSchedule(redial=0.5, redial_refused=0.001, attempt_timeout=4, deadline=20,
                         handshake_timeout=10, relay_delay=2, relay_delay_refused=6)


@implementer(ICandidate)
class FakeCandidate(protocol.Protocol):
    def __init__(self, connector):
        self.connector = connector
        self.selected = False
        self.abandoned = False
        self.transport = StringTransport()

    def select(self):
        self.selected = True

    def abandon(self):
        self.abandoned = True


class ScheduleTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.built = []

    def factory(self, connector, relay=False):
        c = FakeCandidate(connector)
        self.built.append(c)
        return c

    def make(self, leader=True, candidates=(("198.51.100.1", 4000), ("10.0.0.2", 4000))):
        return PunchConnector(self.reactor, 5555, list(candidates), self.factory, leader, SCHEDULE)

    def fail_dial(self, index, reason=error.ConnectionRefusedError()):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(reason))

    def test_listens_and_dials_every_candidate_from_the_shared_port(self):
        self.make().run()
        listeners = [(b._address, b._port, b._reuseAddress, b._reusePort, i) for b, _, _, i in self.reactor.tcpServers]
        self.assertEqual(listeners, [("", 5555, True, True, ""), ("::", 5555, True, True, "::")])
        dials = [(h, p, t, b._port, b._reuseAddress, b._reusePort) for h, p, _, t, b in self.reactor.tcpClients]
        self.assertEqual(dials, [
            ("198.51.100.1", 4000, 4, 5555, True, True),
            ("10.0.0.2", 4000, 4, 5555, True, True),
        ])

    def test_duplicate_candidates_dialled_once(self):
        self.make(candidates=[("1.2.3.4", 1), ("1.2.3.4", 1)]).run()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_refused_attempt_redialled_soon_with_jitter(self):
        import random

        c = PunchConnector(self.reactor, 5555, [("1.2.3.4", 1)], self.factory, True, SCHEDULE,
                           rng=random.Random(7))
        c.run()
        delays = []
        for i in range(20):
            self.fail_dial(i)
            [call] = [d for d in self.reactor.getDelayedCalls() if d.getTime() - self.reactor.seconds() < 5]
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertTrue(all(0.001 <= d <= 0.002 for d in delays), delays)
        self.assertGreater(len(set(delays)), 10, "jittered")

    def test_icmp_unreachable_raced_like_a_reset(self):
        """
        A NAT answering our SYN with ICMP port unreachable (Twisted: a
        ConnectError wrapping ConnectionDone, seen in the lab) is racing us
        as much as one answering with a reset: redialled at the fast pace,
        counted, and said as such; a timeout or no route is not.
        """
        import random

        icmp = error.ConnectError(string=Failure(error.ConnectionDone()))
        c = PunchConnector(self.reactor, 5555, [("198.51.100.1", 1)], self.factory, True, SCHEDULE,
                           rng=random.Random(3))
        d = c.run()
        for i in range(5):
            self.fail_dial(i, icmp)
            [call] = [d for d in self.reactor.getDelayedCalls() if d.getTime() - self.reactor.seconds() < 5]
            self.assertLessEqual(call.getTime() - self.reactor.seconds(), 0.002)
            self.reactor.advance(0.002)
        self.assertEqual(len(self.reactor.tcpClients), 6)
        self.assertEqual(c.refused, 5)
        self.fail_dial(5, error.ConnectError(string=Failure(error.TimeoutError())))
        self.reactor.advance(0.4)
        self.assertEqual(len(self.reactor.tcpClients), 6, "not refused: the slow pace")
        self.reactor.advance(20)
        self.assertIn("198.51.100.1:1: timed out", str(self.failureResultOf(d, PunchFailed).value))

    def test_refusal_kinds(self):
        from p2pft.punch_schedule import refused

        for reason, expected in [
            (error.ConnectionRefusedError(), True),
            (error.ConnectError(string=Failure(error.ConnectionDone())), True),
            (error.ConnectError(string=Failure(error.ConnectionLost())), True),
            (error.ConnectError(string="some text"), False),
            (error.TimeoutError(), False),
            (error.NoRouteError(), False),
            (error.ConnectionDone(), False),  # connected, then closed: not a refusal
        ]:
            self.assertEqual(refused(Failure(reason)), expected, reason)

    def test_attempts_per_candidate_are_capped(self):
        schedule = PunchSchedule(redial_refused=0.01, max_attempts=5, deadline=100)
        PunchConnector(self.reactor, 5555, [("1.2.3.4", 1)], self.factory, True, schedule).run()
        for i in range(5):
            self.fail_dial(i)
            self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 5)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.tcpClients), 5)

    def test_failed_attempt_redialled_on_schedule(self):
        self.make().run()
        self.fail_dial(0, error.TimeoutError())
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.4)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertEqual(self.reactor.tcpClients[2][:2], ("198.51.100.1", 4000))

    def test_gives_up_at_deadline_with_reasons(self):
        d = self.make().run()
        self.fail_dial(0, error.TimeoutError())
        self.reactor.advance(19.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        f = self.failureResultOf(d, PunchFailed)
        self.assertIn("198.51.100.1:4000", str(f.value))
        self.assertTrue(self.reactor.connectors[1].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        n = len(self.reactor.tcpClients)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.tcpClients), n, "no dialling after giving up")

    def test_leader_selects_first_authenticated_and_drops_the_rest(self):
        connector = self.make(leader=True)
        d = connector.run()
        listen_factory = self.reactor.tcpServers[1][1]
        dial_factory = self.reactor.tcpClients[0][2]
        a = dial_factory.buildProtocol(None)
        b = listen_factory.buildProtocol(None)
        connector.authenticated(b)
        self.assertTrue(b.selected)
        self.assertIs(self.successResultOf(d), b)
        self.assertTrue(a.abandoned)
        self.assertFalse(b.abandoned)
        self.assertTrue(self.reactor.connectors[1].stoppedConnecting)
        self.assertFalse(self.reactor.connectors[0].stoppedConnecting)
        connector.authenticated(a)
        self.assertFalse(a.selected)
        self.assertIsNone(listen_factory.buildProtocol(None), "late arrivals refused")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_follower_waits_for_selection(self):
        connector = self.make(leader=False)
        d = connector.run()
        a = self.reactor.tcpClients[0][2].buildProtocol(None)
        b = self.reactor.tcpServers[0][1].buildProtocol(None)
        connector.authenticated(a)
        connector.authenticated(b)
        self.assertNoResult(d)
        self.assertFalse(a.selected or b.selected)
        connector.selected(b)
        self.assertIs(self.successResultOf(d), b)
        self.assertTrue(a.abandoned)

    def test_relays_dialled_after_delay_without_the_shared_port(self):
        c = PunchConnector(self.reactor, 5555, [("198.51.100.1", 4000)], self.factory, True, SCHEDULE,
                           relays=[("203.0.113.9", 9000)])
        c.run()
        self.reactor.advance(1.9)
        self.assertEqual([a[:2] for a in self.reactor.tcpClients], [("198.51.100.1", 4000)])
        self.reactor.advance(0.2)
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, bind), ("203.0.113.9", 9000, None))
        self.assertTrue(factory.relay)

    def test_relay_held_back_while_the_peer_nat_answers(self):
        c = PunchConnector(self.reactor, 5555, [("198.51.100.1", 4000)], self.factory, True, SCHEDULE,
                           relays=[("203.0.113.9", 9000)])
        c.run()
        self.fail_dial(0)  # RST: the peer's NAT is there, we are racing
        self.reactor.advance(2.1)
        self.assertNotIn(("203.0.113.9", 9000), [a[:2] for a in self.reactor.tcpClients])
        self.reactor.advance(4)
        self.assertIn(("203.0.113.9", 9000), [a[:2] for a in self.reactor.tcpClients])

    def test_resets_from_a_private_address_do_not_hold_the_relay_back(self):
        c = PunchConnector(self.reactor, 5555, [("198.51.100.1", 4000), ("10.0.0.2", 4000)], self.factory,
                           True, SCHEDULE, relays=[("203.0.113.9", 9000)])
        c.run()
        self.fail_dial(1)  # RST from the private address: some other host
        self.reactor.advance(2.1)
        self.assertIn(("203.0.113.9", 9000), [a[:2] for a in self.reactor.tcpClients])

    def test_cancel_cleans_up(self):
        d = self.make().run()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(all(c.stoppedConnecting for c in self.reactor.connectors))


class _Sink(protocol.Protocol):
    pass


class LoopbackPunchTests(TestCase):
    """Two connectors on real sockets, each sharing the port of a live
    "rendezvous" connection, as the session does."""

    timeout = 30

    async def rendezvous_port(self):
        server = reactor.listenTCP(0, protocol.Factory.forProtocol(_Sink), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        from twisted.internet.tcp import makeBinding

        connected = defer.Deferred()

        class F(protocol.ClientFactory):
            def buildProtocol(self, addr):
                p = _Sink()
                reactor.callLater(0, connected.callback, p)
                return p

        reactor.connectTCP("127.0.0.1", server.getHost().port, F(),
                           bindAddress=makeBinding("127.0.0.1", 0, reuseAddress=True, reusePort=True))
        p = await connected
        self.addCleanup(p.transport.loseConnection)
        return p.transport.getHost().port

    @staticmethod
    def keys(_=None):
        s, r = Pake("w-w", "1", SENDER), Pake("w-w", "1", RECEIVER)
        ms, mr = s.start(), r.start()
        return s.finish(mr), r.finish(ms)

    async def test_exactly_one_authenticated_connection(self):
        ks, kr = self.keys()
        pa, pb = await self.rendezvous_port(), await self.rendezvous_port()
        schedule = PunchSchedule(redial=0.1, attempt_timeout=2, deadline=10, handshake_timeout=5)
        # A stray client hits the receiver's port first; it must be ignored.
        stray = defer.Deferred()
        stray_factory = protocol.ClientFactory.forProtocol(_Sink)
        stray_factory.clientConnectionLost = lambda c, r: stray.callback(None)
        stray_factory.clientConnectionFailed = lambda c, r: stray.callback(None)
        sender = PunchConnector(reactor, pa, [("127.0.0.1", pb)],
                                lambda c, relay: PeerConnection(c, ks, reactor, 5), True, schedule, "127.0.0.1")
        receiver = PunchConnector(reactor, pb, [("127.0.0.1", pa)],
                                  lambda c, relay: PeerConnection(c, kr, reactor, 5), False, schedule, "127.0.0.1")
        rd = receiver.run()
        conn = reactor.connectTCP("127.0.0.1", pb, stray_factory)
        self.addCleanup(conn.disconnect)
        sd = sender.run()
        s_chan, r_chan = await sd, await rd
        self.addCleanup(s_chan.transport.abortConnection)
        self.addCleanup(r_chan.transport.abortConnection)
        # The stray was never chosen: once punching ended it was dropped,
        # and no other candidate survives on either side.
        await stray.addTimeout(2, reactor)  # well before its 5 s handshake timeout
        self.assertEqual((sender._live, receiver._live), ([], []))
        self.assertTrue(sender._done and receiver._done)
        self.assertEqual(s_chan.transport.getHost().port, pa)
        self.assertEqual(r_chan.transport.getHost().port, pb)
        self.assertEqual(s_chan.transport.getPeer().port, pb)
        # Nagle is off on both ends: a small record is never held back for
        # the other side's delayed ACK (tests/test_nodelay.py).
        for chan in (s_chan, r_chan):
            self.assertEqual(chan.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        # The chosen channel carries authenticated records both ways.
        got = defer.Deferred()

        class Handler:
            def recordReceived(self, kind, seq, payload):
                if kind == 0:  # KEEPALIVE: the session above swallows them
                    return
                got.callback((kind, payload))

            def channelLost(self, reason):
                pass

        r_chan.attach(Handler())
        s_chan.attach(Handler())
        s_chan.send(9, b"over the punched connection")
        self.assertEqual(await got, (9, b"over the punched connection"))

    async def test_wrong_key_never_connects(self):
        ks, _ = self.keys()
        _, kr = self.keys()  # an independent exchange: different key
        pa, pb = await self.rendezvous_port(), await self.rendezvous_port()
        schedule = PunchSchedule(redial=0.1, attempt_timeout=1, deadline=1.5, handshake_timeout=1)
        sender = PunchConnector(reactor, pa, [("127.0.0.1", pb)],
                                lambda c, relay: PeerConnection(c, ks, reactor, 1), True, schedule, "127.0.0.1")
        receiver = PunchConnector(reactor, pb, [("127.0.0.1", pa)],
                                  lambda c, relay: PeerConnection(c, kr, reactor, 1), False, schedule, "127.0.0.1")
        rd, sd = receiver.run(), sender.run()
        for d in (sd, rd):
            with self.assertRaises(PunchFailed):
                await d
