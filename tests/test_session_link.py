"""
The session layer without sockets: L{Outbox} and L{Inbox}, and two
L{SessionLink}s wired through fake lanes (L{tests.fakelanes}) so that
records cross like on TCP, in order per lane, when the test says so.
"""

import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from p2pft.channel import KEEPALIVE, KEEPALIVE_INTERVAL
from p2pft.session.link import ACK_BYTES, ACK_DELAY, CONTROL, LEAVE, SACK, SILENCE
from p2pft.session.sequence import OVERHEAD, Inbox, Outbox, SequenceError
from p2pft.transfer.records import ACK, DATA, END, FILE, FILE_END, OFFER

from .fakelanes import Net, Pull, Push



def payload(i: int, size: int = 100) -> bytes:
    head = b"%08d|" % i
    return head + bytes(max(0, size - len(head)))


def records(n: int, kind: int = OFFER, size: int = 100, start: int = 1) -> list:
    return [(kind, payload(i, size)) for i in range(start, start + n)]


def sack(n: int) -> bytes:
    return struct.pack(">Q", n)


class OutboxTests(SynchronousTestCase):

    def test_numbers_from_one(self):
        box = Outbox(1000)
        self.assertEqual([box.add(OFFER, b"x").seq for _ in range(3)], [1, 2, 3])
        self.assertEqual(box.sent, 3)
        self.assertFalse(box.idle)

    def test_bytes_and_full(self):
        box = Outbox(2 * (10 + OVERHEAD))
        self.assertTrue(box.idle)
        box.add(DATA, bytes(10))
        self.assertEqual(box.bytes, 10 + OVERHEAD)
        self.assertFalse(box.full)
        box.add(DATA, bytes(10))
        self.assertTrue(box.full)

    def test_ack_cumulative_forgets(self):
        box = Outbox(10_000)
        for i in range(5):
            box.add(DATA, bytes(i))
        done = box.ack(3)
        self.assertEqual([r.seq for r in done], [1, 2])
        self.assertEqual(box.acked, 3)
        self.assertEqual(box.bytes, 2 + 3 + 4 + 3 * OVERHEAD)
        self.assertEqual([r.seq for r in box.unplaced()], [3, 4, 5])

    def test_old_ack_ignored(self):
        box = Outbox(10_000)
        for _ in range(4):
            box.add(DATA, b"x")
        box.ack(4)
        self.assertEqual(box.ack(2), [])
        self.assertEqual(box.ack(4), [])
        self.assertEqual(box.acked, 4)
        self.assertEqual([r.seq for r in box.unplaced()], [4])

    def test_ack_of_everything_and_beyond(self):
        box = Outbox(10_000)
        box.add(DATA, b"x")
        box.add(DATA, b"y")
        self.assertRaises(SequenceError, box.ack, 4)
        self.assertEqual(box.bytes, 2 * (1 + OVERHEAD))  # nothing forgotten by the bad one
        self.assertEqual(len(box.ack(3)), 2)
        self.assertTrue(box.idle)
        self.assertEqual(box.bytes, 0)
        self.assertRaises(SequenceError, box.ack, 4)

    def test_lost_returns_only_that_lanes_unacked(self):
        box = Outbox(10_000)
        x, y = object(), object()
        for i in range(6):
            box.place(box.add(DATA, b"%d" % i), x if i % 2 == 0 else y)  # 1,3,5 on x; 2,4,6 on y
        self.assertEqual(box.unplaced(), [])
        box.ack(2)  # 1 acknowledged
        again = box.lost(x)
        self.assertEqual([r.seq for r in again], [3, 5])
        self.assertTrue(all(r.lane is None for r in again))
        self.assertEqual([r.seq for r in box.unplaced()], [3, 5])
        self.assertEqual(box.lost(x), [])
        self.assertEqual([r.seq for r in box.lost(y)], [2, 4, 6])
        self.assertEqual([r.seq for r in box.unplaced()], [2, 3, 4, 5, 6])
        box.place(box.unplaced()[0], y)
        box.ack(4)  # 2 and 3 acknowledged: 3 had no lane
        self.assertEqual([r.seq for r in box.unplaced()], [4, 5, 6])
        box.ack(7)
        self.assertEqual(box.unplaced(), [])
        box.add(DATA, b"new")
        self.assertEqual([r.seq for r in box.unplaced()], [7])


class InboxTests(SynchronousTestCase):

    def test_in_order(self):
        box = Inbox(1000)
        self.assertEqual(box.add(1, OFFER, b"a"), [(OFFER, b"a")])
        self.assertEqual(box.add(2, DATA, b"b"), [(DATA, b"b")])
        self.assertEqual(box.next, 3)
        self.assertEqual(box.held_bytes, 0)

    def test_reorder_delivered_once_in_order(self):
        box = Inbox(10_000)
        self.assertEqual(box.add(3, DATA, b"c"), [])
        self.assertEqual(box.add(5, DATA, b"e"), [])
        self.assertEqual(box.add(2, FILE, b"b"), [])
        self.assertEqual(box.held_bytes, 3 * (1 + OVERHEAD))
        self.assertEqual(box.add(1, OFFER, b"a"), [(OFFER, b"a"), (FILE, b"b"), (DATA, b"c")])
        self.assertEqual(box.next, 4)
        self.assertEqual(box.held_bytes, 1 + OVERHEAD)
        self.assertEqual(box.add(4, DATA, b"d"), [(DATA, b"d"), (DATA, b"e")])
        self.assertEqual(box.held_bytes, 0)
        self.assertEqual(box.duplicates, 0)

    def test_duplicates_dropped_and_counted(self):
        box = Inbox(10_000)
        box.add(1, DATA, b"a")
        box.add(3, DATA, b"c")
        self.assertFalse(box.is_new(1))
        self.assertFalse(box.is_new(3))
        self.assertTrue(box.is_new(2))
        self.assertEqual(box.add(1, DATA, b"a"), [])  # delivered already
        self.assertEqual(box.add(3, DATA, b"c"), [])  # held already
        self.assertEqual(box.duplicates, 2)
        self.assertEqual(box.held_bytes, 1 + OVERHEAD)
        self.assertEqual(box.add(2, DATA, b"b"), [(DATA, b"b"), (DATA, b"c")])

    def test_held_bytes_limit(self):
        box = Inbox(2 * (10 + OVERHEAD))
        box.add(2, DATA, bytes(10))
        box.add(3, DATA, bytes(10))  # exactly the limit: fine
        self.assertRaises(SequenceError, box.add, 4, DATA, b"x")

    def test_in_order_records_are_not_held(self):
        box = Inbox(10 + OVERHEAD)
        for seq in range(1, 50):
            box.add(seq, DATA, bytes(100))  # far more than the limit, in order
        self.assertEqual(box.held_bytes, 0)


class Base(SynchronousTestCase):

    def net(self, window=64 * 1024):
        return Net(window)

    def assertSent(self, side, expected):
        self.assertEqual(side.records, expected)


class OrderTests(Base):

    def test_one_lane(self):
        net = self.net()
        w = net.wire()
        sent = records(5)
        for r in sent:
            net.a.link.send(*r)
        net.settle()
        self.assertSent(net.b, sent)
        self.assertEqual(w.a.data_sent(), [1, 2, 3, 4, 5])
        self.assertTrue(net.a.link._outbox.idle)

    def test_one_side_joins_first(self):
        net = self.net()
        w = net.wire(join=False)
        w.join(b=False)
        for r in records(3):
            net.a.link.send(*r)
        w.deliver("a")  # B's connection keeps them until B joins it
        self.assertEqual(net.b.records, [])
        w.join(a=False)
        self.assertSent(net.b, records(3))
        net.settle()
        self.assertTrue(net.a.link._outbox.idle)

    def test_three_lanes_any_order(self):
        net = self.net()
        wires = [net.wire() for _ in range(3)]
        net.settle()
        sent = records(12)
        for r in sent:
            net.a.link.send(*r)
        # The load is shared: each lane got its part.
        self.assertEqual(sorted(s for w in wires for s in w.a.data_sent()), list(range(1, 13)))
        for w in wires:
            self.assertEqual(len(w.a.data_sent()), 4)
        first = min(wires, key=lambda w: w.a.data_sent()[0])
        for w in wires:
            if w is not first:
                w.deliver("a")
        self.assertEqual(net.b.records, [])  # record 1 is still on its lane
        first.deliver("a")
        self.assertSent(net.b, sent)
        net.settle()
        self.assertSent(net.b, sent)
        self.assertEqual(net.b.link._inbox.duplicates, 0)

    def _random_run(self, seed, paths=("direct",), idle=False):
        rng = random.Random(seed)
        net = Net(window=rng.choice([2048, 4096, 16384]))
        for _ in range(rng.randint(1, 3)):
            net.wire(rng.choice(paths))
        net.flush()
        to_b = [(rng.choice([OFFER, DATA, DATA, FILE]), payload(i, rng.randint(9, 700))) for i in range(300)]
        to_a = [(rng.choice([ACK, DATA]), payload(i, rng.randint(9, 300))) for i in range(80)]
        pa, pb = Pull(net.a.link, to_b, burst=rng.randint(1, 4)), Pull(net.b.link, to_a, burst=1)
        net.a.link.registerProducer(pa, False)
        net.b.link.registerProducer(pb, False)
        for step in range(4000):
            live = [w for w in net.wires if not w.gone]
            roll = rng.random()
            if roll < 0.04 and live:
                rng.choice(live).cut()
            elif roll < 0.08 or not live:
                net.wire(rng.choice(paths))
            elif roll < 0.11 and live:
                e = rng.choice(live).end(rng.choice("ab"))
                if e.lost is None:
                    e.set_writable(not e.writable)
            elif roll < 0.16:
                net.advance(ACK_DELAY)
            else:
                ready = [(w, s) for w in live for s in "ab" if w.pending(s)]
                if ready:
                    w, s = rng.choice(ready)
                    w.deliver(s, rng.randint(1, 3))
        if not [w for w in net.wires if not w.gone]:
            net.wire(rng.choice(paths))
        for w in net.wires:
            for e in (w.a, w.b):
                if e.lost is None and not e.writable:
                    e.set_writable(True)
        net.settle(rng)
        self.assertEqual(pa.reentered + pb.reentered, 0)
        self.assertEqual(net.b.records, to_b, f"seed {seed}")
        self.assertEqual(net.a.records, to_a, f"seed {seed}")
        self.assertEqual(net.a.lost + net.b.lost, [])
        if idle:
            self.assertTrue(net.a.link._outbox.idle, f"seed {seed}")
            self.assertTrue(net.b.link._outbox.idle, f"seed {seed}")
        return net

    def test_random_interleaving_and_loss(self):
        for seed in range(25):
            self._random_run(seed)

    def test_random_relay_only(self):
        for seed in range(25):
            self._random_run(1000 + seed, paths=("relay",))

    def test_random_everything_acknowledged(self):
        for seed in range(25):
            self._random_run(2000 + seed, idle=True)

    def test_random_upgrades(self):
        for seed in range(25):
            self._random_run(3000 + seed, paths=("direct", "relay"))


class LossTests(Base):

    def two(self):
        net = self.net()
        w0, w1 = net.wire(), net.wire()
        net.flush()  # the SACKs of joining
        for r in records(6):
            net.a.link.send(*r)
        self.assertEqual(w0.a.data_sent(), [1, 3, 5])
        self.assertEqual(w1.a.data_sent(), [2, 4, 6])
        return net, w0, w1

    def test_lost_lane_resent_on_another(self):
        net, w0, w1 = self.two()
        w0.cut()
        self.assertEqual(w1.a.data_sent(), [2, 4, 6, 1, 3, 5])
        net.settle()
        self.assertSent(net.b, records(6))
        self.assertEqual(net.b.link._inbox.duplicates, 0)
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])
        self.assertTrue(net.a.link._outbox.idle)

    def test_delivered_but_unacknowledged_arrive_once(self):
        net, w0, w1 = self.two()
        w0.deliver("a")  # 1 delivered, 3 and 5 held; B's SACK not back yet
        self.assertSent(net.b, records(1))
        w0.cut()
        net.settle()
        self.assertSent(net.b, records(6))
        self.assertEqual(net.b.link._inbox.duplicates, 3)
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])

    def test_all_lost_then_new_lane_waits_for_its_sack(self):
        net = self.net()
        w0 = net.wire()
        net.flush()
        for r in records(6):
            net.a.link.send(*r)
        w0.deliver("a", 4)  # B has 1..4; its SACKs are still on the wire
        w0.cut("gone")
        self.assertEqual(net.a.lost_all, ["gone"])
        self.assertEqual(net.b.lost_all, ["gone"])
        self.assertEqual(net.a.lost + net.b.lost, [])
        w1 = net.wire()
        self.assertEqual(w1.a.data_sent(), [])  # nothing until B says what it has
        net.a.link.send(*records(1, start=7)[0])  # a new record goes at once
        self.assertEqual(w1.a.data_sent(), [7])
        net.settle()
        self.assertEqual(w1.a.data_sent(), [7, 5, 6])
        self.assertSent(net.b, records(7))
        self.assertEqual(net.b.link._inbox.duplicates, 0)
        self.assertTrue(net.a.link._outbox.idle)

    def test_resent_only_on_lanes_that_acknowledged(self):
        net = self.net()
        w0 = net.wire()
        net.flush()
        for r in records(4):
            net.a.link.send(*r)
        w0.deliver("a")  # B has 1..4; its SACKs are still on the wire
        w1 = net.wire()  # B's SACK of joining (5) on the wire too
        w0.cut()
        self.assertEqual(w1.a.data_sent(), [])  # not before B says what it has
        net.settle()
        self.assertEqual(w1.a.data_sent(), [])
        self.assertEqual(net.b.link._inbox.duplicates, 0)
        self.assertTrue(net.a.link._outbox.idle)
        self.assertSent(net.b, records(4))

    def test_silently_dead_lane_gives_its_records_to_the_other(self):
        net, w0, w1 = self.two()
        w0.blackhole()
        for _ in range(int(SILENCE + KEEPALIVE_INTERVAL) + 1):
            net.advance(1.0)
            net.flush()
        self.assertTrue(w0.a.aborted)
        self.assertTrue(w0.b.aborted)
        net.settle()
        self.assertSent(net.b, records(6))
        self.assertFalse(w1.a.aborted or w1.b.aborted)

    def test_duplicate_is_acknowledged(self):
        # B's record reached A, A's SACK was lost with the lane, B sent it
        # again on the other lane: A must say it has it, or B waits for
        # that acknowledgement forever (its close() never completes).
        net = self.net()
        w0, w1 = net.wire(), net.wire()
        net.flush()
        net.b.link.send(ACK, b"{}")
        (lane,) = [w for w in (w0, w1) if w.b.data_sent()]
        other = w1 if lane is w0 else w0
        lane.deliver("b")
        self.assertEqual(net.a.records, [(ACK, b"{}")])
        lane.cut()  # A's SACK with it
        self.assertEqual(other.b.data_sent(), [1])  # sent again
        net.settle()
        self.assertEqual(net.a.records, [(ACK, b"{}")])
        self.assertEqual(net.a.link._inbox.duplicates, 1)
        self.assertTrue(net.b.link._outbox.idle)

    def test_duplicate_then_close_completes(self):
        # The same, as the receiver's last ACK: its close() must end.
        net = self.net()
        w0, w1 = net.wire(), net.wire()
        net.flush()
        net.b.link.send(ACK, b"{}")
        (lane,) = [w for w in (w0, w1) if w.b.data_sent()]
        lane.deliver("b")
        lane.cut()
        net.b.link.close()
        net.settle()
        self.assertEqual(net.b.lost, ["closed"])
        self.assertEqual(net.b.lost_all, [])


class UpgradeTests(Base):

    def test_direct_retires_relay(self):
        net = self.net()
        r = net.wire("relay")
        net.flush()
        for rec in records(3):
            net.a.link.send(*rec)
        self.assertEqual(r.a.data_sent(), [1, 2, 3])
        d = net.wire("direct")
        for rec in records(3, start=4):
            net.a.link.send(*rec)
        self.assertEqual(d.a.data_sent(), [4, 5, 6])  # new records go direct
        self.assertEqual(r.a.data_sent(), [1, 2, 3])
        self.assertNotIn(LEAVE, r.a.kinds_sent())  # 1..3 not acknowledged yet
        self.assertFalse(r.a.closed)
        d.deliver("a")
        r.deliver("a")
        self.assertSent(net.b, records(6))
        self.assertNotIn(LEAVE, r.a.kinds_sent())
        d.deliver("b")
        r.deliver("b")  # B's SACKs (on either lane): 1..6 acknowledged
        self.assertEqual(r.a.kinds_sent()[-1], LEAVE)
        self.assertTrue(r.a.closed)
        self.assertFalse(r.a.closed_with_producer)
        net.settle()
        self.assertTrue(r.gone)
        self.assertNotIn(LEAVE, r.b.kinds_sent())  # only the leader says LEAVE
        self.assertFalse(d.a.closed or d.b.closed)
        self.assertEqual(net.a.lost_all + net.b.lost_all + net.a.lost + net.b.lost, [])
        self.assertEqual(net.a.link.path, "direct")
        self.assertEqual(net.b.link.path, "direct")
        self.assertSent(net.b, records(6))
        self.assertEqual(net.b.link._inbox.duplicates, 0)

    def test_relay_with_nothing_in_flight_left_at_once(self):
        net = self.net()
        r = net.wire("relay")
        net.settle()
        net.wire("direct")
        self.assertEqual(r.a.kinds_sent()[-1], LEAVE)
        self.assertTrue(r.a.closed)
        net.settle()
        self.assertTrue(r.gone)
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])

    def test_late_relay_retired_at_once(self):
        net = self.net()
        net.wire("direct")
        net.settle()
        r = net.wire("relay")
        self.assertIn(LEAVE, r.a.kinds_sent())
        net.a.link.send(OFFER, b"x")
        self.assertEqual(r.a.data_sent(), [])
        net.settle()
        self.assertTrue(r.gone)
        self.assertEqual(net.a.paths + net.b.paths, [])  # still one direct lane

    def test_follower_requeues_on_leave(self):
        net = self.net()
        r = net.wire("relay")
        net.flush()
        net.b.link.send(ACK, b"b1")  # on the relay, not delivered yet
        self.assertEqual(r.b.data_sent(), [1])
        d = net.wire("direct")
        self.assertTrue(r.a.closed)  # A had nothing on it: LEAVE at once
        d.deliver("a")  # A's SACK of joining: B may send on d
        r.deliver("b")  # A ignores b1: it closed the lane
        self.assertEqual(r.a.ignored[0][:2], (ACK, 1))
        self.assertEqual(d.b.data_sent(), [])
        r.deliver("a", 1)  # B hears LEAVE; the lane is not gone yet
        self.assertFalse(r.gone)
        self.assertEqual(d.b.data_sent(), [1])  # B sent it again, direct
        net.flush()
        self.assertEqual(net.a.records, [(ACK, b"b1")])
        net.settle()
        self.assertEqual(net.a.records, [(ACK, b"b1")])
        self.assertTrue(net.b.link._outbox.idle)
        self.assertTrue(r.gone)

    def test_relay_left_then_direct_cut_is_not_the_end(self):
        # A retired the relay (LEAVE) and the direct lane broke before the
        # relay lane was gone: B must reconnect, not take the LEAVE for
        # the end of the session.
        net = self.net()
        r = net.wire("relay")
        net.flush()
        d = net.wire("direct")
        self.assertTrue(r.a.closed)  # LEAVE sent
        d.cut()
        net.flush()
        self.assertTrue(r.gone)
        self.assertEqual(net.b.lost, [])
        self.assertEqual(len(net.b.lost_all), 1)
        self.assertEqual(len(net.a.lost_all), 1)
        w = net.wire("direct")  # reconnected: the session goes on
        net.a.link.send(OFFER, b"more")
        net.settle()
        self.assertEqual(net.b.records, [(OFFER, b"more")])
        self.assertFalse(w.a.closed)

    def test_delayed_sack_not_lost_on_a_retired_lane(self):
        # A's SACK of b1 is due on the relay lane it came by, but A retires
        # that lane before the ACK_DELAY is up.
        net = self.net()
        r = net.wire("relay")
        net.flush()
        net.a.link.send(OFFER, b"a1")
        net.b.link.send(DATA, b"b1")
        d = net.wire("direct")
        d.deliver("a")
        d.deliver("b")
        r.deliver("b")  # A has b1: SACK in ACK_DELAY, on the relay
        r.deliver("a")  # B has a1: SACK at once, on the relay
        d.deliver("b")
        r.deliver("b", 1)  # A hears it: nothing of A's on the relay -> LEAVE
        self.assertTrue(r.a.closed)
        net.clock.advance(ACK_DELAY)
        self.assertEqual([k for k, s, p in r.a.after_close if k == SACK], [])
        net.settle()
        self.assertEqual(net.a.records, [(DATA, b"b1")])
        self.assertTrue(net.b.link._outbox.idle)

    def test_lane_lost_before_it_joined_retires_nothing(self):
        net = self.net()
        r = net.wire("relay")
        net.flush()
        d = net.wire("direct", join=False)
        d.a.lose_now()  # reset before the leader got to join it
        d.join(b=False)
        self.assertFalse(r.a.closed)
        self.assertNotIn(LEAVE, r.a.kinds_sent())
        net.a.link.send(OFFER, b"x")
        self.assertEqual(r.a.data_sent(), [1])
        self.assertEqual(net.a.link.path, "relay")

    def test_direct_lost_while_relay_retiring(self):
        net = self.net()
        r = net.wire("relay")
        net.flush()
        net.a.link.send(*records(1)[0])  # on the relay, unacknowledged: it stays
        d = net.wire("direct")
        for rec in records(3, start=2):
            net.a.link.send(*rec)
        self.assertEqual(d.a.data_sent(), [2, 3, 4])
        d.cut()
        # The relay carries on, with what the direct lane had.
        self.assertEqual(r.a.data_sent(), [1, 2, 3, 4])
        net.settle()
        self.assertSent(net.b, records(4))
        self.assertFalse(r.gone)
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])
        self.assertEqual(net.a.link.path, "relay")


class PathChangedTests(Base):

    def test_changes_reported_but_not_the_first_lane(self):
        net = self.net()
        r0 = net.wire("relay")
        self.assertEqual(net.a.paths, [])
        self.assertEqual(net.b.paths, [])
        net.settle()
        net.wire("relay")
        self.assertEqual(net.a.paths, [("relay", r0.a.peer, 2)])
        self.assertEqual(net.b.paths, [("relay", r0.b.peer, 2)])
        d = net.wire("direct")
        self.assertEqual(net.a.paths[-1], ("direct", d.a.peer, 1))
        self.assertEqual(net.b.paths[-1], ("direct", d.b.peer, 1))
        net.settle()
        shown = len(net.a.paths)
        d2 = net.wire("direct")
        self.assertEqual(net.a.paths[shown:], [("direct", d.a.peer, 2)])
        d2.cut()
        self.assertEqual(net.a.paths[shown + 1:], [("direct", d.a.peer, 1)])
        self.assertEqual(net.a.paths[0], ("relay", r0.a.peer, 2))

    def test_nothing_when_lost_and_back_the_same(self):
        net = self.net()
        net.wire("relay").cut()
        net.wire("relay")
        self.assertEqual(net.a.paths, [])
        self.assertEqual(net.a.lost_all, ["Connection reset by peer"])


class EndTests(Base):

    def test_lost_all_then_give_up(self):
        net = self.net()
        w = net.wire()
        closed = []
        net.a.link.whenClosed().addCallback(closed.append)
        w.cut("reset")
        self.assertEqual(net.a.lost_all, ["reset"])
        self.assertEqual(net.a.lost, [])
        self.assertEqual(closed, [])
        net.a.link.give_up("no way back")
        net.a.link.give_up("again")
        self.assertEqual(net.a.lost, ["no way back"])
        self.assertEqual(closed, [None])
        self.assertEqual(net.a.lost_all, ["reset"])

    def test_join_after_end_is_left(self):
        net = self.net()
        net.wire().cut()
        net.a.link.give_up("over")
        w = net.wire(join=False)
        w.join(b=False)
        self.assertIn(LEAVE, w.a.kinds_sent())
        self.assertTrue(w.a.closed)

    def test_close_waits_for_ack_then_leaves_every_lane(self):
        net = self.net()
        wires = [net.wire(), net.wire()]
        net.flush()
        for r in records(4):
            net.a.link.send(*r)
        net.a.link.close()
        for w in wires:
            self.assertNotIn(LEAVE, w.a.kinds_sent())
            w.deliver("a")  # B acknowledges at once
        for w in wires:
            self.assertNotIn(LEAVE, w.a.kinds_sent())
        wires[0].deliver("b")
        self.assertTrue(all(not w.a.closed for w in wires))  # 2 and 4 not acknowledged
        wires[1].deliver("b")
        for w in wires:
            self.assertEqual(w.a.kinds_sent()[-1], LEAVE)
            self.assertTrue(w.a.closed)
            self.assertFalse(w.a.closed_with_producer)
        self.assertEqual(net.a.lost, [])
        net.settle()
        self.assertTrue(all(w.gone for w in wires))
        self.assertEqual(net.a.lost, ["closed"])
        self.assertEqual(net.b.lost, ["the other side closed the connection"])
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])
        self.assertSent(net.b, records(4))

    def test_both_close(self):
        net = self.net()
        net.wire("relay"), net.wire("relay")
        net.flush()
        net.a.link.send(OFFER, b"end")
        net.settle()
        net.a.on_record = lambda kind, p: net.a.link.close()  # like the Sender on ACK
        net.b.link.send(ACK, b"ack")
        net.b.link.close()
        net.settle()
        self.assertEqual(net.a.lost, ["closed"])
        self.assertEqual(net.b.lost, ["closed"])
        self.assertEqual(net.a.lost_all + net.b.lost_all, [])
        closed = []
        net.a.link.whenClosed().addCallback(closed.append)
        net.b.link.whenClosed().addCallback(closed.append)
        self.assertEqual(closed, [None, None])

    def test_close_drops_what_was_not_delivered(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.b.link.pauseReading()
        net.a.link.send(OFFER, b"1")
        w.b.inject(OFFER, 1, b"1")  # arrives, held: reading is paused
        net.b.link.close()
        net.b.link.resumeReading()
        self.assertEqual(net.b.records, [])

    def test_close_while_reading_is_paused(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.b.link.pauseReading()
        net.a.link.send(OFFER, b"x")
        net.b.link.close()  # nothing of B's unacknowledged: LEAVE now
        self.assertTrue(w.b.closed)
        net.settle()
        self.assertTrue(w.gone)
        self.assertEqual(net.b.lost, ["closed"])
        self.assertEqual(net.b.records, [])

    def test_close_while_paused_reads_the_ack_of_what_it_sent(self):
        """A transfer that ends while it holds its records (a disk write
        pending, then a failure) sends its ABORT or ACK and closes with
        reading paused: the peer's acknowledgement of that last record
        must still be read, or the session waits out its close timeout."""
        net = self.net()
        w = net.wire()
        net.flush()
        net.b.link.pauseReading()
        net.b.link.send(ACK, b"last")
        net.b.link.close()
        net.settle()
        self.assertEqual(net.a.records, [(ACK, b"last")])
        self.assertTrue(w.gone)
        self.assertEqual(net.b.lost, ["closed"])

    def test_close_without_lanes(self):
        net = self.net()
        net.wire().cut()
        net.a.link.close()
        self.assertEqual(net.a.lost, ["closed"])

    def test_abort(self):
        net = self.net()
        wires = [net.wire(), net.wire()]
        net.settle()
        net.a.link.abort()
        self.assertTrue(all(w.a.aborted for w in wires))
        self.assertEqual(len(net.a.lost), 1)
        self.assertEqual(net.a.lost_all, [])
        closed = []
        net.a.link.whenClosed().addCallback(closed.append)
        self.assertEqual(closed, [None])

    def test_abort_with_unacknowledged_records_ends(self):
        # Endpoint's CLOSE_TIMEOUT calls abort() exactly when records are
        # not acknowledged: the session must end, not ask to reconnect.
        net = self.net()
        w = net.wire()
        net.flush()
        net.a.link.send(OFFER, b"never acknowledged")
        net.a.link.abort()
        self.assertTrue(w.a.aborted)
        self.assertEqual(net.a.lost_all, [])
        self.assertEqual(len(net.a.lost), 1)


class SilenceTests(Base):

    def test_silent_lane_aborted(self):
        net = self.net()
        w = net.wire()
        w.blackhole()
        net.clock.advance(SILENCE)
        self.assertFalse(w.a.aborted)
        net.clock.advance(KEEPALIVE_INTERVAL)
        self.assertTrue(w.a.aborted)
        self.assertTrue(w.b.aborted)
        self.assertEqual(net.a.lost_all, [w.a.lost])

    def test_keepalives_keep_it(self):
        net = self.net()
        w = net.wire()
        for _ in range(10 * int(SILENCE)):
            net.advance(1.0)
            net.flush()
        self.assertFalse(w.a.aborted or w.b.aborted)
        self.assertIn(KEEPALIVE, w.a.kinds_sent())

    def test_not_while_reading_is_paused(self):
        net = self.net()
        w = net.wire()
        w.blackhole()
        net.a.link.pauseReading()
        net.clock.advance(KEEPALIVE_INTERVAL)
        for _ in range(10):
            net.clock.advance(KEEPALIVE_INTERVAL)
        self.assertFalse(w.a.aborted)
        net.a.link.resumeReading()  # heard counts from now
        net.clock.advance(SILENCE - 1)
        self.assertFalse(w.a.aborted)
        net.clock.advance(2 * KEEPALIVE_INTERVAL)
        self.assertTrue(w.a.aborted)

    def test_no_timer_once_ended(self):
        net = self.net()
        net.wire()
        net.a.link.abort()
        net.b.link.give_up("x")
        net.clock.advance(ACK_DELAY)
        self.assertEqual(net.clock.getDelayedCalls(), [])


class ProducerTests(Base):

    def test_pull_fills_window_then_waits_for_sack(self):
        net = self.net(window=10 * (100 + OVERHEAD))
        w = net.wire()
        net.flush()
        p = Pull(net.a.link, records(50))
        net.a.link.registerProducer(p, False)
        self.assertEqual(w.a.data_sent(), list(range(1, 11)))
        self.assertEqual(p.calls, 10)
        w.deliver("a", 3)
        self.assertEqual(p.calls, 10)  # A has not heard yet
        w.deliver("b")  # the SACKs of 1..3
        self.assertEqual(w.a.data_sent(), list(range(1, 14)))
        net.settle()
        self.assertSent(net.b, records(50))
        self.assertEqual(p.reentered, 0)

    def test_pull_stops_when_producer_writes_nothing(self):
        net = self.net()
        net.wire()
        p = Pull(net.a.link, [])
        net.a.link.registerProducer(p, False)
        self.assertEqual(p.calls, 1)

    def test_pull_not_called_while_unwritable(self):
        net = self.net()
        w = net.wire()
        net.flush()
        w.a.set_writable(False)
        p = Pull(net.a.link, records(5))
        net.a.link.registerProducer(p, False)
        self.assertEqual(p.calls, 0)
        w.a.set_writable(True)
        self.assertEqual(w.a.data_sent(), [1, 2, 3, 4, 5])

    def test_pull_never_reentered(self):
        net = self.net()
        w = net.wire()
        w2 = net.wire()
        net.flush()
        p = Pull(net.a.link, records(20))

        def toggle():
            # The transport says "full" then "room" while the producer writes.
            w2.a.set_writable(False)
            w2.a.set_writable(True)
            w.deliver("b")
        p.during = toggle
        net.a.link.registerProducer(p, False)
        self.assertEqual(p.reentered, 0)
        self.assertEqual(sorted(w.a.data_sent() + w2.a.data_sent()), list(range(1, 21)))

    def test_pull_resumes_on_new_lane(self):
        net = self.net()
        net.wire().cut()
        p = Pull(net.a.link, records(3))
        net.a.link.registerProducer(p, False)
        self.assertEqual(p.calls, 0)
        w = net.wire()
        self.assertEqual(w.a.data_sent(), [1, 2, 3])

    def test_streaming_paused_when_window_full_and_resumed(self):
        net = self.net(window=3 * (100 + OVERHEAD))
        w = net.wire()
        net.flush()
        p = Push()
        net.a.link.registerProducer(p, True)
        self.assertEqual(p.events, [])
        net.a.link.send(*records(1)[0])
        net.a.link.send(*records(1, start=2)[0])
        self.assertEqual(p.events, [])
        net.a.link.send(*records(1, start=3)[0])
        self.assertEqual(p.events, ["pause"])
        w.deliver("a")
        w.deliver("b")
        self.assertEqual(p.events, ["pause", "resume"])

    def test_streaming_paused_when_no_lane_takes_more(self):
        net = self.net()
        w = net.wire()
        net.flush()
        p = Push()
        net.a.link.registerProducer(p, True)
        w.a.set_writable(False)
        net.a.link.send(OFFER, b"x")
        self.assertEqual(p.events, ["pause"])
        w.a.set_writable(True)
        self.assertEqual(p.events, ["pause", "resume"])

    def test_streaming_registered_when_full_is_paused(self):
        net = self.net(window=100 + OVERHEAD)
        net.wire()
        net.a.link.send(*records(1)[0])
        p = Push()
        net.a.link.registerProducer(p, True)
        self.assertEqual(p.events, ["pause"])

    def test_unregistered_not_called(self):
        net = self.net(window=100 + OVERHEAD)
        w = net.wire()
        net.flush()
        p = Pull(net.a.link, records(5))
        net.a.link.registerProducer(p, False)
        self.assertEqual(p.calls, 1)
        net.a.link.unregisterProducer()
        net.settle()
        self.assertEqual(p.calls, 1)
        self.assertEqual(w.a.data_sent(), [1])


class ReadingTests(Base):

    def test_pause_holds_delivery_and_pauses_every_lane(self):
        net = self.net()
        wires = [net.wire(), net.wire()]
        net.flush()
        net.b.link.pauseReading()
        self.assertTrue(all(w.b.paused for w in wires))
        for r in records(4):
            net.a.link.send(*r)
        net.settle()
        self.assertEqual(net.b.records, [])
        net.b.link.resumeReading()
        self.assertTrue(not any(w.b.paused for w in wires))
        net.settle()
        self.assertSent(net.b, records(4))

    def test_pause_inside_delivery_holds_the_rest(self):
        net = self.net()
        w0, w1 = net.wire(), net.wire()
        net.flush()
        for r in records(4):
            net.a.link.send(*r)
        w1.deliver("a")  # 2 and 4 held
        net.b.on_record = lambda kind, p: net.b.link.pauseReading()
        w0.deliver("a", 1)  # 1 makes 1, 2 ready; B pauses after 1
        self.assertSent(net.b, records(1))
        net.b.on_record = None
        net.b.link.resumeReading()
        self.assertSent(net.b, records(2))
        net.settle()
        self.assertSent(net.b, records(4))

    def test_records_before_attach_delivered_on_attach(self):
        net = self.net()
        from .fakelanes import Side
        net.b = Side(net.clock, False, 64 * 1024, attach=False)
        w = net.wire()
        net.flush()
        for r in records(3):
            net.a.link.send(*r)
        net.flush()
        self.assertEqual(net.b.records, [])
        net.b.link.attach(net.b)
        self.assertSent(net.b, records(3))
        self.assertEqual(net.b.lost, [])
        self.assertEqual(w.a.data_sent(), [1, 2, 3])

    def test_held_records_survive_the_lane(self):
        net = self.net()
        w0, w1 = net.wire(), net.wire()
        net.flush()
        net.b.link.pauseReading()
        for r in records(4):
            net.a.link.send(*r)
        w0.b.inject(*((OFFER, 1, payload(1))))  # arrived just before the pause took effect
        w0.cut()
        net.b.link.resumeReading()
        self.assertSent(net.b, records(1))
        net.settle()
        self.assertSent(net.b, records(4))
        self.assertFalse(w1.b.paused)

    def test_lane_joining_while_paused_is_paused(self):
        net = self.net()
        net.wire()
        net.b.link.pauseReading()
        w = net.wire()
        self.assertTrue(w.b.paused)


class CountTests(Base):

    def test_by_arrival_path(self):
        net = self.net()
        r = net.wire("relay")
        net.flush()
        net.a.link.send(OFFER, b"r" * 10)  # 1 on the relay
        d = net.wire("direct")
        net.a.link.send(OFFER, b"d" * 3)  # 2 direct
        d.deliver("a")  # 2 first: held
        self.assertEqual(net.b.records, [])
        self.assertEqual((net.b.link.received.direct, net.b.link.received.relay), (3, 0))
        r.deliver("a")
        self.assertEqual(net.b.records, [(OFFER, b"r" * 10), (OFFER, b"d" * 3)])
        self.assertEqual((net.b.link.received.direct, net.b.link.received.relay), (3, 10))
        self.assertEqual((net.a.link.sent.direct, net.a.link.sent.relay), (3, 10))
        self.assertEqual(net.a.link.sent.streams, 1)
        net.settle()
        self.assertEqual((net.b.link.received.direct, net.b.link.received.relay), (3, 10))

    def test_duplicates_not_counted_twice(self):
        net = self.net()
        w0 = net.wire()
        net.wire()
        net.flush()
        net.a.link.send(OFFER, b"x" * 7)
        net.a.link.send(OFFER, b"y" * 5)
        w0.deliver("a")  # 1
        w0.cut()  # 1 goes again on w1, with 2
        net.settle()
        self.assertEqual(net.b.link.received.direct, 12)
        self.assertEqual(net.b.link._inbox.duplicates, 1)

    def test_streams_is_the_most_lanes(self):
        net = self.net()
        ws = [net.wire() for _ in range(3)]
        ws[0].cut()
        self.assertEqual(net.a.link.sent.streams, 3)
        self.assertEqual(net.b.link.received.streams, 3)


class SackTests(Base):

    def sacks(self, end):
        return [struct.unpack(">Q", p)[0] for kind, seq, p in end.sent if kind == SACK]

    def test_sack_on_join(self):
        net = self.net()
        w = net.wire()
        self.assertEqual(self.sacks(w.a), [1])
        self.assertEqual(self.sacks(w.b), [1])

    def test_immediate_for_other_kinds(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.a.link.send(OFFER, b"x")
        w.deliver("a")
        self.assertEqual(self.sacks(w.b), [1, 2])

    def test_delayed_for_data(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.a.link.send(DATA, b"x" * 100)
        net.a.link.send(DATA, b"x" * 100)
        w.deliver("a")
        self.assertEqual(self.sacks(w.b), [1])
        net.clock.advance(ACK_DELAY * 0.9)
        self.assertEqual(self.sacks(w.b), [1])
        net.clock.advance(ACK_DELAY * 0.2)
        self.assertEqual(self.sacks(w.b), [1, 3])
        net.clock.advance(1)
        self.assertEqual(self.sacks(w.b), [1, 3])

    def test_immediate_every_ack_bytes(self):
        net = self.net(window=4 * ACK_BYTES)
        w = net.wire()
        net.flush()
        half = ACK_BYTES // 2
        for _ in range(3):
            net.a.link.send(DATA, bytes(half))
        w.deliver("a", 1)
        self.assertEqual(self.sacks(w.b), [1])
        w.deliver("a", 1)
        self.assertEqual(self.sacks(w.b), [1, 3])
        w.deliver("a", 1)
        self.assertEqual(self.sacks(w.b), [1, 3])
        net.clock.advance(ACK_DELAY)
        self.assertEqual(self.sacks(w.b), [1, 3, 4])

    def test_data_then_control_acknowledged_at_once(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.a.link.send(DATA, b"x")
        w.deliver("a")
        net.a.link.send(END, b"{}")
        w.deliver("a")
        self.assertEqual(self.sacks(w.b), [1, 3])

    def test_streamed_kinds_are_the_transfers(self):
        from p2pft.session.link import STREAMED
        from p2pft.transfer.records import FILES
        self.assertEqual(STREAMED, {DATA, FILE, FILE_END, FILES})

    def test_file_records_wait_like_data(self):
        """FILE and FILE_END come three a file with DATA: acknowledged by
        bytes or delay, not one SACK each."""
        net = self.net()
        w = net.wire()
        net.flush()
        for kind in (FILE, DATA, FILE_END, FILE, DATA, FILE_END):
            net.a.link.send(kind, b"{}")
            w.deliver("a")
        self.assertEqual(self.sacks(w.b), [1])
        net.clock.advance(ACK_DELAY)
        self.assertEqual(self.sacks(w.b), [1, 7])

    def test_sack_on_close(self):
        net = self.net()
        w = net.wire()
        net.flush()
        net.a.link.send(DATA, b"x")
        w.deliver("a")
        net.b.link.close()
        self.assertEqual(self.sacks(w.b), [1, 2])


class ProtocolErrorTests(Base):

    def assertEnded(self, net, w):
        self.assertEqual(len(net.a.lost), 1)
        self.assertTrue(net.a.lost[0].startswith("protocol error"), net.a.lost[0])
        self.assertTrue(w.a.aborted)
        self.assertEqual(net.a.lost_all, [])

    def test_unsequenced_transfer_kind(self):
        for kind in range(1, 13):
            net = self.net()
            w = net.wire()
            w.a.inject(kind, 0, b"{}")
            self.assertEnded(net, w)
            self.assertEqual(net.a.records, [])

    def test_nothing_after_the_error(self):
        net = self.net()
        w = net.wire()
        w.a.inject(DATA, 0, b"x")
        w.a.inject(DATA, 1, b"y")
        self.assertEqual(net.a.records, [])
        self.assertEqual(len(net.a.lost), 1)

    def test_malformed_sack(self):
        net = self.net()
        w = net.wire()
        w.a.inject(SACK, 0, b"\x00\x01")
        self.assertEnded(net, w)

    def test_sack_of_records_never_sent(self):
        net = self.net()
        w = net.wire()
        net.a.link.send(OFFER, b"x")
        w.a.inject(SACK, 0, sack(2))  # fine
        w.a.inject(SACK, 0, sack(3))
        self.assertEnded(net, w)

    def test_too_far_ahead(self):
        net = self.net(window=1000)
        w = net.wire()
        limit = net.a.link._inbox.limit
        w.a.inject(DATA, 2, bytes(limit))
        self.assertEnded(net, w)

    def test_keepalive_ignored(self):
        net = self.net()
        w = net.wire()
        w.a.inject(KEEPALIVE, 0, b"")
        self.assertEqual(net.a.lost + net.a.records, [])


class ControlTests(Base):

    def test_control_kinds_to_the_callback(self):
        net = self.net()
        w = net.wire()
        w.a.inject(CONTROL, 0, b"grow")
        w.a.inject(CONTROL + 7, 0, b"other")
        self.assertEqual(net.a.controls, [(CONTROL, b"grow"), (CONTROL + 7, b"other")])
        self.assertEqual(net.a.records, [])
        self.assertEqual(net.a.lost, [])

    def test_send_control(self):
        net = self.net()
        r = net.wire("relay")
        d = net.wire("direct")
        self.assertTrue(net.b.link.send_control(CONTROL, b"hi"))
        self.assertEqual(d.b.sent[-1], (CONTROL, 0, b"hi"))
        self.assertNotIn(CONTROL, r.b.kinds_sent())
        net.flush()
        self.assertEqual(net.a.controls, [(CONTROL, b"hi")])

    def test_send_control_without_lane(self):
        net = self.net()
        net.wire().cut()
        self.assertFalse(net.a.link.send_control(CONTROL, b"hi"))
