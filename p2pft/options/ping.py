"""
The options of C{p2pft ping HOST:PORT}: a health check of a rendezvous
server from outside, for a Docker HEALTHCHECK or a monitoring probe.
"""

from __future__ import annotations

from twisted.python import usage

from .common import _Options, server_address

#: The longest --timeout: a probe that waits longer than this is not
#: telling anybody about the server's health any more.
MAX_PING_TIMEOUT = 300.0


class PingOptions(_Options):
    synopsis = "[--timeout S] HOST:PORT"
    longdesc = (
        "Check that a p2pft rendezvous server answers: connect, read its WELCOME, send PING, "
        "expect PONG.  Prints one line; exit status 0 if it answered within the timeout, 1 if "
        "not.  It joins no nameplate and leaves no trace but a connection (the server counts "
        "it in p2pft_connections_total).  A standalone relay speaks no rendezvous protocol: "
        "check it with GET /healthz on its --metrics port."
    )
    optParameters = [
        ["timeout", None, 5.0, "Seconds to wait for the whole exchange.", float],
    ]

    def parseArgs(self, server: str | None = None) -> None:
        if server is None:
            raise usage.UsageError("ping needs HOST:PORT")
        self["server"] = server_address(server)

    def postOptions(self) -> None:
        if not 0 < self["timeout"] <= MAX_PING_TIMEOUT:
            raise usage.UsageError(f"--timeout must be between 0 and {MAX_PING_TIMEOUT:g} seconds")
