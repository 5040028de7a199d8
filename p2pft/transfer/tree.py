"""
The names of a manifest (L{p2pft.transfer.manifest}): L{NameTree} places
each offered path among the others and decides its clashes (offered twice,
inside a file, the same name where case is ignored), on top of L{_Tree},
their compact storage: each distinct name once, as UTF-8 in one bytearray,
with the index of its folder, found again through an open-addressing hash
index; where the folder ignores case, the names that fold alike share a
group.

What is stored is capped, not only the number of entries: a folder implied
by a deeper path is a node too, so one entry may add up to
L{p2pft.transfer.names.MAX_DEPTH} of them.  C{max_nodes} and C{max_bytes}
(the manifest's L{MAX_NODES}, L{MAX_STORED_NAME_BYTES}) bound the nodes and
the name bytes kept; past either, the whole offer is refused.
"""

from __future__ import annotations

from array import array

from ..errors import UnsafeName
from .names import NameRules, fold, quoted, windows_problem

_IMPLIED, _FILE, _DIR = 0, 1, 2
_SKIPPED = 4  # node flag: a refused folder (what is below it is refused too)


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

    def __init__(self, folding: bool, max_nodes: int, max_bytes: int):
        self.max_nodes = max_nodes
        self.max_bytes = max_bytes
        #: Name bytes kept: the names, and what the owner L{charge}s for.
        self.stored = 0
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

    def charge(self, size: int) -> None:
        """Count C{size} more name bytes kept, or refuse the offer."""
        if self.stored + size > self.max_bytes:
            cap = f"{self.max_bytes >> 20} MiB" if self.max_bytes % (1 << 20) == 0 else f"{self.max_bytes:,} bytes"
            raise UnsafeName(f"the offer's names take more than {cap} "
                             "(p2pft keeps them all before anyone is asked): send the folders separately")
        self.stored += size

    def add(self, parent: int, raw: bytes, h: int, kind: int) -> int:
        node = len(self.parents)
        if node >= self.max_nodes:
            raise UnsafeName(f"the offer names more than {self.max_nodes:,} files and folders, counting "
                             "the folders its paths only imply: send the folders separately")
        self.charge(len(raw))
        self._index.grow(self.hashes)
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

    def fold_group(self, parent: int, name: str) -> tuple[int, str, int, int]:
        """Where C{name} below node C{parent} stands among names that fold
        alike: (the parent's group, the folded name, its hash, the group
        it joins or -1)."""
        folded = fold(name)
        pgroup = self.node_group[parent] if parent >= 0 else -1
        gh = hash((pgroup, folded))
        group, _ = self.find_group(pgroup, folded, gh)
        return pgroup, folded, gh, group

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


#: Top-level names kept for the receiver's summary.
SUMMARY_NAMES = 8
#: Names only the warning rules refuse, kept to show; the rest are only counted.
SHOWN_NAMES = 20


class NameTree:
    """
    Places offered paths (NFC, already checked one by one) under C{rules}:
    refuses two that would land on the same name (where the folder ignores
    case, names equal once case-folded are the same) and a path below a
    file.  What C{warn} (more rules: the sender's) refuses on top of
    C{rules} is only counted in L{warned}.  Keeps the first top-level names
    for the summary (L{top}, L{top_count}).
    """

    def __init__(self, rules: NameRules, warn: NameRules | None, max_nodes: int, max_bytes: int):
        self.rules = rules
        self.warn = warn
        folding = rules.fold_case or warn is not None and warn.fold_case
        self.nodes = _Tree(folding, max_nodes, max_bytes)
        #: First top-level names (with a trailing "/" for folders), and how many there are.
        self.top: list[str] = []
        self.top_count = 0
        #: Entries only C{warn} refuses, and the first of them.
        self.warned = 0
        self.warned_names: list[str] = []
        self._last: tuple[str, int] = ("", -1)  # the last folder looked up, and its node

    def path(self, node: int) -> str:
        return self.nodes.path(node)

    def _warn(self, path: str, why: str) -> None:
        self.warned += 1
        if len(self.warned_names) < SHOWN_NAMES:
            self.warned_names.append(f"{quoted(path)} {why}")

    def _top(self, group: int, node: int, shown: str) -> None:
        tree = self.nodes
        if not tree.folding or tree.g_rep[group] == node:
            self.top_count += 1
            if len(self.top) < SUMMARY_NAMES:
                self.top.append(shown)

    def place(self, path: str, is_dir: bool) -> tuple[int, str | None]:
        """Put the NFC C{path} in the tree; its node, or why it clashes."""
        tree = self.nodes
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
        group, fold_key = -1, None
        if tree.folding:
            fold_key = tree.fold_group(parent, leaf)
            group = fold_key[3]
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
            node, group = self._new(parent, raw, h, kind, fold_key, leaf + ("/" if is_dir else ""))
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
        tree = self.nodes
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
            fold_key = None
            if tree.folding:
                fold_key = tree.fold_group(parent, part)
                group = fold_key[3]
                if group >= 0 and tree.g_kind[group] == _FILE and self.rules.fold_case:
                    return -1, "is offered inside a file"
            parent, _ = self._new(parent, raw, h, _IMPLIED, fold_key, part + "/")
        return parent, None

    def _new(self, parent: int, raw: bytes, h: int, kind: int, fold_key, shown: str) -> tuple[int, int]:
        """A new node for C{raw} below C{parent}: its fold group joined, or
        made (C{fold_key} from L{_Tree.fold_group}; None where nothing
        folds), and counted as a top-level name if it is one.  Returns the
        node and its group (-1 where nothing folds)."""
        tree = self.nodes
        node = tree.add(parent, raw, h, kind)
        group = -1
        if fold_key is not None:
            pgroup, folded, gh, group = fold_key
            if group < 0:
                group = tree.add_group(pgroup, folded, gh, node, kind)
            tree.node_group.append(group)
        if parent < 0:
            self._top(group, node, shown)
        return node, group
