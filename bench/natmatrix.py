"""
Benchmark (not a test; root only): how often, and how soon, p2pft goes
direct through each kind of NAT the lab builds (the rows of
tests/test_nat_matrix.py), at several round trips, with and without loss.

    python3 bench/natmatrix.py                            # every row x 0/30/120 ms x 0/1 % loss, 10 sessions
    python3 bench/natmatrix.py --rows one_symmetric --rtts 0 30 --losses 0 --sessions 20
    python3 bench/natmatrix.py --list                     # the rows
    python3 bench/natmatrix.py --rows icmp_unreachable --rtts 0 --losses 0 \
        --server 0,0 0,60 60,0 --timed on off             # timed punching on/off

One cell = one lab (row, RTT R ms, loss p): each peer's wan link gets
``delay_ms=R/4`` (the a<->b round trip crosses both links twice: R) and
loss q = 1 - sqrt(1 - p) each way, so a packet a->b is lost with
probability p.  In it: ``p2pft server --relay``, then --sessions sessions
one after the other, each ``p2pft send --json --limit-rate`` of a file
that lasts --seconds (so a direct path found after the relay has time to
take over) and ``p2pft receive --json``.

Per cell it prints: sessions, direct (sessions whose done event says
"direct"), the median and max of paired -> first direct lane (the
sender's "paired" event to its first "connected"/"path" event saying
direct), and the birthday punching cost: SYNs both sides sent for it
(done events' birthday_syns, counting Linux's SYN retransmissions), median
and max per session.  --birthday N,M (or off) sets P2PFT_BIRTHDAY for the
sessions: N opens from fresh ports, M probes (off: none, as before).  --json FILE also writes every session.

Measured here (2 vCPUs shared with other jobs; 10 sessions per cell, 2-s
transfers at 1 MB/s; direct sessions / 10, median ms from "paired" to the
first direct lane, and for the birthday rows the median SYNs both sides
sent for it):

==========================  =========  =========  =========  =========  =========  =========
row                         0 ms       30 ms      120 ms     0 ms 1 %   30 ms 1 %  120 ms 1 %
==========================  =========  =========  =========  =========  =========  =========
both_endpoint_independent   10  25     10 147     10 533     10  19     10 146     10 506
both_send_rst                9 136     10 163     10 523     10  48     10 146     10 519
one_sends_rst (other drops) 10  17     10 145     10 522     10  22     10 150     10 508
icmp_unreachable             9 537     10 146     10 510      8 521     10 143     10 512
port_shifting               10  28     10 150     10 507     10  22     10 144     10 511
carrier_grade_nat           10  33     10 153     10 515     10  22     10 144     10 513
one_peer_public             10  22     10 151     10 515     10  21     10 143     10 508
same_lan                    10  21     10  78     10 221     10  23     10  69     10 212
one_symmetric                9  89     10 270     10 564     10  80     10 239     10 561
  birthday SYNs               832       1024       1024        768       1024       1024
one_symmetric_other_rst     10 106     10 393     10 587     10  93     10 282     10 560
  birthday SYNs               768       1280       1591        768       1216       1524
both_symmetric (relay)       0          0          0          0          0          0
==========================  =========  =========  =========  =========  =========  =========

Every session of every cell transferred the file.  The sessions that did
not go direct at 0 ms went through the relay (both NATs answering with
RST or ICMP: a port pair stuck in SYN_SENT2, not undone by the fresh-port
punches within 2 s).

Timed punching and the stagger (issue 15; docs/PROTOCOL.md section 3):
``--server A,B`` adds A ms to a's (the sender's) round trip to the server
and B ms to b's (the receiver's), nothing to the peers' round trip
(tests/natlab.py ``Nat(server_delay_ms=...)``); ``--timed on off`` runs
each cell with P2PFT_TIMED=on and =off.  Measured (10 sessions per cell,
2-s transfers, every cell with the receiver's 20 ms stagger; direct / 10,
median ms paired -> direct; "lockstep": the first alignment, without
sent_ms, commit 51d6cd5):

================  ====  ==========  =========  ===============  =========
row               RTT   server      timed off  on (lockstep)    on
================  ====  ==========  =========  ===============  =========
both_send_rst     0     +0/+0       10  554     7  331          10  176
both_send_rst     0     +0/+60      10  433    10  525           9  427
both_send_rst     0     +60/+0       8  854    10  797          10  583
both_send_rst     30    +0/+0       10  167    10  174          10  182
both_send_rst     30    +0/+60      10  460    10  403          10  521
both_send_rst     30    +60/+0      10  317    10  350          10  317
icmp_unreachable  0     +0/+0       10   44    10   72          10   62
icmp_unreachable  0     +0/+60      10  249    10  280          10  255
icmp_unreachable  0     +60/+0      10  200    10  230           9 1619
icmp_unreachable  30    +0/+0       10  185    10  194          10  221
icmp_unreachable  30    +0/+60      10  800    10  408          10  390
icmp_unreachable  30    +60/+0      10  317    10  348          10  316
one_sends_rst     0     +0/+0       10   60    10   51          10   54
one_sends_rst     0     +0/+60      10  250    10  278          10  256
one_sends_rst     0     +60/+0      10  205    10  231          10  207
one_sends_rst     30    +0/+0       10  180    10  183          10  200
one_sends_rst     30    +0/+60      10  372    10  404          10  375
one_sends_rst     30    +60/+0      10  313    10  349          10  317
================  ====  ==========  =========  ===============  =========

So the alignment is off by default.  The stagger (P2PFT_STAGGER, ms):
icmp_unreachable at 0 ms 20/20 direct, median 47 ms, with 20; 5/20, median
1010 ms, with 0; both_send_rst 20/20 either way (680 / 258 ms).  Before it
(the first two cells of the table, without the stagger): both_send_rst 7-8
/ 10, icmp_unreachable 8 / 10 (median 1510 ms) at 0 ms.  Two RST NATs at 0
ms depend on the two peers running on two CPUs at once (pinned to one CPU
with taskset: 0 of 6 direct; unpinned 6 of 6; with another job keeping one
of the two cores busy: 2/20 and 0/10, and at once 10/10, median 110 ms,
with ``--rtts 0.4``, 0.1 ms on each wan link).  With the final code (timed
off, stagger 20) at 0 ms, quiet machine but for that job: icmp_unreachable
20/20, median 48 ms.

Run it under the lab lock, in chunks (``flock /tmp/p2pft-lab.lock python3
bench/natmatrix.py --rows ...``): the machine's other jobs starve NAT
races.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.natlab import Nat, NatLab  # noqa: E402
from streams import Events, p2pft_env, start_p2pft_server, wait_all  # noqa: E402  (bench/, beside this script)

PY = sys.executable

#: name -> (NatLab keyword arguments, the path expected)
ROWS = {
    "both_endpoint_independent": (dict(a=Nat(), b=Nat()), "direct"),
    "both_send_rst": (dict(a=Nat("reject"), b=Nat("reject")), "direct"),
    "one_sends_rst": (dict(a=Nat("reject"), b=Nat()), "direct"),
    "icmp_unreachable": (dict(a=Nat("icmp"), b=Nat("icmp")), "direct"),
    "port_shifting": (dict(a=Nat("shift"), b=Nat("shift")), "direct"),
    "carrier_grade_nat": (dict(a=Nat("masquerade", cgnat="masquerade"), b=Nat()), "direct"),
    "one_peer_public": (dict(a=Nat(), b=Nat("none")), "direct"),
    "same_lan": (dict(a=Nat(), shared_lan=True), "direct"),
    "one_symmetric": (dict(a=Nat("symmetric"), b=Nat()), "direct"),
    "one_symmetric_other_rst": (dict(a=Nat("symmetric"), b=Nat("reject")), "direct"),
    "both_symmetric": (dict(a=Nat("symmetric"), b=Nat("symmetric")), "relay"),
}


def shaped(options: dict, rtt: float, loss: float, server=(0.0, 0.0)) -> dict:
    """C{options} with RTT C{rtt} between the peers, loss C{loss}, and
    C{server}: (a, b), ms added to each peer's round trip to the server."""
    out = dict(options)
    q = 1 - math.sqrt(1 - loss) if loss else 0.0
    for host, extra in zip(("a",) if out.get("shared_lan") else ("a", "b"), server):
        nat = out.get(host) or Nat()
        out[host] = dataclasses.replace(nat, delay_ms=rtt / 4, loss=q, server_delay_ms=extra / 2)
    return out


def server_paths(text: str) -> tuple[float, float]:
    """--server A,B: ms added to a's and b's round trips to the server."""
    a, b = (float(x) for x in text.split(","))
    return (a, b)


def session(lab, server, src, size, rate, code, workdir, timeout, verbose):
    out = tempfile.mkdtemp(dir=workdir)
    procs = {}
    errs = {}
    for name, host, argv in (
            ("send", "a", ["send", "--json", "--limit-rate", rate, "--code", code, server, src]),
            ("receive", "b", ["receive", "--json", "--yes", "-o", out, server, code])):
        errs[name] = open(os.path.join(workdir, f"{code}.{name}.err"), "w+")
        argv = argv[:1] + (["-v"] if verbose else []) + argv[1:]
        procs[name] = Events(lab.popen(host, [PY, "-m", "p2pft"] + argv,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=errs[name], text=True, env=p2pft_env(ROOT)))
    wait_all(procs, time.monotonic() + timeout)
    got = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    shutil.rmtree(out, ignore_errors=True)
    send = procs["send"]
    _, done = send.first(lambda e: e.get("event") == "done")
    _, done_r = procs["receive"].first(lambda e: e.get("event") == "done")
    t_paired, _ = send.first(lambda e: e.get("event") == "paired")
    t_direct, _ = send.first(lambda e: e.get("event") in ("connected", "path") and e.get("path") == "direct")
    res = {"ok": bool(done and done_r and got == size), "path": (done or {}).get("path", "failed"),
           "to_direct": (t_direct - t_paired) if t_direct and t_paired else None,
           "syns": sum((d or {}).get("birthday_syns", 0) for d in (done, done_r)),
           "roles": sorted((d or {}).get("birthday_role", "-") for d in (done, done_r))}
    for n, f in errs.items():
        f.seek(0)
        if not res["ok"]:
            res[n + "_err"] = f.read()[-1500:]
        f.close()
        if not verbose:
            os.unlink(f.name)
    return res


def cell(row, rtt, loss, args, workdir, src, size, server=(0.0, 0.0)):
    options, expected = ROWS[row]
    lab = NatLab(**shaped(options, rtt, loss, server))
    results = []
    try:
        lab.up()
        server = start_p2pft_server(lab, ROOT, workdir)
        for i in range(args.sessions):
            code = f"{10 + i}-natmatrix-{row.replace('_', '')[:10]}"
            results.append(session(lab, server, src, size, args.rate, code, workdir,
                                   args.seconds * 4 + 30, args.verbose))
    finally:
        lab.down()
    return results


def summary(row, rtt, loss, results, server=(0.0, 0.0), timed=None):
    direct = sum(1 for r in results if r["path"] == "direct")
    failed = sum(1 for r in results if not r["ok"])
    times = sorted(r["to_direct"] * 1000 for r in results if r["to_direct"] is not None)
    syns = sorted(r["syns"] for r in results)
    med = lambda xs: f"{statistics.median(xs):.0f}" if xs else "-"
    extra = (f"  server +{server[0]:g}/+{server[1]:g} ms" if any(server) else "") + (
        f"  timed {timed}" if timed else "")
    return (f"{row:26} {rtt:4.0f} ms {loss * 100:3.0f} %{extra}  direct {direct:2}/{len(results):<2}"
            f"{'  FAILED %d' % failed if failed else ''}  to direct median {med(times):>5} ms"
            f" max {max(times) if times else 0:5.0f} ms  birthday SYNs median {med(syns):>5}"
            f" max {max(syns) if syns else 0:5}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    p.add_argument("--rtts", nargs="+", type=float, default=[0, 30, 120])
    p.add_argument("--losses", nargs="+", type=float, default=[0, 0.01])
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each transfer (s)")
    p.add_argument("--rate", default="1M", help="--limit-rate of each transfer")
    p.add_argument("--birthday", metavar="N,M|off",
                   help="P2PFT_BIRTHDAY for every session: opens and probes, or off")
    p.add_argument("--server", nargs="+", type=server_paths, default=[(0.0, 0.0)], metavar="A,B",
                   help="ms added to a's and b's round trips to the server (each A,B a cell)")
    p.add_argument("--timed", nargs="+", choices=["on", "off"], default=[None],
                   help="P2PFT_TIMED for the sessions (each value a cell; default: unset)")
    p.add_argument("--json", metavar="FILE", help="also write every session here")
    p.add_argument("--verbose", action="store_true", help="p2pft -v, and keep its logs")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.birthday:
        os.environ["P2PFT_BIRTHDAY"] = args.birthday
    if args.list:
        for row, (options, expected) in ROWS.items():
            print(f"{row:26} {expected:6} {options}")
        return
    workdir = tempfile.mkdtemp(prefix="natmatrix-")
    size = int(float(args.rate.rstrip("MKk")) * (1e6 if args.rate.endswith("M") else 1e3) * args.seconds)
    src = os.path.join(workdir, "natmatrix.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    every = []
    try:
        for row in args.rows:
            for rtt in args.rtts:
                for loss in args.losses:
                    for server in args.server:
                        for timed in args.timed:
                            if timed:
                                os.environ["P2PFT_TIMED"] = timed
                            results = cell(row, rtt, loss, args, workdir, src, size, server)
                            print(summary(row, rtt, loss, results, server, timed), flush=True)
                            for r in results:
                                if not r["ok"]:
                                    print("   failed:", {k: v for k, v in r.items() if k.endswith("_err")})
                            every.append({"row": row, "rtt_ms": rtt, "loss": loss, "server_ms": server,
                                          "timed": timed, "sessions": results})
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(every, f, indent=1)
        if not args.verbose:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("logs in", workdir)


if __name__ == "__main__":
    main()
