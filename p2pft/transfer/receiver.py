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

from enum import Enum
from functools import partial

from twisted.internet import defer, task
from zope.interface import implementer

from ..session import IRecordHandler
from ..errors import Declined, TransferFailed
from .destination import DiskDestination, IDestination, StreamDestination
from .endpoint import Endpoint, run_now
from .intake import Incoming, Intake
from .manifest import ManifestChecker, NameRules
from .offer import Offer, OfferReader, Result
from .records import (ACCEPT, ACK, DATA, END, ENTRIES, FILE, FILE_END, FILES, HAVE, OFFER, REJECT, TEXT, control,
                      parse_control)
from .resume import Have
from .sink import BufferPool
from .text import decode_text

#: Files a receiver creates from FILES records before it lets the reactor
#: run (its other reads and writes, timers, the session's acknowledgements
#: and keepalives): one socket read can hold hundreds of records of empty
#: files, 512 each.  At 50-150 µs a file (ext4 on this project's machines
#: and on a laptop's SSD; a network file system is slower still) 1,024 keep
#: a turn near 0.1 s, far from the session's 15 s of silence.
FILES_PER_TURN = 1024
#: Bytes of small files (FILES records) written between two early syncs
#: (L{Receiver._sync_ahead}).  Each sync also flushes the disk's write
#: cache, a few ms on a real disk: at 32 MiB that is a handful per second
#: at the fastest, and what the final sync is left with is at most this
#: much plus what one sync takes to write.
SYNC_AHEAD = 32 << 20


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
        self._intake: Intake | None = None  # the files, once accepted
        self._pool = BufferPool()
        self._turn = 0  # files of FILES records created since the reactor last ran
        self._unsynced = 0  # bytes of FILES records written since a sync began
        self._syncing = False
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
        self._reader = OfferReader(parse_control(payload), partial(self._dest.name_rules, self._rules), self._mtime_ns)
        self.state = ReceiverState.MANIFEST

    def _on_entries(self, payload: bytes) -> None:
        if not self._reader.take(parse_control(payload)):
            return
        self._checker = checker = self._reader.finish(self._skip_unsafe)
        self._reader = None
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
        self._intake = intake = Intake(self._dest, self._checker, have, self._overwrite, self._pool,
                                       self._run_blocking, self._unexpected)
        for message in intake.prepare(self.offer.size or 0):
            self._channel.send(HAVE, control(message))
        self.state = ReceiverState.RECEIVING
        self._started = self._clock.seconds()
        # "files": send small files whole, many to a record (FILES).
        self._channel.send(ACCEPT, control({"files": True} if self._dest.takes_whole else {}))

    # -- the files ---------------------------------------------------------

    def _on_file(self, payload: bytes) -> None:
        entry, incoming = self._intake.start(parse_control(payload))
        if incoming is None:  # skipped: it is here already
            self._bytes_done += entry.size
            self._skipped += entry.size
            self._progress(entry.path)
        else:
            self._bytes_done += incoming.received
            self._resumed += incoming.received

    def place(self, kind: int, size: int):
        """A DATA record of the file being written goes straight into its
        write buffer (L{FileSink.reserve}) when it fits there."""
        if kind != DATA or self.state is not ReceiverState.RECEIVING or self._ending or self._intake is None:
            return None
        return self._intake.reserve(size)

    def _on_data(self, data: bytes) -> None:
        current = self._intake.data(data)
        self._bytes_done += len(data)
        self._progress(current.entry.path)
        if not current.sink.ready():
            self._later(current.disk(current.sink.when_ready()), lambda _: None, hold=True)

    def _on_file_end(self, payload: bytes) -> None:
        current = self._intake.file_end(parse_control(payload))
        self._later(current.disk(current.sink.finish()), lambda _: self._place(current), hold=True)

    def _on_files(self, payload: bytes) -> None:
        files, size, last = self._intake.whole(payload)
        self._bytes_done += size
        self._progress(last)
        self._turn += files
        self._unsynced += size
        if self._unsynced >= SYNC_AHEAD and not self._syncing:
            self._sync_ahead()
        if self._turn >= FILES_PER_TURN:  # let the reactor run: hold the next records until its next turn
            self._turn = 0
            self._later(task.deferLater(self._clock, 0, lambda: None), lambda _: None, hold=True)

    def _sync_ahead(self) -> None:
        """Start writing back the small files made so far, on a thread,
        while more arrive: the page cache holds them until the final
        L{IDestination.sync}, which would otherwise wait for all of them at
        the end (0.4-1.4 s for 50,000 files on this project's machines).
        One at a time; a failure is left for that final sync to report."""
        run = self._dest.sync_ahead()
        if run is None:
            return
        self._syncing, self._unsynced = True, 0

        def done(_):
            self._syncing = False

        self._run_blocking(run).addBoth(done)

    def _place(self, current: Incoming) -> None:
        if self._intake.place(current) and current.entry.size is None:
            self._total = current.received

    def _on_end(self, payload: bytes) -> None:
        intake = self._intake
        intake.end(parse_control(payload), self._bytes_done)
        self._dest.sync()
        self._channel.send(ACK, control({"files": intake.files, "bytes": self._bytes_done}))
        self._cleanup()
        offer = self.offer
        self._close_then(Result(offer.name, self._bytes_done - intake.dropped, self._elapsed(), self.destination,
                                offer.files, self._resumed, self._skipped, offer.refused))

    _handlers = {
        (ReceiverState.WAITING, TEXT): _on_text,
        (ReceiverState.WAITING, OFFER): _on_offer,
        (ReceiverState.MANIFEST, ENTRIES): _on_entries,
        (ReceiverState.RECEIVING, FILE): _on_file,
        (ReceiverState.RECEIVING, DATA): _on_data,
        (ReceiverState.RECEIVING, FILE_END): _on_file_end,
        (ReceiverState.RECEIVING, FILES): _on_files,
        (ReceiverState.RECEIVING, END): _on_end,
    }

    # -- endings -----------------------------------------------------------

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if self._intake is None or isinstance(error, Declined) or not self._dest.resumable:
            return error
        return self._intake.annotate(error)

    def _cleanup(self) -> None:
        super()._cleanup()
        if self._intake is not None:
            self._intake.abandon()
        self._pool.close()
        self._dest.close()


def StdoutReceiver(channel, clock, out, decide, progress=None, show_text=None, mtime_ns: bool = False) -> Receiver:
    """A L{Receiver} of a one-file transfer into the binary stream C{out}
    (standard output): L{StreamDestination}."""
    return Receiver(channel, clock, StreamDestination(out), decide, progress=progress, show_text=show_text,
                    mtime_ns=mtime_ns)
