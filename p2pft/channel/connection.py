"""
L{PeerConnection}: the Twisted protocol on one TCP connection to (maybe)
the other peer.  It only moves bytes: it holds the current phase
(L{RelayGreeting}, L{CandidateHandshake}, then L{Records}) and forwards
what it reads to it, and it wires each phase to the transport, the
punching connector and the next phase.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..punch import ICandidate
from ..addresses import normalise_host
from ..secure import Handshake, SessionKeys
from ..util import OneShot, no_delay
from .candidate import CandidateHandshake
from .greeting import RelayGreeting
from .interfaces import ILaneHandler, IPhase
from .records import Records


#: How much of struct tcp_info (linux/tcp.h) to ask for: up to tcpi_segs_out
#: (Linux 4.2+); tcpi_total_retrans is at offset 100, tcpi_bytes_acked at
#: 120, tcpi_segs_out at 136.
_TCP_INFO_SIZE = 144


@implementer(ICandidate)
class PeerConnection(Protocol):
    """One TCP connection to (maybe) the other peer: holds the current
    phase and forwards to it; the channel methods (L{attach} ... L{close})
    are for the chosen connection only."""

    log = Logger()

    def __init__(self, connector, keys: SessionKeys, clock: IReactorTime, handshake_timeout: float = 10.0,
                 relay: bool = False, leg: int = 0):
        self._connector = connector
        #: Through a relay: which of the session's legs there (0: the first).
        self.leg = leg
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
        self._hello_at = 0.0
        #: Seconds from our HELLO to the other side's proof of it (about
        #: one round trip of this path), once authenticated.
        self.rtt: float | None = None

    # -- as a candidate

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._candidate.startTimer(self._clock, self._handshake_timeout)
        if self.path == "relay":
            # Through a relay: ask it to join us with the other side first.
            greeting = RelayGreeting(self._keys.relay_token(), self._keys.role, self._write, self._drop,
                                     self._joined, leg=self.leg)
            self._phase = greeting
            greeting.start()
        else:
            self._hello()

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
        self._hello()
        if rest:
            self._candidate.dataReceived(rest)

    def _hello(self) -> None:
        self._hello_at = self._clock.seconds()
        self._candidate.hello()

    def _authenticated(self) -> None:
        # HELLO out, the other side's PROOF of it back: one round trip.
        self.rtt = self._clock.seconds() - self._hello_at
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

    def tcp_counts(self) -> tuple[int, int, int] | None:
        """What this connection's TCP says of it (Linux's TCP_INFO): bytes
        the other side acknowledged, segments retransmitted, segments sent;
        None where the kernel does not say."""
        try:
            info = self.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except (AttributeError, OSError):
            return None
        if len(info) < _TCP_INFO_SIZE:
            return None
        return (int.from_bytes(info[120:128], sys.byteorder), int.from_bytes(info[100:104], sys.byteorder),
                int.from_bytes(info[136:140], sys.byteorder))

    def attach(self, handler: ILaneHandler) -> None:
        """Hand the chosen channel to the layer above; replays early data."""
        self._records.attach(handler)

    def send(self, kind: int, payload: bytes = b"", seq: int = 0) -> None:
        self._records.send(kind, payload, seq)

    def registerProducer(self, producer, streaming: bool) -> None:
        self._records.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._records.unregisterProducer()

    def pauseReading(self) -> None:
        """Deliver no more records until L{resumeReading}; stop reading the
        socket, so TCP flow control slows the other side down."""
        self._records.pauseReading()

    def resumeReading(self) -> None:
        self._records.resumeReading()

    def close(self) -> None:
        """
        Close after flushing what was sent (once).  Only our direction is shut at
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
