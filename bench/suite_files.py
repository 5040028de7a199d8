"""
The small-files rows of the benchmark suite: a folder of many files of
0-8 KiB, moved by p2pft (folder → folder) and by C{tar c | socat} →
C{socat | tar x} on the same loopback link.  Both are dominated by what
the file system does per file (create, write, close, set the times); the
clock runs from the receiver's start to its done event (p2pft) or its exit
(tar), so the "start→done" column is the one to compare.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

from suite_procs import BenchError, Procs, free_port, p2pft_argv, p2pft_env
from suite_rows import CODE, Bench, Row, Run, p2pft_server

#: Largest file of the folder (sizes are uniform in 0..MAX_FILE).
MAX_FILE = 8 * 1024
#: Files per sub-folder (a deep, wide tree like a source checkout's).
PER_FOLDER = 500


def make_folder(path: str, files: int) -> int:
    """C{files} files of 0..MAX_FILE random bytes under C{path} (reused
    when it is there with that many); returns their total size."""
    marker = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.done")
    if os.path.exists(marker):
        with open(marker) as f:
            return int(f.read())
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(files)
    block = os.urandom(MAX_FILE * 2)
    total = 0
    for i in range(files):
        folder = os.path.join(path, f"d{i // PER_FOLDER:04d}")
        if i % PER_FOLDER == 0:
            os.makedirs(folder)
        n = rng.randint(0, MAX_FILE)
        start = rng.randrange(MAX_FILE)
        with open(os.path.join(folder, f"f{i:07d}.dat"), "wb") as f:
            f.write(block[start:start + n])
        total += n
    with open(marker, "w") as f:
        f.write(str(total))
    return total


def _check(bench: Bench, out: str, name: str, files: int, total: int) -> None:
    """The output holds the folder: that many files, that many bytes.  It
    is removed only when the suite ends: ext4 makes a new file slowly for
    a while after many were deleted (its inode allocator skips inodes freed
    in the last 30 s or so: C{recently_deleted}, seen with perf taking 60 %
    of every create), which would slow whichever run comes next."""
    count = size = 0
    for root, _, names in os.walk(os.path.join(out, name)):
        count += len(names)
        size += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
    bench.remove_later.append(out)
    if (count, size) != (files, total):
        raise BenchError(f"expected {files} files of {total} bytes in all, found {count} of {size}")


def _run(bench: Bench, n: int, sender, receiver, done: str | None, files: int, total: int) -> Run:
    deadline = time.monotonic() + 120 + files / 200
    out = bench.out_dir()
    s = sender(n)
    r = receiver(n, out)
    if done:
        t, m = r.wait_line(done, deadline)
        if json.loads(m.string).get("files") != files:
            raise r.failed(f"done says {m.string.strip()}")
    rx = r.wait_ok(deadline)
    sx = s.wait_ok(deadline)
    end = t if done else rx.time
    _check(bench, out, os.path.basename(bench.folder), files, total)
    return Run(total, transfer=end - r.started, total=end - r.started, sender=sx.usage, receiver=rx.usage)


def _p2pft_files_runs(bench: Bench, procs: Procs):
    """One run of the files row at a time: C{one(n) -> Run}."""
    files, total = bench.files, bench.folder_bytes
    _, address = p2pft_server(procs, "server")

    def sender(n):
        s = procs.start(f"sender-{n}", p2pft_argv("send", "--json", "--code", CODE, address, bench.folder),
                        lines="stdout", env=p2pft_env())
        s.wait_line(r'"event": "code"', time.monotonic() + 60 + files / 2000)
        return s

    def receiver(n, out):
        return procs.start(f"receiver-{n}", p2pft_argv("receive", "--yes", "--json", "-o", out, address, CODE),
                           lines="stdout", env=p2pft_env())

    return lambda n: _run(bench, n, sender, receiver, r'"event": "done"', files, total)


def _tar_runs(bench: Bench, procs: Procs):
    """One run of the tar row at a time: C{one(n) -> Run}."""
    files, total = bench.files, bench.folder_bytes
    socat = bench.tools.get("socat")
    parent, name = os.path.split(bench.folder)

    def sender(n):
        port = bench.tar_port = free_port()
        s = procs.start(f"sender-{n}", ["sh", "-c", f'tar c -C "$1" "$2" | {socat} -d -d -u -b 1048576 '
                                                    f'STDIN TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr',
                                        "sh", parent, name], lines="stderr")
        s.wait_line("listening on", time.monotonic() + 30)
        return s

    def receiver(n, out):
        return procs.start(f"receiver-{n}", ["sh", "-c", f'{socat} -u -b 1048576 TCP:127.0.0.1:{bench.tar_port} '
                                                       f'STDOUT | tar x -C "$1"', "sh", out])

    return lambda n: _run(bench, n, sender, receiver, None, files, total)


def files_and_tar(bench: Bench, keys: list[str]) -> list[Row]:
    """The rows C{keys} ("files", "tar"), their runs taken in turn (files,
    tar, files, tar, ...): both meet the file system in the same state.
    How fast ext4 creates files drifts by 2x and more from one minute to
    the next on these machines (what was deleted lately, how full its
    block groups are), so three runs of one row and then three of the
    other compared two different file systems."""
    made = {"files": (Row("files", f"p2pft {bench.files:,} small files"), _p2pft_files_runs),
            "tar": (Row("tar", "tar | socat (plain)"), _tar_runs)}
    rows = [made[key][0] for key in keys]
    if "tar" in keys and not bench.tools.get("socat"):
        made["tar"][0].status = "skipped: " + bench.missing.get("socat", "socat not installed")
    with Procs(os.path.join(bench.work, "logs", "files")) as procs:
        ones = {}
        for row in rows:
            try:
                if row.status == "ok":
                    ones[row.key] = made[row.key][1](bench, procs)
            except BenchError as e:
                row.status = f"failed: {e}"
        for n in range(bench.runs):
            for key, one in ones.items():
                row = made[key][0]
                try:
                    if row.status == "ok":
                        # tar x leaves its files in the page cache (p2pft
                        # syncs): without this, their writeback would land
                        # in the next run, which is p2pft's.
                        os.sync()
                        row.runs.append(one(n))
                except BenchError as e:
                    row.status = f"failed: {e}"
    made["files"][0].notes.append(
        f"{bench.files:,} files of 0–{MAX_FILE // 1024} KiB ({bench.folder_bytes / 1e6:.0f} MB) in "
        f"{-(-bench.files // PER_FOLDER)} folders; the sender scans and hashes nothing ahead; "
        "its runs taken in turn with tar's")
    made["tar"][0].notes.append("tar c | socat → socat | tar x: plain TCP, no encryption, no checks, no resume")
    return rows
