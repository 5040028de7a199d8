"""
Measure the NAT lab's path emulation (root only; not a test).

    python3 tests/measure_paths.py limit      # delay line packets/s, Mbit/s, CPU
    python3 tests/measure_paths.py accuracy   # RTT under packet load
    python3 tests/measure_paths.py socat      # one socat stream, reno, RTT x loss

Each prints one line per run and a median per configuration; the numbers
quoted in tests/natlab.py's docstring come from here.  The machine is
shared, so repeat (--runs) and read the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import natlab  # noqa: E402
from tests.natlab import Nat, NatLab  # noqa: E402

PORT = 7001

# receiver: count bytes for `seconds` after the first one, print MB/s
_COUNT = r"""
import sys, time
secs = float(sys.argv[1]); f = sys.stdin.buffer
b = f.read1(1 << 16); t0 = time.monotonic(); n = len(b)
while time.monotonic() - t0 < secs:
    b = f.read1(1 << 16)
    if not b: break
    n += len(b)
print("%.4f %.3f" % (n / (time.monotonic() - t0) / 1e6, time.monotonic() - t0), flush=True)
"""

# client: n TCP connects to host:port, print each connect time in ms
_CONNECTS = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(); t = time.monotonic(); s.connect((host, port))
    out.append((time.monotonic() - t) * 1000); s.close()
print(" ".join("%.2f" % x for x in out))
"""

_ACCEPTOR = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7002)); s.listen(64); print("ok", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

# UDP sender at a fixed packet rate for a fixed time
_UDP_LOAD = r"""
import socket, sys, time
host, pps, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic(); n = 0; msg = b"x" * 64
while True:
    now = time.monotonic() - t0
    if now > secs: break
    due = int(now * pps)
    while n < due:
        s.sendto(msg, (host, 9)); n += 1
print("sent %d in %.2fs" % (n, secs), flush=True)
"""


def stream(lab, src, dst, seconds, during=None):
    """One socat stream src -> dst for `seconds`; MB/s at the receiver.
    during(): called while the stream runs."""
    rx = lab.popen(dst, ["sh", "-c", f"socat -u TCP-LISTEN:{PORT},reuseaddr - | "
                         f"{sys.executable} -c '{_COUNT}' {seconds}"],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # the listener is up once ss shows it (bounded poll)
    for _ in range(200):
        ss = lab.run(dst, ["ss", "-ltn", f"sport = :{PORT}"]).stdout
        if str(PORT) in ss:
            break
    tx = lab.popen(src, ["socat", "-u", "OPEN:/dev/zero", f"TCP:{lab.private_ip(dst)}:{PORT}"],
                   stderr=subprocess.DEVNULL)
    if during is not None:
        during()
    out = rx.communicate(timeout=seconds + 120)[0].split()
    tx.kill()
    tx.wait()
    return float(out[0])


def cmd_limit(args):
    """Delay line packet rate: unshaped stream through one 1 ms line."""
    for gso in (None, True, False):     # None: no delay line (baseline)
        orig = natlab.DelayLineProcess.start.__func__

        def start(cls, *a, _gso=gso, **k):
            k["gso"] = _gso
            return orig(cls, *a, **k)
        natlab.DelayLineProcess.start = classmethod(start)
        res = []
        for _ in range(args.runs):
            lab = NatLab(a=Nat("none", delay_ms=0 if gso is None else 1), b=Nat("none"))
            probe = []
            try:
                lab.up()
                acc = lab.popen("b", [sys.executable, "-c", _ACCEPTOR],
                                stdout=subprocess.PIPE, text=True)
                acc.stdout.readline()

                def during():
                    lab.run("a", [sys.executable, "-c", _CONNECTS, lab.private_ip("b"),
                                  "7002", "3"])
                    r = lab.run("a", [sys.executable, "-c", _CONNECTS, lab.private_ip("b"),
                                      "7002", "20"], timeout=60)
                    probe.extend(float(x) for x in r.stdout.split())
                mbs = stream(lab, "a", "b", args.seconds, during)
            finally:
                lab.down()
            print(f"  RTT probes during the stream (configured {0 if gso is None else 2} ms): min {min(probe):.1f} "
                  f"median {statistics.median(probe):.1f} max {max(probe):.1f}")
            line = lab.delay_lines.get("p-a")
            stats = dict(kv.split("=") for kv in line.stats.split()) if line else \
                {"packets": "0", "cpu": "0"}
            pps = int(stats["packets"]) / args.seconds
            cpu = float(stats["cpu"]) / args.seconds
            res.append((mbs * 8, pps, cpu))
            print(f"gso={gso} {mbs * 8:.0f} Mbit/s  delay line {pps:.0f} pkt/s "
                  f"cpu {cpu * 100:.0f}% of a core  ({stats})", flush=True)
        print(f"MEDIAN gso={gso}: {statistics.median(r[0] for r in res):.0f} Mbit/s "
              f"{statistics.median(r[1] for r in res):.0f} pkt/s "
              f"cpu {statistics.median(r[2] for r in res) * 100:.0f}%", flush=True)
        natlab.DelayLineProcess.start = classmethod(orig)


def cmd_accuracy(args):
    """Connect RTT through 2x15 ms while load crosses the same lines: UDP
    at a fixed packet rate, or an unshaped TCP stream (GSO on or off)."""
    loads = [("udp", 0), ("udp", 10000), ("udp", 40000), ("tcp", True), ("tcp", False)]
    for kind, arg in loads:
        orig = natlab.DelayLineProcess.start.__func__
        if kind == "tcp":
            def start(cls, *a, _gso=arg, **k):
                k["gso"] = _gso
                return orig(cls, *a, **k)
            natlab.DelayLineProcess.start = classmethod(start)
        lab = NatLab(a=Nat("none", delay_ms=15), b=Nat("none", delay_ms=15))
        try:
            lab.up()
            acc = lab.popen("b", [sys.executable, "-c", _ACCEPTOR],
                            stdout=subprocess.PIPE, text=True)
            acc.stdout.readline()
            loadp = []
            if kind == "udp" and arg:
                loadp.append(lab.popen("a", [sys.executable, "-c", _UDP_LOAD,
                                             lab.private_ip("b"), str(arg), "60"],
                                       stdout=subprocess.PIPE, text=True))
            elif kind == "tcp":
                loadp.append(lab.popen("b", ["socat", "-u", f"TCP-LISTEN:{PORT}", "OPEN:/dev/null"]))
                for _ in range(200):
                    if str(PORT) in lab.run("b", ["ss", "-ltn", f"sport = :{PORT}"]).stdout:
                        break
                loadp.append(lab.popen("a", ["socat", "-u", "OPEN:/dev/zero",
                                             f"TCP:{lab.private_ip('b')}:{PORT}"]))
            if loadp:   # load is flowing
                lab.run("a", [sys.executable, "-c", _CONNECTS, lab.private_ip("b"), "7002", "3"])
            r = lab.run("a", [sys.executable, "-c", _CONNECTS, lab.private_ip("b"),
                              "7002", str(args.probes)])
            ms = [float(x) for x in r.stdout.split()]
        finally:
            lab.down()
            natlab.DelayLineProcess.start = classmethod(orig)
        st = dict(kv.split("=") for kv in lab.delay_lines["p-a"].stats.split())
        print(f"load {kind} {arg}: RTT (configured 60 ms) min {min(ms):.1f} median "
              f"{statistics.median(ms):.1f} p90 {sorted(ms)[int(len(ms) * 0.9)]:.1f} "
              f"max {max(ms):.1f}  [{st}]", flush=True)


def mathis(rtt_ms, loss, mss=1448):
    return mss / (rtt_ms / 1000) * (1.5 ** 0.5) / loss ** 0.5 / 1e6


def cmd_socat(args):
    for rtt in args.rtts:
        for loss in args.losses:
            res = []
            for _ in range(args.runs):
                lab = NatLab(a=Nat("masquerade", delay_ms=rtt / 4, loss=loss, rate_mbit=100),
                             b=Nat("none", delay_ms=rtt / 4, rate_mbit=100),
                             congestion="reno")
                try:
                    lab.up()
                    res.append(stream(lab, "a", "b", args.seconds))
                finally:
                    lab.down()
                print(f"rtt {rtt} ms loss {loss:.0%}: {res[-1]:.2f} MB/s", flush=True)
            m = f"  Mathis {mathis(rtt, loss):.2f} MB/s" if rtt and loss else ""
            rtt = int(rtt) if rtt == int(rtt) else rtt
            print(f"MEDIAN rtt {rtt} ms loss {loss:.0%}: {statistics.median(res):.2f} MB/s "
                  f"(runs {' '.join('%.2f' % x for x in res)}){m}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("limit", "accuracy", "socat"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 30, 100])
    p.add_argument("--losses", type=float, nargs="+", default=[0.0, 0.01])
    args = p.parse_args()
    if args.what != "accuracy" and shutil.which("socat") is None:
        sys.exit("measure_paths: needs socat (apt-get install socat)")
    {"limit": cmd_limit, "accuracy": cmd_accuracy, "socat": cmd_socat}[args.what](args)


if __name__ == "__main__":
    main()
