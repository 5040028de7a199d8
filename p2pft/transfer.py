"""
The transfer layer: what travels inside the encrypted records.

    sender                         receiver
    OFFER {name, size}      ->
                            <-     ACCEPT {}            (or REJECT {message})
    DATA bytes ... DATA     ->                          (flow-controlled)
    END {size, sha256}      ->
                            <-     ACK {sha256}         (after fsync + rename)

Either side may send ABORT {message} and close.  The sender succeeds only on
an ACK whose hash matches its own; the receiver only after the data verified
and the file was renamed into place.  A connection that ends any other way
is a failure on both sides, whatever was received.

L{FileSender} and L{FileReceiver} talk to a channel (L{p2pft.channel}) only
through C{attach}, C{send}, C{registerProducer}, C{unregisterProducer} and
C{close}, so tests drive them with a fake channel.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import unicodedata
from typing import Callable

import attrs
from twisted.internet import abstract, defer, error, main
from twisted.python import failure
from zope.interface import implementer

from .channel import IRecordHandler
from .util import dump_object, load_object

OFFER, ACCEPT, REJECT, DATA, END, ACK, ABORT = range(1, 8)
KIND_NAMES = {1: "OFFER", 2: "ACCEPT", 3: "REJECT", 4: "DATA", 5: "END", 6: "ACK", 7: "ABORT"}

#: Plaintext bytes per DATA record.
CHUNK = 256 * 1024
#: DATA records written each time the transport asks for more.
BURST = 4
#: Seconds to wait for a closing connection to flush before aborting it.
CLOSE_TIMEOUT = 10.0
#: Largest JSON control message accepted.
MAX_CONTROL = 64 * 1024
MAX_NAME_BYTES = 255


class TransferFailed(Exception):
    """The transfer did not complete; the message says why, in one line."""


class Declined(TransferFailed):
    """The receiver said no (or could not take the file)."""


class UnsafeName(TransferFailed):
    """The sender offered a name we will not write."""


_control = dump_object


def _parse_control(payload: bytes) -> dict:
    if len(payload) > MAX_CONTROL:
        raise TransferFailed("control message too large")
    try:
        return load_object(payload)
    except ValueError:
        raise TransferFailed("malformed control message") from None


def printable(text: str, limit: int = 200) -> str:
    """Text safe to print on a terminal: control, format (bidi) and escape
    characters shown as \\x.. / \\u.... escapes."""
    out = []
    for ch in text[:limit]:
        if ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii") if ch != "\\" else "\\\\")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")


_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"]
)
#: Characters that may never appear in a received name: control and format
#: characters (that includes bidi overrides), surrogates, line separators.
_FORBIDDEN_CATEGORIES = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])


def safe_component(part: str, whole: str) -> str:
    """
    Check one path component offered by the peer; return it NFC-normalised.
    Raise L{UnsafeName} with a printable reason.  Refuses, on every platform,
    what would be unsafe or ambiguous on any: separators of any OS, drive
    letters, C{.} and C{..}, empty and over-long names, control and bidi
    characters, Windows device names and names ending in a dot or space.
    """
    shown = printable(whole)
    part = unicodedata.normalize("NFC", part)
    if part in ("", ".", ".."):
        raise UnsafeName(f"offered name {shown!r} has an empty, '.' or '..' component")
    if "/" in part or "\\" in part:
        raise UnsafeName(f"offered name {shown!r} contains a path separator")
    if len(part) >= 2 and part[1] == ":" and part[0].isascii() and part[0].isalpha():
        raise UnsafeName(f"offered name {shown!r} starts with a drive letter")
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        raise UnsafeName(f"offered name {shown!r} is longer than {MAX_NAME_BYTES} bytes")
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in part):
        raise UnsafeName(f"offered name {shown!r} contains control or formatting characters")
    if part[-1] in ". ":
        raise UnsafeName(f"offered name {shown!r} ends with a dot or space")
    if part.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        raise UnsafeName(f"offered name {shown!r} is a reserved device name")
    return part


def safe_name(name: object) -> str:
    """The single file name the receiver will write (one component only)."""
    if not isinstance(name, str):
        raise UnsafeName("offered name is not text")
    return safe_component(name, name)


@attrs.frozen
class Offer:
    name: str
    #: None for a stream of unknown length (standard input).
    size: int | None


@attrs.frozen
class Result:
    name: str
    size: int
    sha256: str
    seconds: float
    path: str | None = None


def _offer_from(message: dict) -> Offer:
    size = message.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise TransferFailed("offer has an invalid size")
    return Offer(safe_name(message.get("name")), size)


class _Endpoint:
    """
    What sender and receiver share: the channel, aborts, and how a transfer
    ends.  Every ending -- success or failure -- closes the channel first and
    reports only once the connection is gone (or L{CLOSE_TIMEOUT} passed), so
    a final ACK, REJECT or ABORT is never lost to a process that exits early.
    """

    def __init__(self, channel, clock, progress: Callable[[int, int], None] | None):
        self._channel = channel
        self._clock = clock
        self._progress = progress or (lambda done, total: None)
        self.done: defer.Deferred = defer.Deferred(self._cancelled)
        self.state = "new"
        self._started = clock.seconds()
        self._outcome: object = None
        self._close_timer = None

    def _elapsed(self) -> float:
        return self._clock.seconds() - self._started

    @property
    def _ending(self) -> bool:
        return self.state in ("closing", "done", "failed")

    def _fail(self, error: TransferFailed, tell_peer: bool = True) -> None:
        if self._ending:
            return
        self._cleanup()
        if tell_peer:
            self._channel.send(ABORT, _control({"message": str(error)}))
        self._close_then(error)

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
            self._outcome = TransferFailed(f"connection lost before the transfer completed ({reason})")
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
        # Ctrl-C: tell the other side why, and clean up what we wrote.
        self._fail(TransferFailed("interrupted"))

    def _cleanup(self) -> None:
        pass

    def _remote_abort(self, payload: bytes) -> None:
        try:
            message = str(_parse_control(payload).get("message", ""))
        except TransferFailed:
            message = ""
        self._fail(TransferFailed(f"the other side stopped: {printable(message) or 'no reason given'}"), tell_peer=False)

    def recordReceived(self, kind: int, payload: bytes) -> None:
        if self._ending:
            return
        if kind == ABORT:
            return self._remote_abort(payload)
        try:
            self._handle(kind, payload)
        except TransferFailed as e:
            self._fail(e)
        except OSError as e:
            self._fail(TransferFailed(f"{e.strerror or e}: {printable(e.filename or '')}".rstrip(": ")))

    def _unexpected(self, kind: int) -> TransferFailed:
        return TransferFailed(f"protocol error: unexpected {KIND_NAMES.get(kind, kind)} in state {self.state}")


@implementer(IRecordHandler)
class FileSender(_Endpoint):
    """Offers one file and streams it as a pull producer."""

    def __init__(self, channel, clock, path: str, name: str | None = None, progress=None, file=None):
        self._file = file if file is not None else open(path, "rb")
        self._init_sender(channel, clock, progress, path, name or os.path.basename(os.path.abspath(path)),
                          os.fstat(self._file.fileno()).st_size)

    def _init_sender(self, channel, clock, progress, path: str, name: str, size: int | None) -> None:
        _Endpoint.__init__(self, channel, clock, progress)
        self._path = path
        self.name = name
        self.size = size
        self._hash = hashlib.sha256()
        self._sent = 0
        self._producing = False

    def start(self) -> defer.Deferred:
        self._channel.attach(self)
        self._channel.send(OFFER, _control({"name": self.name, "size": self.size}))
        self.state = "offered"
        return self.done

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "offered" and kind == ACCEPT:
            self.state = "sending"
            self._started = self._clock.seconds()
            self._producing = True
            self._channel.registerProducer(self, False)
        elif self.state == "offered" and kind == REJECT:
            message = printable(str(_parse_control(payload).get("message", "declined")))
            self._fail(Declined(f"the receiver declined: {message}"), tell_peer=False)
        elif self.state == "ending" and kind == ACK:
            theirs = _parse_control(payload).get("sha256")
            if theirs != self._hash.hexdigest():
                raise TransferFailed("the receiver's checksum does not match ours")
            self._cleanup()
            self._close_then(Result(self.name, self._sent, theirs, self._elapsed()))
        else:
            raise self._unexpected(kind)

    # IPullProducer
    def resumeProducing(self) -> None:
        if self.state != "sending":
            return
        try:
            for _ in range(BURST):
                chunk = self._file.read(CHUNK)
                if not chunk:
                    return self._end()
                self._sent += len(chunk)
                if self._sent > self.size:
                    raise TransferFailed(f"{printable(self.name)} grew while it was being sent")
                self._hash.update(chunk)
                self._channel.send(DATA, chunk)
            self._progress(self._sent, self.size)
        except TransferFailed as e:
            self._fail(e)
        except OSError as e:
            self._fail(TransferFailed(f"cannot read {printable(self._path)}: {e.strerror or e}"))

    def _stopProducing(self) -> None:
        if self._producing:
            self._producing = False
            self._channel.unregisterProducer()

    def _end(self) -> None:
        self._stopProducing()
        if self._sent != self.size:
            raise TransferFailed(f"{printable(self.name)} shrank while it was being sent")
        self._progress(self._sent, self.size)
        self.state = "ending"
        self._channel.send(END, _control({"size": self._sent, "sha256": self._hash.hexdigest()}))

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost will tell us why.
        self._producing = False

    def _cleanup(self) -> None:
        # A registered producer keeps loseConnection from ever completing.
        self._stopProducing()
        self._file.close()


@implementer(IRecordHandler)
class StreamSender(FileSender):
    """
    Offers a stream of unknown length (standard input, a pipe): size null
    in the OFFER, the real size in END.  C{source} is a L{FDReader}-like
    object: C{start(on_data, on_end)}, and an L{IPushProducer} that the
    channel's transport pauses when it cannot keep up.
    """

    def __init__(self, channel, clock, source, name: str = "stdin", progress=None):
        self._source = source
        self._init_sender(channel, clock, progress, "standard input", name, None)

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "offered" and kind == ACCEPT:
            self.state = "sending"
            self._started = self._clock.seconds()
            self._producing = True
            self._channel.registerProducer(self._source, True)
            self._source.start(self._data, self._eof)
        else:
            super()._handle(kind, payload)

    def resumeProducing(self) -> None:  # not a pull producer
        pass

    def _data(self, chunk: bytes) -> None:
        if self.state != "sending":
            return
        for i in range(0, len(chunk), CHUNK):
            piece = chunk[i:i + CHUNK]
            self._sent += len(piece)
            self._hash.update(piece)
            self._channel.send(DATA, piece)
        self._progress(self._sent, None)

    def _eof(self, error: str | None) -> None:
        if self.state != "sending":
            return
        if error is not None:
            return self._fail(TransferFailed(f"cannot read standard input: {error}"))
        self._stopProducing()
        self.state = "ending"
        self._progress(self._sent, self._sent)
        self._channel.send(END, _control({"size": self._sent, "sha256": self._hash.hexdigest()}))

    def _cleanup(self) -> None:
        self._stopProducing()
        self._source.stop()


class FDReader(abstract.FileDescriptor):
    """
    Reads a non-seekable file descriptor (a pipe, a terminal) without
    blocking the reactor, up to 1 MiB per read, as a push producer the
    channel's transport can pause.  Restores the descriptor's blocking mode
    when done (it is shared with whatever started us).
    """

    def __init__(self, fd: int, reactor=None):
        super().__init__(reactor)
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._on_data = self._on_end = None

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
            data = os.read(self._fd, 1 << 20)
        except BlockingIOError:
            return None
        except OSError as e:
            return failure.Failure(e)
        if not data:
            return main.CONNECTION_DONE
        self._on_data(data)
        return None

    def connectionLost(self, reason) -> None:
        on_end = self._on_end
        self.stop()
        if on_end is not None:
            on_end(None if reason.check(error.ConnectionDone) else reason.getErrorMessage())


def is_stream(fd: int) -> bool:
    """Whether fd must be read as a stream (pipe, socket, terminal) rather
    than as a regular file of known size."""
    return not stat.S_ISREG(os.fstat(fd).st_mode)


@implementer(IRecordHandler)
class FileReceiver(_Endpoint):
    """
    Takes one offered file into C{output_dir}: a temporary file beside the
    destination, verified, fsync'd, then renamed into place (never over an
    existing file unless C{overwrite}).

    @param decide: called with the L{Offer}; returns a Deferred that fires
        with True to accept.
    """

    def __init__(self, channel, clock, output_dir: str, decide, overwrite: bool = False, progress=None):
        super().__init__(channel, clock, progress)
        self._dir = os.path.abspath(output_dir)
        self._decide = decide
        self._overwrite = overwrite
        self._hash = hashlib.sha256()
        self._received = 0
        self._file = None
        self._temp: str | None = None
        self.offer: Offer | None = None

    def start(self) -> defer.Deferred:
        self.state = "waiting"
        self._channel.attach(self)
        return self.done

    @property
    def destination(self) -> str:
        assert self.offer is not None
        return os.path.join(self._dir, self.offer.name)

    def _handle(self, kind: int, payload: bytes) -> None:
        if self.state == "waiting" and kind == OFFER:
            self.offer = _offer_from(_parse_control(payload))
            self._check_room()
            self.state = "deciding"
            d = defer.maybeDeferred(self._decide, self.offer)
            d.addCallbacks(self._decided, lambda f: self._fail(TransferFailed(f.getErrorMessage())))
        elif self.state == "receiving" and kind == DATA:
            self._received += len(payload)
            if self.offer.size is not None and self._received > self.offer.size:
                raise TransferFailed("the sender sent more data than it offered")
            self._hash.update(payload)
            self._file.write(payload)
            self._progress(self._received, self.offer.size)
        elif self.state == "receiving" and kind == END:
            self._finish(_parse_control(payload))
        else:
            raise self._unexpected(kind)

    def _check_room(self) -> None:
        if not os.path.isdir(self._dir):
            raise Declined(f"output directory {printable(self._dir)} does not exist")
        if os.path.lexists(self.destination) and not self._overwrite:
            raise Declined(f"{printable(self.offer.name)} already exists (use --overwrite to replace it)")
        free = shutil.disk_usage(self._dir).free
        if self.offer.size is not None and self.offer.size > free:
            raise Declined(
                f"not enough free space for {printable(self.offer.name)}: "
                f"{self.offer.size} bytes offered, {free} free"
            )

    def _decided(self, accepted: bool) -> None:
        if self.state != "deciding":
            return
        if not accepted:
            self._channel.send(REJECT, _control({"message": "the receiver said no"}))
            self._fail(Declined("declined"), tell_peer=False)
            return
        try:
            self._check_room()  # the answer may have taken a while
            self._open()
        except (TransferFailed, OSError) as e:
            return self._fail(e if isinstance(e, TransferFailed) else TransferFailed(str(e)))
        self.state = "receiving"
        self._started = self._clock.seconds()
        self._channel.send(ACCEPT, _control({}))

    def _finish(self, end: dict) -> None:
        digest = self._hash.hexdigest()
        if end.get("size") != self._received or self.offer.size not in (None, self._received):
            raise TransferFailed(
                f"size mismatch: offered {self.offer.size}, received {self._received} bytes"
            )
        if end.get("sha256") != digest:
            raise TransferFailed("checksum mismatch: the received data is not what was sent")
        self._commit()
        self._channel.send(ACK, _control({"sha256": digest}))
        self._close_then(Result(self.offer.name, self._received, digest, self._elapsed(), self.destination))

    def _open(self) -> None:
        fd, self._temp = _mkstemp(self._dir, self.offer.name)
        self._file = os.fdopen(fd, "wb")

    def _commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _place(self._temp, self.destination, self._overwrite)
        self._temp = None

    def _cleanup(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except OSError:
                pass
            self._temp = None


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@implementer(IRecordHandler)
class StdoutReceiver(FileReceiver):
    """
    Writes a single-file transfer to a binary stream (standard output) as it
    arrives.  What was written cannot be taken back: if verification fails
    at the end, the transfer fails and the exit status says so.
    """

    def __init__(self, channel, clock, out, decide, progress=None):
        super().__init__(channel, clock, ".", decide, progress=progress)
        self._out = out

    @property
    def destination(self) -> str:
        return "-"

    def _check_room(self) -> None:
        pass

    def _open(self) -> None:
        self._file = self._out

    def _commit(self) -> None:
        self._out.flush()

    def _cleanup(self) -> None:
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass


def _mkstemp(directory: str, name: str) -> tuple[int, str]:
    """A fresh partial file beside the destination, with the mode a newly
    created file would get (never executable, whatever the sender says)."""
    fd, path = tempfile.mkstemp(prefix=".p2pft-", suffix=".part", dir=directory)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, path


def _place(temp: str, destination: str, overwrite: bool) -> None:
    """Move the verified temporary file into place atomically."""
    if overwrite:
        os.replace(temp, destination)
        return
    try:
        os.link(temp, destination)  # fails if destination exists: no clobbering
    except FileExistsError:
        raise Declined(f"{printable(os.path.basename(destination))} appeared while receiving; kept the existing file") from None
    except OSError:
        # File systems without hard links: check-then-rename is the best we can do.
        if os.path.lexists(destination):
            raise Declined(f"{printable(os.path.basename(destination))} already exists") from None
        os.rename(temp, destination)
        return
    os.unlink(temp)
