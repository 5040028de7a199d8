"""
The receiver's side of the disk: everything it writes, confined to its
output folder.

Every path is opened component by component from a descriptor of the output
folder, with C{O_NOFOLLOW}: a symbolic link already inside the folder (say
C{photos -> /etc}) is refused, never written through, so nothing lands
outside the folder whatever it contains.  Data arrives in a partial file,
C{NAME.p2pft-partial} beside its destination, which is kept when a transfer
is interrupted (that is what a resume continues) and moved into place,
without clobbering, once all of it arrived.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import stat
from typing import BinaryIO

from .errors import Declined, TransferFailed
from .manifest import PARTIAL_SUFFIX, printable

#: Folder descriptors kept open (a tree of 10,000 folders must not use 10,000).
OPEN_DIRS = 32


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


class OutputDir:
    """The output folder, opened once; paths are relative, joined by C{/}."""

    def __init__(self, path: str, fd: int | None = None):
        self.path = os.path.abspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if fd is None else fd
        self._dirs: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.umask = umask()

    def clone(self) -> "OutputDir":
        """Another handle on the same folder, for use on another thread."""
        return OutputDir(self.path, os.dup(self._fd))

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _dir(self, parts: list[str], create: bool) -> int:
        """A descriptor of the folder at C{parts}, made if missing and
        C{create}.  Valid only until the next call (the cache is small)."""
        if not parts:
            return self._fd
        key = "/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            self._dirs.move_to_end(key)
            return fd
        parent, name = self._dir(parts[:-1], create), parts[-1]
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(name, flags, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755 & ~self.umask | 0o700, dir_fd=parent)
                except FileExistsError:
                    pass  # made meanwhile; the open below checks what it is
                fd = os.open(name, flags, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise Declined(
                    f"{printable(key)} already exists and is not a folder "
                    "(p2pft never writes through symbolic links)") from None
            raise
        self._dirs[key] = fd
        if len(self._dirs) > OPEN_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _split(self, path: str, create: bool = False) -> tuple[int, str]:
        parts = path.split("/")
        return self._dir(parts[:-1], create), parts[-1]

    def lstat(self, path: str, partial: bool = False) -> os.stat_result | None:
        """What is at C{path} (its partial file), not following a link; None
        if nothing."""
        try:
            parent, name = self._split(path)
            return os.stat(name + PARTIAL_SUFFIX * partial, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def make_dir(self, path: str) -> None:
        self._dir(path.split("/"), create=True)

    def open_read(self, path: str, partial: bool = False) -> BinaryIO:
        parent, name = self._split(path)
        fd = os.open(name + PARTIAL_SUFFIX * partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        return os.fdopen(fd, "rb")

    def open_partial(self, path: str, offset: int) -> BinaryIO:
        """The partial file of C{path}, cut to C{offset} bytes and positioned
        there; made if missing.  Unbuffered: a full disk shows at once."""
        parent, name = self._split(path, create=True)
        fd = os.open(name + PARTIAL_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Declined(f"{printable(path + PARTIAL_SUFFIX)} is not a regular file")
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "r+b", buffering=0)

    def remove_partial(self, path: str) -> None:
        try:
            parent, name = self._split(path)
            os.unlink(name + PARTIAL_SUFFIX, dir_fd=parent)
        except (FileNotFoundError, TransferFailed):
            pass

    def place(self, path: str, f: BinaryIO, mode: int, mtime: int | None, overwrite: bool) -> None:
        """Close the verified partial file C{f} of C{path} and move it into
        place: never over an existing entry unless C{overwrite}, and never
        over a folder."""
        with f:
            os.fchmod(f.fileno(), mode)
            if mtime is not None:
                os.utime(f.fileno(), (mtime, mtime))
        parent, name = self._split(path, create=True)
        partial = name + PARTIAL_SUFFIX
        existing = self.lstat(path)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise Declined(f"{printable(path)} appeared as a folder while receiving; kept the partial file")
        if overwrite:
            os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
            return
        try:
            # Fails if the destination exists: no clobbering, no race.
            os.link(partial, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise Declined(f"{printable(path)} appeared while receiving; kept the existing file") from None
        except OSError:
            # File systems without hard links: check-then-rename is the best we can do.
            if self.lstat(path) is not None:
                raise Declined(f"{printable(path)} already exists") from None
            os.rename(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
            return
        os.unlink(partial, dir_fd=parent)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def sync(self) -> None:
        """Make everything written durable (file data, new names) before we
        acknowledge it: one syncfs of the output folder's file system
        instead of an fsync per file (10,000 small files)."""
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(self._fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
