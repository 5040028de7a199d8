"""
Block hashes: how a receiver proves which data it already has, so a resumed
transfer sends only the rest.

A file is cut into L{BLOCK}-sized blocks from its start; each block's proof
is its SHA-256.  The receiver hashes every whole block of its partial file
(every block of an existing complete file); the sender reads its own file
block by block while the hashes match.  Data that travels needs no such
proof: the AEAD records already authenticate every byte and their order.
These functions block on disk reads: call them off the reactor thread.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterator

import attrs

BLOCK = 4 << 20
#: Most block hashes one HAVE message carries (64 hex digits each).
HASHES_PER_MESSAGE = 768


def block_count(size: int) -> int:
    return -(-size // BLOCK)


@attrs.define
class Prefix:
    """The first C{length} bytes of a file: one hash per block."""

    hashes: list[bytes] = attrs.Factory(list)
    length: int = 0

    def add(self, block: bytes, digest: bytes) -> None:
        self.hashes.append(digest)
        self.length += len(block)


def _blocks(f: BinaryIO) -> Iterator[bytes]:
    """Blocks of f (a buffered file: it reads short only at its end) from
    where it stands, the last one possibly short."""
    while True:
        block = f.read(BLOCK)
        if not block:
            return
        yield block
        if len(block) < BLOCK:
            return


def hash_prefix(f: BinaryIO, limit: int) -> Prefix:
    """Hash f from its start up to C{limit} bytes (a multiple of L{BLOCK},
    or the file's whole size), stopping early at its end."""
    prefix = Prefix()
    for block in _blocks(f):
        if prefix.length + len(block) > limit:
            block = block[: limit - prefix.length]
        if block:
            prefix.add(block, hashlib.sha256(block).digest())
        if prefix.length >= limit:
            break
    return prefix


def match_prefix(f: BinaryIO, hashes: list[bytes]) -> Prefix:
    """Read f from its start while its blocks match C{hashes}."""
    prefix = Prefix()
    for block, expected in zip(_blocks(f), hashes):
        digest = hashlib.sha256(block).digest()
        if digest != expected:
            break
        prefix.add(block, digest)
    return prefix
