"""
The chosen connection's phase: AEAD records (L{p2pft.secure}) to and from
the layer above, with flow control and keepalives.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from ..secure import RecordOpener, RecordSealer, SecurityError
from ..util import cancel
from . import wire
from .interfaces import ILaneHandler, IPhase


#: Record type 0: sent after KEEPALIVE_INTERVAL seconds without sending
#: anything.  Keeps a relayed session from looking idle to the relay while a
#: person decides (TCP keepalive probes carry no data), and lets the session
#: above tell a silent connection from a live one (L{p2pft.session}): 5 s
#: is 29 bytes every 5 s per connection, and three missed make a dead one
#: (15 s) well before TCP's own keepalive (80 s) would notice.
KEEPALIVE = 0
KEEPALIVE_INTERVAL = 5.0
#: Bytes asked for per recv() and per send() on a chosen channel.
READ_SIZE = 512 * 1024
SEND_SIZE = 1 << 20
#: TCP keepalive on the chosen connection: a peer that vanishes without a
#: FIN or RST (sleep, cable, dropped NAT state) is noticed after about
#: KEEPIDLE + KEEPINTVL * KEEPCNT seconds of silence, while a peer that is
#: merely slow (a person deciding whether to accept) keeps answering probes.
KEEPIDLE, KEEPINTVL, KEEPCNT = 20, 10, 6


@implementer(IPhase)
class Records:
    """
    A chosen connection: records sealed and opened with its binding, handed
    (KEEPALIVEs too) to the L{ILaneHandler} once one is attached (what
    arrives before is kept, unopened).  A record that fails to open ends the connection with
    C{fail(reason)}.  Sends a KEEPALIVE after KEEPALIVE_INTERVAL seconds
    without sending anything.
    """

    def __init__(self, transport, clock: IReactorTime, sealer: RecordSealer, opener: RecordOpener,
                 fail: Callable[[str], object]):
        self._transport = transport
        self._clock = clock
        self._sealer = sealer
        self._opener = opener
        self._fail = fail
        self._handler: ILaneHandler | None = None
        self._pending = bytearray()  # read before attach, not yet opened
        self._held: deque[tuple[int, int, bytes]] = deque()  # opened, not yet delivered
        self._paused = False
        self._closing = False
        self._ended: str | None = None
        self._ticker: IDelayedCall | None = None
        self._last_sent = 0.0
        #: Reads and writes straight on the socket (L{p2pft.channel.wire}),
        #: where the transport is a real TCP one.
        self._wire: wire.Wire | None = None

    def start(self) -> None:
        _keepalive(self._transport)
        # Bulk data from here on: read up to 512 KiB per recv() (Twisted's
        # default is 64 KiB) and let that much queue before pausing a push
        # producer; hand the kernel up to 1 MiB per send() (Twisted's
        # default SEND_LIMIT is 128 KiB: on loopback that alone cost a
        # third of the throughput and 0.2 CPU-s per GiB in system time).
        # Reads of 1 MiB were no faster, and grew the heap by 13 MiB over a
        # long transfer (each recv() buffer is shrunk to what arrived,
        # which fragments the heap).
        self._transport.bufferSize = READ_SIZE
        self._transport.SEND_LIMIT = SEND_SIZE
        self._wire = wire.install(self._transport, self._sealer, self._opener, self._opened, self._fail,
                                  self._place)
        self._last_sent = self._clock.seconds()
        self._ticker = self._clock.callLater(KEEPALIVE_INTERVAL, self._tick)

    def dataReceived(self, data: bytes) -> None:
        if self._wire is not None:
            self._wire.absorb(data)  # (only what was read before the wire took over)
        elif self._handler is None:
            self._pending += data
        else:
            self._open(data)

    def attach(self, handler: ILaneHandler) -> None:
        self._handler = handler
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._open(data)
        self._deliver()  # records the wire opened before (the SELECT's leftovers)
        if self._ended is not None:
            handler.channelLost(self._ended)

    def send(self, kind: int, payload: bytes = b"", seq: int = 0) -> None:
        self._last_sent = self._clock.seconds()
        if self._wire is not None:
            self._wire.send(kind, payload, seq)
        else:
            self._transport.writeSequence(self._sealer.seal(kind, payload, seq))

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._wire is not None:
            self._wire.registerProducer(producer, streaming)
        else:
            self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._wire is not None:
            self._wire.unregisterProducer()
        else:
            self._transport.unregisterProducer()

    def pauseReading(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._paused:
            self._paused = False
            self._deliver()
            if not self._paused:
                self._transport.resumeProducing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._held.clear()
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()
        self.stopTicker()
        if self._wire is not None:
            self._wire.discarding = True
            self._wire.loseWriteConnection()
            return
        try:
            self._transport.loseWriteConnection()
        except AttributeError:
            self._transport.loseConnection()

    def lost(self, reason: str) -> None:
        """The connection is gone (the ticker is already stopped)."""
        self._ended = reason
        if self._wire is not None:
            self._wire.lost()
        if self._handler is not None:
            self._handler.channelLost(reason)

    def stopTicker(self) -> None:
        cancel(self._ticker)
        self._ticker = None

    def _tick(self) -> None:
        self._ticker = None
        if self._closing or self._transport.disconnecting:
            return
        idle = self._clock.seconds() - self._last_sent
        if idle >= KEEPALIVE_INTERVAL:
            self.send(KEEPALIVE)
            idle = 0
        self._ticker = self._clock.callLater(max(0.0, KEEPALIVE_INTERVAL - idle), self._tick)

    def _open(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            records = self._opener.feed(data)
        except SecurityError as e:
            self._fail(str(e))
            return
        self._opened(records)

    def _place(self, kind: int, seq: int, size: int):
        """Where a large record may be opened straight into (the layer
        above lends it), when it would be delivered at once."""
        if self._paused or self._held or self._handler is None or self._closing or self._transport.disconnecting:
            return None
        place = getattr(self._handler, "place", None)
        return place(kind, seq, size) if place is not None else None

    def _opened(self, records: list) -> None:
        self._held.extend(records)
        self._deliver()

    def _deliver(self) -> None:
        held = self._held
        while held and not self._paused and self._handler is not None:
            if self._closing or self._transport.disconnecting:
                held.clear()
                return
            kind, seq, payload = held.popleft()
            self._handler.recordReceived(kind, seq, payload)


def _keepalive(transport) -> None:
    try:
        transport.setTcpKeepAlive(1)
        sock = transport.getHandle()
        for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (AttributeError, OSError):
        pass
