"""
The servers as twisted.application services: C{p2pft server} / C{p2pft
relay} and the twistd plugins (C{twistd -n p2pft-server}, C{p2pft-relay})
all call L{makeService} or L{makeRelayService} with their parsed options.

Also here: the listening port (a deep backlog, accepting in batches) and
the open-file budget that the caps are kept under.
"""

from __future__ import annotations

import re

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer, tcp
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from ..util import OneShot
from .events import NO_EVENTS, FanOut, IServerEvents
from .logs import LogEvents
from .relay import RelayFactory, RelayServer
from .rendezvous import RendezvousServerFactory

#: The listen() backlog: connections the kernel has completed and queues
#: until the reactor accepts them.  Twisted's default, 50, is gone within
#: milliseconds of a connect-and-close flood, and every SYN that finds the
#: queue full is dropped: a real client then waits for its retransmission
#: (1 s, then 3 s, 7 s...).  4096 is about a second of such a flood (a few
#: thousand connections a second) and what Linux allows by default since
#: 5.4: the kernel silently caps it at net.core.somaxconn (128 on older
#: kernels: raise that sysctl too).  It costs nothing until it is used.
LISTEN_BACKLOG = 4096
#: Connections accepted in one reactor turn, at least, when that many are
#: queued.  Twisted starts at 100 and then accepts only as many as the last
#: turn found (+20 when it found the full batch), so after a quiet moment a
#: flood is drained 1, 21, 41... per turn while the queue overflows.  A
#: connection costs about 80 us of CPU in all (accept, WELCOME, close;
#: measured on the 2-core test machine), so 256 is about 20 ms of one turn:
#: short next to a client's round trip and its SYN retransmission.
ACCEPT_BATCH = 256

_OWN_BACKLOG = re.compile(r"(?:^|(?<!\\):)backlog=")


def with_backlog(description: str) -> str:
    """C{description} with C{backlog=}L{LISTEN_BACKLOG} added to a TCP
    endpoint that does not choose its own."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl") or _OWN_BACKLOG.search(description):
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


class _BatchAcceptPort(tcp.Port):
    """A TCP port that accepts up to L{ACCEPT_BATCH} queued connections per
    reactor turn, whatever the last turn found."""

    @property
    def numberAccepts(self) -> int:
        return self._numberAccepts

    @numberAccepts.setter
    def numberAccepts(self, n: int) -> None:
        self._numberAccepts = max(ACCEPT_BATCH, n)


class _ListeningReactor:
    """The reactor, whose listenTCP (which TCP endpoints call) makes a
    L{_BatchAcceptPort}."""

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = _BatchAcceptPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening


def server_endpoint(reactor, description: str):
    """The endpoint a server listens on: C{description}, with our backlog
    and accept batch."""
    return serverFromString(_ListeningReactor(reactor), with_backlog(description))


class RendezvousService(Service):
    """
    Listens on an endpoint.  L{whenListening} fires with the port, or fails;
    a failure is also logged and stops the reactor, so C{twistd -n
    p2pft-server} on a busy port says so and exits instead of idling.

    @param what: what listens, for the start-up line (C{events.listening}).
    """

    log = Logger()

    def __init__(self, endpoint, factory, reactor, events: IServerEvents = NO_EVENTS,
                 what: str | None = None):
        self._endpoint = endpoint
        self._reactor = reactor
        self.factory = factory
        self.port = None
        self._listening = OneShot()
        self._events = events
        self.what = what or ("relay" if isinstance(factory, RelayFactory) else "rendezvous server")

    @property
    def listening(self) -> bool:
        """Whether it is running and listening (what /healthz reports)."""
        return self.running and self.port is not None

    def whenListening(self) -> defer.Deferred:
        return self._listening.when()

    def startService(self) -> None:
        super().startService()
        _raise_fd_limit(getattr(self.factory, "state", None), getattr(self.factory, "relay", None))
        d = self._endpoint.listen(self.factory)
        d.addCallbacks(self._listened, self._failed)

    def _listened(self, port) -> None:
        self.port = port
        address = port.getHost()
        self._events.listening(self.what, f"{address.host}:{address.port}", settings_of(self.factory))
        self._listening.fire(port)

    def _failed(self, failure) -> None:
        self.log.error("p2pft {what} cannot listen: {error}", what=self.what, error=failure.getErrorMessage())
        self._listening.fail(failure.value)
        # twistd starts services before the reactor runs.
        self._reactor.callWhenRunning(self._stop)

    def _stop(self) -> None:
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


def _raise_fd_limit(state, relay) -> None:
    """
    Use the hard limit on open files, and keep the caps under it: each
    relayed session holds two sockets and two pipes (four descriptors: the
    kernel splices its bytes, L{p2pft.server.zerocopy}), each rendezvous client one, each
    connection in a standalone relay's lobby (no RELAY line yet) one.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        return
    budget = max(32, soft - 64)
    if relay is not None:
        sessions = max(1, min(relay.limits.max_sessions, budget // 12))
        budget -= 6 * sessions
        pending = max(1, min(relay.limits.max_pending, budget // 4))
        relay.limits = attrs.evolve(relay.limits, max_sessions=sessions, max_pending=pending)
        if state is None:
            budget -= pending
        # (With a rendezvous server, legs wait in its lobby, which is part
        # of max_connections.)
    if state is not None:
        state.max_connections = min(state.max_connections, max(16, budget))


def settings_of(factory) -> dict:
    """The limits a server runs with, for its start-up line (after the
    open-file budget lowered them)."""
    state, relay = getattr(factory, "state", None), getattr(factory, "relay", None)
    shown = {}
    if state is not None:
        shown.update({"max-connections": state.max_connections, "max-per-ip": state.max_per_ip,
                      "hello-timeout": state.hello_timeout, "relay": relay is not None})
    if relay is not None:
        limits = relay.limits
        shown.update({"relay-max-sessions": limits.max_sessions, "relay-max-per-ip": limits.max_per_ip,
                      "relay-max-bytes": limits.max_bytes, "relay-rate": limits.rate,
                      "relay-idle-timeout": limits.idle_timeout})
    return shown


def metrics_endpoint(address: tuple[str, int]) -> str:
    """The endpoint description of C{--metrics HOST:PORT}."""
    host, port = address
    return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}" if ":" in host else f"tcp:{port}:interface={host}"


def _observers(config, clock):
    """The events observer of a service: its log, and its metrics when
    C{--metrics} asks for them (returned too, or None)."""
    log = LogEvents(clock=clock)
    if not config.get("metrics"):
        return log, None
    from .metrics import Metrics

    metrics = Metrics()
    return FanOut(log, metrics), metrics


def _assemble(reactor, config, factory, events, metrics) -> MultiService:
    parent = MultiService()
    parent.rendezvous = RendezvousService(server_endpoint(reactor, config["port"]), factory, reactor, events)
    parent.rendezvous.setServiceParent(parent)
    parent.metrics = None
    if metrics is not None:
        from .metrics import MetricsSite

        site = MetricsSite(metrics.registry, lambda: parent.rendezvous.listening)
        parent.metrics = RendezvousService(
            serverFromString(reactor, metrics_endpoint(config["metrics"])), site, reactor, events, "metrics")
        parent.metrics.setServiceParent(parent)
    return parent


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    events, metrics = _observers(config, reactor)
    relays = list(config["advertise-relay"])
    relay = None
    if config["relay"]:
        relay = RelayServer(reactor, config["limits"], events)
        relays.insert(0, "*")
    factory = RendezvousServerFactory(
        reactor, relay=relay, relays=tuple(relays), events=events,
        waiting_timeout=config["waiting-timeout"],
        hello_timeout=config["hello-timeout"],
        max_connections=config["max-connections"],
        max_per_ip=config["max-per-ip"],
    )
    if metrics is not None:
        metrics.watch(rendezvous=factory.state, relay=relay)
    return _assemble(reactor, config, factory, events, metrics)


def makeRelayService(config, reactor=None) -> MultiService:
    """A standalone relay (C{p2pft relay}, C{twistd -n p2pft-relay})."""
    if reactor is None:
        from twisted.internet import reactor
    events, metrics = _observers(config, reactor)
    factory = RelayFactory(reactor, config["limits"], events)
    if metrics is not None:
        metrics.watch(relay=factory.relay)
    return _assemble(reactor, config, factory, events, metrics)

