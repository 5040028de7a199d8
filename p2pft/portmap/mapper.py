"""
The port mapper: one mapping of the punching port, asked for with every
protocol a home router may speak, held while the session lives, deleted
when it ends and at exit.

L{PortMapper.map} asks PCP first and falls back to NAT-PMP on the same
port (a NAT-PMP router answers PCP with "unsupported version", RFC 6887
section 9; one that does not answer PCP at all gets NAT-PMP after PCP's
short schedule), and asks UPnP-IGD at the same time: the first mapping
granted wins and any other one granted is deleted at once.  The whole
attempt is bounded (L{MAP_TIMEOUT}); a mapping granted later still is
deleted too.  It never fails: no mapping is C{None}, and why is logged.

A mapping lives L{LIFETIME} seconds at the router unless renewed: it is
renewed at half its lifetime while held, so a process that dies without
deleting it (SIGKILL, a power cut) leaves it for minutes, not forever
(UPnP routers that only take permanent leases are the exception; there the
delete at exit is all there is).  L{PortMapper.unmap} deletes it; so does
a reactor shutdown trigger and, for a process that exits without stopping
its reactor, an C{atexit} handler that deletes without the reactor.
"""

from __future__ import annotations

import atexit
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ..util import cancel
from .clients import IMapClient, NatPmpClient, PcpClient, UpnpClient
from .errors import PortMapError
from .gateway import default_gateway, local_address

log = Logger()

#: Seconds of lifetime asked for: short, so a mapping we could not delete
#: goes away soon by itself; renewed at half of it.
LIFETIME = 300
#: Seconds the whole attempt may take: PCP's schedule (1.75 s) then
#: NAT-PMP's would be 3.5 s on a router that drops both; the session never
#: waits for this anyway (the candidate waits far less, see
#: L{p2pft.portmap.session}).
MAP_TIMEOUT = 3.0
#: Seconds between renewal attempts once one failed, until the mapping
#: expires.
RETRY = 10.0
#: Seconds a delete may take (at session end, at shutdown).
UNMAP_TIMEOUT = 2.0
PROTOCOLS = ("pcp", "nat-pmp", "upnp")


@attrs.frozen
class Mapping:
    """A mapping held: C{external} (ip, port) reaches C{internal_port} here."""

    protocol: str
    external: tuple[str, int]
    internal_port: int
    lifetime: int
    gateway: str
    #: Seconds from asking to having it.
    seconds: float


class IPortMapper(Interface):
    mapping = Attribute("The L{Mapping} held, or None.")

    def map(internal_port: int) -> defer.Deferred:
        """Ask the router to map TCP C{internal_port}; fire with a
        L{Mapping} or None (never fails).  One mapping per mapper."""

    def unmap() -> defer.Deferred:
        """Delete the mapping held (if any), bounded in time; never fails."""


def make_clients(reactor, gateway: str, local_ip: str | None, protocols) -> list[list[IMapClient]]:
    """The clients to race: groups run side by side, the clients of a group
    one after the other (PCP, then NAT-PMP on the same port)."""
    udp = []
    if "pcp" in protocols and local_ip is not None:
        udp.append(PcpClient(reactor, gateway, local_ip))
    if "nat-pmp" in protocols:
        udp.append(NatPmpClient(reactor, gateway))
    groups = [udp] if udp else []
    if "upnp" in protocols:
        groups.append([UpnpClient(reactor, gateway)])
    return groups


#: Mappers holding a mapping, for the delete at exit.
_held: set = set()


@atexit.register
def _delete_at_exit() -> None:
    for mapper in list(_held):
        mapper.unmap_blocking()


@implementer(IPortMapper)
@attrs.define(eq=False)
class PortMapper:
    reactor: object
    protocols: tuple[str, ...] = PROTOCOLS
    lifetime: int = LIFETIME
    timeout: float = MAP_TIMEOUT
    #: () -> the gateway's address or None.
    find_gateway: Callable[[], str | None] = default_gateway
    #: gateway -> our address towards it, or None.
    find_local: Callable[[str], str | None] = local_address
    #: (reactor, gateway, local_ip, protocols) -> groups of IMapClient.
    clients: Callable = make_clients
    #: Called as on_event(action, mapping) for "mapped" and "deleted".
    on_event: Callable | None = None
    mapping: Mapping | None = None
    _client: IMapClient | None = None
    _asked: bool = False
    _renewal: object = None
    _expires: float = 0.0
    _trigger: object = None
    _unmapping: defer.Deferred | None = None
    _hopeful: set = attrs.field(factory=set)
    _hopeless: list = attrs.field(factory=list)

    @property
    def hopeful(self) -> bool:
        """Whether a mapping may still come quickly: some request is out
        to a router that answers (or may: UDP requests are not answered
        yet), rather than everything failed or searched in vain so far."""
        return bool(self._hopeful)

    def when_hopeless(self) -> defer.Deferred:
        """Fires (None) as soon as L{hopeful} is false."""
        if not self._hopeful:
            return defer.succeed(None)
        d = defer.Deferred()
        self._hopeless.append(d)
        return d

    def _hope(self, client, hopeful: bool) -> None:
        (self._hopeful.add if hopeful else self._hopeful.discard)(id(client))  # (attrs classes: unhashable)
        if not self._hopeful:
            waiting, self._hopeless = self._hopeless, []
            for d in waiting:
                d.callback(None)

    def map(self, internal_port: int) -> defer.Deferred:
        if self._asked:
            raise RuntimeError("one mapping per PortMapper")
        self._asked = True
        d = defer.ensureDeferred(self._map(internal_port))

        def failed(f):
            log.failure("port mapping", f)  # a bug: never a reason to fail the session
            return None

        return d.addErrback(failed)

    async def _map(self, internal_port: int) -> Mapping | None:
        reactor = self.reactor
        started = reactor.seconds()
        gateway = self.find_gateway()
        if gateway is None:
            log.info("port mapping: no default gateway")
            return None
        groups = self.clients(reactor, gateway, self.find_local(gateway), self.protocols)
        won = await self._race(groups, internal_port)
        for group in groups:
            for client in group:
                if won is None or client is not won[0]:
                    client.abandon()  # (UPnP: do not map after all, if not yet)
        if won is None:
            return None
        client, held = won
        if self._unmapping is not None:
            await defer.ensureDeferred(client.delete())  # the session ended meanwhile
            return None
        self._client = client
        self.mapping = Mapping(client.name, held.external, internal_port, held.lifetime, gateway,
                               max(0.0, reactor.seconds() - started))
        _held.add(self)
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self.unmap)
        self._renew_later(held.lifetime)
        log.info("port mapping: {protocol} mapped {ip}:{port} to local port {local} for {life} s "
                 "({ms:.0f} ms)", protocol=client.name, ip=held.external[0], port=held.external[1],
                 local=internal_port, life=held.lifetime, ms=self.mapping.seconds * 1000)
        self._event("mapped", self.mapping)
        return self.mapping

    def _race(self, groups, internal_port: int) -> defer.Deferred:
        """The first (client, Held) granted, or None; any later grant is
        deleted."""
        result = defer.Deferred()
        errors: list[str] = []
        winner: list[tuple] = []
        running = [len(groups)]

        async def run(group):
            for client in group:
                # Hopeful while a quick answer may come: a UDP request from
                # the start; UPnP once the router answered its search.
                if getattr(client, "quick", True):
                    self._hope(client, True)
                else:
                    client.on_found = lambda client=client: self._hope(client, True)
                try:
                    held = await defer.ensureDeferred(client.map(internal_port, self.lifetime))
                except PortMapError as e:
                    errors.append(f"{client.name}: {e}")
                    continue
                finally:
                    self._hope(client, False)
                if result.called:
                    if winner and winner[0][1].external == held.external:
                        # One router entry granted twice (miniupnpd keeps one
                        # table for all three): deleting it would delete ours.
                        log.info("port mapping: {name} granted the same mapping too", name=client.name)
                        client.forget()
                    else:
                        log.info("port mapping: {name} granted too, deleting it", name=client.name)
                        await defer.ensureDeferred(client.delete())
                else:
                    winner.append((client, held))
                    result.callback((client, held))
                return

        def ended(_):
            running[0] -= 1
            if not running[0] and not result.called:
                log.info("port mapping: none ({why})", why="; ".join(errors) or "no protocol to try")
                result.callback(None)

        for group in groups:
            d = defer.ensureDeferred(run(group))
            d.addErrback(lambda f: log.failure("port mapping", f)).addBoth(ended)
        if not groups:
            result.callback(None)
        timer = self.reactor.callLater(self.timeout, lambda: result.called or (
            log.info("port mapping: none within {t:g} s ({why})", t=self.timeout,
                     why="; ".join(errors) or "no answer"), result.callback(None)))
        return result.addBoth(lambda r: (cancel(timer), r)[1])

    # -- renewal -----------------------------------------------------------

    def _renew_later(self, lifetime: int) -> None:
        cancel(self._renewal)
        if lifetime <= 0:
            return  # permanent (UPnP): deleted by us, nothing to renew
        now = self.reactor.seconds()
        self._expires = now + lifetime
        self._renewal = self.reactor.callLater(max(1.0, lifetime / 2), self._renew)

    def _renew(self) -> None:
        client = self._client
        if client is None:
            return

        def renewed(held):
            if self._client is not client:
                return
            if self.mapping is not None and held.external != self.mapping.external:
                log.info("port mapping: the router moved it to {ip}:{port}", ip=held.external[0],
                         port=held.external[1])
            self.mapping = attrs.evolve(self.mapping, external=held.external, lifetime=held.lifetime)
            self._renew_later(held.lifetime)

        def failed(f):
            f.trap(PortMapError)
            if self._client is not client:
                return
            left = self._expires - self.reactor.seconds()
            log.info("port mapping: renewing failed ({e}); {left:.0f} s left", e=f.getErrorMessage(),
                     left=max(0, left))
            if left > RETRY:
                self._renewal = self.reactor.callLater(RETRY, self._renew)

        d = defer.ensureDeferred(client.renew()).addCallbacks(renewed, failed)
        d.addErrback(lambda f: log.failure("port mapping: renewing", f))

    # -- deleting ------------------------------------------------------------

    def _forget(self) -> tuple[IMapClient | None, Mapping | None]:
        client, mapping = self._client, self.mapping
        self._client = None
        cancel(self._renewal)
        _held.discard(self)
        return client, mapping

    def _untrigger(self, _=None) -> None:
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # (running it now)
            self._trigger = None

    def unmap(self) -> defer.Deferred:
        if self._unmapping is not None:
            return self._unmapping
        client, mapping = self._forget()
        if client is None:
            self._untrigger()
            self._unmapping = defer.succeed(None)
            return self._unmapping

        def deleted(_):
            log.info("port mapping: deleted the {protocol} mapping of {ip}:{port}",
                     protocol=mapping.protocol, ip=mapping.external[0], port=mapping.external[1])
            self.mapping = None
            self._event("deleted", mapping)

        d = defer.ensureDeferred(client.delete())
        d.addTimeout(UNMAP_TIMEOUT, self.reactor)
        d.addCallbacks(deleted, lambda f: log.info("port mapping: deleting: {e}", e=f.getErrorMessage()))
        # Until it is deleted, a reactor shutdown waits for it (the trigger
        # calls unmap(), which returns this).
        d.addBoth(self._untrigger)
        self._unmapping = d
        return d

    def unmap_blocking(self) -> None:
        """Delete without the reactor (at exit)."""
        client, mapping = self._forget()
        self._untrigger()
        if client is not None:
            self.mapping = None
            client.delete_blocking()

    def _event(self, action: str, mapping: Mapping) -> None:
        if self.on_event is not None:
            try:
                self.on_event(action, mapping)
            except Exception:
                log.failure("port mapping: reporting {action}", action=action)
