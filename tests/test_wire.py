"""
L{p2pft.channel.wire}: records sealed into reused buffers and sent from
them, read into one buffer and opened where they lie, driven here through
fake sockets (partial sends, full sockets, reads cut anywhere) so speed
never costs a byte.
"""

from __future__ import annotations

import os
import random


from twisted.internet import main
from twisted.trial.unittest import TestCase

from p2pft.channel import wire
from p2pft.secure import RecordOpener, RecordSealer, frame_size

KEY = bytes(range(32))


class FakeSocket:
    """Takes at most C{room} bytes (None: everything) until given more;
    gives what C{incoming} holds, at most C{chunk} bytes per read."""

    def __init__(self):
        self.out = bytearray()
        self.room: int | None = None
        self.incoming = bytearray()
        self.chunk: int | None = None
        self.eof = False
        self.error: OSError | None = None
        self.calls = 0

    def _take(self, data: bytes) -> int:
        self.calls += 1
        if self.error is not None:
            raise self.error
        n = len(data) if self.room is None else min(self.room, len(data))
        if n == 0 and data:
            raise BlockingIOError()
        self.out += data[:n]
        if self.room is not None:
            self.room -= n
        return n

    def send(self, view) -> int:
        return self._take(bytes(view))

    def sendmsg(self, views) -> int:
        if self.room is not None:  # (only what it can take is looked at)
            views, left = [], list(views)
            size = 0
            while left and size < max(self.room, 1):
                views.append(left.pop(0))
                size += len(views[-1])
        return self._take(b"".join(bytes(v) for v in views))

    def recv_into(self, view) -> int:
        if not self.incoming:
            if self.eof:
                return 0
            raise BlockingIOError()
        n = min(len(view), len(self.incoming), self.chunk or len(self.incoming))
        view[:n] = self.incoming[:n]
        del self.incoming[:n]
        return n


class FakeSide:
    """The Twisted transport as the wire sees it."""

    def __init__(self):
        self.socket = FakeSocket()
        self.own = bytearray()  # written through the transport itself
        self.writing = False
        self.write_closed = False
        self.open = True

    def accepts(self) -> bool:
        return self.open and not self.write_closed

    def own_buffered(self) -> bool:
        return bool(self.own)

    def start_writing(self) -> None:
        self.writing = True

    def own_doWrite(self):
        if self.own:
            n = self.socket.send(self.own)
            del self.own[:n]
        if not self.own:
            self.writing = False
        return None

    def lose_write_connection(self) -> None:
        self.write_closed = True


class Producer:
    def __init__(self):
        self.events = []

    def pauseProducing(self):
        self.events.append("pause")

    def resumeProducing(self):
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


def make_wire(place=None):
    side = FakeSide()
    got, failed = [], []
    w = wire.Wire(side, RecordSealer(KEY), RecordOpener(KEY),
                  lambda records: got.extend((k, s, bytes(p), p) for k, s, p in records), failed.append,
                  place or (lambda kind, seq, size: None))
    return w, side, got, failed


def frames(records) -> bytes:
    sealer = RecordSealer(KEY)
    return b"".join(b"".join(sealer.seal(kind, payload, seq)) for kind, payload, seq in records)


def opened(stream: bytes) -> list:
    return RecordOpener(KEY).feed(stream)


def drain(w, side, room=None) -> None:
    """Writable events until nothing is left (C{room} bytes per event)."""
    for _ in range(100_000):
        if not side.writing:
            return
        side.socket.room = room
        w.doWrite()
    raise AssertionError("never drained")


SIZES = [0, 1, 100, 4000, 5000, 64 * 1024, 256 * 1024, 300 * 1024, 1 << 20]


def payloads(seed=1):
    rng = random.Random(seed)
    return [(4 if n >= 4096 else 1 + i % 3, rng.randbytes(n), i + 1) for i, n in enumerate(SIZES)]


class WritingTests(TestCase):

    def test_frames_are_the_sealers(self):
        """What goes out is exactly what RecordSealer.seal makes, in order,
        for every size (small ones sealed as before, large ones into reused
        buffers)."""
        w, side, _, _ = make_wire()
        records = payloads()
        for kind, payload, seq in records:
            w.send(kind, payload, seq)
        self.assertEqual(bytes(side.socket.out), frames(records))
        self.assertFalse(side.writing)
        self.assertEqual(w.pending_bytes, 0)

    def test_partial_sends_keep_order_and_bytes(self):
        """A socket that takes a few bytes at a time: frames wait, in
        order, the buffers they wait in are not reused meanwhile, and the
        stream opens to exactly what was sent."""
        for room in (1, 13, 1000, 70_000):
            w, side, _, _ = make_wire()
            records = payloads(room) * 3
            if room < 1000:  # (a byte at a time: fewer, smaller records)
                records = [(k, p[:5000], s) for k, p, s in records[:6]]
            records = [(k, p, i + 1) for i, (k, p, _) in enumerate(records)]
            for kind, payload, seq in records:
                side.socket.room = room
                w.send(kind, payload, seq)
                side.socket.room = 0
            drain(w, side, room)
            self.assertEqual(bytes(side.socket.out), frames(records), room)
            self.assertEqual([(k, s, p) for k, s, p in opened(bytes(side.socket.out))],
                             [(k, s, p) for k, p, s in records])

    def test_pooled_buffer_reused_only_once_sent(self):
        """While the kernel holds back part of a frame, the next frames get
        other buffers; once sent, buffers go back to the pool (bounded)."""
        w, side, _, _ = make_wire()
        side.socket.room = 10
        big = [os.urandom(200 * 1024) for _ in range(8)]
        for i, payload in enumerate(big):
            w.send(4, payload, i + 1)
        side.socket.room = 0
        views = [v for v, _ in w._pending]
        self.assertEqual(len({id(buf) for _, buf in w._pending}), 8)
        drain(w, side, None)
        self.assertEqual([p for _, _, p in opened(bytes(side.socket.out))], big)
        self.assertLessEqual(len(w._pool), wire.POOL)
        self.assertTrue(views)

    def test_small_frames_queued_hold_only_themselves(self):
        """Small files' records queued behind a full socket: each holds its
        own frame, not a pooled buffer (memory stays what is queued)."""
        w, side, _, _ = make_wire()
        side.socket.room = 0
        for i in range(100):
            w.send(4, os.urandom(8000), i + 1)
        self.assertTrue(all(buf is None for _, buf in w._pending))
        self.assertEqual(w.pending_bytes, 100 * frame_size(8000))

    def test_producer_paused_while_pending(self):
        w, side, _, _ = make_wire()
        producer = Producer()
        w.registerProducer(producer, True)
        side.socket.room = 100
        w.send(4, os.urandom(10_000), 1)
        self.assertEqual(producer.events, ["pause"])
        w.send(4, os.urandom(10_000), 2)
        self.assertEqual(producer.events, ["pause"])
        side.socket.room = 5000
        w.doWrite()
        self.assertEqual(producer.events, ["pause"])  # still frames waiting
        drain(w, side, None)
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_twisteds_own_bytes_go_first(self):
        """Bytes written through the transport (the handshake's SELECT)
        before the records: they are sent first, whatever the socket takes."""
        w, side, _, _ = make_wire()
        side.own += b"SELECT-MAC" * 10
        side.socket.room = 7
        w.send(1, b"hello", 1)
        self.assertEqual(bytes(side.socket.out), b"")  # nothing of ours jumped ahead
        self.assertTrue(side.writing)
        drain(w, side, 7)
        self.assertEqual(bytes(side.socket.out), b"SELECT-MAC" * 10 + frames([(1, b"hello", 1)]))

    def test_close_waits_for_frames(self):
        w, side, _, _ = make_wire()
        side.socket.room = 3
        w.send(1, b"last words", 1)
        w.loseWriteConnection()
        self.assertFalse(side.write_closed)
        w.send(1, b"ignored after close", 2)
        drain(w, side, 3)
        self.assertTrue(side.write_closed)
        self.assertEqual(bytes(side.socket.out), frames([(1, b"last words", 1)]))

    def test_send_error_is_a_lost_connection(self):
        """A send that fails at once is reported by the next doWrite, as
        Twisted reports any other write error."""
        w, side, _, _ = make_wire()
        side.socket.error = ConnectionResetError()
        w.send(4, os.urandom(8000), 1)
        self.assertTrue(side.writing)
        self.assertIs(w.doWrite(), main.CONNECTION_LOST)

    def test_lost_drops_pending(self):
        w, side, _, _ = make_wire()
        producer = Producer()
        w.registerProducer(producer, True)
        side.socket.room = 0
        w.send(4, os.urandom(8000), 1)
        w.lost()
        self.assertEqual(w.pending_bytes, 0)
        self.assertEqual(producer.events, ["pause", "stop"])


class ReadingTests(TestCase):

    def read_all(self, w, side, stream: bytes, chunk: int | None):
        side.socket.incoming += stream
        side.socket.chunk = chunk
        for _ in range(1_000_000):
            if not side.socket.incoming:
                return
            w.doRead()
        raise AssertionError("never read everything")

    def test_every_read_size(self):
        """The same records whatever sizes the kernel's reads come in."""
        for chunk in (1, 2, 12, 13, 14, 29, 4095, 65_536, 262_173, None):
            records = payloads(7)
            if chunk is not None and chunk < 4095:  # (fewer, smaller records)
                records = [(k, p[:70_000], s) for k, p, s in records[:7]]
            stream = frames(records)
            expected = [(k, s, p) for k, p, s in records]
            w, side, got, failed = make_wire()
            self.read_all(w, side, stream, chunk)
            self.assertEqual([(k, s, p) for k, s, p, _ in got], expected, chunk)
            self.assertEqual(failed, [])
            self.assertEqual(w.pending_read, 0)

    def test_cut_at_every_byte(self):
        """Two reads, cut at every byte boundary of a stream of small and
        large records."""
        records = [(1, b"a" * 20, 1), (4, os.urandom(9000), 2), (2, b"", 3), (4, os.urandom(5000), 4)]
        stream = frames(records)
        expected = [(k, s, p) for k, p, s in records]
        for cut in range(len(stream) + 1):
            w, side, got, failed = make_wire()
            side.socket.incoming += stream[:cut]
            while side.socket.incoming:
                w.doRead()
            side.socket.incoming += stream[cut:]
            while side.socket.incoming:
                w.doRead()
            self.assertEqual([(k, s, p) for k, s, p, _ in got], expected, cut)

    def test_absorbed_bytes_then_socket(self):
        """What the handshake's last read held, then the socket."""
        records = payloads(3)
        stream = frames(records)
        for cut in (0, 5, 13, 4000, 70_000):
            w, side, got, _ = make_wire()
            w.absorb(stream[:cut])
            self.read_all(w, side, stream[cut:], 50_000)
            self.assertEqual([(k, s, p) for k, s, p, _ in got], [(k, s, p) for k, p, s in records])

    def test_many_records_never_move_far(self):
        """A long run of mixed records through reads of random sizes: the
        read buffer never grows and everything arrives."""
        rng = random.Random(5)
        records = [(4, rng.randbytes(rng.choice([10, 3000, 70_000, 256 * 1024, 1 << 20])), i + 1)
                   for i in range(60)]
        w, side, got, failed = make_wire()
        stream = frames(records)
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 600_000)
            side.socket.incoming += stream[pos:pos + n]
            pos += n
            while side.socket.incoming:
                w.doRead()
        self.assertEqual([p for _, _, p, _ in got], [p for _, p, _ in records])
        self.assertEqual(len(w._rbuf), wire.READ_BUFFER)

    def test_end_of_stream(self):
        w, side, _, _ = make_wire()
        side.socket.eof = True
        self.assertIs(w.doRead(), main.CONNECTION_DONE)

    def test_forged_length_fails_before_reading_it(self):
        w, side, got, failed = make_wire()
        bad = (2**31).to_bytes(4, "big") + bytes(9)
        side.socket.incoming += bad
        w.doRead()
        self.assertEqual(got, [])
        self.assertEqual(len(failed), 1)

    def test_tampered_record_fails(self):
        stream = bytearray(frames([(4, os.urandom(100_000), 1)]))
        stream[5000] ^= 1
        for place in (None, lambda kind, seq, size: memoryview(bytearray(size))):
            w, side, got, failed = make_wire(place)
            side.socket.incoming += stream
            while side.socket.incoming:
                w.doRead()
            self.assertEqual(got, [])
            self.assertEqual(len(failed), 1)
            self.assertTrue(w.discarding)


class PlacingTests(TestCase):

    def test_large_records_opened_into_the_lent_place(self):
        """A large record is opened into the view the layer above lends,
        and delivered at once with that very view; small ones are not
        offered; ones it declines are opened as usual."""
        asked = []
        lent = {}

        def place(kind, seq, size):
            asked.append((kind, seq, size))
            if seq == 3:
                return None
            view = lent[seq] = memoryview(bytearray(size))
            return view

        records = [(1, b"small", 1), (4, os.urandom(100_000), 2), (4, os.urandom(100_000), 3),
                   (4, os.urandom(wire.PLACED_FROM), 4)]
        w, side, got, failed = make_wire(place)
        side.socket.incoming += frames(records)
        while side.socket.incoming:
            w.doRead()
        self.assertEqual(asked, [(4, 2, 100_000), (4, 3, 100_000), (4, 4, wire.PLACED_FROM)])
        self.assertEqual([(k, s, p) for k, s, p, _ in got], [(k, s, p) for k, p, s in records])
        self.assertIs(got[1][3], lent[2])
        self.assertIs(got[3][3], lent[4])
        self.assertNotIn(3, lent)

    def test_records_before_a_placed_one_are_delivered_first(self):
        """The place is asked for only once everything before the record
        was handed on (the layer above can then tell where it goes)."""
        order = []
        records = [(1, b"one", 1), (2, b"two", 2), (4, os.urandom(80_000), 3)]

        def deliver(batch):
            order.extend(("deliver", seq) for _, seq, _ in batch)

        def place(kind, seq, size):
            order.append(("place", seq))
            return memoryview(bytearray(size))

        side = FakeSide()
        w = wire.Wire(side, RecordSealer(KEY), RecordOpener(KEY), deliver, self.fail, place)
        side.socket.incoming += frames(records)
        while side.socket.incoming:
            w.doRead()
        self.assertEqual(order, [("deliver", 1), ("deliver", 2), ("place", 3), ("deliver", 3)])


class RecordsAttachTests(TestCase):
    """Records with the wire over a real loopback connection."""

    async def test_records_opened_before_attach_are_delivered_by_it(self):
        """What the wire read before the session attached (the SELECT's
        leftovers) is handed on by attach itself, not by whatever record
        comes next on that connection."""
        from twisted.internet import defer, protocol, reactor
        from p2pft.channel.records import Records

        opened = defer.Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self):
                self.records = Records(self.transport, reactor, RecordSealer(b"x" * 32), RecordOpener(KEY),
                                       lambda reason: None)
                self.records.start()
                original = self.records._opened
                def _opened(records):
                    original(records)
                    if not opened.called:
                        opened.callback(self.records)
                self.records._opened = _opened
                self.records._wire._deliver = _opened

            def dataReceived(self, data):
                self.records.dataReceived(data)

        factory = protocol.ServerFactory()
        factory.protocol = Server
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        class Client(protocol.Protocol):
            def connectionMade(self):
                self.transport.writeSequence(RecordSealer(KEY).seal(20, b"offer", 1))

        client = await protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port.getHost().port)
        records = await opened
        self.assertIsNotNone(records._wire)

        class Handler:
            got = []
            def recordReceived(self, kind, seq, payload):
                self.got.append((kind, seq, bytes(payload)))
            def channelLost(self, reason):
                pass

        handler = Handler()
        records.attach(handler)
        self.assertEqual(handler.got, [(20, 1, b"offer")])
        client.transport.abortConnection()
        records.close()


class SealIntoTests(TestCase):

    def test_same_as_seal(self):
        for n in SIZES:
            payload = os.urandom(n)
            a, b = RecordSealer(KEY), RecordSealer(KEY)
            frame = bytearray(frame_size(n))
            a.seal_into(4, payload, 9, memoryview(frame))
            self.assertEqual(bytes(frame), b"".join(b.seal(4, payload, 9)))

    def test_wrong_frame_size(self):
        self.assertRaises(ValueError, RecordSealer(KEY).seal_into, 4, b"abc", 1, memoryview(bytearray(10)))


class InstallTests(TestCase):

    def test_not_on_other_transports(self):
        from twisted.internet.testing import StringTransport
        self.assertIsNone(wire.install(StringTransport(), RecordSealer(KEY), RecordOpener(KEY),
                                       lambda r: None, lambda r: None, lambda k, s, n: None))

    def test_switched_off(self):
        self.patch(os, "environ", dict(os.environ, P2PFT_WIRE="0"))
        self.assertFalse(wire.enabled())
        self.patch(os, "environ", dict(os.environ, P2PFT_WIRE="1"))
        self.assertTrue(wire.enabled())



