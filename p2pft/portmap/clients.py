"""
One client per protocol, each holding (at most) one mapping of one TCP
port: L{PcpClient} and L{NatPmpClient} over our own UDP exchange,
L{UpnpClient} through the C{miniupnpc} module on a thread.  Each can map,
renew, delete from the reactor, and delete without it
(L{IMapClient.delete_blocking}: at process exit, when the reactor is gone).
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import attrs
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from . import natpmp, pcp
from .errors import PortMapError
from .udp import QUICK, Retransmit, exchange

log = Logger()

#: What a mapping is called in a router's table (UPnP shows it).
DESCRIPTION = "p2pft"
#: Seconds a blocking delete at exit waits for the router's answer.
EXIT_WAIT = 0.3


@attrs.frozen
class Held:
    """A mapping the router granted: its external address and lifetime."""

    external: tuple[str, int]
    lifetime: int


class IMapClient(Interface):
    name = Attribute("The protocol: 'pcp', 'nat-pmp' or 'upnp'.")

    def map(internal_port: int, lifetime: int) -> defer.Deferred:
        """Ask for a mapping of TCP C{internal_port}; fire with a L{Held}."""

    def renew() -> defer.Deferred:
        """Ask again for the mapping held (the same external port); fire
        with the new L{Held}."""

    def delete() -> defer.Deferred:
        """Delete the mapping held (nothing if none); never fails."""

    def delete_blocking() -> None:
        """Delete the mapping held without the reactor (at exit); bounded
        in time; never raises."""

    def forget() -> None:
        """Drop the mapping held without deleting it (another client holds
        the same router entry)."""

    def abandon() -> None:
        """Another protocol won: make no mapping after all, if not made yet."""


def _public_ip(text: str, what: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise PortMapError(f"{what}: not an IP address: {text[:60]!r}") from None
    if ip.version != 4 or ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise PortMapError(f"{what}: unusable external address {ip}")
    return str(ip)


def _send_blocking(gateway: str, port: int, payload: bytes, wait: float = EXIT_WAIT) -> None:
    """Send one datagram (twice, a moment apart) and wait a moment for
    any answer: a delete at exit, best effort."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, port))
            s.settimeout(wait / 2)
            for _ in range(2):
                s.send(payload)
                try:
                    s.recv(1100)
                    return
                except (socket.timeout, OSError):
                    continue
    except OSError:
        pass


@implementer(IMapClient)
@attrs.define
class PcpClient:
    reactor: object
    gateway: str
    local_ip: str
    schedule: Retransmit = QUICK
    name = "pcp"
    _request: pcp.MapRequest | None = None

    def _send(self, request: pcp.MapRequest) -> defer.Deferred:
        return exchange(self.reactor, self.gateway, natpmp.SERVER_PORT, pcp.encode_map(request),
                        lambda data: pcp.parse_map(data, request), self.schedule)

    async def map(self, internal_port: int, lifetime: int) -> Held:
        request = pcp.MapRequest(pcp.new_nonce(), self.local_ip, internal_port, lifetime,
                                 external_port=internal_port)
        return await self._ask(request)

    async def _ask(self, request: pcp.MapRequest) -> Held:
        answer = await self._send(request)
        external = (_public_ip(answer.external_ip, "PCP"), answer.external_port)
        # Renewals suggest what we got (section 11.2.1: same nonce).
        self._request = attrs.evolve(request, external_port=answer.external_port)
        return Held(external, answer.lifetime)

    async def renew(self) -> Held:
        if self._request is None:
            raise PortMapError("PCP: no mapping to renew")
        return await self._ask(self._request)

    async def delete(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            try:
                await self._send(request.deleting())
            except PortMapError as e:
                log.info("PCP: deleting the mapping: {e}", e=e)

    def delete_blocking(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            _send_blocking(self.gateway, natpmp.SERVER_PORT, pcp.encode_map(request.deleting()))

    def forget(self) -> None:
        self._request = None

    def abandon(self) -> None:
        pass  # (an answer is a round trip away: a grant is deleted as it comes)


@implementer(IMapClient)
@attrs.define
class NatPmpClient:
    reactor: object
    gateway: str
    schedule: Retransmit = QUICK
    name = "nat-pmp"
    _internal: int | None = None
    _external: tuple[str, int] | None = None
    _lifetime_asked: int = 0

    def _send(self, payload: bytes, parse) -> defer.Deferred:
        return exchange(self.reactor, self.gateway, natpmp.SERVER_PORT, payload, parse, self.schedule)

    async def map(self, internal_port: int, lifetime: int) -> Held:
        address = await self._send(natpmp.external_address_request(), natpmp.parse_external_address)
        ip = _public_ip(address.address, "NAT-PMP")
        return await self._ask(internal_port, internal_port, lifetime, ip)

    async def _ask(self, internal_port: int, external_port: int, lifetime: int, ip: str) -> Held:
        answer = await self._send(natpmp.map_request(internal_port, external_port, lifetime),
                                  lambda data: natpmp.parse_map(data, internal_port))
        self._internal, self._external = internal_port, (ip, answer.external_port)
        self._lifetime_asked = lifetime
        return Held(self._external, answer.lifetime)

    async def renew(self) -> Held:
        if self._internal is None:
            raise PortMapError("NAT-PMP: no mapping to renew")
        return await self._ask(self._internal, self._external[1], self._lifetime_asked, self._external[0])

    async def delete(self) -> None:
        internal, self._internal = self._internal, None
        if internal is not None:
            try:
                await self._send(natpmp.map_request(internal, 0, 0),
                                 lambda data: natpmp.parse_map(data, internal))
            except PortMapError as e:
                log.info("NAT-PMP: deleting the mapping: {e}", e=e)

    def delete_blocking(self) -> None:
        internal, self._internal = self._internal, None
        if internal is not None:
            _send_blocking(self.gateway, natpmp.SERVER_PORT, natpmp.map_request(internal, 0, 0))

    def forget(self) -> None:
        self._internal = None

    def abandon(self) -> None:
        pass


def on_thread(reactor, f, *args, timeout: float, late=None) -> defer.Deferred:
    """
    Run C{f(*args)} on a daemon thread of its own and fire with its result,
    or fail with L{PortMapError} after C{timeout} seconds.  A daemon
    thread, not the reactor's pool: a router that never answers must not
    keep the process from exiting.  C{late(result)} gets a result that
    arrives after the timeout (to undo a mapping made too late).
    """
    d = defer.Deferred()

    def deliver(ok: bool, value) -> None:
        if d.called:
            if ok and late is not None:
                late(value)
            return
        timer.cancel()
        d.callback(value) if ok else d.errback(value)

    def run() -> None:
        try:
            value, ok = f(*args), True
        except PortMapError as e:
            value, ok = e, False
        except Exception as e:  # miniupnpc raises plain Exception
            value, ok = PortMapError(f"UPnP: {e}"), False
        try:
            reactor.callFromThread(deliver, ok, value)
        except Exception:
            pass  # the reactor is gone

    timer = reactor.callLater(timeout, lambda: d.called or d.errback(
        PortMapError(f"UPnP: no answer within {timeout:g} s")))
    threading.Thread(target=run, name="p2pft-upnp", daemon=True).start()
    return d


#: Milliseconds miniupnpc waits for SSDP answers (its default is 2000:
#: made for a whole house of devices; a router answers within a few ms).
DISCOVER_MS = 300
#: Seconds a UPnP call (discovery, one SOAP request) may take in all.
UPNP_TIMEOUT = 3.0
#: UPnP error strings (miniupnpc's) that mean "try another external port".
_CONFLICT = ("ConflictInMappingEntry", "ConflictWithOtherMechanisms", "718")
_PERMANENT_ONLY = ("OnlyPermanentLeasesSupported", "725")


def _load_miniupnpc():
    try:
        import miniupnpc
    except ImportError:
        raise PortMapError("UPnP: the miniupnpc module is not installed (pip install miniupnpc)") from None
    return miniupnpc


def _discover(discover_ms: int, location: str | None = None):
    """A miniupnpc UPnP object with its IGD selected (blocking): the one
    at C{location} (found by L{ssdp_search}), else miniupnpc's own
    discovery (which waits a whole second whatever its delay says)."""
    upnp = _load_miniupnpc().UPnP()
    upnp.discoverdelay = discover_ms
    if location is None and not upnp.discover():
        raise PortMapError("UPnP: no device answered")
    try:
        upnp.selectigd(*([location] if location else []))
    except Exception as e:
        raise PortMapError(f"UPnP: no internet gateway device ({e})") from None
    return upnp


SSDP = ("239.255.255.250", 1900)
#: Seconds to wait for the router's answer to our own M-SEARCH: a router
#: answers in milliseconds (miniupnpd at once); one that waits out the MX
#: second is missed, as the candidates would not wait for it anyway.
SSDP_WAIT = 0.2
_SEARCH = ("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n"
           "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n").encode()


def ssdp_location(data: bytes, gateway: str) -> str | None:
    """The LOCATION of an SSDP answer, if it is an HTTP URL on the
    gateway itself (an answer from anyone else on the LAN is not the
    router's, and miniupnpc would fetch whatever it names)."""
    from urllib.parse import urlsplit

    if not data.startswith(b"HTTP/1.1 200") or len(data) > 4096:
        return None
    for line in data.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            url = value.strip()
            try:
                parts = urlsplit(url)
                ok = parts.scheme == "http" and parts.hostname == gateway and parts.port is not None
            except ValueError:
                ok = False
            return url if ok else None
    return None


class _Search(DatagramProtocol):
    def __init__(self, gateway: str):
        self.gateway = gateway
        self.found = defer.Deferred()

    def startProtocol(self) -> None:
        try:
            self.transport.write(_SEARCH, SSDP)
        except OSError as e:
            self.found.errback(PortMapError(f"UPnP: cannot search: {e.strerror or e}"))

    def datagramReceived(self, data: bytes, addr) -> None:
        location = ssdp_location(data, self.gateway) if addr[0] == self.gateway else None
        if location and not self.found.called:
            self.found.callback(location)


def ssdp_search(reactor, gateway: str, wait: float = SSDP_WAIT) -> defer.Deferred:
    """Our own M-SEARCH for the router's IGD: fires with its description's
    URL, or None after C{wait} seconds.  (miniupnpc's discovery takes a
    second at least; a router answers this in milliseconds.)"""
    search = _Search(gateway)
    try:
        port = reactor.listenUDP(0, search)
    except Exception:
        return defer.succeed(None)
    timer = reactor.callLater(wait, lambda: search.found.called or search.found.callback(None))

    def done(result):
        timer.cancel() if timer.active() else None
        port.stopListening()
        return result if isinstance(result, str) else None

    return search.found.addBoth(done)


@implementer(IMapClient)
@attrs.define
class UpnpClient:
    """UPnP-IGD through miniupnpc.  Each call runs on its own daemon
    thread (L{on_thread}), bounded by C{timeout}; the UPnP object found
    by discovery is kept for renewals and the delete."""

    reactor: object
    gateway: str | None = None
    timeout: float = UPNP_TIMEOUT
    discover_ms: int = DISCOVER_MS
    #: Without an answer to our search, run miniupnpc's own discovery (a
    #: second or more: for p2pft doctor, not for a session).
    fallback: bool = False
    #: Called once the router answered the search (the façade's "hopeful").
    on_found: object = None
    name = "upnp"
    #: Not hopeful from the start: only once a router answered the search.
    quick = False
    _upnp: object = None
    _held: tuple[int, int, int] | None = None  # external port, internal port, lease asked
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _abandoned: threading.Event = attrs.field(factory=threading.Event)

    def _add(self, upnp, external_port: int, internal_port: int, lease: int) -> tuple[int, int]:
        """addportmapping, the lease made permanent if the router wants
        that (we delete it ourselves anyway); the lease granted."""
        try:
            upnp.addportmapping(external_port, "TCP", upnp.lanaddr, internal_port, DESCRIPTION, "", lease)
            return lease
        except Exception as e:
            if lease and any(s in str(e) for s in _PERMANENT_ONLY):
                upnp.addportmapping(external_port, "TCP", upnp.lanaddr, internal_port, DESCRIPTION, "", 0)
                return 0
            raise

    def _map_blocking(self, internal_port: int, lease: int, location: str | None = None) -> Held:
        upnp = _discover(self.discover_ms, location)
        ip = _public_ip(upnp.externalipaddress() or "", "UPnP")
        tried = []
        if self._abandoned.is_set():
            raise PortMapError("UPnP: not needed any more")
        for external_port in (internal_port, 1024 + (internal_port * 7919) % 64000,
                              1024 + (internal_port * 104729) % 64000):
            if external_port in tried:
                continue
            tried.append(external_port)
            try:
                granted = self._add(upnp, external_port, internal_port, lease)
            except Exception as e:
                if any(s in str(e) for s in _CONFLICT):
                    continue
                raise PortMapError(f"UPnP: the router refused: {e}") from None
            with self._lock:
                self._upnp, self._held = upnp, (external_port, internal_port, lease)
            return Held((ip, external_port), granted)
        raise PortMapError(f"UPnP: ports {', '.join(map(str, tried))} are all taken")

    async def map(self, internal_port: int, lifetime: int) -> Held:
        location = await ssdp_search(self.reactor, self.gateway) if self.gateway else None
        if location is None and not self.fallback:
            raise PortMapError("UPnP: no device answered the search")
        if location is not None and self.on_found is not None:
            self.on_found()
        return await on_thread(self.reactor, self._map_blocking, internal_port, lifetime, location,
                               timeout=self.timeout, late=lambda _: self.delete_blocking())

    def _renew_blocking(self) -> Held:
        with self._lock:
            upnp, held = self._upnp, self._held
        if held is None:
            raise PortMapError("UPnP: no mapping to renew")
        external_port, internal_port, lease = held
        granted = self._add(upnp, external_port, internal_port, lease)
        return Held((_public_ip(upnp.externalipaddress() or "", "UPnP"), external_port), granted)

    def renew(self) -> defer.Deferred:
        return on_thread(self.reactor, self._renew_blocking, timeout=self.timeout)

    def delete_blocking(self) -> None:
        with self._lock:
            upnp, held, self._held = self._upnp, self._held, None
        if held is not None:
            try:
                upnp.deleteportmapping(held[0], "TCP")
            except Exception as e:
                log.info("UPnP: deleting the mapping: {e}", e=e)

    def forget(self) -> None:
        with self._lock:
            self._held = None

    def abandon(self) -> None:
        self._abandoned.set()

    def delete(self) -> defer.Deferred:
        d = on_thread(self.reactor, self.delete_blocking, timeout=self.timeout)
        return d.addErrback(lambda f: log.info("UPnP: deleting the mapping: {e}", e=f.getErrorMessage()))
