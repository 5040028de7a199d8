"""
Session wiring that is not covered end to end: the partner leaving the
rendezvous server while we punch, and candidate parsing.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.punch import PunchFailed, PunchSchedule
from p2pft.punch_schedule import AttemptPlan
from p2pft.rendezvous import PeerGone, RendezvousError
from p2pft.secure import RECEIVER, SENDER
from p2pft.candidates import MAX_CANDIDATES, parse_candidates
from p2pft.connect import SessionError, _punch_watching_partner


class FakeClient:
    def __init__(self):
        self.readers = []

    def receive(self):
        d = defer.Deferred(lambda d: self.readers.remove(d) if d in self.readers else None)
        self.readers.append(d)
        return d

    def fail(self, error):
        readers, self.readers = self.readers, []
        for d in readers:
            d.errback(error)


class FakeConnector:
    def __init__(self):
        self.cancelled = False
        self.result = defer.Deferred(self._cancel)
        self.plan = AttemptPlan(PunchSchedule(), [("198.51.100.7", 4000)])

    def _cancel(self, d):
        self.cancelled = True

    def run(self):
        return self.result


class PartnerLeavesTests(SynchronousTestCase):
    schedule = PunchSchedule(gone_grace=3.0)

    def start(self, role):
        self.clock, self.client, self.connector = Clock(), FakeClient(), FakeConnector()
        return defer.ensureDeferred(
            _punch_watching_partner(self.clock, self.client, self.connector, role, self.schedule))

    def test_sender_stops_at_once(self):
        d = self.start(SENDER)
        self.client.fail(PeerGone("gone"))
        self.clock.advance(0)
        f = self.failureResultOf(d, SessionError)
        self.assertIn("left before a connection was made", str(f.value))
        self.assertNotIn("tried", str(f.value))
        self.assertTrue(self.connector.cancelled)

    def test_what_was_tried_is_said(self):
        """Both sides' deadlines are about equal: the one that gives up
        second says how its attempts failed, as the first one did."""
        d = self.start(SENDER)
        self.connector.plan.errors[("198.51.100.7", 4000)] = "refused (ICMP)"
        self.client.fail(PeerGone("gone"))
        self.clock.advance(0)
        f = self.failureResultOf(d, SessionError)
        self.assertIn("left before a connection was made (tried: 198.51.100.7:4000: refused (ICMP))", str(f.value))

    def test_receiver_waits_for_a_late_select(self):
        d = self.start(RECEIVER)
        self.client.fail(PeerGone("gone"))
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.connector.result.callback("channel")
        self.assertEqual(self.successResultOf(d), "channel")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_receiver_gives_up_after_grace(self):
        d = self.start(RECEIVER)
        self.client.fail(PeerGone("gone"))
        self.clock.advance(3.1)
        self.failureResultOf(d, SessionError)

    def test_server_dying_is_not_a_reason_to_stop(self):
        d = self.start(SENDER)
        self.client.fail(RendezvousError("lost the connection to the rendezvous server"))
        self.clock.advance(60)
        self.assertNoResult(d)
        self.connector.result.callback("channel")
        self.assertEqual(self.successResultOf(d), "channel")

    def test_punch_failure_is_reported_as_it_is(self):
        # (Issue 13: an expected error is not converted into another one.)
        d = self.start(SENDER)
        self.connector.result.errback(PunchFailed("could not connect"))
        self.assertEqual(str(self.failureResultOf(d, PunchFailed).value), "could not connect")
        self.assertEqual(self.client.readers, [], "the watch was cancelled")


class CandidateTests(SynchronousTestCase):
    def test_filters_then_caps(self):
        junk = [["0.0.0.0", 1], ["224.0.0.1", 5], ["255.255.255.255", 9], ["not-an-ip", 4],
                ["10.0.0.1", 0], ["::", 3], "garbage", [1, 2, 3]] * 4
        good = [["203.0.113.%d" % i, 4000 + i] for i in range(1, 30)]
        out = parse_candidates({"candidates": junk[:MAX_CANDIDATES] + good})
        self.assertEqual(len(out), MAX_CANDIDATES)
        self.assertEqual(out[0], ("203.0.113.1", 4001))

    def test_nothing_usable(self):
        for msg in ({}, {"candidates": "x"}, {"candidates": [["0.0.0.0", 1]]}):
            self.assertRaises(SessionError, parse_candidates, msg)


class AddressTests(SynchronousTestCase):
    def test_global_ipv6_from_proc(self):
        from p2pft.addresses import global_ipv6_addresses

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "00000000000000000000000000000001 01 80 10 80       lo\n"        # loopback (host scope)
                "20010db8000000000000000000000001 02 40 00 80     eth0\n"        # global: kept
                "20010db8000000000000000000000002 02 40 00 20     eth0\n"        # deprecated
                "20010db8000000000000000000000003 02 40 00 40     eth0\n"        # tentative
                "fe800000000000000000000000000001 02 40 20 80     eth0\n"        # link-local
                "fd000000000000000000000000000002 02 40 00 80     eth0\n"        # ULA, global scope: kept
                "garbage\n"
            )
        self.assertEqual(global_ipv6_addresses(path), ["2001:db8::1", "fd00::2"])
        self.assertEqual(global_ipv6_addresses(self.mktemp()), [])

    def test_candidates(self):
        from p2pft.candidates import own_candidates

        self.assertEqual(
            own_candidates(("203.0.113.5", 4000), ("10.0.0.2", 4000), ["2001:db8::1"]),
            [["203.0.113.5", 4000], ["10.0.0.2", 4000], ["2001:db8::1", 4000]])
        # Not behind a NAT: the public and local address are the same.
        self.assertEqual(own_candidates(("203.0.113.5", 4000), ("203.0.113.5", 4000)), [["203.0.113.5", 4000]])

    def test_link_local_and_mapped_candidates_refused(self):
        out = parse_candidates({"candidates": [["fe80::1", 5], ["::ffff:10.0.0.1", 5], ["2001:db8::7", 5]]})
        self.assertEqual(out, [("2001:db8::7", 5)])
