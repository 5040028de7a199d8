"""Test files: random content, and a hash to compare them by."""

from __future__ import annotations

import hashlib
import os


def make_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(path: str, data: bytes = b"") -> str:
    """A file with C{data}, its folders made as needed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path
