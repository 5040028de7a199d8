"""
What sender and receiver share: the channel, aborts, how a transfer ends,
and blocking work that must not outlive it.  Each side keeps its state in
its own L{enum.Enum} of strings, whose values are the names shown in
protocol errors (and compare equal to them).
"""

from __future__ import annotations

import errno
import threading
from enum import Enum
from typing import Callable

from twisted.internet import defer

from ..errors import TransferFailed
from ..util import cancel
from .manifest import printable
from .records import ABORT, KIND_NAMES, control, parse_control

#: Seconds to wait for a closing connection to flush before aborting it
#: (a final ACK or ABORT is a few dozen bytes: only a dead path takes this long).
CLOSE_TIMEOUT = 10.0


def run_now(f, *args) -> defer.Deferred:
    """The C{run_blocking} of tests: run on the spot."""
    return defer.maybeDeferred(f, *args)


def peer_text(message: str) -> str:
    """The peer's message, already escaped by the peer: make it safe again
    without escaping its escapes a second time (backslashes stay)."""
    return printable(message).replace("\\\\", "\\")


def os_error(e: OSError, what: str) -> TransferFailed:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransferFailed(f"the disk is full while writing {printable(what)}")
    return TransferFailed(f"{e.strerror or e}: {printable(what)}")


class Endpoint:
    """
    Every ending -- success or failure -- closes the channel first and
    reports only once the connection is gone (or L{CLOSE_TIMEOUT} passed), so
    a final ACK, REJECT or ABORT is never lost to a process that exits early.

    A subclass sets C{State} (an Enum with at least NEW, CLOSING, DONE and
    FAILED) and its dispatch table, C{_handlers}.
    """

    State: type[Enum]

    def __init__(self, channel, clock, progress: Callable | None, run_blocking=run_now):
        self._channel = channel
        self._clock = clock
        self._progress_cb = progress or (lambda done, total, name: None)
        self._run_blocking = run_blocking
        self._stop = threading.Event()  # tells blocking work to give up
        self.done: defer.Deferred = defer.Deferred(self._cancelled)
        self.state = self.State.NEW
        self._started = clock.seconds()
        self._outcome: object = None
        self._close_timer = None
        self._bytes_done = 0
        self._resumed = 0
        self._skipped = 0
        self._total: int | None = None

    def _elapsed(self) -> float:
        return self._clock.seconds() - self._started

    @property
    def _ending(self) -> bool:
        return self.state in (self.State.CLOSING, self.State.DONE, self.State.FAILED)

    def _progress(self, name: str) -> None:
        self._progress_cb(self._bytes_done, self._total, name)

    def _annotate(self, error: TransferFailed) -> TransferFailed:
        """Add what the user can do about a failure."""
        return error

    def _fail(self, error: TransferFailed, tell_peer: bool = True) -> None:
        if self._ending:
            return
        self._cleanup()
        if tell_peer:
            self._channel.send(ABORT, control({"message": str(error)}))
        self._close_then(self._annotate(error))

    def _close_then(self, outcome: object) -> None:
        self.state = self.State.CLOSING
        self._outcome = outcome
        self._close_timer = self._clock.callLater(CLOSE_TIMEOUT, self._channel.abort)
        self._channel.close()

    def channelLost(self, reason: str) -> None:
        if self.state is self.State.CLOSING:
            return self._settle()
        if not self._ending:
            self._cleanup()
            self._outcome = self._annotate(
                TransferFailed(f"connection lost before the transfer completed ({reason})"))
            self._settle()

    def _settle(self) -> None:
        cancel(self._close_timer)
        outcome = self._outcome
        self.state = self.State.FAILED if isinstance(outcome, Exception) else self.State.DONE
        if self.done.called:
            return
        if isinstance(outcome, Exception):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)

    def _cancelled(self, d: defer.Deferred) -> None:
        # Ctrl-C: tell the other side why.
        self._fail(TransferFailed("interrupted"))

    def _cleanup(self) -> None:
        self._stop.set()

    def _remote_abort(self, payload: bytes) -> None:
        try:
            message = str(parse_control(payload).get("message", ""))
        except TransferFailed:
            message = ""
        self._fail(TransferFailed(f"the other side stopped: {peer_text(message) or 'no reason given'}"),
                   tell_peer=False)

    def place(self, kind: int, size: int):
        """Where the next record may be opened straight into (the
        receiver's file buffer); None here."""
        return None

    def recordReceived(self, kind: int, payload: bytes) -> None:
        if self._ending:
            return
        if kind == ABORT:
            return self._remote_abort(payload)
        try:
            self._handle(kind, payload)
        except (TransferFailed, OSError) as e:
            self._failed(e)

    #: What to do with each record kind in each state: (state, kind) ->
    #: handler(self, payload).  Anything else is a protocol error.
    _handlers: dict = {}

    def _handle(self, kind: int, payload: bytes) -> None:
        handler = self._handlers.get((self.state, kind))
        if handler is None:
            raise self._unexpected(kind)
        handler(self, payload)

    def _failed(self, e: Exception) -> None:
        """Fail the transfer because of C{e}: one of ours, a disk error, or
        (from work on a thread) anything else."""
        if isinstance(e, TransferFailed):
            self._fail(e)
        elif isinstance(e, OSError):
            self._fail(os_error(e, e.filename or ""))
        elif not self._ending:  # a bug: the peer hears a line, our caller gets the bug itself
            self._fail(TransferFailed(f"unexpected {type(e).__name__}: {e}"))
            self._outcome = e

    def _later(self, work: defer.Deferred, then: Callable, hold: bool = False) -> None:
        """Continue with C{then(result)} once blocking work is done, unless
        the transfer ended meanwhile; its failure fails the transfer.
        C{hold}: hold the records that arrive meanwhile (the disk is
        behind: the sender is slowed down by TCP)."""
        held = hold and not work.called
        if held:
            self._channel.pauseReading()

        def done(result):
            if not self._ending:
                try:
                    then(result)
                except Exception as e:  # ours, a disk error, or a bug: the transfer fails, loudly
                    self._failed(e)
                else:
                    if held and not self._ending:
                        self._channel.resumeReading()

        def failed(f):
            if not self._ending:
                self._failed(f.value)

        work.addCallbacks(done, failed)

    def _unexpected(self, kind: int) -> TransferFailed:
        return TransferFailed(f"protocol error: unexpected {KIND_NAMES.get(kind, kind)} in state {self.state.value}")
