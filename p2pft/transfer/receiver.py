"""
The receiving side: L{Receiver} takes an offer (or a text) and writes what
arrives to its L{IDestination}.

    OFFER, ENTRIES ...                  ->  (each entry checked: L{OfferReader})
                                        <-  HAVE* (L{p2pft.transfer.resume}), ACCEPT or REJECT
    FILE, DATA ..., FILE_END per file   ->  (checked, then placed by the destination)
    END                                 ->
                                        <-  ACK (after syncing the disk)
"""

from __future__ import annotations

from array import array
from enum import Enum
from typing import Callable

import attrs
from twisted.internet import defer
from zope.interface import implementer

from ..channel import IRecordHandler
from ..errors import Declined, TransferFailed
from .destination import DiskDestination, IDestination, StreamDestination
from .endpoint import Endpoint, os_error, run_now
from .manifest import PARTIAL_SUFFIX, Entry, ManifestChecker, NameRules, printable
from .offer import Offer, OfferReader, Result
from .records import ACCEPT, ACK, DATA, END, ENTRIES, FILE, FILE_END, HAVE, OFFER, REJECT, TEXT, control, count, \
    parse_control
from .resume import Have, check_resume, have_messages
from .sink import BufferPool, FileSink, StreamSink
from .text import decode_text

RESUME_HINT = "the data received so far is kept: run the same send and receive again to resume"
#: After a file failed its check: its data is gone, what came before it is not.
DISCARDED_HINT = ("its partial data was deleted; the files received before it are kept: "
                  "run the same send and receive again to resume")


class ReceiverState(str, Enum):
    NEW = "new"
    WAITING = "waiting"  # for an OFFER or a TEXT
    MANIFEST = "manifest"  # taking ENTRIES
    DECIDING = "deciding"  # the user is asked
    SCANNING = "scanning"  # hashing what is already there (on a thread)
    RECEIVING = "receiving"
    CLOSING = "closing"
    DONE = "done"
    FAILED = "failed"


class _Nowhere:
    """Where the data of a left-out file goes."""

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


@attrs.define
class _Incoming:
    """The file being received."""

    index: int
    entry: Entry
    sink: FileSink | StreamSink
    received: int
    #: A left-out file (C{skip_unsafe}): its data is dropped.
    dropped: bool = False

    def disk(self, work: defer.Deferred) -> defer.Deferred:
        """C{work} with a disk error turned into a clear failure."""
        def clear(f):
            f.trap(OSError)
            raise os_error(f.value, self.entry.path + PARTIAL_SUFFIX)
        return work.addErrback(clear)

    def mismatch(self, end: dict) -> str | None:
        """What is wrong with the sender's FILE_END for what arrived, if anything."""
        if end.get("size") != self.received or self.entry.size not in (None, self.received):
            return (f"size mismatch for {printable(self.entry.path)}: offered {self.entry.size}, "
                    f"received {self.received} bytes")
        return None


@implementer(IRecordHandler)
class Receiver(Endpoint):
    """
    Takes an offer into C{output} -- a folder (L{DiskDestination}) or an
    L{IDestination}: checks every entry, asks C{decide}, proves what it
    already has, then writes each file, verifies it and has the destination
    place it (never over an existing file unless C{overwrite}).

    @param decide: called with the L{Offer}; returns a Deferred that fires
        with True to accept.
    @param skip_unsafe: leave out the entries whose names cannot be written
        here (and what is below a refused folder), and take the rest; else
        such names refuse the whole offer, all of them listed.
    @param rules: the L{NameRules} to apply; by default the destination's
        (a folder's: this platform's, and its file system's).
    """

    State = ReceiverState

    def __init__(self, channel, clock, output, decide, overwrite: bool = False, progress=None,
                 run_blocking=run_now, skip_unsafe: bool = False, rules: NameRules | None = None,
                 show_text=None, mtime_ns: bool = False):
        super().__init__(channel, clock, progress, run_blocking)
        self._mtime_ns = mtime_ns  # the sender sends times in nanoseconds
        self._dest = output if IDestination.providedBy(output) else DiskDestination(output)
        self._decide = decide
        self._show_text = show_text
        self._overwrite = overwrite
        self._skip_unsafe = skip_unsafe
        self._rules = rules
        self._reader: OfferReader | None = None
        self._checker: ManifestChecker | None = None
        self._files = array("l")
        self._next_file = 0
        self._have: dict[int, Have] = {}
        self._current: _Incoming | None = None
        self._kept = False  # data a later attempt can resume from
        self._placed = 0  # files moved into place
        self._discarded = False  # a file failed its check and its partial data was deleted
        self._dropped = 0  # data bytes of left-out files, read and dropped
        self._pool = BufferPool()
        self.offer: Offer | None = None

    def start(self) -> defer.Deferred:
        self.state = ReceiverState.WAITING
        self._channel.attach(self)
        return self.done

    @property
    def destination(self) -> str:
        """Where the offer lands: the one top-level file or folder, or the
        output folder (C{-}: standard output)."""
        assert self.offer is not None
        return self._dest.where(self.offer)

    # -- the offer ---------------------------------------------------------

    def _on_text(self, payload: bytes) -> None:
        """A text message instead of an offer: show it, acknowledge, end."""
        if self._show_text is None:
            raise Declined("the other side sent a text message, and this receiver does not take text")
        self._show_text(decode_text(payload))
        self._channel.send(ACK, control({"bytes": len(payload)}))
        self._cleanup()
        self._close_then(Result("text", len(payload), self._elapsed(), "-", files=0, text=True))

    def _on_offer(self, payload: bytes) -> None:
        offer = parse_control(payload)
        self._reader = OfferReader(offer, self._name_rules, self._mtime_ns)
        self.state = ReceiverState.MANIFEST

    def _name_rules(self) -> NameRules:
        self._rules = self._dest.name_rules(self._rules)
        return self._rules

    def _on_entries(self, payload: bytes) -> None:
        if self._reader.take(parse_control(payload)):
            self._manifest_complete()

    def _manifest_complete(self) -> None:
        self._checker = checker = self._reader.finish(self._skip_unsafe)
        self._reader = None
        self._files = checker.file_indices()
        self.offer = Offer.of(checker)
        self._total = None if self.offer.size is None else self.offer.size + checker.refused_bytes
        self._dest.open(self.offer)
        self._dest.check_conflicts(checker, self._overwrite)
        self.state = ReceiverState.DECIDING
        d = defer.maybeDeferred(self._decide, self.offer)
        d.addCallbacks(self._decided, lambda f: self._fail(TransferFailed(f.getErrorMessage())))

    def _decided(self, accepted: bool) -> None:
        if self.state is not ReceiverState.DECIDING:
            return
        if not accepted:
            self._channel.send(REJECT, control({"message": "the receiver said no"}))
            self._fail(Declined("declined"), tell_peer=False)
            return
        self.state = ReceiverState.SCANNING
        self._later(self._dest.existing(self._checker, self._stop, self._run_blocking), self._accept)

    def _accept(self, have: dict[int, Have]) -> None:
        self._have = have
        self._dest.prepare(self._checker, (self.offer.size or 0) - sum(h.prefix.length for h in have.values()))
        for message in have_messages(have):
            self._channel.send(HAVE, control(message))
        self.state = ReceiverState.RECEIVING
        self._started = self._clock.seconds()
        self._channel.send(ACCEPT, control({}))

    # -- the files ---------------------------------------------------------

    def _on_file(self, payload: bytes) -> None:
        message = parse_control(payload)
        if self._current is not None or self._next_file == len(self._files):
            raise TransferFailed("protocol error: unexpected FILE")
        self._dest.check_start(message)
        index = self._files[self._next_file]
        if message.get("file") != index:
            raise TransferFailed("protocol error: files out of order")
        self._next_file += 1
        entry = self._checker.entries[index]
        have = self._have.pop(index, None)
        if message.get("skip") is True:
            if have is None or not have.complete:
                raise TransferFailed("protocol error: skipped a file we do not have")
            self._bytes_done += entry.size
            self._skipped += entry.size
            self._dest.skip(entry)
            self._progress(entry.path)
            return
        offset = count(message.get("offset"), "offset", 0, entry.size if entry.size is not None else 0)
        if self._checker.skipped(index):  # left out: its data goes nowhere, and nothing is touched
            if offset:
                raise TransferFailed("protocol error: resumed from data we do not have")
            self._current = _Incoming(index, entry, StreamSink(_Nowhere()), received=0, dropped=True)
            return
        check_resume(have, entry.path, offset, self._overwrite)
        sink = self._dest.open_file(entry, offset, self._pool, self._run_blocking)
        self._current = _Incoming(index, entry, sink, received=offset)
        self._bytes_done += offset
        self._resumed += offset

    def _on_data(self, data: bytes) -> None:
        current = self._current
        if current is None:
            raise self._unexpected(DATA)
        if current.entry.size is not None and current.received + len(data) > current.entry.size:
            raise TransferFailed("the sender sent more data than it offered")
        current.received += len(data)
        if current.dropped:
            self._dropped += len(data)
        else:
            self._kept = self._kept or current.entry.size is not None
        try:
            current.sink.write(data)
        except OSError as e:
            raise os_error(e, current.entry.path + PARTIAL_SUFFIX) from None
        self._bytes_done += len(data)
        self._progress(current.entry.path)
        if not current.sink.ready():
            self._after(current.disk(current.sink.when_ready()), lambda _: None)

    def _after(self, work: defer.Deferred, then: Callable) -> None:
        """Like L{_later}, and hold the records that arrive meanwhile
        (the disk is behind: the sender is slowed down by TCP)."""
        if work.called:
            return self._later(work, then)
        self._channel.pauseReading()

        def resume(result):
            then(result)
            if not self._ending:
                self._channel.resumeReading()
        self._later(work, resume)

    def _on_file_end(self, payload: bytes) -> None:
        current = self._current
        if current is None:
            raise self._unexpected(FILE_END)
        error = current.mismatch(parse_control(payload))
        if error:
            self._current = None
            self._discarded = self._dest.discard(current) or self._discarded
            raise TransferFailed(error)
        self._after(current.disk(current.sink.finish()), lambda _: self._place(current))

    def _place(self, current: _Incoming) -> None:
        self._current = None
        if current.dropped:
            return
        self._dest.place(current, self._overwrite)
        self._kept = True
        self._placed += 1
        if current.entry.size is None:
            self._total = current.received

    def _on_end(self, payload: bytes) -> None:
        if self._current is not None:
            raise self._unexpected(END)
        end = parse_control(payload)
        if self._next_file != len(self._files) or end.get("files") != len(self._files) \
                or end.get("bytes") != self._bytes_done:
            raise TransferFailed("the transfer ended early or does not match what arrived")
        self._dest.sync()
        self._channel.send(ACK, control({"files": len(self._files), "bytes": self._bytes_done}))
        self._cleanup()
        checker = self._checker
        self._close_then(Result(self.offer.name, self._bytes_done - self._dropped, self._elapsed(),
                                self.destination, checker.files, self._resumed, self._skipped,
                                checker.refused))

    _handlers = {
        (ReceiverState.WAITING, TEXT): _on_text,
        (ReceiverState.WAITING, OFFER): _on_offer,
        (ReceiverState.MANIFEST, ENTRIES): _on_entries,
        (ReceiverState.RECEIVING, FILE): _on_file,
        (ReceiverState.RECEIVING, DATA): _on_data,
        (ReceiverState.RECEIVING, FILE_END): _on_file_end,
        (ReceiverState.RECEIVING, END): _on_end,
    }

    # -- endings -----------------------------------------------------------

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if isinstance(error, Declined) or not self._dest.resumable:
            return error
        if self._discarded:
            return TransferFailed(f"{error}; {DISCARDED_HINT}") if self._placed else error
        if self._kept:
            return TransferFailed(f"{error}; {RESUME_HINT}")
        return error

    def _cleanup(self) -> None:
        super()._cleanup()
        current, self._current = self._current, None
        if current is not None:
            self._dest.abandon(current)
        self._pool.close()
        self._dest.close()


def StdoutReceiver(channel, clock, out, decide, progress=None, show_text=None, mtime_ns: bool = False) -> Receiver:
    """A L{Receiver} of a one-file transfer into the binary stream C{out}
    (standard output): L{StreamDestination}."""
    return Receiver(channel, clock, StreamDestination(out), decide, progress=progress, show_text=show_text,
                    mtime_ns=mtime_ns)
