"""
Small helpers shared by several layers: the JSON codec of the protocol's
messages, L{OneShot}, L{cancel} for a timer, L{printable} for text on
a terminal, and L{no_delay} for a TCP connection.

Two rate limiters remain, on purpose, because they answer different
questions: L{p2pft.server.limits.TokenBucket} is a rate with a bounded
burst (a relay session that went quiet earns at most C{depth} bytes of
head start, and a debt can be capped by C{floor}); L{p2pft.transfer.pacing.Pacer}
is one account since sending started (C{send --limit-rate} is an average:
time lost to a slow disk or a full socket is made up afterwards), and it
also owns the one timer that wakes the sender.  A bucket of infinite depth
would do the Pacer's sums, but not its timer; the rest of the Pacer is that
timer and its two ways of holding a sender back.
"""

from __future__ import annotations

import json
import unicodedata

from twisted.internet import defer

#: Unicode categories never written to a terminal as they are: controls,
#: format characters (bidi overrides), surrogates, private use, unassigned,
#: line and paragraph separators.
UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def escape(ch: str) -> str:
    """One character as the escape L{printable} shows for it."""
    return "\\\\" if ch == "\\" else ch.encode("unicode_escape").decode("ascii")


def printable(text: str, limit: int = 200) -> str:
    """At most C{limit} characters of C{text} (C{...} when cut), safe to
    print on a terminal: L{UNSAFE_CATEGORIES} shown as \\x.. / \\u....
    escapes, a backslash as two.  Show the result as it is (in quotes if
    need be), never through repr(), which would escape the backslashes a
    second time."""
    more = "..." if len(text) > limit else ""
    text = text[:limit]
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text + more
    return "".join(escape(ch) if ch == "\\" or unicodedata.category(ch) in UNSAFE_CATEGORIES else ch
                   for ch in text) + more


def cancel(call) -> None:
    """Cancel a timer (an L{IDelayedCall}, or None) unless it already ran
    or was cancelled."""
    if call is not None and call.active():
        call.cancel()


def no_delay(transport) -> None:
    """Turn Nagle's algorithm off on C{transport} (TCP_NODELAY), where it
    is a TCP transport.

    Every protocol here is a conversation of small messages, each waiting
    for the other side's answer: the rendezvous lines, the peers' HELLO,
    PROOF and SELECT, the offer and ACCEPT, END and ACK, the session's
    acknowledgements.  With Nagle's algorithm, a small write made while an
    earlier small one is unacknowledged waits for that acknowledgement,
    and Linux delays an acknowledgement by up to 40 ms when it has nothing
    to send back: measured, a 1-byte file took 120 ms longer from offer to
    done (85 ms to its first byte, 45 ms more to its ACK).  Nothing is lost
    by turning it off: Twisted joins what is written in one reactor turn
    into one send, and bulk data goes out in frames of 64 KiB and more."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, NotImplementedError, OSError):
        pass  # not TCP (tests' transports, a pipe), or already closed


def dump_object(value: dict) -> bytes:
    """Compact JSON, as every JSON message of the protocol is sent."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def load_object(data: bytes, limit: int | None = None) -> dict:
    """Parse a JSON object from the peer; ValueError for anything else
    (too long, not UTF-8, not JSON, nested past the parser's limit, not an
    object)."""
    if limit is not None and len(data) > limit:
        raise ValueError("too large")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("malformed") from None
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


class OneShot:
    """An event that happens once; each L{when} gets its own Deferred, so a
    failure nobody asked about is never reported as unhandled."""

    def __init__(self) -> None:
        self._waiting: list[defer.Deferred] = []
        self._outcome: tuple | None = None

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def when(self) -> defer.Deferred:
        if self._outcome is None:
            d = defer.Deferred()
            self._waiting.append(d)
            return d
        ok, value = self._outcome
        return defer.succeed(value) if ok else defer.fail(value)

    def _settle(self, ok: bool, value) -> None:
        if self._outcome is not None:
            return
        self._outcome = (ok, value)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(value) if ok else d.errback(value)

    def fire(self, value) -> None:
        self._settle(True, value)

    def fail(self, error: Exception) -> None:
        self._settle(False, error)
