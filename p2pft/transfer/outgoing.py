"""
The sender's files, once the receiver said what it has: L{Outgoing} knows
which file comes next, whether it is skipped or from which offset it is
sent, and reads the one being sent -- opened only if it is still the size
offered, and read while it stays that.  The L{Sender} sends the records,
counts and paces.
"""

from __future__ import annotations

import os
from array import array
from typing import BinaryIO, Sequence

import attrs

from ..errors import TransferFailed
from .manifest import Entry, printable
from .small import BATCH_BYTES, BATCH_FILES, SMALL_FILE, open_regular, read_whole, scanned_as


@attrs.define
class OutgoingFile:
    """The file being sent."""

    entry: Entry
    file: BinaryIO
    remaining: int


def _open_source(entry, source: str, scanned: int | None = None):
    """The file C{source} of C{entry}, unbuffered, if it is still the file
    scanned and its size."""
    f = os.fdopen(open_regular(source, scanned), "rb", buffering=0)
    size = os.fstat(f.fileno()).st_size
    if size != entry.size:
        f.close()
        raise TransferFailed(
            f"{printable(source)} changed after the transfer started ({entry.size} bytes "
            f"then, {size} now); send again")
    return f


class Outgoing:
    """
    The files C{files} (indices into C{entries}; C{sources}: their paths
    here) in the order they are sent.  C{plan}: what the receiver has, as
    {file index: (complete, prefix)} (L{p2pft.transfer.resume.check_have}).
    A file that shrank or grew while it was sent raises L{TransferFailed}.
    """

    def __init__(self, entries: Sequence[Entry], sources: Sequence[str], files: array, plan: dict):
        self._entries = entries
        self._sources = sources
        self._files = files
        self._plan = plan
        self._next = 0
        #: The file being sent, or None between files.
        self.current: OutgoingFile | None = None

    @property
    def all_started(self) -> bool:
        return self._next == len(self._files)

    def start_next(self) -> tuple[Entry, dict]:
        """The next file and its FILE message: C{{file, skip}} if the
        receiver has it complete, else C{{file, offset}}, and it is open."""
        index = self._files[self._next]
        self._next += 1
        entry = self._entries[index]
        complete, prefix = self._plan.pop(index, (False, None))
        if complete:
            return entry, {"file": index, "skip": True}
        f = _open_source(entry, self._sources[index], scanned_as(self._sources, index))
        offset = prefix.length if prefix is not None else 0
        f.seek(offset)
        self.current = OutgoingFile(entry, f, entry.size - offset)
        return entry, {"file": index, "offset": offset}

    def whole(self) -> list[tuple[int, bytes]]:
        """The next files, if they are small and sent from their start
        (the receiver has nothing of them), read whole for a FILES record
        (L{p2pft.transfer.small}): (file index, content) each, at most
        L{BATCH_BYTES} of content (or one file) and L{BATCH_FILES} files;
        empty if the next file is not such a file."""
        files, size, entries = [], 0, self._entries
        while self._next < len(self._files) and len(files) < BATCH_FILES:
            index = self._files[self._next]
            this = entries.size(index)
            if this is None or this > SMALL_FILE or index in self._plan or (files and size + this > BATCH_BYTES):
                break
            files.append((index, read_whole(entries[index], self._sources[index], scanned_as(self._sources, index))))
            self._next += 1
            size += this
        return files

    def read(self, size: int) -> bytes:
        """The next piece of the current file, at most C{size} bytes (as
        much as the file has left; empty at its end).  A new object each
        time, read straight into (no copy, no zero-fill): the session keeps
        it as it is until the other side acknowledges it."""
        current = self.current
        want = min(size, current.remaining)
        data = current.file.read(want) if want else b""
        if len(data) < want:
            raise TransferFailed(f"{printable(current.entry.path)} shrank while it was being sent")
        current.remaining -= len(data)
        return data

    def finish(self) -> dict:
        """The current file was read to its offered size: close it and
        return its FILE_END message, unless it grew meanwhile."""
        current = self.current
        if current.file.read(1):
            raise TransferFailed(f"{printable(current.entry.path)} grew while it was being sent")
        self.close()
        return {"size": current.entry.size}

    def close(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.file.close()
