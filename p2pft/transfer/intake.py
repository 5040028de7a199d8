"""
The receiver's per-file intake: once an offer is accepted, L{Intake} takes
each FILE, its DATA and its FILE_END, checks them against the offer and
what the receiver proved it has (HAVE), writes the data to a sink of the
destination and has the destination place the file.  The L{Receiver}
keeps the flow around it (the offer, the decision, HAVE, END, the
channel); the intake keeps which file comes next and what became of the
files so far (what a failure message says about them).
"""

from __future__ import annotations

from array import array
from typing import Callable, Iterator

import attrs
from twisted.internet import defer

from ..errors import TransferFailed
from .endpoint import os_error
from .manifest import PARTIAL_SUFFIX, Entry, ManifestChecker, printable
from .records import DATA, END, FILE_END, FILES, count
from .resume import Have, check_resume, have_messages
from .sink import BufferPool, FileSink, StreamSink
from .small import SMALL_FILE, unpack

RESUME_HINT = "the data received so far is kept: run the same send and receive again to resume"
#: After a file failed its check: its data is gone, what came before it is not.
DISCARDED_HINT = ("its partial data was deleted; the files received before it are kept: "
                  "run the same send and receive again to resume")

class _Nowhere:
    """Where the data of a left-out file goes."""

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


@attrs.define
class Incoming:
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


class Intake:
    """
    The files of the accepted offer C{checker}, in the order the sender
    must send them, into C{dest} (an L{IDestination}).  C{have}: what the
    receiver already has ({file index: L{Have}}); C{unexpected(kind)}: the
    receiver's protocol error for a record out of place.  Each method
    raises L{TransferFailed} (or C{OSError}) for what the sender got wrong.
    """

    def __init__(self, dest, checker: ManifestChecker, have: dict[int, Have], overwrite: bool,
                 pool: BufferPool, run_blocking, unexpected: Callable[[int], TransferFailed]):
        self._dest = dest
        self._checker = checker
        self._have = have
        self._overwrite = overwrite
        self._pool = pool
        self._run_blocking = run_blocking
        self._unexpected = unexpected
        self._files: array = checker.entries.file_indices()
        self._next = 0
        #: The file being received, or None between files.
        self.current: Incoming | None = None
        self.kept = False  # data a later attempt can resume from
        self.placed = 0  # files moved into place
        self.discarded = False  # a file failed its check and its partial data was deleted
        self.dropped = 0  # data bytes of left-out files, read and dropped

    @property
    def files(self) -> int:
        return len(self._files)

    def prepare(self, size: int) -> Iterator[dict]:
        """Once accepted: room for what is still to come of C{size} bytes,
        and the folders.  The HAVE messages that say what is here."""
        self._dest.prepare(self._checker, size - sum(h.prefix.length for h in self._have.values()))
        return have_messages(self._have)

    def start(self, message: dict) -> tuple[Entry, Incoming | None]:
        """A FILE: the entry it starts, and the L{Incoming} file (its
        C{received}: the offset it resumes from), or None if the sender
        skips it (it is here already, complete and identical)."""
        if self.current is not None or self._next == len(self._files):
            raise TransferFailed("protocol error: unexpected FILE")
        self._dest.check_start(message)
        index = self._files[self._next]
        if message.get("file") != index:
            raise TransferFailed("protocol error: files out of order")
        self._next += 1
        entry = self._checker.entries[index]
        have = self._have.pop(index, None)
        if message.get("skip") is True:
            if have is None or not have.complete:
                raise TransferFailed("protocol error: skipped a file we do not have")
            self._dest.skip(entry)
            return entry, None
        offset = count(message.get("offset"), "offset", 0, entry.size if entry.size is not None else 0)
        if self._checker.entries.skipped(index):  # left out: its data goes nowhere, and nothing is touched
            if offset:
                raise TransferFailed("protocol error: resumed from data we do not have")
            self.current = Incoming(index, entry, StreamSink(_Nowhere()), received=0, dropped=True)
            return entry, self.current
        check_resume(have, entry.path, offset, self._overwrite)
        sink = self._dest.open_file(entry, offset, self._pool, self._run_blocking)
        self.current = Incoming(index, entry, sink, received=offset)
        return entry, self.current

    def whole(self, payload: bytes) -> tuple[int, str]:
        """A FILES record: whole small files (L{p2pft.transfer.small}),
        each checked as a FILE ... FILE_END would be, then written by the
        destination.  How many, the bytes they hold and the last one's path."""
        if self.current is not None or not self._dest.takes_whole:
            raise self._unexpected(FILES)
        entries, files, total, entry, first = self._checker.entries, self._files, 0, None, self._next
        for index, data in unpack(payload):
            if self._next == len(files) or files[self._next] != index:
                raise TransferFailed("protocol error: files out of order")
            entry = entries[index]
            if len(data) > SMALL_FILE:
                raise TransferFailed(f"protocol error: {printable(entry.path)} ({len(data)} bytes) is too big "
                                     f"to be sent whole")
            if entry.size != len(data):
                raise TransferFailed(f"size mismatch for {printable(entry.path)}: offered {entry.size}, "
                                     f"received {len(data)} bytes")
            self._next += 1
            have = self._have.pop(index, None)
            total += len(data)
            if entries.skipped(index):  # left out: dropped, nothing touched
                self.dropped += len(data)
                continue
            check_resume(have, entry.path, 0, self._overwrite)
            self._dest.write_whole(entry, data, self._overwrite)
            self.kept = True
            self.placed += 1
        return self._next - first, total, entry.path

    def reserve(self, size: int):
        """Where the next DATA record of C{size} bytes may be opened
        straight into (its sink's buffer), if it fits the file and the
        buffer; else None (L{data} copies it as usual)."""
        current = self.current
        if current is None or current.dropped:
            return None
        if current.entry.size is not None and current.received + size > current.entry.size:
            return None
        reserve = getattr(current.sink, "reserve", None)
        return reserve(size) if reserve is not None else None

    def data(self, data: bytes) -> Incoming:
        """A DATA record of the current file, written (or dropped)."""
        current = self.current
        if current is None:
            raise self._unexpected(DATA)
        if current.entry.size is not None and current.received + len(data) > current.entry.size:
            raise TransferFailed("the sender sent more data than it offered")
        current.received += len(data)
        if current.dropped:
            self.dropped += len(data)
        else:
            self.kept = self.kept or (current.entry.size is not None and getattr(current.sink, "keeps", True))
        try:
            current.sink.write(data)
        except OSError as e:
            raise os_error(e, current.entry.path + PARTIAL_SUFFIX) from None
        return current

    def file_end(self, message: dict) -> Incoming:
        """A FILE_END: the current file, to be placed once its sink
        finished; its data is discarded if it does not match."""
        current = self.current
        if current is None:
            raise self._unexpected(FILE_END)
        error = current.mismatch(message)
        if error:
            self.current = None
            self.discarded = self._dest.discard(current) or self.discarded
            raise TransferFailed(error)
        return current

    def place(self, current: Incoming) -> bool:
        """C{current} was written and checked: have the destination place
        it.  Whether it was (a left-out file is not)."""
        self.current = None
        if current.dropped:
            return False
        self._dest.place(current, self._overwrite)
        self.kept = True
        self.placed += 1
        return True

    def end(self, message: dict, done: int) -> None:
        """The END: it must come after every file (C{done}: the bytes the
        receiver counted) and say so."""
        if self.current is not None:
            raise self._unexpected(END)
        if self._next != len(self._files) or message.get("files") != len(self._files) \
                or message.get("bytes") != done:
            raise TransferFailed("the transfer ended early or does not match what arrived")

    def annotate(self, error: TransferFailed) -> TransferFailed:
        """C{error} and what the user can do about it, given what became of
        the files so far (of a destination that can be resumed into)."""
        if self.discarded:
            return TransferFailed(f"{error}; {DISCARDED_HINT}") if self.placed else error
        if self.kept:
            return TransferFailed(f"{error}; {RESUME_HINT}")
        return error

    def abandon(self) -> None:
        """The transfer ends: let the unfinished file go."""
        current, self.current = self.current, None
        if current is not None:
            self._dest.abandon(current)
