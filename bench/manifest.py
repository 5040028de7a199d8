"""
What a big manifest costs the receiver before anyone is asked: peak RSS and
CPU seconds of a Receiver fed OFFER + ENTRIES for N entries (a realistic
tree) through a fake channel, up to the moment it calls C{decide}.  A
benchmark, not a test.

    .venv/bin/python bench/manifest.py [--entries N] [--runs R]

Each run is a fresh subprocess, so the peak RSS (ru_maxrss) is that of one
receiver and nothing else; "baseline" is the same process's peak before the
first record (the interpreter, Twisted, p2pft).  CPU counts only the
receiver's work (the records are made between the timed calls).

The tree: one top folder, then four levels of 10 subfolders each, about 90
files in every folder (names 10-30 characters, a few with accents or in
mixed case), so file paths are 3 to 6 components deep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu caf\u00e9 r\u00e9sum\u00e9 Makefile README notes").split()
EXTS = ("c", "h", "txt", "py", "json", "md", "jpg", "o")
# This checkout's p2pft, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FANOUT, LEVELS, FILES_PER_FOLDER = 10, 4, 90


def name(seed: int, folder: bool) -> str:
    """A deterministic name of 10 to 30 characters."""
    a, b = WORDS[seed % len(WORDS)], WORDS[(seed // 7) % len(WORDS)]
    base = f"{a}_{b}_{seed % 1000:03d}"[:26]
    if folder:
        return base
    return f"{base}.{EXTS[seed % len(EXTS)]}"


def tree(n: int):
    """Up to C{n} entries, depth first, folders before what is in them."""
    count = 0
    stack = [("bench_tree_root", 0)]
    while stack and count < n:
        path, level = stack.pop()
        yield [path, "dir", None, 0o755, 1_700_000_000]
        count += 1
        for i in range(FILES_PER_FOLDER):
            if count >= n:
                return
            yield [f"{path}/{name(count * 31 + i, False)}", "file", 1000 + i, 0o644, 1_700_000_000 + i]
            count += 1
        if level < LEVELS:
            for i in reversed(range(FANOUT)):
                stack.append((f"{path}/{name(count * 17 + i, True)}_{i}", level + 1))


def records(n: int, per_message: int = 32 * 1024):
    """The OFFER, then ENTRIES records of about C{per_message} bytes."""
    from p2pft.transfer.records import ENTRIES, OFFER

    yield OFFER, json.dumps({"entries": n, "files": 0, "bytes": 0}).encode()
    batch, size = [], 0
    for entry in tree(n):
        batch.append(entry)
        size += len(entry[0]) * 3 + 48
        if size >= per_message:
            yield ENTRIES, json.dumps({"entries": batch}, separators=(",", ":")).encode()
            batch, size = [], 0
    if batch:
        yield ENTRIES, json.dumps({"entries": batch}, separators=(",", ":")).encode()


class Channel:
    """Just enough of a channel for a Receiver."""

    def __init__(self):
        self.handler = None
        self.sent = []

    def attach(self, handler):
        self.handler = handler

    def send(self, kind, payload=b""):
        self.sent.append((kind, bytes(payload)))

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def pauseReading(self):
        pass

    def resumeReading(self):
        pass

    def close(self):
        self.handler.channelLost("closed")

    def abort(self):
        pass


def child(n: int) -> None:
    from twisted.internet.task import Clock

    from p2pft.transfer import Receiver

    out = tempfile.mkdtemp(prefix="p2pft-bench-manifest-")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    asked = {}
    cpu = 0.0

    def decide(offer):
        asked["cpu"] = cpu + (time.process_time() - t0)
        asked["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        asked["files"], asked["dirs"] = offer.files, offer.dirs
        return False

    channel = Channel()
    receiver = Receiver(channel, Clock(), out, decide)
    done = receiver.start()
    failed = []
    done.addErrback(failed.append)
    for kind, payload in records(n):
        t0 = time.process_time()
        receiver.recordReceived(kind, payload)
        cpu += time.process_time() - t0
        if asked or receiver.state in ("closing", "failed"):
            break
    os.rmdir(out)
    if not asked:
        print(json.dumps({"error": str(failed[0].value) if failed else "decide was never called"}))
        return
    print(json.dumps({"entries": n, "files": asked["files"], "dirs": asked["dirs"],
                      "baseline_mib": baseline / 1024, "peak_mib": asked["rss"] / 1024,
                      "cpu_s": asked["cpu"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.entries)
    rows = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--entries", str(args.entries)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        if "error" in row:
            sys.exit(f"bench/manifest.py: the receiver refused the offer: {row['error']}")
        rows.append(row)
    first = rows[0]
    print(f"{first['entries']} entries ({first['files']} files, {first['dirs']} folders), "
          f"{len(rows)} run(s), medians:")
    print(f"  peak RSS  {statistics.median(r['peak_mib'] for r in rows):8.1f} MiB "
          f"(baseline before the first record {statistics.median(r['baseline_mib'] for r in rows):.1f} MiB)")
    print(f"  CPU       {statistics.median(r['cpu_s'] for r in rows):8.2f} s up to decide")


if __name__ == "__main__":
    main()
