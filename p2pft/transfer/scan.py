"""
The sender's manifest: what it offers (L{Manifest}), built from the paths
it was given (L{scan}: files and folders, folders recursively, links and
special files skipped), or for standard input (L{stream_manifest}).
"""

from __future__ import annotations

import os
import stat
from array import array
from typing import Callable, Iterable, Sequence

import attrs

from ..errors import ScanError, UnsafeName
from .manifest import DIR, FILE, Entries, Entry, ManifestChecker, listing
from .names import PORTABLE, POSIX, NameRules, printable


def identity(st: os.stat_result) -> int:
    """Which file C{st} describes (its device and inode), in 64 bits."""
    return hash((st.st_dev, st.st_ino)) & 0xFFFF_FFFF_FFFF_FFFF


class _Sources(Sequence):
    """Where a scanned manifest's entries are read from: the folder of the
    command-line path each came from, joined to the entry's path, except
    where the name on disk is not the entry's (not in NFC form).  And which
    file each was when scanned (L{identity}): a name that is another file
    when it is sent -- a link put there since, or a folder above it
    swapped for one -- is not read (L{p2pft.transfer.small.open_regular})."""

    def __init__(self, entries: Entries):
        self._entries = entries
        self.bases: list[str] = []
        self.base_of = array("i")
        self.other: dict[int, str] = {}
        self.identities = array("Q")

    def identity(self, index: int) -> int:
        return self.identities[index]

    def append(self, local: str, rel: str, path: str, st: os.stat_result) -> None:
        index = len(self.base_of)
        self.identities.append(identity(st))
        base = local[:len(local) - len(rel)]
        if not self.bases or self.bases[-1] != base:
            self.bases.append(base)
        self.base_of.append(len(self.bases) - 1)
        if rel != path:
            self.other[index] = local

    def __len__(self) -> int:
        return len(self.base_of)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        local = self.other.get(index)
        if local is not None:
            return local
        return self.bases[self.base_of[index]] + self._entries.path(index)


@attrs.frozen
class Manifest:
    """What a sender offers: the checked entries, and for each the path it
    is read from on this computer."""

    checker: ManifestChecker
    sources: Sequence[str]

    @property
    def entries(self) -> Entries:
        return self.checker.entries


def stream_manifest(name: str = "stdin") -> Manifest:
    checker = ManifestChecker()
    checker.add(Entry(name, FILE, None))
    checker.finish()
    return Manifest(checker, ["standard input"])


def scan(paths: Iterable[str], follow_symlinks: bool = False,
         notice: Callable[[str], None] = lambda text: None, rules: NameRules = POSIX) -> Manifest:
    """
    Build the manifest of C{paths} (files and folders, folders recursively,
    in name order), or raise L{ScanError} for the first path that cannot be
    sent (a name no receiver accepts: C{rules}).  Symbolic links named on
    the command line are followed; inside folders they are skipped (with a
    C{notice}) unless C{follow_symlinks}, and so are sockets, FIFOs and
    devices.  Names only some receivers refuse (L{PORTABLE}: a Windows
    receiver, a folder that ignores case) get one C{notice} at the end.
    """
    checker = ManifestChecker(rules=rules, warn=PORTABLE)
    sources = _Sources(checker.entries)
    for path in paths:
        local = os.path.abspath(path)
        name = os.path.basename(local)
        if not name:
            raise ScanError(f"{path}: cannot send the root folder; name what is inside it")
        try:
            st = os.stat(local)
        except FileNotFoundError:
            raise ScanError(f"{path}: no such file or folder") from None
        except OSError as e:
            raise ScanError(f"{path}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise ScanError(f"{path}: not a regular file or folder")
        try:
            _add_tree(checker, sources, local, name, st, follow_symlinks, notice, set())
        except UnsafeName as e:
            raise ScanError(f"{path}: {e}") from None
    checker.finish()
    if checker.warned:
        notice(warning(checker))
    return Manifest(checker, sources)


def warning(checker: ManifestChecker) -> str:
    """The sender's notice about names some receivers refuse."""
    n = checker.warned
    return (f"{n} name{'s' if n != 1 else ''} would be refused by a receiver on Windows or in a folder "
            f"that ignores case (it can leave them out with --skip-unsafe): "
            f"{listing(checker.warned_names, n)}")


def _add_tree(checker: ManifestChecker, sources: _Sources, local: str, rel: str, st: os.stat_result,
              follow: bool, notice: Callable[[str], None], ancestors: set) -> None:
    def add(kind, size):
        # (Checked and NFC-normalised once, by the checker: UnsafeName if it cannot be sent.)
        path = checker.add(Entry(rel, kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
        sources.append(local, rel, path, st)
    if stat.S_ISREG(st.st_mode):
        if not os.access(local, os.R_OK):
            raise ScanError(f"{local}: permission denied")
        return add(FILE, st.st_size)
    add(DIR, None)
    try:
        with os.scandir(local) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ScanError(f"{local}: {e.strerror}") from None
    ancestors = ancestors | {(st.st_dev, st.st_ino)}
    for child in children:
        child_rel = f"{rel}/{child.name}"
        try:
            if child.is_symlink():
                if not follow:
                    notice(f"skipping symbolic link {printable(child.path)} (--follow-symlinks sends what it points to)")
                    continue
                child_st = os.stat(child.path)
            else:
                child_st = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            notice(f"skipping {printable(child.path)}: it points nowhere or vanished")
            continue
        except OSError as e:
            raise ScanError(f"{child.path}: {e.strerror}") from None
        if stat.S_ISDIR(child_st.st_mode) and (child_st.st_dev, child_st.st_ino) in ancestors:
            notice(f"skipping {printable(child.path)}: it links back to a folder above it")
        elif stat.S_ISDIR(child_st.st_mode) or stat.S_ISREG(child_st.st_mode):
            _add_tree(checker, sources, child.path, child_rel, child_st, follow, notice, ancestors)
        else:
            notice(f"skipping {printable(child.path)}: not a regular file or folder")
