"""
Moving a received file into place (L{p2pft.transfer.store.OutputDir.place}):
what lands at the destination's name is the file written, never whatever a
name in the output folder meanwhile became.  The file is linked by its
descriptor (Linux, /proc) straight to the destination, which fails if
something is there (no clobbering, no race); to replace a file
(C{overwrite}) it is linked to a fresh random name in the same folder,
which is then renamed over the destination.  Without /proc the partial name
is linked to such a random name, which is checked, by inode, to be our file
before it is renamed or linked into place.  Only a process that swaps that
random name in the instant between the check and the rename could put
something else at the destination: that is detected right after and
reported (L{Declined}), not prevented.  On a file system without hard links,
check-then-rename is the best there is.
"""

from __future__ import annotations

import os
import secrets

from ..errors import Declined
from .names import PARTIAL_SUFFIX, printable

#: Prefix of the random name a file is linked to before it is renamed over
#: the file it replaces; one left behind by a receiver killed at that
#: instant is a second name of a complete received file.
STAGE_PREFIX = ".p2pft-place-"


def link_into_place(parent: int, name: str, fd: int, ours: os.stat_result, path: str, overwrite: bool,
                    unnamed: bool = False) -> None:
    """Put the file open as C{fd} (described by C{ours}; its partial name
    C{name}.p2pft-partial, unless it is C{unnamed}) at C{name} in the
    folder C{parent} (C{path}: for messages), then drop the partial name if
    it is still ours."""
    source = f"/proc/self/fd/{fd}"
    try:
        os.link(source, name, dst_dir_fd=parent, follow_symlinks=True)
    except FileExistsError:
        if not overwrite:
            raise Declined(f"{printable(path)} appeared while receiving; kept the existing file") from None
        # The destination's name now means our file; another hard link of
        # what was there keeps its old content.
        temp = stage(parent, source, None, ours, printable(path + PARTIAL_SUFFIX))
        os.replace(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        check_ours(parent, name, ours, printable(path))
    except OSError:
        if unnamed:
            raise
        return _by_name(parent, name, ours, path, overwrite)
    if not unnamed and is_ours(parent, name + PARTIAL_SUFFIX, ours):
        os.unlink(name + PARTIAL_SUFFIX, dir_fd=parent)


def stage(parent: int, source: str, source_dir: int | None, ours: os.stat_result, shown: str) -> str:
    """A fresh random name in the folder C{parent} for the file C{source}
    (a path, followed; or a name in the folder C{source_dir}, not
    followed), checked to be our file; raises L{Declined} (and removes the
    name) if it is not."""
    while True:
        temp = STAGE_PREFIX + secrets.token_hex(8)
        try:
            if source_dir is None:
                os.link(source, temp, dst_dir_fd=parent, follow_symlinks=True)
            else:
                os.link(source, temp, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
            break
        except FileExistsError:
            continue
    if not is_ours(parent, temp, ours):
        os.unlink(temp, dir_fd=parent)
        raise Declined(f"{shown} was replaced by another file while receiving (p2pft never moves "
                       "a file it did not write)")
    return temp


def is_ours(parent: int, name: str, ours: os.stat_result) -> bool:
    """Whether C{name} is (still) the file C{ours} describes."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


def check_ours(parent: int, name: str, ours: os.stat_result, shown: str) -> None:
    if not is_ours(parent, name, ours):
        raise Declined(f"{shown} was replaced by another file while receiving (p2pft never moves "
                       "a file it did not write)")


def _by_name(parent: int, name: str, ours: os.stat_result, path: str, overwrite: bool) -> None:
    """L{link_into_place} without /proc: by the partial name, linked to a
    checked random name first."""
    partial, shown = name + PARTIAL_SUFFIX, printable(path + PARTIAL_SUFFIX)
    check_ours(parent, partial, ours, shown)
    try:
        temp = stage(parent, partial, parent, ours, shown)
    except Declined:
        raise
    except OSError:
        # File systems without hard links: check-then-rename is the best we can do.
        if not overwrite and _exists(parent, name):
            raise Declined(f"{printable(path)} already exists") from None
        os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
        check_ours(parent, name, ours, printable(path))
        return
    if overwrite:
        os.replace(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
    else:
        try:
            # Fails if the destination exists: no clobbering, no race.
            os.link(temp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise Declined(f"{printable(path)} appeared while receiving; kept the existing file") from None
        finally:
            os.unlink(temp, dir_fd=parent)
    check_ours(parent, name, ours, printable(path))
    if is_ours(parent, partial, ours):
        os.unlink(partial, dir_fd=parent)


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
