"""
What the file system alone charges for a folder of small files, with no
network, no encryption and no Python beyond the system calls: the floor
under both rows of the suite's small-files comparison (p2pft and
C{tar x}).

Each way writes C{--files} files of 0-8 KiB (500 to a folder, as the
suite's folder) into a fresh folder of C{--dir}, in turn, C{--runs} times:

- C{tar}: C{open(O_CREAT|O_EXCL)}, C{write}, C{futimens}, C{close}, as
  C{tar x} does, and no sync;
- C{p2pft}: an unnamed file (C{O_TMPFILE}, made with its final mode),
  C{pwrite}, C{futimens}, C{linkat} to its name, C{close} -- what
  p2pft's receiver does for each small file -- then one C{syncfs};
- C{no sync}: the same without the C{syncfs} (what the name given only
  to a complete file costs, apart from durability);
- C{p2pft ×2}: the same, the folders split between two processes (what
  creating files on a second core could gain, if one were free).

It prints seconds and system CPU per way (medians), and microseconds per
file.  Nothing is deleted until the end (ext4 without a journal makes new
files slowly for a while after many were deleted: 30 s by its rule,
minutes as measured here, so a second run soon after a first one is
slower for every way).

    python bench/create_cost.py [--files 50000] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

# This checkout's p2pft, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from p2pft.transfer.store import syncfs  # noqa: E402

PER_FOLDER = 500
MAX_FILE = 8 * 1024
_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def _sizes(files: int) -> list[int]:
    rng = random.Random(files)
    return [rng.randint(0, MAX_FILE) for _ in range(files)]


def _folders(root: str, files: int) -> list[tuple[str, range]]:
    return [(os.path.join(root, f"d{f:04d}"), range(f * PER_FOLDER, min(files, (f + 1) * PER_FOLDER)))
            for f in range(-(-files // PER_FOLDER))]


def _write(way: str, folders: list[tuple[str, range]], sizes: list[int], data: bytes) -> None:
    """Write the files of C{folders} the C{way} way (in this process)."""
    now = time.time_ns()
    for folder, indices in folders:
        os.mkdir(folder)
        d = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in indices:
                name, size = f"f{i:07d}.dat", sizes[i]
                if way == "tar":
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=d)
                    os.write(fd, data[:size])
                    os.utime(fd, ns=(now, now))
                    os.close(fd)
                else:
                    fd = os.open(".", os.O_RDWR | _TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=d)
                    os.pwrite(fd, data[:size], 0)
                    os.utime(fd, ns=(now, now))
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=d, follow_symlinks=True)
                    os.close(fd)
        finally:
            os.close(d)


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)  # as the receiver syncs
    finally:
        os.close(fd)


def one(way: str, root: str, files: int) -> tuple[float, float]:
    """(seconds, system CPU seconds of this process and its children)."""
    sizes, data = _sizes(files), os.urandom(MAX_FILE)
    folders = _folders(root, files)
    os.mkdir(root)
    os.sync()
    t0, c0 = time.monotonic(), os.times()
    if way == "p2pft ×2":
        pid = os.fork()
        if pid == 0:
            try:
                _write("p2pft", folders[1::2], sizes, data)
            finally:
                os._exit(0)
        _write("p2pft", folders[0::2], sizes, data)
        os.waitpid(pid, 0)
    else:
        _write("tar" if way == "tar" else "p2pft", folders, sizes, data)
    if way not in ("tar", "no sync"):
        _syncfs(root)
    c1 = os.times()
    return time.monotonic() - t0, (c1.system - c0.system) + (c1.children_system - c0.children_system)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", help="where to write (default: a temporary folder beside the suite's)")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="p2pft-create-", dir=a.dir)
    ways = ("tar", "no sync", "p2pft", "p2pft ×2")
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    try:
        for n in range(a.runs):
            for way in ways:  # in turn: ext4 drifts from minute to minute
                results[way].append(one(way, os.path.join(work, f"{n}-{way.replace(' ', '')}"), a.files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.files:,} files of 0–{MAX_FILE // 1024} KiB, {PER_FOLDER} to a folder, medians of {a.runs}")
    print(f"{'way':10} {'seconds':>8} {'sys CPU s':>10} {'µs/file':>8}")
    for way in ways:
        wall = statistics.median(r[0] for r in results[way])
        cpu = statistics.median(r[1] for r in results[way])
        print(f"{way:10} {wall:8.2f} {cpu:10.2f} {wall / a.files * 1e6:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
