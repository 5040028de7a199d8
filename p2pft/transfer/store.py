"""
The receiver's side of the disk: everything it writes, confined to its
output folder.

Every path is opened component by component from a descriptor of the output
folder, with C{O_NOFOLLOW}: a symbolic link already inside the folder (say
C{photos -> /etc}) is refused, never written through, so nothing lands
outside the folder whatever it contains.  A file that has other hard links
(C{OUT/r.bin.p2pft-partial} made a second name of a file elsewhere) is never
read, hashed or written either: every file is checked on its descriptor,
after opening, to be a regular file with exactly one link.  Data arrives in a partial file,
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
from typing import BinaryIO, Callable

from ..errors import Declined, TransferFailed
from . import fsprobe, placing
from .manifest import PARTIAL_SUFFIX, printable

#: Folder descriptors kept open (a tree of 10,000 folders must not use 10,000).
OPEN_DIRS = 32


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


class ConfinedDir:
    """
    A folder, opened once, and what is below it, reached only through it:
    paths are relative, joined by C{/}, opened component by component
    (a cache of L{OPEN_DIRS} folder descriptors), never through a link;
    files are read only if they are regular files with one link.
    """

    def __init__(self, path: str, fd: int | None = None):
        self.path = os.path.abspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if fd is None else fd
        self._dirs: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.umask = umask()
        #: The folders this handle made (so nothing of ours was in them before).
        self.made: set[str] = set()

    def clone(self) -> "ConfinedDir":
        """Another handle on the same folder, for use on another thread."""
        return type(self)(self.path, os.dup(self._fd))

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
                    self.made.add(key)
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

    def fold_case(self) -> bool | None:
        """Whether the output folder's file system ignores case (probed:
        L{fsprobe}); None if the probe could not tell."""
        return fsprobe.probe(self._fd).case

    def make_dir(self, path: str) -> None:
        self._dir(path.split("/"), create=True)

    def _open_own(self, parent: int, name: str, shown: str, flags: int) -> int:
        """Open C{name} in the folder C{parent} without following a link and
        return the descriptor, once I{it} (not the name: no check-then-open
        race) is a regular file with exactly one link.  Anything else is not
        a file of ours: reading it could leak another file's content (as
        block hashes), writing it would write through the link."""
        try:
            # O_NONBLOCK: a FIFO planted at the name must not hang the open.
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Declined(f"{shown} is a symbolic link (p2pft never reads or writes through links)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Declined(f"{shown} is not a regular file")
            if st.st_nlink != 1:
                raise Declined(
                    f"{shown} has {st.st_nlink} hard links, so it is also a file elsewhere "
                    "(p2pft never reads or writes through links): delete or move it, then try again")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, path: str, partial: bool = False) -> BinaryIO:
        """What is at C{path} (its partial file), for reading: only a regular
        file with one link (L{Declined} otherwise)."""
        parent, name = self._split(path)
        fd = self._open_own(parent, name + PARTIAL_SUFFIX * partial,
                            printable(path + PARTIAL_SUFFIX * partial), os.O_RDONLY)
        return os.fdopen(fd, "rb")



#: O_TMPFILE (Linux 3.11+): a file made in a folder with no name in it.
_TMPFILE = getattr(os, "O_TMPFILE", 0)


class Unnamed:
    """A file with no name (L{OutputDir.open_unnamed}): its descriptor, and
    the mode it was made with.  A plain descriptor, not a file object: for
    a file of a few KiB, C{os.fdopen}'s own C{fstat} was one more system
    call of the six or seven a small file costs."""

    def __init__(self, fd: int, mode: int):
        self._fd = fd
        self.mode = mode
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __enter__(self) -> "Unnamed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputDir(ConfinedDir):
    """The output folder: the partial files data arrives in, and moving
    them into place once verified."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tmpfile = bool(_TMPFILE) and os.path.isdir("/proc/self/fd")

    def open_unnamed(self, path: str, mode: int = 0o600) -> Unnamed | None:
        """A new, empty file in the folder of C{path} with no name at all
        (O_TMPFILE), to be given its name by L{place}: one change to the
        folder per file instead of three (partial name made, linked,
        removed), which is what small files cost.  Nothing of it stays if
        the transfer stops, so only for files too small to be worth a
        resume; None where the file system (or the kernel) has no such
        files, or a partial file of C{path} is there (it gets cut and
        reused as before, or refused if it is not a file of ours).  It is
        made with C{mode} (what L{place} will give it, so it need not
        change it): having no name, it cannot be opened by anyone else."""
        if not self._tmpfile:
            return None
        folder = path.rpartition("/")[0]
        if folder not in self.made and self.lstat(path, partial=True) is not None:
            return None  # (in a folder we made there can be no partial file of an earlier run)
        parent, _ = self._split(path, create=True)
        try:
            fd = os.open(".", os.O_RDWR | _TMPFILE | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                self._tmpfile = False
                return None
            raise
        return Unnamed(fd, mode & ~self.umask)

    def open_partial(self, path: str, offset: int) -> BinaryIO:
        """The partial file of C{path}, cut to C{offset} bytes and positioned
        there; made if missing.  An existing one that is not a regular file
        with one link is refused (L{Declined}), never written or cut.
        Unbuffered: a full disk shows at once."""
        parent, name = self._split(path, create=True)
        fd = self._open_own(parent, name + PARTIAL_SUFFIX, printable(path + PARTIAL_SUFFIX),
                            os.O_RDWR | os.O_CREAT)
        try:
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

    def settle(self, path: str, st: os.stat_result) -> os.stat_result:
        """C{st}, what is at C{path}; if that is one file with its partial
        name (two links, the same inode), an earlier run died while placing
        it (between linking it into place and removing the partial name):
        the destination is the complete file, so drop the partial name."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 2:
            return st
        partial = self.lstat(path, partial=True)
        if partial is None or (partial.st_dev, partial.st_ino) != (st.st_dev, st.st_ino):
            return st
        self.remove_partial(path)
        return self.lstat(path) or st

    def place(self, path: str, f: BinaryIO, mode: int, mtime_ns: int | None, overwrite: bool) -> None:
        """Close the verified partial file C{f} of C{path} and move it into
        place: never over an existing entry unless C{overwrite}, and never
        over a folder.  What lands at C{path} is the file C{f} is open on,
        whatever the partial name meanwhile became (L{placing}: by its
        descriptor, or by a fresh name checked to be it; a swap of that
        name in the instant before its rename is detected and reported)."""
        with f:
            fd = f.fileno()
            unnamed = isinstance(f, Unnamed)
            if not (unnamed and f.mode == mode):
                os.fchmod(fd, mode)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            ours = os.fstat(fd)
            shown = printable(path + PARTIAL_SUFFIX)
            if ours.st_nlink == 0 and not unnamed:
                raise Declined(f"{shown} was deleted or replaced while receiving; nothing was moved into place")
            if ours.st_nlink != (0 if unnamed else 1):
                # (An unnamed file can be linked only by a process of ours,
                # through /proc/PID/fd.)
                raise Declined(f"{shown} got another hard link while receiving; kept it where it is")
            parent, name = self._split(path, create=True)
            if overwrite:
                self._not_a_folder(path)
            try:
                placing.link_into_place(parent, name, fd, ours, path, overwrite, unnamed)
            except Declined:
                self._not_a_folder(path)  # (what took the name: looked at only when one did)
                raise

    def _not_a_folder(self, path: str) -> None:
        existing = self.lstat(path)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise Declined(f"{printable(path)} appeared as a folder while receiving; kept the partial file")

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def sync(self) -> None:
        """Make everything written durable (file data, new names) before we
        acknowledge it: one syncfs of the output folder's file system
        instead of an fsync per file (10,000 small files)."""
        syncfs(self._fd)

    def sync_ahead(self) -> Callable[[], None]:
        """A function that starts making what was written so far durable,
        to run on a thread while more is written (L{sync} at the end then
        has little left to wait for).  It syncs through a descriptor of its
        own, so closing this folder meanwhile cannot pull one from under it."""
        fd = os.dup(self._fd)

        def run() -> None:
            try:
                syncfs(fd)
            finally:
                os.close(fd)

        return run


def syncfs(fd: int) -> None:
    """syncfs() of fd's file system, or sync() where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()
