"""
Loopback throughput of one encrypted p2pft transfer: server, receiver and
sender as real processes on 127.0.0.1.  Prints MB/s, CPU seconds and peak RSS
per side.  A benchmark, not a test: numbers depend on the machine.

    .venv/bin/python bench/loopback.py [--size MiB] [--runs N] [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PEER = [sys.executable, "-m", "p2pft"]


def start(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*PEER, *args], env=env, stdin=subprocess.DEVNULL, **kw)


def listening_address(server) -> str:
    """HOST:PORT from a server started with stderr=PIPE: its 'listening on'
    line; the rest of its log is drained on a thread, so a server that logs
    every pairing never blocks on a full pipe."""
    for raw in server.stderr:
        m = re.search(r"listening on (\S+)", raw.decode(errors="replace"))
        if m:
            threading.Thread(target=lambda: any(False for _ in server.stderr), daemon=True).start()
            return m.group(1)
    raise SystemExit("bench: the server exited without listening")


def reap(proc):
    """Wait for a child and return (exit code, cpu seconds, peak RSS MiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, usage.ru_stime


def _status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def make_source(path, mib):
    if os.path.exists(path) and os.path.getsize(path) == mib << 20:
        return
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(mib):
            f.write(block[i % 251:] + block[:i % 251])


def one_run(src, work, server_addr):
    out = tempfile.mkdtemp(dir=work)
    sender = start(["send", "--json", "--code", "900-bench-run", server_addr, src],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    receiver = start(["receive", "--json", "--yes", "-o", out, server_addr, "900-bench-run"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    r_out = receiver.stdout.read().decode()
    s_out = sender.stdout.read().decode()
    r = reap(receiver)
    s = reap(sender)
    wall = time.monotonic() - t0
    done = [json.loads(l) for l in r_out.splitlines() if '"done"' in l]
    if r[0] or s[0] or not done:
        raise SystemExit(f"transfer failed: receiver {r[0]}, sender {s[0]}\n{r_out}\n{s_out}")
    shutil.rmtree(out)
    if done[0]["path"] != ("relay" if PEER[-1].endswith("relayonly_p2pft.py") else "direct"):
        raise SystemExit(f"unexpected path {done[0]['path']}")
    return {"seconds": done[0]["seconds"], "wall": wall, "bytes": done[0]["bytes"],
            "sender_cpu": s[1], "receiver_cpu": r[1], "sender_sys": s[3], "receiver_sys": r[3], "sender_rss": s[2], "receiver_rss": r[2]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--null-cipher", action="store_true",
                   help="peers run bench/nullcipher_p2pft.py: same framing, no encryption (to measure its cost)")
    p.add_argument("--relay", action="store_true",
                   help="peers ignore direct candidates (bench/relayonly_p2pft.py): measure the server's relay")
    a = p.parse_args()
    if a.null_cipher:
        PEER[1:] = [os.path.join(ROOT, "bench", "nullcipher_p2pft.py")]
    if a.relay:
        PEER[1:] = [os.path.join(ROOT, "bench", "relayonly_p2pft.py")]
    work = a.work_dir or tempfile.mkdtemp(prefix="p2pft-bench-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, f"source-{a.size}M.bin")
    make_source(src, a.size)
    server = start(["server", "--relay", "--port", "tcp:0:interface=127.0.0.1"], stderr=subprocess.PIPE)
    addr = listening_address(server)
    try:
        runs = [one_run(src, work, addr) for _ in range(a.runs)]
        server_rss = _status(server.pid, "VmHWM") / 1024
        with open(f"/proc/{server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        server_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        server.kill()
        server.wait()
    med = lambda k: statistics.median(r[k] for r in runs)
    size = runs[0]["bytes"]
    label = "NULL CIPHER (benchmark only)" if a.null_cipher else "AES-256-GCM"
    label += ", THROUGH THE RELAY" if a.relay else ", direct"
    print(f"p2pft loopback, {label}, {size / 2**20:.0f} MiB, {a.runs} runs (medians)")
    print(f"  transfer throughput   {size / med('seconds') / 1e6:8.1f} MB/s  ({med('seconds'):.2f} s, OFFER..ACK)")
    print(f"  receiver start..exit  {size / med('wall') / 1e6:8.1f} MB/s  ({med('wall'):.2f} s, incl. rendezvous + punch)")
    print(f"  CPU seconds           sender {med('sender_cpu'):.2f}, receiver {med('receiver_cpu'):.2f}"
          f"  (of which system: {med('sender_sys'):.2f}, {med('receiver_sys'):.2f})")
    print(f"  peak RSS              sender {med('sender_rss'):.0f} MiB, receiver {med('receiver_rss'):.0f} MiB")
    print(f"  server (+relay)       {server_cpu:.2f} CPU-s over all {a.runs} runs, peak RSS {server_rss:.0f} MiB")
    if not a.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
