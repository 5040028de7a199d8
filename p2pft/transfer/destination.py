"""
Where a L{Receiver} puts what it receives: a folder on disk
(L{DiskDestination}: partial files, resume, conflicts, placing) or a binary
stream (L{StreamDestination}: standard output, one file, nothing to resume).
The receiver's flow is the same for both; what differs is here, behind
L{IDestination}.
"""

from __future__ import annotations

import os
import stat
import sys

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from ..errors import Declined, TransferFailed
from .endpoint import os_error
from .manifest import DIR, POSIX, ManifestChecker, NameRules, printable, safe_mode
from .offer import Offer
from .pipes import widen_pipe
from .resume import find_existing
from .sink import FileSink, StreamSink, _write_all
from .store import OutputDir

#: Files up to this size are written unnamed (L{OutputDir.open_unnamed})
#: and leave no partial file to resume from: sending one again costs less
#: than the two extra folder changes a partial name costs every file (at
#: 1 MiB, about 10 ms at 1 Gbit/s).
UNNAMED_MAX = 1 << 20


class IDestination(Interface):
    """Where a receiver writes; each method is one step of the receiver's flow."""

    resumable = Attribute(
        "Whether data kept after a failure can be resumed from (the receiver's hints say so).")

    def where(offer: Offer) -> str:
        """Where the offer lands (the result's path)."""

    def name_rules(rules: NameRules | None) -> NameRules:
        """The name rules the offered names are checked under (C{rules}: the caller's choice)."""

    def open(offer: Offer) -> None:
        """Get ready for C{offer}, or refuse it (L{Declined})."""

    def check_conflicts(checker: ManifestChecker, overwrite: bool) -> None:
        """Refuse, before anyone is asked, names taken by what will not be replaced."""

    def existing(checker: ManifestChecker, stop, run_blocking) -> defer.Deferred:
        """What is already there, as {file index: L{Have}}."""

    def prepare(checker: ManifestChecker, needed: int) -> None:
        """Once accepted: room for C{needed} more bytes, and the folders."""

    def check_start(message: dict) -> None:
        """Refuse a FILE this destination cannot take."""

    def skip(entry) -> None:
        """The sender skips C{entry}: it is here already, complete and identical."""

    def open_file(entry, offset: int, pool, run_blocking):
        """A sink for C{entry}'s data from C{offset} on."""

    takes_whole = Attribute(
        "Whether small files may come whole, many to a record (L{p2pft.transfer.small}).")

    def write_whole(entry, data, overwrite: bool) -> None:
        """Write C{data}, the whole of C{entry}, and place it."""

    def discard(current) -> bool:
        """The file failed its check: drop its data; whether any was deleted."""

    def place(current, overwrite: bool) -> None:
        """The file was received and checked: put it where it belongs."""

    def abandon(current) -> None:
        """The transfer ends with C{current} unfinished."""

    def sync() -> None:
        """Make what was written durable before the ACK."""

    def sync_ahead():
        """A function to run on a thread while more is written, which
        starts making what was written so far durable (so L{sync} has less
        left to do at the end); None where that gains nothing."""

    def close() -> None:
        """The transfer is over (also after a failure; may be called twice)."""


def name_rules(out: OutputDir, platform: str = sys.platform) -> NameRules:
    """The name rules of the output folder C{out}: its platform's, and
    case clashes if its file system ignores case (probed)."""
    return NameRules.where(platform, out.fold_case())


@implementer(IDestination)
class DiskDestination:
    """
    The output folder C{path} (L{OutputDir}): each file is written to its
    partial file, then moved into place (never over an existing file unless
    C{overwrite}); the partial data of a failed transfer stays for a resume.
    """

    resumable = True
    takes_whole = True

    def __init__(self, path: str):
        self._dir = os.path.abspath(path)
        self._out: OutputDir | None = None

    def where(self, offer: Offer) -> str:
        if offer.top_count == 1:
            return os.path.join(self._dir, offer.name)
        return self._dir

    def name_rules(self, rules: NameRules | None) -> NameRules:
        if rules is None:
            self.open(None)
            rules = name_rules(self._out)
        return rules

    def open(self, offer: Offer | None) -> None:
        if self._out is not None:
            return
        if not os.path.isdir(self._dir):
            raise Declined(f"output folder {printable(self._dir)} does not exist")
        self._out = OutputDir(self._dir)

    def check_conflicts(self, checker: ManifestChecker, overwrite: bool) -> None:
        for entry, st in checker.entries.existing(self._out.lstat):
            if entry.kind != DIR:
                st = self._out.settle(entry.path, st)  # an earlier run died while placing it
            shown = printable(entry.path)
            if stat.S_ISLNK(st.st_mode) and (entry.kind == DIR or not overwrite):
                raise Declined(f"{shown} already exists as a symbolic link (p2pft never writes through symbolic links)")
            if entry.kind == DIR:
                if not stat.S_ISDIR(st.st_mode):
                    raise Declined(f"{shown} already exists and is not a folder")
            elif stat.S_ISDIR(st.st_mode):
                raise Declined(f"{shown} already exists and is a folder")
            elif not overwrite and not (stat.S_ISREG(st.st_mode) and st.st_size == entry.size
                                        and st.st_nlink == 1):  # other links: not ours to check
                raise Declined(f"{shown} already exists (use --overwrite to replace it)")

    def existing(self, checker: ManifestChecker, stop, run_blocking) -> defer.Deferred:
        return run_blocking(find_existing, self._out.clone(), checker.entries, stop, checker.entries.skipped)

    def prepare(self, checker: ManifestChecker, needed: int) -> None:
        free = self._out.free()
        if needed > free:
            raise Declined(f"not enough free space: {needed} more bytes needed, {free} free")
        for index in range(len(checker.entries)):
            if checker.entries.is_dir(index) and not checker.entries.skipped(index):
                self._out.make_dir(checker.entries[index].path)

    def check_start(self, message: dict) -> None:
        pass

    def skip(self, entry) -> None:
        self._out.remove_partial(entry.path)

    def open_file(self, entry, offset: int, pool, run_blocking) -> FileSink:
        f = None
        if offset == 0 and entry.size is not None and entry.size <= UNNAMED_MAX:
            f = self._out.open_unnamed(entry.path, safe_mode(entry, self._out.umask))
        if f is not None:
            return FileSink(f, offset, pool, run_blocking, keeps=False)
        return FileSink(self._out.open_partial(entry.path, offset), offset, pool, run_blocking)

    def write_whole(self, entry, data, overwrite: bool) -> None:
        """As L{FileSink} and L{place} would: with no name where the file
        system allows it, else in its partial file, then into place."""
        out, path = self._out, entry.path
        try:
            f = out.open_unnamed(path, safe_mode(entry, out.umask)) or out.open_partial(path, 0)
            try:
                _write_all(f.fileno(), data, 0)
            except BaseException:
                f.close()
                raise
            out.place(path, f, safe_mode(entry, out.umask), entry.mtime_ns, overwrite)
        except OSError as e:
            raise os_error(e, path) from None

    def discard(self, current) -> bool:
        current.sink.close()
        if current.dropped:
            return False
        if not getattr(current.sink, "keeps", True):
            return True  # an unnamed file: its data went with it (and no partial name is ours)
        self._out.remove_partial(current.entry.path)  # not worth resuming from
        return True

    def place(self, current, overwrite: bool) -> None:
        entry = current.entry
        self._out.place(entry.path, current.sink.release(), safe_mode(entry, self._out.umask), entry.mtime_ns,
                        overwrite)

    def abandon(self, current) -> None:
        current.sink.close()
        if not current.dropped and (current.entry.size is None or current.received == 0):
            self._out.remove_partial(current.entry.path)  # nothing a resume could use

    def sync(self) -> None:
        self._out.sync()

    def sync_ahead(self):
        return self._out.sync_ahead()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


@implementer(IDestination)
class StreamDestination:
    """
    A one-file transfer written to a binary stream (standard output) as it
    arrives.  What was written cannot be taken back: if verification fails
    at the end, the transfer fails and the exit status says so.
    """

    resumable = False

    def __init__(self, stream):
        self._stream = stream
        try:
            widen_pipe(stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass  # not a real file

    def where(self, offer: Offer) -> str:
        return "-"

    def name_rules(self, rules: NameRules | None) -> NameRules:
        return rules or POSIX  # nothing is written under these names

    def open(self, offer: Offer) -> None:
        if offer.files != 1 or offer.dirs:
            raise Declined(
                f"--output - takes a single file; this offer has {offer.files} files "
                f"and {offer.dirs} folders")

    def check_conflicts(self, checker: ManifestChecker, overwrite: bool) -> None:
        pass

    def existing(self, checker: ManifestChecker, stop, run_blocking) -> defer.Deferred:
        return defer.succeed({})

    def prepare(self, checker: ManifestChecker, needed: int) -> None:
        pass

    def check_start(self, message: dict) -> None:
        if message.get("file") != 0 or message.get("offset") != 0:
            raise TransferFailed("protocol error: unexpected FILE")

    def skip(self, entry) -> None:
        raise AssertionError("check_start lets no skip through")

    def open_file(self, entry, offset: int, pool, run_blocking) -> StreamSink:
        return StreamSink(self._stream)

    takes_whole = False

    def write_whole(self, entry, data, overwrite: bool) -> None:
        raise AssertionError("takes_whole is False: the receiver lets no FILES through")

    def discard(self, current) -> bool:
        return False  # what was written cannot be taken back

    def place(self, current, overwrite: bool) -> None:
        pass

    def abandon(self, current) -> None:
        pass

    def sync(self) -> None:
        self._stream.flush()

    def sync_ahead(self):
        return None  # written as it comes, in order, flushed at the end

    def close(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass
