"""
The sending side: L{Sender} offers a L{Manifest} and sends its files,
L{StreamSender} one stream of unknown length (standard input), and
L{TextSender} a short text instead of files.

    OFFER {entries, files, bytes}, ENTRIES ...     ->
                                                   <-  HAVE*, ACCEPT (or REJECT)
    per file: FILE {file, offset} | FILE {file, skip}, DATA ..., FILE_END {size}  ->
    END {files, bytes}                             ->
                                                   <-  ACK {files, bytes}
"""

from __future__ import annotations

from enum import Enum

from twisted.internet import defer
from zope.interface import implementer

from ..session import IRecordHandler
from ..errors import Declined, TransferFailed
from .endpoint import Endpoint, peer_text, run_now
from .scan import Manifest
from .offer import Offer, Result, entry_batches
from .outgoing import Outgoing
from .pacing import Paced, Pacer
from .records import (ACCEPT, ACK, DATA, END, ENTRIES, FILE, FILE_END, FILES, HAVE, OFFER, REJECT, TEXT, control,
                      parse_control)
from .small import pack
from .resume import HaveBook, check_have
from .text import encode_text

#: Plaintext bytes per DATA record: the protocol's largest record (1 MiB,
#: L{p2pft.secure.MAX_RECORD}).  Sealing and opening cost per byte; what a
#: record costs beyond that is Python's, about 35 µs on each side (the
#: wire, the session's numbering and acknowledgements, the sink).  At 1 MiB
#: that is a quarter of 256 KiB records' cost: measured on loopback,
#: file → file 1,200 → 1,482 MB/s and 1.86 → 1.63 CPU-s/GiB, stdin →
#: stdout 883 → 1,110 MB/s.  The receiver opens each one straight into its
#: 2 MiB write buffer (two to a buffer; 1 MiB divides the resume BLOCK).
CHUNK = 1 << 20
#: DATA records under C{--limit-rate}: the rate is kept to within about
#: one record, and on a slow link 256 KiB is a short burst where 1 MiB
#: would be a long one.
RATED_CHUNK = 256 * 1024
#: Payload bytes written each time the transport asks for more (a pull
#: producer that wrote less than the socket takes would idle the link).
BURST = 1 << 20
#: What a file costs of a burst beyond its bytes: opening, reading and
#: closing it are a few system calls (microseconds from a warm cache, a
#: disk seek from a cold one), where its bytes in a FILES record may be
#: none.  So one burst reads at most BURST / FILE_COST (512) files, about
#: one FILES record of empty ones, not 131,072.
FILE_COST = 2048


class SenderState(str, Enum):
    NEW = "new"
    OFFERING = "offering"  # sending ENTRIES
    OFFERED = "offered"  # waiting for HAVE*, ACCEPT or REJECT
    CHECKING = "checking"  # hashing our files against the HAVEs (on a thread)
    SENDING = "sending"
    ENDING = "ending"  # END sent, waiting for the ACK
    CLOSING = "closing"
    DONE = "done"
    FAILED = "failed"


class _ProducerSlot:
    """The channel's producer: registered at most once, unregistered once
    (a registered producer keeps loseConnection from ever completing)."""

    def __init__(self, channel):
        self._channel = channel
        self.taken = False

    def register(self, producer, streaming: bool) -> None:
        if not self.taken:
            self.taken = True
            self._channel.registerProducer(producer, streaming)

    def unregister(self) -> None:
        if self.taken:
            self.taken = False
            self._channel.unregisterProducer()

    def lost(self) -> None:
        """The transport dropped it: nothing to unregister."""
        self.taken = False


@implementer(IRecordHandler)
class Sender(Endpoint):
    """
    Offers a L{Manifest} and streams its files, one after the other, as a
    pull producer: the transport asks for more when it has room, so memory
    stays flat whatever the size or number of files.
    """

    State = SenderState

    def __init__(self, channel, clock, manifest: Manifest, progress=None, run_blocking=run_now,
                 rate: int | None = None, mtime_ns: bool = False):
        super().__init__(channel, clock, progress, run_blocking)
        self._pacer = Pacer(clock, rate, self._elapsed)  # rate: bytes per second, or None
        self._chunk = CHUNK if rate is None else RATED_CHUNK
        self._mtime_ns = mtime_ns  # the receiver takes times in nanoseconds
        self._manifest = manifest
        self._entries = manifest.entries
        self._files = manifest.checker.entries.file_indices()
        self._total = None if manifest.checker.streams else manifest.checker.bytes
        self._next_entry = 0
        self._have = HaveBook(self._entries)
        self._outgoing: Outgoing | None = None  # the files, once accepted
        self._name = ""  # of the file being sent
        self._producer = _ProducerSlot(channel)
        self._whole = False  # the receiver takes small files whole (FILES)

    @property
    def offer(self) -> Offer:
        return Offer.of(self._manifest.checker)

    def start(self) -> defer.Deferred:
        self._channel.attach(self)
        checker = self._manifest.checker
        self._channel.send(OFFER, control({"entries": len(self._entries), "files": checker.files,
                                           "bytes": self._total}))
        self.state = SenderState.OFFERING
        self._producer.register(self, False)
        return self.done

    def _on_have(self, payload: bytes) -> None:
        self._have.add(parse_control(payload))

    def _on_accept(self, payload: bytes) -> None:
        self._whole = parse_control(payload).get("files") is True
        self.state = SenderState.CHECKING
        work = self._run_blocking(check_have, self._entries, self._manifest.sources, self._have.take(), self._stop)
        self._later(work, self._send_files)

    def _on_reject(self, payload: bytes) -> None:
        message = peer_text(str(parse_control(payload).get("message", "declined")))
        self._fail(Declined(f"the receiver declined: {message}"), tell_peer=False)

    def _on_ack(self, payload: bytes) -> None:
        ack = parse_control(payload)
        if ack.get("files") != len(self._files) or ack.get("bytes") != self._bytes_done:
            raise TransferFailed("the receiver's acknowledgement does not match what we sent")
        self._cleanup()
        self._close_then(Result(self.offer.name, self._bytes_done, self._elapsed(), files=len(self._files),
                                resumed=self._resumed, skipped=self._skipped))

    _handlers = {
        (SenderState.OFFERED, HAVE): _on_have,
        (SenderState.OFFERED, ACCEPT): _on_accept,
        (SenderState.OFFERED, REJECT): _on_reject,
        (SenderState.ENDING, ACK): _on_ack,
    }

    def _send_files(self, plan: dict) -> None:
        self._outgoing = Outgoing(self._entries, self._manifest.sources, self._files, plan)
        self.state = SenderState.SENDING
        self._started = self._clock.seconds()
        self._producer.register(self, False)

    # IPullProducer
    def resumeProducing(self) -> None:
        try:
            if self.state is SenderState.OFFERING:
                self._send_entries()
            elif self.state is SenderState.SENDING:
                self._send_data()
        except (TransferFailed, OSError) as e:
            self._failed(e)

    def _send_entries(self) -> None:
        budget = BURST
        for self._next_entry, message in entry_batches(self._entries, self._next_entry, self._mtime_ns):
            payload = control(message)
            self._channel.send(ENTRIES, payload)
            budget -= len(payload)
            if budget <= 0:
                break
        if self._next_entry == len(self._entries):
            self.state = SenderState.OFFERED
            self._producer.unregister()

    def _send_data(self) -> None:
        budget = self._pacer.allowance(BURST, self._chunk, self.resumeProducing)
        outgoing = self._outgoing
        while budget > 0 and self.state is SenderState.SENDING:
            current = outgoing.current
            if current is None:
                if outgoing.all_started:
                    return self._end()
                if self._whole:
                    files = outgoing.whole()
                    if files:
                        budget -= self._send_whole(files) + len(files) * FILE_COST
                        continue
                self._open_next()
                budget -= FILE_COST
                continue
            chunk = outgoing.read(self._chunk)
            if chunk:
                got = len(chunk)
                self._bytes_done += got
                self._pacer.count(got)
                self._channel.send(DATA, chunk)
                budget -= got
            if current.remaining == 0:
                self._channel.send(FILE_END, control(outgoing.finish()))
        if self.state is SenderState.SENDING:
            self._progress(self._name)

    def _send_whole(self, files: list[tuple[int, bytes]]) -> int:
        """One FILES record of C{files}; its size."""
        payload = pack(files)
        size = sum(len(data) for _, data in files)
        self._bytes_done += size
        self._pacer.count(size)
        self._name = self._entries[files[-1][0]].path
        self._channel.send(FILES, payload)
        return len(payload)

    def _open_next(self) -> None:
        entry, message = self._outgoing.start_next()
        self._name = entry.path
        if message.get("skip"):
            self._bytes_done += entry.size
            self._skipped += entry.size
        else:
            self._bytes_done += message["offset"]
            self._resumed += message["offset"]
        self._channel.send(FILE, control(message))

    def _end(self) -> None:
        self._producer.unregister()
        self.state = SenderState.ENDING
        self._progress("")
        self._channel.send(END, control({"files": len(self._files), "bytes": self._bytes_done}))

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost will tell us why.
        self._producer.lost()

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if self._bytes_done and not isinstance(error, Declined) and self._total is not None:
            return TransferFailed(f"{error}; the receiver keeps what arrived: run the same send and receive again to resume")
        return error

    def _cleanup(self) -> None:
        super()._cleanup()
        self._pacer.cancel()
        # A registered producer keeps loseConnection from ever completing.
        self._producer.unregister()
        if self._outgoing is not None:
            self._outgoing.close()


@implementer(IRecordHandler)
class StreamSender(Sender):
    """
    Sends a stream of unknown length (standard input, a pipe): size null in
    the manifest, the real size in FILE_END.  C{source} is a L{FDReader}-like
    object: C{start(on_data, on_end)}, and an L{IPushProducer} that the
    channel's transport pauses when it cannot keep up.  A stream cannot be
    resumed.
    """

    def __init__(self, channel, clock, manifest: Manifest, source, progress=None, rate: int | None = None):
        super().__init__(channel, clock, manifest, progress, rate=rate)
        self._source = source
        self._paced = Paced(source)

    def _send_files(self, plan: dict) -> None:
        self.state = SenderState.SENDING
        self._started = self._clock.seconds()
        self._channel.send(FILE, control({"file": 0, "offset": 0}))
        self._producer.register(self._paced, True)
        self._source.start(self._data, self._eof)

    def _data(self, chunk: bytes) -> None:
        if self.state is not SenderState.SENDING:
            return
        size = self._chunk
        if len(chunk) <= size:
            self._bytes_done += len(chunk)
            self._channel.send(DATA, chunk)  # as it is: kept until acknowledged, not copied
        else:
            view = memoryview(chunk)
            for i in range(0, len(view), size):
                piece = view[i:i + size]
                self._bytes_done += len(piece)
                self._channel.send(DATA, piece)
        self._pacer.count(len(chunk))
        self._progress(self._entries[0].path)
        self._pacer.hold_back(self._paced)

    def _eof(self, error: str | None) -> None:
        if self.state is not SenderState.SENDING:
            return
        if error is not None:
            return self._fail(TransferFailed(f"cannot read standard input: {error}"))
        self._channel.send(FILE_END, control({"size": self._bytes_done}))
        self._end()

    def _cleanup(self) -> None:
        super()._cleanup()
        self._source.stop()


class TextState(str, Enum):
    NEW = "new"
    SENT = "sent"  # waiting for the ACK
    CLOSING = "closing"
    DONE = "done"
    FAILED = "failed"


@implementer(IRecordHandler)
class TextSender(Endpoint):
    """
    Sends one short text (L{p2pft.transfer.text}) in a TEXT record instead
    of an offer; fires with a L{Result} once the receiver acknowledged it.
    C{supported}: whether the receiver announced the text feature.  An
    older receiver would wait for an OFFER: it is sent an ABORT that says
    why instead.
    """

    State = TextState

    def __init__(self, channel, clock, text: str, supported: bool = True, progress=None):
        super().__init__(channel, clock, progress)
        self._data = encode_text(text)
        self._supported = supported

    def start(self) -> defer.Deferred:
        self._channel.attach(self)
        if not self._supported:
            self._fail(TransferFailed(
                "the sender sent a text message, which this version of p2pft cannot receive: "
                "update p2pft"))
            return self.done
        self._channel.send(TEXT, self._data)
        self.state = TextState.SENT
        return self.done

    def _on_ack(self, payload: bytes) -> None:
        if parse_control(payload).get("bytes") != len(self._data):
            raise TransferFailed("the receiver's acknowledgement does not match what we sent")
        self._bytes_done = len(self._data)
        self._cleanup()
        self._close_then(Result("text", len(self._data), self._elapsed(), files=0, text=True))

    _handlers = {(TextState.SENT, ACK): _on_ack}

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if not self._supported:
            return TransferFailed("the receiver runs an older p2pft that cannot receive text; "
                                  "send it as a file, or ask them to update")
        return error
