"""
CPU cost of p2pft's record encryption, per GiB, in this process: AES-256-GCM
seal and open of DATA records of the transfer's size (CHUNK, 1 MiB) exactly as the transfer does them, next
to what a SHA-256 of the same bytes costs (the resume's block hashes; the
whole-file hash p2pft no longer computes, docs/PROTOCOL.md says why).  Compare with bench/loopback.py's
CPU seconds to see the share of encryption in a whole transfer.

The last line seals the same bytes on two threads at once: if the AEAD
released the GIL, that would take about half as long as on one, and
sealing on a worker thread could overlap with the reactor's own work.  It
did not when p2pft chose to seal and open on the reactor thread
(cryptography 44-49); on 2026-12-03, with cryptography 50.0.2, it took
0.73 x the time of one thread: a worker thread may pay now, not yet
measured in a transfer.

    .venv/bin/python bench/crypto_cost.py [--size MiB]
"""

import argparse
import hashlib
import os
import threading
import time

from p2pft.secure import RecordOpener, RecordSealer
from p2pft.transfer.records import DATA
from p2pft.transfer.sender import CHUNK


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    a = p.parse_args()
    chunk = os.urandom(CHUNK)
    n = (a.size << 20) // CHUNK
    key = os.urandom(32)
    frames = []

    def seal():
        sealer = RecordSealer(key)
        for i in range(n):
            f = sealer.seal(DATA, chunk)
            if i < 64:
                frames.append(b"".join(f))

    def open_():
        # Re-open the first 64 frames over and over with fresh openers: the
        # same work per byte as a real stream.
        done = 0
        while done < n:
            opener = RecordOpener(key)
            for f in frames[: min(64, n - done)]:
                opener.feed(f)
                done += 1

    def sha():
        h = hashlib.sha256()
        for _ in range(n):
            h.update(chunk)

    gib = a.size / 1024
    for name, fn in (("seal (sender)", seal), ("open (receiver)", open_), ("sha256 (for scale)", sha)):
        wall, cpu = timed(fn)
        print(f"{name:20} {cpu / gib:6.2f} CPU-s/GiB  {a.size * 1.048576 / wall:8.0f} MB/s")

    def seal_on(threads: int):
        def part():
            sealer = RecordSealer(key)
            for _ in range(n // threads):
                sealer.seal(DATA, chunk)
        workers = [threading.Thread(target=part) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    one, _ = timed(lambda: seal_on(1))
    two, _ = timed(lambda: seal_on(2))
    print(f"seal on 2 threads    {two / one:6.2f} × the time on 1 "
          f"({'the AEAD releases the GIL' if two < one * 0.75 else 'no overlap: the AEAD holds the GIL'})")


if __name__ == "__main__":
    main()
