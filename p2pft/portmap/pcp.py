"""
PCP MAP (RFC 6887) messages, as pure functions: a MAP request for one TCP
port (its lifetime 0 deletes the mapping), and the parsing of the answer,
checked against the request (version, opcode, nonce, protocol, internal
port).  A PCP server that only speaks NAT-PMP answers a version-2 request
with a NAT-PMP "unsupported version" (RFC 6887 section 9): that is a
L{ReplyError} with C{code} L{UNSUPP_VERSION}, the client's cue to fall
back to NAT-PMP.

Layouts (network byte order), sections 7.1, 7.2 and 11.1::

    request header   version 2 | R=0,opcode (8) | reserved (16)
                     | requested lifetime (32) | client IP (128)        24 bytes
    response header  version 2 | R=1,opcode (8) | reserved (8) | result (8)
                     | lifetime (32) | epoch (32) | reserved (96)        24 bytes
    MAP body         nonce (96) | protocol (8) | reserved (24)
                     | internal port (16) | external port (16)
                     | external IP (128)                                36 bytes

IPv4 addresses travel IPv4-mapped (::ffff:a.b.c.d).  Options may follow a
response; we send none and skip (bounded) whatever the server adds.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import attrs

from .errors import ReplyError

VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
PROTO_TCP = 6
UNSUPP_VERSION = 1
#: The longest PCP message (section 7).
MAX_MESSAGE = 1100
HEADER = 24
MAP_BODY = 36
#: Result codes (section 7.4).
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide external",
    12: "address mismatch",
    13: "excessive remote peers",
}


@attrs.frozen
class MapRequest:
    nonce: bytes
    client_ip: str
    internal_port: int
    lifetime: int
    external_port: int = 0
    protocol: int = PROTO_TCP

    def __attrs_post_init__(self):
        if type(self.nonce) is not bytes or len(self.nonce) != 12:
            raise ValueError("the nonce is 12 bytes")
        for name, lowest in (("internal_port", 1), ("external_port", 0)):
            value = getattr(self, name)
            if type(value) is not int or not lowest <= value <= 65535:
                raise ValueError(f"{name} must be a port number, not {value!r}")
        if type(self.lifetime) is not int or not 0 <= self.lifetime < 2**32:
            raise ValueError(f"lifetime must be 0..2**32-1 seconds, not {self.lifetime!r}")
        _mapped(self.client_ip)

    def deleting(self) -> "MapRequest":
        """The request that deletes this mapping (same nonce, lifetime 0)."""
        return attrs.evolve(self, lifetime=0, external_port=0)


@attrs.frozen
class MapResult:
    lifetime: int
    epoch: int
    internal_port: int
    external_port: int
    external_ip: str


def new_nonce() -> bytes:
    return os.urandom(12)


def _mapped(ip: str) -> bytes:
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed


def _unmapped(data: bytes) -> str:
    address = ipaddress.IPv6Address(data)
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else str(address)


def encode_map(request: MapRequest) -> bytes:
    header = struct.pack("!BBHI", VERSION, OP_MAP, 0, request.lifetime) + _mapped(request.client_ip)
    # Suggested external address: the all-zero address of the client's
    # family (section 11.1: "no preference").
    any_ip = _mapped("0.0.0.0") if ipaddress.ip_address(request.client_ip).version == 4 else bytes(16)
    body = (request.nonce + struct.pack("!B3xHH", request.protocol, request.internal_port,
                                        request.external_port) + any_ip)
    return header + body


def parse_map(data: bytes, request: MapRequest) -> MapResult:
    """The server's answer to C{request}, or a ReplyError."""
    if len(data) >= 2 and data[0] == 0:
        # A NAT-PMP server: version 0, opcode 128 + ours, result code 1.
        raise ReplyError("PCP: the gateway speaks NAT-PMP only", code=UNSUPP_VERSION)
    if len(data) < 4:
        raise ReplyError(f"PCP: a {len(data)}-byte answer is too short")
    version, op, _, result = struct.unpack_from("!BBBB", data)
    if version != VERSION:
        raise ReplyError(f"PCP: answer of version {version}, not {VERSION}",
                         code=UNSUPP_VERSION if result == UNSUPP_VERSION else None)
    if op != 0x80 | OP_MAP:
        raise ReplyError(f"PCP: not an answer to MAP (opcode byte {op:#04x})")
    if len(data) > MAX_MESSAGE or len(data) % 4:
        raise ReplyError(f"PCP: an answer of {len(data)} bytes")
    if result != 0:
        # Error answers may leave out the opcode body (section 7.2 lets a
        # server copy only what it parsed): the result is what matters.
        raise ReplyError(f"PCP: the gateway refused: {RESULTS.get(result, f'result code {result}')}",
                         code=result)
    if len(data) < HEADER + MAP_BODY:
        raise ReplyError(f"PCP: a MAP answer of {len(data)} bytes is too short")
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    nonce = data[HEADER:HEADER + 12]
    protocol, internal, external = struct.unpack_from("!B3xHH", data, HEADER + 12)
    external_ip = _unmapped(data[HEADER + 20:HEADER + 36])
    if nonce != request.nonce:
        raise ReplyError("PCP: answer with another nonce")
    if protocol != request.protocol or internal != request.internal_port:
        raise ReplyError(f"PCP: answer for protocol {protocol} port {internal}, not "
                         f"{request.protocol} port {request.internal_port}")
    if request.lifetime and (not external or ipaddress.ip_address(external_ip).is_unspecified):
        raise ReplyError("PCP: a mapping without an external address or port")
    return MapResult(lifetime, epoch, internal, external, external_ip)


def encode_announce(client_ip: str) -> bytes:
    """ANNOUNCE (section 14.1): the header alone, lifetime 0; a PCP server
    answers it without creating anything, which is how C{p2pft doctor}
    asks whether one is there."""
    return struct.pack("!BBHI", VERSION, OP_ANNOUNCE, 0, 0) + _mapped(client_ip)


def parse_announce(data: bytes) -> int:
    """The epoch of a server's answer to ANNOUNCE, or a ReplyError."""
    if len(data) >= 2 and data[0] == 0:
        raise ReplyError("PCP: the gateway speaks NAT-PMP only", code=UNSUPP_VERSION)
    if len(data) < HEADER or len(data) > MAX_MESSAGE or len(data) % 4:
        raise ReplyError(f"PCP: an answer of {len(data)} bytes")
    version, op, _, result, _, epoch = struct.unpack_from("!BBBBII", data)
    if version != VERSION or op != 0x80 | OP_ANNOUNCE:
        raise ReplyError(f"PCP: not an answer to ANNOUNCE (version {version}, opcode byte {op:#04x})")
    if result != 0:
        raise ReplyError(f"PCP: the gateway refused: {RESULTS.get(result, f'result code {result}')}",
                         code=result)
    return epoch
