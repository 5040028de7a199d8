"""
What the user sees.  L{HumanUI} writes readable lines to stderr (stdout is
kept for machine output); L{JsonUI} adds one JSON object per line on stdout
for scripts.  Session code calls the same methods on either.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Callable

from twisted.internet import defer

from .errors import NotATerminal
from .util import printable
from .transfer.text import displayable
from .transfer import Offer, Result


def human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError


#: Most progress updates per second (bars and JSON events alike).
PROGRESS_RATE = 4
#: Characters of the current file's name on the progress bar: tqdm's
#: numbers and rate take about 45 of a terminal's 80 columns, which leaves
#: a readable bar beside this (longer names keep their tail: the file name).
BAR_NAME_WIDTH = 24


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def tail(name: str, width: int = BAR_NAME_WIDTH) -> str:
    """C{name} made printable, in exactly C{width} characters: padded, or
    cut at the front (the end of a path is the part that says which file)."""
    shown = printable(name, 4096)
    if len(shown) > width:
        shown = "\u2026" + shown[-(width - 1):]
    return shown.ljust(width)


def describe(offer: Offer) -> str:
    """An offer in one line: its top-level names (escaped), how many files
    and folders, and the size."""
    names = ", ".join(printable(name, 60) for name in offer.top)
    if offer.top_count > len(offer.top):
        names += f" and {offer.top_count - len(offer.top)} more"
    if offer.files == 1 and not offer.dirs:
        return f"{names} ({human_size(offer.size)})"
    counts = _plural(offer.files, "file") + (f" in {_plural(offer.dirs, 'folder')}" if offer.dirs else "")
    return f"{names} ({counts}, {human_size(offer.size)})"


def _route(path: str, routes: dict | None) -> str:
    """Over which path: C{direct}, C{relay}, or how the bytes split when
    both carried some; and the streams, when more than one."""
    if not routes:
        return path
    direct, relay = routes.get("bytes_direct", 0), routes.get("bytes_relay", 0)
    words = path
    if direct and relay:
        words = f"{path}; {human_size(relay)} through the relay, {human_size(direct)} direct"
    streams = routes.get("streams", 1)
    if streams > 1:
        words += f", {streams} streams"
    return words


def summary(result: Result, path: str, routes: dict | None = None) -> str:
    """The line that ends a transfer: what moved, how fast, over which
    path, and what did not need to move."""
    path = _route(path, routes)
    verb = "Received" if result.path else "Sent"
    if result.text:
        return f"{verb} a text message ({human_size(result.size)}, {path})"
    moved = result.size - result.resumed - result.skipped
    rate = moved / result.seconds / 1e6 if result.seconds > 0 else 0.0
    size = human_size(result.size)
    what = size if result.files == 1 else f"{_plural(result.files, 'file')}, {size}"
    line = f"{verb} {printable(result.name)}: {what} in {result.seconds:.2f} s ({rate:.1f} MB/s, {path})"
    notes = []
    if result.skipped:
        notes.append(f"{human_size(result.skipped)} already there and identical (checked, not sent)")
    if result.resumed:
        notes.append(f"{human_size(result.resumed)} of it already there (resumed)")
    if result.refused:
        notes.append(f"{_plural(result.refused, 'entry', 'entries')} left out (--skip-unsafe)")
    if notes:
        line += "; " + ", ".join(notes)
    return line


class ProgressBar:
    """
    A tqdm bar on C{err}, made at the first update, named by the file being
    moved (L{tail}), on our clock (C{now}).  The caller rate-limits the
    updates.
    """

    def __init__(self, err, now: Callable[[], float]):
        self._err = err
        self._now = now
        self._bar = None
        self._name = ""

    def update(self, done: int, total: int | None, name: str) -> None:
        """C{done} of C{total} bytes (None: unknown), now in file C{name}."""
        if self._bar is None:
            self._bar = self._make(done, total)
        renamed = name != self._name
        if renamed:
            self._name = name
            self._bar.set_description_str(tail(name), refresh=False)
        if not self._bar.update(done - self._bar.n) and renamed:
            self._bar.refresh()

    def _make(self, done: int, total: int | None):
        """
        A tqdm bar that starts where the transfer starts: C{initial=done},
        so a resumed transfer's rate counts only the bytes that move.  We
        rate-limit updates ourselves (L{HumanUI._due}), so tqdm must draw
        every one: with its default dynamic C{miniters} it learns from the
        first update (the resumed offset, say 1.15 GB) to wait for that many
        more bytes before drawing again, i.e. never.  The bar's clock is ours.
        """
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1000,
                   file=self._err, leave=False, dynamic_ncols=True, mininterval=0, miniters=1)
        bar._time = self._now
        bar.start_t = bar.last_print_t = self._now()
        return bar

    def close(self) -> None:
        """Take the bar off the terminal (a later update draws a new one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class HumanUI:
    """
    @param progress_bar: show a tqdm bar on stderr: True, False, or None for
        "when stderr is a terminal".
    """

    def __init__(self, server: str = "SERVER:PORT", err=None, assume_yes: bool = False, stdin=None,
                 reactor=None, progress_bar: bool | None = None, quiet: bool = False, out=None):
        self._server = server
        self._quiet = quiet
        self._err = err or sys.stderr
        self._out = out or sys.stdout
        self._stdin = stdin or sys.stdin
        self._reactor = reactor
        self.assume_yes = assume_yes
        if progress_bar is None:
            progress_bar = hasattr(self._err, "isatty") and self._err.isatty()
        self._want_bar = progress_bar
        self._bar = ProgressBar(self._err, self._now)
        self._last: dict[str, float] = {}

    def _now(self) -> float:
        if self._reactor is None:
            from twisted.internet import reactor

            return reactor.seconds()
        return self._reactor.seconds()

    def _due(self, what: str, done: int, total: int | None) -> bool:
        """Rate-limit C{what} updates, but never skip the last one (a total
        of None is a stream of unknown length)."""
        now = self._now()
        last = total is not None and done >= total
        if not last and now - self._last.get(what, float("-inf")) < 1 / PROGRESS_RATE:
            return False
        self._last[what] = now
        return True

    def _write(self, text: str) -> None:
        self._err.write(text + "\n")
        self._err.flush()

    def say(self, text: str) -> None:
        """A progress message (none with --quiet)."""
        if not self._quiet:
            self._write(text)

    def code(self, code: str, announce: bool) -> None:
        if self._quiet:
            if announce:
                self._write(code)  # all a script needs
            return
        if announce:
            self.say(f"Code: {code}")
            self.say(f"On the other computer run:  p2pft receive {self._server} {code}")
        self.say("Waiting for the other side...")

    def paired(self) -> None:
        self.say("Paired; exchanging keys...")

    def connected(self, peer: str, path: str) -> None:
        if path == "relay":
            self.say(f"Connected to {peer} successfully! (through that relay; still looking for a direct path)")
        else:
            self.say(f"Connected to {peer} successfully!")

    def path(self, path: str, peer: str, streams: int) -> None:
        """The session moved to another path, or its number of streams changed."""
        if path == "direct":
            self.say(f"Now direct to {peer}" + (f" ({streams} streams)" if streams > 1 else ""))
        else:
            self.say("Now through the relay" + (f" ({streams} streams)" if streams > 1 else ""))

    def reconnecting(self, reason: str) -> None:
        self.say(f"Connection lost ({printable(reason)}); reconnecting...")

    def reconnected(self, path: str, peer: str, after: float) -> None:
        how = f"direct to {peer}" if path == "direct" else "through the relay"
        self.say(f"Reconnected after {after:.1f} s ({how}); continuing")

    def port_mapping(self, action: str, protocol: str, external: str, seconds: float) -> None:
        """The router mapped ("mapped") or deleted ("deleted") our port;
        shown by --json and the -v log only."""

    def sending(self, offer: Offer) -> None:
        self.say(f"Sending {describe(offer)}...")

    def progress(self, done: int, total: int | None, name: str = "") -> None:
        """C{done} of C{total} bytes (None: unknown), now in file C{name}."""
        if self._want_bar and self._due("bar", done, total):
            self._bar.update(done, total, name)

    def decide(self, offer: Offer) -> defer.Deferred:
        if offer.refused:
            self.say(f"Leaving out {_plural(offer.refused, 'entry', 'entries')} whose names "
                     "cannot be written here (--skip-unsafe):")
            for line in offer.refused_names:
                self.say(f"  {line}")
            if offer.refused > len(offer.refused_names):
                self.say(f"  and {offer.refused - len(offer.refused_names)} more")
        question = f"Receive {describe(offer)}? [y/N] "
        if self.assume_yes:
            self.say(f"Receiving {describe(offer)}...")
            return defer.succeed(True)
        if not self._stdin.isatty():
            return defer.fail(NotATerminal())

        # A daemon thread, not the reactor's thread pool: a blocked readline
        # must never keep the process from exiting (Ctrl-C, the other side
        # giving up while we ask).
        answer = defer.Deferred()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor

        def ask():
            try:
                self._err.write(question)
                self._err.flush()
                line = self._stdin.readline()
            except Exception as e:  # closed terminal and the like
                # Bind now: Python deletes `e` when the except block ends.
                reactor.callFromThread(lambda error=e: answer.called or answer.errback(error))
                return
            yes = line.strip().lower() in ("y", "yes")
            reactor.callFromThread(lambda: answer.called or answer.callback(yes))

        threading.Thread(target=ask, name="p2pft-prompt", daemon=True).start()
        return answer

    def text(self, message: str) -> None:
        """A text message arrived: it goes to standard output, like a file
        to C{--output -}, with control characters escaped."""
        shown = displayable(message)
        self._out.write(shown if shown.endswith("\n") else shown + "\n")
        self._out.flush()

    def done(self, result: Result, path: str, routes: dict | None = None) -> None:
        self._bar.close()
        self.say(summary(result, path, routes))

    def error(self, message: str) -> None:
        self._bar.close()
        self._write(f"p2pft: error: {message}")


class JsonUI(HumanUI):
    """Human lines on stderr, plus JSON events on stdout."""

    def __init__(self, server: str = "SERVER:PORT", out=None, **kw):
        super().__init__(server, out=out, **kw)

    def emit(self, event: str, **fields) -> None:
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def code(self, code: str, announce: bool) -> None:
        super().code(code, announce)
        self.emit("code", code=code, nameplate=code.split("-", 1)[0])

    def paired(self) -> None:
        super().paired()
        self.emit("paired")

    def connected(self, peer: str, path: str) -> None:
        super().connected(peer, path)
        self.emit("connected", peer=peer, path=path)

    def _emit_offer(self, offer: Offer) -> None:
        fields = dict(name=offer.name, files=offer.files, folders=offer.dirs, size=offer.size,
                      top=offer.top, top_count=offer.top_count)
        if offer.refused:
            fields.update(refused=offer.refused, refused_names=list(offer.refused_names))
        self.emit("offer", **fields)

    def sending(self, offer: Offer) -> None:
        super().sending(offer)
        self._emit_offer(offer)

    def path(self, path: str, peer: str, streams: int) -> None:
        super().path(path, peer, streams)
        self.emit("path", path=path, peer=peer, streams=streams)

    def reconnecting(self, reason: str) -> None:
        super().reconnecting(reason)
        self.emit("reconnecting", reason=reason)

    def reconnected(self, path: str, peer: str, after: float) -> None:
        super().reconnected(path, peer, after)
        self.emit("reconnected", path=path, peer=peer, after=round(after, 3))

    def port_mapping(self, action: str, protocol: str, external: str, seconds: float) -> None:
        self.emit("port-mapping", action=action, protocol=protocol, external=external,
                  seconds=round(seconds, 3))

    def decide(self, offer: Offer) -> defer.Deferred:
        self._emit_offer(offer)
        return super().decide(offer)

    def progress(self, done: int, total: int | None, name: str = "") -> None:
        if self._due("json", done, total):
            self.emit("progress", bytes=done, total=total, file=name)
        super().progress(done, total, name)

    def text(self, message: str) -> None:
        self.emit("text", text=message)  # JSON escapes it; nothing raw on stdout

    def done(self, result: Result, path: str, routes: dict | None = None) -> None:
        super().done(result, path, routes)
        if result.text:
            self.emit("done", name="text", text=True, bytes=result.size, seconds=round(result.seconds, 3),
                      path=path)
            return
        fields = dict(name=result.name, files=result.files, bytes=result.size, resumed=result.resumed,
                      skipped=result.skipped, seconds=round(result.seconds, 3), path=path)
        if result.refused:
            fields["refused"] = result.refused
        if result.path:
            fields["file"] = result.path
        fields.update(routes or {})
        self.emit("done", **fields)

    def error(self, message: str) -> None:
        super().error(message)
        self.emit("error", message=message)
