"""twistd plugin body for C{twistd -n p2pft-relay}: a standalone relay."""

from .options import RelayOptions as Options
from .server.service import makeRelayService as makeService

__all__ = ["Options", "makeService"]
