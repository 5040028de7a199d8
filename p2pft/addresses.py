"""
Local addresses worth offering as candidates, found without any network I/O,
and what kind of address a peer or a server gave us.
"""

from __future__ import annotations

import ipaddress
import re

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


def normalise_host(host: str) -> str:
    """An address as both sides compare and show it: an IPv4-mapped IPv6
    address (what a dual-stack listener reports) as the IPv4 address, a
    scope id dropped, other literals in their canonical form; anything that
    is not an IP literal unchanged."""
    ip = parse_ip(host.split("%", 1)[0])
    return host if ip is None else str(ip)


def is_loopback(host: str) -> bool:
    """Whether C{host} is a loopback address (IPv4-mapped ones included)."""
    ip = parse_ip(host.split("%", 1)[0])
    return ip is not None and ip.is_loopback


Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Networks that are not "the Internet": this host, this link, private
#: LANs (RFC 1918, IPv6 ULA) and carrier-grade NAT's shared space (RFC 6598,
#: the inside of a carrier's NAT, never the address a server observes for
#: a peer on the Internet).  A peer's address in one of these is some host
#: near us, not a NAT racing our SYNs.
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::1/128", "fc00::/7", "fe80::/10",
))
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def parse_ip(host: object) -> Address | None:
    """The IP address C{host} spells, IPv4-mapped IPv6 turned into the IPv4
    address it stands for; None for anything but a str holding a plain
    literal (no names, no scope id, no legacy numeric forms such as
    C{127.1} or C{2130706433}, which C{ipaddress} refuses)."""
    if not isinstance(host, str) or "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(ip: Address) -> bool:
    """Not in L{LOCAL_NETWORKS} (documentation and benchmark ranges count
    as public: the NAT lab's "Internet" is TEST-NET-3)."""
    return not any(ip.version == net.version and ip in net for net in LOCAL_NETWORKS)


def is_host_or_link_only(ip: Address) -> bool:
    """Addresses that never lead to another computer across a network:
    this host (loopback, 0.0.0.0/8 and ::, which Linux connects to this
    host, IPv4-compatible ::a.b.c.d), this link only (link-local), or
    many hosts (multicast, broadcast)."""
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in LOCAL_NETWORKS[0] or ip == _BROADCAST
    return ip in _V4_COMPATIBLE


#: Longest host name, in characters (RFC 1035: 255 octets on the wire).
MAX_HOST_NAME = 253
#: Longest label of a host name (RFC 1035).
MAX_LABEL = 63
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
#: A last label that the C library's legacy address parser reads as part of
#: a number (C{127.1}, C{2130706433}, C{0x7f.1}); no top-level domain is.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def relay_host_problem(host: object) -> str | None:
    """
    Why C{host} (the HOST of a relay's C{HOST:PORT}, brackets removed) is
    not something a peer may dial as a relay, in a few words, or None if it
    is: an IP literal without a scope, or a DNS host name (RFC 1123:
    labels of 1 to 63 ASCII letters, digits and hyphens, not starting or
    ending with a hyphen, joined by dots, at most 253 characters, a final
    dot allowed; IDNs in their C{xn--} form) whose last label is not a
    number only a legacy parser reads as an address.  Nothing else reaches
    a resolver or the user's terminal.  (Whether an acceptable address
    may be dialled, given where the server is, is the caller's question.)
    """
    if not isinstance(host, str) or not host:
        return "no host"
    if "%" in host:
        return "an address with a scope" if parse_ip(host.split("%", 1)[0]) else "not a host name"
    if parse_ip(host) is not None:
        return None
    if not _NAME_CHARS.issuperset(host):
        return "not a host name (only ASCII letters, digits, '-' and '.')"
    if len(host) > MAX_HOST_NAME:
        return f"a host name longer than {MAX_HOST_NAME} characters"
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    for label in labels:
        if not label:
            return "a host name with an empty label"
        if len(label) > MAX_LABEL:
            return f"a host name with a label longer than {MAX_LABEL} characters"
        if label.startswith("-") or label.endswith("-"):
            return "a host name with a label that starts or ends with '-'"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return "a numeric address that is not a plain IP literal"
    return None
