"""
NAT-PMP (RFC 6886) messages, as pure functions: the requests we send to
the gateway's UDP port 5351 and the parsing of its answers.  Only what a
client that maps one TCP port needs: the external address request
(opcode 0) and the TCP mapping request (opcode 2), whose lifetime 0 deletes
a mapping.  Every answer is checked against the request it answers; a
short, long, foreign or failing one is a L{ReplyError}.

Layouts (network byte order), RFC 6886 sections 3.2 and 3.3::

    external address request   version 0 | opcode 0                    2 bytes
    its response               version 0 | opcode 128 | result (16)
                               | epoch (32) | external IPv4 (32)       12 bytes
    mapping request            version 0 | opcode 1/2 | reserved (16)
                               | internal port | suggested external port
                               | requested lifetime (32)               12 bytes
    its response               version 0 | opcode 128+op | result (16)
                               | epoch (32) | internal port
                               | mapped external port | lifetime (32)  16 bytes
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from .errors import ReplyError

#: The server's port (RFC 6886 section 3.1); PCP shares it.
SERVER_PORT = 5351
VERSION = 0
OP_EXTERNAL = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
#: Result codes (section 3.5).
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized/refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


@attrs.frozen
class ExternalAddress:
    epoch: int
    address: str


@attrs.frozen
class MapResult:
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def _port(value: int, what: str, zero_ok: bool = False) -> int:
    if type(value) is not int or not (0 if zero_ok else 1) <= value <= 65535:
        raise ValueError(f"{what} must be a port number, not {value!r}")
    return value


def external_address_request() -> bytes:
    return struct.pack("!BB", VERSION, OP_EXTERNAL)


def map_request(internal_port: int, external_port: int, lifetime: int, opcode: int = OP_MAP_TCP) -> bytes:
    """A mapping request; C{lifetime} 0 (with C{external_port} 0) deletes
    the mapping of C{internal_port} (section 3.4)."""
    _port(internal_port, "internal_port")
    _port(external_port, "external_port", zero_ok=True)
    if opcode not in (OP_MAP_UDP, OP_MAP_TCP):
        raise ValueError(f"not a mapping opcode: {opcode!r}")
    if type(lifetime) is not int or not 0 <= lifetime < 2**32:
        raise ValueError(f"lifetime must be 0..2**32-1 seconds, not {lifetime!r}")
    return struct.pack("!BBHHHI", VERSION, opcode, 0, internal_port, external_port, lifetime)


def _header(data: bytes, opcode: int, size: int) -> tuple[int, int]:
    """The result code and epoch of an answer to C{opcode} that must be
    C{size} bytes long; a ReplyError for anything else, and for a failure
    result (which may come in a shorter, 8-byte answer)."""
    if len(data) < 4:
        raise ReplyError(f"NAT-PMP: a {len(data)}-byte answer is too short")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise ReplyError(f"NAT-PMP: answer of version {version}, not {VERSION}")
    if op != 128 + opcode:
        raise ReplyError(f"NAT-PMP: answer to opcode {op - 128 if op >= 128 else op}, not {opcode}")
    if result != 0:
        raise ReplyError(f"NAT-PMP: the gateway refused: {RESULTS.get(result, f'result code {result}')}",
                         code=result)
    if len(data) != size:
        raise ReplyError(f"NAT-PMP: answer of {len(data)} bytes, not {size}")
    (epoch,) = struct.unpack_from("!I", data, 4)
    return result, epoch


def parse_external_address(data: bytes) -> ExternalAddress:
    _, epoch = _header(data, OP_EXTERNAL, 12)
    address = ipaddress.IPv4Address(data[8:12])
    if address.is_unspecified:
        # (section 3.2: the gateway has no external address yet)
        raise ReplyError("NAT-PMP: the gateway has no external address")
    return ExternalAddress(epoch, str(address))


def parse_map(data: bytes, internal_port: int, opcode: int = OP_MAP_TCP) -> MapResult:
    """The answer to a mapping request for C{internal_port}."""
    _, epoch = _header(data, opcode, 16)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal != internal_port:
        raise ReplyError(f"NAT-PMP: answer for internal port {internal}, not {internal_port}")
    if lifetime and not external:
        raise ReplyError("NAT-PMP: a mapping of external port 0")
    return MapResult(epoch, internal, external, lifetime)
