"""
What a transfer carries: the manifest of entries (files and folders), how a
sender builds it from the paths it was given, and how a receiver checks,
entry by entry, what a possibly hostile sender offers.

An entry's path is relative, its components joined by C{/}.  The same
L{ManifestChecker} runs on both sides: the sender reports a name the
receiver would refuse before it connects, and the receiver never trusts the
sender to have checked.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from typing import Callable, Iterable

import attrs

from .errors import ScanError, UnsafeName

FILE, DIR = "file", "dir"
#: Suffix of the file a receiver keeps partial data in.  No offered name may
#: end with it, so a partial file can never be mistaken for a received one.
PARTIAL_SUFFIX = ".p2pft-partial"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 128
#: Most entries one offer may hold (the receiver keeps one small record per entry).
MAX_ENTRIES = 10_000_000
#: Top-level names kept for the receiver's summary.
SUMMARY_NAMES = 8


def printable(text: str, limit: int = 200) -> str:
    """Text safe to print on a terminal: control, format (bidi) and escape
    characters shown as \\x.. / \\u.... escapes."""
    out = []
    for ch in text[:limit]:
        if ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii") if ch != "\\" else "\\\\")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")


_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"]
)
#: Characters that may never appear in a received name: control and format
#: characters (that includes bidi overrides), surrogates, line separators.
_FORBIDDEN_CATEGORIES = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])


def safe_component(part: str, whole: str) -> str:
    """
    Check one path component offered by the peer; return it NFC-normalised.
    Raise L{UnsafeName} with a printable reason.  Refuses, on every platform,
    what would be unsafe or ambiguous on any: separators of any OS, drive
    letters, C{.} and C{..}, empty and over-long names, control and bidi
    characters, Windows device names, names ending in a dot or space, and
    names ending in L{PARTIAL_SUFFIX}.
    """
    shown = printable(whole)
    part = unicodedata.normalize("NFC", part)
    if part in ("", ".", ".."):
        raise UnsafeName(f"offered name {shown!r} has an empty, '.' or '..' component")
    if "/" in part or "\\" in part:
        raise UnsafeName(f"offered name {shown!r} contains a path separator")
    if len(part) >= 2 and part[1] == ":" and part[0].isascii() and part[0].isalpha():
        raise UnsafeName(f"offered name {shown!r} starts with a drive letter")
    if any("\udc80" <= c <= "\udcff" for c in part):
        raise UnsafeName(f"name {shown!r} is not valid UTF-8")
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in part):
        raise UnsafeName(f"offered name {shown!r} contains control or formatting characters")
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        raise UnsafeName(f"offered name {shown!r} is longer than {MAX_NAME_BYTES} bytes")
    if part[-1] in ". ":
        raise UnsafeName(f"offered name {shown!r} ends with a dot or space")
    if part.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        raise UnsafeName(f"offered name {shown!r} is a reserved device name")
    if part.lower().endswith(PARTIAL_SUFFIX):
        raise UnsafeName(f"offered name {shown!r} ends with {PARTIAL_SUFFIX}, which p2pft keeps for partial data")
    return part


def safe_path(path: object) -> str:
    """An offered relative path, checked component by component and
    NFC-normalised."""
    if not isinstance(path, str):
        raise UnsafeName("offered name is not text")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafeName(f"offered path {printable(path)!r} is longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeName(f"offered path {printable(path)!r} is nested more than {MAX_DEPTH} deep")
    return "/".join(safe_component(p, path) for p in parts)


def _fold(path: str) -> str:
    """The key two names clash on where the file system ignores case or
    Unicode normalisation (macOS, Windows)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


@attrs.frozen
class Entry:
    path: str
    kind: str
    #: None for a stream of unknown length (standard input); always None for a folder.
    size: int | None
    #: Permission bits as the sender has them; the receiver masks them (L{safe_mode}).
    mode: int = 0o644
    #: Seconds since the epoch, or None.
    mtime: int | None = None

    def wire(self) -> list:
        return [self.path, self.kind, self.size, self.mode, self.mtime]


def _int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def entry_from_wire(raw: object) -> Entry:
    if not isinstance(raw, list) or len(raw) != 5:
        raise UnsafeName("malformed manifest entry")
    path, kind, size, mode, mtime = raw
    if kind not in (FILE, DIR):
        raise UnsafeName("manifest entry of unknown kind")
    if kind == DIR and size is not None or kind == FILE and size is not None and not _int(size, 0, 2**63 - 1):
        raise UnsafeName("manifest entry with an invalid size")
    if not _int(mode, 0, 0o7777) or mtime is not None and not _int(mtime, -2**62, 2**62):
        raise UnsafeName("manifest entry with an invalid mode or time")
    return Entry(safe_path(path), kind, size, mode, mtime)


def safe_mode(entry: Entry, umask: int) -> int:
    """The mode a received entry gets: never set-id, sticky or writable by
    others; executable only if the sender's owner could execute it;
    always readable and writable by us (so a resume can write to it)."""
    if entry.kind == DIR:
        return 0o755 & ~umask | 0o700
    return (0o755 if entry.mode & 0o100 else 0o644) & ~umask | 0o600


class ManifestChecker:
    """
    Takes entries one by one, refusing (L{UnsafeName}) unsafe names, two
    entries that would land on the same name (also where case or Unicode
    form is ignored), an entry below a file, and more than C{max_entries}.
    Keeps the accepted entries and the totals a summary needs.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.entries: list[Entry] = []
        self.files = self.dirs = self.bytes = 0
        self.streams = 0
        #: First top-level names (with a trailing "/" for folders), and how many there are.
        self.top: list[str] = []
        self.top_count = 0
        self._max = max_entries
        self._taken: dict[str, str] = {}  # folded path -> FILE, DIR or "" (implied folder)

    def add(self, entry: Entry) -> Entry:
        if len(self.entries) >= self._max:
            raise UnsafeName(f"the offer has more than {self._max} entries")
        parts = entry.path.split("/")
        new_top = _fold(parts[0]) not in self._taken
        key = ""
        for part in parts[:-1]:
            key = f"{key}/{_fold(part)}" if key else _fold(part)
            if self._taken.get(key) == FILE:
                raise UnsafeName(f"{printable(entry.path)!r} is offered inside a file")
            self._taken.setdefault(key, "")
        key = f"{key}/{_fold(parts[-1])}" if key else _fold(parts[-1])
        seen = self._taken.get(key)
        if seen is not None and not (seen == "" and entry.kind == DIR):
            raise UnsafeName(
                f"{printable(entry.path)!r} is offered twice (names that differ only in case or "
                "Unicode form are the same name on many systems)")
        self._taken[key] = entry.kind
        if new_top:
            self.top_count += 1
            if len(self.top) < SUMMARY_NAMES:
                self.top.append(parts[0] + ("/" if len(parts) > 1 or entry.kind == DIR else ""))
        self.entries.append(entry)
        if entry.kind == DIR:
            self.dirs += 1
        else:
            self.files += 1
            if entry.size is None:
                self.streams += 1
            else:
                self.bytes += entry.size
        return entry

    def finish(self) -> None:
        """Checks on the whole offer, once every entry is in."""
        if not self.entries:
            raise UnsafeName("the offer is empty")
        if self.streams and len(self.entries) > 1:
            raise UnsafeName("a stream of unknown size can only be offered alone")


@attrs.frozen
class Manifest:
    """What a sender offers: the checked entries, and for each the path it
    is read from on this computer."""

    checker: ManifestChecker
    sources: list[str]

    @property
    def entries(self) -> list[Entry]:
        return self.checker.entries


def stream_manifest(name: str = "stdin") -> Manifest:
    checker = ManifestChecker()
    checker.add(Entry(name, FILE, None))
    checker.finish()
    return Manifest(checker, ["standard input"])


def scan(paths: Iterable[str], follow_symlinks: bool = False,
         notice: Callable[[str], None] = lambda text: None) -> Manifest:
    """
    Build the manifest of C{paths} (files and folders, folders recursively,
    in name order), or raise L{ScanError} for the first path that cannot be
    sent.  Symbolic links named on the command line are followed; inside
    folders they are skipped (with a C{notice}) unless C{follow_symlinks},
    and so are sockets, FIFOs and devices.
    """
    checker = ManifestChecker()
    sources: list[str] = []
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
    return Manifest(checker, sources)


def _add_tree(checker: ManifestChecker, sources: list[str], local: str, rel: str, st: os.stat_result,
              follow: bool, notice: Callable[[str], None], ancestors: set) -> None:
    def add(kind, size):
        checker.add(Entry(safe_path(rel), kind, size, stat.S_IMODE(st.st_mode), int(st.st_mtime)))
        sources.append(local)

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
