"""
The secure channel on one connection (L{p2pft.channel}): a chosen pair of
PeerConnections over iosim.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.secure import RECEIVER, SENDER, Pake


def session_keys():
    """Both sides' keys of one session: (sender's, receiver's)."""
    s, r = Pake("w-w", "1", SENDER), Pake("w-w", "1", RECEIVER)
    ms, mr = s.start(), r.start()
    return s.finish(mr), r.finish(ms)


class ChannelTests(SynchronousTestCase):
    """A chosen channel: one that has nothing to say sends KEEPALIVE
    records, which the other side swallows without losing step; one whose
    reader pauses holds the records that arrive meanwhile."""

    def chosen_pair(self, clock):
        """Two PeerConnections over iosim that chose each other, each
        with a handler collecting its records: (sender, receiver, pump, got)."""
        from twisted.test import iosim

        from p2pft.channel import PeerConnection

        s_keys, r_keys = session_keys()

        class Connector:
            def __init__(self, leader):
                self.leader, self.chosen = leader, None

            def authenticated(self, c):
                if self.leader:
                    c.select()
                    self.chosen = c

            def selected(self, c):
                self.chosen = c

            def lost(self, c, reason=None):
                pass

        sc, rc = Connector(True), Connector(False)
        sp = PeerConnection(sc, s_keys, clock)
        rp = PeerConnection(rc, r_keys, clock)
        pump = iosim.connect(sp, iosim.makeFakeServer(sp), rp, iosim.makeFakeClient(rp), clock=clock)
        pump.flush()
        self.assertIs(sc.chosen, sp)
        self.assertIs(rc.chosen, rp)
        got = []

        class Handler:
            def recordReceived(self, kind, payload):
                got.append((kind, payload))

            def channelLost(self, reason):
                pass

        sp.attach(Handler())
        rp.attach(Handler())
        return sp, rp, pump, got

    def test_keepalive(self):
        from p2pft.channel import KEEPALIVE_INTERVAL

        clock = Clock()
        sp, rp, pump, got = self.chosen_pair(clock)
        sent_before = sp._records._sealer._counter
        clock.advance(KEEPALIVE_INTERVAL + 1)
        pump.flush()
        self.assertEqual(sp._records._sealer._counter, sent_before + 1, "one keepalive sent")
        self.assertEqual(got, [], "keepalives are not handed up")
        # Records after a keepalive still open: the counters stay in step.
        sp.send(9, b"after")
        pump.flush()
        self.assertEqual(got, [(9, b"after")])
        # Busy channels send no keepalives.
        clock.advance(KEEPALIVE_INTERVAL / 2)
        sp.send(9, b"busy")
        clock.advance(KEEPALIVE_INTERVAL / 2 + 1)
        pump.flush()
        self.assertEqual(got[-1], (9, b"busy"))
        n = sp._records._sealer._counter
        clock.advance(KEEPALIVE_INTERVAL / 2)
        pump.flush()
        self.assertEqual(sp._records._sealer._counter, n + 1)

    def test_chosen_channel_reads_and_sends_big_pieces(self):
        from p2pft.channel import READ_SIZE, SEND_SIZE

        sp, rp, pump, got = self.chosen_pair(Clock())
        for p in (sp, rp):
            self.assertEqual((p.transport.bufferSize, p.transport.SEND_LIMIT), (READ_SIZE, SEND_SIZE))

    def test_paused_channel_holds_records_and_stops_reading(self):
        sp, rp, pump, got = self.chosen_pair(Clock())
        sp.send(9, b"one")
        sp.send(9, b"two")
        pump.flush()
        self.assertEqual(got, [(9, b"one"), (9, b"two")])
        del got[:]

        class Pausing:
            def recordReceived(self, kind, payload):
                got.append(payload)
                if payload == b"b":
                    rp.pauseReading()

            def channelLost(self, reason):
                pass
        rp.attach(Pausing())
        calls = []
        rp.transport.pauseProducing = lambda: calls.append("pause")
        rp.transport.resumeProducing = lambda: calls.append("resume")
        for payload in (b"a", b"b", b"c", b"d"):
            sp.send(9, payload)
        pump.flush()
        self.assertEqual(got, [b"a", b"b"], "records after the pause are held")
        self.assertEqual(calls, ["pause"], "the socket is not read meanwhile")
        sp.send(9, b"e")
        pump.flush()  # (iosim's transport cannot stop reading)
        self.assertEqual(got, [b"a", b"b"])
        rp.resumeReading()
        pump.flush()
        self.assertEqual(got, [b"a", b"b", b"c", b"d", b"e"], "nothing lost or reordered")
        self.assertEqual(calls, ["pause", "resume"])
