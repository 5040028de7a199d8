"""
The secure channel on a TCP connection: a thin Twisted protocol around the
plain machines of L{p2pft.secure}.

A L{PeerConnection} starts as a punching candidate (L{ICandidate}): it runs
the proof handshake and reports to its connector.  Once chosen it becomes an
encrypted record channel for the transfer layer (L{IRecordHandler} above,
records below).  A candidate that fails the handshake is dropped silently.

The protocol only moves bytes: it holds the current phase and forwards what
it reads to it.  The phases, in order, are plain objects that tests drive
without sockets:

1. L{RelayGreeting} (only through a relay): C{RELAY <token> <role>}, then
   wait for the relay's C{OK}; hands the bytes after it on.
2. L{CandidateHandshake}: HELLO / PROOF / SELECT (L{p2pft.secure.Handshake})
   under the handshake timer; reports to the connector.
3. L{Records}: the chosen connection, sealed and opened with the
   connection's binding, handed to an L{IRecordHandler}.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ..punch import ICandidate
from ..rendezvous import normalise_host
from ..util import OneShot
from ..secure import Handshake, RecordOpener, RecordSealer, SecurityError, SessionKeys


#: Record type 0: sent after KEEPALIVE_INTERVAL seconds without sending
#: anything, and swallowed here.  Keeps a relayed session from looking idle
#: to the relay while a person decides (TCP keepalive probes carry no data).
KEEPALIVE = 0
KEEPALIVE_INTERVAL = 60.0
#: Bytes asked for per recv() and per send() on a chosen channel.
READ_SIZE = 512 * 1024
SEND_SIZE = 1 << 20
#: Bytes of a relay's reply without a newline before we give up on it: the
#: relay says C{OK} or one short C{ERROR} line (a rendezvous server relaying
#: on its own port greets with its WELCOME line first).
MAX_RELAY_LINE = 512
#: Characters of a relay's refusal kept for the error line.
MAX_REFUSAL = 200


class IRecordHandler(Interface):
    """The layer above a chosen channel (the transfer)."""

    def recordReceived(kind: int, payload: bytes) -> None:
        "One authenticated record, in order (none while reading is paused)."

    def channelLost(reason: str) -> None:
        "The connection ended (after or instead of a normal end)."


class IPhase(Interface):
    """One phase of a L{PeerConnection}: it gets every byte read meanwhile."""

    def dataReceived(data: bytes) -> None:
        "Bytes read from the connection, in order."


def printable(text: str) -> str:
    # What a relay says reaches the user's terminal: no control characters.
    # (A later step of issue 13 unifies the printable helpers; until then
    # this one stays here, alone.)
    return "".join(c if c.isprintable() else "?" for c in text)


@implementer(IPhase)
@attrs.define(eq=False)
class RelayGreeting:
    """
    Through a relay: ask it to join us with the other side, then wait for
    its C{OK}.  A rendezvous server relaying on its own port greets first
    with its WELCOME line, which is skipped (once).  On C{OK}, C{joined}
    gets the bytes read after it (the start of the other side's HELLO); on
    anything else C{drop} gets the reason.
    """

    token: str
    role: str
    write: Callable[[bytes], object]
    drop: Callable[[str], object]
    joined: Callable[[bytes], object]
    _buffer: bytes = b""
    _welcomed: bool = False

    def start(self) -> None:
        self.write(f"RELAY {self.token} {self.role}\n".encode("ascii"))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        line, newline, rest = self._buffer.partition(b"\n")
        if newline and line.startswith(b"WELCOME ") and not self._welcomed:
            self._welcomed = True
            self._buffer = rest
            line, newline, rest = rest.partition(b"\n")
        if not newline:
            if len(self._buffer) > MAX_RELAY_LINE:
                self.drop("relay sent an overlong line")
            return
        if line.rstrip(b"\r") != b"OK":
            text = line.decode("utf-8", "replace").removeprefix("ERROR ").strip()
            self.drop(f"relay refused: {printable(text[:MAX_REFUSAL])}")
            return
        self.joined(rest)


@implementer(IPhase)
@attrs.define(eq=False)
class CandidateHandshake:
    """
    The proof handshake on one candidate connection (L{Handshake}) and its
    timer, which runs from the connection's start (the relay's wait
    included) until the other side proved the key.  Reports
    C{authenticated()}; the follower reports C{selected(rest)} with the
    record bytes read after SELECT.  Anything wrong: C{drop(reason)}.
    """

    handshake: Handshake
    write: Callable[[bytes], object]
    drop: Callable[[str], object]
    authenticated: Callable[[], object]
    selected: Callable[[bytes], object]
    _timer: IDelayedCall | None = None

    def startTimer(self, clock: IReactorTime, timeout: float) -> None:
        self._timer = clock.callLater(timeout, self.drop, "handshake timed out")

    def cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def hello(self) -> None:
        self.write(self.handshake.hello())

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.handshake.receive(data)
        except SecurityError as e:
            return self.drop(str(e))
        for event in events:
            if event[0] == "send":
                self.write(event[1])
            elif event[0] == "authenticated":
                self.cancelTimer()
                self.authenticated()
            elif event[0] == "selected":
                self.selected(event[1])

    def select(self) -> None:
        """Leader: commit to this connection (raises if it may not)."""
        self.write(self.handshake.select())


@implementer(IPhase)
class Records:
    """
    A chosen connection: records sealed and opened with its binding, handed
    to the L{IRecordHandler} once one is attached (what arrives before is
    kept, unopened).  A record that fails to open ends the connection with
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
        self._handler: IRecordHandler | None = None
        self._pending = bytearray()  # read before attach, not yet opened
        self._held: deque[tuple[int, bytes]] = deque()  # opened, not yet delivered
        self._paused = False
        self._closing = False
        self._ended: str | None = None
        self._ticker: IDelayedCall | None = None
        self._last_sent = 0.0

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
        self._last_sent = self._clock.seconds()
        self._ticker = self._clock.callLater(KEEPALIVE_INTERVAL, self._tick)

    def dataReceived(self, data: bytes) -> None:
        if self._handler is None:
            self._pending += data
        else:
            self._open(data)

    def attach(self, handler: IRecordHandler) -> None:
        self._handler = handler
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._open(data)
        if self._ended is not None:
            handler.channelLost(self._ended)

    def send(self, kind: int, payload: bytes = b"") -> None:
        self._last_sent = self._clock.seconds()
        self._transport.writeSequence(self._sealer.seal(kind, payload))

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
        self._closing = True
        self._held.clear()
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()
        self.stopTicker()
        try:
            self._transport.loseWriteConnection()
        except AttributeError:
            self._transport.loseConnection()

    def lost(self, reason: str) -> None:
        """The connection is gone (the ticker is already stopped)."""
        self._ended = reason
        if self._handler is not None:
            self._handler.channelLost(reason)

    def stopTicker(self) -> None:
        if self._ticker is not None and self._ticker.active():
            self._ticker.cancel()
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
        self._held.extend(records)
        self._deliver()

    def _deliver(self) -> None:
        held = self._held
        while held and not self._paused:
            if self._handler is None or self._closing or self._transport.disconnecting:
                held.clear()
                return
            kind, payload = held.popleft()
            if kind != KEEPALIVE:
                self._handler.recordReceived(kind, payload)


@implementer(ICandidate)
class PeerConnection(Protocol):
    """One TCP connection to (maybe) the other peer: holds the current
    phase and forwards to it; the channel methods (L{attach} ... L{close})
    are for the chosen connection only."""

    log = Logger()

    def __init__(self, connector, keys: SessionKeys, clock: IReactorTime, handshake_timeout: float = 10.0,
                 relay: bool = False):
        self._connector = connector
        #: "relay" when this connection runs through a relay, else "direct".
        self.path = "relay" if relay else "direct"
        self._keys = keys
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._candidate = CandidateHandshake(
            Handshake(keys.handshake_key(), keys.role), self._write, self._drop,
            self._authenticated, self._selected)
        self._phase: IPhase = self._candidate
        self._records: Records | None = None  # once chosen
        self._closed = OneShot()
        self.lost_reason: str | None = None

    # -- as a candidate

    def connectionMade(self) -> None:
        self._candidate.startTimer(self._clock, self._handshake_timeout)
        if self.path == "relay":
            # Through a relay: ask it to join us with the other side first.
            greeting = RelayGreeting(self._keys.relay_token(), self._keys.role, self._write, self._drop,
                                     self._joined)
            self._phase = greeting
            greeting.start()
        else:
            self._candidate.hello()

    def dataReceived(self, data: bytes) -> None:
        self._phase.dataReceived(data)

    def select(self) -> None:
        self._candidate.select()
        self._becomeChannel()

    def abandon(self) -> None:
        self._candidate.cancelTimer()
        self.transport.abortConnection()

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _drop(self, reason: str) -> None:
        self.log.debug("dropping candidate {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self.lost_reason = reason
        self.abandon()

    def _joined(self, rest: bytes) -> None:
        self._phase = self._candidate
        self._candidate.hello()
        if rest:
            self._candidate.dataReceived(rest)

    def _authenticated(self) -> None:
        self._connector.authenticated(self)

    def _selected(self, rest: bytes) -> None:
        self._becomeChannel()
        self._records.dataReceived(rest)
        self._connector.selected(self)

    def _becomeChannel(self) -> None:
        binding = self._candidate.handshake.binding
        self._records = Records(self.transport, self._clock, self._keys.sealer(binding),
                                self._keys.opener(binding), self._recordFailed)
        self._phase = self._records
        self._records.start()

    def _recordFailed(self, reason: str) -> None:
        self.lost_reason = reason
        self.transport.abortConnection()

    # -- as the chosen channel

    @property
    def peer(self) -> str:
        p = self.transport.getPeer()
        host = normalise_host(p.host)
        return f"[{host}]:{p.port}" if ":" in host else f"{host}:{p.port}"

    def attach(self, handler: IRecordHandler) -> None:
        """Hand the chosen channel to the layer above; replays early data."""
        self._records.attach(handler)

    def send(self, kind: int, payload: bytes = b"") -> None:
        self._records.send(kind, payload)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseReading(self) -> None:
        """Deliver no more records until L{resumeReading}; stop reading the
        socket, so TCP flow control slows the other side down."""
        self._records.pauseReading()

    def resumeReading(self) -> None:
        self._records.resumeReading()

    def close(self) -> None:
        """
        Close after flushing what was sent.  Only our direction is shut at
        first: closing a socket with unread input makes the kernel send RST,
        which can destroy our last record (ACK, ABORT) before the other side
        reads it.  We keep reading (and ignoring) until the other side
        closes too; the transfer layer aborts if that takes too long.
        """
        self._records.close()

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        self.transport.abortConnection()

    def whenClosed(self):
        """A Deferred that fires once the TCP connection is gone."""
        return self._closed.when()

    def connectionLost(self, reason: Failure = None) -> None:
        self._candidate.cancelTimer()
        if self._records is not None:
            self._records.stopTicker()
        self._closed.fire(None)
        if self._records is None:
            self._connector.lost(self, self.lost_reason)
            return
        self._records.lost(self.lost_reason or (reason.getErrorMessage() if reason else "connection closed"))


#: TCP keepalive on the chosen connection: a peer that vanishes without a
#: FIN or RST (sleep, cable, dropped NAT state) is noticed after about
#: KEEPIDLE + KEEPINTVL * KEEPCNT seconds of silence, while a peer that is
#: merely slow (a person deciding whether to accept) keeps answering probes.
KEEPIDLE, KEEPINTVL, KEEPCNT = 20, 10, 6


def _keepalive(transport) -> None:
    import socket

    try:
        transport.setTcpKeepAlive(1)
        sock = transport.getHandle()
        for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (AttributeError, OSError):
        pass
