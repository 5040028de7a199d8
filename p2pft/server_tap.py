"""
twistd plugin body for C{twistd -n p2pft-server}: the rendezvous server as
a service.  The console script's C{p2pft server} uses the same makeService.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .cli import ServerOptions as Options
from .rendezvous import RendezvousServerFactory


class RendezvousService(Service):
    """Listens on an endpoint; C{listening} fires with the port (or fails)."""

    log = Logger()

    def __init__(self, endpoint, factory: RendezvousServerFactory):
        self._endpoint = endpoint
        self.factory = factory
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = self._endpoint.listen(self.factory)

        def listened(port):
            self.port = port
            address = port.getHost()
            self.log.info(
                "p2pft rendezvous server listening on {host}:{port}",
                host=address.host, port=address.port,
            )
            return port

        d.addCallback(listened).chainDeferred(self.listening)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    factory = RendezvousServerFactory(
        reactor,
        waiting_timeout=config["waiting-timeout"],
        hello_timeout=config["hello-timeout"],
    )
    parent = MultiService()
    parent.rendezvous = RendezvousService(serverFromString(reactor, config["port"]), factory)
    parent.rendezvous.setServiceParent(parent)
    return parent


__all__ = ["Options", "makeService"]
