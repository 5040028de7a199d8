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


def without_proc_links(testcase) -> None:
    """For the rest of C{testcase}: no /proc to link a descriptor through
    (as on systems without it), everything else as usual."""
    real_link = os.link

    def link(src, *args, **kw):
        if isinstance(src, str) and src.startswith("/proc/"):
            raise FileNotFoundError(src)
        return real_link(src, *args, **kw)

    testcase.patch(os, "link", link)
