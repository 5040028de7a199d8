"""
The relay's byte moving: two legs joined by a L{Splice}, every byte one
sends written to the other, with flow control both ways (a slow reader
pauses the other side's reads, so the relay never buffers without bound);
the splices of one session (one token, however many legs) share its
L{Session}: one byte cap, one rate bucket, one idle timer.

The splice talks to a connection only through L{IRelayLeg};
L{TransportLeg} is that interface over a TCP transport.  Which legs meet,
and what each one holds, is L{p2pft.server.relay}'s business: a splice gets
two of its L{Leg} records and reads and updates only their C{splice},
C{peer}, C{bytes} and C{abort}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import Interface, implementer

from ..util import cancel as _cancel, no_delay
from . import zerocopy
from .limits import CLOSE_GRACE, TokenBucket

if TYPE_CHECKING:
    from .relay import Leg, RelayServer

#: Read size, send size and write buffer of each leg of a splice.
SPLICE_BUFFER = 256 * 1024

#: How much a session's rate limit lets through at once after a pause, in
#: seconds' worth of the rate.  A tenth of a second: above the reactor's
#: timer granularity and the scheduling jitter of a busy relay (a few ms),
#: so a flow at exactly the rate never stalls on the limiter, and about an
#: RTT's worth of data on a long path, so TCP's ack clock is not broken up;
#: yet a session that was silent for a while gets at most 0.1 s of the
#: rate (plus the one read already taken, L{SPLICE_BUFFER}) ahead of it.
RATE_BURST_SECONDS = 0.1


class IRelayLeg(Interface):
    """One connection as the relay drives it."""

    def peerHost() -> str:
        "The address the connection comes from."

    def write(data: bytes) -> None:
        "Send bytes: an OK or ERROR line, then what the other leg sent."

    def pauseReading() -> None:
        "Stop reading from the connection."

    def resumeReading() -> None:
        "Read from the connection again."

    def registerProducer(producer: IPushProducer) -> None:
        "Pause C{producer} while this leg's output is backed up."

    def unregisterProducer() -> None:
        "No producer any more."

    def useBulkBuffers(size: int) -> None:
        "Read and send in pieces of C{size} bytes from now on, each the moment it is read (no Nagle)."

    def halfClose() -> None:
        "Send nothing more once the output is flushed; keep reading."

    def close() -> None:
        "Close once the output is flushed."

    def abort() -> None:
        "Close now, dropping what is not sent."

    def isClosed() -> bool:
        "Whether the connection is gone."


@implementer(IRelayLeg)
class TransportLeg:
    """L{IRelayLeg} over a TCP transport."""

    __slots__ = ("transport",)

    def __init__(self, transport) -> None:
        self.transport = transport

    def peerHost(self) -> str:
        return self.transport.getPeer().host

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def pauseReading(self) -> None:
        self.transport.pauseProducing()

    def resumeReading(self) -> None:
        self.transport.resumeProducing()

    def registerProducer(self, producer: IPushProducer) -> None:
        self.transport.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def useBulkBuffers(self, size: int) -> None:
        # bufferSize is also the write buffer at which the other leg stops
        # being read.
        self.transport.bufferSize = self.transport.SEND_LIMIT = size
        # What a peer wrote as one small record (an acknowledgement, END)
        # goes on at once, not after the other peer's delayed ACK.
        no_delay(self.transport)

    def halfClose(self) -> None:
        self.transport.loseWriteConnection()

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def isClosed(self) -> bool:
        return self.transport.disconnected


@implementer(IPushProducer)
class _Direction:
    """
    Bytes from C{src} to C{dst} (two L{IRelayLeg}).  Registered as the
    producer on C{dst}: when C{dst} cannot keep up, we stop reading C{src}.
    The session's rate limit pauses reading too; reading resumes only when
    neither holds it back.
    """

    def __init__(self, session: Session, src: IRelayLeg, dst: IRelayLeg):
        self._session = session
        self.src, self.dst = src, dst
        self.flow_paused = False
        #: The kernel moves the bytes (L{zerocopy}), where it can.
        self.zerocopy: zerocopy.ZeroCopy | None = None

    def pauseProducing(self) -> None:
        self.flow_paused = True
        self.update()

    def resumeProducing(self) -> None:
        self.flow_paused = False
        self.update()

    def stopProducing(self) -> None:
        pass

    def paused(self) -> bool:
        return self.flow_paused or self._session.rate_paused

    def update(self) -> None:
        if self.src.isClosed():
            return
        if self.zerocopy is not None:
            return self.zerocopy.update()
        if self.flow_paused or self._session.rate_paused:
            self.src.pauseReading()
        else:
            self.src.resumeReading()


class Session:
    """
    What the splices of one relay session share: all the legs of one token
    are one session, so its byte cap counts the bytes of all of them, its
    rate bucket pays for all of them (a debt pauses every leg), and it is
    idle only when none of them carried anything for the idle timeout.

    The relay (L{p2pft.server.relay.Pairing}) makes one when the first leg
    of a token arrives and drops it (L{close}) when the token has no leg
    left, waiting or spliced; C{pairs} is its count of those.
    """

    def __init__(self, server: RelayServer, clock: IReactorTime, token: str):
        self._server = server
        self._clock = clock
        self.token = token
        #: Its (token, leg) pairs now, waiting for their other side or
        #: spliced (kept by the relay's pairing).
        self.pairs = 0
        #: Its splices now.
        self.splices: list[Splice] = []
        #: The relay's number for it (in its events): 0 until its first splice.
        self.number = 0
        #: When its first splice started.
        self.started = 0.0
        #: Bytes it carried, every leg and both directions.
        self.bytes = 0
        #: Why its last splice ended (one of L{p2pft.server.events.ENDINGS}).
        self.why = "closed"
        self.rate_paused = False
        self._bucket: TokenBucket | None = None
        self._idle = None
        self._resume = None

    def splice(self, a: Leg, b: Leg, number: int) -> Splice:
        """Join C{a} and C{b}; C{number} is the session's number, used if
        this is its first splice."""
        if not self.number:
            self.number = number
            self.started = self._clock.seconds()
            rate = self._server.limits.rate
            # Starts empty: a new session has earned no burst.
            self._bucket = TokenBucket(rate, rate * RATE_BURST_SECONDS, self.started) if rate else None
        splice = Splice(self._server, self._clock, self, a, b)
        self.splices.append(splice)
        splice.start()
        self._touch()
        return splice

    def carry(self, src: Leg, size: int) -> bool:
        """C{src} sent C{size} bytes: False if that takes the session over
        its byte cap (nothing is forwarded: every splice is cut), else
        count them, restart the idle clock and pay for them."""
        limits = self._server.limits
        if limits.max_bytes and self.bytes + size > limits.max_bytes:
            self.cut("byte-cap")
            return False
        self.bytes += size
        src.bytes += size
        self._touch()
        if self._bucket is not None:
            # What was read is forwarded; reading stops until it is paid for.
            ahead = self._bucket.take(size, self._clock.seconds())
            if ahead > 0 and not self.rate_paused:
                self.rate_paused = True
                self._update()
                self._resume = self._clock.callLater(ahead, self._unthrottle)
        return True

    def cut(self, why: str) -> None:
        """End every splice of the session (its byte cap, its idle timeout)."""
        if why == "byte-cap":
            self._server.spend(self.token)
        for splice in list(self.splices):
            splice.end(why)

    def ended(self, splice: Splice, why: str) -> None:
        """C{splice} is over: with no splice left, nothing is idle."""
        self.splices.remove(splice)
        self.why = why
        if not self.splices:
            _cancel(self._idle)
            self._idle = None

    def close(self) -> None:
        """The session is over: no timer left behind."""
        _cancel(self._idle)
        _cancel(self._resume)
        self._idle = self._resume = None

    def _unthrottle(self) -> None:
        # Every direction of every leg shares the bucket: bytes read while
        # we were paused (already in flight) may have deepened the debt.
        ahead = self._bucket.take(0, self._clock.seconds())
        if ahead > 0.001:  # (not for rounding errors)
            self._resume = self._clock.callLater(ahead, self._unthrottle)
            return
        self._resume = None
        self.rate_paused = False
        self._update()

    def _update(self) -> None:
        for splice in self.splices:
            splice.update()

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._server.limits.idle_timeout)
        else:
            self._idle = self._clock.callLater(self._server.limits.idle_timeout, self.cut, "idle")


class Splice:
    """Two relay legs joined (the same leg of one L{Session}): moves bytes
    between them; the session's limits apply."""

    def __init__(self, server: RelayServer, clock: IReactorTime, session: Session, a: Leg, b: Leg):
        self._server = server
        self._clock = clock
        self.session = session
        self.legs = (a, b)
        self._ended = False
        self._half_closed: set = set()
        self._directions: list[_Direction] = []

    @property
    def bytes(self) -> int:
        """Bytes this splice carried, both directions."""
        a, b = self.legs
        return a.bytes + b.bytes

    def start(self) -> None:
        a, b = self.legs
        a.peer, b.peer = b, a
        for src, dst in ((a, b), (b, a)):
            self._directions.append(_Direction(self.session, src.connection, dst.connection))
            src.splice = self
        for leg in self.legs:
            leg.connection.unregisterProducer()
            # Bulk data from here on: bigger reads and sends than Twisted's
            # 64 KiB / 128 KiB defaults (so memory per session stays a few
            # times this).  Measured on loopback: relay CPU per GiB 1.03 ->
            # 0.71 s; 1 MiB was faster still but raised RSS.
            leg.connection.useBulkBuffers(SPLICE_BUFFER)
        for direction in self._directions:
            direction.dst.registerProducer(direction)
        if self.session.rate_paused:
            # Another leg of the session ran up the shared bucket's debt.
            self.update()
        for leg in self.legs:
            leg.connection.write(b"OK\n")
        self._zerocopy()

    def _zerocopy(self) -> None:
        """Let the kernel move the bytes, where both legs are real TCP
        connections (L{zerocopy}); what the legs sent already was
        forwarded through Twisted, in order, before."""
        a, b = self.legs
        transports = [getattr(leg.connection, "transport", None) for leg in self.legs]
        if not zerocopy.available(*transports):
            return
        made = []
        try:
            for direction, (src, dst) in zip(self._directions, ((a, b), (b, a))):
                made.append(zerocopy.ZeroCopy(
                    src.connection.transport, dst.connection.transport,
                    lambda n, src=src: not self._ended and self.session.carry(src, n), direction.paused,
                    # A rate-limited session reads no more at once than before.
                    read_max=SPLICE_BUFFER if self._server.limits.rate else None))
        except OSError:  # out of descriptors for the pipes: through Twisted, as before
            for zc in made:
                zc.close()
            return
        for direction, zc in zip(self._directions, made):
            zc.install()
            direction.zerocopy = zc
            direction.update()

    def forward(self, src: Leg, data: bytes) -> None:
        if self._ended or not self.session.carry(src, len(data)):
            return
        src.peer.connection.write(data)

    def update(self) -> None:
        for d in self._directions:
            d.update()

    def half_close(self, src: Leg) -> None:
        """C{src} will send no more: pass that on, and end the splice once
        both directions are done (so a last record, an ABORT say, is
        delivered rather than destroyed by a reset)."""
        self._half_closed.add(src)
        peer = src.peer.connection
        if not peer.isClosed():
            peer.halfClose()
        if len(self._half_closed) == 2:
            self.end("closed")

    def end(self, why: str = "closed") -> None:
        """This splice is over (the session's other splices go on); C{why}
        is one of L{p2pft.server.events.ENDINGS}."""
        if self._ended:
            return
        self._ended = True
        self.session.ended(self, why)
        self._server.splice_ended(self)
        for leg in self.legs:
            leg.splice = None
            connection = leg.connection
            if not connection.isClosed():
                # A peer that stopped reading must not keep its socket.  (Set
                # before closing: the close may complete synchronously.)
                leg.abort = self._clock.callLater(CLOSE_GRACE, connection.abort)
                connection.unregisterProducer()
                connection.close()
