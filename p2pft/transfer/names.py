"""
Which offered names a receiver writes, as pure functions of where the files
land (L{NameRules}): the universal rules everywhere, the Windows rules on
Windows, case clashes only where the output folder's file system ignores
case (L{p2pft.transfer.fsprobe} finds out).

Every name is NFC-normalised before it is checked or written, so two names
that differ only in Unicode form are the same name everywhere and clash on
every platform.
"""

from __future__ import annotations

import re
import sys
import unicodedata

import attrs

from ..errors import UnsafeName
from ..util import printable

#: Suffix of the file a receiver keeps partial data in.  No offered name may
#: end with it, so a partial file can never be mistaken for a received one.
PARTIAL_SUFFIX = ".p2pft-partial"
#: Longest name component: what ext4, APFS, NTFS and FAT hold (255 bytes or
#: UTF-16 units; we count UTF-8 bytes, the stricter).
MAX_NAME_BYTES = 255
#: Longest path: Linux's PATH_MAX.
MAX_PATH_BYTES = 4096
#: Deepest path: far beyond real trees, small enough for the receiver's
#: one-component-at-a-time opens.
MAX_DEPTH = 128


def quoted(text: str) -> str:
    """C{printable(text)} between single quotes, for messages."""
    return f"'{printable(text)}'"


@attrs.frozen
class NameRules:
    """Where the files land: what the receiver must refuse there."""

    #: Refuse what Windows cannot hold or gives a special meaning (device
    #: names, C{:} -- drive letters and alternate data streams --,
    #: C{<>"|?*}, a trailing dot or space).
    windows: bool = False
    #: The output folder's file system ignores case: names equal once
    #: case-folded clash.
    fold_case: bool = False

    @classmethod
    def where(cls, platform: str = sys.platform, fold_case: bool | None = None) -> "NameRules":
        """The rules for an output folder on C{platform} (a C{sys.platform}
        value) whose file system folds case or not (None: unknown, so
        assume it does)."""
        return cls(windows=platform.startswith(("win", "cygwin", "msys")),
                   fold_case=True if fold_case is None else fold_case)

    def describe(self) -> str:
        if self.windows:
            return "on Windows"
        return "in a folder that ignores case" if self.fold_case else "here"


#: The universal rules only: a Linux folder that keeps case.
POSIX = NameRules(windows=False, fold_case=False)
#: Every rule: what a receiver on any platform and file system accepts.
#: The sender warns about names outside it.
PORTABLE = NameRules(windows=True, fold_case=True)

_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"]
)
_WINDOWS_CHARS = frozenset(':<>"|?*')
#: Characters that may never appear in a received name: control and format
#: characters (that includes bidi overrides), surrogates, line separators.
_FORBIDDEN_CATEGORIES = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])
#: What the universal rules refuse in an ASCII name (the fast path).
_ASCII_BAD = re.compile(r"[\x00-\x1f\x7f\\]")


def component_problem(part: str, rules: NameRules) -> str | None:
    """Why the NFC-normalised component C{part} cannot be written under
    C{rules}, or None."""
    if part in ("", ".", ".."):
        return "has an empty, '.' or '..' component"
    if part == "~":
        return "has a component '~' (a shell reads it as a home folder)"
    if part.isascii():
        bad = _ASCII_BAD.search(part)
        if bad is not None:
            return "contains a path separator" if bad.group() == "\\" else \
                "contains control or formatting characters"
        if len(part) > MAX_NAME_BYTES:
            return f"is longer than {MAX_NAME_BYTES} bytes"
    else:
        if "\\" in part:
            return "contains a path separator"
        if any("\udc80" <= c <= "\udcff" for c in part):
            return "is not valid UTF-8"
        if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in part):
            return "contains control or formatting characters"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            return f"is longer than {MAX_NAME_BYTES} bytes"
    if part[-len(PARTIAL_SUFFIX):].lower() == PARTIAL_SUFFIX:
        return f"ends with {PARTIAL_SUFFIX}, which p2pft keeps for partial data"
    if rules.windows:
        return windows_problem(part)
    return None


def windows_problem(part: str) -> str | None:
    """Why Windows cannot hold the component C{part} (already through the
    universal rules), or None."""
    if not _WINDOWS_CHARS.isdisjoint(part):
        if len(part) >= 2 and part[1] == ":" and part[0].isascii() and part[0].isalpha():
            return "starts with a drive letter (Windows)"
        return 'contains one of : < > " | ? * (Windows)'
    if part[-1] in ". ":
        return "ends with a dot or space (Windows)"
    if part.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        return "is a reserved device name (Windows)"
    return None


def path_problem(path: str, rules: NameRules) -> tuple[str, str | None]:
    """The NFC form of the offered relative C{path} (a str), and why it
    cannot be written under C{rules} (None if it can)."""
    if not path.isascii():
        try:
            path = unicodedata.normalize("NFC", path)
        except UnicodeError:
            pass  # a lone surrogate: refused below
    if len(path) > MAX_PATH_BYTES // 4 and len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return path, f"is longer than {MAX_PATH_BYTES} bytes"
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        return path, f"is nested more than {MAX_DEPTH} deep"
    for part in parts:
        why = component_problem(part, rules)
        if why is not None:
            return path, why
    return path, None


def safe_path(path: object, rules: NameRules = PORTABLE) -> str:
    """An offered relative path, checked component by component under
    C{rules} (by default every rule of every platform) and NFC-normalised;
    L{UnsafeName} with a printable reason if it cannot be written."""
    if not isinstance(path, str):
        raise UnsafeName("offered name is not text")
    path, why = path_problem(path, rules)
    if why is not None:
        raise UnsafeName(f"offered name {quoted(path)} {why}")
    return path


def safe_component(part: str, rules: NameRules = PORTABLE) -> str:
    """One offered path component, checked and NFC-normalised."""
    part = unicodedata.normalize("NFC", part)
    why = component_problem(part, rules)
    if why is not None:
        raise UnsafeName(f"offered name {quoted(part)} {why}")
    return part


def fold(name: str) -> str:
    """The key two NFC names clash on where the file system ignores case
    (macOS, Windows, a case-insensitive mount)."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", name.casefold())
