"""
Local addresses worth offering as candidates, found without any network I/O.
"""

from __future__ import annotations

import ipaddress

#: /proc/net/if_inet6 flags that make an address unusable: DAD failed,
#: deprecated, tentative.
_UNUSABLE = 0x08 | 0x20 | 0x40
MAX_LOCAL_V6 = 4


def global_ipv6_addresses(path: str = "/proc/net/if_inet6") -> list[str]:
    """
    This host's global-scope IPv6 addresses (Linux; elsewhere none).  With
    IPv6 there is usually no NAT, so these are the addresses a peer can reach
    us on directly, given a firewall that lets the crossing SYNs through.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        raw, scope, flags = fields[0], int(fields[3], 16), int(fields[4], 16)
        if scope != 0 or flags & _UNUSABLE:
            continue
        try:
            ip = ipaddress.IPv6Address(int(raw, 16))
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        found.append(str(ip))
    return found[:MAX_LOCAL_V6]


def ip_key(host: str) -> str:
    """
    What per-address limits count: the IPv4 address, or the /64 an IPv6
    address belongs to (one subscriber usually has a whole /64).
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
