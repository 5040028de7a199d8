"""
The options of C{p2pft doctor SERVER:PORT}: what NAT this host is behind,
and what that means for direct connections.
"""

from __future__ import annotations

from twisted.python import usage

from .common import _Options, server_address

#: The longest --timeout.
MAX_DOCTOR_TIMEOUT = 120.0


class DoctorOptions(_Options):
    synopsis = "[--json] [--no-port-mapping] [--timeout S] SERVER:PORT"
    longdesc = (
        "Tell what kind of NAT this host is behind and what that means for direct connections: "
        "two connections to the rendezvous server from two local ports (the address and port "
        "it sees for each: kept, shifted alike, or random, which is a symmetric NAT); whether "
        "the router answers PCP, NAT-PMP and UPnP-IGD, and whether it maps a port for real (one "
        "test mapping, deleted at once); and this host's global IPv6 addresses.  Plain lines, or "
        "one JSON object with --json.  Exit status 1 with one line if the server cannot be reached."
    )
    optFlags = [
        ["json", None, "Print one JSON object on stdout instead of lines."],
        ["no-port-mapping", None, "Do not ask the router anything (no PCP, NAT-PMP or UPnP)."],
    ]
    optParameters = [
        ["timeout", None, 10.0, "Seconds to wait for the server.", float],
    ]

    def parseArgs(self, server: str | None = None) -> None:
        if server is None:
            raise usage.UsageError("doctor needs SERVER:PORT")
        self["server"] = server_address(server)

    def postOptions(self) -> None:
        if not 0 < self["timeout"] <= MAX_DOCTOR_TIMEOUT:
            raise usage.UsageError(f"--timeout must be between 0 and {MAX_DOCTOR_TIMEOUT:g} seconds")
