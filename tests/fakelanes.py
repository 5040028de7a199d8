"""
Fake lanes for driving L{p2pft.session.SessionLink} without sockets: a
L{Wire} is one TCP connection between the two peers, with an L{End} on each
side that offers what a chosen L{p2pft.channel.PeerConnection} offers
(attach, send, registerProducer, pauseReading, close, abort, peer, path).
Records cross in order per wire, and only when the test says so
(L{Wire.deliver}); a L{Net} holds two links, the leader (C{a}) and the
follower (C{b}), and the wires between them.

What the fakes copy from the real connection:
- close() shuts our direction only (a FIN after what we sent); from then on
  what arrives is read and ignored (L{p2pft.channel.records.Records}).  The
  other side, on reading the FIN, loses the connection (PeerConnection does
  not do half-close), which sends a FIN back; once that arrives we are lost
  too.
- abort() resets the connection: both ends are lost at once, nothing in
  flight arrives.
- A paused end reads nothing: records (and a FIN) wait on the wire.
- A lost end stops its registered producer, like a transport.
- A registered producer at close() is noted (it would keep a real
  transport from closing).
"""

from __future__ import annotations

import random
from collections import deque

from twisted.internet.task import Clock

from p2pft.channel import KEEPALIVE, KEEPALIVE_INTERVAL
from p2pft.session import SessionLink
from p2pft.session.link import ACK_DELAY, LEAVE, SACK

FIN = object()
#: Kinds of the session itself, not of the transfer.
SESSION_KINDS = (KEEPALIVE, SACK, LEAVE)


class End:
    """One side of a L{Wire}: the connection as one link's lane sees it."""

    def __init__(self, wire: "Wire", name: str, path: str, peer: str):
        self.wire = wire
        self.name = name
        self.path = path
        self.peer = peer
        self.other: End | None = None
        self.handler = None
        self.out: deque = deque()  # on the wire towards the other end
        self.sent: list[tuple[int, int, bytes]] = []  # (kind, seq, payload), all we wrote
        self.after_close: list[tuple[int, int, bytes]] = []  # written once closed or lost: dropped
        self.ignored: list[tuple[int, int, bytes]] = []  # arrived once we had closed
        self.early: list[tuple[int, int, bytes]] = []  # arrived before attach
        self.producer = None
        self.streaming = None
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.aborted = False
        self.fin_seen = False
        self.lost: str | None = None
        self.closed_with_producer = False
        self.writable = True
        self.last_sent = 0.0

    def __repr__(self):
        return f"<End {self.wire.name}.{self.name} {self.path}>"

    # -- what a PeerConnection offers --------------------------------------

    def attach(self, handler) -> None:
        self.handler = handler
        early, self.early = self.early, []
        for kind, seq, payload in early:
            self._arrive(kind, seq, payload)
        if self.lost is not None:
            handler.channelLost(self.lost)

    def send(self, kind: int, payload: bytes = b"", seq: int = 0) -> None:
        record = (kind, seq, bytes(payload))
        if self.closed or self.lost is not None:
            self.after_close.append(record)
            return
        self.last_sent = self.wire.net.clock.seconds()
        self.sent.append(record)
        if not self.wire.dead:
            self.out.append(record)

    def registerProducer(self, producer, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseReading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeReading(self) -> None:
        self.paused = False

    def close(self) -> None:
        if self.closed or self.lost is not None:
            return
        self.closed = True
        self.paused = False  # Records.close() reads again (and ignores)
        if self.producer is not None:
            self.closed_with_producer = True
        if not self.wire.dead:
            self.out.append(FIN)

    def abort(self) -> None:
        self.aborted = True
        self.wire.reset(self)

    # -- the test's side ----------------------------------------------------

    def set_writable(self, writable: bool) -> None:
        """The transport's write buffer filled up (False) or drained (True)."""
        self.writable = writable
        if self.producer is not None:
            if writable:
                self.producer.resumeProducing()
            else:
                self.producer.pauseProducing()

    def inject(self, kind: int, seq: int = 0, payload: bytes = b"") -> None:
        """A record from the other side, handed over now (reading or not)."""
        self._arrive(kind, seq, payload)

    def data_sent(self) -> list[int]:
        """Sequence numbers of the transfer records written here."""
        return [seq for kind, seq, payload in self.sent if kind not in SESSION_KINDS and seq]

    def kinds_sent(self) -> list[int]:
        return [kind for kind, seq, payload in self.sent]

    def _arrive(self, kind, seq, payload) -> None:
        if self.lost is not None:
            return
        if self.closed:
            self.ignored.append((kind, seq, payload))
        elif self.handler is None:
            self.early.append((kind, seq, payload))
        else:
            self.handler.recordReceived(kind, seq, payload)

    def lose_now(self, reason: str = "Connection reset by peer") -> None:
        """This end alone learns its connection is gone (before it was
        attached, say)."""
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        if self.handler is not None:
            self.handler.channelLost(reason)


class Wire:
    """One connection between the two sides, an L{End} on each."""

    def __init__(self, net: "Net", name: str, path: str):
        self.net = net
        self.name = name
        self.path = path
        self.a = End(self, "a", path, f"{name}-b:1")  # a's end; its peer is b
        self.b = End(self, "b", path, f"{name}-a:1")
        self.a.other, self.b.other = self.b, self.a
        #: Packets vanish both ways and nobody is told (a NAT forgot us).
        self.dead = False
        self.lane_a = self.lane_b = None

    def __repr__(self):
        return f"<Wire {self.name} {self.path}>"

    def join(self, a: bool = True, b: bool = True) -> "Wire":
        if a:
            self.lane_a = self.net.a.link.join(self.a)
        if b:
            self.lane_b = self.net.b.link.join(self.b)
        return self

    @property
    def gone(self) -> bool:
        return self.a.lost is not None and self.b.lost is not None

    def end(self, side: str) -> End:
        return self.a if side == "a" else self.b

    def pending(self, frm: str) -> int:
        """Items on the wire from side C{frm}, waiting to be delivered."""
        return len(self.end(frm).out)

    def deliver(self, frm: str = "a", n: int | None = None) -> int:
        """Deliver up to C{n} (default: all) items sent by side C{frm} to
        the other side, in order, as far as it reads; how many moved."""
        src = self.end(frm)
        dst = src.other
        moved = 0
        while src.out and (n is None or moved < n) and not dst.paused and dst.lost is None:
            item = src.out.popleft()
            moved += 1
            if item is FIN:
                dst.fin_seen = True
                if dst.closed:
                    dst._lose("Connection was closed cleanly.")
                else:
                    # PeerConnection has no half-close: the connection is
                    # lost, its socket closed, which ends the closer too.
                    if not dst.wire.dead:
                        dst.out.append(FIN)
                    dst.closed = True
                    dst._lose("Connection was closed cleanly.")
            else:
                dst._arrive(*item)
        return moved

    def cut(self, reason: str = "Connection reset by peer") -> None:
        """The connection breaks: both sides learn it at once, and what was
        in flight is lost."""
        self.a.out.clear()
        self.b.out.clear()
        self.a._lose(reason)
        self.b._lose(reason)

    def reset(self, by: End) -> None:
        self.a.out.clear()
        self.b.out.clear()
        by._lose("Connection was aborted locally using ITCPTransport.abortConnection.")
        if not self.dead:
            by.other._lose("Connection reset by peer")

    def blackhole(self) -> None:
        """Nothing crosses any more and nobody is told."""
        self.dead = True
        self.a.out.clear()
        self.b.out.clear()


class Side:
    """One peer: its SessionLink and what it told the transfer above."""

    def __init__(self, clock, leader: bool, window: int, attach: bool = True):
        self.records: list[tuple[int, bytes]] = []
        self.lost: list[str] = []
        self.lost_all: list[str] = []
        self.paths: list[tuple[str, str, int]] = []
        self.controls: list[tuple[int, bytes]] = []
        self.on_record = None  # called with (kind, payload) after it is recorded
        self.link = SessionLink(clock, leader, lost_all=self.lost_all.append,
                                path_changed=lambda p, peer, n: self.paths.append((p, peer, n)),
                                control=lambda k, p: self.controls.append((k, p)), window=window)
        if attach:
            self.link.attach(self)

    # IRecordHandler
    def recordReceived(self, kind: int, payload: bytes) -> None:
        self.records.append((kind, payload))
        if self.on_record is not None:
            self.on_record(kind, payload)

    def channelLost(self, reason: str) -> None:
        self.lost.append(reason)


class Net:
    """Two links, C{a} (the leader) and C{b}, and the wires between them."""

    def __init__(self, window: int = 64 * 1024, clock: Clock | None = None):
        self.clock = clock or Clock()
        self.a = Side(self.clock, True, window)
        self.b = Side(self.clock, False, window)
        self.wires: list[Wire] = []

    def wire(self, path: str = "direct", join: bool = True) -> Wire:
        w = Wire(self, f"w{len(self.wires)}", path)
        self.wires.append(w)
        if join:
            w.join()
        return w

    def flush(self, rng: random.Random | None = None, limit: int = 1_000_000) -> int:
        """Deliver everything both ways until nothing moves (at random, one
        item at a time, with C{rng}); how many items moved."""
        total = 0
        for _ in range(limit):
            ready = [(w, s) for w in self.wires for s in "ab"
                     if w.end(s).out and not w.end(s).other.paused and w.end(s).other.lost is None]
            if not ready:
                return total
            if rng is None:
                for w, s in ready:
                    total += w.deliver(s)
            else:
                w, s = rng.choice(ready)
                total += w.deliver(s, 1)
        raise AssertionError("flush did not settle")

    def advance(self, seconds: float) -> None:
        """Time passes: timers run, idle ends send a KEEPALIVE (like
        Records' ticker)."""
        self.clock.advance(seconds)
        now = self.clock.seconds()
        for w in self.wires:
            for e in (w.a, w.b):
                if not e.closed and e.lost is None and now - e.last_sent >= KEEPALIVE_INTERVAL:
                    e.send(KEEPALIVE)

    def settle(self, rng: random.Random | None = None, rounds: int = 1000) -> None:
        """Deliver and let delayed SACKs go until nothing moves."""
        for _ in range(rounds):
            moved = self.flush(rng)
            if self.clock.getDelayedCalls() and any(
                    c.getTime() <= self.clock.seconds() + ACK_DELAY for c in self.clock.getDelayedCalls()):
                self.advance(ACK_DELAY)
                moved += 1
            if not moved:
                return
        raise AssertionError("settle did not settle")


class Pull:
    """A pull producer like the Sender: each resumeProducing sends the next
    C{burst} records of C{records} (kind, payload) on C{link}."""

    def __init__(self, link, records, burst: int = 1):
        self.link = link
        self.records = deque(records)
        self.burst = burst
        self.calls = 0
        self.active = False
        self.reentered = 0
        self.during = None  # called inside resumeProducing, after sending

    def resumeProducing(self) -> None:
        if self.active:
            self.reentered += 1
            return
        self.active = True
        try:
            self.calls += 1
            if self.calls > 100_000:
                raise AssertionError("resumeProducing called without end")
            for _ in range(self.burst):
                if not self.records:
                    break
                self.link.send(*self.records.popleft())
            if self.during is not None:
                self.during()
        finally:
            self.active = False

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Push:
    """A streaming producer that only records what it is told."""

    def __init__(self):
        self.paused = False
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")
