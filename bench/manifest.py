"""
What a big manifest costs the receiver before anyone is asked: peak RSS and
CPU seconds of a Receiver fed OFFER + ENTRIES for N entries (a realistic
tree) through a fake channel, up to the moment it calls C{decide}.  A
benchmark, not a test.

    .venv/bin/python bench/manifest.py [--entries N] [--runs R] [--shape tree|deep|long]

Each run is a fresh subprocess, so the peak RSS (ru_maxrss) is that of one
receiver and nothing else; "baseline" is the same process's peak before the
first record (the interpreter, Twisted, p2pft).  CPU counts only the
receiver's work (the records are made between the timed calls).

The tree: one top folder, then four levels of 10 subfolders each, about 90
files in every folder (names 10-30 characters, a few with accents or in
mixed case), so file paths are 3 to 6 components deep.

Two hostile shapes measure the caps on what a receiver stores (MAX_NODES,
MAX_STORED_NAME_BYTES in p2pft.transfer.tree): "deep", where every entry is a
file 101 components deep whose 100 folders are all new (implied, never
offered themselves), and "long", where every entry is a file with a
252-byte name in one folder; and "worst", the most a receiver can be
made to hold: 2,000,000 entries, as many names, 64 MiB of them (with
--fold-case, the rules of a folder that ignores case, which keep more per
name).  A receiver that refuses the offer reports how
far it got, its peak RSS and CPU up to the refusal.
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


DEEP_FOLDERS = 100


def deep(n: int):
    """C{n} files, each below L{DEEP_FOLDERS} new folders that no entry offers."""
    below = "/".join(f"c{j:02d}" for j in range(DEEP_FOLDERS - 1))
    for i in range(n):
        yield [f"h{i:07d}/{below}/f", "file", 1, 0o644, 1_700_000_000]


def long(n: int):
    """One folder, then C{n} - 1 files with names of 252 bytes in it."""
    yield ["long", "dir", None, 0o755, 1_700_000_000]
    for i in range(n - 1):
        yield [f"long/{i:012d}" + "x" * 240, "file", 1, 0o644, 1_700_000_000]


def worst(n: int):
    """C{n} top-level files with new names of 33 bytes: at 2,000,000 entries
    every cap is (almost) reached at once -- entries, names, name bytes."""
    for i in range(n):
        yield [f"{i:09d}" + "w" * 24, "file", 1, 0o644, 1_700_000_000]


SHAPES = {"tree": tree, "deep": deep, "long": long, "worst": worst}


def records(n: int, shape: str = "tree", per_message: int = 32 * 1024):
    """The OFFER, then ENTRIES records of about C{per_message} bytes."""
    from p2pft.transfer.records import ENTRIES, OFFER

    yield OFFER, json.dumps({"entries": n, "files": 0, "bytes": 0}).encode()
    batch, size = [], 0
    for entry in SHAPES[shape](n):
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


def child(n: int, shape: str, fold_case: bool) -> None:
    from twisted.internet.task import Clock

    from p2pft.transfer import Receiver
    from p2pft.transfer.names import NameRules

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
    receiver = Receiver(channel, Clock(), out, decide,
                        rules=NameRules.where("linux", True) if fold_case else None)
    done = receiver.start()
    failed = []
    done.addErrback(failed.append)
    for kind, payload in records(n, shape):
        t0 = time.process_time()
        receiver.recordReceived(kind, payload)
        cpu += time.process_time() - t0
        if asked or receiver.state in ("closing", "failed"):
            break
    os.rmdir(out)
    row = {"entries": n, "baseline_mib": baseline / 1024}
    if not asked:
        # Refused (or never asked): how far it got, and what that cost.
        checker = receiver._reader.checker if receiver._reader is not None else None
        row.update(error=str(failed[0].value) if failed else "decide was never called",
                   taken=len(checker.entries) if checker is not None else None,
                   peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, cpu_s=cpu)
    else:
        row.update(files=asked["files"], dirs=asked["dirs"], peak_mib=asked["rss"] / 1024, cpu_s=asked["cpu"])
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tree",
                        help="tree: realistic; deep, long: hostile (see the module's docstring)")
    parser.add_argument("--fold-case", action="store_true",
                        help="check names as for a folder that ignores case")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.entries, args.shape, args.fold_case)
    rows = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--entries", str(args.entries),
                              "--shape", args.shape] + ["--fold-case"] * args.fold_case, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    if "error" in first:
        print(f"{first['entries']} entries offered ({args.shape}), refused after {first['taken']}: "
              f"{first['error']}; {len(rows)} run(s), medians:")
    else:
        print(f"{first['entries']} entries ({args.shape}{', fold-case' * args.fold_case}: {first['files']} files, {first['dirs']} folders), "
              f"{len(rows)} run(s), medians:")
    print(f"  peak RSS  {statistics.median(r['peak_mib'] for r in rows):8.1f} MiB "
          f"(baseline before the first record {statistics.median(r['baseline_mib'] for r in rows):.1f} MiB)")
    print(f"  CPU       {statistics.median(r['cpu_s'] for r in rows):8.2f} s up to "
          f"{'the refusal' if 'error' in first else 'decide'}")


if __name__ == "__main__":
    main()
