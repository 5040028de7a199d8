"""
What a transfer carries: the manifest of entries (files and folders), how a
sender builds it from the paths it was given, and how a receiver checks,
entry by entry, what a possibly hostile sender offers.

An entry's path is relative, its components joined by C{/}.  The same
L{ManifestChecker} runs on both sides, under the L{NameRules} of where the
files land: the receiver's own (its platform, and whether its output folder
ignores case), the sender's with every rule of every platform as warnings.

A manifest is kept compact, because a sender may offer millions of entries
and the receiver holds all of them before anyone is asked: each distinct
name is stored once, as UTF-8 in one bytearray, with the index of its
folder; sizes, modes and times live in C{array} columns; L{Entry} objects
are made on demand.  About 60 bytes per entry instead of several hundred.
"""

from __future__ import annotations

import os
import stat
from array import array
from typing import Callable, Iterable, Iterator, Sequence

import attrs

from ..errors import ScanError, UnsafeName
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

__all__ = ["FILE", "DIR", "MAX_ENTRIES", "MAX_DEPTH", "MAX_NAME_BYTES", "MAX_PATH_BYTES", "PARTIAL_SUFFIX",
           "PORTABLE", "POSIX", "NameRules", "Entry", "Entries", "ManifestChecker", "Manifest", "printable",
           "quoted", "safe_component", "safe_path", "safe_mode", "entry_from_wire", "scan", "stream_manifest"]

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
_IMPLIED, _FILE, _DIR = 0, 1, 2
_SKIPPED = 4  # node flag: a refused folder (what is below it is refused too)
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


class _Slots:
    """An open-addressing hash index of ids whose keys and 64-bit hashes the
    owner keeps: 4 bytes per slot, at most half full."""

    def __init__(self):
        self.slots = array("i", [-1]) * 16
        self.mask = 15
        self.used = 0

    def grow(self, hashes: array) -> None:
        if 2 * (self.used + 1) <= len(self.slots):
            return
        size = len(self.slots) * 2
        slots, mask = array("i", [-1]) * size, size - 1
        for ident in self.slots:
            if ident >= 0:
                i = hashes[ident] & mask
                while slots[i] >= 0:
                    i = (i + 1) & mask
                slots[i] = ident
        self.slots, self.mask = slots, mask


class _Tree:
    """
    Every distinct name of a manifest, once: node C{n} is C{names[ends[n-1]:
    ends[n]]} (UTF-8) inside folder node C{parents[n]} (-1: the top), with
    its kind (implied folder, file, folder) and flags.  When the folder
    ignores case, nodes that fold to the same name share a I{group}: that is
    where clashes and "inside a file" are decided.
    """

    def __init__(self, folding: bool):
        self.parents = array("i")
        self.ends = array("q")
        self.names = bytearray()
        self.kinds = bytearray()
        self.hashes = array("q")
        self._index = _Slots()
        self.folding = folding
        if folding:
            self.node_group = array("i")
            self.g_rep = array("i")  # the group's first node, whose name it folds
            self.g_parent = array("i")
            self.g_kind = bytearray()
            self.g_hashes = array("q")
            self._g_index = _Slots()
        self._paths: dict[int, str] = {}  # a few folder paths, for path()

    def name(self, node: int) -> str:
        return self.names[self.ends[node - 1] if node else 0:self.ends[node]].decode("utf-8", "surrogatepass")

    def find(self, parent: int, raw: bytes, h: int) -> tuple[int, int]:
        """The node of C{raw} in C{parent}, or -1; and the slot it is or goes in."""
        slots, mask, hashes = self._index.slots, self._index.mask, self.hashes
        i = h & mask
        while True:
            node = slots[i]
            if node < 0:
                return -1, i
            if hashes[node] == h and self.parents[node] == parent and \
                    self.names[self.ends[node - 1] if node else 0:self.ends[node]] == raw:
                return node, i
            i = (i + 1) & mask

    def add(self, parent: int, raw: bytes, h: int, kind: int) -> int:
        self._index.grow(self.hashes)
        node = len(self.parents)
        _, slot = self.find(parent, raw, h)
        self._index.slots[slot] = node
        self._index.used += 1
        self.parents.append(parent)
        self.names += raw
        self.ends.append(len(self.names))
        self.kinds.append(kind | (self.kinds[parent] & _SKIPPED if parent >= 0 else 0))
        self.hashes.append(h)
        return node

    def find_group(self, parent: int, folded: str, h: int) -> tuple[int, int]:
        slots, mask = self._g_index.slots, self._g_index.mask
        i = h & mask
        while True:
            group = slots[i]
            if group < 0:
                return -1, i
            if self.g_hashes[group] == h and self.g_parent[group] == parent and \
                    fold(self.name(self.g_rep[group])) == folded:
                return group, i
            i = (i + 1) & mask

    def add_group(self, parent: int, folded: str, h: int, rep: int, kind: int) -> int:
        self._g_index.grow(self.g_hashes)
        group = len(self.g_rep)
        _, slot = self.find_group(parent, folded, h)
        self._g_index.slots[slot] = group
        self._g_index.used += 1
        self.g_rep.append(rep)
        self.g_parent.append(parent)
        self.g_kind.append(kind)
        self.g_hashes.append(h)
        return group

    def path(self, node: int) -> str:
        """The full path of C{node}."""
        parent = self.parents[node]
        if parent < 0:
            return self.name(node)
        above = self._paths.get(parent)
        if above is None:
            above = self.path(parent)
            if len(self._paths) >= 64:
                self._paths.clear()
            self._paths[parent] = above
        return f"{above}/{self.name(node)}"


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


class _Sources(Sequence):
    """Where a scanned manifest's entries are read from: the folder of the
    command-line path each came from, joined to the entry's path, except
    where the name on disk is not the entry's (not in NFC form)."""

    def __init__(self, entries: Entries):
        self._entries = entries
        self.bases: list[str] = []
        self.base_of = array("i")
        self.other: dict[int, str] = {}

    def append(self, local: str, rel: str, path: str) -> None:
        index = len(self.base_of)
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
        return self.bases[self.base_of[index]] + self._entries[index].path


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


def listing(names: list[str], count: int) -> str:
    """The first names of C{count}, and how many more."""
    more = f"; and {count - len(names)} more" if count > len(names) else ""
    return "; ".join(names) + more


def warning(checker: ManifestChecker) -> str:
    """The sender's notice about names some receivers refuse."""
    n = checker.warned
    return (f"{n} name{'s' if n != 1 else ''} would be refused by a receiver on Windows or in a folder "
            f"that ignores case (it can leave them out with --skip-unsafe): "
            f"{listing(checker.warned_names, n)}")


def _add_tree(checker: ManifestChecker, sources: _Sources, local: str, rel: str, st: os.stat_result,
              follow: bool, notice: Callable[[str], None], ancestors: set) -> None:
    def add(kind, size):
        path = safe_path(rel, checker.rules)
        checker.add(Entry(path, kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
        sources.append(local, rel, path)
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
