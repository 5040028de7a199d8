"""
The transfer layer: what travels inside the encrypted records.

    sender                               receiver
    OFFER {entries, files, bytes}  ->
    ENTRIES [[path, kind, size, mode, mtime], ...]  ->   (until all entries; mtime in ns
                                                          where both announced "mtime-ns")
                                   <-    HAVE {file, from, hashes, complete}*
                                   <-    ACCEPT {}      (or REJECT {message})
    per file:  FILE {file, offset} | FILE {file, skip}  ->
               DATA bytes ... DATA ->                    (flow-controlled)
               FILE_END {size} ->                        (checked, moved into place)
    END {files, bytes}             ->
                                   <-    ACK {files, bytes}   (after syncing the disk)

HAVE is the resume: the receiver's block hashes (L{p2pft.blocks}) of the
partial data it kept, or of a complete file already there.  The sender reads
its own file while the hashes match and continues after the matching blocks,
or skips a file that is already complete and identical.

Either side may send ABORT {message} and close.  The sender succeeds only on
an ACK that matches what it sent; the receiver only after every file was
verified and moved into place and the disk synced.  A connection that ends
any other way is a failure on both sides, whatever was received; the
receiver keeps its partial data for the next attempt.

L{Sender} and L{Receiver} talk to a channel (L{p2pft.channel}) only through
C{attach}, C{send}, C{registerProducer}, C{unregisterProducer}, C{close} and
C{abort}, so tests drive them with a fake channel.  Disk reads that may take
long (hashing for a resume) go through C{run_blocking}, a thread in real use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import threading
from typing import Callable

from array import array

import attrs
from twisted.internet import abstract, defer, error, main
from twisted.python import failure
from zope.interface import implementer

from .blocks import BLOCK, HASHES_PER_MESSAGE, Prefix, block_count, hash_prefix, match_prefix
from ..channel import IRecordHandler
from . import fsprobe
from ..errors import Declined, TransferFailed, UnsafeName
from .manifest import (
    DIR,
    MAX_ENTRIES,
    PARTIAL_SUFFIX,
    POSIX,
    Entry,
    Manifest,
    ManifestChecker,
    NameRules,
    listing,
    printable,
    safe_mode,
)
from .sink import BufferPool, FileSink, StreamSink
from .store import OutputDir
from .text import decode_text, encode_text
from ..util import dump_object, load_object

__all__ = ["Sender", "StreamSender", "TextSender", "Receiver", "StdoutReceiver", "Offer", "Result",
           "TransferFailed", "Declined", "UnsafeName", "FDReader", "is_stream"]

OFFER, ACCEPT, REJECT, DATA, END, ACK, ABORT, ENTRIES, HAVE, FILE, FILE_END, TEXT = range(1, 13)
KIND_NAMES = dict(enumerate(
    "OFFER ACCEPT REJECT DATA END ACK ABORT ENTRIES HAVE FILE FILE_END TEXT".split(), start=1))

#: Plaintext bytes per DATA record.
CHUNK = 256 * 1024
#: Payload bytes written each time the transport asks for more.
BURST = 1 << 20
#: Seconds to wait for a closing connection to flush before aborting it.
CLOSE_TIMEOUT = 10.0
#: Largest JSON control message accepted.
MAX_CONTROL = 64 * 1024
#: Target size of one ENTRIES message.
ENTRIES_BYTES = 32 * 1024

RESUME_HINT = "the data received so far is kept: run the same send and receive again to resume"
#: After a file failed its check: its data is gone, what came before it is not.
DISCARDED_HINT = ("its partial data was deleted; the files received before it are kept: "
                  "run the same send and receive again to resume")


def _control(value: dict) -> bytes:
    return dump_object(value)


def _parse_control(payload: bytes) -> dict:
    if len(payload) > MAX_CONTROL:
        raise TransferFailed("control message too large")
    try:
        return load_object(payload)
    except ValueError:
        raise TransferFailed("malformed control message") from None


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise TransferFailed(f"protocol error: invalid {what}")
    return value


def run_now(f, *args) -> defer.Deferred:
    """The C{run_blocking} of tests: run on the spot."""
    return defer.maybeDeferred(f, *args)


@attrs.frozen
class Offer:
    """What the receiver is asked to accept (computed by the receiver from
    the checked entries, not taken from the sender's word)."""

    files: int
    dirs: int
    #: None for a stream of unknown length (standard input).
    size: int | None
    #: The first top-level names, folders with a trailing "/".
    top: list[str]
    top_count: int
    #: Entries whose names cannot be written here, left out (C{skip_unsafe}),
    #: and the first of them with the reason (printable).
    refused: int = 0
    refused_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A short name for the whole offer."""
        if self.top_count == 1:
            return self.top[0].rstrip("/")
        return f"{self.top_count} items"

    @classmethod
    def of(cls, checker: ManifestChecker) -> "Offer":
        return cls(checker.files, checker.dirs, None if checker.streams else checker.bytes,
                   list(checker.top), checker.top_count, checker.refused, tuple(checker.refused_names))


@attrs.frozen
class Result:
    name: str
    size: int
    seconds: float
    #: Where the receiver put it (one file or folder), or None on the sender.
    path: str | None = None
    files: int = 1
    #: Bytes of partial data kept from an earlier attempt and continued, not sent again.
    resumed: int = 0
    #: Bytes of files already complete and identical at the receiver, checked and not sent again.
    skipped: int = 0
    #: Entries the receiver left out because their names cannot be written
    #: there (C{skip_unsafe}); their data crossed the network and was dropped.
    #: Always 0 on the sender, which cannot know.
    refused: int = 0
    #: A text message (C{send --text}), not files.
    text: bool = False


def _peer_text(message: str) -> str:
    """The peer's message, already escaped by the peer: make it safe again
    without escaping its escapes a second time (backslashes stay)."""
    return printable(message).replace("\\\\", "\\")


def _os_error(e: OSError, what: str) -> TransferFailed:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransferFailed(f"the disk is full while writing {printable(what)}")
    return TransferFailed(f"{e.strerror or e}: {printable(what)}")


class _Endpoint:
    """
    What sender and receiver share: the channel, aborts, and how a transfer
    ends.  Every ending -- success or failure -- closes the channel first and
    reports only once the connection is gone (or L{CLOSE_TIMEOUT} passed), so
    a final ACK, REJECT or ABORT is never lost to a process that exits early.
    """

    def __init__(self, channel, clock, progress: Callable | None, run_blocking=run_now):
        self._channel = channel
        self._clock = clock
        self._progress_cb = progress or (lambda done, total, name: None)
        self._run_blocking = run_blocking
        self._stop = threading.Event()  # tells blocking work to give up
        self.done: defer.Deferred = defer.Deferred(self._cancelled)
        self.state = "new"
        self._started = clock.seconds()
        self._outcome: object = None
        self._close_timer = None
        self._bytes_done = 0
        self._resumed = 0
        self._skipped = 0
        self._total: int | None = None

    def _elapsed(self) -> float:
        return self._clock.seconds() - self._started

    @property
    def _ending(self) -> bool:
        return self.state in ("closing", "done", "failed")

    def _progress(self, name: str) -> None:
        self._progress_cb(self._bytes_done, self._total, name)

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        """Add what the user can do about a failure."""
        return error

    def _fail(self, error: TransferFailed, tell_peer: bool = True) -> None:
        if self._ending:
            return
        self._cleanup()
        if tell_peer:
            self._channel.send(ABORT, _control({"message": str(error)}))
        self._close_then(self._annotate(error))

    def _close_then(self, outcome: object) -> None:
        self.state = "closing"
        self._outcome = outcome
        self._close_timer = self._clock.callLater(CLOSE_TIMEOUT, self._channel.abort)
        self._channel.close()

    def channelLost(self, reason: str) -> None:
        if self.state == "closing":
            return self._settle()
        if not self._ending:
            self._cleanup()
            self._outcome = self._annotate(
                TransferFailed(f"connection lost before the transfer completed ({reason})"))
            self._settle()

    def _settle(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        outcome = self._outcome
        self.state = "failed" if isinstance(outcome, Exception) else "done"
        if self.done.called:
            return
        if isinstance(outcome, Exception):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)

    def _cancelled(self, d: defer.Deferred) -> None:
        # Ctrl-C: tell the other side why.
        self._fail(TransferFailed("interrupted"))

    def _cleanup(self) -> None:
        self._stop.set()

    def _remote_abort(self, payload: bytes) -> None:
        try:
            message = str(_parse_control(payload).get("message", ""))
        except TransferFailed:
            message = ""
        self._fail(TransferFailed(f"the other side stopped: {_peer_text(message) or 'no reason given'}"), tell_peer=False)

    def recordReceived(self, kind: int, payload: bytes) -> None:
        if self._ending:
            return
        if kind == ABORT:
            return self._remote_abort(payload)
        try:
            self._handle(kind, payload)
        except (TransferFailed, OSError) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        """Fail the transfer because of C{e}: one of ours, a disk error, or
        (from work on a thread) anything else."""
        if isinstance(e, TransferFailed):
            self._fail(e)
        elif isinstance(e, OSError):
            self._fail(_os_error(e, e.filename or ""))
        else:
            self._fail(TransferFailed(f"unexpected {type(e).__name__}: {e}"))

    def _later(self, work: defer.Deferred, then: Callable) -> None:
        """Continue with C{then(result)} once blocking work is done, unless
        the transfer ended meanwhile; its failure fails the transfer."""
        def done(result):
            if not self._ending:
                try:
                    then(result)
                except Exception as e:  # ours, a disk error, or a bug: the transfer fails, loudly
                    self._failed(e)

        def failed(f):
            if not self._ending:
                self._failed(f.value)

        work.addCallbacks(done, failed)

    def _unexpected(self, kind: int) -> TransferFailed:
        return TransferFailed(f"protocol error: unexpected {KIND_NAMES.get(kind, kind)} in state {self.state}")


@attrs.define
class _Outgoing:
    """The file being sent."""

    index: int
    file: object
    remaining: int


@implementer(IRecordHandler)
class Sender(_Endpoint):
    """
    Offers a L{Manifest} and streams its files, one after the other, as a
    pull producer: the transport asks for more when it has room, so memory
    stays flat whatever the size or number of files.
    """

    def __init__(self, channel, clock, manifest: Manifest, progress=None, run_blocking=run_now,
                 rate: int | None = None, mtime_ns: bool = False):
        super().__init__(channel, clock, progress, run_blocking)
        self._rate = rate  # bytes per second, or None
        self._mtime_ns = mtime_ns  # the receiver takes times in nanoseconds
        self._paced = 0  # data bytes sent since sending started
        self._wakeup = None
        self._manifest = manifest
        self._entries = manifest.entries
        self._files = manifest.checker.file_indices()
        self._total = None if manifest.checker.streams else manifest.checker.bytes
        self._next_entry = 0
        self._next_file = 0
        self._have: dict[int, tuple[bool, list[bytes]]] = {}
        self._plan: dict[int, tuple[bool, Prefix]] = {}
        self._current: _Outgoing | None = None
        self._chunk = memoryview(bytearray(CHUNK))
        self._name = ""  # of the file being sent
        self._producing = False

    @property
    def offer(self) -> Offer:
        return Offer.of(self._manifest.checker)

    def start(self) -> defer.Deferred:
        self._channel.attach(self)
        checker = self._manifest.checker
        self._channel.send(OFFER, _control({"entries": len(self._entries), "files": checker.files,
                                            "bytes": self._total}))
        self.state = "offering"
        self._startProducing()
        return self.done

    def _startProducing(self) -> None:
        if not self._producing:
            self._producing = True
            self._channel.registerProducer(self, False)

    def _stopProducing(self) -> None:
        if self._producing:
            self._producing = False
            self._channel.unregisterProducer()

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "offered" and kind == HAVE:
            self._add_have(_parse_control(payload))
        elif self.state == "offered" and kind == ACCEPT:
            self.state = "checking"
            work = self._run_blocking(self._check_have, dict(self._have), self._stop)
            self._have.clear()
            self._later(work, self._send_files)
        elif self.state == "offered" and kind == REJECT:
            message = _peer_text(str(_parse_control(payload).get("message", "declined")))
            self._fail(Declined(f"the receiver declined: {message}"), tell_peer=False)
        elif self.state == "ending" and kind == ACK:
            ack = _parse_control(payload)
            if ack.get("files") != len(self._files) or ack.get("bytes") != self._bytes_done:
                raise TransferFailed("the receiver's acknowledgement does not match what we sent")
            self._cleanup()
            self._close_then(self._result())
        else:
            raise self._unexpected(kind)

    def _result(self) -> Result:
        return Result(self.offer.name, self._bytes_done, self._elapsed(), files=len(self._files),
                      resumed=self._resumed, skipped=self._skipped)

    def _add_have(self, have: dict) -> None:
        index = _count(have.get("file"), "file index", 0, len(self._entries) - 1)
        entry = self._entries[index]
        hashes = have.get("hashes")
        if entry.kind == DIR or entry.size is None or not isinstance(hashes, str):
            raise TransferFailed("protocol error: invalid HAVE")
        complete, known = self._have.get(index, (bool(have.get("complete")), []))
        if _count(have.get("from"), "HAVE offset") != len(known) or len(hashes) % 64:
            raise TransferFailed("protocol error: invalid HAVE")
        try:
            known.extend(bytes.fromhex(hashes[i:i + 64]) for i in range(0, len(hashes), 64))
        except ValueError:
            raise TransferFailed("protocol error: invalid HAVE") from None
        if len(known) > block_count(entry.size):
            raise TransferFailed("protocol error: HAVE for more blocks than the file has")
        self._have[index] = (complete, known)

    def _check_have(self, have: dict, stop: threading.Event) -> dict[int, tuple[bool, Prefix]]:
        """(On a thread.)  For each file the receiver has: read ours while
        its block hashes match; skip it if it is complete and identical;
        resume a partial file after its longest matching prefix of whole
        blocks (what follows -- damaged, never written, or changed at the
        source since -- is sent again); else start over."""
        plan = {}
        for index, (complete, hashes) in have.items():
            if stop.is_set():
                break
            entry = self._entries[index]
            path = self._manifest.sources[index]
            try:
                with open(path, "rb") as f:
                    prefix = match_prefix(f, hashes)
            except OSError as e:
                raise TransferFailed(f"cannot read {printable(path)}: {e.strerror or e}") from None
            if complete:
                if len(prefix.hashes) == len(hashes) and prefix.length == entry.size:
                    plan[index] = (True, prefix)
            elif 0 < prefix.length <= entry.size:
                plan[index] = (False, prefix)
        return plan

    def _send_files(self, plan: dict) -> None:
        self._plan = plan
        self.state = "sending"
        self._started = self._clock.seconds()
        self._startProducing()

    # IPullProducer
    def resumeProducing(self) -> None:
        try:
            if self.state == "offering":
                self._send_entries()
            elif self.state == "sending":
                self._send_data()
        except (TransferFailed, OSError) as e:
            self._failed(e)

    def _send_entries(self) -> None:
        budget = BURST
        while budget > 0 and self._next_entry < len(self._entries):
            batch, size = [], 0
            while self._next_entry < len(self._entries) and size < ENTRIES_BYTES:
                wire = self._entries[self._next_entry].wire(self._mtime_ns)
                batch.append(wire)
                size += len(wire[0]) * 3 + 48
                self._next_entry += 1
            payload = _control({"entries": batch})
            self._channel.send(ENTRIES, payload)
            budget -= len(payload)
        if self._next_entry == len(self._entries):
            self.state = "offered"
            self._stopProducing()

    def _allowance(self) -> int:
        """Data bytes we may send now: L{BURST}, or less to keep to the rate
        limit (then we ask again once there is room: the transport only asks
        after we wrote something)."""
        if self._rate is None:
            return BURST
        allowed = min(BURST, int(self._rate * self._elapsed()) - self._paced + CHUNK)
        if allowed <= 0 and (self._wakeup is None or not self._wakeup.active()):
            self._wakeup = self._clock.callLater(-allowed / self._rate + 0.01, self.resumeProducing)
        return allowed

    def _send_data(self) -> None:
        budget = self._allowance()
        while budget > 0 and self.state == "sending":
            if self._current is None:
                if self._next_file == len(self._files):
                    return self._end()
                self._open_next()
                continue
            current = self._current
            want = min(CHUNK, current.remaining)
            # Read into one reused buffer: sealing copies it anyway.
            got = current.file.readinto(self._chunk[:want]) if want else 0
            entry = self._entries[current.index]
            if got < want:
                raise TransferFailed(f"{printable(entry.path)} shrank while it was being sent")
            if want:
                current.remaining -= got
                self._bytes_done += got
                self._paced += got
                self._channel.send(DATA, self._chunk[:got])
                budget -= got
            if current.remaining == 0:
                if current.file.read(1):
                    raise TransferFailed(f"{printable(entry.path)} grew while it was being sent")
                self._finish_file(entry.size)
        if self.state == "sending":
            self._progress(self._name)

    def _open_next(self) -> None:
        index = self._files[self._next_file]
        self._next_file += 1
        entry, source = self._entries[index], self._manifest.sources[index]
        self._name = entry.path
        complete, prefix = self._plan.pop(index, (False, None))
        if complete:
            self._channel.send(FILE, _control({"file": index, "skip": True}))
            self._bytes_done += entry.size
            self._skipped += entry.size
            return
        try:
            f = open(source, "rb", buffering=0)
        except OSError as e:
            raise TransferFailed(f"cannot read {printable(source)}: {e.strerror or e}") from None
        size = os.fstat(f.fileno()).st_size
        if size != entry.size:
            f.close()
            raise TransferFailed(
                f"{printable(source)} changed after the transfer started ({entry.size} bytes "
                f"then, {size} now); send again")
        offset = prefix.length if prefix is not None else 0
        f.seek(offset)
        self._current = _Outgoing(index, f, entry.size - offset)
        self._bytes_done += offset
        self._resumed += offset
        self._channel.send(FILE, _control({"file": index, "offset": offset}))

    def _finish_file(self, size: int) -> None:
        self._current.file.close()
        self._current = None
        self._channel.send(FILE_END, _control({"size": size}))

    def _end(self) -> None:
        self._stopProducing()
        self.state = "ending"
        self._progress("")
        self._channel.send(END, _control({"files": len(self._files), "bytes": self._bytes_done}))

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost will tell us why.
        self._producing = False

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if self._bytes_done and not isinstance(error, Declined) and self._total is not None:
            return TransferFailed(f"{error}; the receiver keeps what arrived: run the same send and receive again to resume")
        return error

    def _cleanup(self) -> None:
        super()._cleanup()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        # A registered producer keeps loseConnection from ever completing.
        self._stopProducing()
        if self._current is not None:
            self._current.file.close()
            self._current = None


@implementer(IRecordHandler)
class TextSender(_Endpoint):
    """
    Sends one short text (L{p2pft.text}) in a TEXT record instead of an
    offer; fires with a L{Result} once the receiver acknowledged it.
    C{supported}: whether the receiver announced the text feature.  An
    older receiver would wait for an OFFER: it is sent an ABORT that says
    why instead.
    """

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
        self.state = "sent"
        return self.done

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "sent" and kind == ACK:
            if _parse_control(payload).get("bytes") != len(self._data):
                raise TransferFailed("the receiver's acknowledgement does not match what we sent")
            self._bytes_done = len(self._data)
            self._cleanup()
            self._close_then(Result("text", len(self._data), self._elapsed(), files=0, text=True))
        else:
            raise self._unexpected(kind)

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if not self._supported:
            return TransferFailed("the receiver runs an older p2pft that cannot receive text; "
                                  "send it as a file, or ask them to update")
        return error


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
        self._pacer = _Paced(source)

    def _send_files(self, plan: dict) -> None:
        self.state = "sending"
        self._started = self._clock.seconds()
        self._next_file = 1
        self._channel.send(FILE, _control({"file": 0, "offset": 0}))
        self._producing = True
        self._channel.registerProducer(self._pacer, True)
        self._source.start(self._data, self._eof)

    def _data(self, chunk: bytes) -> None:
        if self.state != "sending":
            return
        chunk = memoryview(chunk)
        for i in range(0, len(chunk), CHUNK):
            piece = chunk[i:i + CHUNK]
            self._bytes_done += len(piece)
            self._channel.send(DATA, piece)
        self._paced += len(chunk)
        self._progress(self._entries[0].path)
        if self._rate is not None and not self._pacer.early:
            ahead = self._paced - self._rate * self._elapsed()
            if ahead > 0:  # stop reading until the rate limit catches up
                self._pacer.hold(True)
                self._wakeup = self._clock.callLater(ahead / self._rate, self._pacer.hold, False)

    def _eof(self, error: str | None) -> None:
        if self.state != "sending":
            return
        if error is not None:
            return self._fail(TransferFailed(f"cannot read standard input: {error}"))
        self._channel.send(FILE_END, _control({"size": self._bytes_done}))
        self._end()

    def _cleanup(self) -> None:
        super()._cleanup()
        self._source.stop()


class _Paced:
    """A stream's push producer as the transport sees it: paused while the
    transport's buffer is full, or while the rate limit holds it back."""

    def __init__(self, source):
        self.source = source
        self.full = self.early = False

    def pauseProducing(self) -> None:
        self.full = True
        self._update()

    def resumeProducing(self) -> None:
        self.full = False
        self._update()

    def stopProducing(self) -> None:
        self.source.stopProducing()

    def hold(self, early: bool) -> None:
        self.early = early
        self._update()

    def _update(self) -> None:
        if self.full or self.early:
            self.source.pauseProducing()
        else:
            self.source.resumeProducing()


class FDReader(abstract.FileDescriptor):
    """
    Reads a non-seekable file descriptor (a pipe, a terminal) without
    blocking the reactor, up to 1 MiB per read into one reused buffer (so
    C{on_data} gets a view that is valid only during the call), as a push
    producer the channel's transport can pause.  Restores the descriptor's
    blocking mode when done (it is shared with whatever started us).
    """

    def __init__(self, fd: int, reactor=None):
        super().__init__(reactor)
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._on_data = self._on_end = None
        self._view = memoryview(bytearray(1 << 20))  # reused: on_data must not keep it
        widen_pipe(fd)

    def fileno(self) -> int:
        return self._fd

    def start(self, on_data, on_end) -> None:
        self._on_data, self._on_end = on_data, on_end
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
        self.connected = 1
        self.startReading()

    def stop(self) -> None:
        """Stop reading and give the descriptor back as we found it."""
        self._on_end = None
        if self.connected:
            self.stopReading()
            self.connected = 0
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)

    def doRead(self):
        try:
            n = os.readv(self._fd, [self._view])
        except BlockingIOError:
            return None
        except OSError as e:
            return failure.Failure(e)
        if not n:
            return main.CONNECTION_DONE
        self._on_data(self._view[:n])
        return None

    def connectionLost(self, reason) -> None:
        on_end = self._on_end
        self.stop()
        if on_end is not None:
            on_end(None if reason.check(error.ConnectionDone) else reason.getErrorMessage())


def widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """If fd is a pipe, ask Linux for a C{size}-byte pipe buffer (the
    default is 64 KiB; unprivileged processes may go up to
    /proc/sys/fs/pipe-max-size, 1 MiB by default): fewer, bigger reads and
    writes, and fewer context switches with the process at the other end."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError, ValueError):
        pass  # not Linux, or over the limit: the default is fine


def is_stream(fd: int) -> bool:
    """Whether fd must be read as a stream (pipe, socket, terminal) rather
    than as a regular file of known size."""
    return not stat.S_ISREG(os.fstat(fd).st_mode)


@attrs.define
class _Have:
    """What the receiver already has of one file."""

    complete: bool
    prefix: Prefix


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
            raise _os_error(f.value, self.entry.path + PARTIAL_SUFFIX)
        return work.addErrback(clear)

    def mismatch(self, end: dict) -> str | None:
        """What is wrong with the sender's FILE_END for what arrived, if anything."""
        if end.get("size") != self.received or self.entry.size not in (None, self.received):
            return (f"size mismatch for {printable(self.entry.path)}: offered {self.entry.size}, "
                    f"received {self.received} bytes")
        return None


def find_existing(out: OutputDir, entries, stop: threading.Event,
                  skipped: Callable[[int], bool] = lambda index: False) -> dict[int, _Have]:
    """
    (On a thread, with its own L{OutputDir}.)  Hash what is already there
    for each file (not C{skipped}): a complete file of the right size at
    its destination, or the whole blocks of its partial file.
    """
    found = {}
    try:
        for index in range(len(entries)):
            if stop.is_set():
                break
            if skipped(index):
                continue
            entry = entries[index]
            if entry.kind == DIR or entry.size is None:
                continue
            st = out.lstat(entry.path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
                with out.open_read(entry.path) as f:
                    prefix = hash_prefix(f, entry.size)
                if prefix.length == entry.size:
                    found[index] = _Have(True, prefix)
                continue
            st = out.lstat(entry.path, partial=True)
            if st is not None and stat.S_ISREG(st.st_mode):
                limit = min(st.st_size, entry.size) // BLOCK * BLOCK
                if limit:
                    with out.open_read(entry.path, partial=True) as f:
                        prefix = hash_prefix(f, limit)
                    if prefix.length == limit:
                        found[index] = _Have(False, prefix)
    except Declined:
        pass  # a folder on the way is not one: refused later, when it is written
    finally:
        out.close()
    return found


class _Nowhere:
    """Where the data of a left-out file goes."""

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def name_rules(out: OutputDir, platform: str = sys.platform) -> NameRules:
    """The name rules of the output folder C{out}: its platform's, and
    case clashes if its file system ignores case (probed)."""
    return NameRules.where(platform, fsprobe.probe(out._fd).case)


@implementer(IRecordHandler)
class Receiver(_Endpoint):
    """
    Takes an offer into C{output_dir} (L{OutputDir}): checks every entry,
    asks C{decide}, proves what it already has, then writes each file to its
    partial file, verifies it and moves it into place (never over an
    existing file unless C{overwrite}).

    @param decide: called with the L{Offer}; returns a Deferred that fires
        with True to accept.
    @param skip_unsafe: leave out the entries whose names cannot be written
        here (and what is below a refused folder), and take the rest; else
        such names refuse the whole offer, all of them listed.
    @param rules: the L{NameRules} to apply; by default those of this
        platform and the output folder's file system (L{name_rules}).
    """

    def __init__(self, channel, clock, output_dir: str, decide, overwrite: bool = False, progress=None,
                 run_blocking=run_now, skip_unsafe: bool = False, rules: NameRules | None = None,
                 show_text=None, mtime_ns: bool = False):
        super().__init__(channel, clock, progress, run_blocking)
        self._mtime_ns = mtime_ns  # the sender sends times in nanoseconds
        self._dir = os.path.abspath(output_dir)
        self._decide = decide
        self._show_text = show_text
        self._overwrite = overwrite
        self._skip_unsafe = skip_unsafe
        self._rules = rules
        self._out: OutputDir | None = None
        self._checker: ManifestChecker | None = None
        self._expected = 0
        self._files = array("l")
        self._next_file = 0
        self._have: dict[int, _Have] = {}
        self._current: _Incoming | None = None
        self._kept = False  # data on disk a later attempt can resume from
        self._placed = 0  # files moved into place
        self._dropped = 0  # data bytes of left-out files, read and dropped
        self._pool = BufferPool()
        self.offer: Offer | None = None

    def start(self) -> defer.Deferred:
        self.state = "waiting"
        self._channel.attach(self)
        return self.done

    @property
    def destination(self) -> str:
        """Where the offer lands: the one top-level file or folder, or the
        output folder."""
        assert self.offer is not None
        if self.offer.top_count == 1:
            return os.path.join(self._dir, self.offer.name)
        return self._dir

    @property
    def _entries(self):
        return self._checker.entries

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "waiting" and kind == TEXT:
            self._take_text(payload)
        elif self.state == "waiting" and kind == OFFER:
            offer = _parse_control(payload)
            entries = offer.get("entries")
            if _int(entries) and entries > MAX_ENTRIES:
                raise Declined(f"the offer has {entries:,} entries; p2pft takes at most {MAX_ENTRIES:,} "
                               "in one transfer: send the folders separately")
            self._expected = _count(entries, "number of entries", 1, MAX_ENTRIES)
            self._checker = ManifestChecker(self._expected, self._name_rules())
            self._checker.wire_ns = self._mtime_ns
            self.state = "manifest"
        elif self.state == "manifest" and kind == ENTRIES:
            raw = _parse_control(payload).get("entries")
            if not isinstance(raw, list) or len(self._entries) + len(raw) > self._expected:
                raise TransferFailed("protocol error: invalid ENTRIES")
            offer = self._checker.offer
            for item in raw:
                offer(item)
            if len(self._entries) == self._expected:
                self._manifest_complete()
        elif self.state == "receiving" and kind == FILE:
            self._start_file(_parse_control(payload))
        elif self.state == "receiving" and kind == DATA and self._current is not None:
            self._write(payload)
        elif self.state == "receiving" and kind == FILE_END and self._current is not None:
            self._finish_file(_parse_control(payload))
        elif self.state == "receiving" and kind == END and self._current is None:
            self._finish(_parse_control(payload))
        else:
            raise self._unexpected(kind)

    def _name_rules(self) -> NameRules:
        if self._rules is None:
            self._open_output()
            self._rules = name_rules(self._out)
        return self._rules

    def _take_text(self, payload: bytes) -> None:
        """A text message instead of an offer: show it, acknowledge, end."""
        if self._show_text is None:
            raise Declined("the other side sent a text message, and this receiver does not take text")
        self._show_text(decode_text(payload))
        self._channel.send(ACK, _control({"bytes": len(payload)}))
        self._cleanup()
        self._close_then(Result("text", len(payload), self._elapsed(), "-", files=0, text=True))

    def _manifest_complete(self) -> None:
        checker = self._checker
        checker.finish()
        if checker.refused and (not self._skip_unsafe or checker.refused == len(checker.entries)):
            n = checker.refused
            hint = "; receive with --skip-unsafe to leave them out and take the rest" \
                if self._skip_unsafe is False and n < len(checker.entries) else ""
            raise UnsafeName(f"{n} offered name{'s' if n != 1 else ''} cannot be written "
                             f"{checker.rules.describe()}: {listing(checker.refused_names, n)}{hint}")
        self._files = checker.file_indices()
        self.offer = Offer.of(checker)
        self._total = None if self.offer.size is None else self.offer.size + checker.refused_bytes
        self._open_output()
        self._check_conflicts()
        self.state = "deciding"
        d = defer.maybeDeferred(self._decide, self.offer)
        d.addCallbacks(self._decided, lambda f: self._fail(TransferFailed(f.getErrorMessage())))

    def _open_output(self) -> None:
        if self._out is not None:
            return
        if not os.path.isdir(self._dir):
            raise Declined(f"output folder {printable(self._dir)} does not exist")
        self._out = OutputDir(self._dir)

    def _check_conflicts(self) -> None:
        """Refuse before asking: an entry whose name is taken by something
        we will not replace."""
        for entry, st in self._checker.existing(self._out.lstat):
            shown = printable(entry.path)
            if stat.S_ISLNK(st.st_mode) and (entry.kind == DIR or not self._overwrite):
                raise Declined(f"{shown} already exists as a symbolic link (p2pft never writes through symbolic links)")
            if entry.kind == DIR:
                if not stat.S_ISDIR(st.st_mode):
                    raise Declined(f"{shown} already exists and is not a folder")
            elif stat.S_ISDIR(st.st_mode):
                raise Declined(f"{shown} already exists and is a folder")
            elif not self._overwrite and not (stat.S_ISREG(st.st_mode) and st.st_size == entry.size
                                              and st.st_nlink == 1):  # other links: not ours to check
                raise Declined(f"{shown} already exists (use --overwrite to replace it)")

    def _decided(self, accepted: bool) -> None:
        if self.state != "deciding":
            return
        if not accepted:
            self._channel.send(REJECT, _control({"message": "the receiver said no"}))
            self._fail(Declined("declined"), tell_peer=False)
            return
        self.state = "scanning"
        self._later(self._run_blocking(find_existing, self._out.clone(), self._entries, self._stop,
                                       self._checker.skipped), self._accept)

    def _accept(self, have: dict[int, _Have]) -> None:
        self._have = have
        needed = (self.offer.size or 0) - sum(h.prefix.length for h in have.values())
        free = self._out.free()
        if needed > free:
            raise Declined(f"not enough free space: {needed} more bytes needed, {free} free")
        checker = self._checker
        for index in range(len(checker.entries)):
            if checker.is_dir(index) and not checker.skipped(index):
                self._out.make_dir(checker.entries[index].path)
        for index, h in sorted(have.items()):
            hexes = [d.hex() for d in h.prefix.hashes]
            for start in range(0, max(len(hexes), 1), HASHES_PER_MESSAGE):
                self._channel.send(HAVE, _control({
                    "file": index, "complete": h.complete, "from": start,
                    "hashes": "".join(hexes[start:start + HASHES_PER_MESSAGE])}))
        self.state = "receiving"
        self._started = self._clock.seconds()
        self._channel.send(ACCEPT, _control({}))

    def _start_file(self, message: dict) -> None:
        if self._current is not None or self._next_file == len(self._files):
            raise TransferFailed("protocol error: unexpected FILE")
        index = self._files[self._next_file]
        if message.get("file") != index:
            raise TransferFailed("protocol error: files out of order")
        self._next_file += 1
        entry = self._entries[index]
        have = self._have.pop(index, None)
        if message.get("skip") is True:
            if have is None or not have.complete:
                raise TransferFailed("protocol error: skipped a file we do not have")
            self._bytes_done += entry.size
            self._skipped += entry.size
            self._out.remove_partial(entry.path)
            self._progress(entry.path)
            return
        offset = _count(message.get("offset"), "offset", 0, entry.size if entry.size is not None else 0)
        if self._checker.skipped(index):  # left out: its data goes nowhere, and nothing is touched
            if offset:
                raise TransferFailed("protocol error: resumed from data we do not have")
            self._current = _Incoming(index, entry, StreamSink(_Nowhere()), received=0, dropped=True)
            return
        if have is not None and have.complete and not self._overwrite:
            raise Declined(f"{printable(entry.path)} already exists with other content (use --overwrite to replace it)")
        if offset and (have is None or have.complete or offset > have.prefix.length or offset % BLOCK):
            raise TransferFailed("protocol error: resumed from data we do not have")
        f = self._out.open_partial(entry.path, offset)
        self._current = _Incoming(index, entry, FileSink(f, offset, self._pool, self._run_blocking),
                                  received=offset)
        self._bytes_done += offset
        self._resumed += offset

    def _write(self, data: bytes) -> None:
        current = self._current
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
            raise _os_error(e, current.entry.path + PARTIAL_SUFFIX) from None
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

    def _finish_file(self, end: dict) -> None:
        current = self._current
        error = current.mismatch(end)
        if error:
            self._discard(current)
            raise TransferFailed(error)
        self._after(current.disk(current.sink.finish()), lambda _: self._place(current))

    def _discard(self, current: "_Incoming") -> None:
        current.sink.close()
        self._current = None
        if not current.dropped:
            self._out.remove_partial(current.entry.path)  # not worth resuming from
            self._discarded = True

    def _place(self, current: "_Incoming") -> None:
        entry = current.entry
        self._current = None
        if current.dropped:
            return
        self._out.place(entry.path, current.sink.release(), safe_mode(entry, self._out.umask), entry.mtime_ns,
                        self._overwrite)
        self._kept = True
        self._placed += 1
        if entry.size is None:
            self._total = current.received

    def _finish(self, end: dict) -> None:
        if self._next_file != len(self._files) or end.get("files") != len(self._files) \
                or end.get("bytes") != self._bytes_done:
            raise TransferFailed("the transfer ended early or does not match what arrived")
        self._sync()
        self._channel.send(ACK, _control({"files": len(self._files), "bytes": self._bytes_done}))
        self._cleanup()
        checker = self._checker
        self._close_then(Result(self.offer.name, self._bytes_done - self._dropped, self._elapsed(),
                                self.destination, checker.files, self._resumed, self._skipped,
                                checker.refused))

    def _sync(self) -> None:
        self._out.sync()

    _discarded = False  # a file failed its check and its partial data was deleted

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        if isinstance(error, Declined):
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
            current.sink.close()
            if not current.dropped and (current.entry.size is None or current.received == 0):
                self._out.remove_partial(current.entry.path)  # nothing a resume could use
        self._pool.close()
        if self._out is not None:
            self._out.close()
            self._out = None


@implementer(IRecordHandler)
class StdoutReceiver(Receiver):
    """
    Writes a one-file transfer to a binary stream (standard output) as it
    arrives.  What was written cannot be taken back: if verification fails
    at the end, the transfer fails and the exit status says so.
    """

    def __init__(self, channel, clock, out, decide, progress=None, show_text=None, mtime_ns: bool = False):
        super().__init__(channel, clock, ".", decide, progress=progress, show_text=show_text,
                         mtime_ns=mtime_ns)
        self._stdout = out
        try:
            widen_pipe(out.fileno())
        except (AttributeError, OSError, ValueError):
            pass  # not a real file

    @property
    def destination(self) -> str:
        return "-"

    def _name_rules(self) -> NameRules:
        return self._rules or POSIX  # nothing is written under these names

    def _open_output(self) -> None:
        if self.offer.files != 1 or self.offer.dirs:
            raise Declined(
                f"--output - takes a single file; this offer has {self.offer.files} files "
                f"and {self.offer.dirs} folders")

    def _check_conflicts(self) -> None:
        pass

    def _decided(self, accepted: bool) -> None:
        if accepted and self.state == "deciding":
            self.state = "scanning"
            return self._accept({})
        super()._decided(accepted)

    def _accept(self, have: dict) -> None:
        self.state = "receiving"
        self._started = self._clock.seconds()
        self._channel.send(ACCEPT, _control({}))

    def _start_file(self, message: dict) -> None:
        if self._current is not None or message.get("file") != 0 or message.get("offset") != 0:
            raise TransferFailed("protocol error: unexpected FILE")
        self._next_file = 1
        self._current = _Incoming(0, self._entries[0], StreamSink(self._stdout), received=0)

    def _discard(self, current: "_Incoming") -> None:
        pass  # what was written cannot be taken back

    def _place(self, current: "_Incoming") -> None:
        self._current = None
        if current.entry.size is None:
            self._total = current.received

    def _sync(self) -> None:
        self._stdout.flush()

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        return error  # nothing to resume: what was written is gone

    def _cleanup(self) -> None:
        self._current = None
        self._stop.set()
        try:
            self._stdout.flush()
        except (OSError, ValueError):
            pass

