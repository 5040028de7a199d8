"""
What resuming costs, and how long many small files take: real server,
sender and receiver processes on loopback.  A benchmark, not a test.

    .venv/bin/python bench/resume.py [--size MiB] [--runs N] [--files N]

Rows (medians):
  fresh       the whole file, nothing at the receiver
  half kept   the receiver kept the first half (NAME.p2pft-partial): both
              sides hash it (4 MiB blocks), then the second half travels
  all there   the receiver has the complete file: both sides hash it all,
              nothing travels (the pure cost of proving what is there)
  N files     a tree of N small files, fresh, then once more (all checked)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loopback import listening_address, make_source, reap, start  # noqa: E402

CODE = "901-resume-bench"


def transfer(addr: str, paths: list[str], out: str) -> dict:
    """One send and receive; the receiver's done event, plus wall time."""
    sender = start(["send", "--json", "--code", CODE, addr, *paths],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    receiver = start(["receive", "--json", "--yes", "-o", out, addr, CODE],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    events = receiver.stdout.read().decode()
    sender.stdout.read()
    r, s = reap(receiver), reap(sender)
    wall = time.monotonic() - started
    done = [json.loads(line) for line in events.splitlines() if '"done"' in line]
    if r[0] or s[0] or not done:
        raise SystemExit(f"transfer failed: receiver {r[0]}, sender {s[0]}\n{events}")
    return dict(done[0], wall=wall)


def fresh_dir(work: str) -> str:
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    return out


def keep_prefix(src: str, out: str, length: int) -> None:
    with open(src, "rb") as f, open(os.path.join(out, os.path.basename(src) + ".p2pft-partial"), "wb") as g:
        while length > 0:
            block = f.read(min(length, 1 << 20))
            g.write(block)
            length -= len(block)


def make_tree(root: str, count: int) -> None:
    per_dir = 200
    for i in range(count):
        folder = os.path.join(root, f"d{i // per_dir:04}")
        if i % per_dir == 0:
            os.makedirs(folder)
        with open(os.path.join(folder, f"f{i:06}.txt"), "wb") as f:
            f.write(os.urandom(i % 4096))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--work-dir", default=None)
    a = p.parse_args()
    work = a.work_dir or tempfile.mkdtemp(prefix="p2pft-resume-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, f"source-{a.size}M.bin")
    make_source(src, a.size)
    size = a.size << 20
    server = start(["server", "--port", "tcp:0:interface=127.0.0.1"], stderr=subprocess.PIPE)
    addr = listening_address(server)
    rows = {}
    try:
        def median_of(prepare, paths):
            results = []
            for _ in range(a.runs):
                out = fresh_dir(work)
                prepare(out)
                results.append(transfer(addr, paths, out))
            return {k: statistics.median(r[k] for r in results) for k in ("seconds", "wall", "resumed", "bytes")}

        rows["fresh"] = median_of(lambda out: None, [src])
        rows["half kept"] = median_of(lambda out: keep_prefix(src, out, size // 2), [src])
        rows["all there"] = median_of(lambda out: shutil.copyfile(src, os.path.join(out, os.path.basename(src))),
                                      [src])
        tree = os.path.join(work, "tree")
        if not os.path.isdir(tree):
            make_tree(tree, a.files)
        out = fresh_dir(work)
        rows[f"{a.files} files"] = transfer(addr, [tree], out)
        rows[f"{a.files} files again"] = transfer(addr, [tree], out)
    finally:
        server.kill()
        server.wait()
    print(f"p2pft resume and many files, loopback, {a.size} MiB file, {a.runs} runs (medians)")
    print(f"  {'':22} {'transfer s':>10} {'wall s':>8} {'resumed MiB':>12}")
    for name, r in rows.items():
        print(f"  {name:22} {r['seconds']:10.2f} {r['wall']:8.2f} {r['resumed'] / 2**20:12.0f}")
    fresh, half, full = rows["fresh"], rows["half kept"], rows["all there"]
    setup = fresh["wall"] - fresh["seconds"]  # start-up, rendezvous, punching
    print(f"  resume overhead: {half['wall'] - fresh['wall'] + fresh['seconds'] / 2:.2f} s for "
          f"{a.size // 2} MiB kept (wall time of 'half kept' minus that of 'fresh' plus the time the "
          f"kept half took to send); proving a whole {a.size} MiB file: {full['wall'] - setup:.2f} s")
    if not a.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
