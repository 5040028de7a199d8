"""
Self-check of tests/capture.py: the packet capture really sees what
crosses the NAT lab's "internet" (bridge br0 in the inet namespace), so a
later "no plaintext on the wire" assertion built on it can actually fail.

The pcap/TCP helper tests run anywhere; the capture test needs root (NAT
lab) and is skipped otherwise - a failure when P2PFT_NATLAB_REQUIRED=1.
All traffic stays inside the lab's own network namespaces.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct

from twisted.trial.unittest import TestCase

from tests import capture
from tests.natlab import start_lab
from tests.procs import PYTHON, spawn

PORT = 7419
DEADLINE = 10.0

# listen on the server, accept one connection, read to EOF, report
LISTEN = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(float(sys.argv[2]))
print("READY", flush=True)
c, peer = s.accept()
c.settimeout(float(sys.argv[2]))
buf = bytearray()
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    buf += d
print("GOT", len(buf), hashlib.sha256(buf).hexdigest(), peer[0], peer[1], flush=True)
c.close()
"""

# send a file to host:port, half-close, wait for the peer to close
SEND = r"""
import socket, sys
host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
data = open(path, "rb").read()
s = socket.create_connection((host, port), timeout=timeout)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
while s.recv(1 << 16):
    pass
print("SENT", len(data), flush=True)
"""


def _marker() -> bytes:
    return b"P2PFT-CAPTURE-MARKER-" + secrets.token_hex(16).encode()


# ---------------------------------------------------------------------------
# synthetic frames for the helper tests

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _frame(src, sport, dst, dport, seq, payload=b"", flags=0x18, proto=6, vlan=None):
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst)) + l4
    eth = MAC_B + MAC_A
    if vlan is not None:
        eth += struct.pack("!HH", 0x8100, vlan)
    return eth + b"\x08\x00" + ip


def _write_pcap(path, frames):
    with open(path, "wb") as f:
        f.write(capture._pcap_header())
        for i, fr in enumerate(frames):
            f.write(struct.pack("=IIII", 1_700_000_000 + i, 500, len(fr), len(fr)))
            f.write(fr)


class CaptureHelperTests(TestCase):
    """read_pcap / tcp_payloads / captured_bytes on hand-made frames."""

    A, B = ("198.51.100.1", 40000), ("198.51.100.2", 443)

    def test_pcap_round_trip(self):
        frames = [_frame(*self.A, *self.B, 1, b"x" * n) for n in (0, 1, 1400)]
        path = self.mktemp()
        _write_pcap(path, frames)
        self.assertEqual(capture.read_pcap(path), frames)
        self.assertEqual(capture.captured_bytes(path), b"".join(frames))
        ts, orig, _ = capture.read_pcap_records(path)[1]
        self.assertEqual((round(ts, 6), orig), (1_700_000_001.0005, len(frames[1])))
        with open(path, "ab") as f:
            f.write(struct.pack("=IIII", 0, 0, 100, 100) + b"cut")
        self.assertRaises(ValueError, capture.read_pcap, path)
        self.assertEqual(capture.read_pcap(path, allow_truncated=True), frames)

    def test_tcp_reassembly(self):
        isn = 0xFFFFFFF0          # the stream wraps around 2**32
        a2b = lambda seq, data, flags=0x18: _frame(*self.A, *self.B, seq & 0xFFFFFFFF, data, flags)
        frames = [
            _frame("0.0.0.0", 68, "255.255.255.255", 67, 0, b"udp-noise", proto=17),
            b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28,                    # ARP
            a2b(isn, b"", 0x02),                                         # SYN
            _frame(*self.B, *self.A, 777, b"", 0x12),                    # SYN-ACK
            a2b(isn + 1, b"hello "),
            a2b(isn + 1, b"hello "),                                     # exact retransmission
            a2b(isn + 14, b"wide "),                                     # out of order
            a2b(isn + 7, b"world,"),
            a2b(isn + 10, b"ld, wid"),                                   # overlapping retransmit
            a2b(isn + 19, b"web", 0x19),                                 # FIN with data
            _frame(*self.B, *self.A, 778, b"ok"),
        ]
        streams = capture.tcp_payloads(frames)
        self.assertEqual(streams, {self.A + self.B: b"hello world, wide web",
                                   self.B + self.A: b"ok"})

    def test_tcp_without_syn_vlan_and_port_reuse(self):
        k = self.A + self.B
        frames = [_frame(*self.A, *self.B, 5000, b"abc", vlan=7),
                  _frame(*self.A, *self.B, 5003, b"def"),
                  _frame(*self.A, *self.B, 5001, b"bc"),
                  # same 4-tuple, new connection
                  _frame(*self.A, *self.B, 90, b"", 0x02),
                  _frame(*self.A, *self.B, 91, b"|second")]
        self.assertEqual(capture.tcp_payloads(frames), {k: b"abcdef|second"})
        # a gap that never fills: bytes after it are still reported
        gap = [_frame(*self.A, *self.B, 10, b"head"), _frame(*self.A, *self.B, 20, b"tail")]
        self.assertEqual(capture.tcp_payloads(gap), {k: b"headtail"})

    def test_parse_stats(self):
        self.assertEqual(
            capture.parse_stats("capture: br0 rcvbuf=1\nSTATS interface=br0 frames=3 bytes=9 "
                                "truncated=0 kernel_packets=3 kernel_drops=0\n"),
            {"interface": "br0", "frames": 3, "bytes": 9, "truncated": 0,
             "kernel_packets": 3, "kernel_drops": 0})


class CaptureSelfCheckTests(TestCase):
    """A real capture on the lab's br0 sees a real transfer's plaintext."""

    timeout = 30

    async def test_capture_on_br0_sees_plaintext_from_behind_nat(self):
        lab = start_lab(self)
        work = self.mktemp()
        os.makedirs(work)
        marker, absent = _marker(), _marker()
        half = 100 * 1024
        payload = os.urandom(half) + marker + os.urandom(2 * half - len(marker))
        payload_path = os.path.join(work, "payload.bin")
        with open(payload_path, "wb") as f:
            f.write(payload)

        cap = await capture.start_capture(self, lab, os.path.join(work, "inet.pcap"),
                                          role="inet", interface="br0", timeout=DEADLINE)
        listener = spawn(self, "listener", lab.exec_argv(
            "server", [PYTHON, "-c", LISTEN, str(PORT), str(DEADLINE)]))
        await listener.wait_for(r"READY", "out", timeout=DEADLINE)
        sender = spawn(self, "sender", lab.exec_argv(
            "a", [PYTHON, "-c", SEND, lab.server_ip, str(PORT), payload_path, str(DEADLINE)]))
        got = await listener.wait_for(r"GOT (\d+) ([0-9a-f]+) ([\d.]+) (\d+)", "out",
                                      timeout=DEADLINE)
        diagnostics = lambda: listener.text() + sender.text() + cap.proc.text()
        self.assertEqual(await sender.wait_exit(DEADLINE), 0, diagnostics())
        self.assertEqual(await listener.wait_exit(DEADLINE), 0, diagnostics())
        self.assertEqual((int(got.group(1)), got.group(2)),
                         (len(payload), hashlib.sha256(payload).hexdigest()), diagnostics())
        peer_ip, peer_port = got.group(3), int(got.group(4))
        self.assertEqual(peer_ip, lab.public_ip("a"), "the server should see natA's address")

        # every payload byte had crossed br0 before the server could read it
        stats = await cap.stop(DEADLINE)
        self.assertEqual(stats["truncated"], 0, stats)
        if stats["kernel_drops"] != -1:
            self.assertEqual(stats["kernel_drops"], 0, stats)
        frames = cap.frames()
        self.assertEqual(len(frames), stats["frames"])

        streams = capture.tcp_payloads(frames)
        key = (lab.public_ip("a"), peer_port, lab.server_ip, PORT)
        self.assertIn(key, streams, f"streams captured: {sorted(streams)}\n{diagnostics()}")
        stream = streams[key]
        self.assertIn(marker, stream)
        self.assertTrue(stream == payload,
                        f"reassembled stream differs from the payload: {len(stream)} bytes "
                        f"captured, {len(payload)} sent")
        # the capture shows the public side only: host a's private address
        # never appears on the "internet"
        self.assertFalse([k for k in streams if lab.private_ip("a") in (k[0], k[2])])

        # a marker that was never sent is not found, neither in the
        # reassembled streams nor in the raw frames
        raw = cap.captured_bytes()
        self.assertIn(marker, raw + b"".join(streams.values()))
        self.assertNotIn(absent, raw)
        for k, data in streams.items():
            self.assertNotIn(absent, data, k)

        # frames crossing the bridge are captured once each on br0
        syns = [f for f in frames
                if (seg := capture._tcp_segment(f)) is not None
                and seg[:4] == key and seg[5] & 0x02]
        self.assertEqual(len(syns), 1, "natA's SYN should be seen exactly once on br0")
