"""
A real miniupnpd (Debian's, nftables build) on a NAT router of the lab:
``NatLab(a=Nat("symmetric", upnp=True))`` runs one on natA, answering
UPnP-IGD, NAT-PMP and PCP on natA's LAN side, so that host a can ask for a
mapping of its punching port, and the lab's other side can then reach that
port through a NAT that is otherwise symmetric.

What it takes (found the hard way; each step is below):

* miniupnpd refuses to map when its WAN address is reserved ("Reserved /
  private IP address ... Port forwarding is impossible"), and the lab's
  public network is 203.0.113.0/24 (TEST-NET-3); ``ext_ip=`` with such an
  address is a config error.  So it learns its address by STUN
  (``ext_perform_stun=yes``): four binding requests from four ports, two
  of them asking the server to answer from another address, two from
  another port (RFC 3489's CHANGE-REQUEST); it maps only when all four
  answers come back with its own address and ports (no filtering NAT
  above it).  The lab's STUN server (``python3 natlab_upnp.py stun``,
  below) runs in the server namespace on SERVER_IP and a second address,
  ports 3478 and 3479.  For that test to pass, natA's own packets must
  keep their ports (an exemption from ``MASQUERADE --random-fully`` for
  the router's own source address: LAN hosts stay symmetric) and the
  answers from the second address and port must reach natA (an INPUT
  accept for UDP from the STUN server).
* It writes only into nftables chains that exist: ``table inet
  miniupnpd`` with a forward chain (``miniupnpd``) and DNAT / SNAT chains
  (``prerouting_miniupnpd``, ``postrouting_miniupnpd``) hooked from base
  chains we create.
* An accept in its forward chain does not undo the lab's iptables FORWARD
  drop (two tables, both must accept): our nftables base chain, which runs
  before iptables' (priority -5 < 0), marks every packet, jumps to
  miniupnpd's chain and clears the mark when that returns; a packet
  miniupnpd accepted keeps the mark, and iptables FORWARD accepts the mark
  before its drop.
* Each lab has its own config, pidfile and lease file (in a temporary
  folder), and ``listening_ip=lan0``; it runs in the foreground (``-d``)
  under lab.popen, so lab.down() kills it with the namespaces.

``mappings(lab, router)`` lists what miniupnpd holds (its DNAT rules in
nftables), for tests that check that a mapping was deleted.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

#: The STUN server's second address (CHANGE-REQUEST "change IP").
STUN_OTHER_IP_LAST = 11
STUN_PORTS = (3478, 3479)
#: The mark (one bit) of packets miniupnpd's forward chain accepted.
MARK = 0x00100000
#: Seconds miniupnpd gets to start (its STUN check takes one round trip,
#: or 3 s per missing answer).
START_TIMEOUT = 20.0
#: Seconds the lab's STUN server runs at most (it is killed with the lab).
STUN_LIFETIME = 3600.0

MINIUPNPD = "miniupnpd"
#: Lines of a daemon's log kept (for failure messages).
MAX_LOG_LINES = 20000
#: The log line after which it maps (or one that says it never will).
_STARTED = re.compile(r"HTTP listening on port|Port forwarding is impossible|now disabled|EXITING")


def unavailable_reason() -> str | None:
    """None if miniupnpd and nft are here, else why not."""
    for tool in (MINIUPNPD, "nft"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"the UPnP lab needs `{tool}` (apt-get install miniupnpd miniupnpd-nftables nftables)"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _nft_tables() -> str:
    return f"""
table inet miniupnpd {{
    chain forward {{
        type filter hook forward priority -5; policy accept;
        meta mark set meta mark | {MARK:#x}
        jump miniupnpd
        meta mark set meta mark & {0xffffffff ^ MARK:#x}
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def _config(lab, router: str, lan_net: str, folder: str) -> str:
    stun_host = lab.server_ip
    return "\n".join([
        "ext_ifname=wan0",
        "listening_ip=lan0",
        "http_port=0",
        "enable_natpmp=yes",
        "enable_upnp=yes",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_host}",
        f"ext_stun_port={STUN_PORTS[0]}",
        "upnp_table_name=miniupnpd",
        "upnp_nat_table_name=miniupnpd",
        "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"lease_file={folder}/leases",
        "secure_mode=yes",
        "system_uptime=yes",
        "notify_interval=60",
        "clean_ruleset_interval=600",
        "min_lifetime=60",
        f"uuid={uuid.uuid4()}",
        f"allow 1024-65535 {lan_net}.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])


class Miniupnpd:
    """One running miniupnpd (its process, folder and log)."""

    def __init__(self, router: str, proc, folder: str, seconds: float):
        self.router = router
        self.proc = proc
        self.folder = folder
        self.start_seconds = seconds
        self.output: list[str] = []

    def log_text(self) -> str:
        return "\n".join(self.output)


def _drain(proc, lines: list[str], seen: threading.Event, pattern: re.Pattern) -> None:
    """Read the daemon's log (stderr) for as long as it runs, so that its
    pipe never fills and blocks it (with -d it logs every request); set
    C{seen} once a line matches C{pattern} (or it exits)."""
    for raw in iter(proc.stderr.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if len(lines) < MAX_LOG_LINES:
            lines.append(line)
        if pattern.search(line):
            seen.set()
    seen.set()


def start(lab) -> dict:
    """Start a STUN server and a miniupnpd on the router of every host
    whose Nat has upnp=True; return {router: Miniupnpd}.  NatLabError if
    one does not come up (with its log)."""
    from tests.natlab import LAN_NET, NatLabError, _cmd

    reason = unavailable_reason()
    if reason is not None:
        raise NatLabError(reason)
    hosts = [h for h in ("a", "b") if lab.nats[h].upnp]
    for host in hosts:
        nat = lab.nats[host]
        if nat.kind == "none" or nat.cgnat is not None or (lab.shared_lan and host == "b"):
            raise NatLabError("upnp=True needs a home NAT of its own directly on the public network")
    server_ns = lab.host_ns("server")
    net = lab.server_ip.rsplit(".", 1)[0]
    other_ip = f"{net}.{STUN_OTHER_IP_LAST}"
    _cmd(["ip", "-n", server_ns, "addr", "add", f"{other_ip}/24", "dev", "eth0"])
    stun = lab.popen("server", [sys.executable, os.path.abspath(__file__), "stun", lab.server_ip, other_ip],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([stun.stdout], [], [], 10)
    if not ready or stun.stdout.readline().strip() != b"ready":
        raise NatLabError("the lab's STUN server did not start: "
                          + (stun.stderr.read().decode(errors="replace") if stun.poll() is not None else "no answer"))
    daemons = {}
    for host in hosts:
        router = lab.outer_box(host)
        ns = lab.host_ns(router)
        index = 1 if host == "a" else 2
        wan_ip = lab.private_ip(router)
        lan_net = LAN_NET.format(index)
        _cmd(["ip", "netns", "exec", ns, _tool("nft"), "-f", "-"], input=_nft_tables())
        rules = "\n".join([
            "*nat",
            # The router's own packets keep their ports (miniupnpd's STUN
            # check); the LAN's still get --random-fully.
            f"-I POSTROUTING 1 -o wan0 -s {wan_ip} -j RETURN",
            "COMMIT",
            "*filter",
            f"-I INPUT 1 -i wan0 -p udp -s {lab.server_ip},{other_ip} --sport {STUN_PORTS[0]}:{STUN_PORTS[1]} "
            "-j ACCEPT",
            f"-I FORWARD 1 -i wan0 -o lan0 -m mark --mark {MARK:#x}/{MARK:#x} -j ACCEPT",
            "COMMIT",
            "",
        ])
        _cmd(["ip", "netns", "exec", ns, shutil.which("iptables-restore") or "iptables-restore", "--noflush"],
             input=rules)
        folder = tempfile.mkdtemp(prefix=f"p2pft-upnp-{lab.prefix}-{router}-")
        conf = os.path.join(folder, "miniupnpd.conf")
        with open(conf, "w") as f:
            f.write(_config(lab, router, lan_net, folder))
        started = time.monotonic()
        proc = lab.popen(router, [_tool(MINIUPNPD), "-f", conf, "-d", "-P", os.path.join(folder, "pid")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        daemon = Miniupnpd(router, proc, folder, 0.0)
        seen = threading.Event()
        threading.Thread(target=_drain, args=(proc, daemon.output, seen, _STARTED), daemon=True).start()
        seen.wait(START_TIMEOUT)
        if not (any("Port forwarding is now enabled" in line for line in daemon.output)
                and any("HTTP listening on port" in line for line in daemon.output)):
            raise NatLabError(f"miniupnpd on {router} did not start:\n{daemon.log_text()[-4000:]}")
        daemon.start_seconds = time.monotonic() - started
        daemons[router] = daemon
    return daemons


def mappings(lab, router: str) -> list[str]:
    """The DNAT rules miniupnpd holds on C{router} (one per mapping)."""
    from tests.natlab import _cmd

    res = _cmd(["ip", "netns", "exec", lab.host_ns(router), _tool("nft"), "list", "chain", "inet", "miniupnpd",
                "prerouting_miniupnpd"])
    return [line.strip() for line in res.stdout.splitlines() if "dnat" in line]


# ---------------------------------------------------------------------------
# the lab's STUN server (RFC 3489 binding with CHANGE-REQUEST)

BINDING_REQUEST = 0x0001
BINDING_RESPONSE = 0x0101
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003


def stun_answer(request: bytes, source: tuple[str, int]) -> tuple[bytes, int] | None:
    """The response to a binding request from C{source}, and its
    CHANGE-REQUEST flags (0x4: from the other address, 0x2: from the other
    port); None for anything else."""
    if len(request) < 20 or len(request) > 548:
        return None
    kind, length = struct.unpack_from("!HH", request)
    if kind != BINDING_REQUEST or 20 + length > len(request):
        return None
    flags = 0
    at = 20
    while at + 4 <= 20 + length:
        attr, size = struct.unpack_from("!HH", request, at)
        if attr == CHANGE_REQUEST and size == 4:
            (flags,) = struct.unpack_from("!I", request, at + 4)
        at += 4 + size + (-size % 4)
    mapped = struct.pack("!HHBBH4s", MAPPED_ADDRESS, 8, 0, 1, source[1], socket.inet_aton(source[0]))
    return struct.pack("!HH", BINDING_RESPONSE, len(mapped)) + request[4:20] + mapped, flags & 0x6


def _serve_stun(primary: str, other: str) -> None:
    sockets = {}
    for ip in (primary, other):
        for port in STUN_PORTS:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, port))
            sockets[(ip, port)] = s
    print("ready", flush=True)
    deadline = time.monotonic() + STUN_LIFETIME
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(sockets.values()), [], [], 5.0)
        for s in ready:
            data, source = s.recvfrom(2048)
            answer = stun_answer(data, source)
            if answer is None:
                continue
            payload, flags = answer
            ip, port = s.getsockname()
            if flags & 0x4:
                ip = other if ip == primary else primary
            if flags & 0x2:
                port = STUN_PORTS[1] if port == STUN_PORTS[0] else STUN_PORTS[0]
            sockets[(ip, port)].sendto(payload, source)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "stun":
        _serve_stun(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: natlab_upnp.py stun PRIMARY_IP OTHER_IP")
