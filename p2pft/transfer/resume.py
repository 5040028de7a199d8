"""
Resuming: how a receiver proves which data it already has, so a resumed
transfer sends only the rest.  Every rule of it lives here.

A file is cut into L{BLOCK}-sized blocks from its start; each block's proof
is its SHA-256.  The receiver hashes every whole block of its partial file
(every block of an existing complete file) (L{find_existing}) and sends the
hashes in HAVE messages (L{have_messages}); the sender collects them
(L{HaveBook}), reads its own file block by block while the hashes match and
plans each file (L{check_have}): skip it, continue after the matching
blocks, or start over.  Data that travels needs no such proof: the AEAD
records already authenticate every byte and their order.

Hashing blocks on disk reads: call it off the reactor thread.  A block that
lies wholly in a hole of a sparse file is known to be zeros without reading
it (C{SEEK_DATA}, where the system has it).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import threading
from typing import BinaryIO, Callable, Iterator

import attrs

from ..errors import Declined, TransferFailed
from .manifest import DIR, printable
from .records import count
from .small import open_regular, scanned_as
from .store import OutputDir

#: Bytes per hashed block: big enough that a HAVE of a 3 GiB file fits one
#: message (L{HASHES_PER_MESSAGE}), small enough that a cut costs at most
#: this much data sent again.
BLOCK = 4 << 20
#: Most block hashes one HAVE message carries (64 hex digits each).
HASHES_PER_MESSAGE = 768

_SEEK_DATA = getattr(os, "SEEK_DATA", None)


def block_count(size: int) -> int:
    return -(-size // BLOCK)


@attrs.define
class Prefix:
    """The first C{length} bytes of a file: one hash per block."""

    hashes: list[bytes] = attrs.Factory(list)
    length: int = 0

    def add(self, length: int, digest: bytes) -> None:
        self.hashes.append(digest)
        self.length += length


@functools.lru_cache(maxsize=4)
def _zeros_digest(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()


def _in_hole(fd: int, pos: int) -> int:
    """Bytes from C{pos} that are surely zeros without reading them (a hole
    up to the next data or to the end of the file); 0 if unknown."""
    if _SEEK_DATA is None:
        return 0
    try:
        data = os.lseek(fd, pos, _SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            return 0  # no SEEK_DATA here: read it all
        return max(0, os.fstat(fd).st_size - pos)  # only a hole up to the end
    return data - pos


def _blocks(f: BinaryIO, cut: Callable[[int], int] = lambda length: length) -> Iterator[tuple[int, bytes]]:
    """(length, digest) of each block of C{f} from where it stands, the last
    one possibly short (read by position; C{f} is left after what was
    hashed).  C{cut(length)}: how much of the next block to take."""
    fd, pos = f.fileno(), f.tell()
    try:
        while True:
            want = cut(BLOCK)
            if want <= 0:
                return
            if _in_hole(fd, pos) >= want:
                length, digest = want, _zeros_digest(want)
            else:
                block = os.pread(fd, want, pos)
                if not block:
                    return
                length, digest = len(block), hashlib.sha256(block).digest()
            pos += length
            yield length, digest
            if length < BLOCK:
                return
    finally:
        f.seek(pos)


def hash_prefix(f: BinaryIO, limit: int) -> Prefix:
    """Hash f from its start up to C{limit} bytes (a multiple of L{BLOCK},
    or the file's whole size), stopping early at its end."""
    prefix = Prefix()
    for length, digest in _blocks(f, lambda length: min(length, limit - prefix.length)):
        prefix.add(length, digest)
    return prefix


def match_prefix(f: BinaryIO, hashes: list[bytes]) -> Prefix:
    """Read f from its start while its blocks match C{hashes}."""
    prefix = Prefix()
    for (length, digest), expected in zip(_blocks(f), hashes):
        if digest != expected:
            break
        prefix.add(length, digest)
    return prefix


# -- the receiver: what it has, and how it says so ---------------------------

@attrs.define
class Have:
    """What the receiver already has of one file."""

    complete: bool
    prefix: Prefix


def find_existing(out: OutputDir, entries, stop: threading.Event,
                  skipped: Callable[[int], bool] = lambda index: False) -> dict[int, Have]:
    """
    (On a thread, with its own L{OutputDir}.)  Hash what is already there
    for each file (not C{skipped}): a complete file of the right size at
    its destination, or the whole blocks of its partial file.
    """
    found = {}
    # Folders that are not there (nothing below them is: one look for a
    # folder of 10,000 new files, not two for each file) and folders that are.
    absent, present = set(), {""}
    try:
        for index in range(len(entries)):
            if stop.is_set():
                break
            if skipped(index):
                continue
            entry = entries[index]
            if entry.kind == DIR or entry.size is None:
                continue
            folder = entry.path.rpartition("/")[0]
            if folder not in present:
                try:
                    st = None if folder in absent else out.lstat(folder)
                except Declined:  # (below a link or a file: refused when it is written)
                    st = None
                if st is None or not stat.S_ISDIR(st.st_mode):
                    absent.add(folder)
                    continue
                present.add(folder)
            try:
                have = _existing(out, entry)
            except Declined:
                continue  # not a file of ours (a link, a file on the way): refused when it is written
            if have is not None:
                found[index] = have
    finally:
        out.close()
    return found


def _existing(out: OutputDir, entry) -> Have | None:
    """What is already there of one file (L{find_existing})."""
    st = out.lstat(entry.path)
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
        with out.open_read(entry.path) as f:
            prefix = hash_prefix(f, entry.size)
        return Have(True, prefix) if prefix.length == entry.size else None
    st = out.lstat(entry.path, partial=True)
    if st is not None and stat.S_ISREG(st.st_mode):
        limit = min(st.st_size, entry.size) // BLOCK * BLOCK
        if limit:
            with out.open_read(entry.path, partial=True) as f:
                prefix = hash_prefix(f, limit)
            if prefix.length == limit:
                return Have(False, prefix)
    return None


def have_messages(have: dict[int, Have]) -> Iterator[dict]:
    """The HAVE messages that tell the sender what C{have} holds, in file order."""
    for index, h in sorted(have.items()):
        hexes = [d.hex() for d in h.prefix.hashes]
        for start in range(0, max(len(hexes), 1), HASHES_PER_MESSAGE):
            yield {"file": index, "complete": h.complete, "from": start,
                   "hashes": "".join(hexes[start:start + HASHES_PER_MESSAGE])}


def check_resume(have: Have | None, path: str, offset: int, overwrite: bool) -> None:
    """Refuse a FILE (not a skip) from C{offset} that is not what C{have}
    allows: over a complete file without C{overwrite}, or resuming from data
    the receiver did not prove it has."""
    if have is not None and have.complete and not overwrite:
        raise Declined(f"{printable(path)} already exists with other content (use --overwrite to replace it)")
    if offset and (have is None or have.complete or offset > have.prefix.length or offset % BLOCK):
        raise TransferFailed("protocol error: resumed from data we do not have")


# -- the sender: what the receiver says it has, checked against our files ----

class HaveBook:
    """The HAVE messages of a receiver, checked and collected per file index."""

    def __init__(self, entries):
        self._entries = entries
        self.have: dict[int, tuple[bool, list[bytes]]] = {}

    def add(self, have: dict) -> None:
        index = count(have.get("file"), "file index", 0, len(self._entries) - 1)
        entry = self._entries[index]
        hashes = have.get("hashes")
        if entry.kind == DIR or entry.size is None or not isinstance(hashes, str):
            raise TransferFailed("protocol error: invalid HAVE")
        complete, known = self.have.get(index, (bool(have.get("complete")), []))
        if count(have.get("from"), "HAVE offset") != len(known) or len(hashes) % 64:
            raise TransferFailed("protocol error: invalid HAVE")
        try:
            known.extend(bytes.fromhex(hashes[i:i + 64]) for i in range(0, len(hashes), 64))
        except ValueError:
            raise TransferFailed("protocol error: invalid HAVE") from None
        if len(known) > block_count(entry.size):
            raise TransferFailed("protocol error: HAVE for more blocks than the file has")
        self.have[index] = (complete, known)

    def take(self) -> dict[int, tuple[bool, list[bytes]]]:
        """What was collected (and forget it)."""
        have, self.have = self.have, {}
        return have


def check_have(entries, sources, have: dict, stop: threading.Event) -> dict[int, tuple[bool, Prefix]]:
    """(On a thread.)  For each file the receiver has: read ours while
    its block hashes match; skip it if it is complete and identical;
    resume a partial file after its longest matching prefix of whole
    blocks (what follows -- damaged, never written, or changed at the
    source since -- is sent again); else start over."""
    plan = {}
    for index, (complete, hashes) in have.items():
        if stop.is_set():
            break
        entry = entries[index]
        path = sources[index]
        try:
            with os.fdopen(open_regular(path, scanned_as(sources, index)), "rb") as f:
                prefix = match_prefix(f, hashes)
        except OSError as e:
            raise TransferFailed(f"cannot read {printable(path)}: {e.strerror or e}") from None
        if complete:
            if len(prefix.hashes) == len(hashes) and prefix.length == entry.size:
                plan[index] = (True, prefix)
        elif 0 < prefix.length <= entry.size:
            plan[index] = (False, prefix)
    return plan
