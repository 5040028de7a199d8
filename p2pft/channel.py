"""
The secure channel on a TCP connection: a thin Twisted protocol around the
plain machines of L{p2pft.secure}.

A L{PeerConnection} starts as a punching candidate (L{ICandidate}): it runs
the proof handshake and reports to its connector.  Once chosen it becomes an
encrypted record channel for the transfer layer (L{IRecordHandler} above,
records below).  A candidate that fails the handshake is dropped silently.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .punch import ICandidate
from .addresses import normalise_host
from .util import OneShot, cancel, printable
from .secure import Handshake, SecurityError, SessionKeys


#: Record type 0: sent after KEEPALIVE_INTERVAL seconds without sending
#: anything, and swallowed here.  Keeps a relayed session from looking idle
#: to the relay while a person decides (TCP keepalive probes carry no data).
KEEPALIVE = 0
KEEPALIVE_INTERVAL = 60.0
#: Bytes asked for per recv() and per send() on a chosen channel.
READ_SIZE = 512 * 1024
SEND_SIZE = 1 << 20


class IRecordHandler(Interface):
    """The layer above a chosen channel (the transfer)."""

    def recordReceived(kind: int, payload: bytes) -> None:
        "One authenticated record, in order (none while reading is paused)."

    def channelLost(reason: str) -> None:
        "The connection ended (after or instead of a normal end)."


@implementer(ICandidate)
class PeerConnection(Protocol):
    log = Logger()

    def __init__(self, connector, keys: SessionKeys, clock: IReactorTime, handshake_timeout: float = 10.0,
                 relay: bool = False):
        self._connector = connector
        #: "relay" when this connection runs through a relay, else "direct".
        self.path = "relay" if relay else "direct"
        self._relay_wait = relay
        self._relay_welcomed = False
        self._relay_buffer = b""
        self._keys = keys
        self._clock = clock
        self._handshake = Handshake(keys.handshake_key(), keys.role)
        self._handshake_timeout = handshake_timeout
        self._timer = None
        self._handler = None
        self._pending = bytearray()
        self._opener = None
        self._sealer = None
        self._chosen = False
        self._ended: str | None = None
        self._closing = False
        self._ticker = None
        self._last_sent = 0.0
        self._paused = False
        self._held: deque[tuple[int, bytes]] = deque()  # opened, not yet delivered
        self._closed = OneShot()
        self.lost_reason: str | None = None

    # -- candidate phase

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._handshake_timeout, self._drop, "handshake timed out")
        if self._relay_wait:
            # Through a relay: ask it to join us with the other side first.
            self.transport.write(f"RELAY {self._keys.relay_token()} {self._keys.role}\n".encode("ascii"))
        else:
            self.transport.write(self._handshake.hello())

    def _relayReply(self, data: bytes) -> bytes | None:
        """Wait for the relay's OK; return the bytes after it, or None."""
        self._relay_buffer += data
        line, newline, rest = self._relay_buffer.partition(b"\n")
        if newline and line.startswith(b"WELCOME ") and not self._relay_welcomed:
            # A rendezvous server relaying on its own port greets first (once).
            self._relay_welcomed = True
            self._relay_buffer = rest
            line, newline, rest = rest.partition(b"\n")
        if not newline:
            if len(self._relay_buffer) > 512:
                self._drop("relay sent an overlong line")
            return None
        if line.rstrip(b"\r") != b"OK":
            text = line.decode("utf-8", "replace").removeprefix("ERROR ").strip()
            self._drop(f"relay refused: {printable(text, 200)}")
            return None
        self._relay_wait = False
        self.transport.write(self._handshake.hello())
        return rest

    def dataReceived(self, data: bytes) -> None:
        if self._relay_wait:
            data = self._relayReply(data)
            if not data:
                return
        if self._opener is not None:
            if self._handler is None:
                self._pending += data
            else:
                self._records(data)
            return
        try:
            events = self._handshake.receive(data)
        except SecurityError as e:
            return self._drop(str(e))
        for event in events:
            if event[0] == "send":
                self.transport.write(event[1])
            elif event[0] == "authenticated":
                self._cancelTimer()
                self._connector.authenticated(self)
            elif event[0] == "selected":
                self._becomeChannel()
                self._pending += event[1]
                self._connector.selected(self)

    def select(self) -> None:
        self.transport.write(self._handshake.select())
        self._becomeChannel()

    def abandon(self) -> None:
        self._cancelTimer()
        self.transport.abortConnection()

    def _drop(self, reason: str) -> None:
        self.log.debug("dropping candidate {peer}: {reason}", peer=self.transport.getPeer(), reason=reason)
        self.lost_reason = reason
        self.abandon()

    def _cancelTimer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def _becomeChannel(self) -> None:
        self._chosen = True
        binding = self._handshake.binding
        self._sealer = self._keys.sealer(binding)
        self._opener = self._keys.opener(binding)
        _keepalive(self.transport)
        # Bulk data from here on: read up to 512 KiB per recv() (Twisted's
        # default is 64 KiB) and let that much queue before pausing a push
        # producer; hand the kernel up to 1 MiB per send() (Twisted's
        # default SEND_LIMIT is 128 KiB: on loopback that alone cost a
        # third of the throughput and 0.2 CPU-s per GiB in system time).
        # Reads of 1 MiB were no faster, and grew the heap by 13 MiB over a
        # long transfer (each recv() buffer is shrunk to what arrived,
        # which fragments the heap).
        self.transport.bufferSize = READ_SIZE
        self.transport.SEND_LIMIT = SEND_SIZE
        self._last_sent = self._clock.seconds()
        self._ticker = self._clock.callLater(KEEPALIVE_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        if self._closing or self.transport.disconnecting:
            return
        idle = self._clock.seconds() - self._last_sent
        if idle >= KEEPALIVE_INTERVAL:
            self.send(KEEPALIVE)
            idle = 0
        self._ticker = self._clock.callLater(max(0.0, KEEPALIVE_INTERVAL - idle), self._tick)

    def _stopTicker(self) -> None:
        cancel(self._ticker)
        self._ticker = None

    # -- channel phase

    @property
    def peer(self) -> str:
        p = self.transport.getPeer()
        host = normalise_host(p.host)
        return f"[{host}]:{p.port}" if ":" in host else f"{host}:{p.port}"

    def attach(self, handler: IRecordHandler) -> None:
        """Hand the chosen channel to the layer above; replays early data."""
        self._handler = handler
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._records(data)
        if self._ended is not None:
            handler.channelLost(self._ended)

    def send(self, kind: int, payload: bytes = b"") -> None:
        self._last_sent = self._clock.seconds()
        self.transport.writeSequence(self._sealer.seal(kind, payload))

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseReading(self) -> None:
        """Deliver no more records until L{resumeReading}; stop reading the
        socket, so TCP flow control slows the other side down."""
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._paused:
            self._paused = False
            self._deliver()
            if not self._paused:
                self.transport.resumeProducing()

    def close(self) -> None:
        """
        Close after flushing what was sent.  Only our direction is shut at
        first: closing a socket with unread input makes the kernel send RST,
        which can destroy our last record (ACK, ABORT) before the other side
        reads it.  We keep reading (and ignoring) until the other side
        closes too; the transfer layer aborts if that takes too long.
        """
        self._closing = True
        self._held.clear()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._stopTicker()
        try:
            self.transport.loseWriteConnection()
        except AttributeError:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        self.transport.abortConnection()

    def _records(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            records = self._opener.feed(data)
        except SecurityError as e:
            self.lost_reason = str(e)
            self.transport.abortConnection()
            return
        self._held.extend(records)
        self._deliver()

    def _deliver(self) -> None:
        held = self._held
        while held and not self._paused:
            if self._handler is None or self._closing or self.transport.disconnecting:
                held.clear()
                return
            kind, payload = held.popleft()
            if kind != KEEPALIVE:
                self._handler.recordReceived(kind, payload)

    def whenClosed(self):
        """A Deferred that fires once the TCP connection is gone."""
        return self._closed.when()

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancelTimer()
        self._stopTicker()
        self._closed.fire(None)
        if not self._chosen:
            self._connector.lost(self, self.lost_reason)
            return
        self._ended = self.lost_reason or (reason.getErrorMessage() if reason else "connection closed")
        if self._handler is not None:
            self._handler.channelLost(self._ended)


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
