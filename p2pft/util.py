"""Small helpers shared by several layers."""

from __future__ import annotations

import json

from twisted.internet import defer


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
