"""
A candidate connection's phase: the proof handshake of L{p2pft.secure},
under the handshake timer.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from ..secure import Handshake, SecurityError
from ..util import cancel
from .interfaces import IPhase


@implementer(IPhase)
@attrs.define(eq=False)
class CandidateHandshake:
    """
    The proof handshake on one candidate connection (L{Handshake}) and its
    timer, which runs from the connection's start (the relay's wait
    included) until the other side proved the key.  Reports
    C{authenticated()}; the follower reports C{selected(rest)} with the
    record bytes read after SELECT.  Anything wrong: C{drop(reason)}.
    """

    handshake: Handshake
    write: Callable[[bytes], object]
    drop: Callable[[str], object]
    authenticated: Callable[[], object]
    selected: Callable[[bytes], object]
    _timer: IDelayedCall | None = None

    def startTimer(self, clock: IReactorTime, timeout: float) -> None:
        self._timer = clock.callLater(timeout, self.drop, "handshake timed out")

    def cancelTimer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def hello(self) -> None:
        self.write(self.handshake.hello())

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.handshake.receive(data)
        except SecurityError as e:
            return self.drop(str(e))
        for event in events:
            if event[0] == "send":
                self.write(event[1])
            elif event[0] == "authenticated":
                self.cancelTimer()
                self.authenticated()
            elif event[0] == "selected":
                self.selected(event[1])

    def select(self) -> None:
        """Leader: commit to this connection (raises if it may not)."""
        self.write(self.handshake.select())
