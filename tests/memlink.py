"""An in-memory record channel pair for driving the transfer layer without
sockets, and helpers to run a sender against a receiver over it."""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from p2pft.errors import TransferFailed
from p2pft.transfer.scan import scan
from p2pft.transfer import Receiver, Sender
from p2pft.transfer.records import DATA, FILES
from p2pft.transfer.small import unpack


def files_content(payload: bytes) -> int:
    """The bytes of file content in a FILES record (0 if it is malformed)."""
    try:
        return sum(len(data) for _, data in unpack(payload))
    except TransferFailed:
        return 0


class FakeChannel:
    """One end of an in-memory channel; records go to the peer on pump()."""

    def __init__(self, log):
        self.handler = None
        self.peer = None
        self.queue = []
        self.producer = None
        self.closed = False
        self.lost = False
        self.paused = False  # the handler does not want records now
        self.log = log

    def attach(self, handler):
        self.handler = handler

    def send(self, kind, payload=b""):
        assert not self.closed, "send after close"
        payload = bytes(payload)  # the sender reuses its buffers
        self.log.append((self, kind, payload))
        self.queue.append((kind, payload))

    def registerProducer(self, producer, streaming):
        assert self.producer is None, "a producer is already registered"
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self):
        self.producer = None

    def pauseReading(self):
        self.paused = True

    def resumeReading(self):
        # Like PeerConnection: records held meanwhile are delivered by the
        # next pump().
        self.paused = False

    def close(self):
        # Like a transport: a registered producer would block the close.
        assert self.producer is None, "close() with a producer still registered"
        self.closed = True
        self.paused = False
        # Like loseConnection: lost once what we sent has been flushed (to a
        # peer that reads, or to nobody at all).
        if not self.queue or self.peer.handler is None:
            self.notify_lost()

    def abort(self):
        self.producer = None
        self.close()

    def notify_lost(self, reason="closed"):
        if not self.lost and self.handler is not None:
            self.lost = True
            self.handler.channelLost(reason)


class Link:
    def __init__(self):
        self.log = []
        self.a, self.b = FakeChannel(self.log), FakeChannel(self.log)
        self.a.peer, self.b.peer = self.b, self.a
        self.delivered = 0  # file content (DATA, FILES) that reached b
        #: The sides' clock, if they share one: calls due now run when nothing else moves.
        self.clock = None

    def pump(self, limit=1_000_000, data_limit=None):
        """Deliver records both ways and let pull producers run until
        nothing moves, or until C{data_limit} bytes of file content were delivered."""
        for _ in range(limit):
            progressed = False
            for ch in (self.a, self.b):
                while ch.queue and ch.peer.handler is not None and not ch.peer.paused:
                    kind, payload = ch.queue.pop(0)
                    ch.peer.handler.recordReceived(kind, payload)
                    if kind in (DATA, FILES) and ch is self.a:
                        self.delivered += len(payload) if kind == DATA else files_content(payload)
                        if data_limit is not None and self.delivered >= data_limit:
                            return
                    progressed = True
                if ch.producer is not None and not ch.streaming and not ch.queue:
                    # Like a transport, ask a pull producer for more once all
                    # was written, and not again until it wrote something.
                    ch.producer.resumeProducing()
                    progressed = progressed or bool(ch.queue) or ch.producer is None
            if (self.a.closed or self.b.closed) and not self.a.queue and not self.b.queue:
                for ch in (self.a, self.b):
                    if not ch.lost:
                        ch.notify_lost()
                        progressed = True
            if not progressed and self.clock is not None and any(
                    call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()):
                self.clock.advance(0)  # (the reactor's next turn: what was put off until then)
                progressed = True
            if not progressed:
                return
        raise AssertionError("pump did not settle")

    def cut(self, reason="Connection reset by peer"):
        """The connection breaks: both sides learn it at once."""
        self.a.queue.clear()
        self.b.queue.clear()
        self.a.producer = self.b.producer = None
        self.a.notify_lost(reason)
        self.b.notify_lost(reason)

    def sent(self, kind):
        """Payloads of the records of C{kind} sent so far, either way."""
        return [p for ch, k, p in self.log if k == kind]

    def content_sent(self) -> int:
        """Bytes of file content sent so far: in DATA records, and in
        FILES records (small files whole)."""
        return sum(map(len, self.sent(DATA))) + sum(map(files_content, self.sent(FILES)))


def accept(offer):
    return True


def start_pair(paths, out, decide=accept, overwrite=False, clock=None, manifest=None, **sender_kw):
    """A Sender of C{paths} and a Receiver into C{out} over a fresh L{Link},
    started but not pumped."""
    clock = clock or Clock()
    link = Link()
    link.clock = clock
    sender = Sender(link.a, clock, manifest or scan(paths), **sender_kw)
    receiver = Receiver(link.b, clock, out, decide, overwrite=overwrite)
    rd = receiver.start()
    sd = sender.start()
    return link, sender, receiver, sd, rd


def tree(root: str) -> dict[str, bytes | None]:
    """Everything under root: relative path -> content (None for a folder)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                found[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return found
