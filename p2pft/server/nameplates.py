"""
The rendezvous server's nameplates (L{Nameplates}) and the metering of
claims on them (L{ClaimMeter}): plain objects on an injected clock, driven
by L{p2pft.server.rendezvous.RendezvousServer}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from ..util import cancel as _cancel
from .events import NO_EVENTS, IServerEvents
from .limits import ClaimLimiter

if TYPE_CHECKING:
    from .rendezvous import IRendezvousConnection

# Claims.  The only claim that can spoil somebody's code is one that joins
# a nameplate a peer at another address is waiting on: the claimer gets one
# SPAKE2 guess at that peer's code, and a wrong guess burns it.  Those
# claims are metered per address key (an IPv4 address, or an IPv6 /64:
# L{ip_key}) with a token bucket; joining a nameplate first taken from the
# same address key, or creating one, is free.

#: Claims of other addresses' nameplates one address key may make at once.
#: Sized for many real users behind one IPv4 address (an office NAT, a
#: carrier-grade NAT, a classroom): 30 people all typing a code within the
#: same minute.
CLAIM_BURST = 30
#: ...then this many a second (12 a minute), sustained.  A pairing whose two
#: members go on to confirm the key gives its claim back, so real users,
#: whose pairings confirm unless someone mistyped a code, are held back
#: only by how many of their claims are still being confirmed at once.
CLAIM_RATE = 0.2
#: What a pairing that ends without confirming costs its claimer in all,
#: the claim's own token included: a wrong code, an abandoned pairing, an
#: attacker's guess.  At CLAIM_RATE an address pays for one failure every
#: 25 s, 144 an hour.
UNCONFIRMED_CLAIM_COST = 5
#: The deepest an address's claims can go into debt: after a burst of
#: failures it may claim again within (1 + CLAIM_DEBT) / CLAIM_RATE = 155 s.
CLAIM_DEBT = 30
#: MSGs each member of a pair has sent once the key is confirmed: the
#: SPAKE2 message, the key confirmation, and the candidates, which a peer
#: sends only after its partner's confirmation opened (PROTOCOL.md §2), so
#: nobody who lacks the code can make a peer send its third.
CONFIRMED_MESSAGES = 3
#: Address keys whose claims are remembered at once, beyond those whose
#: buckets have refilled (forgotten anyway): about 400 bytes each, 40 MB
#: in all (measured with IPv6 keys).
MAX_CLAIM_KEYS = 100_000


@attrs.define(eq=False)
class Nameplate:
    name: str
    members: list
    timer: IDelayedCall | None = None
    #: Once two members met, the nameplate never takes another one.
    paired: bool = False
    expired: bool = False
    #: The address key of the member that took the nameplate first.
    owner: str = ""
    #: The address key that paid for joining it, until the pair confirms
    #: (refunded) or breaks up unconfirmed (charged the rest).
    claimer: str | None = None
    #: When its first member took it.
    since: float = 0.0


@attrs.define(eq=False)
class Member:
    """One connection of the rendezvous server, as the server keeps it."""

    connection: IRendezvousConnection
    ip: str = ""
    nameplate: Nameplate | None = None
    messages: int = 0
    timer: IDelayedCall | None = None
    #: Whether it sent its REPORT (one per member).
    reported: bool = False
    #: The address (host, port) the server sees it from, as in its WELCOME
    #: (None: not known), told to its partner in PAIRED.
    observed: tuple[str, int] | None = None


class Nameplates:
    """
    The nameplates in use.  A nameplate lives from its first member until
    both of its members are gone or its timer fires (C{waiting_timeout}
    for the first member alone, then C{paired_timeout}); once two members
    met nobody else may join it.
    """

    def __init__(self, clock: IReactorTime, limit: int, waiting_timeout: float, paired_timeout: float,
                 events: IServerEvents = NO_EVENTS):
        self._clock = clock
        self._events = events
        self.limit = limit
        self.waiting_timeout = waiting_timeout
        self.paired_timeout = paired_timeout
        self._table: dict[str, Nameplate] = {}
        self.pairings = 0

    def __len__(self) -> int:
        return len(self._table)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._table)

    def get(self, name: str) -> Nameplate | None:
        return self._table.get(name)

    def full(self) -> bool:
        return len(self._table) >= self.limit

    def free_name(self) -> str | None:
        """The lowest number not in use, or None when full."""
        if self.full():
            return None
        n = 1
        while str(n) in self._table:
            n += 1
        return str(n)

    def join(self, member: Member, name: str) -> None:
        """C{member} joins C{name}, taking it if free; both members get
        C{PAIRED} when it is the second."""
        nameplate = self._table.get(name)
        if nameplate is None:
            nameplate = self._table[name] = Nameplate(name, [], owner=member.ip, since=self._clock.seconds())
            nameplate.timer = self._clock.callLater(
                self.waiting_timeout, self._expire, nameplate,
                "nobody claimed the nameplate in time",
            )
        nameplate.members.append(member)
        member.nameplate = nameplate
        if len(nameplate.members) == 2:
            nameplate.paired = True
            _cancel(nameplate.timer)
            nameplate.timer = self._clock.callLater(
                self.paired_timeout, self._expire, nameplate, "pairing lasted too long"
            )
            self.pairings += 1
            # The wall clock may be stepped back: never a negative duration.
            self._events.paired(max(0.0, self._clock.seconds() - nameplate.since))
            # Each learns where the server sees the other from: the one
            # address a birthday punch may aim at (docs/PROTOCOL.md, s. 1).
            first, second = nameplate.members
            for m, other in ((first, second), (second, first)):
                seen = other.observed
                m.connection.sendLine(b"PAIRED" if seen is None else f"PAIRED {seen[0]} {seen[1]}".encode("ascii"))

    def leave(self, member: Member) -> None:
        """C{member} is gone: free its nameplate if it was the last one,
        else tell its partner (the seat stays empty)."""
        nameplate = member.nameplate
        nameplate.members.remove(member)
        if not nameplate.members:
            _cancel(nameplate.timer)
            del self._table[nameplate.name]
        elif nameplate.paired and not nameplate.expired:
            # The pair is broken; nobody may take the empty seat.
            for other in nameplate.members:
                other.connection.sendLine(b"GONE")

    def _expire(self, nameplate: Nameplate, reason: str) -> None:
        nameplate.timer = None
        nameplate.expired = True
        self._events.expired(nameplate.paired)
        for member in list(nameplate.members):
            member.connection.refuse(reason)


class ClaimMeter(ClaimLimiter):
    """The per-address claim allowance, applied to pairings (see above)."""

    def __init__(self, clock: IReactorTime):
        super().__init__(clock, CLAIM_BURST, CLAIM_RATE, -CLAIM_DEBT, MAX_CLAIM_KEYS)

    def claim(self, nameplate: Nameplate | None, ip: str) -> bool:
        """C{ip} joins C{nameplate} (None: a new one); False when it may
        not now."""
        if nameplate is None or nameplate.owner == ip:
            return True
        # A guess at a stranger's code: it costs, and costs more unless
        # the pair goes on to confirm the key.
        if not self.try_take(ip):
            return False
        nameplate.claimer = ip
        return True

    def messaged(self, nameplate: Nameplate) -> None:
        """A member of C{nameplate}'s pair sent a message."""
        if nameplate.claimer is not None and all(
            m.messages >= CONFIRMED_MESSAGES for m in nameplate.members
        ):
            # Both confirmed the key: that claim was no guess.
            self.refund(nameplate.claimer, 1)
            nameplate.claimer = None

    def parted(self, nameplate: Nameplate) -> None:
        """A member of C{nameplate} is leaving it."""
        if nameplate.paired and nameplate.claimer is not None:
            # The pair broke up (or expired) before confirming the key.
            self.charge(nameplate.claimer, UNCONFIRMED_CLAIM_COST - 1)
            nameplate.claimer = None
