"""
The sender's rate limit (C{send --rate}): one account of the data sent
against C{rate} bytes a second since sending started, that both ways of
sending consult -- a file, pulled by the transport (L{Pacer.allowance}),
and a stream, pushed by its reader (L{Pacer.hold_back}, with L{Paced}).
"""

from __future__ import annotations

from typing import Callable

from ..util import cancel

#: Seconds added to a pull sender's wait, so that it wakes up with room to
#: send rather than a hair early (a timer may fire a little early or late).
WAKE_SLACK = 0.01


class Pacer:
    """
    C{rate} bytes a second (or None: no limit) over C{elapsed()} seconds of
    sending; at most one timer waits for the rate to catch up.
    """

    def __init__(self, clock, rate: int | None, elapsed: Callable[[], float]):
        self.rate = rate
        self._clock = clock
        self._elapsed = elapsed
        self.sent = 0  # data bytes sent since sending started
        self._wakeup = None

    def count(self, n: int) -> None:
        self.sent += n

    def room(self, slack: int = 0) -> float:
        """Bytes the rate allows on top of what was sent, plus C{slack}."""
        return self.rate * self._elapsed() - self.sent + slack

    @property
    def waiting(self) -> bool:
        return self._wakeup is not None and self._wakeup.active()

    def allowance(self, most: int, slack: int, wake: Callable[[], None]) -> int:
        """Bytes a pull producer may send now: C{most}, or less to keep to
        the rate with C{slack} bytes of leeway.  With no room, C{wake} is
        called once there is (the transport only asks again after we wrote
        something)."""
        if self.rate is None:
            return most
        allowed = min(most, int(self.rate * self._elapsed()) - self.sent + slack)
        if allowed <= 0 and not self.waiting:
            self._wakeup = self._clock.callLater(-allowed / self.rate + WAKE_SLACK, wake)
        return allowed

    def hold_back(self, paced: "Paced") -> None:
        """After a push producer's data: if it is ahead of the rate, hold it
        until the rate catches up."""
        if self.rate is None or paced.early:
            return
        ahead = -self.room()
        if ahead > 0:
            paced.hold(True)
            self._wakeup = self._clock.callLater(ahead / self.rate, paced.hold, False)

    def cancel(self) -> None:
        cancel(self._wakeup)


class Paced:
    """A stream's push producer as the transport sees it: paused while the
    transport's buffer is full, or while the rate limit holds it back."""

    def __init__(self, source):
        self.source = source
        self.full = self.early = False

    def pauseProducing(self) -> None:
        self.full = True
        self._update()

    def resumeProducing(self) -> None:
        self.full = False
        self._update()

    def stopProducing(self) -> None:
        self.source.stopProducing()

    def hold(self, early: bool) -> None:
        self.early = early
        self._update()

    def _update(self) -> None:
        if self.full or self.early:
            self.source.pauseProducing()
        else:
            self.source.resumeProducing()
