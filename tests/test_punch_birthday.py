"""
Birthday punching (p2pft.birthday): the mapping's classification, the plan
as a plain object, and the connector on a fake reactor (no sockets).  The
NAT lab's one-symmetric row (tests/test_nat_matrix.py) is the real thing.
"""

import random

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pft.birthday import (FIXED, MAPPED, OPEN, PROBE, VARIES, BirthdayConnector, BirthdayPlan, BirthdaySchedule,
                            classify, role, syns)
from p2pft.punch import PunchFailed
from tests.test_punch import FakeCandidate

TARGET = ("203.0.113.22", 40000)


class ClassifyTests(SynchronousTestCase):
    def test_kept_port_is_fixed_without_a_second_look(self):
        self.assertEqual(classify(40000, 40000), FIXED)

    def test_shifted_in_order_is_fixed(self):
        # Nat("shift") in the lab: 40000 -> 20000, 40001 -> 20001.
        self.assertEqual(classify(40000, 20000, 40001, 20001), FIXED)
        self.assertEqual(classify(40000, 20000, 39999, 19999), FIXED)

    def test_random_ports_vary(self):
        self.assertEqual(classify(40000, 62321, 40001, 2000), VARIES)
        self.assertEqual(classify(40000, 62321, 40001, 62321), VARIES)
        self.assertEqual(classify(40000, 62321), VARIES, "not kept, no second look")

    def test_roles_need_exactly_one_symmetric_side(self):
        self.assertEqual(role(VARIES, FIXED), OPEN)
        self.assertEqual(role(FIXED, VARIES), PROBE)
        # MAPPED: symmetric, but reached through the router's mapping.
        for ours, theirs in [(FIXED, FIXED), (VARIES, VARIES), (None, VARIES), (VARIES, None),
                             (FIXED, "something"), (VARIES, 7), (MAPPED, FIXED), (FIXED, MAPPED)]:
            self.assertIsNone(role(ours, theirs))

    def test_syns_count_linux_retransmissions(self):
        self.assertEqual([syns(s) for s in (0, 0.9, 1.5, 3.5, 8)], [1, 1, 2, 3, 4])


class PlanTests(SynchronousTestCase):
    schedule = BirthdaySchedule(opens=4, probes=300, max_opens=10, burst=128, open_delay=0.05)

    def test_probes_distinct_random_ports_of_the_target_host_only(self):
        plan = BirthdayPlan(self.schedule, PROBE, TARGET, random.Random(1))
        self.assertEqual(plan.first(), 0)
        out = []
        now = 0.0
        while True:
            got = plan.due(now)
            self.assertLessEqual(len(got), 128)
            out += got
            delay = plan.next_tick(now)
            if delay is None:
                break
            now += delay
        self.assertEqual(len(out), 300)
        self.assertEqual({h for h, _ in out}, {TARGET[0]})
        ports = [p for _, p in out]
        self.assertEqual(len(set(ports)), 300)
        self.assertTrue(all(1024 <= p <= 65535 for p in ports))
        for _ in out:
            plan.ended(now, 0.9, False)
        self.assertEqual(plan.due(now + 10), [], "probes are not made again")
        self.assertEqual(plan.stats(), {"birthday_role": "probe", "birthday_attempts": 300,
                                        "birthday_syns": 300, "birthday_refused": 0})

    def test_opens_wait_for_the_probes_then_retry_within_the_budget(self):
        plan = BirthdayPlan(self.schedule, OPEN, TARGET)
        self.assertEqual(plan.due(0.0), [])
        self.assertAlmostEqual(plan.next_tick(0.0), 0.05)
        self.assertEqual(plan.due(0.05), [TARGET] * 4)
        self.assertIsNone(plan.next_tick(0.05), "all out: nothing until one ends")
        total = 4
        now = 0.05
        while True:
            plan.ended(now, 0.01, True)
            delay = plan.next_tick(now)
            if delay is None:
                break
            now += delay
            got = plan.due(now)
            total += len(got)
            self.assertTrue(all(a == TARGET for a in got))
        self.assertEqual(total, 10, "max_opens bounds every open")
        self.assertEqual(plan.attempts, 10)
        self.assertEqual(plan.refusals, 10 - plan.pending)

    def test_pending_attempts_are_bounded(self):
        plan = BirthdayPlan(self.schedule, PROBE, TARGET, max_pending=50)
        self.assertEqual(len(plan.due(0)), 50)
        self.assertEqual(plan.due(0.01), [])
        for _ in range(20):
            plan.ended(0.02, 0.9, False)
        self.assertEqual(len(plan.due(0.03)), 20)

    def test_unknown_role(self):
        self.assertRaises(ValueError, BirthdayPlan, self.schedule, "spray", TARGET)


class ConnectorTests(SynchronousTestCase):
    schedule = BirthdaySchedule(opens=3, probes=5, max_opens=6, deadline=8, open_delay=0.05)

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.built = []

    def factory(self, connector, relay=False):
        c = FakeCandidate(connector)
        self.built.append(c)
        return c

    def make(self, side):
        plan = BirthdayPlan(self.schedule, side, TARGET, random.Random(2))
        return BirthdayConnector(self.reactor, 5555, plan, self.factory, True)

    def fail_dial(self, index, reason):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(reason))

    def test_opens_from_fresh_ports_without_a_listener(self):
        c = self.make(OPEN)
        d = c.run()
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(0.05)
        self.assertEqual([(h, p, t, b) for h, p, _, t, b in self.reactor.tcpClients],
                         [(TARGET[0], TARGET[1], 0.9, None)] * 3)
        # A reset from the other side's NAT: again, from another fresh port.
        self.fail_dial(0, error.ConnectionRefusedError())
        self.reactor.advance(0.02)
        self.assertEqual(len(self.reactor.tcpClients), 4)
        self.assertIsNone(self.reactor.tcpClients[3][4])
        for i in (1, 2, 3):
            self.fail_dial(i, error.TimeoutError())
            self.reactor.advance(0.02)
        self.assertEqual(len(self.reactor.tcpClients), 6, "max_opens")
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.tcpClients), 6)
        self.assertIn("birthday: timed out", str(self.failureResultOf(d, PunchFailed).value))
        self.assertEqual(c.birthday.stats()["birthday_attempts"], 6)
        self.assertEqual(c.birthday.stats()["birthday_refused"], 1)
        self.assertTrue(all(conn.stoppedConnecting for conn in self.reactor.connectors[4:]))

    def test_probes_from_the_shared_port_with_a_listener(self):
        c = self.make(PROBE)
        c.run()
        self.assertEqual([(b._port, b._reusePort) for b, _, _, _ in self.reactor.tcpServers],
                         [(5555, True), (5555, True)])
        self.reactor.advance(0)
        dials = self.reactor.tcpClients
        self.assertEqual(len(dials), 5)
        self.assertTrue(all(h == TARGET[0] and b._port == 5555 and t == 0.9 for h, _, _, t, b in dials))
        self.assertEqual(len({p for _, p, _, _, _ in dials}), 5)

    def test_a_connected_attempt_is_chosen_and_the_rest_stopped(self):
        lanes = []
        plan = BirthdayPlan(self.schedule, OPEN, TARGET)
        c = BirthdayConnector(self.reactor, 5555, plan, self.factory, True, on_lane=lanes.append)
        d = c.run()
        self.reactor.advance(0.05)
        _, _, factory, _, _ = self.reactor.tcpClients[1]
        candidate = factory.buildProtocol(None)
        c.authenticated(candidate)
        self.assertEqual(lanes, [candidate])
        self.assertIs(self.successResultOf(d), candidate)
        self.assertTrue(candidate.selected)
        c.stop()
        self.assertFalse(c.running)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertTrue(self.reactor.connectors[2].stoppedConnecting)
        self.assertEqual(plan.stats()["birthday_attempts"], 3)
        self.assertEqual(plan.stats()["birthday_syns"], 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class FirstLaneTests(SynchronousTestCase):
    """connect._first_of: the session's first lane from the ordinary punch
    or the birthday punch, whichever comes first."""

    def test_first_success_wins_even_after_a_failure(self):
        from twisted.internet import defer

        from p2pft.connect import _first_of

        a, b = defer.Deferred(), defer.Deferred()
        d = _first_of([a, b])
        a.errback(PunchFailed("stopped"))
        self.assertNoResult(d)
        b.callback("lane")
        self.assertEqual(self.successResultOf(d), "lane")

    def test_fails_as_the_first_when_all_fail(self):
        from twisted.internet import defer

        from p2pft.connect import _first_of

        a, b = defer.Deferred(), defer.Deferred()
        d = _first_of([a, b])
        b.errback(PunchFailed("birthday"))
        a.errback(PunchFailed("main"))
        self.assertEqual(str(self.failureResultOf(d, PunchFailed).value), "birthday")

    def test_cancel_cancels_all(self):
        from twisted.internet import defer

        from p2pft.connect import _first_of

        cancelled = []
        a = defer.Deferred(lambda _: cancelled.append("a"))
        b = defer.Deferred(lambda _: cancelled.append("b"))
        d = _first_of([a, b])
        d.cancel()
        self.assertEqual(cancelled, ["a", "b"])
        self.failureResultOf(d, defer.CancelledError)


class ScheduleKnobTests(SynchronousTestCase):
    def test_p2pft_birthday(self):
        from p2pft.connect import SessionError, birthday_schedule

        self.assertEqual(birthday_schedule(None), BirthdaySchedule())
        self.assertIsNone(birthday_schedule("off"))
        self.assertEqual((birthday_schedule("128,512").opens, birthday_schedule("128,512").probes), (128, 512))
        for bad in ("1", "a,b", "0,5", "5,100000"):
            self.assertRaises(SessionError, birthday_schedule, bad)


class RepunchTests(SynchronousTestCase):
    """LaneFinder.repunch_later: fresh ports on both sides while the
    session is not direct, at the REPUNCH_AFTER times, leader only."""

    def finder(self, role):
        from twisted.internet.task import Clock

        from p2pft.connect import LaneFinder, Settings

        clock = Clock()
        finder = LaneFinder(clock, Settings(server=("203.0.113.10", 9000)), role, None, None, [])
        started = []
        finder._start_stream = lambda number, theirs=None, fresh=False: started.append((number, fresh))

        class Link:
            path = "relay"

        finder.link = Link()
        return clock, finder, started

    def test_leader_punches_again_until_direct(self):
        from p2pft.connect import REPUNCH_AFTER
        from p2pft.secure import SENDER

        clock, finder, started = self.finder(SENDER)
        finder.repunch_later()
        clock.advance(REPUNCH_AFTER[0] - 0.01)
        self.assertEqual(started, [])
        clock.advance(0.01)
        self.assertEqual(started, [(1, True)])
        clock.advance(REPUNCH_AFTER[1] - REPUNCH_AFTER[0])
        self.assertEqual(started, [(1, True), (2, True)])
        finder.link.path = "direct"
        clock.advance(100)
        self.assertEqual(len(started), 2, "direct: no more")
        self.assertEqual(finder.repunches, 2)
        self.assertEqual(finder.stats(), {"repunches": 2})

    def test_bounded_and_stopped(self):
        from p2pft.connect import REPUNCH_AFTER
        from p2pft.secure import SENDER

        clock, finder, started = self.finder(SENDER)
        finder.repunch_later()
        clock.advance(1000)
        self.assertEqual(len(started), len(REPUNCH_AFTER))
        clock, finder, started = self.finder(SENDER)
        finder.repunch_later()
        finder.stop()
        clock.advance(1000)
        self.assertEqual(started, [])

    def test_follower_waits_for_the_leader(self):
        from p2pft.secure import RECEIVER

        clock, finder, started = self.finder(RECEIVER)
        finder.repunch_later()
        clock.advance(1000)
        self.assertEqual(started, [])
