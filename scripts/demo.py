"""
p2pft's main job, on one machine: start a rendezvous server, a sender and a
receiver, move a file, check it arrived intact.

As root (with `ip netns` and iptables) the three run in a NAT lab: the
server on a "public" network, sender and receiver each behind its own
MASQUERADE router that drops unsolicited inbound packets, so the transfer
only works because the connector punches through both NATs.  Otherwise they
run on loopback.

    bash scripts/demo.sh [--size MiB] [--loopback]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import natlab  # noqa: E402
from tests.files import sha256_of  # noqa: E402

DEADLINE = 120


class Runner:
    """Starts labelled processes, echoes their output, collects JSON events."""

    def __init__(self, lab):
        self.lab = lab
        self.events: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.ended: dict[str, int] = {}  # label -> output streams at their end

    def start(self, label: str, host: str, args: list[str]) -> subprocess.Popen:
        argv = [sys.executable, "-m", "p2pft", *args]
        if self.lab is not None:
            argv = self.lab.exec_argv(host, argv)
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env, text=True)
        self.procs.append(proc)
        for stream, is_json in ((proc.stdout, True), (proc.stderr, False)):
            threading.Thread(target=self._pump, args=(label, stream, is_json), daemon=True).start()
        return proc

    def _pump(self, label: str, stream, is_json: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if is_json and line.startswith("{"):
                self.events.put((label, json.loads(line), time.monotonic()))
            else:
                # One write per line: two pump threads must not interleave.
                sys.stdout.write(f"  [{label:8}] {line}\n")
                sys.stdout.flush()
                self.events.put((label, {"event": "_line", "line": line}, time.monotonic()))
        self.events.put((label, {"event": "_eof"}, time.monotonic()))

    def wait_event(self, label: str, name: str, pattern: str | None = None):
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            try:
                who, event, when = self.events.get(timeout=end - time.monotonic())
            except queue.Empty:
                break
            if who == label and event["event"] == name and (pattern is None or pattern in event.get("line", "")):
                return event, when
            if who == label and event["event"] == "_eof":
                self.ended[label] = self.ended.get(label, 0) + 1
                if self.ended[label] == 2:  # stdout and stderr closed: it has exited
                    raise SystemExit(f"demo: {label} exited before it reported {name}")
        raise SystemExit(f"demo: {label} never reported {name}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="size of the demo file in MiB (default 16)")
    parser.add_argument("--loopback", action="store_true", help="skip the NAT lab even as root")
    args = parser.parse_args()

    reason = "--loopback given" if args.loopback else natlab.unavailable_reason()
    lab = None
    if reason is None:
        natlab.cleanup_stale()
        lab = natlab.NatLab()
        lab.up()
        print("NAT lab is up:")
        print("  server   ", lab.server_ip, "(public network)")
        for host in ("a", "b"):
            print(f"  host {host}    {lab.private_ip(host)} behind NAT {lab.public_ip(host)} (drops unsolicited inbound)")
        server_ip = lab.server_ip
    else:
        print(f"Running on loopback ({reason}).")
        server_ip = "127.0.0.1"

    work = tempfile.mkdtemp(prefix="p2pft-demo-")
    try:
        return _run(lab, server_ip, work, args.size)
    finally:
        if lab is not None:
            lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _run(lab, server_ip: str, work: str, size_mib: int) -> int:
    src = os.path.join(work, "demo-file.bin")
    out = os.path.join(work, "received")
    os.makedirs(out)
    with open(src, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    print(f"Sending {src} ({size_mib} MiB) into {out}\n")

    runner = Runner(lab)
    try:
        runner.start("server", "server", ["server", "--port", f"tcp:0:interface={server_ip}"])
        ev, _ = runner.wait_event("server", "_line", "listening on")
        addr = re.search(r"listening on (\S+)", ev["line"]).group(1)
        sender = runner.start("sender", "a", ["send", "--json", addr, src])
        code_event, _ = runner.wait_event("sender", "code")
        receiver = runner.start("receiver", "b", ["receive", "--json", "--yes", "-o", out, addr, code_event["code"]])
        _, paired_at = runner.wait_event("receiver", "paired")
        connected, connected_at = runner.wait_event("receiver", "connected")
        done, done_at = runner.wait_event("receiver", "done")
        r_code, s_code = receiver.wait(DEADLINE), sender.wait(DEADLINE)
    finally:
        runner.stop()

    received = os.path.join(out, "demo-file.bin")
    digest = sha256_of(src)
    ok = r_code == 0 and s_code == 0 and os.path.exists(received) and sha256_of(received) == digest
    print()
    print(f"path:             {connected['path']} (receiver connected to {connected['peer']})")
    print(f"connection setup: {connected_at - paired_at:.3f} s from pairing to the chosen connection")
    print(f"transfer:         {done['bytes']} bytes, {done['bytes'] / max(done['seconds'], 1e-9) / 1e6:.1f} MB/s")
    print(f"exit status:      sender {s_code}, receiver {r_code}")
    print(f"result:           {'identical, sha256 ' + digest if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
