"""
twistd plugin body for C{twistd -n p2pft-server}: the rendezvous server as
a service.  The console script's C{p2pft server} uses the same makeService.
"""

from .options import ServerOptions as Options
from .server.service import makeService

__all__ = ["Options", "makeService"]
