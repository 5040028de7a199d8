"""
What a transfer carries: the entries (files and folders) of a manifest, and
how a receiver checks, entry by entry, what a possibly hostile sender offers
(how a sender builds its manifest: L{p2pft.transfer.scan}).

An entry's path is relative, its components joined by C{/}.  The same
L{ManifestChecker} runs on both sides, under the L{NameRules} of where the
files land: the receiver's own (its platform, and whether its output folder
ignores case), the sender's with every rule of every platform as warnings.

A manifest is kept compact, because a sender may offer millions of entries
and the receiver holds all of them before anyone is asked: each distinct
name is stored once, as UTF-8 in one bytearray, with the index of its
folder (L{p2pft.transfer.tree}); sizes, modes and times live in C{array} columns; L{Entry} objects
are made on demand.  About 60 bytes per entry instead of several hundred.
"""

from __future__ import annotations

import os
from array import array
from typing import Callable, Iterator, Sequence

import attrs

from ..errors import UnsafeName
from .names import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    PARTIAL_SUFFIX,
    PORTABLE,
    POSIX,
    NameRules,
    fold,
    path_problem,
    printable,
    quoted,
    safe_component,
    safe_path,
    windows_problem,
)
from .tree import _DIR, _FILE, _IMPLIED, _SKIPPED, _Tree

__all__ = ["FILE", "DIR", "MAX_ENTRIES", "MAX_DEPTH", "MAX_NAME_BYTES", "MAX_PATH_BYTES", "PARTIAL_SUFFIX",
           "PORTABLE", "POSIX", "NameRules", "Entry", "Entries", "ManifestChecker", "printable",
           "quoted", "safe_component", "safe_path", "safe_mode", "entry_from_wire", "listing"]

FILE, DIR = "file", "dir"
#: Most entries one offer may hold.  A receiver keeps about 60 bytes per
#: entry (L{ManifestChecker}), so 2,000,000 entries -- a whole Linux
#: distribution's source tree is a tenth of that -- cost it about 130 MiB
#: before anyone is asked, which a small machine can spare; more is refused
#: up front, before a single entry arrives.
MAX_ENTRIES = 2_000_000
#: Top-level names kept for the receiver's summary.
SUMMARY_NAMES = 8
#: Refused (or warned about) names kept to show; the rest are only counted.
SHOWN_NAMES = 20

_NO_SIZE = -1
_NO_TIME = -(2**63)
_E_DIR, _E_SKIPPED = 1, 2  # entry flags


@attrs.frozen
class Entry:
    path: str
    kind: str
    #: None for a stream of unknown length (standard input); always None for a folder.
    size: int | None
    #: Permission bits as the sender has them; the receiver masks them (L{safe_mode}).
    mode: int = 0o644
    #: Nanoseconds since the epoch, or None.
    mtime_ns: int | None = None

    def wire(self, ns: bool = False) -> list:
        """The entry as ENTRIES carries it: its time in nanoseconds where
        both sides announced the "mtime-ns" feature, else in whole seconds
        (protocol v1 as first written)."""
        mtime = self.mtime_ns
        if mtime is not None and not ns:
            mtime //= NS
        return [self.path, self.kind, self.size, self.mode, mtime]


def _int(value: object, lo: int, hi: int) -> bool:
    return value.__class__ is int and lo <= value <= hi


#: Nanoseconds in a second.
NS = 10**9
#: Times on the wire: nanoseconds within what a signed 64-bit count holds
#: (the years 1678 to 2262), or seconds within what converts to that.
_MAX_NS = 2**63 - 1
_MAX_SECONDS = _MAX_NS // NS


def _check_wire(raw: object, ns: bool = False) -> int | None:
    """Refuse (L{UnsafeName}) a malformed entry: a protocol error, never
    skipped.  Return its time in nanoseconds (C{ns}: it came in them)."""
    if raw.__class__ is not list or len(raw) != 5:
        raise UnsafeName("malformed manifest entry")
    path, kind, size, mode, mtime = raw
    if not isinstance(path, str):
        raise UnsafeName("offered name is not text")
    if kind != FILE and kind != DIR:
        raise UnsafeName("manifest entry of unknown kind")
    if kind == DIR and size is not None or kind == FILE and size is not None and not _int(size, 0, 2**63 - 1):
        raise UnsafeName("manifest entry with an invalid size")
    limit = _MAX_NS if ns else _MAX_SECONDS
    if not _int(mode, 0, 0o7777) or mtime is not None and not _int(mtime, -limit, limit):
        raise UnsafeName("manifest entry with an invalid mode or time")
    return mtime if mtime is None or ns else mtime * NS


def entry_from_wire(raw: object, rules: NameRules = PORTABLE, ns: bool = False) -> Entry:
    mtime = _check_wire(raw, ns)
    path, kind, size, mode, _ = raw
    return Entry(safe_path(path, rules), kind, size, mode, mtime)


def safe_mode(entry: Entry, umask: int) -> int:
    """The mode a received entry gets: never set-id, sticky or writable by
    others; executable only if the sender's owner could execute it;
    always readable and writable by us (so a resume can write to it)."""
    if entry.kind == DIR:
        return 0o755 & ~umask | 0o700
    return (0o755 if entry.mode & 0o100 else 0o644) & ~umask | 0o600

class Entries(Sequence):
    """The entries of a L{ManifestChecker}, as L{Entry} objects made on demand."""

    def __init__(self, checker: "ManifestChecker"):
        self._c = checker

    def __len__(self) -> int:
        return len(self._c._flags)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        c = self._c
        if index < 0:
            index += len(c._flags)
        node = c._nodes[index]
        size, mtime = c._sizes[index], c._mtimes[index]
        return Entry(c._tree.path(node) if node >= 0 else "", DIR if c._flags[index] & _E_DIR else FILE,
                     None if size == _NO_SIZE else size, c._modes[index], None if mtime == _NO_TIME else mtime)

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield self[i]


class ManifestChecker:
    """
    Takes entries one by one under C{rules} (L{NameRules}): refuses unsafe
    names, two entries that would land on the same name (names are
    NFC-normalised; where the folder ignores case, names equal once
    case-folded are the same), an entry below a file, and more than
    C{max_entries}.  L{add} raises L{UnsafeName}; L{offer} (what a receiver
    uses) records a refused name instead, so all of them can be shown at
    once, or skipped.  What C{warn} (more rules: the sender's L{PORTABLE})
    refuses on top of C{rules} is only counted in L{warned}.

    Keeps the accepted entries (L{entries}) and the totals a summary needs,
    for accepted entries only.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES, rules: NameRules = PORTABLE,
                 warn: NameRules | None = None):
        self.rules = rules
        self.warn = warn if warn is not None and warn != rules else None
        #: Whether L{offer}ed entries carry their times in nanoseconds (both
        #: sides announced "mtime-ns") rather than seconds.
        self.wire_ns = False
        self.files = self.dirs = self.bytes = 0
        self.streams = 0
        #: First top-level names (with a trailing "/" for folders), and how many there are.
        self.top: list[str] = []
        self.top_count = 0
        #: Entries refused (and so skipped if the receiver chooses), and the
        #: first L{SHOWN_NAMES} of them with the reason.
        self.refused = 0
        self.refused_names: list[str] = []
        #: Bytes of the refused files (their data still crosses the network).
        self.refused_bytes = 0
        #: Entries only C{warn} refuses, and the first of them.
        self.warned = 0
        self.warned_names: list[str] = []
        self._max = max_entries
        folding = rules.fold_case or self.warn is not None and self.warn.fold_case
        self._tree = _Tree(folding)
        self._nodes = array("i")
        self._sizes = array("q")
        self._modes = array("H")
        self._mtimes = array("q")
        self._flags = bytearray()
        self._last: tuple[str, int] = ("", -1)  # the last folder looked up, and its node
        self.entries = Entries(self)

    def add(self, entry: Entry) -> Entry:
        """Add C{entry} or raise L{UnsafeName} (nothing is recorded then)."""
        self._add(entry.path, entry.kind, entry.size, entry.mode, entry.mtime_ns, refuse=True)
        return entry

    def offer(self, raw: object) -> None:
        """Add an entry as it came from the wire (C{[path, kind, size,
        mode, mtime]}): a malformed one raises L{UnsafeName}; a name that
        cannot be written is recorded in L{refused} and the entry is kept,
        skipped."""
        mtime = _check_wire(raw, self.wire_ns)
        path, kind, size, mode, _ = raw
        self._add(path, kind, size, mode, mtime, refuse=False)

    def skipped(self, index: int) -> bool:
        return bool(self._flags[index] & _E_SKIPPED)

    def is_dir(self, index: int) -> bool:
        return bool(self._flags[index] & _E_DIR)

    def file_indices(self) -> array:
        """Indices of the file entries, skipped ones included (the sender
        sends them all)."""
        return array("l", (i for i, f in enumerate(self._flags) if not f & _E_DIR))

    def _add(self, path: str, kind: str, size: int | None, mode: int, mtime: int | None, refuse: bool) -> None:
        if len(self._flags) >= self._max:
            raise UnsafeName(f"the offer has more than {self._max} entries")
        is_dir = kind == DIR
        path, why = path_problem(path, self.rules)
        node = -1
        if why is None:
            node, why = self._place(path, is_dir)
        if why is not None:
            if refuse:
                raise UnsafeName(f"offered name {quoted(path)} {why}")
            self.refused += 1
            if not is_dir and size is not None:
                self.refused_bytes += size
            if len(self.refused_names) < SHOWN_NAMES:
                self.refused_names.append(f"{quoted(path)} {why}")
        self._nodes.append(node)
        self._sizes.append(_NO_SIZE if size is None else size)
        self._modes.append(mode)
        self._mtimes.append(_NO_TIME if mtime is None else mtime)
        self._flags.append((_E_DIR if is_dir else 0) | (_E_SKIPPED if why is not None else 0))
        if why is not None:
            return
        if is_dir:
            self.dirs += 1
        else:
            self.files += 1
            if size is None:
                self.streams += 1
            else:
                self.bytes += size

    def _warn(self, path: str, why: str) -> None:
        self.warned += 1
        if len(self.warned_names) < SHOWN_NAMES:
            self.warned_names.append(f"{quoted(path)} {why}")

    def _place(self, path: str, is_dir: bool) -> tuple[int, str | None]:
        """Put the NFC C{path} in the tree; its node, or why it clashes."""
        tree = self._tree
        folder, _, leaf = path.rpartition("/")
        if folder:
            if self._last[0] == folder:
                parent = self._last[1]
            else:
                parent, why = self._folder(folder)
                if why is not None:
                    return -1, why
                self._last = (folder, parent)
        else:
            parent = -1
        raw = leaf.encode("utf-8", "surrogatepass")
        h = hash((parent, raw))
        node, _ = tree.find(parent, raw, h)
        if node >= 0 and (tree.kinds[node] & 3 != _IMPLIED or not is_dir):
            return node, self._twice()
        if parent >= 0 and tree.kinds[parent] & _SKIPPED:
            why = "is inside a folder that was refused"
            if node < 0:
                node = tree.add(parent, raw, h, _DIR if is_dir else _FILE)
            return node, why
        group = -1
        if tree.folding:
            folded = fold(leaf)
            pgroup = tree.node_group[parent] if parent >= 0 else -1
            gh = hash((pgroup, folded))
            group, _ = tree.find_group(pgroup, folded, gh)
            if group >= 0 and (tree.g_kind[group] != _IMPLIED or not is_dir):
                if self.rules.fold_case:
                    if is_dir:  # so that what is below it is refused too
                        if node < 0:
                            node = tree.add(parent, raw, h, _DIR | _SKIPPED)
                            tree.node_group.append(group)
                        else:
                            tree.kinds[node] |= _SKIPPED
                    return node, self._twice()
                self._warn(path, "clashes with another name where case is ignored (Windows, macOS)")
        if self.warn is not None and self.warn.windows and not self.rules.windows:
            why = windows_problem(leaf)
            if why is not None:
                self._warn(path, why)
        kind = _DIR if is_dir else _FILE
        if node >= 0:
            tree.kinds[node] = (tree.kinds[node] & ~3) | kind
        else:
            node = tree.add(parent, raw, h, kind)
            if tree.folding:
                if group < 0:
                    group = tree.add_group(pgroup, folded, gh, node, kind)
                tree.node_group.append(group)
            if parent < 0 and (not tree.folding or tree.g_rep[group] == node):
                self.top_count += 1
                if len(self.top) < SUMMARY_NAMES:
                    self.top.append(leaf + ("/" if is_dir else ""))
        if tree.folding and tree.g_kind[group] == _IMPLIED:
            tree.g_kind[group] = kind
        return node, None

    def _twice(self) -> str:
        if self.rules.fold_case:
            return ("is offered twice (names that differ only in case or Unicode form are the same "
                    "name in a folder that ignores case)")
        return "is offered twice (names that differ only in Unicode form are the same name once normalised)"

    def _folder(self, folder: str) -> tuple[int, str | None]:
        """The node of the folder path C{folder}, made (implied) where
        missing; or why it cannot be one (a file is there)."""
        tree = self._tree
        parent = -1
        for part in folder.split("/"):
            raw = part.encode("utf-8", "surrogatepass")
            h = hash((parent, raw))
            node, _ = tree.find(parent, raw, h)
            if node >= 0:
                if tree.kinds[node] & 3 == _FILE or tree.folding and tree.g_kind[tree.node_group[node]] == _FILE \
                        and self.rules.fold_case:
                    return -1, "is offered inside a file"
                parent = node
                continue
            group = -1
            if tree.folding:
                folded = fold(part)
                pgroup = tree.node_group[parent] if parent >= 0 else -1
                gh = hash((pgroup, folded))
                group, _ = tree.find_group(pgroup, folded, gh)
                if group >= 0 and tree.g_kind[group] == _FILE and self.rules.fold_case:
                    return -1, "is offered inside a file"
            node = tree.add(parent, raw, h, _IMPLIED)
            if tree.folding:
                if group < 0:
                    group = tree.add_group(pgroup, folded, gh, node, _IMPLIED)
                tree.node_group.append(group)
            if parent < 0 and (not tree.folding or tree.g_rep[group] == node):
                self.top_count += 1
                if len(self.top) < SUMMARY_NAMES:
                    self.top.append(part + "/")
            parent = node
        return parent, None

    def existing(self, lstat: Callable[[str], os.stat_result | None]) -> Iterator[tuple[Entry, os.stat_result]]:
        """Each accepted entry whose name is taken, with what C{lstat(path)}
        found there; C{lstat} is not asked about what lies below a folder
        it found missing (so an empty output folder costs one call per
        top-level name, not one per entry)."""
        missing = bytearray(len(self._tree.parents))
        parents = self._tree.parents
        for index in range(len(self._flags)):
            node = self._nodes[index]
            if self._flags[index] & _E_SKIPPED:
                continue
            parent = parents[node]
            if parent >= 0 and missing[parent]:
                missing[node] = 1
                continue
            entry = self.entries[index]
            st = lstat(entry.path)
            if st is None:
                missing[node] = 1
            else:
                yield entry, st

    def finish(self) -> None:
        """Checks on the whole offer, once every entry is in."""
        if not self._flags:
            raise UnsafeName("the offer is empty")
        if self.streams and len(self._flags) > 1:
            raise UnsafeName("a stream of unknown size can only be offered alone")


def listing(names: list[str], count: int) -> str:
    """The first names of C{count}, and how many more."""
    more = f"; and {count - len(names)} more" if count > len(names) else ""
    return "; ".join(names) + more
