"""
Where the two peers may meet: the candidate addresses each tells the other
(sealed, after key confirmation: docs/PROTOCOL.md section 2), and the
relays a session may fall back to.  Neither the peer nor the rendezvous
server is trusted to steer our connections: what they send is filtered
here, as plain functions, before the punch layer dials any of it.
"""

from __future__ import annotations


from twisted.internet import defer
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from .addresses import Address, is_host_or_link_only, is_loopback, normalise_host, parse_ip, relay_host_problem
from .errors import SessionError
from .rendezvous import parse_server
from .util import printable

log = Logger()

#: Most candidates accepted from the peer (a host has a few addresses: one
#: per interface and family, and the one the server saw).
MAX_CANDIDATES = 16
#: Addresses dialled per relay name the server advertised, at most (one per
#: family is what a dual-stack relay needs; a name resolving to a hundred
#: addresses must not make us open a hundred connections).
MAX_RELAY_ADDRESSES = 2


def own_candidates(public: tuple[str, int], local: tuple[str, int], ipv6: list[str] = ()) -> list[list]:
    """
    What we tell the peer: the address the server saw (our NAT's public
    side), the local address of the rendezvous connection (for a peer on the
    same LAN), and our global IPv6 addresses on the same port number (IPv6
    rarely has NAT).  A peer on a loopback server gets no IPv6 addresses:
    both ends are on this machine.
    """
    found = [list(public)]
    for host, port in [local] + [(v6, local[1]) for v6 in ipv6]:
        if [host, port] not in found and host not in ("0.0.0.0", "::"):
            found.append([host, port])
    return found


def parse_candidates(message: dict, server_host: str = "", mine=()) -> list[tuple[str, int]]:
    """
    The peer's candidates, as docs/PROTOCOL.md section 2 says: of the first
    C{4 * MAX_CANDIDATES} entries, those that are C{[host, port]} with
    C{host} a str holding an IP literal and C{port} an int (not a bool) in
    1..65535, and whose address can be another computer's
    (L{_candidate_allowed}) and is not one of C{mine} (our own candidates,
    mirrored back at us); duplicates dropped; at most L{MAX_CANDIDATES}.
    """
    ours = {(str(parse_ip(h)), p) for h, p in mine if parse_ip(h) is not None}
    raw = message.get("candidates")
    if not isinstance(raw, list):
        raise SessionError("the other side sent no addresses")
    loopback_server = is_loopback(server_host)
    out: list[tuple[str, int]] = []
    for item in raw[: MAX_CANDIDATES * 4]:
        if len(out) == MAX_CANDIDATES:
            break
        if not (isinstance(item, list) and len(item) == 2):
            continue
        host, port = item
        ip = parse_ip(host)
        if ip is None or type(port) is not int or not 0 < port < 65536:
            continue
        if not _candidate_allowed(ip, host, loopback_server):
            continue
        if (str(ip), port) not in out and (str(ip), port) not in ours:
            out.append((str(ip), port))
    if not out:
        raise SessionError("the other side sent no usable addresses")
    return out


def _candidate_allowed(ip: Address, host: str, loopback_server: bool) -> bool:
    """Loopback only when the server is on loopback (both peers are then on
    this machine); never an address that is this host or many hosts
    (unspecified, 0.0.0.0/8, multicast, broadcast), nor IPv6 link-local (it
    needs a scope we cannot know), IPv4-mapped (IPv4 in disguise: the IPv4
    form is what a peer sends) or IPv4-compatible.  IPv4 link-local is kept:
    a peer on the same link without DHCP has nothing else."""
    if ":" in host and ip.version == 4:
        return False  # ::ffff:a.b.c.d
    if ip.is_loopback:
        return loopback_server
    if ip.version == 4 and ip.is_link_local:
        return True
    return not is_host_or_link_only(ip)


def relays(settings, specs: list[str],
            server_host: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """
    The relay the user named (C{settings.relay}: trusted as given, dialled
    as named), else the
    ones the server advertised, as (addresses to dial, names to resolve
    first with L{resolve_relays}).  C{"*"} is the server itself, at the
    address we reached it on.  The server is not trusted to steer our
    connections: an address that leads to this host or this link only
    (L{is_host_or_link_only}; IPv4-mapped IPv6 is judged as the IPv4
    address it is) is ignored unless the server itself is on loopback, and
    so is anything that is neither an IP literal nor a DNS host name.
    """
    if settings.relay is not None:
        return [settings.relay], []
    server_host = normalise_host(server_host)
    out, names = [], []
    for spec in specs:
        if spec == "*":
            out.append((server_host, settings.server[1]))
            continue
        try:
            host, port = parse_server(spec)
            problem = relay_host_problem(host)
        except ValueError:
            host, port, problem = "", 0, "not HOST:PORT"
        ip = parse_ip(host) if problem is None else None
        if ip is not None and _relay_allowed(ip, server_host):
            out.append((str(ip), port))
        elif ip is None and problem is None:
            names.append((host, port))
        else:
            log.warn("ignoring relay {spec} advertised by the server: {why}", spec=printable(spec, 80),
                     why=problem or "an address of this host or link")
    return out, names


def _relay_allowed(ip: Address, server_host: str) -> bool:
    return not is_host_or_link_only(ip) or is_loopback(server_host)


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what a name resolves to (an L{IResolutionReceiver})."""

    def __init__(self):
        self.found: list[str] = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def resolve_relays(resolver, names: list[tuple[str, int]], server_host: str) -> defer.Deferred:
    """
    Resolve relay names with C{resolver} (an
    L{twisted.internet.interfaces.IHostnameResolver}: the reactor's
    C{nameResolver}, getaddrinfo on a thread) and fire with the addresses
    to dial: what each name resolves to, filtered like a literal relay
    address (L{relays}), at most L{MAX_RELAY_ADDRESSES} per name.  A name
    that resolves to nothing usable is dropped.
    """
    def usable(found: list[str], spec: str, port: int) -> list[tuple[str, int]]:
        keep = []
        for host in found:
            ip = parse_ip(host)  # (a scoped link-local address: None)
            if ip is None or not _relay_allowed(ip, server_host):
                log.warn("ignoring relay {spec}: it resolves to {ip}", spec=spec, ip=printable(host, 80))
            elif (str(ip), port) not in keep:
                keep.append((str(ip), port))
        return keep[:MAX_RELAY_ADDRESSES]

    lookups = []
    for host, port in names:
        receiver = _Addresses()
        resolver.resolveHostName(receiver, host, port)
        lookups.append(receiver.done.addCallback(usable, printable(host, 80), port))
    d = defer.gatherResults(lookups, consumeErrors=True)
    return d.addCallback(lambda found: [a for addresses in found for a in addresses])
