"""
A short text instead of files (C{p2pft send --text ...}): its limits, its
encoding, and how it is shown.  The records that carry it are
L{p2pft.transfer.TextSender} and the receiver's TEXT branch.
"""

from __future__ import annotations

import unicodedata

from ..errors import TransferFailed
from ..util import UNSAFE_CATEGORIES

#: Feature name announced by receivers that take TEXT.
FEATURE = "text"
#: Most UTF-8 bytes one text may have: a message, a link or a password, not
#: a document (that is what sending a file is for); it fits one record and
#: one terminal screen or so.
MAX_TEXT = 64 * 1024


class TextTooLong(TransferFailed):
    """The text is over L{MAX_TEXT}."""


def encode_text(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise TransferFailed("the text is not valid UTF-8") from None
    if not data:
        raise TransferFailed("the text is empty")
    if len(data) > MAX_TEXT:
        raise TextTooLong(f"the text is {len(data)} bytes; at most {MAX_TEXT} can be sent as text "
                          "(send it as a file instead)")
    return data


def decode_text(data: bytes) -> str:
    """The received bytes as text, or L{TransferFailed}."""
    if not data or len(data) > MAX_TEXT:
        raise TransferFailed("protocol error: invalid TEXT")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TransferFailed("the other side sent text that is not valid UTF-8") from None


def displayable(text: str) -> str:
    """Text safe to write to a terminal, lines and tabs kept: every other
    control, format (bidi) or separator character shown as an escape."""
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
        elif ch == "\r":
            out.append("\\r")
        elif unicodedata.category(ch) in UNSAFE_CATEGORIES:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
