"""
Where twisted.logger's events go when p2pft runs as a console script (the
twistd plugins leave that to twistd): one observer on stderr, as text or
as JSON lines, started once by L{start} for C{p2pft server}, C{p2pft
relay}, and the peers' C{-v} / C{P2PFT_DEBUG}.

JSON lines (C{--log-format json}, or C{twistd --logger
p2pft.logs.stderr_json}) are one object per line, for log shippers:
C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{text} (the line the
text format would show, without its time and namespace), then the event's
own fields that are plain values (C{event}, C{reason}, C{address},
C{bytes}, ...), and C{traceback} for a logged failure.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
)
from zope.interface import implementer

FORMATS = ("text", "json")

_PLAIN = (str, int, float, bool, type(None))


def event_as_json(event: dict) -> str:
    """One event as one line of JSON (no newline inside)."""
    stamp = event.get("log_time")
    out = {
        "time": datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds")
        if isinstance(stamp, (int, float)) else None,
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in out and key != "format" and isinstance(value, _PLAIN):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot even describe itself
            out["traceback"] = repr(failure)
    return json.dumps(out, ensure_ascii=True, allow_nan=False, default=str)


@implementer(ILogObserver)
class TextLinesObserver:
    """
    Each event of C{level} and above as Twisted's classic text line
    (C{TIME [NAMESPACE#LEVEL] TEXT}, as twistd writes), flushed.

    Cheaper than textFileLogObserver behind a FilteringLogObserver (a busy
    server logs a line per pairing, thousands a second): the level is one
    comparison, and the time is formatted once per second.
    """

    def __init__(self, out, level: LogLevel = LogLevel.debug):
        self._out = out
        self._level = level
        self._second = None
        self._stamp = ""

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < self._level:
            return
        if "log_failure" in event:
            line = formatEventAsClassicLogText(event)  # with its traceback
        else:
            when = event.get("log_time")
            second = int(when) if isinstance(when, (int, float)) else None
            if second != self._second:
                self._second, self._stamp = second, formatTime(when)
            system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level.name}"
            text = formatEvent(event).replace("\n", "\n\t")
            line = f"{self._stamp} [{system}] {text}\n"
        self._out.write(line)
        self._out.flush()


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event of C{level} and above to C{out} as one JSON line
    and flushes it."""

    def __init__(self, out, level: LogLevel = LogLevel.debug):
        self._out = out
        self._level = level

    def __call__(self, event: dict) -> None:
        if event.get("log_level", LogLevel.info) < self._level:
            return
        try:
            line = event_as_json(event)
        except ValueError:  # NaN or infinity in a field
            line = json.dumps({"level": "error", "text": "unloggable event " + repr(formatEvent(event))})
        self._out.write(line + "\n")
        self._out.flush()


def observer(fmt: str = "text", out=None, level: LogLevel = LogLevel.debug) -> ILogObserver:
    """An observer on C{out} (stderr) in C{fmt}, showing C{level} and above."""
    out = sys.stderr if out is None else out
    return (JsonLinesObserver if fmt == "json" else TextLinesObserver)(out, level)


def stderr_json() -> ILogObserver:
    """For C{twistd --logger p2pft.logs.stderr_json}: JSON lines on stderr."""
    return observer("json", sys.stderr, LogLevel.info)


def start(fmt: str = "text", out=None, level: LogLevel = LogLevel.debug, beginner=None) -> None:
    """Start the process's logging: one observer, once (twistd does this
    itself for the plugins, so they never call it)."""
    (beginner or globalLogBeginner).beginLoggingTo(
        [observer(fmt, out, level)], redirectStandardIO=False)
