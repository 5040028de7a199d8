"""
The compact storage of a manifest's names (L{p2pft.transfer.manifest}):
each distinct name once, as UTF-8 in one bytearray, with the index of its
folder, found again through an open-addressing hash index; where the folder
ignores case, the names that fold alike share a group.
"""

from __future__ import annotations

from array import array

from .names import fold

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
