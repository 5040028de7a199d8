"""
A small NAT laboratory built from Linux network namespaces, veth pairs,
bridges and iptables, for tests that run real processes behind real NATs.

Default topology (``NatLab()``)::

                       namespace <prefix>-inet
                      bridge "br0", 203.0.113.0/24
          +-------------------+-----------------------+
          |                   |                       |
   <prefix>-server       <prefix>-natA            <prefix>-natB
   eth0 203.0.113.10     wan0 203.0.113.21        wan0 203.0.113.22
                         lan0 10.201.1.1/24       lan0 10.201.2.1/24
                         (bridge)                 (bridge)
                              |                       |
                         <prefix>-a               <prefix>-b
                         eth0 10.201.1.10         eth0 10.201.2.10
                         default via .1           default via .1

Every segment is a Linux bridge living in the upstream namespace; every
downstream node hangs off it through a veth pair whose upstream end is
called ``p-<role>``.  All veths are created *inside* lab namespaces
(``ip -n <ns> link add ... peer ... netns <other>``), so nothing is ever
created in the namespace the tests run in, and deleting the lab's
namespaces removes every interface the lab made.

Per-host NAT behaviour is described by :class:`Nat`:

``Nat("masquerade")``  (default) ``MASQUERADE`` on the wan side, which keeps
    the source port when it is free (endpoint-independent mapping in
    practice).  Unsolicited inbound traffic - both to the router itself
    (INPUT) and forwarded towards the LAN (FORWARD) - is silently dropped;
    only conntrack ``ESTABLISHED,RELATED`` gets in.
``Nat("reject")``  like masquerade, but unsolicited inbound TCP is answered
    with a TCP RST (``REJECT --reject-with tcp-reset``), everything else
    with ICMP port-unreachable.
``Nat("icmp")``  like masquerade, but unsolicited inbound traffic is
    answered with ICMP port-unreachable (RFC 5382 REQ-4's recommendation
    for unsolicited SYNs).
``Nat("shift")``  endpoint-independent mapping that does not keep ports:
    ``MASQUERADE --to-ports 20000-29999`` maps local port L to public
    port 20000 + L % 10000 whatever the destination; inbound dropped.
``Nat("symmetric")``  ``MASQUERADE --random-fully``: every new connection
    gets a random public port, inbound filtered like masquerade.
``Nat("none")``  no NAT: the host sits directly on the public network
    (203.0.113.31 for a, .32 for b).
``Nat(kind, cgnat=<kind>)``  carrier-grade NAT: the home router's wan side
    is on 100.64.N.0/24 behind a carrier router ``cgnA``/``cgnB`` whose own
    wan is 203.0.113.41/.42; the carrier applies ``<kind>`` rules (one of
    masquerade/reject/symmetric).  ``Nat("none", cgnat=...)`` puts the
    host directly on the carrier network.

``NatLab(shared_lan=True)`` puts host b on host a's LAN (10.201.1.11)
behind a's NAT chain.  Hairpinning (reaching your own router's public
address from inside) is not configured, as on many real home routers.

Usage::

    lab = NatLab(a=Nat("masquerade"), b=Nat("reject"))
    self.addCleanup(lab.down)
    lab.up()
    proc = lab.popen("a", [sys.executable, "-m", "p2pft", ...])

or ``with NatLab() as lab: ...``, or ``start_lab(testcase, ...)`` which also
does the skip/fail dance of :func:`require_lab`.

Paths: delay, loss, rate
------------------------

By default every link is an ideal wire (no delay, no loss, veth speed).
Each host's *public (wan) link* - the veth from its outermost box (carrier
NAT, home NAT, or the host itself for ``Nat("none")``) to the public
bridge - can be given path properties::

    NatLab(a=Nat("masquerade", delay_ms=15, loss=0.01, rate_mbit=100),
           b=Nat("none", delay_ms=35), congestion="reno")

``delay_ms``  one-way delay, added in each direction: a round trip a<->b
    takes 2*(delay_a + delay_b), a<->server 2*delay_a (the server's link
    is ideal).  0 (the default) starts no delay line at all.
``server_delay_ms``  one-way delay added, each way, only to the packets
    between this link and the server (a second delay line of the link's
    delay plus this, fed by ``-d``/``-s`` server-address rules placed
    before the link's own): a<->server takes 2*(delay_a +
    server_delay_a), a<->b is unchanged.  Asymmetric server paths, for
    timed punching.
``loss``  each packet crossing the link is dropped with this probability,
    independently per packet and per direction (data and ACKs alike), by
    ``-m statistic --mode random --probability P -j DROP``.  Per *wire*
    packet: while any link is lossy, every box on the public bridge sends
    MTU-sized packets onto it (``gso_max_segs 1``), since dropping a GSO
    super-packet whole would lose dozens of packets in one event.
``rate_mbit``  a ``tbf`` shaper of this rate at the egress of both ends of
    the link, with RATE_BURST_MS of burst and RATE_BUFFER_MS of queue
    (the bottleneck buffer, which sets how much a loss-based sender can
    fill the pipe).
``NatLab(congestion="reno")``  sets ``net.ipv4.tcp_congestion_control``
    in the host namespaces (server, a, b).  Why: new namespaces inherit
    this kernel's BBR, which paces at its bandwidth estimate and does not
    back off on random loss, so it would hide exactly what lossy paths do
    to ordinary users, who run CUBIC (the Linux/Windows/macOS default).
    Child namespaces may not select CUBIC here
    (``tcp_allowed_congestion_control`` is "reno bbr"), so reno is the
    loss-based stand-in: the same multiplicative decrease on loss, slower
    growth afterwards, so reno numbers are a pessimistic bound on CUBIC's.
    ``None`` (default) leaves the namespace default alone.

Where the delay lives: in the ``inet`` namespace, on the bridge port of the
link (``net.bridge.bridge-nf-call-iptables=1`` there, ``-m physdev``
rules in mangle PREROUTING for packets coming up the link and POSTROUTING
for packets going down it - two hooks, so a packet from one delayed link to
another waits in both lines).  So the NAT routers keep their state at the
host end of the wire, as real ones do: a mapping exists the moment a packet
leaves the router, and an inbound packet meets the router's state only
after it has crossed the wire.  Timed hole punching depends on exactly
this; delaying inside the router (before SNAT, or before the conntrack
lookup) would move the NAT to the wrong end of the link.  The lab's other
links stay ideal, and a lab without path properties does not touch inet's
iptables or sysctls at all.

The delay line is tests/delayline.py: this kernel has no ``netem`` qdisc
(nor ``fq``), but NFQUEUE works.  One process per delayed link, started by
up() inside ``inet`` under ``chrt -f`` (DELAYLINE_RT_PRIO), bound to its
queue *before* the rules that feed it are installed, tracked by PID in
``lab.delay_lines`` (wan port -> DelayLineProcess) and stopped by down()
(always: also when up() fails or a test fails; on SIGTERM it prints its
counters to ``.stats``).  It is pure Python speaking nfnetlink_queue over a
raw netlink socket (metadata only, no payload copy, GSO packets queued
whole, one batch verdict per release, due times from the kernel's queueing
timestamp so a late wakeup does not lengthen the delay).  Queue numbers
are derived from the lab prefix (``crc32(prefix) % 16000 * 4 + link``):
queues are per network namespace anyway, so coexisting labs could not
collide, and distinct numbers keep counters readable.  Every rule uses
``--queue-bypass`` (no listener - e.g. a crashed line - means packets pass
undelayed rather than a blackholed test) and the queue fails open when
full (QUEUE_MAXLEN in delayline.py): overload shows as too little delay,
never as unasked-for loss.

Measured here (2 vCPUs shared with other jobs, so medians of 3 runs and
noisy; ``python3 tests/measure_paths.py limit|accuracy|socat``):

* Delay line ceiling (one unshaped socat stream through one 1 ms line,
  MTU 1500; without a line the same stream runs at 2.0-3.3 Gbit/s):
  GSO on (whole super-packets queued): 0.63-1.43 Gbit/s at 8-12k
  packets/s, 47-75 % of a core - the line is not the limit there, the
  stream's CPU is.  GSO off (``--no-gso``, as on lossy links): 39-117k
  packets/s = 0.34-1.27 Gbit/s, median of the loaded runs 60k packets/s
  = 0.64 Gbit/s at 78 % of a core; about 8 us of CPU per packet on a quiet
  core, so ~120k packets/s is the ceiling of one line, and it needs one
  core for it.  The ``late_max_ms``/``wake_max_ms`` counters show how long
  the busy, non-preemptible (PREEMPT_NONE) kernel kept the real-time line
  from running: up to 20-56 ms in the worst instant of a saturated run.
* RTT accuracy, 2x(15+15) ms configured, 30 connects: idle 61.1 min /
  61.5 median; with 10k or 40k UDP packets/s, or a TCP stream (GSO on or
  off, ~60k packets/s), crossing the same lines: 60.3 min / 60.5-60.6
  median / <= 62 max.  So the lab adds +0.3-1.5 ms to a configured RTT
  until the line saturates; at saturation (the 117k packets/s run above,
  2 ms configured) the median connect took 4.8 ms (+2.8 ms, packets
  waiting for the line's CPU), the worst 7.8 ms.
* One socat stream a->b (a: masquerade, b: public), reno on both hosts,
  100 Mbit/s tbf on both wan links, RTT split evenly over the two links,
  loss on a's link (1 % each direction), 15-20 s per run, median of 3
  (range), against Mathis MSS/RTT*sqrt(3/2)/sqrt(p) with MSS 1448:

  ========  =================  ===========================  ========
  RTT       0 % loss           1 % loss                     Mathis
  ========  =================  ===========================  ========
  0 ms      11.9 (11.6-11.9)   10.9 (10.8-11.4) MB/s        (link)
  30 ms     11.2 (5.3-11.6)    0.43 (0.40-0.55) MB/s        0.59
  100 ms    8.2 (6.0-11.4)     0.19 (0.15-0.25) MB/s        0.18
  ========  =================  ===========================  ========

  The issue's 0.32 MB/s at 100 ms/1 % is within a factor of two of this;
  before loss was made per wire packet (GSO super-packets dropped whole)
  this lab gave 0.36 MB/s too, twice Mathis: the loss model matters more
  than the delay.  At 30 ms reno is below Mathis because each timeout
  costs a 200 ms minimum RTO, several RTTs.

Controls: blocks, cuts, renumbering
-----------------------------------

Methods that change a running lab under the processes in it, each undoable
(tests/test_natlab_controls.py checks each with plain sockets):

``block_direct()`` / ``unblock_direct()``  drop all TCP between a's and
    b's public addresses on the public bridge (an nftables bridge-family
    table in inet), both ways, established flows included; the server
    stays reachable.  For "relay first, direct once the block lifts".
``cut(host, "rst"|"drop", flush_conntrack=False)`` / ``heal(host)``  the
    host's outermost NAT box (``outer_box(host)``) answers every TCP
    segment it would forward (or receive on its wan) with a reset, or drops
    everything, as a rebooting router; flush_conntrack also empties its
    connection table at the cut and again at the heal, as a reboot does.
    Tests schedule the heal themselves (``reactor.callLater``).
``renumber(host)``  a new address for the host on its own network; its
    old connections go silent, new ones get new NAT mappings.
``flush_conntrack(role)``, ``conntrack(role)``  empty / list a box's
    connection table.

The lab needs root, iproute2 and iptables (either backend).  Set
``P2PFT_NATLAB_REQUIRED=1`` to turn "cannot build the lab" from a skip into
a test failure (for CI machines that are supposed to run these tests).
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import functools
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import unittest
import weakref
import zlib

__all__ = [
    "REQUIRED_ENV",
    "NAT_KINDS",
    "DelayLineProcess",
    "Nat",
    "NatLab",
    "NatLabError",
    "cleanup_stale",
    "lab_required",
    "require_lab",
    "start_lab",
    "unavailable_reason",
]

REQUIRED_ENV = "P2PFT_NATLAB_REQUIRED"

#: NAT behaviours understood by :class:`Nat`.
NAT_KINDS = ("masquerade", "reject", "icmp", "shift", "symmetric", "none")

#: Kinds a carrier NAT may have (everything but "none").
_BOX_KINDS = NAT_KINDS[:-1]

#: Nat("shift"): public ports SHIFT_PORTS[0]..SHIFT_PORTS[1], the local
#: port modulo the range's size (10000) added to the first: one fixed port
#: for each local port whatever the destination (endpoint-independent),
#: never the local port itself (checked in this lab: local 40000, 40001,
#: 50123 -> 20000, 20001, 20123, the same towards two server ports).
SHIFT_PORTS = (20000, 29999)

#: Every namespace this module creates is called ``<PREFIX>-<role>`` where
#: PREFIX matches this pattern; :func:`cleanup_stale` only ever touches
#: namespaces matching :data:`_OUR_NS_RE`.
PREFIX_STEM = "p2l"
_OUR_NS_RE = re.compile(r"^(p2l[0-9a-f]{6})-([A-Za-z0-9]{1,8})$")
_CUSTOM_PREFIX_RE = re.compile(r"^[A-Za-z0-9]{1,12}$")

#: One pid file per live lab, so that cleanup_stale() run by one process
#: never tears down a lab that another live process is using.
STATE_DIR = "/run/p2pft-natlab"

PUBLIC_NET = "203.0.113"          # 203.0.113.0/24, TEST-NET-3
PUBLIC_PREFIXLEN = 24
SERVER_IP = PUBLIC_NET + ".10"
LAN_NET = "10.201.{}"             # 10.201.N.0/24, N = host index (a=1, b=2)
CARRIER_NET = "100.64.{}"         # 100.64.N.0/24, RFC 6598 shared space

_HOSTS = ("a", "b")
_CMD_TIMEOUT = 20.0

#: Longest one-way delay a Nat accepts: a geostationary satellite hop is
#: ~270 ms; anything above a second is a typo.
MAX_DELAY_MS = 1000
#: Fastest shaped link: veth streams here run at 2-3 Gbit/s, so a faster
#: tbf shapes nothing.  A *delayed* (or lossy, hence GSO-less) link tops
#: out lower, at the delay line's packet rate (docstring: measured).
MAX_RATE_MBIT = 10000
#: tbf burst: 1 ms worth of bytes at the link rate (at least two 1500-byte
#: packets), about what a DSL/cable modem's shaper lets through at once.
RATE_BURST_MS = 1.0
#: tbf queue: 50 ms worth of bytes at the link rate, a modest home-router
#: buffer (bufferbloated ones hold far more; AQM ones far less).
RATE_BUFFER_MS = 50.0
#: Real-time (SCHED_FIFO) priority of delay lines: above every normal
#: process, so busy CPUs do not make releases late by whole scheduler
#: slices (a CPU busy in kernel code can still hold one off for a few ms on
#: a non-preemptible kernel like this one; see the measurements); below
#: the 50 of threaded interrupt handlers.
DELAYLINE_RT_PRIO = 40
#: The delay line itself, run with the interpreter that runs the tests.
DELAYLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delayline.py")


class NatLabError(RuntimeError):
    """Building (or probing for) the lab failed."""


@dataclasses.dataclass(frozen=True)
class Nat:
    """How one host reaches the public network.

    kind: one of :data:`NAT_KINDS`.
    cgnat: ``None``, or the kind (any of NAT_KINDS but "none") of a
        carrier-grade NAT sitting between the home router and the public
        network.
    delay_ms: one-way delay of the host's public (wan) link, in ms, applied
        in each direction (so it adds 2*delay_ms to every round trip that
        crosses the link).  0: no delay line at all.
    loss: probability that a packet crossing the wan link is dropped, drawn
        independently for each packet and each direction.
    rate_mbit: ``None``, or the link's rate in Mbit/s in each direction
        (a ``tbf`` shaper with RATE_BURST_MS of burst and RATE_BUFFER_MS of
        queue).
    upnp: run a real miniupnpd (UPnP-IGD, NAT-PMP, PCP) on this host's NAT
        router (tests/natlab_upnp.py; ``lab.upnp``: router -> daemon).
    server_delay_ms: one-way delay added, in each direction, to this host's
        packets to and from the rendezvous server only (on top of
        delay_ms): the host's round trip to the server grows by
        2*server_delay_ms, its round trip to the other host not at all
        (asymmetric server paths, for timed punching).
    """

    kind: str = "masquerade"
    cgnat: str | None = None
    delay_ms: float = 0
    loss: float = 0.0
    rate_mbit: float | None = None
    upnp: bool = False
    server_delay_ms: float = 0

    def __post_init__(self):
        if self.kind not in NAT_KINDS:
            raise ValueError(f"unknown NAT kind {self.kind!r}; expected one of {NAT_KINDS}")
        if self.cgnat is not None and self.cgnat not in _BOX_KINDS:
            raise ValueError(f"unknown carrier NAT kind {self.cgnat!r}")
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be within [0, {MAX_DELAY_MS}], "
                             f"not {self.delay_ms!r}")
        if not 0 <= self.server_delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"server_delay_ms must be within [0, {MAX_DELAY_MS}], "
                             f"not {self.server_delay_ms!r}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss is a probability in [0, 1), not {self.loss!r}")
        if self.rate_mbit is not None and not 0 < self.rate_mbit <= MAX_RATE_MBIT:
            raise ValueError(f"rate_mbit must be within (0, {MAX_RATE_MBIT}], "
                             f"not {self.rate_mbit!r}")

    @property
    def shaped(self):
        """True if the wan link has any path property (delay, loss, rate)."""
        return bool(self.delay_ms or self.loss or self.rate_mbit or self.server_delay_ms)


# ---------------------------------------------------------------------------
# small helpers


def _cmd(argv, input=None, timeout=_CMD_TIMEOUT, check=True):
    """Run a setup command; raise NatLabError with its stderr on failure."""
    try:
        res = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NatLabError(f"{' '.join(argv)}: {e}") from e
    if check and res.returncode != 0:
        raise NatLabError(
            f"{' '.join(argv)} exited with {res.returncode}: "
            f"{(res.stderr or res.stdout).strip()}"
        )
    return res


def _list_netns():
    res = _cmd(["ip", "netns", "list"], check=False)
    if res.returncode != 0:
        return []
    names = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if parts:
            names.append(parts[0])
    return names


def _netns_pids(ns):
    res = _cmd(["ip", "netns", "pids", ns], check=False)
    if res.returncode != 0:
        return []
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _kill_netns_processes(ns):
    """SIGKILL whatever still runs inside one of *our* namespaces."""
    for pid in _netns_pids(ns):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _delete_netns(ns):
    """Delete namespace ns (which must be one of ours). True if it is gone."""
    _kill_netns_processes(ns)
    res = _cmd(["ip", "netns", "del", ns], check=False)
    if res.returncode == 0:
        return True
    return ns not in _list_netns()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iptables_restore_argv():
    return [shutil.which("iptables-restore") or "iptables-restore"]


def _router_rules(kind, wan="wan0", lan="lan0"):
    """iptables-restore input for a NAT router of the given kind."""
    if kind == "symmetric":
        masq = "-j MASQUERADE --random-fully"
    elif kind == "shift":
        # Endpoint-independent, but no port kept: Linux maps a source port
        # outside the range to range start + port % range size (the next
        # free one if that is taken), whatever the destination.
        low, high = SHIFT_PORTS
        masq = f"-p tcp -j MASQUERADE --to-ports {low}-{high}\n-A POSTROUTING -o {wan} -j MASQUERADE"
    else:
        masq = "-j MASQUERADE"
    if kind == "reject":
        unsolicited = [
            "-p tcp -j REJECT --reject-with tcp-reset",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    elif kind == "icmp":
        # RFC 5382 REQ-4's recommended answer to an unsolicited SYN.
        unsolicited = ["-j REJECT --reject-with icmp-port-unreachable"]
    else:
        unsolicited = ["-j DROP"]
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f"-A POSTROUTING -o {wan} {masq}",
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        f"-A INPUT -i {wan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        *(f"-A INPUT -i {wan} {u}" for u in unsolicited),
        # never leak un-NATed (conntrack-invalid) packets to the wan
        "-A FORWARD -m conntrack --ctstate INVALID -j DROP",
        f"-A FORWARD -i {wan} -o {lan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        *(f"-A FORWARD -i {wan} {u}" for u in unsolicited),
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


#: Flushes the conntrack table of the namespace it runs in: one ctnetlink
#: IPCTNL_MSG_CT_DELETE with no tuple attribute (= flush) and an ACK.
_FLUSH_CONNTRACK = r"""
import os, socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)   # NETLINK_NETFILTER
s.bind((0, 0))
body = struct.pack("=BBH", socket.AF_INET, 0, 0)             # nfgenmsg, version 0
msg_type = (1 << 8) | 2                  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 0x1 | 0x4, 1, 0) + body)
data = s.recv(65536)
length, typ, flags, seq, pid = struct.unpack_from("=IHHII", data)
err = struct.unpack_from("=i", data, 16)[0] if typ == 2 else None   # NLMSG_ERROR
if err is None:
    sys.exit("conntrack flush: unexpected netlink answer type %d" % typ)
if err:
    sys.exit("conntrack flush failed: " + os.strerror(-err))
"""


def _tbf_args(rate_mbit):
    """tc arguments of a tbf shaper for rate_mbit (see RATE_BURST_MS and
    RATE_BUFFER_MS)."""
    bytes_per_ms = rate_mbit * 1e6 / 8 / 1000
    burst = max(int(bytes_per_ms * RATE_BURST_MS), 3028)
    limit = max(int(bytes_per_ms * RATE_BUFFER_MS), 2 * burst)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


class DelayLineProcess:
    """One running tests/delayline.py, holding packets of one NFQUEUE."""

    def __init__(self, ns, queue_num, delay_ms, proc):
        self.ns = ns
        self.queue_num = queue_num
        self.delay_ms = delay_ms
        self.proc = proc
        self.stats = None       # its counters line, once stopped

    @property
    def pid(self):
        return self.proc.pid

    @classmethod
    def start(cls, ns, queue_num, delay_ms, timeout=_CMD_TIMEOUT, gso=True):
        """Start a delay line in ns and wait (bounded) until it has bound
        its queue; NatLabError if it does not."""
        argv = ["ip", "netns", "exec", ns]
        if shutil.which("chrt"):
            argv += ["chrt", "-f", str(DELAYLINE_RT_PRIO)]
        argv += [sys.executable, DELAYLINE, "--queue-num", str(queue_num),
                 "--delay-ms", repr(float(delay_ms))]
        if not gso:
            argv.append("--no-gso")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise NatLabError(f"cannot start the delay line: {e}") from e
        line = cls(ns, queue_num, delay_ms, proc)
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        first = proc.stdout.readline() if ready else ""
        if first.strip() != "ready":
            line.stop()
            err = proc.stderr.read().strip() if proc.poll() is not None else ""
            raise NatLabError(f"delay line for queue {queue_num} in {ns} did not start: "
                              f"{err or first.strip() or 'no answer within %ss' % timeout}")
        return line

    def stop(self):
        """SIGTERM (it prints its counters), SIGKILL if it does not exit."""
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            except OSError:
                pass
        if self.stats is None and proc.stdout is not None:
            try:
                self.stats = proc.stdout.read().strip()
            except (OSError, ValueError):
                self.stats = ""
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------------
# availability


def lab_required():
    """True when REQUIRED_ENV says an unbuildable lab is a failure."""
    v = os.environ.get(REQUIRED_ENV, "")
    return v not in ("", "0")


@functools.lru_cache(maxsize=None)
def _probe():
    if not sys.platform.startswith("linux"):
        return f"NAT lab needs Linux network namespaces (platform is {sys.platform})"
    if os.geteuid() != 0:
        return f"NAT lab needs root to create network namespaces (euid {os.geteuid()})"
    for tool in ("ip", "iptables", "iptables-restore", "sysctl"):
        if shutil.which(tool) is None:
            return f"NAT lab needs `{tool}` on PATH"
    prefix = f"{PREFIX_STEM}{secrets.token_hex(3)}"
    ns = f"{prefix}-probe"
    try:
        try:
            # claim the prefix first, so a concurrent cleanup_stale() in
            # another process leaves our probe namespace alone
            _write_pidfile(prefix)
        except OSError as e:
            return f"cannot write {STATE_DIR}: {e}"
        try:
            _cmd(["ip", "netns", "add", ns])
        except NatLabError as e:
            return f"cannot create a network namespace: {e}"
        try:
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", ns, "link", "add", "lan0", "type", "bridge"])
            _cmd(["ip", "-n", ns, "link", "add", "wan0", "type", "veth",
                  "peer", "name", "p-x"])
            _cmd(["ip", "-n", ns, "link", "set", "p-x", "master", "lan0"])
            _cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  "net.ipv4.ip_forward=1"])
            for kind in _BOX_KINDS:
                _cmd(["ip", "netns", "exec", ns] + _iptables_restore_argv(),
                     input=_router_rules(kind))
        except NatLabError as e:
            return f"network namespace / iptables setup does not work here: {e}"
    finally:
        if ns in _list_netns():
            _delete_netns(ns)
        try:
            os.unlink(_pidfile(prefix))
        except OSError:
            pass
    return None


def unavailable_reason():
    """None if a NatLab can be built here, else a human-readable reason.

    The (cached) probe builds a throw-away namespace with a bridge, a veth
    pair and the iptables rules of every NAT kind.
    """
    return _probe()


def require_lab(testcase):
    """Skip testcase (or fail it, when REQUIRED_ENV is set) if no lab."""
    reason = unavailable_reason()
    if reason is None:
        return
    if lab_required():
        testcase.fail(f"{REQUIRED_ENV}={os.environ.get(REQUIRED_ENV)!r} but the NAT lab "
                      f"is unavailable: {reason}")
    raise unittest.SkipTest(reason)


def start_lab(testcase, *args, **kwargs):
    """require_lab(), build a NatLab(*args, **kwargs), register its
    teardown with testcase.addCleanup and bring it up.  A failing up() is
    a failure when REQUIRED_ENV is set and a skip otherwise."""
    require_lab(testcase)
    lab = NatLab(*args, **kwargs)
    testcase.addCleanup(lab.down)
    try:
        lab.up()
    except NatLabError as e:
        if lab_required():
            testcase.fail(f"NAT lab could not be built: {e}")
        raise unittest.SkipTest(f"NAT lab could not be built: {e}")
    return lab


# ---------------------------------------------------------------------------
# stale cleanup

_live_labs = weakref.WeakSet()


def _pidfile(prefix):
    return os.path.join(STATE_DIR, prefix + ".pid")


def _write_pidfile(prefix):
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(_pidfile(prefix), "w") as f:
        f.write(f"{os.getpid()}\n")


def _read_owner(prefix):
    try:
        with open(_pidfile(prefix)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cleanup_stale():
    """Delete namespaces left behind by killed earlier runs.

    Only namespaces named ``p2l<6 hex>-<role>`` are considered, and of
    those only the ones whose owning process (recorded in STATE_DIR) is
    gone - a lab in use by another live process is left alone.  Returns the
    list of deleted namespace names.
    """
    mine = {lab.prefix for lab in list(_live_labs)}
    removed = []
    groups = {}
    for ns in _list_netns():
        m = _OUR_NS_RE.match(ns)
        if m:
            groups.setdefault(m.group(1), []).append(ns)
    for prefix, names in groups.items():
        if prefix in mine:
            continue
        owner = _read_owner(prefix)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            continue
        for ns in names:
            if _delete_netns(ns):
                removed.append(ns)
        try:
            os.unlink(_pidfile(prefix))
        except OSError:
            pass
    # pid files of labs whose namespaces are all gone and whose owner died
    try:
        entries = os.listdir(STATE_DIR)
    except OSError:
        entries = []
    for entry in entries:
        prefix = entry[:-4] if entry.endswith(".pid") else None
        if not prefix or prefix in groups or prefix in mine:
            continue
        owner = _read_owner(prefix)
        if owner is None or not _pid_alive(owner):
            try:
                os.unlink(os.path.join(STATE_DIR, entry))
            except OSError:
                pass
    return removed


@atexit.register
def _down_all_at_exit():
    for lab in list(_live_labs):
        try:
            lab.down()
        except Exception:
            pass


# ---------------------------------------------------------------------------
# the lab


class NatLab:
    """A server on the public network plus hosts a and b behind NATs.

    Host names: "server", "a", "b".  Router roles (also valid wherever a
    name is accepted, e.g. for popen/run/dump): "inet", "natA", "natB",
    "cgnA", "cgnB" (the latter only when present).
    """

    def __init__(self, a=None, b=None, prefix=None, shared_lan=False, congestion=None):
        a = Nat() if a is None else a
        if shared_lan:
            if b is not None and b != a:
                raise ValueError("shared_lan=True puts b behind a's NAT; b's Nat must be "
                                 "omitted or equal to a's")
            b = a
            if a.kind == "none":
                raise ValueError("shared_lan needs a NAT (kind != 'none')")
        b = Nat() if b is None else b
        if not isinstance(a, Nat) or not isinstance(b, Nat):
            raise TypeError("a and b must be Nat instances")
        if prefix is None:
            prefix = f"{PREFIX_STEM}{secrets.token_hex(3)}"
        elif not _CUSTOM_PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: 1-12 letters/digits")
        if congestion is not None and not re.match(r"^[a-z0-9_]{1,16}$", congestion):
            raise ValueError(f"bad congestion control name {congestion!r}")
        self.prefix = prefix
        self.nats = {"a": a, "b": b}
        self.shared_lan = shared_lan
        self.congestion = congestion
        self.delay_lines = {}       # wan port -> DelayLineProcess
        self.server_ip = SERVER_IP
        self._created = []          # namespaces we created, in order
        self._procs = []            # Popen objects started via popen()
        self._is_up = False
        self._pidfile_written = False
        self._blocked = False       # block_direct() in force
        self._cuts = {}             # outer box role -> (mode, flush_conntrack)
        self._renumbered = {}       # host -> how many times renumber() ran
        self._plan()

    # -- topology planning (pure, no side effects) --------------------------

    def _plan(self):
        """Compute namespaces, addresses and routes; up() just executes."""
        ns = {"inet": self._ns("inet"), "server": self._ns("server")}
        addrs = {"server": SERVER_IP}
        public = {"server": SERVER_IP}
        links = []     # (upstream role, bridge, downstream role, ifname, cidr, gw)
        routers = []   # (role, kind)
        bridges = [("inet", "br0")]
        links.append(("inet", "br0", "server", "eth0",
                      f"{SERVER_IP}/{PUBLIC_PREFIXLEN}", None))
        for idx, host in enumerate(_HOSTS, start=1):
            nat = self.nats[host]
            letter = host.upper()
            if self.shared_lan and host == "b":
                lan = LAN_NET.format(1)
                ns["b"] = self._ns("b")
                addrs["b"] = f"{lan}.11"
                links.append(("natA", "lan0", "b", "eth0", f"{lan}.11/24", f"{lan}.1"))
                public["b"] = public["a"]
                continue
            up_role, up_bridge, up_gw = "inet", "br0", None
            up_prefixlen = PUBLIC_PREFIXLEN
            if nat.cgnat is not None:
                cgn = f"cgn{letter}"
                ns[cgn] = self._ns(cgn)
                cgn_ip = f"{PUBLIC_NET}.{40 + idx}"
                links.append(("inet", "br0", cgn, "wan0",
                              f"{cgn_ip}/{PUBLIC_PREFIXLEN}", None))
                carrier = CARRIER_NET.format(idx)
                bridges.append((cgn, "lan0"))
                addrs[cgn] = cgn_ip
                routers.append((cgn, nat.cgnat, f"{carrier}.1/24"))
                public[host] = cgn_ip
                up_role, up_bridge, up_gw = cgn, "lan0", f"{carrier}.1"
                up_prefixlen = 24
                outer_ip = f"{carrier}.2"
                none_ip = f"{carrier}.10"
            else:
                outer_ip = f"{PUBLIC_NET}.{20 + idx}"
                none_ip = f"{PUBLIC_NET}.{30 + idx}"
            ns[host] = self._ns(host)
            if nat.kind == "none":
                addrs[host] = none_ip
                links.append((up_role, up_bridge, host, "eth0",
                              f"{none_ip}/{up_prefixlen}", up_gw))
                public.setdefault(host, none_ip)
                continue
            router = f"nat{letter}"
            ns[router] = self._ns(router)
            links.append((up_role, up_bridge, router, "wan0",
                          f"{outer_ip}/{up_prefixlen}", up_gw))
            lan = LAN_NET.format(idx)
            bridges.append((router, "lan0"))
            routers.append((router, nat.kind, f"{lan}.1/24"))
            addrs[router] = outer_ip
            addrs[host] = f"{lan}.10"
            public.setdefault(host, outer_ip)
            links.append((router, "lan0", host, "eth0", f"{lan}.10/24", f"{lan}.1"))
        self._ns_by_role = ns
        self._addrs = addrs
        self._public = public
        self._links = links
        self._routers = routers
        self._bridges = bridges
        # each host's public (wan) link: the veth whose upstream end is on
        # the public bridge in "inet" (port p-<role>) and whose downstream
        # end is on the host's outermost box (carrier NAT, NAT or the host)
        wan = {}
        queue_base = (zlib.crc32(self.prefix.encode()) % 16000) * 4
        hosts = ("a",) if self.shared_lan else _HOSTS
        for idx, host in enumerate(hosts):
            nat = self.nats[host]
            if not nat.shaped:
                continue
            letter = host.upper()
            if nat.cgnat is not None:
                outer = f"cgn{letter}"
            elif nat.kind == "none":
                outer = host
            else:
                outer = f"nat{letter}"
            ifname = "eth0" if outer == host else "wan0"
            wan[f"p-{outer}"] = (outer, ifname, nat, queue_base + idx)
        self._wan = wan

    def _ns(self, role):
        return f"{self.prefix}-{role}"

    # -- queries --------------------------------------------------------------

    @property
    def namespaces(self):
        """All namespace names this lab uses (whether or not up yet)."""
        return list(self._ns_by_role.values())

    @property
    def roles(self):
        return list(self._ns_by_role)

    def host_ns(self, name):
        """Namespace of a host ("server", "a", "b") or router role."""
        try:
            return self._ns_by_role[name]
        except KeyError:
            raise KeyError(f"no host/router {name!r} in this lab; have {self.roles}") from None

    def public_ip(self, name):
        """The source address the server sees for connections from name."""
        if name not in self._public:
            raise KeyError(f"no host {name!r}; have {sorted(self._public)}")
        return self._public[name]

    def private_ip(self, name):
        """The address configured on name's own interface (routers: wan)."""
        if name not in self._addrs:
            raise KeyError(f"no host {name!r}; have {sorted(self._addrs)}")
        return self._addrs[name]

    def nat(self, name):
        return self.nats[name]

    def describe(self):
        lines = [f"NatLab {self.prefix}: server {self.server_ip}"]
        for host in _HOSTS:
            lines.append(
                f"  {host}: {self.nats[host]} private {self.private_ip(host)} "
                f"public {self.public_ip(host)} ns {self.host_ns(host)}")
        return "\n".join(lines)

    __repr__ = describe

    # -- processes ------------------------------------------------------------

    def exec_argv(self, name, argv):
        """The argv that runs argv inside name's namespace."""
        return ["ip", "netns", "exec", self.host_ns(name)] + [os.fspath(a) for a in argv]

    def popen(self, name, argv, **kwargs):
        """subprocess.Popen(argv) inside name's namespace.  The process is
        SIGKILLed by down() if still running."""
        if not self._is_up:
            raise NatLabError("lab is not up")
        proc = subprocess.Popen(self.exec_argv(name, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, name, argv, timeout=30, **kwargs):
        """subprocess.run(argv) inside name's namespace.  Captures text
        output unless told otherwise; raises subprocess.TimeoutExpired
        (after killing the child) on timeout."""
        if not self._is_up:
            raise NatLabError("lab is not up")
        if not any(k in kwargs for k in ("stdout", "stderr", "capture_output")):
            kwargs["capture_output"] = True
        kwargs.setdefault("text", True)
        if "input" not in kwargs:
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.exec_argv(name, argv), timeout=timeout, **kwargs)

    def dump(self, names=None):
        """Diagnostics (addresses, routes, iptables counters, conntrack)
        for the given roles (default: all), for failure messages."""
        out = [self.describe()]
        for role in names or self.roles:
            ns = self.host_ns(role)
            if ns not in self._created:
                continue
            out.append(f"==== {role} ({ns})")
            for argv in (["ip", "-br", "addr"], ["ip", "route"],
                         ["iptables-save", "-c"], ["cat", "/proc/net/nf_conntrack"]):
                res = _cmd(["ip", "netns", "exec", ns] + argv, check=False)
                text = (res.stdout + res.stderr).strip()
                if text:
                    out.append(f"-- {' '.join(argv)}\n{text}")
        return "\n".join(out)


    # -- controls (while processes run) ---------------------------------------

    def _check_up(self):
        if not self._is_up:
            raise NatLabError("lab is not up")

    def _nft(self, role, script):
        if shutil.which("nft") is None:
            raise NatLabError("this control needs `nft` (nftables) on PATH")
        _cmd(["ip", "netns", "exec", self.host_ns(role), "nft", "-f", "-"], input=script)

    def block_direct(self):
        """Drop all TCP between a's and b's public addresses (whatever they
        are: NAT wan, carrier NAT wan, or the host itself for kind "none"),
        in both directions, SYNs and established segments alike, on the
        public bridge in "inet" - so the NATs still see (and map) their own
        packets, as when something in the internet between the two sites
        drops them.  Traffic from either host to the server (rendezvous,
        relay) still flows.  Idempotent; undone by unblock_direct().

        An nftables table of the bridge family (``p2pft_block``) in inet: it
        does not need br_netfilter, so it neither changes inet's sysctls
        nor meets the delay lines' iptables rules (it sits on the bridge
        forward hook, after a packet has come up its link's delay line).
        """
        self._check_up()
        pa, pb = self._public["a"], self._public["b"]
        if pa == pb:
            raise NatLabError("a and b share one public address (shared_lan): their direct "
                              "traffic never crosses the public network")
        rules = "\n".join(
            f"    ip saddr {src} ip daddr {dst} ip protocol tcp counter drop"
            for src, dst in ((pa, pb), (pb, pa)))
        script = (
            "table bridge p2pft_block\n"
            "delete table bridge p2pft_block\n"
            "table bridge p2pft_block {\n"
            "  chain forward {\n"
            "    type filter hook forward priority -200; policy accept;\n"
            f"{rules}\n"
            "  }\n"
            "}\n")
        self._nft("inet", script)
        self._blocked = True

    def unblock_direct(self):
        """Undo block_direct() (no-op when not blocked).  Connections the
        block stalled resume with their next retransmission."""
        self._check_up()
        if not self._blocked:
            return
        self._nft("inet", "table bridge p2pft_block\ndelete table bridge p2pft_block\n")
        self._blocked = False

    @property
    def direct_blocked(self):
        return self._blocked

    def outer_box(self, host):
        """Role of host's outermost NAT box: "cgnA"/"cgnB" behind a carrier
        NAT, else "natA"/"natB" ("natA" for b on a shared LAN); None for a
        host with kind "none" and no carrier NAT (it has no NAT)."""
        nat = self.nats[host] if host in _HOSTS else None
        if nat is None:
            raise KeyError(f"no host {host!r}; have {list(_HOSTS)}")
        letter = "A" if (self.shared_lan or host == "a") else "B"
        if nat.cgnat is not None:
            return f"cgn{letter}"
        if nat.kind == "none":
            return None
        return f"nat{letter}"

    def cut(self, host, mode="rst", *, flush_conntrack=False):
        """Cut host off at its outermost NAT box (see outer_box), as when
        that router reboots.

        mode "rst": every TCP segment the box would forward, in either
        direction and established connections included, is answered with
        a TCP RST (``REJECT --reject-with tcp-reset``; the reset to the
        remote side is NATed back through the connection's conntrack entry,
        so the remote sees it from the public address and port it talks
        to); so is TCP to the box's own wan address (where packets of
        flows it no longer knows land).  Everything else is dropped.
        mode "drop": everything the box would forward or receive on its wan
        side is dropped: the router is dead; connections stall, and resume
        after heal() if their state survives.
        flush_conntrack: also forget every connection the box tracks (its
        NAT mappings), now and again at heal(), as a reboot does: after the
        heal, packets of an old flow arriving from the wan side no longer
        find their mapping (they hit the router's own INPUT and are dropped
        or rejected as unsolicited).  Note that a LAN host speaking first on
        an old flow re-creates the mapping (nf_conntrack_tcp_loose=1, the
        Linux default that most home routers keep), with the same public
        port if MASQUERADE can keep it.

        A host on a shared LAN shares a's box: cutting b cuts a too.  A
        second cut() on the same box replaces the first.  Undone by heal().
        """
        self._check_up()
        if mode not in ("rst", "drop"):
            raise ValueError(f"mode must be 'rst' or 'drop', not {mode!r}")
        box = self.outer_box(host)
        if box is None:
            raise NatLabError(f"host {host} has kind 'none' and no carrier NAT: there is no "
                              f"router to cut")
        if box in self._cuts:
            self._uncut(box)
        if mode == "rst":
            body = ["-A p2pft-cut -p tcp -j REJECT --reject-with tcp-reset",
                    "-A p2pft-cut -j DROP"]
        else:
            body = ["-A p2pft-cut -j DROP"]
        rules = ["*filter", ":p2pft-cut - [0:0]", *body,
                 "-I FORWARD 1 -j p2pft-cut", "-I INPUT 1 -i wan0 -j p2pft-cut",
                 "COMMIT", ""]
        _cmd(["ip", "netns", "exec", self.host_ns(box)] + _iptables_restore_argv()
             + ["--noflush"], input="\n".join(rules))
        self._cuts[box] = (mode, flush_conntrack)
        if flush_conntrack:
            self.flush_conntrack(box)

    def _uncut(self, box):
        rules = ["*filter", "-D FORWARD -j p2pft-cut", "-D INPUT -i wan0 -j p2pft-cut",
                 "-F p2pft-cut", "-X p2pft-cut", "COMMIT", ""]
        _cmd(["ip", "netns", "exec", self.host_ns(box)] + _iptables_restore_argv()
             + ["--noflush"], input="\n".join(rules))
        _mode, flush = self._cuts.pop(box)
        return flush

    def heal(self, host):
        """Undo cut(host) (no-op when not cut).  With flush_conntrack the box
        comes back with an empty connection table (flushed again here, so
        nothing tracked during the cut survives either)."""
        self._check_up()
        box = self.outer_box(host)
        if box is None or box not in self._cuts:
            return
        if self._uncut(box):
            self.flush_conntrack(box)

    def is_cut(self, host):
        """The cut mode ("rst"/"drop") in force on host's box, or None."""
        box = self.outer_box(host)
        return self._cuts.get(box, (None,))[0] if box else None

    def flush_conntrack(self, role):
        """Delete every conntrack entry in role's namespace (ctnetlink
        IPCTNL_MSG_CT_DELETE without a tuple: what ``conntrack -F`` does;
        that tool is not needed)."""
        self._check_up()
        _cmd(["ip", "netns", "exec", self.host_ns(role), sys.executable, "-c",
              _FLUSH_CONNTRACK])

    def conntrack(self, role):
        """The lines of role's /proc/net/nf_conntrack (its tracked flows)."""
        self._check_up()
        res = _cmd(["ip", "netns", "exec", self.host_ns(role), "cat", "/proc/net/nf_conntrack"])
        return [line for line in res.stdout.splitlines() if line.strip()]

    def renumber(self, host):
        """Give host ("a" or "b") a new address on its own network (its LAN,
        the carrier network, or the public network for kind "none") and
        return it.  The old address is removed, so the host's existing
        connections die (their packets cannot be sent from an address the
        host no longer has, and packets to it find nobody: the peer sees
        silence, not a reset, and each side notices only by its own
        timeouts: the old sockets stay ESTABLISHED, retransmitting into the
        void, until tcp_retries2 (~15 min) or the application's own
        keepalive gives up); the default route is kept.  New connections get a new
        NAT mapping (the box's old one stays until it expires).  For kind
        "none" the new address is also the host's public address.  New
        addresses: .100, .101, ... for a, .150, ... for b.
        """
        self._check_up()
        if host not in _HOSTS:
            raise KeyError(f"no host {host!r}; have {list(_HOSTS)}")
        link = next(lk for lk in self._links if lk[2] == host)
        _up_role, _br, _down, ifname, cidr, gw = link
        old = self._addrs[host]
        net, prefixlen = cidr.split("/")
        n = self._renumbered.get(host, 0)
        if n >= 50:
            raise NatLabError(f"renumbered {host} 50 times; make a new lab")
        new = ".".join(net.split(".")[:3] + [str((100 if host == "a" else 150) + n)])
        ns = self.host_ns(host)
        _cmd(["ip", "-n", ns, "addr", "del", f"{old}/{prefixlen}", "dev", ifname])
        _cmd(["ip", "-n", ns, "addr", "add", f"{new}/{prefixlen}", "dev", ifname])
        if gw is not None:
            _cmd(["ip", "-n", ns, "route", "replace", "default", "via", gw])
        # the lab's own record, so popen users, dump() and later renumbers
        # see the new address
        idx = self._links.index(link)
        self._links[idx] = link[:4] + (f"{new}/{prefixlen}", gw)
        self._renumbered[host] = n + 1
        self._addrs[host] = new
        if self._public.get(host) == old:
            self._public[host] = new
            if self._blocked:
                self.block_direct()
        return new

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def _add_ns(self, role, router=False):
        ns = self.host_ns(role)
        if ns in _list_netns():
            raise NatLabError(f"namespace {ns} already exists")
        _cmd(["ip", "netns", "add", ns])
        self._created.append(ns)
        sysctls = ["net.ipv6.conf.all.disable_ipv6=1",
                   "net.ipv6.conf.default.disable_ipv6=1"]
        if router:
            sysctls.append("net.ipv4.ip_forward=1")
        if role == "inet" or router:
            # bridged frames must not traverse this namespace's iptables
            sysctls.append("net.bridge.bridge-nf-call-iptables=0")
        _cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-e", "-w"] + sysctls)
        _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])

    def up(self):
        """Build the whole lab.  On failure everything built so far is torn
        down again and NatLabError is raised."""
        if self._is_up:
            return
        if self._created:
            raise NatLabError("up() after a failed or torn-down up(); make a new NatLab")
        started = time.monotonic()
        _live_labs.add(self)
        try:
            _write_pidfile(self.prefix)
            self._pidfile_written = True
            router_roles = {r for r, _, _ in self._routers}
            for role in self._ns_by_role:
                self._add_ns(role, router=role in router_roles)
            for role, br in self._bridges:
                ns = self.host_ns(role)
                _cmd(["ip", "-n", ns, "link", "add", br, "type", "bridge"])
                _cmd(["ip", "-n", ns, "link", "set", br, "up"])
            for role, kind, lan_cidr in self._routers:
                ns = self.host_ns(role)
                _cmd(["ip", "-n", ns, "addr", "add", lan_cidr, "dev", "lan0"])
                _cmd(["ip", "netns", "exec", ns] + _iptables_restore_argv(),
                     input=_router_rules(kind))
            for up_role, bridge, down_role, ifname, cidr, gw in self._links:
                up_ns, down_ns = self.host_ns(up_role), self.host_ns(down_role)
                port = f"p-{down_role}"
                _cmd(["ip", "-n", up_ns, "link", "add", port, "type", "veth",
                      "peer", "name", ifname, "netns", down_ns])
                _cmd(["ip", "-n", up_ns, "link", "set", port, "master", bridge, "up"])
                _cmd(["ip", "-n", down_ns, "addr", "add", cidr, "dev", ifname])
                _cmd(["ip", "-n", down_ns, "link", "set", ifname, "up"])
                if gw is not None:
                    _cmd(["ip", "-n", down_ns, "route", "add", "default", "via", gw])
            if self.congestion is not None:
                for host in ("server",) + _HOSTS:
                    _cmd(["ip", "netns", "exec", self.host_ns(host), "sysctl", "-q", "-w",
                          f"net.ipv4.tcp_congestion_control={self.congestion}"])
            if self._wan:
                self._shape_wan()
        except BaseException as e:
            try:
                self.down()
            except Exception:
                pass
            if isinstance(e, NatLabError):
                raise
            if isinstance(e, Exception):
                raise NatLabError(f"building NAT lab failed: {e!r}") from e
            raise
        self._is_up = True
        self.upnp = {}
        if any(nat.upnp for nat in self.nats.values()):
            from tests import natlab_upnp
            try:
                self.upnp = natlab_upnp.start(self)
            except BaseException:
                self.down()
                raise
        self.up_seconds = time.monotonic() - started

    def _shape_wan(self):
        """Delay lines, loss rules and shapers on the wan links (up() only
        calls this when some Nat has a path property)."""
        inet = self.host_ns("inet")
        # A delay line per delayed link, bound before any rule sends it
        # packets (until then --queue-bypass would let them through).
        for port, (outer, _ifname, nat, qnum) in self._wan.items():
            if nat.delay_ms:
                self.delay_lines[port] = DelayLineProcess.start(
                    inet, qnum, nat.delay_ms)
            if nat.server_delay_ms:
                # Packets between this link and the server wait in a line
                # of their own, the link's delay plus the server's.
                self.delay_lines[f"{port}>server"] = DelayLineProcess.start(
                    inet, qnum + 2, nat.delay_ms + nat.server_delay_ms)
        # Packets coming up the link are matched in PREROUTING (only the
        # in-port is known there), packets going down it in POSTROUTING:
        # two different hooks, so a packet from one delayed link to
        # another waits in both lines (an accept verdict resumes at the
        # next hook, not at the next rule).
        lines = ["*mangle", ":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
        for port, (_outer, _ifname, nat, qnum) in self._wan.items():
            for chain, match in (("PREROUTING", f"--physdev-in {port}"),
                                 ("POSTROUTING", f"--physdev-out {port}")):
                if nat.loss:
                    lines.append(f"-A {chain} -m physdev {match} -m statistic "
                                 f"--mode random --probability {nat.loss:.6f} -j DROP")
                if nat.server_delay_ms:
                    # (first: a packet takes one NFQUEUE per hook)
                    toward = "-d" if chain == "PREROUTING" else "-s"
                    lines.append(f"-A {chain} -m physdev {match} {toward} {self.server_ip} -j NFQUEUE "
                                 f"--queue-num {qnum + 2} --queue-bypass")
                if nat.delay_ms:
                    lines.append(f"-A {chain} -m physdev {match} -j NFQUEUE "
                                 f"--queue-num {qnum} --queue-bypass")
        lines += ["COMMIT", ""]
        if any(nat.loss for _o, _i, nat, _q in self._wan.values()):
            # Loss is per wire packet: a GSO super-packet dropped whole
            # would be up to 45 packets lost in one event (reno at 100 ms,
            # 1 % ran at twice the Mathis rate that way).  So every box on
            # the public bridge sends MTU-sized packets onto it.
            for up_role, _br, down_role, ifname, _cidr, _gw in self._links:
                if up_role == "inet":
                    _cmd(["ip", "-n", self.host_ns(down_role), "link", "set", "dev",
                          ifname, "gso_max_segs", "1"])
        if len(lines) > 5:
            _cmd(["ip", "netns", "exec", inet] + _iptables_restore_argv(),
                 input="\n".join(lines))
            # bridged frames now traverse inet's iptables (only its mangle
            # rules above exist; nothing else there looks at them)
            _cmd(["ip", "netns", "exec", inet, "sysctl", "-q", "-w",
                  "net.bridge.bridge-nf-call-iptables=1"])
        for port, (outer, ifname, nat, _qnum) in self._wan.items():
            if nat.rate_mbit:
                # up the link: egress of the box's wan interface; down it:
                # egress of the bridge port towards the box
                for ns, dev in ((self.host_ns(outer), ifname), (inet, port)):
                    _cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root"]
                         + _tbf_args(nat.rate_mbit))

    def down(self):
        """Kill the lab's processes and delete every namespace it created
        (which removes their veths and bridges).  Idempotent; safe before,
        during-failure-of and after up()."""
        started = time.monotonic()
        self._is_up = False
        for line in self.delay_lines.values():
            line.stop()
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        self._procs = []
        failed = []
        for ns in reversed(list(self._created)):
            if _delete_netns(ns):
                self._created.remove(ns)
            else:
                failed.append(ns)
        if self._pidfile_written and not failed:
            try:
                os.unlink(_pidfile(self.prefix))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            self._pidfile_written = False
        if not failed:
            _live_labs.discard(self)
        self.down_seconds = time.monotonic() - started
        if failed:
            raise NatLabError(f"could not delete namespaces {failed}")
