"""
C{p2pft doctor SERVER:PORT}: what kind of NAT this host is behind, and what
that means for direct connections.

  - Two connections to the rendezvous server at once, from two local
    ports: its WELCOME says the address and port it saw for each.  Equal to
    ours: no NAT.  The same public address, each local port kept (or both
    shifted by the same amount): a NAT that maps consistently, which in
    practice is endpoint-independent (the kind hole punching goes through).
    Unrelated ports, or two public addresses: a symmetric NAT (a fresh
    mapping per connection), which plain punching cannot get through.  One
    server at one address cannot tell more than that (telling
    endpoint-dependent mapping apart for sure needs two destinations).
  - The router (the default gateway): whether it answers PCP (ANNOUNCE),
    NAT-PMP (external address) and UPnP-IGD (discovery), none of which
    creates anything; then one real mapping of a port, deleted at once,
    since answering is not the same as mapping.
  - IPv6: this host's global addresses (IPv6 rarely has NAT).

Everything is a plain function of the L{Report} but the probes, which take
their reactor and helpers as arguments (the unit tests pass fakes).
"""

from __future__ import annotations

import attrs
from twisted.internet import defer

from .addresses import global_ipv6_addresses, is_loopback, normalise_host
from .connect import connect_rendezvous
from .errors import SessionError
from .portmap import PortMapError, PortMapper, natpmp, pcp
from .portmap.clients import DISCOVER_MS, UPNP_TIMEOUT, _discover, on_thread, ssdp_search
from .portmap.gateway import default_gateway, local_address
from .portmap.udp import exchange

NONE, KEEPS, SHIFTS, RANDOM = "none", "keeps-ports", "shifts-ports", "random-ports"
#: What each kind means, in a line.
NAT_TEXT = {
    NONE: "none: the server sees this host's own address (a public address, or a 1:1 NAT)",
    KEEPS: "keeps ports: two connections from two local ports kept their port numbers "
           "(endpoint-independent mapping in practice)",
    SHIFTS: "shifts ports consistently: two connections from two local ports kept their distance "
            "(endpoint-independent mapping in practice)",
    RANDOM: "symmetric: each connection gets a public port of its own (endpoint-dependent mapping)",
}
PROTOCOL_NAMES = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP-IGD"}


@attrs.frozen
class Observation:
    """One connection to the server: our (address, port), and what it saw."""

    local: tuple[str, int]
    public: tuple[str, int]


@attrs.frozen
class Router:
    gateway: str | None
    #: protocol -> what it answered (a short text), or None: no answer.
    answers: dict = attrs.field(factory=dict)
    #: The test mapping: (protocol, "ip:port", seconds), or None.
    mapping: tuple[str, str, float] | None = None
    #: Why asking was skipped, if it was.
    skipped: str | None = None


@attrs.frozen
class Report:
    server: str
    observations: tuple[Observation, Observation]
    router: Router
    ipv6: tuple[str, ...] = ()

    @property
    def nat(self) -> str:
        return classify(self.observations)


def classify(observations) -> str:
    """The NAT's kind from two simultaneous observations from two local
    ports (L{NONE}, L{KEEPS}, L{SHIFTS} or L{RANDOM})."""
    a, b = observations
    if a.public == a.local and b.public == b.local:
        return NONE
    if a.public[0] != b.public[0]:
        return RANDOM  # two public addresses: a pool that maps per connection
    if a.public[1] == a.local[1] and b.public[1] == b.local[1]:
        return KEEPS
    if b.public[1] - a.public[1] == b.local[1] - a.local[1]:
        return SHIFTS
    return RANDOM


def verdict(report: Report) -> tuple[str, str]:
    """How likely a direct connection is ("likely", "possible",
    "unlikely") and why, in a sentence."""
    nat, mapping, ipv6 = report.nat, report.router.mapping, report.ipv6
    if nat == NONE:
        return "likely", ("no NAT here: a direct connection works unless a firewall drops incoming "
                          "connections and the other side is behind a symmetric NAT too")
    if mapping is not None:
        return "likely", (f"your router maps ports ({PROTOCOL_NAMES[mapping[0]]}): p2pft offers the mapped "
                          "port to the other side, which can connect to it whatever its own NAT")
    if nat in (KEEPS, SHIFTS):
        return "likely", ("hole punching goes through a NAT like this one, unless the other side is "
                          "behind a symmetric NAT as well")
    extra = " (over IPv6, if the other side has it too)" if ipv6 else ""
    return "unlikely", ("hole punching through a symmetric NAT works only when the other side's NAT "
                        "keeps its ports; with a symmetric NAT there too, or a router that maps "
                        "nothing, the relay carries the transfer" + extra)


def _address(pair: tuple[str, int]) -> str:
    host, port = pair
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lines(report: Report) -> list[str]:
    """What C{p2pft doctor} prints, one finding a line."""
    a, b = report.observations
    out = [f"p2pft doctor {report.server}",
           f"Public address (as the server sees it): {a.public[0]}"
           + (f" and {b.public[0]}" if b.public[0] != a.public[0] else "")
           + f" (local port {a.local[1]} -> {a.public[1]}, {b.local[1]} -> {b.public[1]})",
           f"NAT: {NAT_TEXT[report.nat]}."]
    router = report.router
    if router.skipped:
        out.append(f"Router: not asked ({router.skipped}).")
    else:
        said = ", ".join(f"{PROTOCOL_NAMES[p]} {'yes' if router.answers.get(p) else 'no'}"
                         for p in PROTOCOL_NAMES)
        if router.mapping is not None:
            name, external, seconds = router.mapping
            test = (f"a test mapping with {PROTOCOL_NAMES[name]} worked ({external}, "
                    f"{seconds * 1000:.0f} ms) and was deleted")
        else:
            test = "a test mapping failed" if any(router.answers.values()) else "no port mapping"
        out.append(f"Router {router.gateway}: {said}; {test}.")
    out.append(f"IPv6: {', '.join(report.ipv6[:3])}" if report.ipv6 else "IPv6: no global address.")
    chance, why = verdict(report)
    out.append(f"Direct connections: {chance}: {why}.")
    return out


def as_json(report: Report) -> dict:
    chance, why = verdict(report)
    router = report.router
    return {
        "server": report.server,
        "observations": [{"local": _address(o.local), "public": _address(o.public)} for o in report.observations],
        "nat": report.nat,
        "router": {"gateway": router.gateway, "skipped": router.skipped,
                   "answers": {p: router.answers.get(p) for p in PROTOCOL_NAMES},
                   "mapping": None if router.mapping is None else {
                       "protocol": router.mapping[0], "external": router.mapping[1],
                       "seconds": round(router.mapping[2], 3)}},
        "ipv6": list(report.ipv6),
        "direct": chance,
        "why": why,
    }


# -- probes -----------------------------------------------------------------


async def observe_twice(reactor, server: tuple[str, int], timeout: float,
                        connect=connect_rendezvous) -> tuple[Observation, Observation]:
    """Two connections at once (so from two local ports), each one's
    WELCOME: what the server saw."""
    clients = []

    async def one():
        client = await connect(reactor, server)
        clients.append(client)
        d = client.welcomed()
        d.addTimeout(timeout, reactor)
        try:
            public = await d
        except defer.TimeoutError:
            raise SessionError(f"the server did not answer within {timeout:g} s (is it a p2pft server?)") from None
        local = client.transport.getHost()
        return Observation((normalise_host(local.host), local.port), (normalise_host(public[0]), public[1]))

    try:
        found = await defer.gatherResults([defer.ensureDeferred(one()) for _ in range(2)], consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
    finally:
        for client in clients:
            client.transport.loseConnection()
    return tuple(found)


async def _answered(d: defer.Deferred, describe) -> str | None:
    try:
        return describe(await d)
    except PortMapError:
        return None


def _upnp_probe(discover_ms: int, location: str | None = None) -> str:
    upnp = _discover(discover_ms, location)
    return f"external address {upnp.externalipaddress() or '?'}"


async def _upnp(reactor, gateway: str, probe) -> str:
    # (No answer to our quick search: miniupnpc's slower discovery, which
    # also finds a router that waits out the search's MX second.)
    location = await ssdp_search(reactor, gateway, wait=1.2)
    return await on_thread(reactor, probe, DISCOVER_MS, location, timeout=UPNP_TIMEOUT)


async def probe_router(reactor, port: int, gateway: str | None, local_ip: str | None,
                       make_mapper=PortMapper, upnp_probe=_upnp_probe, send=exchange) -> Router:
    """Ask the router what it speaks (nothing is created), then map
    C{port} for real and delete that mapping at once."""
    if gateway is None:
        return Router(None, skipped="no default gateway")
    asks = {
        "pcp": _answered(send(reactor, gateway, natpmp.SERVER_PORT, pcp.encode_announce(local_ip),
                              pcp.parse_announce), lambda epoch: f"epoch {epoch}")
        if local_ip else None,
        "nat-pmp": _answered(send(reactor, gateway, natpmp.SERVER_PORT, natpmp.external_address_request(),
                                  natpmp.parse_external_address), lambda a: f"external address {a.address}"),
        "upnp": _answered(defer.ensureDeferred(_upnp(reactor, gateway, upnp_probe)), lambda text: text),
    }
    running = {name: defer.ensureDeferred(ask) for name, ask in asks.items() if ask is not None}
    answers = {name: None for name in asks}
    for name, ask in running.items():
        answers[name] = await ask
    mapping = None
    if any(answers.values()):
        mapper = make_mapper(reactor)
        found = await mapper.map(port)
        if found is not None:
            await mapper.unmap()
            mapping = (found.protocol, _address(found.external), found.seconds)
    return Router(gateway, answers, mapping)


async def diagnose(reactor, server: tuple[str, int], timeout: float = 10.0, port_mapping: bool = True,
                   connect=connect_rendezvous, gateway=default_gateway, local=local_address,
                   router=probe_router, ipv6=global_ipv6_addresses) -> Report:
    """Everything C{p2pft doctor} finds out; fails (a P2pftError, one line)
    only when the server cannot be reached."""
    observations = await observe_twice(reactor, server, timeout, connect)
    if not port_mapping:
        found = Router(None, skipped="--no-port-mapping")
    elif is_loopback(observations[0].public[0]):
        found = Router(None, skipped="the server is on this host: no router in between")
    else:
        gw = gateway()
        found = await router(reactor, observations[0].local[1], gw, local(gw) if gw else None)
    return Report(_address(server), observations, found, tuple(ipv6()))
