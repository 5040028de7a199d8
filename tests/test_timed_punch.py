"""
Timed punching (issue 15, the DCUtR method): each side measures its round
trip to the rendezvous server, tells the other in message 3 (C{rtt_ms}),
and the side farther from the server holds its first attempts back by half
the difference, so both sides' SYNs leave at the same instant.
"""

import os

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from p2pft.connect import LaneFinder, Settings, candidates_message, first_delay, stagger_setting, timed_setting
from p2pft.errors import SessionError
from p2pft.punch import PunchConnector
from p2pft.punch_schedule import MAX_TIMED_DELAY, STAGGER, peer_rtt, peer_sent, timed_delay
from p2pft.secure import RECEIVER, SENDER
from p2pft.rendezvous import RendezvousClientFactory, RendezvousClientProtocol
from tests.test_punch import SCHEDULE, FakeCandidate


class DelayTests(SynchronousTestCase):
    def test_lockstep_the_farther_side_waits_the_difference(self):
        """One-way 30 ms to us, 0 to the peer, each message 3 sent 60 ms
        after its PAIRED arrived (the key exchange in lockstep): we start
        at 90 ms after the server's PAIRED, the peer at 120; we wait 30."""
        self.assertAlmostEqual(timed_delay(0.060, 0.0, 0.060, 0.060, 0.060), 0.030)
        # ... and the peer, nearer, waits nothing:
        self.assertEqual(timed_delay(0.0, 0.060, 0.060, 0.060, 0.120), 0.0)

    def test_a_local_wait_moves_the_start(self):
        """The peer held its candidates 40 ms more (a port mapping on its
        way): it starts 40 ms later than the exchange alone says."""
        # It: sent at 60 ms, ours (sent at 10) had arrived: it starts at
        # 70 ms after the server's PAIRED; we get its candidates at 90.
        self.assertEqual(timed_delay(0.020, 0.020, 0.010, 0.060, 0.080), 0.0)
        # ... so it, having waited, waits 20 ms more for us:
        self.assertAlmostEqual(timed_delay(0.020, 0.020, 0.060, 0.010, 0.060), 0.020)

    def test_not_known_no_delay(self):
        self.assertEqual(timed_delay(None, 0.0, 0.1, 0.1, 0.1), 0.0)
        self.assertEqual(timed_delay(0.5, None, 0.1, 0.1, 0.1), 0.0)
        self.assertEqual(timed_delay(0.5, 0.0, 0.1, None, 0.1), 0.0)

    def test_bounded(self):
        self.assertEqual(timed_delay(9.0, 0.0, 0.0, 60.0, 0.0), MAX_TIMED_DELAY)

    def test_the_peers_fields_are_untrusted(self):
        self.assertEqual(peer_rtt(61.5), 0.0615)
        self.assertEqual(peer_rtt(0), 0.0)
        self.assertEqual(peer_sent(1500), 1.5)
        for bad in (None, True, False, "60", -1, float("nan"), float("inf"), 10_001, [60], {}):
            self.assertIsNone(peer_rtt(bad), bad)
        for bad in (None, True, "60", -1, float("inf"), 120_001):
            self.assertIsNone(peer_sent(bad), bad)

    def test_sides_that_start_apart_send_their_first_syns_together(self):
        """
        A model of the exchange on a Clock, as the code runs it: PAIRED
        leaves the server to both at once; PAKE, key confirmation and
        candidates each go when the peer's previous message arrived, the
        candidates after a local wait of each side's own; each side starts
        punching when the peer's candidates arrive, after L{timed_delay}
        of what it measured and was told.  The first SYNs leave together,
        however far each side is from the server and however long it waited.
        """
        cases = [((0.0, 0.030), (0, 0)), ((0.030, 0.0), (0, 0)), ((0.005, 0.045), (0.0, 0.040)),
                 ((0.020, 0.020), (0.070, 0.0)), ((0.0, 0.030), (0.0, 0.070))]
        for one_way, hold in cases:
            clock = Clock()
            paired, sent, arrived, syn = {}, {}, {}, {}
            rtt = {side: 2 * one_way[side] for side in (0, 1)}

            got = {}

            def start(side):
                # punching starts once ours went and theirs came
                if side in sent and side in got and side not in arrived:
                    arrived[side] = clock.seconds()
                    elapsed = arrived[side] - paired[side]
                    syn[side] = arrived[side] + timed_delay(rtt[side], rtt[1 - side], sent[side],
                                                            sent[1 - side], elapsed)

            def deliver(to, n):
                # side `to` got the peer's message n
                if n == 1:
                    send(to, 2)
                elif n == 2:
                    clock.callLater(hold[to], send, to, 3)
                else:
                    got[to] = True
                    start(to)

            def send(side, n):
                clock.callLater(one_way[side] + one_way[1 - side], deliver, 1 - side, n)
                if n == 3:
                    sent[side] = clock.seconds() - paired[side]
                    start(side)

            def pair(side):
                paired[side] = clock.seconds()
                send(side, 1)

            for side in (0, 1):
                clock.callLater(one_way[side], pair, side)
            while clock.getDelayedCalls():
                clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
            self.assertAlmostEqual(syn[0], syn[1], places=6, msg=(one_way, hold))
            # ... where untimed they would not have (but for one case):
            if (one_way, hold) != ((0.020, 0.020), (0.070, 0.0)):
                self.assertNotAlmostEqual(arrived[0], arrived[1], places=3, msg=(one_way, hold))


class ConnectorTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def make(self, delay):
        return PunchConnector(self.reactor, 5555, [("198.51.100.1", 4000), ("10.0.0.2", 4000)],
                              lambda c, relay: FakeCandidate(c), True, SCHEDULE,
                              relays=[("203.0.113.9", 9000)], delay=delay)

    def dialled(self):
        return [(h, p) for h, p, _, _, _ in self.reactor.tcpClients]

    def test_first_attempts_held_back_listener_at_once(self):
        self.make(0.030).run()
        self.assertEqual(len(self.reactor.tcpServers), 2)
        self.assertEqual(self.dialled(), [])
        self.reactor.advance(0.029)
        self.assertEqual(self.dialled(), [])
        self.reactor.advance(0.001)
        self.assertEqual(self.dialled(), [("198.51.100.1", 4000), ("10.0.0.2", 4000)])

    def test_relays_are_not_held_back(self):
        schedule = SCHEDULE.__class__(relay_delay=0.0)
        PunchConnector(self.reactor, 5555, [("198.51.100.1", 4000)], lambda c, relay: FakeCandidate(c),
                       True, schedule, relays=[("203.0.113.9", 9000)], delay=0.2).run()
        self.reactor.advance(0)
        self.assertEqual(self.dialled(), [("203.0.113.9", 9000)])
        self.reactor.advance(0.2)
        self.assertEqual(self.dialled(), [("203.0.113.9", 9000), ("198.51.100.1", 4000)])

    def test_stopped_before_the_delay_dials_nothing(self):
        connector = self.make(0.030)
        connector.run().addErrback(lambda f: None)
        connector.stop()
        self.reactor.advance(1)
        self.assertEqual(self.dialled(), [])

    def test_no_delay_dials_at_once(self):
        self.make(0.0).run()
        self.assertEqual(self.dialled(), [("198.51.100.1", 4000), ("10.0.0.2", 4000)])


WELCOME = b"WELCOME p2pft 1 203.0.113.5 4444 -\n"


class RoundTripTests(SynchronousTestCase):
    def connected(self):
        clock = Clock()
        client = RendezvousClientFactory(clock).buildProtocol(None)
        client.makeConnection(StringTransport())
        return clock, client

    def test_connection_to_welcome_is_one_round_trip(self):
        clock, client = self.connected()
        self.assertIsNone(client.rtt)
        clock.advance(0.061)
        client.dataReceived(WELCOME)
        self.assertAlmostEqual(client.rtt, 0.061)

    def test_a_ping_keeps_the_shortest(self):
        clock, client = self.connected()
        clock.advance(0.080)
        client.dataReceived(WELCOME)
        client.ping("rtt")
        clock.advance(0.060)
        client.dataReceived(b"PONG rtt\n")
        self.assertAlmostEqual(client.rtt, 0.060)
        client.ping("rtt")
        clock.advance(0.070)
        client.dataReceived(b"PONG rtt\n")
        self.assertAlmostEqual(client.rtt, 0.060)

    def test_an_unasked_pong_measures_nothing(self):
        clock, client = self.connected()
        clock.advance(0.05)
        client.dataReceived(WELCOME)
        clock.advance(0.01)
        client.dataReceived(b"PONG rtt\n")
        self.assertAlmostEqual(client.rtt, 0.05)

    def test_without_a_clock_nothing_is_measured(self):
        client = RendezvousClientProtocol()
        client.makeConnection(StringTransport())
        client.dataReceived(WELCOME)
        self.assertIsNone(client.rtt)


class MessageTests(SynchronousTestCase):
    def test_candidates_carry_the_round_trip_and_when_they_left(self):
        mine = [["203.0.113.5", 4444]]
        self.assertEqual(candidates_message(mine, "fixed", 0.06123, 0.1),
                         {"candidates": mine, "mapping": "fixed", "rtt_ms": 61.23, "sent_ms": 100.0})
        self.assertEqual(candidates_message(mine, None, None, 0.1), {"candidates": mine})

    def test_knob(self):
        self.assertFalse(timed_setting(None))
        self.assertFalse(timed_setting(""))
        self.assertTrue(timed_setting(" On "))
        self.assertFalse(timed_setting("off"))
        self.assertRaises(SessionError, timed_setting, "maybe")

    def test_settings_read_the_knob(self):
        self.patch(os, "environ", {"P2PFT_TIMED": "on"})
        self.assertTrue(Settings(server=("h", 1)).timed)
        self.patch(os, "environ", {})
        self.assertFalse(Settings(server=("h", 1)).timed)


class StaggerTests(SynchronousTestCase):
    """The leader (sender) first, the follower (receiver) STAGGER later:
    a fixed order instead of two sides starting within a fraction of a
    millisecond of each other."""

    def settings(self, **kw):
        return Settings(server=("h", 1), **kw)

    def test_knob(self):
        self.assertEqual(stagger_setting(None), STAGGER)
        self.assertEqual(stagger_setting(""), STAGGER)
        self.assertEqual(stagger_setting("0"), 0.0)
        self.assertEqual(stagger_setting("35"), 0.035)
        for bad in ("-1", "501", "soon"):
            self.assertRaises(SessionError, stagger_setting, bad)

    def test_first_punch_the_follower_after_the_leader(self):
        s = self.settings(timed=True, stagger=0.02)
        self.assertEqual(first_delay(s, SENDER, 0.0), 0.0)
        self.assertAlmostEqual(first_delay(s, RECEIVER, 0.0), 0.02)
        # aligned first, then staggered
        self.assertAlmostEqual(first_delay(s, RECEIVER, 0.03), 0.05)
        self.assertAlmostEqual(first_delay(s, SENDER, 0.03), 0.03)

    def test_knobs_off(self):
        s = self.settings(timed=False, stagger=0.0)
        self.assertEqual(first_delay(s, RECEIVER, 0.03), 0.0)
        self.assertEqual(first_delay(s, SENDER, 0.03), 0.0)

    def finder(self, role, **kw):
        finder = LaneFinder(Clock(), self.settings(**kw), role, None, None, [])
        finder.server_rtts = (0.010, 0.050)
        return finder

    def test_fresh_ports_the_follower_waits_for_the_leaders_start(self):
        """The leader punches when the follower's GROWN reaches it through
        the relay (half of each side's round trip to the server): the
        follower waits that, then the stagger."""
        self.assertAlmostEqual(self.finder(RECEIVER, stagger=0.02, timed=True)._follow_delay(), 0.05)
        self.assertEqual(self.finder(SENDER, stagger=0.02)._follow_delay(), 0.0)
        self.assertAlmostEqual(self.finder(RECEIVER, stagger=0.02, timed=False)._follow_delay(), 0.02)
        unknown = self.finder(RECEIVER, stagger=0.02, timed=True)
        unknown.server_rtts = (0.010, None)
        self.assertAlmostEqual(unknown._follow_delay(), 0.02)
