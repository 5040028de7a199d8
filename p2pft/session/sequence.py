"""
The session's sequence, as plain objects (no sockets, no clock): what we
sent and the other side has not acknowledged yet (L{Outbox}), and what we
received, put back in order (L{Inbox}).

Every record of the transfer gets the next sequence number of its direction
(1, 2, 3, ...), whichever connection ("lane") carries it.  The receiving
side delivers records in that order, each exactly once, whatever order the
lanes brought them in, and acknowledges (SACK) the next number it expects.
The sending side keeps each record until it is acknowledged: when a lane
dies, what it carried and was not acknowledged is sent again on another
lane (or on the next one to join), and the receiver drops what it already
has.  So a record is lost only if the whole session is.
"""

from __future__ import annotations

from collections import deque

import attrs

from ..errors import P2pftError

#: Bytes a record costs beyond its payload, for the window: the 13-byte
#: header and the 16-byte tag.
OVERHEAD = 29


class SequenceError(P2pftError):
    """The other side broke the session's sequence rules."""


@attrs.define(eq=False, slots=True)
class Sent:
    """One of our records until it is acknowledged."""

    seq: int
    kind: int
    payload: bytes
    #: The lane it was last written to; None while no lane has it.
    lane: object = None

    @property
    def size(self) -> int:
        return len(self.payload) + OVERHEAD


class Outbox:
    """
    Our records, numbered, kept until acknowledged.  C{window}: bytes we
    may have unacknowledged at once (L{full}); the other side's reorder
    buffer is bounded by it.
    """

    def __init__(self, window: int):
        self.window = window
        self._records: deque[Sent] = deque()
        self._next = 1
        #: The next number the other side expects (everything below it is
        #: acknowledged).
        self.acked = 1
        #: Bytes of unacknowledged records (L{Sent.size}).
        self.bytes = 0
        #: Unacknowledged records no lane has (so L{unplaced} costs nothing
        #: while there are none: it is asked on every acknowledgement, and a
        #: window of small files' records is thousands of them).
        self._unplaced = 0

    @property
    def full(self) -> bool:
        return self.bytes >= self.window

    @property
    def idle(self) -> bool:
        """Everything we sent was acknowledged."""
        return not self._records

    @property
    def sent(self) -> int:
        """Records numbered so far."""
        return self._next - 1

    def add(self, kind: int, payload: bytes) -> Sent:
        record = Sent(self._next, kind, payload)
        self._next += 1
        self._records.append(record)
        self.bytes += record.size
        self._unplaced += 1
        return record

    def place(self, record: Sent, lane) -> None:
        """C{record} is written to C{lane}."""
        if record.lane is None:
            self._unplaced -= 1
        record.lane = lane

    def ack(self, expected: int) -> list[Sent]:
        """The other side expects C{expected} next: the records this
        acknowledges (now forgotten).  An old acknowledgement is ignored;
        one of a record never sent is a L{SequenceError}."""
        if expected > self._next:
            raise SequenceError("the other side acknowledged records never sent")
        done = []
        records = self._records
        while records and records[0].seq < expected:
            record = records.popleft()
            self.bytes -= record.size
            if record.lane is None:
                self._unplaced -= 1
            done.append(record)
        self.acked = max(self.acked, expected)
        return done

    def lost(self, lane) -> list[Sent]:
        """Lane C{lane} is gone: its unacknowledged records, in order, now
        on no lane (to be sent again)."""
        again = [r for r in self._records if r.lane is lane]
        for record in again:
            record.lane = None
        self._unplaced += len(again)
        return again

    def unplaced(self) -> list[Sent]:
        """Unacknowledged records that no lane has, in order."""
        if not self._unplaced:
            return []
        return [r for r in self._records if r.lane is None]


class Inbox:
    """
    The other side's records back in order.  C{limit}: bytes it may hold
    out of order (records beyond a gap); an honest sender never has more
    than its window unacknowledged, so more is a L{SequenceError}.
    """

    def __init__(self, limit: int):
        self.limit = limit
        #: The next number we expect: everything below it was received.
        self.next = 1
        self._held: dict[int, tuple[int, bytes]] = {}
        self.held_bytes = 0
        #: Records that arrived again (after a lane was lost) and were dropped.
        self.duplicates = 0

    def is_new(self, seq: int) -> bool:
        """Whether record C{seq} has not arrived before."""
        return seq >= self.next and seq not in self._held

    def add(self, seq: int, kind: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Record C{seq}: the records that are now in order, C{[(kind,
        payload), ...]}, possibly none."""
        if not self.is_new(seq):
            self.duplicates += 1
            return []
        if seq != self.next:
            self._held[seq] = (kind, payload)
            self.held_bytes += len(payload) + OVERHEAD
            if self.held_bytes > self.limit:
                raise SequenceError("the other side sent too far ahead of what it was acknowledged")
            return []
        ready = [(kind, payload)]
        self.next += 1
        held = self._held
        while self.next in held:
            kind, payload = held.pop(self.next)
            self.held_bytes -= len(payload) + OVERHEAD
            ready.append((kind, payload))
            self.next += 1
        return ready
