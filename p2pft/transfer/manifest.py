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
folder (L{p2pft.transfer.tree}); sizes, modes and times live in C{array}
columns; L{Entry} objects are made on demand.  A realistic tree costs about
85 bytes of peak RSS per entry (C{bench/manifest.py}: 1,000,000 entries,
83 MiB above the interpreter's 42).  What is stored is capped three ways
(L{MAX_ENTRIES}, L{MAX_NODES}, L{MAX_STORED_NAME_BYTES}), so the most a
hostile sender can make a receiver hold, with every cap reached at once, is
about 205 MiB above the interpreter, 262 MiB where the folder ignores case
(measured: C{bench/manifest.py --shape worst --entries 2000000}).
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
    path_problem,
    printable,
    quoted,
    safe_component,
    safe_path,
)
from .records import is_int
from .tree import SHOWN_NAMES, NameTree

__all__ = ["FILE", "DIR", "MAX_ENTRIES", "MAX_DEPTH", "MAX_NAME_BYTES", "MAX_PATH_BYTES", "PARTIAL_SUFFIX",
           "PORTABLE", "POSIX", "NameRules", "Entry", "Entries", "ManifestChecker", "printable",
           "quoted", "safe_component", "safe_path", "safe_mode", "entry_from_wire", "listing"]

FILE, DIR = "file", "dir"
#: Most entries one offer may hold.  A receiver keeps about 85 bytes per
#: entry of a realistic tree (L{ManifestChecker}), so 2,000,000 entries --
#: a whole Linux distribution's source tree is a tenth of that -- cost it
#: about 170 MiB before anyone is asked, which a small machine can spare;
#: more is refused up front, before a single entry arrives.
MAX_ENTRIES = 2_000_000
#: Most names a manifest stores: its entries, and the folders its paths
#: only imply (a sender may offer "a/b/c" without "a" and "a/b").  A sender
#: that offers every folder (p2pft's own) stores exactly its entries, so the
#: cap on entries is the cap on names too; it bounds what one entry costs,
#: up to L{MAX_DEPTH} new folders otherwise.
MAX_NODES = MAX_ENTRIES
#: Most bytes of names a manifest stores (each folder's name once, and the
#: offered paths of refused entries).  2,000,000 names of 32 bytes on
#: average -- real trees are nearer 15 -- fit; 2,000,000 names of 255 bytes
#: (500 MB) do not.
MAX_STORED_NAME_BYTES = 64 << 20

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
    if kind == DIR and size is not None or kind == FILE and size is not None and not is_int(size, 0, 2**63 - 1):
        raise UnsafeName("manifest entry with an invalid size")
    limit = _MAX_NS if ns else _MAX_SECONDS
    if not is_int(mode, 0, 0o7777) or mtime is not None and not is_int(mtime, -limit, limit):
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
    """
    The entries of a L{ManifestChecker}, stored compactly: each one's
    node in the L{NameTree} (its name), its size, mode and time in
    C{array} columns, and its flags; the offered paths of the refused
    entries that have no node, for messages.  L{Entry} objects are made
    on demand.
    """

    def __init__(self, tree: NameTree):
        self._tree = tree
        #: The offered paths of the refused entries that have no node, for
        #: messages: the k-th ends at C{_refused_ends[k]}; its entry's node is -2 - k.
        self._refused_paths = bytearray()
        self._refused_ends = array("q")
        self._nodes = array("i")
        self._sizes = array("q")
        self._modes = array("H")
        self._mtimes = array("q")
        self._flags = bytearray()

    def __len__(self) -> int:
        return len(self._flags)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self._flags)
        size, mtime = self._sizes[index], self._mtimes[index]
        return Entry(self.path(index), DIR if self._flags[index] & _E_DIR else FILE,
                     None if size == _NO_SIZE else size, self._modes[index], None if mtime == _NO_TIME else mtime)

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield self[i]

    def append(self, node: int, is_dir: bool, size: int | None, mode: int, mtime: int | None,
               skipped: bool) -> None:
        self._nodes.append(node)
        self._sizes.append(_NO_SIZE if size is None else size)
        self._modes.append(mode)
        self._mtimes.append(_NO_TIME if mtime is None else mtime)
        self._flags.append((_E_DIR if is_dir else 0) | (_E_SKIPPED if skipped else 0))

    def unplaced(self, path: str) -> int:
        """The node of a refused entry that has no place in the tree: its
        offered path is kept for messages (cut to L{MAX_PATH_BYTES}
        characters), and counts against the name-byte cap."""
        raw = path[:MAX_PATH_BYTES].encode("utf-8", "surrogatepass")
        self._tree.nodes.charge(len(raw))
        self._refused_paths += raw
        self._refused_ends.append(len(self._refused_paths))
        return -1 - len(self._refused_ends)

    def skipped(self, index: int) -> bool:
        return bool(self._flags[index] & _E_SKIPPED)

    def is_dir(self, index: int) -> bool:
        return bool(self._flags[index] & _E_DIR)

    def file_indices(self) -> array:
        """Indices of the file entries, skipped ones included (the sender
        sends them all)."""
        return array("l", (i for i, f in enumerate(self._flags) if not f & _E_DIR))

    def size(self, index: int) -> int | None:
        """The size of entry C{index} (None: a folder, or a stream)."""
        size = self._sizes[index]
        return None if size == _NO_SIZE else size

    def path(self, index: int) -> str:
        """The path of entry C{index}; for a refused entry that has no place
        in the tree, what was offered (cut to L{MAX_PATH_BYTES} characters:
        only for messages, which make it printable)."""
        node = self._nodes[index]
        if node >= 0:
            return self._tree.path(node)
        k, ends = -2 - node, self._refused_ends
        return self._refused_paths[ends[k - 1] if k else 0:ends[k]].decode("utf-8", "surrogatepass")

    def existing(self, lstat: Callable[[str], os.stat_result | None]) -> Iterator[tuple[Entry, os.stat_result]]:
        """Each accepted entry whose name is taken, with what C{lstat(path)}
        found there; C{lstat} is not asked about what lies below a folder
        it found missing (so an empty output folder costs one call per
        top-level name, not one per entry)."""
        parents = self._tree.nodes.parents
        missing = bytearray(len(parents))
        for index in range(len(self._flags)):
            node = self._nodes[index]
            if self._flags[index] & _E_SKIPPED:
                continue
            parent = parents[node]
            if parent >= 0 and missing[parent]:
                missing[node] = 1
                continue
            entry = self[index]
            st = lstat(entry.path)
            if st is None:
                missing[node] = 1
            else:
                yield entry, st


class ManifestChecker:
    """
    Takes entries one by one under C{rules} (L{NameRules}): refuses unsafe
    names, two entries that would land on the same name and an entry below
    a file (L{NameTree}), and more than C{max_entries}.  L{add} raises
    L{UnsafeName}; L{offer} (what a receiver uses) records a refused name
    instead, so all of them can be shown at once, or skipped.  What C{warn}
    (more rules: the sender's L{PORTABLE}) refuses on top of C{rules} is
    only counted in L{warned}.

    What it stores is capped too (L{MAX_NODES}, L{MAX_STORED_NAME_BYTES}):
    past either cap the whole offer is refused (L{UnsafeName}), whatever
    C{rules} say.

    Keeps the accepted entries (L{entries}) and the totals a summary needs,
    for accepted entries only.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES, rules: NameRules = PORTABLE,
                 warn: NameRules | None = None):
        self.rules = rules
        #: Whether L{offer}ed entries carry their times in nanoseconds (both
        #: sides announced "mtime-ns") rather than seconds.
        self.wire_ns = False
        self.files = self.dirs = self.bytes = 0
        self.streams = 0
        #: Entries refused (and so skipped if the receiver chooses), and the
        #: first L{SHOWN_NAMES} of them with the reason.
        self.refused = 0
        self.refused_names: list[str] = []
        #: Bytes of the refused files (their data still crosses the network).
        self.refused_bytes = 0
        self._max = max_entries
        self._tree = NameTree(rules, warn if warn is not None and warn != rules else None,
                              MAX_NODES, MAX_STORED_NAME_BYTES)
        self.entries = Entries(self._tree)

    @property
    def top(self) -> list[str]:
        """The first top-level names (folders with a trailing "/")."""
        return self._tree.top

    @property
    def top_count(self) -> int:
        return self._tree.top_count

    @property
    def warned(self) -> int:
        """Entries only C{warn} refuses."""
        return self._tree.warned

    @property
    def warned_names(self) -> list[str]:
        return self._tree.warned_names

    def add(self, entry: Entry) -> str:
        """Add C{entry} or raise L{UnsafeName} (nothing is recorded then);
        the path it was added under (its NFC form)."""
        return self._add(entry.path, entry.kind, entry.size, entry.mode, entry.mtime_ns, refuse=True)

    def offer(self, raw: object) -> None:
        """Add an entry as it came from the wire (C{[path, kind, size,
        mode, mtime]}): a malformed one raises L{UnsafeName}; a name that
        cannot be written is recorded in L{refused} and the entry is kept,
        skipped."""
        mtime = _check_wire(raw, self.wire_ns)
        path, kind, size, mode, _ = raw
        self._add(path, kind, size, mode, mtime, refuse=False)

    def _add(self, path: str, kind: str, size: int | None, mode: int, mtime: int | None, refuse: bool) -> str:
        if len(self.entries) >= self._max:
            raise UnsafeName(f"the offer has more than {self._max} entries")
        is_dir = kind == DIR
        path, why = path_problem(path, self.rules)
        node = -1
        if why is None:
            node, why = self._tree.place(path, is_dir)
        if why is not None:
            if refuse:
                raise UnsafeName(f"offered name {quoted(path)} {why}")
            node = self._refuse(path, why, node, 0 if is_dir or size is None else size)
        self.entries.append(node, is_dir, size, mode, mtime, skipped=why is not None)
        if why is not None:
            return path
        if is_dir:
            self.dirs += 1
        else:
            self.files += 1
            if size is None:
                self.streams += 1
            else:
                self.bytes += size
        return path

    def _refuse(self, path: str, why: str, node: int, size: int) -> int:
        """Count a refused entry; its node (L{Entries.unplaced} if it has none)."""
        self.refused += 1
        self.refused_bytes += size
        if len(self.refused_names) < SHOWN_NAMES:
            self.refused_names.append(f"{quoted(path)} {why}")
        return node if node >= 0 else self.entries.unplaced(path)

    def finish(self) -> None:
        """Checks on the whole offer, once every entry is in."""
        if not len(self.entries):
            raise UnsafeName("the offer is empty")
        if self.streams and len(self.entries) > 1:
            raise UnsafeName("a stream of unknown size can only be offered alone")


def listing(names: list[str], count: int) -> str:
    """The first names of C{count}, and how many more."""
    more = f"; and {count - len(names)} more" if count > len(names) else ""
    return "; ".join(names) + more
