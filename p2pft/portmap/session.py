"""
The port mapping of one session (what L{p2pft.connect} calls): asked for
as soon as the rendezvous server has welcomed us (the punching port is the
rendezvous connection's local port, known from then on), offered as one
more candidate when our candidates are sent, deleted when the session
ends.

Candidates go to the other side once, sealed, right after key
confirmation, and punching starts as soon as both sides have them.  By
then the mapping has had the pairing and two rounds of key exchange
through the server to arrive (a router on the LAN answers PCP or NAT-PMP
in a millisecond or two; UPnP, searched for with our own SSDP M-SEARCH,
in tens of milliseconds: 73 ms in the lab); if it is still on its way, the
candidates wait for it until L{CANDIDATE_WAIT} seconds after it was asked
for, then go without it; and not at all once nothing is on its way (PCP
and NAT-PMP refused or failed, no answer to the UPnP search yet:
L{PortMapper.hopeful}).  That bound assumes a router that answers at all
answers within a few hundred milliseconds, as a LAN router does, and costs
nothing to a side that waited for its partner longer than that (the one
that got its code first); the other side's candidates go at most that long
after its WELCOME, and without any router that maps, as soon as PCP and
NAT-PMP have failed (at once, on a router that answers port unreachable)
and no answer to the UPnP search has come.  A mapping that arrives later
is deleted at once (nobody was told about it).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from ..addresses import is_loopback
from ..util import cancel
from .mapper import PortMapper

log = Logger()

#: Most seconds after asking that the candidates wait for the mapping.
CANDIDATE_WAIT = 0.4


class SessionMapping:
    """One session's mapping (or none: port mapping off, a loopback or IPv6
    rendezvous, no router that maps)."""

    def __init__(self, reactor, mapper=None, pending: defer.Deferred | None = None):
        self._reactor = reactor
        self._mapper = mapper
        self._pending = pending
        self._sent = False
        self._asked_at = reactor.seconds()

    @classmethod
    def start(cls, reactor, client, enabled: bool = True, ui=None, make_mapper=PortMapper) -> "SessionMapping":
        """Start asking for a mapping of C{client}'s (the rendezvous
        connection's) local port, unless C{enabled} is false or the server
        is on loopback (both peers on this host: nothing to map, and no
        router to bother) or reached over IPv6 (no NAT to map through)."""
        server_host = client.transport.getPeer().host
        if not enabled or is_loopback(server_host) or ":" in server_host:
            return cls(reactor)
        mapper = make_mapper(reactor, on_event=_reporter(ui))
        return cls(reactor, mapper, mapper.map(client.transport.getHost().port))

    async def candidates(self, wait: float = CANDIDATE_WAIT) -> list[list]:
        """The mapped address as a candidate ([[ip, port]]), or []: waits
        for a mapping still on its way until C{wait} seconds after it was
        asked for."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        waited = defer.Deferred()
        left = max(0.0, self._asked_at + wait - self._reactor.seconds())
        timer = self._reactor.callLater(left, lambda: waited.called or waited.callback(None))

        def arrived(mapping):
            if not waited.called:
                waited.callback(mapping)
            return mapping

        pending.addBoth(arrived)
        hopeless = getattr(self._mapper, "when_hopeless", None)
        if hopeless is not None and not pending.called:
            # Nothing is on its way any more (the requests failed, no
            # router answered the UPnP search): go now.
            hopeless().addCallback(lambda _: waited.called or waited.callback(None))
        mapping = await waited
        cancel(timer)
        if mapping is None and not pending.called:
            log.info("port mapping: not there after {ms:.0f} ms; the candidates go without it",
                     ms=wait * 1000)
            pending.addCallback(lambda _: self.end())  # too late: nobody knows of it
            return []
        self._sent = mapping is not None
        return [[mapping.external[0], mapping.external[1]]] if mapping is not None else []

    def until(self, closed: defer.Deferred) -> None:
        """Delete the mapping when C{closed} (the session's link) fires."""
        closed.addBoth(lambda result: (self.end(), result)[1])

    def end(self) -> defer.Deferred:
        if self._mapper is None:
            return defer.succeed(None)
        return self._mapper.unmap()


def _reporter(ui):
    """UI events for a mapping made and deleted (C{--json}: "port-mapping")."""
    report = getattr(ui, "port_mapping", None)
    if report is None:
        return None
    return lambda action, mapping: report(action, mapping.protocol, f"{mapping.external[0]}:{mapping.external[1]}",
                                          mapping.seconds)
