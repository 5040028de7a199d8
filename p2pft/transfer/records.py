"""
The records of the transfer layer (what travels inside the channel's
encrypted records, L{p2pft.channel}) and the codec of their JSON control
messages.  KEEPALIVE (0) belongs to the channel and never reaches here.
"""

from __future__ import annotations

from enum import IntEnum

from ..errors import TransferFailed
from ..util import dump_object, load_object


class Kind(IntEnum):
    """The record kinds, as numbered on the wire."""

    OFFER = 1
    ACCEPT = 2
    REJECT = 3
    DATA = 4
    END = 5
    ACK = 6
    ABORT = 7
    ENTRIES = 8
    HAVE = 9
    FILE = 10
    FILE_END = 11
    TEXT = 12
    #: Several whole small files (L{p2pft.transfer.small}); 13, 15 and up
    #: belong to the session (L{p2pft.session.link}).
    FILES = 14


OFFER, ACCEPT, REJECT, DATA, END, ACK, ABORT, ENTRIES, HAVE, FILE, FILE_END, TEXT, FILES = Kind
KIND_NAMES = {kind.value: kind.name for kind in Kind}

#: Largest JSON control message accepted: a HAVE of
#: L{p2pft.transfer.resume.HASHES_PER_MESSAGE} hashes (48 KiB of hex) or an
#: ENTRIES of L{p2pft.transfer.sender.ENTRIES_BYTES} fits, with room.
MAX_CONTROL = 64 * 1024


def control(value: dict) -> bytes:
    return dump_object(value)


def parse_control(payload: bytes) -> dict:
    if len(payload) > MAX_CONTROL:
        raise TransferFailed("control message too large")
    try:
        return load_object(payload)
    except ValueError:
        raise TransferFailed("malformed control message") from None


def is_int(value: object, lo: int | None = None, hi: int | None = None) -> bool:
    """Whether C{value} is an integer (not a bool: JSON tells them apart)
    within [lo, hi] (either bound may be left out)."""
    return type(value) is int and (lo is None or lo <= value) and (hi is None or value <= hi)


def count(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """C{value} if it is an integer within [lo, hi], else a protocol error."""
    if not is_int(value, lo, hi):
        raise TransferFailed(f"protocol error: invalid {what}")
    return value
