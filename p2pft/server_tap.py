"""
twistd plugin body for C{twistd -n p2pft-server}: the rendezvous server as
a service.  The console script's C{p2pft server} uses the same makeService.
"""

from __future__ import annotations

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .cli import ServerOptions as Options
from .relay import RelayFactory, RelayServer
from .rendezvous import RendezvousServerFactory
from .util import OneShot


class RendezvousService(Service):
    """
    Listens on an endpoint.  L{whenListening} fires with the port, or fails;
    a failure is also logged and stops the reactor, so C{twistd -n
    p2pft-server} on a busy port says so and exits instead of idling.
    """

    log = Logger()

    def __init__(self, endpoint, factory: RendezvousServerFactory, reactor):
        self._endpoint = endpoint
        self._reactor = reactor
        self.factory = factory
        self.port = None
        self._listening = OneShot()

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
        self.log.info(
            "p2pft {what} listening on {host}:{port}",
            what="relay" if isinstance(self.factory, RelayFactory) else "rendezvous server",
            host=address.host, port=address.port,
        )
        self._listening.fire(port)

    def _failed(self, failure) -> None:
        self.log.error("p2pft rendezvous server cannot listen: {error}", error=failure.getErrorMessage())
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
    relayed session holds two sockets, each rendezvous client one.
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
        sessions = min(relay.limits.max_sessions, budget // 4)
        relay.limits = attrs.evolve(relay.limits, max_sessions=max(1, sessions))
        budget -= 2 * relay.limits.max_sessions
    if state is not None:
        state.max_connections = min(state.max_connections, max(16, budget))


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    relays = list(config["advertise-relay"])
    relay = None
    if config["relay"]:
        relay = RelayServer(reactor, config["limits"])
        relays.insert(0, "*")
    factory = RendezvousServerFactory(
        reactor, relay=relay, relays=tuple(relays),
        waiting_timeout=config["waiting-timeout"],
        hello_timeout=config["hello-timeout"],
        max_connections=config["max-connections"],
        max_per_ip=config["max-per-ip"],
    )
    parent = MultiService()
    parent.rendezvous = RendezvousService(serverFromString(reactor, config["port"]), factory, reactor)
    parent.rendezvous.setServiceParent(parent)
    return parent


def makeRelayService(config, reactor=None) -> MultiService:
    """A standalone relay (C{p2pft relay}, C{twistd -n p2pft-relay})."""
    if reactor is None:
        from twisted.internet import reactor
    factory = RelayFactory(reactor, config["limits"])
    parent = MultiService()
    parent.rendezvous = RendezvousService(serverFromString(reactor, config["port"]), factory, reactor)
    parent.rendezvous.setServiceParent(parent)
    return parent


__all__ = ["Options", "makeService"]
