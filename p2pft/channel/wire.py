"""
L{Wire}: a chosen connection's records straight on its socket, with no
copy of a record's bytes in user space beyond the cipher's own.

Twisted's TCP transport copies everything it is given: a fresh C{bytes}
per C{recv()}, joined write buffers, a fresh ciphertext per record.  For
the bulk of a transfer, the wire instead

- seals each record into a reused frame buffer (C{encrypt_into}) and
  sends it from there at once (C{send}; C{sendmsg} for several frames
  queued behind a full socket), keeping only what the kernel did not take;
- reads with C{recv_into} into one reused buffer, a whole record's frame
  contiguous in it, and opens records where they lie.

It stays a Twisted program: the reactor still watches the socket and
calls the transport's C{doRead}/C{doWrite}, which the wire takes over for
the connection (L{install}); Twisted still owns connecting, closing and
errors (a C{doRead}/C{doWrite} result of C{CONNECTION_LOST} or
C{CONNECTION_DONE} ends the connection the usual way).  Bytes Twisted
already buffered (the handshake's last message) are sent before any
record.  On anything but a real TCP transport (tests' string and iosim
transports, other reactors' transports) L{install} returns None and
L{p2pft.channel.records.Records} keeps using the transport as before.

The two halves talk to the socket and to the transport through small
objects (L{_TcpSide}), so unit tests drive them with fake sockets: partial
sends, full sockets, records cut at every byte boundary.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import Callable

from twisted.internet import main

from ..secure import HEADER_SIZE, MAX_RECORD, RecordOpener, RecordSealer, SecurityError, frame_size

#: Frames from this size on are sealed into a reused buffer (of
#: POOLED_FRAME bytes, which every frame fits); smaller ones
#: (acknowledgements, keepalives, control messages, small files' data) are
#: sealed into a frame of their own, so a queue of them behind a full
#: socket holds what they are, not a pooled buffer each.
POOLED_FROM = 64 * 1024
#: The pooled frame: a DATA record of the transfer's chunk (1 MiB, the
#: largest record) fits.
POOLED_FRAME = frame_size(MAX_RECORD)
#: Free frame buffers kept for reuse.  A frame is usually sent the moment it
#: is sealed, so two are in use at most while the socket is full.
POOL = 2
#: Frames handed to one sendmsg() when several wait behind a full socket.
IOV = 64
#: The largest frame (a record of MAX_RECORD plaintext bytes).
MAX_FRAME = frame_size(MAX_RECORD)
#: Bytes asked for by one recv_into() when no record is being completed
#: (several small records, or the start of a large one); a record that was
#: begun is then read exactly to its end, so it is never moved.  The read
#: buffer holds one such read plus the largest frame: 2 MiB per connection.
READ_SIZE = 1 << 20
READ_BUFFER = READ_SIZE + MAX_FRAME
#: Records from this size on may be opened straight into where their
#: plaintext goes next (C{place}): the receiver's file buffer.
PLACED_FROM = 64 * 1024


#: Bytes of a frame beyond its plaintext: header and tag.
OVERHEAD = frame_size(0)


def _kind_seq(buf, offset: int) -> tuple[int, int]:
    return buf[offset + 4], int.from_bytes(buf[offset + 5:offset + 13], "big")


#: Errors that mean "try again" for a send (as Twisted's own writes take them).
_AGAIN = (errno.EAGAIN, errno.ENOBUFS, errno.EINTR)


def enabled() -> bool:
    """Whether the wire may be used (P2PFT_WIRE=0 turns it off, to compare)."""
    return os.environ.get("P2PFT_WIRE", "1") != "0"


class _TcpSide:
    """What the wire needs of a Twisted TCP transport: its socket, its own
    write buffer (bytes written through the transport, such as the
    handshake's, go first), writing on and off, its own C{doWrite}.
    This is where the wire relies on L{twisted.internet.abstract.FileDescriptor}'s
    attributes (C{dataBuffer}, C{offset}, C{_tempDataLen})."""

    def __init__(self, transport):
        self.transport = transport
        self.socket = transport.getHandle()
        self._doWrite = type(transport).doWrite.__get__(transport)

    def accepts(self) -> bool:
        """Whether writes are still taken (as L{FileDescriptor.write} decides)."""
        t = self.transport
        return t.connected and not (t._writeDisconnected or t.disconnected or getattr(t, "_aborting", False))

    def own_buffered(self) -> bool:
        t = self.transport
        return bool(len(t.dataBuffer) - t.offset or t._tempDataLen)

    def start_writing(self) -> None:
        self.transport.startWriting()

    def own_doWrite(self):
        return self._doWrite()

    def lose_write_connection(self) -> None:
        try:
            self.transport.loseWriteConnection()
        except AttributeError:
            self.transport.loseConnection()


def install(transport, sealer: RecordSealer, opener: RecordOpener,
            deliver: Callable[[list], object], fail: Callable[[str], object],
            place: Callable[[int, int, int], "memoryview | None"]) -> "Wire | None":
    """Take over C{transport}'s reads and writes, if it is a real TCP
    transport (and the wire is L{enabled}); else None."""
    from twisted.internet import tcp
    if not enabled() or not isinstance(transport, tcp.Connection):
        return None
    try:
        side = _TcpSide(transport)
    except (AttributeError, OSError):
        return None
    wire = Wire(side, sealer, opener, deliver, fail, place)
    transport.doRead = wire.doRead
    transport.doWrite = wire.doWrite
    return wire


class Wire:
    """
    Records on one socket.  C{deliver(records)} gets each batch of opened
    records, C{[(kind, seq, payload), ...]}; C{fail(reason)} a record that
    did not open (the caller aborts the connection).

    C{place(kind, seq, size)}, for a large record, may return a writable
    memoryview of C{size} bytes: the record is opened into it and delivered
    at once, on its own, with that very view as its payload (whoever lent
    it knows it by identity: see L{p2pft.transfer.sink.FileSink.reserve}).
    """

    def __init__(self, side, sealer: RecordSealer, opener: RecordOpener,
                 deliver: Callable[[list], object], fail: Callable[[str], object],
                 place: Callable[[int, int, int], "memoryview | None"] = lambda kind, seq, size: None):
        self._side = side
        self._sock = side.socket
        self._sealer = sealer
        self._opener = opener
        self._deliver = deliver
        self._fail = fail
        self._place = place
        # writing
        self._pending: deque[tuple[memoryview, bytearray | None]] = deque()
        self.pending_bytes = 0
        self._pool: list[bytearray] = []
        self._producer = None
        self._producer_paused = False
        self._closing = False
        self._shut = False  # our direction's shutdown was asked of Twisted
        self._failed = False
        # reading
        self._rbuf = bytearray(READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._start = 0
        self._end = 0
        #: Incoming bytes are read and dropped (the connection is closing).
        self.discarding = False

    # -- writing ------------------------------------------------------------

    def send(self, kind: int, payload, seq: int = 0) -> None:
        """Seal and send one record (what the socket does not take now is
        kept and sent when it is writable, in order)."""
        if self._closing or not self._side.accepts():
            return
        size = frame_size(len(payload))
        if size < POOLED_FROM:
            header, ct = self._sealer.seal(kind, payload, seq)
            self._queue(memoryview(header + ct), None)
            return
        buf = self._take()
        view = memoryview(buf)[:size]
        self._sealer.seal_into(kind, payload, seq, view)
        self._queue(view, buf)

    def registerProducer(self, producer, streaming: bool) -> None:
        """C{producer} (a push producer) is paused while frames wait for
        the socket, and resumed once they are all sent."""
        self._producer = producer
        self._producer_paused = False
        if self._pending:
            self._pause()

    def unregisterProducer(self) -> None:
        self._producer = None

    def loseWriteConnection(self) -> None:
        """Shut our direction once every frame is sent (nothing more is
        accepted from now on)."""
        self._closing = True
        if not self._pending:
            self._shut_down()

    def _shut_down(self) -> None:
        if not self._shut:
            self._shut = True
            self._side.lose_write_connection()

    def lost(self) -> None:
        """The connection is gone: drop what was not sent."""
        self._closing = True
        self._pending.clear()
        self.pending_bytes = 0
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()

    def _take(self) -> bytearray:
        return self._pool.pop() if self._pool else bytearray(POOLED_FRAME)

    def _give(self, buf: bytearray | None) -> None:
        if buf is not None and len(self._pool) < POOL:
            self._pool.append(buf)

    def _queue(self, view: memoryview, buf: bytearray | None) -> None:
        if not self._pending and not self._failed and not self._side.own_buffered():
            try:
                sent = self._sock.send(view)
            except OSError as e:
                sent = 0
                if e.errno not in _AGAIN:
                    self._failed = True  # left for doWrite, which reports the connection lost
            if sent == len(view):
                self._give(buf)
                return
            view = view[sent:]
        self._pending.append((view, buf))
        self.pending_bytes += len(view)
        self._side.start_writing()
        self._pause()

    def _pause(self) -> None:
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def doWrite(self):
        """The socket is writable: Twisted's own bytes first, then ours;
        with nothing left, Twisted's C{doWrite} stops writing (and finishes
        a close)."""
        side = self._side
        if side.own_buffered():
            result = side.own_doWrite()
            if result is not None or side.own_buffered():
                return result
            if self._pending:
                side.start_writing()  # it stopped, having sent all of its own
        result = self._flush()
        if result is not None or self._pending:
            return result
        if self._closing:
            self._shut_down()
        elif self._producer is not None and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()
        if self._pending:
            return None  # the producer wrote more than the socket took
        return side.own_doWrite()

    def _flush(self):
        pending = self._pending
        sock = self._sock
        while pending:
            if len(pending) == 1:
                views = [pending[0][0]]
            else:
                views = [pending[i][0] for i in range(min(IOV, len(pending)))]
            try:
                sent = sock.send(views[0]) if len(views) == 1 else sock.sendmsg(views)
            except OSError as e:
                return None if e.errno in _AGAIN else main.CONNECTION_LOST
            total = sent
            self.pending_bytes -= sent
            while sent:
                view, buf = pending[0]
                if sent >= len(view):
                    sent -= len(view)
                    pending.popleft()
                    self._give(buf)
                else:
                    pending[0] = (view[sent:], buf)
                    sent = 0
            if total < sum(len(v) for v in views):
                return None  # the socket is full
        return None

    # -- reading ------------------------------------------------------------

    def absorb(self, data: bytes) -> None:
        """Bytes read before the wire took over (after the handshake):
        treated as if read from the socket."""
        view = memoryview(data)
        while view and not self.discarding:
            n = min(len(view), len(self._rbuf) - self._end)
            if not n:  # cannot happen: the buffer always has room for a frame
                self._fail("record buffer overflow")
                return
            self._rview[self._end:self._end + n] = view[:n]
            self._end += n
            view = view[n:]
            self._open()

    def doRead(self):
        """The socket is readable: read into the buffer, open every
        complete record, hand them on."""
        start, end = self._start, self._end
        if self.discarding:
            start = end = self._start = self._end = 0
        if end - start >= HEADER_SIZE:
            try:
                want = start + self._opener.frame_length(self._rbuf, start)
            except SecurityError as e:
                self._fail(str(e))
                return None
        else:
            want = min(len(self._rbuf), max(end + HEADER_SIZE, READ_SIZE))
        try:
            n = self._sock.recv_into(self._rview[end:want])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        self._end = end + n
        if self.discarding:
            self._start = self._end = 0
            return None
        self._open()
        return None

    def _open(self) -> None:
        buf = self._rbuf
        opener = self._opener
        start, end = self._start, self._end
        records = []
        try:
            while end - start >= HEADER_SIZE:
                size = opener.frame_length(buf, start)
                stop = start + size
                if stop > end:
                    break
                plain = size - OVERHEAD
                if plain >= PLACED_FROM:
                    # Deliver what came before first: the place lent is the
                    # next one only once they are through.
                    if records:
                        self._start = start
                        self._deliver(records)
                        records = []
                        if self.discarding:
                            return
                    kind, seq = _kind_seq(buf, start)
                    out = self._place(kind, seq, plain)
                    if out is not None:
                        record = opener.open_frame_into(buf, start, out)
                        self._start = start = stop
                        self._deliver([record])
                        if self.discarding:
                            return
                        continue
                records.append(opener.open_frame(buf, start))
                start = stop
        except SecurityError as e:
            self._start = self._end = 0
            self.discarding = True
            self._fail(str(e))
            return
        if start == end:
            start = end = 0
        elif len(buf) - start < MAX_FRAME:
            # A record begun too near the end to fit: move what there is
            # of it to the front (at most one read's worth; rare).
            self._rview[:end - start] = self._rview[start:end]
            start, end = 0, end - start
        self._start, self._end = start, end
        if records:
            self._deliver(records)

    @property
    def pending_read(self) -> int:
        """Bytes of an incomplete record in the read buffer."""
        return self._end - self._start
