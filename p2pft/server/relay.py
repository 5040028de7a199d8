"""
The relay: splices two peers' TCP connections when punching cannot connect
them directly.

A peer connects and sends one line, C{RELAY <token> <side>}; the token is
derived from the session key (so only the two peers of a session can meet),
the side is C{sender} or C{receiver}.  When the other side with the same
token arrives, both get C{OK} and from then on every byte one sends is
written to the other.  The relay sees only ciphertext: the secure channel's
proof handshake and records run end to end through it.

The rules (pairing, limits) live in L{RelayServer}, a plain object; the
byte moving lives in L{_Splice}, with flow control both ways (a slow reader
pauses the other side's reads, so the relay never buffers without bound) and
optional per-session byte and rate caps.  L{RelayProtocol} is the standalone
relay's protocol; the rendezvous server's protocol takes the same C{RELAY}
line when started with C{--relay} (see L{RelayMixin}).
"""

from __future__ import annotations

import re

import attrs
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from ..addresses import ip_key
from .limits import FIRST_LINE_MIN_WAIT, Lobby, TokenBucket

SIDES = ("sender", "receiver")
_TOKEN = re.compile(r"[0-9a-f]{64}\Z")


#: Read size, send size and write buffer of each leg of a splice.
SPLICE_BUFFER = 256 * 1024

#: Seconds a standalone relay's connection may take to send its RELAY line
#: while the relay is not under pressure (the lobby is at most half full).
#: A peer sends it as soon as it is connected, so this only matters for a
#: link that stalls right after the handshake.
RELAY_LINE_TIMEOUT = 30.0

#: How much a session's rate limit lets through at once after a pause, in
#: seconds' worth of the rate.  A tenth of a second: above the reactor's
#: timer granularity and the scheduling jitter of a busy relay (a few ms),
#: so a flow at exactly the rate never stalls on the limiter, and about an
#: RTT's worth of data on a long path, so TCP's ack clock is not broken up;
#: yet a session that was silent for a while gets at most 0.1 s of the
#: rate (plus the one read already taken, L{SPLICE_BUFFER}) ahead of it.
RATE_BURST_SECONDS = 0.1


@attrs.frozen
class RelayLimits:
    """
    @ivar max_sessions: sessions (waiting or spliced) at once.
    @ivar max_per_ip: connections from one IP address at once.
    @ivar max_bytes: bytes one session may carry, both directions (0: no cap).
    @ivar rate: bytes per second one session may carry (0: no cap).
    @ivar idle_timeout: seconds a session may carry nothing before it is cut.
    @ivar waiting_timeout: seconds one side may wait for the other.
    @ivar max_pending: connections at once that have not sent their RELAY
        line yet (a standalone relay; see L{Lobby}).  A peer sends the line
        as soon as it is connected, so even a busy relay has a handful
        pending; 1000 is generous and keeps a flood of silent connections
        to 1000 descriptors (server_tap also keeps it below the open-file
        limit).
    """

    max_sessions: int = 1000
    max_per_ip: int = 16
    max_bytes: int = 0
    rate: int = 0
    idle_timeout: float = 300.0
    waiting_timeout: float = 60.0
    max_pending: int = 1000


class RelayServer:
    """Pairs relay connections by token and side; counts and limits them."""

    log = Logger()

    def __init__(self, clock: IReactorTime, limits: RelayLimits = RelayLimits()):
        self._clock = clock
        #: Standalone connections that have not sent RELAY yet.
        self.lobby = Lobby(clock, limits.max_pending, RELAY_LINE_TIMEOUT, FIRST_LINE_MIN_WAIT)
        self.limits = limits
        self._waiting: dict[str, "RelayMixin"] = {}
        self._sessions = 0
        self._per_ip: dict[str, int] = {}
        self.spliced = 0

    @property
    def limits(self) -> RelayLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: RelayLimits) -> None:
        self._limits = limits
        self.lobby.capacity = limits.max_pending

    @property
    def sessions(self) -> int:
        return self._sessions

    def connected(self, member: "RelayMixin", ip: str) -> str | None:
        """A new standalone connection (before its RELAY line): counted
        against its address at once, so idle connections cannot pile up,
        and kept in the lobby, whose wait shrinks as it fills."""
        reason = self._count(member, ip)
        if reason is not None:
            return reason
        if not self.lobby.enter(member, lambda: member.relayRefuse("timed out waiting for RELAY")):
            return "relay is busy, try again later"
        return None

    def _count(self, member: "RelayMixin", ip: str) -> str | None:
        if self._per_ip.get(ip, 0) >= self.limits.max_per_ip:
            return "too many relay connections from your address"
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        member.relay_ip = ip
        member.relay_counted = True
        return None

    def join(self, member: "RelayMixin", token: str, side: str, ip: str) -> str | None:
        """Admit C{member}; return a refusal reason, or None."""
        self.lobby.leave(member)
        if not _TOKEN.match(token) or side not in SIDES:
            return "malformed RELAY line"
        if not member.relay_counted:
            # A leg on a rendezvous port: it waited in the rendezvous
            # server's lobby, not ours.
            reason = self._count(member, ip)
            if reason is not None:
                return reason
        partner = self._waiting.get(token)
        if partner is None and self._sessions >= self.limits.max_sessions:
            return "relay is full, try again later"
        if partner is not None and partner.relay_side == side:
            return "this session already has a " + side
        member.relay_side = side
        if partner is None:
            self._sessions += 1
            self._waiting[token] = member
            member.relay_token = token
            member.relay_timer = self._clock.callLater(
                self.limits.waiting_timeout, member.relayRefuse, "the other side never came"
            )
            return None
        del self._waiting[token]
        _cancel(partner.relay_timer)
        partner.relay_timer = None
        self.spliced += 1
        _Splice(self, self._clock, partner, member).start()
        return None

    def left(self, member: "RelayMixin") -> None:
        """C{member} is gone (called once per counted member)."""
        self.lobby.leave(member)
        if member.relay_counted:
            member.relay_counted = False
            ip = member.relay_ip
            left = self._per_ip.get(ip, 1) - 1
            if left:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
        _cancel(member.relay_timer)
        if self._waiting.get(member.relay_token) is member:
            del self._waiting[member.relay_token]
            self._sessions -= 1

    def session_ended(self) -> None:
        self._sessions -= 1


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


@implementer(IPushProducer)
class _Direction:
    """
    Bytes from C{src} to C{dst}.  Registered as the producer on C{dst}'s
    transport: when C{dst} cannot keep up, we stop reading C{src}.  The
    session's rate limit pauses reading too; reading resumes only when
    neither holds it back.
    """

    def __init__(self, splice: "_Splice", src, dst):
        self._splice = splice
        self.src, self.dst = src, dst
        self.flow_paused = False

    def pauseProducing(self) -> None:
        self.flow_paused = True
        self.update()

    def resumeProducing(self) -> None:
        self.flow_paused = False
        self.update()

    def stopProducing(self) -> None:
        pass

    def update(self) -> None:
        if self.src.transport is None or self.src.transport.disconnected:
            return
        if self.flow_paused or self._splice.rate_paused:
            self.src.transport.pauseProducing()
        else:
            self.src.transport.resumeProducing()


class _Splice:
    """Two relay members joined: moves bytes, enforces per-session limits."""

    log = Logger()

    def __init__(self, server: RelayServer, clock, a: "RelayMixin", b: "RelayMixin"):
        self._server = server
        self._clock = clock
        self.members = (a, b)
        self.bytes = 0
        self.rate_paused = False
        rate = server.limits.rate
        # Starts empty: a new session has earned no burst.
        self._bucket = TokenBucket(rate, rate * RATE_BURST_SECONDS, clock.seconds()) if rate else None
        self._idle = None
        self._resume = None
        self._ended = False
        self._half_closed: set = set()
        self._directions = {}

    def start(self) -> None:
        a, b = self.members
        for src, dst in ((a, b), (b, a)):
            direction = _Direction(self, src, dst)
            self._directions[src] = direction
            src.relaySplice = self
            src.relayPeer = dst
        for m in self.members:
            m.transport.unregisterProducer()
            # Bulk data from here on: bigger reads and sends than Twisted's
            # 64 KiB / 128 KiB defaults (bufferSize is also the write buffer
            # at which the other leg stops being read, so memory per session
            # stays a few times this).  Measured on loopback: relay CPU per
            # GiB 1.03 -> 0.71 s; 1 MiB was faster still but raised RSS.
            m.transport.bufferSize = m.transport.SEND_LIMIT = SPLICE_BUFFER
        for src, direction in self._directions.items():
            direction.dst.transport.registerProducer(direction, True)
        self._touch()
        for m in self.members:
            m.relayPaired()

    def forward(self, src: "RelayMixin", data: bytes) -> None:
        if self._ended:
            return
        limits = self._server.limits
        self.bytes += len(data)
        if limits.max_bytes and self.bytes > limits.max_bytes:
            self.log.info("relay session over its byte cap")
            return self.end()
        src.relayPeer.transport.write(data)
        self._touch()
        if self._bucket is not None:
            # What was read is forwarded; reading stops until it is paid for.
            ahead = self._bucket.take(len(data), self._clock.seconds())
            if ahead > 0 and not self.rate_paused:
                self.rate_paused = True
                self._update()
                self._resume = self._clock.callLater(ahead, self._unthrottle)

    def _unthrottle(self) -> None:
        # Both directions share the bucket: bytes read while we were paused
        # (already in flight from the other side) may have deepened the debt.
        ahead = self._bucket.take(0, self._clock.seconds())
        if ahead > 0.001:  # (not for rounding errors)
            self._resume = self._clock.callLater(ahead, self._unthrottle)
            return
        self.rate_paused = False
        self._update()

    def _update(self) -> None:
        for d in self._directions.values():
            d.update()

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._server.limits.idle_timeout)
        else:
            self._idle = self._clock.callLater(self._server.limits.idle_timeout, self.end)

    def half_close(self, src: "RelayMixin") -> None:
        """C{src} will send no more: pass that on, and end the session once
        both directions are done (so a last record, an ABORT say, is
        delivered rather than destroyed by a reset)."""
        self._half_closed.add(src)
        peer = src.relayPeer
        if peer.transport is not None and not peer.transport.disconnected:
            peer.transport.loseWriteConnection()
        if len(self._half_closed) == 2:
            self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        _cancel(self._idle)
        _cancel(self._resume)
        self._server.session_ended()
        for m in self.members:
            m.relaySplice = None
            if m.transport is not None and not m.transport.disconnected:
                # A peer that stopped reading must not keep its socket.  (Set
                # before closing: the close may complete synchronously.)
                m.relay_abort = self._clock.callLater(10, m.transport.abortConnection)
                m.transport.unregisterProducer()
                m.transport.loseConnection()


class RelayMixin:
    """
    Relay behaviour for a LineReceiver protocol: call L{relayStart} with the
    words after C{RELAY}.  Needs C{self.factory.relay} (a L{RelayServer})
    and C{self.factory.clock}.
    """

    relay_token: str | None = None
    relay_side: str | None = None
    relay_ip: str = ""
    relay_timer = None
    relay_abort = None
    relay_counted = False
    relaySplice: _Splice | None = None
    relayPeer = None
    _relay_admitted = False
    _relay_refused = False

    def relayStart(self, args: list[str]) -> None:
        server: RelayServer = self.factory.relay
        if len(args) != 2:
            return self.relayRefuse("malformed RELAY line")
        ip = ip_key(self.transport.getPeer().host)
        reason = server.join(self, args[0], args[1], ip)
        if reason is not None:
            return self.relayRefuse(reason)
        self._relay_admitted = True
        self.setRawMode()

    def relayPaired(self) -> None:
        self.transport.write(b"OK\n")

    def rawDataReceived(self, data: bytes) -> None:
        if self.relaySplice is not None:
            self.relaySplice.forward(self, data)
        elif not self._relay_refused:
            self.relayRefuse("data before OK")

    def relayRefuse(self, reason: str) -> None:
        if self._relay_refused:
            return
        self._relay_refused = True
        if self._relay_admitted or self.relay_counted:
            self._relay_admitted = False
            self.factory.relay.left(self)
        self.relay_abort = self.factory.clock.callLater(10, self.transport.abortConnection)
        self.transport.write(f"ERROR {reason}\n".encode("utf-8"))
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        # IHalfCloseableProtocol: the peer shut its sending side.
        if self.relaySplice is not None:
            self.relaySplice.half_close(self)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def relayLost(self) -> None:
        _cancel(self.relay_abort)
        if not self._relay_admitted:
            if self.relay_counted:
                self.factory.relay.left(self)
            return
        self._relay_admitted = False
        splice = self.relaySplice
        self.factory.relay.left(self)
        if splice is not None:
            splice.end()


@implementer(IHalfCloseableProtocol)
class RelayProtocol(RelayMixin, LineReceiver):
    """A standalone relay's connection: one C{RELAY} line, then bytes."""

    delimiter = b"\n"
    MAX_LENGTH = 256
    _hello = None

    def connectionMade(self) -> None:
        reason = self.factory.relay.connected(self, ip_key(self.transport.getPeer().host))
        if reason is not None:
            return self.relayRefuse(reason)
        self._hello = self.factory.clock.callLater(
            RELAY_LINE_TIMEOUT, self.relayRefuse, "timed out waiting for RELAY")

    def lineReceived(self, line: bytes) -> None:
        _cancel(self._hello)
        words = line.rstrip(b"\r").decode("ascii", "replace").split(" ")
        if words[0] != "RELAY":
            return self.relayRefuse("expected RELAY")
        self.relayStart(words[1:])

    def lineLengthExceeded(self, line: bytes) -> None:
        self.relayRefuse("line too long")

    def connectionLost(self, reason=None) -> None:
        _cancel(self._hello)
        self.relayLost()


class RelayFactory(Factory):
    protocol = RelayProtocol

    def __init__(self, clock: IReactorTime, limits: RelayLimits = RelayLimits()):
        self.clock = clock
        self.relay = RelayServer(clock, limits)
