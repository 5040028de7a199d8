"""
How hard a punching attempt tries, as plain objects without sockets or a
clock: L{PunchSchedule}, the numbers, and L{AttemptPlan}, what one attempt
dials when (attempts, caps, pacing, the racing rule, the relays' delay).
L{p2pft.punch.PunchConnector} consults the plan and runs the sockets.
"""

from __future__ import annotations

import math
import random

import attrs
from twisted.internet import error
from twisted.python.failure import Failure

from .addresses import is_public, parse_ip


def refused(reason: Failure) -> bool:
    """
    Whether an attempt was refused by the network: a TCP reset, or an ICMP
    error (port unreachable: RFC 5382 REQ-4's recommended answer of a NAT
    to an unsolicited SYN).  Twisted's epoll reactor reports the latter as
    a L{error.ConnectError} wrapping a L{error.ConnectionDone} (the socket
    signalled an error before it connected; the errno is lost -- seen in
    the NAT lab: Nat("icmp")), never as a refusal.  Either way the peer's
    NAT is there and answering: both are raced alike.
    """
    if reason.check(error.ConnectionRefusedError):
        return True
    if not reason.check(error.ConnectError) or reason.check(error.TimeoutError, error.NoRouteError):
        return False
    inner = reason.value.args[0] if reason.value.args else None
    return isinstance(inner, Failure) and bool(inner.check(error.ConnectionDone, error.ConnectionLost,
                                                           error.ConnectionRefusedError))


#: Longest wait before our first attempts that a timed start (L{timed_delay})
#: may ask for, seconds.  It is half the difference of the two sides' round
#: trips to the rendezvous server: a geostationary satellite hop (about
#: 600 ms) on one side and a server next door on the other differs by 0.3 s;
#: more than this is a stall while measuring, not a path, and waiting on it
#: would only delay the direct path.
MAX_TIMED_DELAY = 0.5
#: Largest round trip to the server (ms) the peer's C{rtt_ms} may claim,
#: and largest C{sent_ms} (docs/PROTOCOL.md section 2); anything else is
#: taken as absent.
MAX_RTT_MS = 10_000
MAX_SENT_MS = 120_000


def _number(value, top: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (math.isfinite(value) and 0 <= value <= top):
        return None
    return value / 1000.0


def peer_rtt(value) -> float | None:
    """The peer's C{rtt_ms} (message 3), in seconds: a JSON number (not a
    bool) within [0, L{MAX_RTT_MS}]; None for anything else (absent, as
    from an older peer, or malformed: untrusted, so no delay)."""
    return _number(value, MAX_RTT_MS)


def peer_sent(value) -> float | None:
    """The peer's C{sent_ms} (message 3), in seconds, as L{peer_rtt}:
    within [0, L{MAX_SENT_MS}]."""
    return _number(value, MAX_SENT_MS)


def timed_delay(own_rtt: float | None, their_rtt: float | None, own_sent: float | None,
                their_sent: float | None, elapsed: float) -> float:
    """
    Seconds to hold our first attempts back so that they leave when the
    peer's do (timed punching, measured through the server).

    The server sends PAIRED to both sides at one instant C{s}; it reaches
    us C{o} later and the peer C{p} later (half of each side's round trip
    to the server, C{own_rtt} and C{their_rtt}).  Each side sends its
    candidates (message 3) some time after its PAIRED arrived
    (C{own_sent}, C{their_sent}: the key exchange, and whatever each side
    waited for locally, such as a port mapping), and starts punching once
    it has sent its own and the peer's have arrived.  So, after C{s}, the
    peer's candidates leave at C{p + their_sent}, ours at C{o + own_sent},
    and the peer starts at C{max(p + their_sent, o + own_sent + o + p)}.
    We are C{elapsed} seconds after our PAIRED arrived (C{o + elapsed}
    after C{s}): we wait until the peer starts, if that is later, at most
    L{MAX_TIMED_DELAY}.  Assumes each path to the server takes as long each
    way.  Any figure not known (an older peer): 0, no timing.
    """
    if None in (own_rtt, their_rtt, own_sent, their_sent):
        return 0.0
    o, p = own_rtt / 2, their_rtt / 2
    peer_starts = max(p + their_sent, o + own_sent + o + p)
    return min(MAX_TIMED_DELAY, max(0.0, peer_starts - (o + elapsed)))


#: Seconds the follower (the receiver) starts its attempts after the
#: leader's, once both are aligned (L{timed_delay}; for the fresh-port
#: punches, after the leader has its GROWN): a fixed order, so the leader's
#: SYN has opened its NAT's mapping before the follower's arrives there.
#: Measured in the NAT lab (two ICMP-answering NATs, 0 ms): when both sides
#: started within a fraction of a millisecond, a pair often got stuck (see
#: docs/PROTOCOL.md, "Stuck pairs"): 5 of 20 sessions direct; with this
#: order 20 of 20 (and 10 of 10 in each later cell).  20
#: ms is well above the jitter of two processes' timers on a loaded machine
#: (a few ms) and costs a direct path at most that much.
STAGGER = 0.020


@attrs.frozen
class PunchSchedule:
    """
    How hard to try.  See docs/PROTOCOL.md for the reasoning.

    @ivar redial: seconds between a failed attempt (timeout, unreachable)
        at a candidate and the next attempt at it.
    @ivar redial_refused: seconds before redialling the peer's public
        address (its first candidate, the one the server observed) when it
        answered with RST or ICMP unreachable (L{refused}), plus up to as much again at random.  A NAT that
        answers unsolicited SYNs with RST lets a connection through only
        while our own SYN is in flight through our NAT at the same moment
        as the peer's SYN through theirs, and each refused attempt lasts one
        round trip: so retry soon, at a jittered pace, to make those windows
        overlap -- but never in a tight loop.
    @ivar max_attempts: attempts at the peer's public address (and at each
        relay), at most (a peer's addresses are untrusted: this bounds what
        we send to any of them).
    @ivar redial_others: seconds before redialling any other candidate
        (private, link-local, loopback on a loopback server, or a further
        public address such as a global IPv6 one) that answered with RST.
        No NAT races us there: an RST from a LAN address is the peer before
        its listener is up (both sides start within about one server round
        trip of each other) or some other host.  A quarter of a second
        keeps the same-LAN case well inside the relay delay while sending
        any such address at most 4 SYNs a second.
    @ivar max_attempts_others: attempts per other candidate, at most: 20
        at the pace above covers 5 s of resets, several times what a peer
        on our LAN needs to start listening; after that the address is not
        the peer.  With 16 candidates, at most 300 attempts in all at
        addresses other than the peer's public one (60 a second).
    @ivar relay_delay: seconds before relays are tried.  Protocol v2
        dials them at once: a session starts on whichever path proves the
        key first and moves to a direct one found later, so waiting for
        direct only delays the first byte.
    @ivar relay_delay_refused: the same, when the peer's NAT has been
        answering our SYNs with RST (0 too: the same reasoning).
    @ivar attempt_timeout: seconds one outgoing connect may stay pending.
        Long enough for the kernel's SYN retransmissions (1 s, 3 s) to cross
        the other side's SYN; while it is pending, redialling the same
        4-tuple would fail anyway.
    @ivar deadline: seconds before the whole attempt gives up.
    @ivar handshake_timeout: seconds a connected candidate has to prove
        the key.
    @ivar gone_grace: seconds the follower keeps trying after the leader
        left the rendezvous server (its SELECT may still be in flight).
    """

    redial: float = 0.5
    redial_refused: float = 0.001
    max_attempts: int = 6000
    redial_others: float = 0.25
    max_attempts_others: int = 20
    relay_delay: float = 0.0
    relay_delay_refused: float = 0.0
    attempt_timeout: float = 4.0
    deadline: float = 20.0
    handshake_timeout: float = 10.0
    gone_grace: float = 3.0


class AttemptPlan:
    """
    What to try, and how hard: the per-address attempt schedule of one
    punching attempt as a plain object (no sockets, no clock), which the
    L{PunchConnector} consults and tells what happened.

    It holds the addresses (the peer's candidates and the relays, each
    once), the one candidate raced at the fast pace after RSTs, how many
    attempts each address has had and may have, the wait before the next,
    when the relays are due, and why each address failed (for the final
    error).  See L{p2pft.punch.PunchConnector} for the parameters.
    """

    def __init__(self, schedule: PunchSchedule, candidates: list[tuple[str, int]],
                 relays: list[tuple[str, int]] = (), own_hosts: frozenset[str] = frozenset(),
                 rng: random.Random | None = None):
        self.schedule = schedule
        self.candidates = list(dict.fromkeys(candidates))
        self.relays = list(dict.fromkeys(relays))
        first = parse_ip(self.candidates[0][0]) if self.candidates else None
        #: The candidate raced at the fast pace: the peer's public address --
        #: never one of our own (C{own_hosts}): a peer behind our NAT has our
        #: public address, and a hostile one may name it to aim the race at
        #: our own services.
        racing = first is not None and is_public(first) and str(first) not in own_hosts
        self.racing = self.candidates[0] if racing else None
        self._random = rng or random.Random()
        self._attempts: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], str] = {}
        #: RSTs from the raced candidate: its NAT is there and racing us.
        self.refused = 0
        #: Whether the relays' time has come (relays learnt later are
        #: dialled at once).
        self.relays_due = False

    def add_relays(self, relays: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Take the relays in C{relays} not known yet; return them."""
        new = [r for r in dict.fromkeys(relays) if r not in self.relays]
        self.relays.extend(new)
        return new

    def attempting(self, address: tuple[str, int]) -> None:
        """An attempt at C{address} starts."""
        self._attempts[address] = self._attempts.get(address, 0) + 1

    def failed(self, address: tuple[str, int], why: str) -> None:
        """C{address} failed, for the reason C{why} (a few words)."""
        self.errors[address] = why

    def next_attempt(self, address: tuple[str, int], reason: Failure, relay: bool) -> float | None:
        """Seconds before the next attempt at C{address}, whose last one
        failed with C{reason}; None when it has had all it may have."""
        racing = not relay and address == self.racing
        cap = self.schedule.max_attempts if relay or racing else self.schedule.max_attempts_others
        if self._attempts.get(address, 0) >= cap:
            return None
        if relay:
            return self.schedule.redial
        if refused(reason) and racing:
            # The peer's public address (the one the server saw) answers
            # (a reset, or ICMP unreachable): its NAT is there and racing us.
            self.refused += 1
            return self.schedule.redial_refused * (1 + self._random.random())
        if refused(reason):
            # A reset from elsewhere (a private address: some other host
            # here, or the peer not listening yet) says nothing of a race.
            return self.schedule.redial_others
        return self.schedule.redial

    def relay_hold(self, waited: float) -> float:
        """Seconds more to hold the relays back, once C{schedule.relay_delay}
        (C{waited} seconds since the start) is over: 0 to dial them now."""
        if self.refused and waited < self.schedule.relay_delay_refused:
            return self.schedule.relay_delay_refused - waited
        return 0.0

    def tried(self) -> str:
        """How each address failed so far ("" if none did)."""
        return "; ".join(f"{h}:{p}: {e}" for (h, p), e in self.errors.items())

    def failure(self) -> str:
        """What to report when the deadline passes."""
        detail = self.tried()
        how = "directly or through a relay" if self.relays else "directly"
        return f"could not connect to the other side {how}" + (f" ({detail})" if detail else "")
