"""
What the user sees.  L{HumanUI} writes readable lines to stderr (stdout is
kept for machine output); L{JsonUI} adds one JSON object per line on stdout
for scripts.  Session code calls the same methods on either.
"""

from __future__ import annotations

import json
import sys
import threading

from twisted.internet import defer

from .transfer import Offer, Result, printable


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


class HumanUI:
    """
    @param progress_bar: show a tqdm bar on stderr: True, False, or None for
        "when stderr is a terminal".
    """

    def __init__(self, server: str = "SERVER:PORT", err=None, assume_yes: bool = False, stdin=None,
                 reactor=None, progress_bar: bool | None = None):
        self._server = server
        self._err = err or sys.stderr
        self._stdin = stdin or sys.stdin
        self._reactor = reactor
        self.assume_yes = assume_yes
        if progress_bar is None:
            progress_bar = hasattr(self._err, "isatty") and self._err.isatty()
        self._want_bar = progress_bar
        self._bar = None
        self._name = ""
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

    def say(self, text: str) -> None:
        self._err.write(text + "\n")
        self._err.flush()

    def code(self, code: str, announce: bool) -> None:
        if announce:
            self.say(f"Code: {code}")
            self.say(f"On the other computer run:  p2pft receive {self._server} {code}")
        self.say("Waiting for the other side...")

    def paired(self) -> None:
        self.say("Paired; exchanging keys...")

    def connected(self, peer: str, path: str) -> None:
        if path == "relay":
            self.say(f"Connected to {peer} successfully! (through that relay: no direct path)")
        else:
            self.say(f"Connected to {peer} successfully!")

    def sending(self, name: str, size: int) -> None:
        self._name = name
        self.say(f"Sending {printable(name)} ({human_size(size)})...")

    def progress(self, done: int, total: int) -> None:
        if not self._want_bar or not self._due("bar", done, total):
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                             desc=printable(self._name, 40), file=self._err, leave=False,
                             dynamic_ncols=True, mininterval=0)
        self._bar.update(done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def decide(self, offer: Offer) -> defer.Deferred:
        self._name = offer.name
        question = f"Receive {printable(offer.name)} ({human_size(offer.size)})? [y/N] "
        if self.assume_yes:
            self.say(f"Receiving {printable(offer.name)} ({human_size(offer.size)})...")
            return defer.succeed(True)
        if not self._stdin.isatty():
            return defer.fail(RuntimeError("cannot ask whether to accept: standard input is not a terminal (use --yes)"))

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

    def done(self, result: Result, path: str) -> None:
        self._close_bar()
        rate = result.size / result.seconds / 1e6 if result.seconds > 0 else 0.0
        verb = "Received" if result.path else "Sent"
        self.say(
            f"{verb} {printable(result.name)}: {result.size} bytes in {result.seconds:.2f} s "
            f"({rate:.1f} MB/s, {path}), sha256 {result.sha256}"
        )

    def error(self, message: str) -> None:
        self._close_bar()
        self.say(f"p2pft: error: {message}")


class JsonUI(HumanUI):
    """Human lines on stderr, plus JSON events on stdout."""

    def __init__(self, server: str = "SERVER:PORT", out=None, **kw):
        super().__init__(server, **kw)
        self._out = out or sys.stdout

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

    def sending(self, name: str, size: int) -> None:
        super().sending(name, size)
        self.emit("offer", name=name, size=size)

    def decide(self, offer: Offer) -> defer.Deferred:
        self.emit("offer", name=offer.name, size=offer.size)
        return super().decide(offer)

    def progress(self, done: int, total: int) -> None:
        if self._due("json", done, total):
            self.emit("progress", bytes=done, total=total)
        super().progress(done, total)

    def done(self, result: Result, path: str) -> None:
        super().done(result, path)
        fields = dict(name=result.name, bytes=result.size, sha256=result.sha256,
                      seconds=round(result.seconds, 3), path=path)
        if result.path:
            fields["file"] = result.path
        self.emit("done", **fields)

    def error(self, message: str) -> None:
        super().error(message)
        self.emit("error", message=message)
