"""What goes wrong when asking a router for a port mapping."""

from __future__ import annotations

from ..errors import P2pftError


class PortMapError(P2pftError):
    """No mapping from this protocol (no gateway, no answer, refused)."""


class ReplyError(PortMapError):
    """An answer that is malformed, does not match our request, or says no
    (C{code}: the protocol's result code, when it said one)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code
