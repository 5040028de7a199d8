"""
Small files, many to a record, written on several threads.

A folder of source code or photos' sidecars is tens of thousands of files
of a few KiB.  Sent one by one, each file is three records (FILE, DATA,
FILE_END) with two JSON messages, and on the receiver a dozen system calls
(create, write, set mode and times, link into place, close) on the reactor
thread, one after the other: the file system, not the link, sets the pace.

So when the receiver says it takes them (C{"files": true} in its ACCEPT),
the sender packs the whole of each fresh small file -- at most
L{SMALL_FILE} bytes, sent from its start, nothing of it at the receiver --
into FILES records:

    FILES  =  ( u32 file index | u32 size | size bytes ) ...

files in the order they are due, at most L{BATCH_BYTES} of data or
L{BATCH_FILES} files to a record.  The receiver checks each one exactly as
it checks a FILE ... FILE_END (the next file due, the size offered), and
writes and places it at once, from the record itself
(L{p2pft.transfer.destination.DiskDestination.write_whole}).

Writing them on worker threads was measured and left out: on ext4 with
one to four threads the files took longer than on the reactor thread,
idle or busy (creates in one folder take the folder's lock in turn, and a
thread back from each of its six system calls waits for the GIL).  So
was handing them to writer processes (the branch C{writer-process}: each
record's checked files, in batches, to children given the output folder's
descriptor): on two cores shared with the sender, two writers were 6 %
faster for 50,000 files (median 5.49 s against 5.82), one slower, and the
receiver's memory grew by 15 MiB.  Creating files costs the same CPU in
any process, and splitting the work added 1.3-1.6 CPU-s of its own (the
children's imports, a copy through a pipe, more switches): the two cores
were busy either way.  With cores to spare it may pay (not measured:
this project's machines have two).

Resume is unchanged: a small file is not worth resuming from (it is
written with no name until it is complete, L{OutputDir.open_unnamed}); a
complete identical file is skipped; a partial file left by an older
version is cut and reused.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Iterator


from ..errors import TransferFailed
from .manifest import printable
from .scan import identity

#: Largest file sent whole in a FILES record.  A FILES record holds its
#: files in the receiver's memory until they are written, and a file this
#: size costs a few system calls against 16 µs of 4 GB/s link: past it,
#: a file is sent as DATA records like any other.
SMALL_FILE = 64 * 1024
#: Data bytes in one FILES record: the size of a DATA record, so neither
#: side's buffers grow, and a lossy 1 Mbit/s path still carries one in 2 s.
BATCH_BYTES = 256 * 1024
#: Files in one FILES record (empty files weigh nothing but a header).
BATCH_FILES = 512
_HEADER = struct.Struct(">II")

def pack(files: list[tuple[int, bytes]]) -> bytes:
    """A FILES payload of C{files}, (file index, whole content) each."""
    parts = []
    for index, data in files:
        parts.append(_HEADER.pack(index, len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack(payload: bytes) -> Iterator[tuple[int, memoryview]]:
    """The files of a FILES payload, (file index, content: a view of the
    payload); L{TransferFailed} if it is cut short or empty."""
    view = memoryview(payload)
    end, at = len(view), 0
    if not end:
        raise TransferFailed("protocol error: empty FILES")
    while at < end:
        if at + _HEADER.size > end:
            raise TransferFailed("protocol error: FILES cut short")
        index, size = _HEADER.unpack_from(view, at)
        at += _HEADER.size
        if at + size > end:
            raise TransferFailed("protocol error: FILES cut short")
        yield index, view[at:at + size]
        at += size


def scanned_as(sources, index: int) -> int | None:
    """Which file C{sources[index]} was when scanned, if the sources say
    (L{p2pft.transfer.scan.identity}; standard input does not)."""
    of = getattr(sources, "identity", None)
    return of(index) if of is not None else None


def open_regular(source: str, scanned: int | None = None) -> int:
    """The descriptor L{open_checked} opens (without the C{stat} it made)."""
    return open_checked(source, scanned)[0]


def open_checked(source: str, scanned: int | None = None) -> tuple[int, os.stat_result]:
    """A descriptor of the file C{source}, for reading, if it is (still) a
    regular file: the scan left FIFOs and devices out, but one can take a
    file's name before it is sent, and opening a FIFO would block until
    something writes to it (the reactor thread, forever).  And if it is
    still the file scanned (C{scanned}: its L{p2pft.transfer.scan.identity}):
    the scan followed no link it was not told to, and the name could since
    have become one (to a file of the same size elsewhere)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise TransferFailed(f"cannot read {printable(source)}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferFailed(f"cannot read {printable(source)}: it is not a regular file any more; send again")
        if scanned is not None and identity(st) != scanned:
            raise TransferFailed(f"{printable(source)} is another file than when the transfer started "
                                 f"(replaced, or a link put there); send again")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_whole(entry, source: str, scanned: int | None = None) -> bytes:
    """The whole content of the file C{source} of C{entry}, if it is still
    the file scanned and the size offered (the checks of
    L{p2pft.transfer.outgoing}, in one read)."""
    fd, st = open_checked(source, scanned)
    try:
        size = st.st_size
        if size != entry.size:
            raise TransferFailed(
                f"{printable(source)} changed after the transfer started ({entry.size} bytes "
                f"then, {size} now); send again")
        data = os.read(fd, size + 1)
        while len(data) < size:  # (a regular file reads short only at its end)
            more = os.read(fd, size + 1 - len(data))
            if not more:
                raise TransferFailed(f"{printable(entry.path)} shrank while it was being sent")
            data += more
        if len(data) > size:
            raise TransferFailed(f"{printable(entry.path)} grew while it was being sent")
        return data
    except OSError as e:
        raise TransferFailed(f"cannot read {printable(source)}: {e.strerror or e}") from None
    finally:
        os.close(fd)
