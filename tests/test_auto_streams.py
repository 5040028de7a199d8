"""
The C{--streams auto} policy (L{p2pft.session.auto.AutoStreams}), fed
synthetic TCP counts: no sockets, no clock.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pft.session.auto import GAIN, MIN_LOSS, START, STEP, STEP_BYTES, STEP_MAX, AutoStreams

MB = 1_000_000


class Feed:
    """Ticks once a second; C{rate} bytes/s acknowledged, C{loss} of the
    1000 segments/s sent retransmitted."""

    def __init__(self, auto):
        self.auto, self.now, self.acked, self.lost, self.sent = auto, 0.0, 0, 0, 0

    def run(self, seconds, rate, loss=0.0, tcp=True):
        changes = []
        for _ in range(int(seconds)):
            self.now += 1
            self.acked += int(rate)
            self.sent += 1000
            self.lost += int(1000 * loss)
            if tcp:
                changed = self.auto.tick(self.now, self.acked, self.lost, self.sent)
            else:
                changed = self.auto.tick(self.now, self.acked)
            if changed:
                changes.append((self.now, self.auto.target))
        return changes


class AutoStreamsTests(SynchronousTestCase):
    def test_a_clean_path_keeps_one_stream(self):
        auto = AutoStreams()
        feed = Feed(auto)
        self.assertEqual(feed.run(20, 10 * MB, loss=MIN_LOSS / 10), [])
        self.assertEqual((auto.target, auto.done), (1, True))
        self.assertIn("a clean path", auto.why)

    def test_a_lossy_path_gets_four_then_eight_when_it_pays(self):
        auto = AutoStreams()
        feed = Feed(auto)
        # Warm-up step (3 s), then a measured step on one stream.
        changes = feed.run(1 + 2 * STEP, 0.2 * MB, loss=0.01)
        self.assertEqual(changes, [(1 + 2 * STEP, START)])
        # Four streams warm up (their first step does not count), then move
        # twice as much: eight.
        self.assertEqual(feed.run(STEP, 0.2 * MB, loss=0.01), [])
        changes = feed.run(STEP, 0.4 * MB, loss=0.01)
        self.assertEqual(changes, [(feed.now, 8)])
        # Eight is the most; it stays, whatever follows.
        self.assertEqual(feed.run(3 * STEP, 0.8 * MB, loss=0.01), [])
        self.assertEqual((auto.target, auto.done), (8, True))

    def test_four_that_do_not_pay_stay_four(self):
        auto = AutoStreams()
        feed = Feed(auto)
        feed.run(1 + 2 * STEP, 0.2 * MB, loss=0.01)
        self.assertEqual(feed.run(2 * STEP, 0.2 * MB * (GAIN - 0.05), loss=0.01), [])
        self.assertEqual((auto.target, auto.done), (START, True))

    def test_the_warm_up_step_does_not_count(self):
        # Slow start moves a lot in the first step; it must not be the
        # baseline that four streams are compared with.
        auto = AutoStreams()
        feed = Feed(auto)
        feed.run(1, 0)
        feed.run(STEP, 5 * MB, loss=0.01)  # the warm-up
        self.assertEqual(auto.target, 1)
        feed.run(STEP, 0.2 * MB, loss=0.01)
        self.assertEqual(auto.target, START)
        feed.run(STEP, 5 * MB, loss=0.01)  # their warm-up: not compared
        self.assertEqual(auto.target, START)
        feed.run(STEP, 0.4 * MB, loss=0.01)
        self.assertEqual(auto.target, 8)

    def test_nothing_moving_restarts_the_step(self):
        auto = AutoStreams()
        feed = Feed(auto)
        feed.run(60, 0)  # a person deciding
        self.assertEqual((auto.target, auto.done), (1, False))
        # The wait never counted as a step: warm-up and measure from the
        # first second that moved.
        self.assertEqual(feed.run(1 + 2 * STEP, 0.2 * MB, loss=0.01), [(60 + 2 * STEP, START)])

    def test_a_slow_path_waits_for_enough_bytes_but_not_forever(self):
        auto = AutoStreams()
        feed = Feed(auto)
        rate = STEP_BYTES / (STEP_MAX * 2)  # too slow to reach STEP_BYTES
        changes = feed.run(1 + 2 * STEP_MAX, rate, loss=0.01)
        self.assertEqual(changes, [(1 + 2 * STEP_MAX, START)])

    def test_without_retransmission_counts_it_tries_more_streams(self):
        # (No TCP_INFO: loss unknown.)  Four streams are tried, and kept
        # only if they pay.
        auto = AutoStreams()
        feed = Feed(auto)
        self.assertEqual(feed.run(1 + 2 * STEP, 10 * MB, tcp=False), [(1 + 2 * STEP, START)])
        self.assertEqual(feed.run(2 * STEP, 10 * MB, tcp=False), [])
        self.assertEqual((auto.target, auto.done), (START, True))
