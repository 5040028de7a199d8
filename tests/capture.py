"""
A tiny packet capture without external tools, plus pcap/TCP helpers for
tests that need to look at what really crossed the wire.

The capture program opens an ``AF_PACKET``/``SOCK_RAW`` socket bound to one
interface (all protocols, ``ETH_P_ALL``) and writes every frame it sees to a
classic libpcap file (microsecond timestamps, linktype 1 = Ethernet), so the
file opens in Wireshark/tshark too.  Run it inside a lab namespace::

    ip netns exec <prefix>-inet python tests/capture.py --interface br0 --output cap.pcap
    python -m tests.capture --interface br0 --output cap.pcap        # same thing

It prints ``CAPTURING`` on stdout (flushed) once the socket is bound and
the interface is in promiscuous mode, so a test can wait for that line
instead of sleeping.  SIGTERM or SIGINT stops it: frames already queued on
the socket are still written, the file is flushed and closed, one line ::

    STATS interface=br0 frames=N bytes=M truncated=T kernel_packets=P kernel_drops=D

goes to stderr and the exit status is 0.  ``bytes`` counts the bytes
written to the pcap file as frame data; ``kernel_packets``/``kernel_drops``
come from ``getsockopt(SOL_PACKET, PACKET_STATISTICS)`` (packets the socket
was offered, and how many of those it had to drop because its receive
buffer was full); ``-1`` if the kernel would not say.  Setup errors (no
such interface, no CAP_NET_RAW) exit with status 2 before ``CAPTURING``.

Capturing on a Linux bridge device (the NAT lab's ``br0``)
----------------------------------------------------------
A unicast frame the bridge *forwards* from one port to another (say natA's
wan to the server) never passes through the bridge device's own receive
path, so a packet socket bound to ``br0`` does not see it -- only frames the
bridge floods or that are addressed to the bridge itself.  When the bridge
device is in promiscuous mode, however, the bridge also hands a copy of
every frame it forwards up through ``br0`` ("local receive"), and that is
where the packet socket sees it.  The capture therefore puts the interface
into promiscuous mode with ``PACKET_ADD_MEMBERSHIP``/``PACKET_MR_PROMISC``
(undone automatically when the socket closes; ``--no-promisc`` switches it
off).  With it, every frame crossing the bridge is captured exactly once
(on its way *into* the bridge; there is no second copy for the egress
port).  Capturing on the bridge *ports* (``p-natA``, ``p-server``) instead
would show a natA->server frame twice: once on each port.

Frames may be larger than the MTU: veth and the bridge pass GSO
"super-packets" (one IPv4/TCP header, up to 64 KiB of payload) and the
socket sees them before segmentation.  The capture reads up to
:data:`SNAPLEN` bytes per frame and records the true length; the TCP helpers
below do not care about segment sizes.  TCP/IP checksums of locally
generated packets are usually not filled in yet (checksum offload), so
Wireshark may flag them as wrong; that is expected.

Helpers for tests
-----------------
:func:`read_pcap` (frames), :func:`tcp_payloads` (per-direction reassembled
TCP byte streams), :func:`captured_bytes` (all frame bytes concatenated),
:func:`capture_argv` (the argv of the capture program) and, for Twisted
tests, :func:`start_capture` which runs it in a lab namespace and waits for
``CAPTURING``; ``await capture.stop()`` returns the parsed STATS line.

Searching for plaintext: a secret may straddle two TCP segments, so search
the reassembled streams (:func:`tcp_payloads`), not only the raw frames
(:func:`captured_bytes`) -- ideally both.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import select
import signal
import socket
import struct
import sys
import time

__all__ = [
    "SNAPLEN",
    "LINKTYPE_ETHERNET",
    "Capture",
    "capture_argv",
    "captured_bytes",
    "main",
    "parse_stats",
    "read_pcap",
    "read_pcap_records",
    "start_capture",
    "tcp_payloads",
]

# Linux constants the socket module may not export
ETH_P_ALL = 0x0003
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

#: Largest frame stored per record (bigger ones are cut, with their real
#: length recorded).  GSO frames are up to ~64 KiB; this is Wireshark's max.
SNAPLEN = 262144
LINKTYPE_ETHERNET = 1
#: Socket receive buffer.  8 MiB dropped frames when a 100 MB transfer
#: raced through the lab; 64 MiB did not (memory is only used while queued).
DEFAULT_RCVBUF = 64 * 1024 * 1024

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D


# ---------------------------------------------------------------------------
# the capture program


def _open_socket(interface: str, rcvbuf: int, promisc: bool) -> tuple[socket.socket, int]:
    # Protocol 0 at creation: the socket receives nothing until bind() hooks
    # it to *this* interface, so no frame of another interface slips in.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:  # not CAP_NET_ADMIN: capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((interface, ETH_P_ALL))
        if promisc:
            ifindex = socket.if_nametoindex(interface)
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        # reading the statistics resets them: start counting from here
        _kernel_stats(sock)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except BaseException:
        sock.close()
        raise
    return sock, got


def _kernel_stats(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last call; (-1, -1) if unavailable.

    The kernel's tp_packets already includes tp_drops."""
    try:
        raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        return struct.unpack("II", raw[:8])
    except (OSError, struct.error):
        return -1, -1


def _pcap_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    # magic, version 2.4, thiszone, sigfigs, snaplen, network
    return struct.pack("=IHHiIII", _PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, linktype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capture", description="Capture every frame on one interface into a pcap file "
        "until SIGTERM/SIGINT (needs CAP_NET_RAW).")
    parser.add_argument("--interface", "-i", required=True)
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--rcvbuf", type=int, default=DEFAULT_RCVBUF,
                        help="socket receive buffer in bytes (default 64 MiB)")
    parser.add_argument("--no-promisc", dest="promisc", action="store_false",
                        help="do not put the interface into promiscuous mode")
    args = parser.parse_args(argv)

    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        sock, got_rcvbuf = _open_socket(args.interface, args.rcvbuf, args.promisc)
    except OSError as e:
        print(f"capture: cannot capture on {args.interface!r}: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        out = open(args.output, "wb", buffering=1024 * 1024)
    except OSError as e:
        print(f"capture: cannot write {args.output!r}: {e}", file=sys.stderr, flush=True)
        sock.close()
        return 2

    buf = bytearray(SNAPLEN)
    view = memoryview(buf)
    frames = nbytes = truncated = 0
    sock.setblocking(False)

    def drain() -> None:
        """Write every frame queued on the socket right now."""
        nonlocal frames, nbytes, truncated
        while True:
            try:
                n = sock.recv_into(buf, SNAPLEN, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENETDOWN:   # interface went down: keep going
                    continue
                raise
            ts = time.time_ns()
            incl = min(n, SNAPLEN)
            if incl < n:
                truncated += 1
            out.write(struct.pack("=IIII", ts // 1_000_000_000, (ts // 1000) % 1_000_000, incl, n))
            out.write(view[:incl])
            frames += 1
            nbytes += incl

    with out, sock:
        out.write(_pcap_header())
        out.flush()
        print(f"capture: {args.interface} rcvbuf={got_rcvbuf} promisc={args.promisc}",
              file=sys.stderr, flush=True)
        print("CAPTURING", flush=True)
        while not stop:
            try:
                ready, _, _ = select.select([sock, wake_r], [], [])
            except InterruptedError:
                continue
            if sock in ready:
                drain()
                out.flush()
            if wake_r in ready:
                try:
                    while wake_r.recv(64):
                        pass
                except BlockingIOError:
                    pass
        # everything that reached the socket before the signal
        drain()
        packets, drops = _kernel_stats(sock)
        out.flush()
    print(f"STATS interface={args.interface} frames={frames} bytes={nbytes} "
          f"truncated={truncated} kernel_packets={packets} kernel_drops={drops}",
          file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------
# reading pcap files


def read_pcap_records(path: str, allow_truncated: bool = False) -> list[tuple[float, int, bytes]]:
    """[(timestamp, original length, frame bytes)] of a classic pcap file
    (either byte order, micro- or nanosecond timestamps).

    A record cut off at the end of the file (the capture was killed rather
    than stopped) raises ValueError unless allow_truncated."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (only {len(data)} bytes)")
    for endian in ("<", ">"):
        magic, = struct.unpack(endian + "I", data[:4])
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            break
    else:
        raise ValueError(f"{path}: not a classic pcap file (magic {data[:4].hex()})")
    divisor = 1e6 if magic == _PCAP_MAGIC_US else 1e9
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: linktype {linktype}, expected {LINKTYPE_ETHERNET} (Ethernet)")
    rec = struct.Struct(endian + "IIII")
    records = []
    pos = 24
    while pos < len(data):
        if pos + 16 > len(data):
            if allow_truncated:
                break
            raise ValueError(f"{path}: truncated record header at offset {pos}")
        sec, frac, incl, orig = rec.unpack_from(data, pos)
        pos += 16
        if pos + incl > len(data):
            if allow_truncated:
                break
            raise ValueError(f"{path}: truncated record at offset {pos - 16}")
        records.append((sec + frac / divisor, orig, data[pos:pos + incl]))
        pos += incl
    return records


def read_pcap(path: str, allow_truncated: bool = False) -> list[bytes]:
    """The frames of a pcap file, in capture order."""
    return [frame for _, _, frame in read_pcap_records(path, allow_truncated)]


def captured_bytes(path: str, allow_truncated: bool = False) -> bytes:
    """All captured frame bytes concatenated (headers included)."""
    return b"".join(read_pcap(path, allow_truncated))


# ---------------------------------------------------------------------------
# TCP over IPv4 over Ethernet


def _tcp_segment(frame: bytes):
    """(src_ip, src_port, dst_ip, dst_port, seq, flags, payload) or None."""
    off = 14
    if len(frame) < off:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:   # VLAN tags
        ethertype = int.from_bytes(frame[off + 2:off + 4], "big")
        off += 4
    if ethertype != 0x0800 or len(frame) < off + 20:
        return None
    ihl = (frame[off] & 0x0F) * 4
    if frame[off] >> 4 != 4 or ihl < 20 or frame[off + 9] != 6:
        return None
    if int.from_bytes(frame[off + 6:off + 8], "big") & 0x3FFF:
        return None   # a fragment: not a whole TCP segment
    total = int.from_bytes(frame[off + 2:off + 4], "big")
    end = off + total if total else len(frame)   # 0: BIG TCP GSO frame
    src_ip = socket.inet_ntoa(frame[off + 12:off + 16])
    dst_ip = socket.inet_ntoa(frame[off + 16:off + 20])
    t = off + ihl
    if len(frame) < t + 20:
        return None
    src_port, dst_port, seq = struct.unpack_from("!HHI", frame, t)
    doff = (frame[t + 12] >> 4) * 4
    flags = frame[t + 13]
    return src_ip, src_port, dst_ip, dst_port, seq, flags, frame[t + doff:end]


_SYN = 0x02


class _Stream:
    """One direction of one TCP connection, reassembled by sequence number."""

    def __init__(self, isn: int):
        self.isn = isn            # sequence number of the first data byte
        self.data = bytearray()
        self.pending = {}         # offset -> bytes, segments after a gap

    def add(self, seq: int, payload: bytes) -> None:
        off = (seq - self.isn) & 0xFFFFFFFF
        if off >= 0x80000000:     # starts before the ISN
            off -= 0x100000000
            payload = payload[-off:] if -off < len(payload) else b""
            off = 0
        if not payload:
            return
        have = len(self.data)
        if off > have:
            # out of order: keep the longest segment seen at this offset
            if len(payload) > len(self.pending.get(off, b"")):
                self.pending[off] = payload
            return
        if off + len(payload) > have:      # (partly) new bytes
            self.data += payload[have - off:]
            self._fill()

    def _fill(self) -> None:
        progress = True
        while progress and self.pending:
            progress = False
            for off in sorted(self.pending):
                if off > len(self.data):
                    break
                payload = self.pending.pop(off)
                if off + len(payload) > len(self.data):
                    self.data += payload[len(self.data) - off:]
                progress = True

    def finish(self) -> bytes:
        # bytes after a gap that never got filled: append them in order so
        # that nothing captured is hidden from a plaintext search
        for off in sorted(self.pending):
            payload = self.pending[off]
            if off + len(payload) > len(self.data):
                self.data += payload[max(0, len(self.data) - off):]
        self.pending.clear()
        return bytes(self.data)


def tcp_payloads(frames) -> dict[tuple[str, int, str, int], bytes]:
    """TCP payload bytes per direction, {(src_ip, src_port, dst_ip, dst_port): bytes}.

    IPv4 over Ethernet only; everything else (ARP, ICMP, UDP, IP fragments)
    is skipped.  Segments are placed by sequence number, relative to the
    SYN (or to the first segment seen when the capture missed the SYN), so
    exact or partial retransmissions are not duplicated and segments
    arriving out of order are put in place.  A new SYN with a different
    sequence number on the same 4-tuple (a reused port) starts a new
    connection whose bytes are appended to the same key.  Bytes after a
    gap that was never filled are appended after the contiguous part."""
    streams: dict[tuple, list[_Stream]] = {}
    for frame in frames:
        seg = _tcp_segment(bytes(frame))
        if seg is None:
            continue
        src_ip, src_port, dst_ip, dst_port, seq, flags, payload = seg
        key = (src_ip, src_port, dst_ip, dst_port)
        conns = streams.get(key)
        if flags & _SYN:
            isn = (seq + 1) & 0xFFFFFFFF
            if conns is None:
                conns = streams[key] = [_Stream(isn)]
            elif conns[-1].isn != isn:
                if conns[-1].data or conns[-1].pending:
                    conns.append(_Stream(isn))
                else:
                    conns[-1].isn = isn
            seq = isn       # data on a SYN (TCP Fast Open) follows the SYN
        elif conns is None:
            conns = streams[key] = [_Stream(seq)]
        conns[-1].add(seq, payload)
    return {key: b"".join(c.finish() for c in conns) for key, conns in streams.items()}


# ---------------------------------------------------------------------------
# running the capture from tests


def capture_argv(interface: str, output: str, *extra: str, python: str | None = None) -> list[str]:
    """argv that runs the capture program (by file path: needs no PYTHONPATH)."""
    return [python or sys.executable, os.path.abspath(__file__),
            "--interface", interface, "--output", os.fspath(output), *extra]


_STATS_RE = re.compile(r"^STATS (.*)$", re.M)


def parse_stats(stderr: str) -> dict:
    """The STATS line of the capture's stderr as a dict (ints where possible)."""
    m = _STATS_RE.search(stderr)
    if not m:
        raise ValueError(f"no STATS line in capture output:\n{stderr}")
    stats = {}
    for item in m.group(1).split():
        k, _, v = item.partition("=")
        try:
            stats[k] = int(v)
        except ValueError:
            stats[k] = v
    return stats


class Capture:
    """A running capture started by :func:`start_capture`."""

    def __init__(self, proc, path: str, interface: str):
        self.proc = proc          # tests.procs.Proc
        self.path = path
        self.interface = interface
        self.stats: dict | None = None

    async def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM the capture, wait for it to exit 0, return its STATS."""
        self.proc.kill(signal.SIGTERM)
        code = await self.proc.wait_exit(timeout)
        if code != 0:
            raise AssertionError(f"capture exited with {code}\n{self.proc.text()}")
        self.stats = parse_stats(self.proc.err.decode(errors="replace"))
        return self.stats

    def frames(self) -> list[bytes]:
        return read_pcap(self.path)

    def tcp_payloads(self) -> dict[tuple[str, int, str, int], bytes]:
        return tcp_payloads(self.frames())

    def captured_bytes(self) -> bytes:
        return captured_bytes(self.path)


async def start_capture(testcase, lab, path: str, role: str = "inet", interface: str = "br0",
                        timeout: float = 10.0, name: str = "capture") -> Capture:
    """Start the capture in lab namespace role (Twisted tests; uses
    tests.procs.spawn, so it is killed when the test ends) and wait until
    it prints CAPTURING."""
    from tests.procs import spawn   # Twisted only when used from tests

    proc = spawn(testcase, name, lab.exec_argv(role, capture_argv(interface, path)))
    await proc.wait_for(r"(?m)^CAPTURING$", "out", timeout=timeout)
    return Capture(proc, path, interface)


if __name__ == "__main__":
    sys.exit(main())
