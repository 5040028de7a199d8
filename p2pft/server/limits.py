"""
Limits the two servers share, as plain objects on an injected clock:

- L{TokenBucket}: a rate with a bounded burst.  The relay paces each
  session's bytes with one; the rendezvous server meters each address's
  claims with one per address (L{ClaimLimiter}).
- L{Lobby}: the connections that have not said their first line yet, capped
  in number, with a wait for that line that shrinks as the lobby fills.
- L{AddressCounts}: connections at once per address key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable, Hashable

import attrs
from twisted.internet.interfaces import IReactorTime

#: The shortest wait for a connection's first line, however full the lobby.
#: A client sends its first line at most one round trip after connecting
#: (a rendezvous client reads WELCOME first), well under a second even on a
#: poor mobile link; 3 s leaves room for one lost segment's retransmission
#: (Linux's initial RTO is 1 s) on top.
FIRST_LINE_MIN_WAIT = 3.0

#: Seconds a connection a server closed (after an ERROR line, or at the end
#: of a relayed session) may take to finish closing before it is aborted: a
#: peer that stopped reading must not keep its socket and its address's
#: slot for ever.  Ten seconds flush a last line, or a last buffer of
#: records, over any path a peer can use.
CLOSE_GRACE = 10.0


@attrs.define
class TokenBucket:
    """
    C{rate} tokens a second accrue up to C{depth}.  Taking may drive the
    level below zero, down to C{floor}: a debt that takes time to repay
    (bytes already read must be forwarded; a failed claim must cost).
    """

    rate: float
    depth: float
    stamp: float
    level: float = 0.0
    floor: float = float("-inf")

    def refill(self, now: float) -> float:
        """The level at C{now}."""
        if now > self.stamp:
            self.level = min(self.depth, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def take(self, amount: float, now: float) -> float:
        """Take C{amount}; return the seconds until the level is back at 0."""
        self.level = max(self.floor, self.refill(now) - amount)
        return max(0.0, -self.level / self.rate)

    def give(self, amount: float, now: float) -> None:
        self.level = min(self.depth, self.refill(now) + amount)

    def full_at(self) -> float:
        """When the bucket will be full again if nobody takes from it."""
        return self.stamp + (self.depth - self.level) / self.rate


class ClaimLimiter:
    """
    One L{TokenBucket} per address key, each starting full.  The table
    forgets a key once its bucket has refilled (a full bucket is what a new
    key gets anyway), and never holds more than C{max_keys}: beyond that
    the key touched longest ago is forgotten, debt and all.
    """

    def __init__(self, clock: IReactorTime, burst: float, rate: float, floor: float,
                 max_keys: int):
        self._clock = clock
        self.burst, self.rate, self.floor = burst, rate, floor
        self.max_keys = max_keys
        self._table: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def try_take(self, key: str, amount: float = 1) -> bool:
        """Take C{amount} if C{key} has it; False (and nothing taken) if not."""
        now = self._clock.seconds()
        bucket = self._bucket(key, now)
        if bucket.refill(now) < amount:
            return False
        bucket.take(amount, now)
        return True

    def charge(self, key: str, amount: float) -> None:
        """Take C{amount} whatever the level (down to the floor)."""
        now = self._clock.seconds()
        self._bucket(key, now).take(amount, now)

    def refund(self, key: str, amount: float) -> None:
        now = self._clock.seconds()
        self._bucket(key, now).give(amount, now)

    def level(self, key: str) -> float:
        bucket = self._table.get(key)
        return self.burst if bucket is None else bucket.refill(self._clock.seconds())

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._table.pop(key, None)
        self._forget(now)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now, level=self.burst, floor=self.floor)
        self._table[key] = bucket  # most recently touched last
        return bucket

    def _forget(self, now: float) -> None:
        # Oldest touch first.  Every bucket untouched for (burst - floor) /
        # rate seconds is full, so this keeps the table to the keys active
        # in that time (a stale full one behind a younger non-full one waits
        # its turn; the size cap bounds the rest).
        table = self._table
        while table:
            oldest = next(iter(table.values()))
            if len(table) < self.max_keys and oldest.full_at() > now:
                break
            table.popitem(last=False)


class Lobby:
    """
    Connections that have not sent their first line yet, oldest first.

    The wait allowed for the first line is C{wait} while the lobby is at
    most half full, then shrinks linearly to C{min_wait} as it fills.  Each
    arrival first pushes out everyone who has waited longer than the wait
    allowed now (calling the C{evict} it entered with), then is itself
    turned away only if the lobby is still full: when all C{capacity}
    connections arrived within the last C{min_wait} seconds.  A flood of
    silent connections thus never takes more than C{capacity} descriptors,
    and up to C{capacity / min_wait} arrivals a second it only makes them
    wait less; at a rate R above that, only C{capacity / (min_wait * R)} of
    the arrivals (real clients among them) get in, the rest are refused.

    @param capacity: called for the number of places whenever it matters,
        so the owner's limit (which the service may lower to fit the
        open-file budget) is the only copy of it.
    """

    def __init__(self, clock: IReactorTime, capacity: Callable[[], int], wait: float, min_wait: float):
        self._clock = clock
        self._capacity = capacity
        self.wait = wait
        self.min_wait = min(min_wait, wait)
        self._waiting: OrderedDict[Hashable, tuple[float, Callable[[], None]]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def capacity(self) -> int:
        return self._capacity()

    def allowed_wait(self) -> float:
        """Seconds a connection may now wait for its first line."""
        fill = len(self._waiting) / max(1, self.capacity)
        if fill <= 0.5:
            return self.wait
        return max(self.min_wait, self.wait - (self.wait - self.min_wait) * (fill - 0.5) * 2)

    def enter(self, conn: Hashable, evict: Callable[[], None]) -> bool:
        """Admit C{conn}; False when the lobby is full (refuse it)."""
        now = self._clock.seconds()
        capacity = self.capacity
        while self._waiting:
            conn_, (since, evict_) = next(iter(self._waiting.items()))
            if now - since <= self.allowed_wait() and len(self._waiting) < capacity:
                break
            if now - since < self.min_wait:
                return False  # full of connections that just arrived
            del self._waiting[conn_]
            self.evicted += 1
            evict_()
        self._waiting[conn] = (now, evict)
        return True

    def leave(self, conn: Hashable) -> None:
        """C{conn} said its first line, or is gone."""
        self._waiting.pop(conn, None)


class AddressCounts(Mapping):
    """How many connections each address key (L{ip_key}) holds at once; a
    key whose count drops to zero is forgotten.  Read-only as a mapping."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        return self._counts[key]

    def __iter__(self):
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def full(self, key: str, cap: int) -> bool:
        """Whether C{key} already holds C{cap} connections."""
        return self._counts.get(key, 0) >= cap

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, key: str) -> None:
        left = self._counts.get(key, 1) - 1
        if left:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)
