"""
What an offer is and how a receiver reads one: OFFER announces the number of
entries, ENTRIES messages carry them, each checked (L{ManifestChecker}) under
the receiver's name rules; the L{Offer} shown to the user is computed from
the checked entries, not taken from the sender's word.  And the L{Result} of
a transfer, on either side.
"""

from __future__ import annotations

from typing import Callable, Iterator

import attrs

from ..errors import Declined, TransferFailed, UnsafeName
from .manifest import MAX_ENTRIES, Entries, ManifestChecker, NameRules, listing
from .records import count, is_int

#: Target size of one ENTRIES message (well under L{MAX_CONTROL}).
ENTRIES_BYTES = 32 * 1024


@attrs.frozen
class Offer:
    """What the receiver is asked to accept (computed by the receiver from
    the checked entries, not taken from the sender's word)."""

    files: int
    dirs: int
    #: None for a stream of unknown length (standard input).
    size: int | None
    #: The first top-level names, folders with a trailing "/".
    top: list[str]
    top_count: int
    #: Entries whose names cannot be written here, left out (C{skip_unsafe}),
    #: and the first of them with the reason (printable).
    refused: int = 0
    refused_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A short name for the whole offer."""
        if self.top_count == 1:
            return self.top[0].rstrip("/")
        return f"{self.top_count} items"

    @classmethod
    def of(cls, checker: ManifestChecker) -> "Offer":
        return cls(checker.files, checker.dirs, None if checker.streams else checker.bytes,
                   list(checker.top), checker.top_count, checker.refused, tuple(checker.refused_names))


@attrs.frozen
class Result:
    name: str
    size: int
    seconds: float
    #: Where the receiver put it (one file or folder), or None on the sender.
    path: str | None = None
    files: int = 1
    #: Bytes of partial data kept from an earlier attempt and continued, not sent again.
    resumed: int = 0
    #: Bytes of files already complete and identical at the receiver, checked and not sent again.
    skipped: int = 0
    #: Entries the receiver left out because their names cannot be written
    #: there (C{skip_unsafe}); their data crossed the network and was dropped.
    #: Always 0 on the sender, which cannot know.
    refused: int = 0
    #: A text message (C{send --text}), not files.
    text: bool = False


def entry_batches(entries: Entries, start: int, ns: bool) -> Iterator[tuple[int, dict]]:
    """The ENTRIES messages of C{entries} from C{start} on, each about
    L{ENTRIES_BYTES}, each with the index of the entry that follows it.
    C{ns}: times in nanoseconds (both sides announced "mtime-ns")."""
    index = start
    while index < len(entries):
        batch, size = [], 0
        while index < len(entries) and size < ENTRIES_BYTES:
            wire = entries[index].wire(ns)
            batch.append(wire)
            size += len(wire[0]) * 3 + 48
            index += 1
        yield index, {"entries": batch}


class OfferReader:
    """
    The receiver's side of OFFER and ENTRIES: the announced number of
    entries (at most L{MAX_ENTRIES}, refused before a single entry arrives),
    then each entry into a L{ManifestChecker} under C{rules()} (asked once
    the announced number is known to be sane).  C{ns}: entries carry times
    in nanoseconds.
    """

    def __init__(self, offer: dict, rules: Callable[[], NameRules], ns: bool):
        entries = offer.get("entries")
        if is_int(entries) and entries > MAX_ENTRIES:
            raise Declined(f"the offer has {entries:,} entries; p2pft takes at most {MAX_ENTRIES:,} "
                           "in one transfer: send the folders separately")
        self.expected = count(entries, "number of entries", 1, MAX_ENTRIES)
        self.checker = ManifestChecker(self.expected, rules())
        self.checker.wire_ns = ns

    def take(self, message: dict) -> bool:
        """Check the entries of one ENTRIES message; whether they were the last."""
        raw = message.get("entries")
        entries = self.checker.entries
        if not isinstance(raw, list) or len(entries) + len(raw) > self.expected:
            raise TransferFailed("protocol error: invalid ENTRIES")
        offer = self.checker.offer
        for item in raw:
            offer(item)
        return len(entries) == self.expected

    def finish(self, skip_unsafe: bool | None) -> ManifestChecker:
        """Checks on the whole offer; names that cannot be written here
        refuse it unless C{skip_unsafe} (and there is something else)."""
        checker = self.checker
        checker.finish()
        if checker.refused and (not skip_unsafe or checker.refused == len(checker.entries)):
            n = checker.refused
            hint = "; receive with --skip-unsafe to leave them out and take the rest" \
                if skip_unsafe is False and n < len(checker.entries) else ""
            raise UnsafeName(f"{n} offered name{'s' if n != 1 else ''} cannot be written "
                             f"{checker.rules.describe()}: {listing(checker.refused_names, n)}{hint}")
        return checker
