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

#: One namespace for every server event, so an operator filters on it.
NAMESPACE = "p2pft.server"


@implementer(IServerEvents)
class LogEvents:
    def __init__(self, log: Logger | None = None):
        self.log = Logger(namespace=NAMESPACE) if log is None else log

    def listening(self, service: str, address: str, settings: dict) -> None:
        shown = " ".join(f"{k}={v}" for k, v in settings.items())
        self.log.info("p2pft {service} listening on {address}" + (" ({settings})" if shown else ""),
                      event="listening", service=service, address=address, settings=shown)

    def connected(self, address: str) -> None:
        pass  # counted, not logged: a line per connection is too many to leave on

    def refused(self, reason: Refusal, address: str) -> None:
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
