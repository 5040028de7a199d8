"""
twistd plugin body for C{twistd -n p2pft-server}: the rendezvous server as
a service.  The console script's C{p2pft server} uses the same makeService.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from .cli import ServerOptions as Options
from .rendezvous import RendezvousServerFactory


def makeService(config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    factory = RendezvousServerFactory(
        reactor,
        waiting_timeout=config["waiting-timeout"],
        hello_timeout=config["hello-timeout"],
    )
    parent = MultiService()
    endpoint = serverFromString(reactor, config["port"])
    server = StreamServerEndpointService(endpoint, factory)
    server._raiseSynchronously = True
    server.setServiceParent(parent)
    parent.factory = factory
    return parent


__all__ = ["Options", "makeService"]
