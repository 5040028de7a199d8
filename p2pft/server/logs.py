"""
The server's events (L{IServerEvents}) as log lines, through
twisted.logger: one line per event, at info level, each with the fixed
fields a log shipper can index (C{event}, then C{reason}, C{address},
C{bytes}, C{seconds}, C{why}, ...).  What a line may say is what the event
carries (see L{p2pft.server.events}): never a nameplate, code or token.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from .events import IServerEvents, Refusal
from .limits import TokenBucket

#: One namespace for every server event, so an operator filters on it.
NAMESPACE = "p2pft.server"
#: Refusal lines logged per second for one reason, after a burst of
#: REFUSAL_LOG_BURST.  One client on loopback gets refused thousands of
#: times a second; logging each would drown the pairings and relay sessions
#: an operator reads and use up journald's default rate limit (10,000 lines
#: per 30 s per service), after which journald drops every line, ours
#: included.  A real outage refuses a few clients a second.  Every refusal is
#: still counted in the metrics; the next line logged says how many were not.
REFUSAL_LOG_RATE = 5.0
REFUSAL_LOG_BURST = 20


@implementer(IServerEvents)
class LogEvents:
    """
    @param clock: for the rate of refusal lines (L{REFUSAL_LOG_RATE});
        without one, every refusal is logged.
    """

    def __init__(self, log: Logger | None = None, clock=None):
        self.log = Logger(namespace=NAMESPACE) if log is None else log
        self._clock = clock
        self._buckets: dict[Refusal, TokenBucket] = {}
        self._unlogged: dict[Refusal, int] = {}

    def listening(self, service: str, address: str, settings: dict) -> None:
        shown = " ".join(f"{k}={v}" for k, v in settings.items())
        self.log.info("p2pft {service} listening on {address}" + (" ({settings})" if shown else ""),
                      event="listening", service=service, address=address, settings=shown)

    def connected(self, address: str) -> None:
        pass  # counted, not logged: a line per connection is too many to leave on

    def refused(self, reason: Refusal, address: str) -> None:
        if self._clock is not None:
            now = self._clock.seconds()
            bucket = self._buckets.get(reason)
            if bucket is None:
                bucket = self._buckets[reason] = TokenBucket(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST, now,
                                                             level=REFUSAL_LOG_BURST)
            if bucket.refill(now) < 1:
                self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
                return
            bucket.take(1, now)
        unlogged = self._unlogged.pop(reason, 0)
        if unlogged:
            self.log.info("refused {address}: {reason} (and {unlogged} more for that reason, not logged)",
                          event="refused", reason=reason.label, address=address, unlogged=unlogged)
        else:
            self.log.info("refused {address}: {reason}", event="refused", reason=reason.label, address=address)

    def paired(self, seconds: float) -> None:
        self.log.info("paired after {seconds:.3f} s", event="paired", seconds=round(seconds, 3))

    def expired(self, paired: bool) -> None:
        self.log.info("nameplate expired ({state})", event="expired", state="paired" if paired else "waiting")

    def relaySessionStarted(self, session: int, addresses: tuple[str, str]) -> None:
        self.log.info("relay session {session} started: {a} <-> {b}", event="relay-start",
                      session=session, a=addresses[0], b=addresses[1])

    def relaySessionEnded(self, session: int, bytes: int, seconds: float, why: str) -> None:
        self.log.info("relay session {session} ended ({why}): {bytes} bytes in {seconds:.3f} s",
                      event="relay-end", session=session, bytes=bytes, seconds=round(seconds, 3), why=why)

    def peerReport(self, path: str, seconds: float) -> None:
        self.log.info("peer report: {path} after {seconds:.3f} s", event="report", path=path, seconds=seconds)
