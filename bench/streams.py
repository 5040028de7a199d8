"""
Benchmark (not a test; root only): throughput of one TCP stream versus
p2pft with N streams, across RTT x loss, in the NAT lab (tests/natlab.py).

    python3 bench/streams.py                      # socat baseline: one stream a->b
    python3 bench/streams.py --p2pft              # p2pft send/receive, --streams 1 2 4 8
    python3 bench/streams.py --rtts 100 --losses 0.01 --runs 1   # one cell

The lab of a cell (RTT R ms, loss p):

* a and b each behind a masquerading NAT, each NAT's public (wan) link
  ``Nat("masquerade", delay_ms=R/4, loss=q, rate_mbit=100)``: the a<->b
  round trip crosses both links twice, so it is 4 x R/4 = R; a<->server
  (and each relay leg) is R/2.  q = 1 - sqrt(1 - p), so a packet from a to
  b (data or ACK, each direction) is lost with probability p over the
  path; each relay leg sees q.
* ``NatLab(congestion="reno")`` on every host: the kernel's default for new
  namespaces here is BBR, which does not back off on random loss and would
  hide what loss does to ordinary users, who run CUBIC; child namespaces
  may not select CUBIC (net.ipv4.tcp_allowed_congestion_control is printed
  at the start), so reno is the loss-based stand-in: the same
  multiplicative decrease, slower growth, so reno numbers are a
  pessimistic bound on CUBIC's.

socat baseline: one ``socat -u OPEN:/dev/zero TCP:<b's public address>``
in a to a socat listening in b behind a port forward on b's NAT (DNAT on
natB's wan).  A port forward rather than b with NAT kind "none", because
a punched p2pft connection crosses both NATs the same way: SNAT and
conntrack at natA, DNAT and conntrack at natB, both wan links shaped.
Bytes are counted at b for --seconds after the first one (fixed time per
run, so the slow cells do not take minutes); median of --runs.

--p2pft: ``p2pft server --relay`` in the server namespace,
``p2pft send --json --streams N`` in a, ``p2pft receive --json --yes -o DIR``
in b, for N in --streams.  MB/s = file size / (spawn of send -> the later
of the two done events); also printed: the connected -> done rate, the path
and stream count the done event reports ("?" when it has no such field).
The file size of a cell is what the socat rate x N would move in
--p2pft-seconds, within [2, 40] MB (or --size-mb).  If send refuses
--streams (an older p2pft), the cell runs once without it, and says so.

Every cell first checks its real RTT: 10 TCP connects a->b (through the
port forward) and a->server, min and median of the connect times (one
SYN/SYN-ACK round trip each; a lost SYN costs a 1 s retransmission, hence
the median).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.natlab import Nat, NatLab  # noqa: E402

PY = sys.executable
STREAM_PORT = 7001
PROBE_PORT = 7002
SERVER_PORT = 9000
LINK_MBIT = 100
MB = 1e6

# b: count bytes on stdin for `seconds` after the first one; print MB/s
_COUNT = r"""
import sys, time
secs = float(sys.argv[1]); f = sys.stdin.buffer
b = f.read1(1 << 16); t0 = time.monotonic(); n = len(b)
while time.monotonic() - t0 < secs:
    b = f.read1(1 << 16)
    if not b: break
    n += len(b)
print("%.4f" % (n / (time.monotonic() - t0) / 1e6), flush=True)
"""

_ACCEPTOR = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64); print("ok", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

_CONNECTS = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(); s.settimeout(10); t = time.monotonic(); s.connect((host, port))
    out.append((time.monotonic() - t) * 1000); s.close()
print(" ".join("%.2f" % x for x in out))
"""


def link_loss(path_loss):
    """Per-link loss that gives path_loss over two links."""
    return 1 - math.sqrt(1 - path_loss)


def build(rtt, loss):
    nat = Nat("masquerade", delay_ms=rtt / 4, loss=link_loss(loss), rate_mbit=LINK_MBIT)
    lab = NatLab(a=nat, b=nat, congestion="reno")
    lab.up()
    return lab


def forward_port(lab, port):
    """DNAT natB's public port to b (the port forward a home router
    offers), accepted before the router's 'drop unsolicited' rule."""
    b = lab.private_ip("b")
    rules = "\n".join([
        "*nat",
        f"-A PREROUTING -i wan0 -p tcp --dport {port} -j DNAT --to-destination {b}:{port}",
        "COMMIT",
        "*filter",
        f"-I FORWARD 2 -i wan0 -o lan0 -p tcp -d {b} --dport {port} "
        "-m conntrack --ctstate DNAT -j ACCEPT",
        "COMMIT", ""])
    lab.run("natB", ["iptables-restore", "--noflush"], input=rules, check=True)


def wait_listen(lab, name, port):
    for _ in range(400):
        if f":{port} " in lab.run(name, ["ss", "-ltnH", f"sport = :{port}"]).stdout + " ":
            return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {name}:{port}")


def rtt_check(lab):
    """(min, median) connect ms a->b (public, forwarded) and a->server."""
    out = {}
    for name, host in (("a-b", lab.public_ip("b")), ("a-server", lab.server_ip)):
        r = lab.run("a", [PY, "-c", _CONNECTS, host, str(PROBE_PORT), "10"], timeout=120,
                    check=True)
        ms = [float(x) for x in r.stdout.split()]
        out[name] = (min(ms), statistics.median(ms))
    return out


def setup_cell(rtt, loss):
    lab = build(rtt, loss)
    try:
        forward_port(lab, STREAM_PORT)
        forward_port(lab, PROBE_PORT)
        for name in ("b", "server"):
            acc = lab.popen(name, [PY, "-c", _ACCEPTOR, str(PROBE_PORT)],
                            stdout=subprocess.PIPE, text=True)
            acc.stdout.readline()
        rtts = rtt_check(lab)
    except BaseException:
        lab.down()
        raise
    return lab, rtts


def socat_run(lab, seconds):
    rx = lab.popen("b", ["sh", "-c", f"socat -u TCP-LISTEN:{STREAM_PORT},reuseaddr - | "
                         f"{PY} -c '{_COUNT}' {seconds}"],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_listen(lab, "b", STREAM_PORT)
    tx = lab.popen("a", ["socat", "-u", "OPEN:/dev/zero",
                         f"TCP:{lab.public_ip('b')}:{STREAM_PORT}"],
                   stderr=subprocess.DEVNULL)
    try:
        out = rx.communicate(timeout=seconds + 120)[0].split()
    finally:
        tx.kill()
        tx.wait()
    return float(out[0])


# -- p2pft ---------------------------------------------------------------------


class Events:
    """A process's JSON stdout lines with their arrival times."""

    def __init__(self, proc):
        self.proc = proc
        self.events = []        # (monotonic, dict)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self.events.append((time.monotonic(), json.loads(line)))
                except ValueError:
                    pass

    def first(self, match):
        """(arrival time, event) of the first event named C{match}, or
        passing C{match} if it is a test; (None, None) if none."""
        test = match if callable(match) else (lambda e: e.get("event") == match)
        return next(((t, e) for t, e in self.events if test(e)), (None, None))


def wait_all(procs: dict, deadline: float) -> None:
    """Until every process of C{procs} (name: L{Events}) exited, or one
    failed (an option refused ends the run at once rather than leaving the
    other waiting for its peer), or C{deadline}; then none is left running."""
    try:
        while time.monotonic() < deadline:
            rcs = [ev.proc.poll() for ev in procs.values()]
            if all(rc is not None for rc in rcs) or any(rc not in (None, 0) for rc in rcs):
                break
            time.sleep(0.05)
    finally:
        for ev in procs.values():
            if ev.proc.poll() is None:
                ev.proc.kill()
                ev.proc.wait()
            ev.thread.join(5)


def p2pft_env(root):
    e = dict(os.environ)
    e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("P2PFT_CODE", None)
    return e


def supports_streams(root):
    r = subprocess.run([PY, "-m", "p2pft", "send", "--help"], capture_output=True, text=True,
                       env=p2pft_env(root), timeout=60)
    return "--streams" in r.stdout


def start_p2pft_server(lab, root, logdir):
    log = open(os.path.join(logdir, "server.log"), "w")
    lab.popen("server", [PY, "-m", "p2pft", "server", "--relay", "--port",
                         f"tcp:{SERVER_PORT}:interface={lab.server_ip}"],
              stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=p2pft_env(root))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log.name) as f:
            if "listening on" in f.read():
                return f"{lab.server_ip}:{SERVER_PORT}"
        time.sleep(0.05)
    raise RuntimeError("p2pft server did not start: " + open(log.name).read())


def p2pft_run(lab, root, server, src, size, streams, code, workdir, timeout):
    """One transfer; a dict of what happened."""
    out = tempfile.mkdtemp(dir=workdir)
    send_argv = [PY, "-m", "p2pft", "send", "--json", "--code", code] + (
        ["-v"] if os.environ.get("P2PFT_BENCH_VERBOSE") else [])
    if streams is not None:
        send_argv += ["--streams", str(streams)]
    send_argv += [server, src]
    errs = {}
    procs = {}
    t0 = time.monotonic()
    for name, host, argv in (
            ("send", "a", send_argv),
            ("receive", "b", [PY, "-m", "p2pft", "receive", "--json", "--yes", "-o", out,
                              server, code])):
        errs[name] = open(os.path.join(workdir, f"{code}.{name}.err"), "w+")
        procs[name] = Events(lab.popen(host, argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=errs[name], text=True,
                                       env=p2pft_env(root)))
    wait_all(procs, t0 + timeout)
    res = {"rc": {n: ev.proc.returncode for n, ev in procs.items()}}
    for n, f in errs.items():
        f.seek(0)
        res[n + "_err"] = f.read()[-2000:]
        f.close()
    t_sd, done_s = procs["send"].first("done")
    t_rd, done_r = procs["receive"].first("done")
    t_c, conn = procs["send"].first("connected")
    got = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    shutil.rmtree(out, ignore_errors=True)
    if done_s is None or done_r is None or got != size:
        err = (procs["send"].first("error")[1] or procs["receive"].first("error")[1] or {})
        res["failed"] = (f"rc {res['rc']}, received {got} of {size} bytes, "
                         f"error {err.get('message')!r}")
        return res
    t_done = max(t_sd, t_rd)
    res["mbs"] = size / (t_done - t0) / MB
    res["xfer_mbs"] = size / (t_done - t_c) / MB if t_c else None
    res["path"] = done_s.get("path", "?")
    res["streams"] = done_s.get("streams", "?")
    res["connected_path"] = (conn or {}).get("path", "?")
    res["bytes_direct"] = done_s.get("bytes_direct")
    res["bytes_relay"] = done_s.get("bytes_relay")
    return res


#: The file size of an "auto" cell, in streams' worth (it grows to at most 8).
AUTO_SCALE = 6


def make_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


# -- main ------------------------------------------------------------------------


def fmt_rtt(rtts):
    return "  ".join(f"{k} {lo:.1f}/{med:.1f} ms" for k, (lo, med) in rtts.items())


def allowed_cc():
    lab = NatLab(a=Nat("none"), b=Nat("none"))
    try:
        lab.up()
        return lab.run("a", ["sysctl", "-n", "net.ipv4.tcp_allowed_congestion_control"]
                       ).stdout.strip()
    finally:
        lab.down()


def cmd_socat(args, cells):
    table = {}
    for rtt, loss in cells:
        lab, rtts = setup_cell(rtt, loss)
        try:
            print(f"cell rtt {rtt:g} ms loss {loss:.0%}: measured connect min/median {fmt_rtt(rtts)}",
                  flush=True)
            res = []
            for i in range(args.runs):
                res.append(socat_run(lab, args.seconds))
                print(f"  run {i + 1}: {res[-1]:.2f} MB/s", flush=True)
        finally:
            lab.down()
        table[rtt, loss] = (statistics.median(res), min(res), max(res), rtts["a-b"][1])
    print(f"\nsocat, one stream a->b, reno, {LINK_MBIT} Mbit/s links, {args.seconds:g} s per run, "
          f"median of {args.runs} (min-max); measured a-b RTT median")
    print(f"{'RTT':>6} {'loss':>5}  {'MB/s':>22}  {'RTT meas.':>9}")
    for (rtt, loss), (med, lo, hi, meas) in table.items():
        print(f"{rtt:>4g}ms {loss:>5.0%}  {med:>7.2f} ({lo:.2f}-{hi:.2f})  {meas:>7.1f}ms")


def cmd_p2pft(args, cells):
    root = os.path.abspath(args.root)
    has_streams = supports_streams(root)
    stream_counts = args.streams if has_streams else [None]
    if not has_streams:
        print(f"p2pft in {root}: send has no --streams option; each cell runs once without "
              f"it (one stream, whatever p2pft does by default)", flush=True)
    workdir = tempfile.mkdtemp(prefix="p2pft-bench-streams-")
    table = {}
    code_n = 100
    try:
        for rtt, loss in cells:
            lab, rtts = setup_cell(rtt, loss)
            try:
                print(f"cell rtt {rtt:g} ms loss {loss:.0%}: measured connect min/median "
                      f"{fmt_rtt(rtts)}", flush=True)
                server = start_p2pft_server(lab, root, workdir)
                est = args.expect.get((rtt, loss)) if args.expect else None
                if est is None:
                    est = socat_run(lab, 3)
                    print(f"  socat estimate {est:.2f} MB/s (3 s)", flush=True)
                for n in list(stream_counts):
                    scale = AUTO_SCALE if n == "auto" else int(n or 1)
                    size = int((args.size_mb or min(40, max(2, est * scale *
                                                            args.p2pft_seconds))) * MB)
                    src = os.path.join(workdir, f"data-{size}.bin")
                    if not os.path.exists(src):
                        make_file(src, size)
                    timeout = max(90, 6 * size / MB / max(est, 0.05))
                    res_n = []
                    for i in range(args.runs):
                        code_n += 1
                        r = p2pft_run(lab, root, server, src, size, n, f"{code_n}-bench-streams",
                                      workdir, timeout)
                        if "failed" in r and n is not None and "streams" in r["send_err"]:
                            print(f"  send refused --streams: {r['send_err'].strip()[-200:]}; "
                                  f"running without it", flush=True)
                            stream_counts = [None]
                            n = None
                            r = p2pft_run(lab, root, server, src, size, None,
                                          f"{code_n}-bench-streams-x", workdir, timeout)
                        if "failed" in r:
                            print(f"  N={n} run {i + 1}: FAILED {r['failed']}\n"
                                  f"    send: {r['send_err'].strip()[-300:]}\n"
                                  f"    receive: {r['receive_err'].strip()[-300:]}", flush=True)
                            continue
                        res_n.append(r)
                        xfer = f"{r['xfer_mbs']:.2f}" if r["xfer_mbs"] else "?"
                        print(f"  N={n or '-'} run {i + 1}: {size / MB:.0f} MB  {r['mbs']:.2f} MB/s "
                              f"(connected->done {xfer})  path {r['path']} "
                              f"(connected {r['connected_path']})  streams {r['streams']}"
                              + (f"  direct/relay bytes {r['bytes_direct']}/{r['bytes_relay']}"
                                 if r["bytes_direct"] is not None else ""), flush=True)
                    if res_n:
                        med = statistics.median(x["mbs"] for x in res_n)
                        paths = "/".join(sorted({str(x["path"]) for x in res_n}))
                        streams = "/".join(sorted({str(x["streams"]) for x in res_n}))
                        table[rtt, loss, n] = (med, len(res_n), paths, streams, est,
                                               rtts["a-b"][1])
                    else:
                        table[rtt, loss, n] = (None, 0, "-", "-", est, rtts["a-b"][1])
                    if n is None:
                        break
            finally:
                lab.down()
    finally:
        if not os.environ.get("P2PFT_BENCH_VERBOSE"):
            shutil.rmtree(workdir, ignore_errors=True)
    print("\np2pft send->done MB/s, median of the runs that finished; path and streams from "
          "the done event; socat = one-stream estimate of the cell")
    print(f"{'RTT':>6} {'loss':>5} {'N':>3} {'MB/s':>8} {'ok':>3}  {'path':<14} {'streams':<8} "
          f"{'socat':>6} {'RTT meas.':>9}")
    for (rtt, loss, n), (med, ok, paths, streams, est, meas) in table.items():
        m = f"{med:.2f}" if med is not None else "-"
        print(f"{rtt:>4g}ms {loss:>5.0%} {n or '-':>3} {m:>8} {ok:>3}  {paths:<14} {streams:<8} "
              f"{est:>6.2f} {meas:>7.1f}ms")


def parse_expect(text):
    """'RTT:LOSS=MBS,...' -> {(rtt, loss): mbs}: skip the socat estimate."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        cell, mbs = item.split("=")
        rtt, loss = cell.split(":")
        out[float(rtt), float(loss)] = float(mbs)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p2pft", action="store_true", help="run the p2pft CLI instead of socat")
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 30, 100])
    p.add_argument("--losses", type=float, nargs="+", default=[0.0, 0.01])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10, help="socat: seconds per run")
    p.add_argument("--streams", nargs="+", default=["1", "2", "4", "8", "auto"],
                   help="stream counts to run (numbers, or auto: the default of p2pft send)")
    p.add_argument("--p2pft-seconds", type=float, default=5,
                   help="p2pft: file size = socat rate x N x this, within [2, 40] MB")
    p.add_argument("--size-mb", type=float, help="p2pft: fixed file size instead")
    p.add_argument("--expect", type=parse_expect,
                   help="p2pft: socat rates per cell 'RTT:LOSS=MBS,...' (skips the 3 s estimate)")
    p.add_argument("--root", default=ROOT, help="p2pft checkout to run (default: this one)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/streams.py: needs root (network namespaces)")
    if shutil.which("socat") is None:
        sys.exit("bench/streams.py: needs socat (apt-get install socat)")
    cells = [(rtt, loss) for rtt in args.rtts for loss in args.losses]
    print(f"congestion control: reno in every lab host (tcp_allowed_congestion_control in a "
          f"child namespace: {allowed_cc()!r}; CUBIC cannot be selected there)", flush=True)
    started = time.monotonic()
    (cmd_p2pft if args.p2pft else cmd_socat)(args, cells)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
