"""
Where the router is: the gateway of the default IPv4 route, read from
C{/proc/net/route} (Linux; elsewhere there is no such file and no gateway
is found, so nothing is asked).  The router that answers PCP and NAT-PMP
is the one at that address (RFC 6886 section 3.1, RFC 6887 section 8.1).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ROUTE_TABLE = "/proc/net/route"
RTF_UP = 0x1
RTF_GATEWAY = 0x2
#: Longer than any routing table a host has; a bigger file is not one.
MAX_ROUTE_BYTES = 1 << 20


def parse_routes(text: str) -> str | None:
    """The gateway of the default route (lowest metric first) in the
    text of C{/proc/net/route}, or None."""
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags = int(fields[1], 16), int(fields[2], 16), int(fields[3], 16)
            metric, mask = int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        if destination or mask or not gateway or flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY:
            continue
        if not 0 <= gateway < 2**32:
            continue
        # The kernel prints the address in host byte order (little-endian).
        address = ipaddress.IPv4Address(struct.pack("<I", gateway))
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            continue
        if best is None or metric < best[0]:
            best = (metric, str(address))
    return best[1] if best else None


def default_gateway(path: str = ROUTE_TABLE) -> str | None:
    """The default gateway's IPv4 address, or None (no default route, or
    no C{/proc/net/route})."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return parse_routes(f.read(MAX_ROUTE_BYTES))
    except OSError:
        return None


def local_address(gateway: str, port: int = 5351) -> str | None:
    """Our address towards C{gateway}: what a UDP socket connected to it is
    bound to (connect() on UDP sends nothing).  PCP puts it in every
    request; the mapping is for this address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, port))
            return s.getsockname()[0]
    except OSError:
        return None
