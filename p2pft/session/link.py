"""
L{SessionLink}: one transfer's channel over a changing set of
authenticated connections ("lanes").

The transfer above sees one ordered, reliable record channel (the same
methods a single connection offered: C{attach}, C{send},
C{registerProducer}, C{pauseReading}, C{close}, ...).  Below, lanes join
(the first one that proves the key, a direct one found later, parallel
streams, a reconnection) and leave (retired, cut, silent) while it runs:

- Each record gets the next number of our sequence (L{Outbox}) and goes to
  the best lane: direct before relay, then the writable lane with the least
  unacknowledged data (so parallel lanes share the load by how fast each
  one drains).  The other side puts records back in order (L{Inbox}),
  delivers each once, and acknowledges with SACK.
- A direct lane retires every relay lane: nothing new is sent on them, and
  once all the leader sent on one is acknowledged it says LEAVE and closes
  it.  Nothing is sent twice and the transfer above notices nothing.
- A lane that dies (closed without LEAVE, reset, silent for L{SILENCE}
  seconds) gives its unacknowledged records to the others.  When none is
  left, C{lost_all(reason)} asks the layer above for new lanes
  (reconnection), and the transfer simply waits; L{give_up} ends it.

Unsequenced records of the session itself (seq 0): KEEPALIVE (the
channel's), SACK (the next number expected, 8 bytes), LEAVE (this lane is
retired; empty), and kinds from L{CONTROL} on, handed to C{control(kind,
payload)} (what the layer above says to its peer about lanes).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..channel import KEEPALIVE, KEEPALIVE_INTERVAL, ILaneHandler
from ..util import OneShot, cancel
from .interfaces import IRecordHandler
from .sequence import Inbox, Outbox, Sent, SequenceError

SACK = 13
LEAVE = 15
#: Unsequenced kinds from here on belong to the layer above (C{control}).
CONTROL = 16
_SACK = struct.Struct(">Q")

#: Bytes we may have sent and not had acknowledged, over all lanes.  It
#: bounds what each side holds for the session (our copies of sent records;
#: the other side's out-of-order records) and so also the throughput of a
#: path: WINDOW per round trip, 168 MB/s at 100 ms, 560 MB/s at 30 ms --
#: above what a 1 Gbit/s path carries at 100 ms, and the kernel's own
#: socket buffers (4 MiB by default on Linux) cap one TCP stream sooner.
WINDOW = 16 << 20
#: Delivered bytes after which we acknowledge at once; else within
#: ACK_DELAY seconds.  1/16 of the window keeps the sender's window open
#: with room to spare, at one 29-byte SACK per MiB (0.003 % of the data).
ACK_BYTES = 1 << 20
ACK_DELAY = 0.02
#: The transfer's record kinds that come in streams (L{p2pft.transfer.records}:
#: DATA 4, FILE 10, FILE_END 11, FILES 14): acknowledged by ACK_BYTES or
#: ACK_DELAY like any data.  Any other record is acknowledged at once (an
#: answer is awaited).  A folder of small files is three records a file
#: (or a FILES record of many): one SACK each cost the receiver a send()
#: per record.
STREAMED = frozenset({4, 10, 11, 14})
#: Seconds without hearing anything on a lane (the other side sends a
#: KEEPALIVE every KEEPALIVE_INTERVAL when it has nothing else to send)
#: before it counts as dead: three missed keepalives.  TCP's retransmission
#: timer on a lossy 100 ms path stays well under that.
SILENCE = 3 * KEEPALIVE_INTERVAL


@implementer(IPushProducer)
@attrs.define(eq=False)
class Lane:
    """One connection of the session, as the link keeps it."""

    link: "SessionLink"
    conn: object
    #: "direct" or "relay".
    path: str
    number: int
    heard: float
    #: Whether its transport takes more now (its write buffer is not full).
    writable: bool = True
    #: Bytes of our records written to it and not acknowledged yet.
    inflight: int = 0
    #: A relay lane once a direct one joined: nothing new goes on it.
    retiring: bool = False
    #: The other side said LEAVE on it.
    left: bool = False
    #: We said LEAVE on it.
    leaving: bool = False
    #: The connection is gone.
    gone: bool = False
    #: Whether a SACK arrived on it: records sent again wait for one, so
    #: what the other side already has is not sent twice.
    acked: bool = False
    final: bool = False

    @property
    def usable(self) -> bool:
        return not (self.gone or self.left or self.leaving or self.retiring)

    # IPushProducer, registered on the connection's transport
    def pauseProducing(self) -> None:
        self.writable = False

    def resumeProducing(self) -> None:
        self.writable = True
        self.link._pump()

    def stopProducing(self) -> None:
        self.writable = False


@implementer(ILaneHandler)
@attrs.define(eq=False)
class _LaneHandler:
    lane: Lane

    def recordReceived(self, kind: int, seq: int, payload: bytes) -> None:
        self.lane.link._received(self.lane, kind, seq, payload)

    def channelLost(self, reason: str) -> None:
        self.lane.link._laneLost(self.lane, reason)

    def place(self, kind: int, seq: int, size: int):
        return self.lane.link._place(kind, seq, size)


@attrs.define
class Counts:
    """Payload bytes of transfer records sent and received, by path."""

    direct: int = 0
    relay: int = 0
    #: Most lanes carrying the session at once.
    streams: int = 0

    def add(self, path: str, n: int) -> None:
        if path == "direct":
            self.direct += n
        else:
            self.relay += n


class SessionLink:
    """
    The transfer's channel over a set of lanes (see the module).

    @param leader: the sender: it retires relay lanes and closes them.
    @param lost_all: called with a reason when the last lane died while
        the session still needs one; the caller finds new lanes (L{join})
        or calls L{give_up}.
    @param path_changed: called with (path, peer, streams) whenever the
        path or the number of lanes on it changes.
    @param control: called with (kind, payload) for the layer above's
        unsequenced records (kinds L{CONTROL} and up).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, leader: bool, lost_all: Callable[[str], object] = lambda r: None,
                 path_changed: Callable[[str, str, int], object] = lambda p, peer, n: None,
                 control: Callable[[int, bytes], object] = lambda k, p: None, window: int = WINDOW):
        self._clock = clock
        self._leader = leader
        self._lost_all = lost_all
        self._path_changed = path_changed
        self._control = control
        self._outbox = Outbox(window)
        self._inbox = Inbox(2 * window + (1 << 20))
        self.lanes: list[Lane] = []
        self._joined = 0
        self._handler: IRecordHandler | None = None
        self._ready: deque[tuple[int, bytes]] = deque()
        self._paused = False
        self._producer = None
        self._streaming = False
        self._producer_paused = False
        self._pumping = False
        self._unacked_in = 0
        self._ack_timer = None
        self._ack_lane: Lane | None = None
        self._watch = None
        self._closing = False
        self._ended: str | None = None  # told the handler
        self._closed = OneShot()
        self._shown: tuple[str, int] | None = None
        self._last_path = "none"  # the path of the last lanes, once all are gone
        self.sent = Counts()
        self.received = Counts()
        #: Payload bytes of our records the other side acknowledged, in all
        #: and by path.
        self.acknowledged = 0
        self.delivered = Counts()

    # -- lanes (the layer above's side) -------------------------------------

    def join(self, conn) -> Lane:
        """Add the selected connection C{conn} (a L{p2pft.channel.PeerConnection})."""
        lane = Lane(self, conn, conn.path, self._joined, self._clock.seconds())
        self._joined += 1
        self.lanes.append(lane)
        conn.attach(_LaneHandler(lane))
        if lane.gone:
            return lane
        conn.registerProducer(lane, True)
        if self._paused:
            conn.pauseReading()
        if self._ended is not None or self._closing and self._outbox.idle:
            self._leave(lane)
            return lane
        if lane.path == "direct":
            for other in self.lanes:
                if other.path == "relay" and not other.gone:
                    other.retiring = True
        elif any(other.path == "direct" and other.usable for other in self.lanes):
            lane.retiring = True  # a relay leg that arrived late
        self._sack(lane)
        self._watching()
        self._retire()
        self._show()
        self._pump()
        return lane

    @property
    def live(self) -> list[Lane]:
        """The lanes records may go to."""
        return [lane for lane in self.lanes if lane.usable]

    @property
    def up(self) -> list[Lane]:
        """The lanes whose connection is still there (retiring, left or
        closing ones included)."""
        return [lane for lane in self.lanes if not lane.gone]

    @property
    def path(self) -> str:
        """The path the session runs on now: "direct" if any direct lane
        carries it, else "relay"."""
        live = self.live or self.up
        if not live:
            return self._last_path
        self._last_path = "direct" if any(lane.path == "direct" for lane in live) else "relay"
        return self._last_path

    @property
    def peer(self) -> str:
        live = self.live or self.up or self.lanes
        return live[0].conn.peer if live else "-"

    def give_up(self, reason: str) -> None:
        """No new lane could be found: the session is over."""
        self._end(reason)

    def send_control(self, kind: int, payload: bytes) -> bool:
        """An unsequenced record of the layer above, on the best lane;
        whether there was one."""
        lane = self._best()
        if lane is None:
            return False
        lane.conn.send(kind, payload)
        return True

    # -- the transfer's channel ---------------------------------------------

    def attach(self, handler: IRecordHandler) -> None:
        self._handler = handler
        self._deliver()
        if self._ended is not None:
            handler.channelLost(self._ended)

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self._ended is not None:
            return
        if not isinstance(payload, bytes):
            payload = bytes(payload)  # kept until acknowledged: the caller reuses its buffer
        record = self._outbox.add(kind, payload)
        lane = self._best()
        if lane is not None:
            self._write(lane, record)
        if self._streaming and not self._producer_paused and not self._can_take():
            self._producer_paused = True
            self._producer.pauseProducing()

    def registerProducer(self, producer, streaming: bool) -> None:
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        self._pump()

    def unregisterProducer(self) -> None:
        self._producer = None

    def pauseReading(self) -> None:
        if not self._paused:
            self._paused = True
            for lane in self.lanes:
                if not lane.gone:
                    lane.conn.pauseReading()

    def resumeReading(self) -> None:
        if self._paused:
            self._paused = False
            now = self._clock.seconds()
            for lane in self.lanes:
                lane.heard = max(lane.heard, now)  # we were not listening
            self._deliver()
            if not self._paused:
                for lane in self.lanes:
                    if not lane.gone:
                        lane.conn.resumeReading()

    def close(self) -> None:
        """End the session once everything we sent is acknowledged: then
        LEAVE and close every lane; C{channelLost} once all are gone.
        Reading goes on if it was paused (nothing more is delivered): the
        peer's acknowledgement of our last records, its LEAVE and its close
        must be read, or a transfer that ends while holding its records (a
        disk write pending) waits out its close timeout."""
        self._closing = True
        self._ready.clear()
        self._producer = None
        self.resumeReading()
        self._flush_ack()
        self._maybe_finish()

    def abort(self) -> None:
        """End now: every lane is aborted."""
        self._closing = True
        self._end("aborted", abort=True)

    def whenClosed(self) -> defer.Deferred:
        return self._closed.when()

    # -- internals: sending ---------------------------------------------------

    def _best(self) -> Lane | None:
        """Where the next record goes: a usable lane, direct before relay,
        writable before full, then the least unacknowledged data."""
        usable = self.live
        if not usable:
            return None
        if any(lane.path == "direct" for lane in usable):
            usable = [lane for lane in usable if lane.path == "direct"]
        return min(usable, key=lambda lane: (not lane.writable, lane.inflight, lane.number))

    def _write(self, lane: Lane, record: Sent) -> None:
        self._outbox.place(record, lane)
        lane.inflight += record.size
        self.sent.add(lane.path, len(record.payload))
        lane.conn.send(record.kind, record.payload, record.seq)

    def _can_take(self) -> bool:
        if self._closing or self._outbox.full:
            return False
        return any(lane.writable for lane in self.live)

    def _pump(self) -> None:
        """Let the producer write while a lane takes more and the window
        has room."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._producer is not None:
                if not self._can_take():
                    if self._streaming and not self._producer_paused:
                        self._producer_paused = True
                        self._producer.pauseProducing()
                    return
                if self._streaming:
                    if self._producer_paused:
                        self._producer_paused = False
                        self._producer.resumeProducing()
                    return
                before = self._outbox.sent
                self._producer.resumeProducing()
                if self._outbox.sent == before:
                    return
        finally:
            self._pumping = False

    def _resend(self) -> None:
        """Records that no lane has: onto lanes the other side has
        acknowledged on (so what it has is not sent again)."""
        targets = [lane for lane in self.live if lane.acked]
        if not targets:
            return
        for record in self._outbox.unplaced():
            lane = self._best() if self._best() in targets else targets[0]
            self._write(lane, record)

    # -- internals: receiving -------------------------------------------------

    def _received(self, lane: Lane, kind: int, seq: int, payload: bytes) -> None:
        lane.heard = self._clock.seconds()
        if self._ended is not None:
            return
        try:
            if kind == KEEPALIVE:
                return
            if kind == SACK:
                return self._on_sack(lane, payload)
            if kind == LEAVE:
                return self._on_leave(lane, payload)
            if kind >= CONTROL:
                return self._control(kind, payload)
            if seq == 0:
                raise SequenceError("the other side sent a transfer record without a number")
            new = self._inbox.is_new(seq)
            if new:
                # Counted on the path it came by (it may be delivered
                # later, after a record that came by another).
                self.received.add(lane.path, len(payload))
            ready = self._inbox.add(seq, kind, payload)
            if not new:
                return self._sack(lane)  # it was sent again: say we have it
        except (SequenceError, struct.error) as e:
            self.log.info("session protocol error on {peer}: {e}", peer=lane.conn.peer, e=e)
            return self._end(f"protocol error: {e}", abort=True)
        if not ready:
            return
        for kind, payload in ready:
            self._unacked_in += len(payload)
        self._ready.extend(ready)
        self._ack_lane = lane
        if self._unacked_in >= ACK_BYTES or any(kind not in STREAMED for kind, _ in ready):
            self._flush_ack()
        elif self._ack_timer is None:
            self._ack_timer = self._clock.callLater(ACK_DELAY, self._flush_ack)
        self._deliver()

    def _place(self, kind: int, seq: int, size: int):
        """A record that will be delivered the moment it arrives (the
        next in order, nothing waiting, reading on) may be opened straight
        into where the transfer puts it."""
        if seq != self._inbox.next or self._ready or self._paused or self._closing or self._ended is not None:
            return None
        place = getattr(self._handler, "place", None)
        return place(kind, size) if place is not None else None

    def _deliver(self) -> None:
        ready = self._ready
        while ready and not self._paused and self._handler is not None and not self._closing:
            kind, payload = ready.popleft()
            self._handler.recordReceived(kind, payload)

    def _flush_ack(self) -> None:
        cancel(self._ack_timer)
        self._ack_timer = None
        if self._unacked_in or self._closing:
            lane = self._ack_lane if self._ack_lane is not None and self._ack_lane.usable else self._best()
            if lane is not None:
                self._unacked_in = 0
                self._sack(lane)

    def _sack(self, lane: Lane) -> None:
        lane.conn.send(SACK, _SACK.pack(self._inbox.next))

    def _on_sack(self, lane: Lane, payload: bytes) -> None:
        (expected,) = _SACK.unpack(payload)
        lane.acked = True
        for record in self._outbox.ack(expected):
            self.acknowledged += len(record.payload)
            if record.lane is not None:
                record.lane.inflight -= record.size
                # By the path of the lane that carried it last (a record
                # sent again counts once).
                self.delivered.add(record.lane.path, len(record.payload))
        self._resend()
        self._retire()
        self._pump()
        self._maybe_finish()

    def _on_leave(self, lane: Lane, payload: bytes = b"") -> None:
        """The other side retired C{lane}: what we had on it goes elsewhere."""
        lane.left = True
        lane.final = payload == b"end"
        self._outbox.lost(lane)
        lane.inflight = 0
        self._resend()
        if not lane.leaving:
            lane.conn.unregisterProducer()
            lane.conn.close()
        self._show()

    # -- internals: lanes coming and going -----------------------------------

    def _retire(self) -> None:
        """The leader closes retiring lanes once what it sent on them is
        acknowledged."""
        if not self._leader:
            return
        for lane in self.lanes:
            if lane.retiring and not lane.leaving and not lane.gone and lane.inflight == 0:
                self._leave(lane, b"")
        self._show()

    def _leave(self, lane: Lane, payload: bytes = b"end") -> None:
        lane.leaving = True
        lane.conn.send(LEAVE, payload)
        lane.conn.unregisterProducer()
        lane.conn.close()

    def _laneLost(self, lane: Lane, reason: str) -> None:
        lane.gone = True
        lane.writable = False
        if not (lane.left or lane.leaving):
            self.log.info("lost the connection to {peer} ({path}): {reason}", peer=lane.conn.peer,
                          path=lane.path, reason=reason)
        self._outbox.lost(lane)
        lane.inflight = 0
        if self._ended is not None and all(other.gone for other in self.lanes):
            return self._closed.fire(None)
        remaining = self.up
        if not remaining:
            peer_ended = lane.left and lane.final and not self._closing
            if self._closing and self._outbox.idle:
                return self._end("closed")
            if peer_ended and self._outbox.idle:
                return self._end("the other side closed the connection")
            self._show()
            return self._lost_all(reason)
        if not self.live:
            # Only retiring relay lanes are left: they carry on.
            for other in remaining:
                other.retiring = False
        self._resend()
        self._show()
        self._pump()

    def _maybe_finish(self) -> None:
        if self._closing and self._outbox.idle and self._ended is None:
            lanes = self.up
            for lane in lanes:
                if not lane.leaving:
                    self._leave(lane)
            if not lanes:
                self._end("closed")

    def _end(self, reason: str, abort: bool = False) -> None:
        """The session is over: tell the transfer once, close what is left."""
        if self._ended is not None:
            return
        self._ended = reason
        cancel(self._ack_timer)
        cancel(self._watch)
        self._producer = None
        lanes = self.up
        for lane in lanes:
            if abort:
                lane.conn.abort()
            elif not lane.leaving:
                self._leave(lane)
        if not lanes:
            self._closed.fire(None)
        if self._handler is not None:
            self._handler.channelLost(reason)

    def _watching(self) -> None:
        if self._watch is None or not self._watch.active():
            self._watch = self._clock.callLater(KEEPALIVE_INTERVAL, self._check_silence)

    def _check_silence(self) -> None:
        self._watch = None
        if self._ended is not None:
            return
        now = self._clock.seconds()
        for lane in self.lanes:
            if not lane.gone and not self._paused and now - lane.heard > SILENCE:
                self.log.info("nothing heard from {peer} for {s:g} s", peer=lane.conn.peer, s=now - lane.heard)
                lane.conn.abort()
        if self.up:
            self._watching()

    def _show(self) -> None:
        live = self.live
        streams = len(live)
        self.sent.streams = self.received.streams = max(self.sent.streams, streams)
        shown = (self.path, streams)
        if live and shown != self._shown:
            first = self._shown is None
            self._shown = shown
            if not first:
                self._path_changed(self.path, self.peer, streams)
