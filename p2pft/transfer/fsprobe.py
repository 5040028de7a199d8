"""
Whether the file system of a folder ignores case, found out the only
reliable way: make a name in a private temporary subfolder and see whether
another spelling finds it.  Mount options (vfat, ext4 casefold, a
case-insensitive APFS or NTFS) decide it, not the operating system.
(Unicode form needs no probe: every name is NFC-normalised before it is
checked or written, L{p2pft.transfer.names}.)
"""

from __future__ import annotations

import errno
import os
import secrets

import attrs

#: Prefix of the probe's temporary subfolder (removed right after; one left
#: behind by a receiver killed at that instant is empty and harmless).
PROBE_PREFIX = ".p2pft-probe-"


@attrs.frozen
class Folding:
    """What the file system treats as the same name; None where the probe
    could not tell (say, a read-only folder)."""

    case: bool | None


def _collide(dir_fd: int, made: str, other: str) -> bool | None:
    """Make C{made}; does C{other} find it?"""
    try:
        fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError:
        return None  # this file system cannot even hold the name
    os.close(fd)
    try:
        os.stat(other, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        return None if e.errno != errno.ENOENT else False


def probe(dir_fd: int) -> Folding:
    """Probe the file system of the folder open as C{dir_fd}; never raises
    for what the folder allows or refuses."""
    name = PROBE_PREFIX + secrets.token_hex(8)
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except OSError:
        return Folding(None)
    try:
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        _remove(dir_fd, name, None)
        return Folding(None)
    try:
        case = _collide(sub, "p2pft-case", "P2PFT-CASE")
    finally:
        _remove(dir_fd, name, sub)
    return Folding(case)


def _remove(dir_fd: int, name: str, sub: int | None) -> None:
    try:
        if sub is not None:
            for child in os.listdir(sub):
                os.unlink(child, dir_fd=sub)
    except OSError:
        pass
    finally:
        if sub is not None:
            os.close(sub)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass
