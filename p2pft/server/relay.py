"""
The relay: splices two peers' TCP connections when punching cannot connect
them directly.

A peer connects and sends one line, C{RELAY <token> <side> [<leg>]}; the
token is derived from the session key (so only the two peers of a session
can meet), the side is C{sender} or C{receiver}, the leg (1 to 15; absent
for leg 0, the v1 line) which of the session's connections through this
relay it is.  When the other side with the same token and leg arrives, both
get C{OK} and from then on every byte one sends is written to the other.
The relay sees only ciphertext: the secure channel's proof handshake and
records run end to end through it.

All the legs of one token are one session (L{Session}): for the session
limit, the byte cap, the rate and the idle timeout.

The rules (pairing, limits, refusals) live in L{RelayServer}, a plain
object that keeps one L{Leg} record per connection and reaches the
connection only through L{IRelayLeg}; the table of sessions and of the
legs waiting for their other side is its L{Pairing}; the byte moving, and
the limits a session's splices share, live in L{p2pft.server.splice}.
L{RelayProtocol} is the standalone relay's protocol; the rendezvous
server's protocol hands its connection over the same way when a C{RELAY}
line comes first (C{p2pft server --relay}).
"""

from __future__ import annotations

import enum
import re
from typing import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from ..addresses import ip_key
from ..util import cancel as _cancel
from .events import NO_EVENTS, IServerEvents, Refusal
from .limits import CLOSE_GRACE, FIRST_LINE_MIN_WAIT, AddressCounts, Lobby
from .splice import IRelayLeg, Session, Splice, TransportLeg

SIDES = ("sender", "receiver")
_TOKEN = re.compile(r"[0-9a-f]{64}\Z")
#: A leg field: decimal, no leading zeros, no sign.
_LEG = re.compile(r"(0|[1-9][0-9]*)\Z")

#: Legs one session may have: 0 (the v1 line, no leg field) to MAX_LEGS - 1.
MAX_LEGS = 16
#: Pairs (a leg waiting for its other side, or two legs spliced) one session
#: may hold at once: each leg once, and once more while the relay has not
#: yet noticed that a leg's old pair is dead (a silent cut; the peers
#: reconnect on the same leg, and that must not wait for the relay's TCP to
#: time out).  It keeps a session, which counts once against
#: C{max_sessions}, to at most 2 * MAX_PAIRS connections.
MAX_PAIRS = 2 * MAX_LEGS

#: Seconds a standalone relay's connection may take to send its RELAY line
#: while the relay is not under pressure (the lobby is at most half full).
#: A peer sends it as soon as it is connected, so this only matters for a
#: link that stalls right after the handshake.
RELAY_LINE_TIMEOUT = 30.0
#: Seconds a session cut for its byte cap stays refused, and how many such
#: sessions are remembered (64 bytes of token each): an hour is longer than
#: any peer keeps reconnecting (5 minutes by default).
SPENT_SECONDS = 3600.0
MAX_SPENT = 10_000


@attrs.frozen
class RelayLimits:
    """
    A session is a token: all its legs count once, and share its limits.

    @ivar max_sessions: sessions (waiting or spliced) at once.
    @ivar max_per_ip: connections from one IP address at once.
    @ivar max_bytes: bytes one session may carry, all legs and both
        directions (0: no cap).
    @ivar rate: bytes per second one session may carry, all legs together
        (0: no cap).
    @ivar idle_timeout: seconds a session may carry nothing, on any leg,
        before it is cut.
    @ivar waiting_timeout: seconds one side may wait for the other.
    @ivar max_pending: connections at once that have not sent their RELAY
        line yet (a standalone relay; see L{Lobby}).  A peer sends the line
        as soon as it is connected, so even a busy relay has a handful
        pending; 1000 is generous and keeps a flood of silent connections
        to 1000 descriptors (the service also keeps it below the open-file
        limit).
    """

    max_sessions: int = 1000
    max_per_ip: int = 16
    max_bytes: int = 0
    rate: int = 0
    idle_timeout: float = 300.0
    waiting_timeout: float = 60.0
    max_pending: int = 1000


class LegState(enum.Enum):
    #: Connected; its RELAY line not taken yet.
    CONNECTED = "connected"
    #: Admitted; waiting for the other side.
    WAITING = "waiting"
    #: Spliced to the other side.
    SPLICED = "spliced"
    #: Its session ended; closing.
    ENDED = "ended"
    #: Sent an ERROR line; closing.
    REFUSED = "refused"
    #: The connection is gone.
    GONE = "gone"


_ADMITTED = frozenset({LegState.WAITING, LegState.SPLICED, LegState.ENDED})
_SILENT = frozenset({LegState.REFUSED, LegState.GONE})


@attrs.define(eq=False)
class Leg:
    """One relay connection, as the relay keeps it."""

    connection: IRelayLeg
    #: Its address key (L{ip_key}).
    ip: str
    state: LegState = LegState.CONNECTED
    #: Whether it holds one of its address's connection slots.
    counted: bool = False
    side: str | None = None
    #: Its session's token, once admitted.
    token: str | None = None
    #: Which leg of its session it is (0 .. MAX_LEGS - 1).
    index: int = 0
    #: Its session, once admitted.
    session: Session | None = None
    #: The wait for its RELAY line, then for the other side.
    timer: IDelayedCall | None = None
    #: Aborts the connection if a close the relay began does not complete.
    abort: IDelayedCall | None = None
    #: Bytes read from it and forwarded, once spliced.
    bytes: int = 0
    splice: Splice | None = None
    #: The other leg of its splice.
    peer: Leg | None = None


class Pairing:
    """
    The relay's sessions, by token, and the legs waiting for their other
    side, by (token, leg).  Plain bookkeeping; L{RelayServer} applies it to
    connections.  A session lives while it holds a pair: a leg waiting, or
    two spliced.
    """

    def __init__(self, new_session: Callable[[str], Session]) -> None:
        self._new_session = new_session
        self._waiting: dict[tuple[str, int], Leg] = {}
        self._sessions: dict[str, Session] = {}

    @property
    def sessions(self) -> int:
        """Sessions at once, waiting or spliced."""
        return len(self._sessions)

    def admit(self, leg: Leg, token: str, index: int, side: str,
              max_sessions: int) -> tuple[Refusal | None, Leg | None]:
        """C{leg} comes as C{side} of leg C{index} of session C{token}: (a
        refusal, None), or (None, the partner it is spliced to), or (None,
        None) if it waits for one.  Either way it is now in the session
        (C{leg.session})."""
        session = self._sessions.get(token)
        if session is None and len(self._sessions) >= max_sessions:
            return Refusal.RELAY_FULL, None
        partner = self._waiting.get((token, index))
        if partner is not None and partner.side == side:
            return Refusal.RELAY_SIDE_TAKEN, None
        if partner is None and session is not None and session.pairs >= MAX_PAIRS:
            return Refusal.RELAY_TOO_MANY_LEGS, None
        if session is None:
            session = self._sessions[token] = self._new_session(token)
        leg.side, leg.token, leg.index, leg.session = side, token, index, session
        if partner is None:
            session.pairs += 1
            self._waiting[(token, index)] = leg
            return None, None
        del self._waiting[(token, index)]
        return None, partner

    def release(self, session: Session) -> bool:
        """One of C{session}'s pairs is over: True if that was its last
        (the session is gone; its (token, leg) pairs may be used again)."""
        session.pairs -= 1
        if session.pairs:
            return False
        del self._sessions[session.token]
        return True

    def left(self, leg: Leg) -> bool:
        """C{leg} is gone: its pair too, if it waited alone; True if that
        was its session's last."""
        key = (leg.token, leg.index)
        if leg.token is None or self._waiting.get(key) is not leg:
            return False
        del self._waiting[key]
        return self.release(leg.session)


class RelayServer:
    """
    Pairs relay legs by token, leg and side; counts, limits and refuses them.

    A protocol gets a L{Leg} from L{connected} (a standalone relay) or
    L{adopt} (a C{RELAY} line on a rendezvous port), then reports what its
    connection does: L{request} with the words after C{RELAY}, L{received},
    L{readClosed}, L{lost}; and L{refuse} for what it cannot parse.
    """

    def __init__(self, clock: IReactorTime, limits: RelayLimits = RelayLimits(),
                 events: IServerEvents = NO_EVENTS):
        self._clock = clock
        self.events = events
        #: Standalone connections that have not sent RELAY yet.
        self.limits = limits
        self.lobby = Lobby(clock, lambda: self.limits.max_pending, RELAY_LINE_TIMEOUT, FIRST_LINE_MIN_WAIT)
        self.pairing = Pairing(lambda token: Session(self, clock, token))
        self._per_ip = AddressCounts()
        self.spliced = 0
        #: Tokens cut for their byte cap, and until when they stay refused
        #: (a session reconnects on its own: without this it would start
        #: over with a fresh allowance).
        self._spent: dict[str, float] = {}

    def spend(self, token: str) -> None:
        """C{token}'s session was cut for its byte cap: refuse it for
        L{SPENT_SECONDS} (at most L{MAX_SPENT} tokens are remembered)."""
        now = self._clock.seconds()
        self._spent.pop(token, None)
        self._spent[token] = now + SPENT_SECONDS
        while len(self._spent) > MAX_SPENT or next(iter(self._spent.values())) < now:
            del self._spent[next(iter(self._spent))]

    def _is_spent(self, token: str) -> bool:
        until = self._spent.get(token)
        return until is not None and until >= self._clock.seconds()

    @property
    def sessions(self) -> int:
        return self.pairing.sessions

    @property
    def connections(self) -> int:
        """Connections holding one of their address's slots now."""
        return sum(self._per_ip.values())

    # -- what the protocols report

    def connected(self, connection: IRelayLeg) -> Leg:
        """A new standalone connection, before its RELAY line: counted
        against its address at once, so idle connections cannot pile up,
        and kept in the lobby, whose wait shrinks as it fills."""
        leg = Leg(connection, ip_key(connection.peerHost()))
        self.events.connected(leg.ip)
        reason = self._count(leg)
        if reason is None and not self.lobby.enter(leg, lambda: self.refuse(leg, Refusal.RELAY_TIMEOUT)):
            reason = Refusal.RELAY_BUSY
        if reason is not None:
            self.refuse(leg, reason)
        else:
            leg.timer = self._clock.callLater(RELAY_LINE_TIMEOUT, self.refuse, leg, Refusal.RELAY_TIMEOUT)
        return leg

    def adopt(self, connection: IRelayLeg) -> Leg:
        """A connection whose first line on a rendezvous port was RELAY: it
        waited in the rendezvous server's lobby, not ours, and is counted
        against its address when it joins."""
        return Leg(connection, ip_key(connection.peerHost()))

    def request(self, leg: Leg, args: list[str]) -> bool:
        """C{leg}'s RELAY line, the words after C{RELAY}: True if it is
        admitted (raw bytes follow), False if it was refused."""
        if leg.state is not LegState.CONNECTED:
            return False
        _cancel(leg.timer)
        leg.timer = None
        refusal = (Refusal.RELAY_MALFORMED, {"detail": "malformed RELAY line"}) if len(args) not in (2, 3) \
            else self.join(leg, *args)
        if refusal is not None:
            self.refuse(leg, refusal[0], **refusal[1])
            return False
        return True

    def received(self, leg: Leg, data: bytes) -> None:
        """Bytes from C{leg} after its RELAY line."""
        splice = leg.splice
        if splice is not None:
            splice.forward(leg, data)
        elif leg.state not in _SILENT and leg.state is not LegState.ENDED:
            # (A leg whose session ended may still have had bytes in the
            # reactor's last batch of events: they go nowhere, quietly.)
            self.refuse(leg, Refusal.RELAY_DATA_BEFORE_OK)

    def readClosed(self, leg: Leg) -> None:
        """C{leg}'s peer shut its sending side."""
        if leg.splice is not None:
            leg.splice.half_close(leg)
        else:
            leg.connection.close()

    def lost(self, leg: Leg) -> None:
        """C{leg}'s connection is gone."""
        _cancel(leg.abort)
        splice = leg.splice
        if leg.state in _ADMITTED or leg.counted:
            self._left(leg)
        leg.state = LegState.GONE
        if splice is not None:
            splice.end("lost")

    def refuse(self, leg: Leg, why: Refusal, **fields) -> None:
        """Send C{leg} an ERROR line (C{why}'s text with C{fields}) and
        close it (aborted if the close does not complete)."""
        if leg.state in _SILENT:
            return
        self.events.refused(why, leg.ip)
        reason = why.message(**fields)
        holds = leg.state in _ADMITTED or leg.counted
        leg.state = LegState.REFUSED
        if holds:
            self._left(leg)
        leg.abort = self._clock.callLater(CLOSE_GRACE, leg.connection.abort)
        leg.connection.write(f"ERROR {reason}\n".encode("utf-8"))
        leg.connection.close()

    # -- the rules

    def join(self, leg: Leg, token: str, side: str, index: str | None = None) -> tuple[Refusal, dict] | None:
        """Admit C{leg} as C{side} of leg C{index} (the line's field, None
        for leg 0) of session C{token}: it waits for the other side, or is
        spliced to it.  Return a refusal and the fields of its text, or
        None."""
        self.lobby.leave(leg)
        if not _TOKEN.match(token) or side not in SIDES:
            return Refusal.RELAY_MALFORMED, {"detail": "malformed RELAY line"}
        number = 0
        if index is not None:
            if not _LEG.match(index):
                # (As a v1 relay says of any third word.)
                return Refusal.RELAY_MALFORMED, {"detail": "malformed RELAY line"}
            number = int(index)
            if not 1 <= number < MAX_LEGS:
                return Refusal.RELAY_MALFORMED, {
                    "detail": f"relay leg out of range: 1 to {MAX_LEGS - 1} (leg 0 has no leg field)"}
        if self._is_spent(token):
            return Refusal.RELAY_SPENT, {}
        if not leg.counted:
            # A leg on a rendezvous port.
            reason = self._count(leg)
            if reason is not None:
                return reason, {}
        reason, partner = self.pairing.admit(leg, token, number, side, self.limits.max_sessions)
        if reason is not None:
            return reason, {"side": f"{side} on leg {number}" if number else side}
        if partner is None:
            leg.state = LegState.WAITING
            leg.timer = self._clock.callLater(
                self.limits.waiting_timeout, self.refuse, leg, Refusal.RELAY_ALONE
            )
            return None
        _cancel(partner.timer)
        partner.timer = None
        partner.state = leg.state = LegState.SPLICED
        session = leg.session
        if not session.number:
            # Its first splice: the session starts (however many legs follow).
            self.spliced += 1
            self.events.relaySessionStarted(self.spliced, (partner.ip, leg.ip))
        session.splice(partner, leg, self.spliced)
        return None

    def splice_ended(self, splice: Splice) -> None:
        """C{splice} ended (its legs close; the connections that are not
        gone yet still hold their address's slots); its session ends with
        its last pair."""
        for leg in splice.legs:
            if leg.state is LegState.SPLICED:
                leg.state = LegState.ENDED
        if self.pairing.release(splice.session):
            self._over(splice.session)

    def _over(self, session: Session) -> None:
        """C{session} has no pair left."""
        session.close()
        if session.number:
            seconds = max(0.0, self._clock.seconds() - session.started)
            self.events.relaySessionEnded(session.number, session.bytes, seconds, session.why)

    def _count(self, leg: Leg) -> Refusal | None:
        if self._per_ip.full(leg.ip, self.limits.max_per_ip):
            return Refusal.RELAY_PER_IP
        self._per_ip.add(leg.ip)
        leg.counted = True
        return None

    def _left(self, leg: Leg) -> None:
        """C{leg} gives back what it holds: its lobby place, its address's
        slot, its timer, and its session if it waited alone."""
        self.lobby.leave(leg)
        if leg.counted:
            leg.counted = False
            self._per_ip.remove(leg.ip)
        _cancel(leg.timer)
        if self.pairing.left(leg):
            self._over(leg.session)


@implementer(IHalfCloseableProtocol)
class RelayProtocol(LineReceiver):
    """A standalone relay's connection: one C{RELAY} line, then bytes, all
    reported to the L{RelayServer}."""

    delimiter = b"\n"
    MAX_LENGTH = 256
    leg: Leg | None = None

    def connectionMade(self) -> None:
        self.relay: RelayServer = self.factory.relay
        self.leg = self.relay.connected(TransportLeg(self.transport))

    def lineReceived(self, line: bytes) -> None:
        words = line.rstrip(b"\r").decode("ascii", "replace").split(" ")
        if words[0] != "RELAY":
            return self.relay.refuse(self.leg, Refusal.RELAY_MALFORMED, detail="expected RELAY")
        if self.relay.request(self.leg, words[1:]):
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        self.relay.received(self.leg, data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.relay.refuse(self.leg, Refusal.RELAY_MALFORMED, detail="line too long")

    def readConnectionLost(self) -> None:
        self.relay.readClosed(self.leg)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.relay.lost(self.leg)


class RelayFactory(Factory):
    protocol = RelayProtocol
    noisy = False  # the service logs its own start-up line

    def __init__(self, clock: IReactorTime, limits: RelayLimits = RelayLimits(),
                 events: IServerEvents = NO_EVENTS):
        self.clock = clock
        self.relay = RelayServer(clock, limits, events)
