"""
A fixed-delay line for the NAT lab: holds every packet that iptables sends
to one NFQUEUE for a fixed time, then lets it go.

    python3 tests/delayline.py --queue-num N --delay-ms D [--no-gso]

It speaks nfnetlink_queue directly over a raw ``NETLINK_NETFILTER`` socket
(no third-party binding, nothing to compile), asks for packet metadata
only (``NFQNL_COPY_META``: the payload never crosses into userspace) and
keeps ``(due time, packet id)`` in a deque.  A packet is due ``delay``
after the kernel queued it (the message's ``NFQA_TIMESTAMP``; the line
keeps a ``SO_TIMESTAMP`` socket open so the kernel stamps packets), not
after the line happened to wake up.  Every packet has the same
delay, so due times are in arrival order, and a single
``NFQNL_MSG_VERDICT_BATCH`` ("accept every queued id up to X") releases
everything that has come due at once.  When it has bound its queue it
prints ``ready`` on stdout; on SIGTERM/SIGINT it prints one line of
counters (packets, batches, most packets held at once, worst lateness of a
release and worst time from queueing to recv(), CPU seconds) and exits (the kernel drops its queue; the lab's iptables rules
use ``--queue-bypass``, so a dead line never blackholes traffic).

The lab (tests/natlab.py) runs one of these per delayed link inside the
namespace that owns the link, at real-time priority, and kills it by PID in
``NatLab.down()``.  Measured throughput and accuracy are in natlab's
docstring.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_TIMESTAMP = 4

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 0x01
NFQA_CFG_F_GSO = 0x04

NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLMSG_ERROR = 2
NLMSG_DONE = 3
NF_ACCEPT = 1
SOL_NETLINK = 270
SO_TIMESTAMP = 29
NETLINK_NO_ENOBUFS = 5

#: Packets the kernel holds for us at most.  At the ~50k packets/s this
#: line tops out at, 20,000 packets are 400 ms of traffic: more than any
#: delay the lab's tests configure.  Beyond it the queue fails open (the
#: packet passes undelayed) rather than dropping, so an overload shows up
#: as too little delay, never as loss the test did not ask for.
QUEUE_MAXLEN = 20000
#: Receive buffer for queued-packet messages (metadata only, ~100 bytes of
#: netlink each, a few hundred of kernel overhead): room for a burst of a
#: whole QUEUE_MAXLEN while the line is descheduled.
RCVBUF = 16 << 20
#: Largest netlink message we expect (a metadata-only packet message is
#: ~100 bytes; error/ack messages are smaller).
RECV_SIZE = 4096


def nlattr(attr_type, payload):
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def nfmsg(msg_type, queue_num, attrs, seq=0, flags=NLM_F_REQUEST):
    """A complete nfnetlink_queue message (nlmsghdr + nfgenmsg + attrs)."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue_num) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type,
                       flags, seq, 0) + body


def bind_messages(queue_num, gso=True):
    """The config messages that bind queue_num in metadata-only mode."""
    flags = NFQA_CFG_F_FAIL_OPEN | (NFQA_CFG_F_GSO if gso else 0)
    mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    return [
        nfmsg(NFQNL_MSG_CONFIG, queue_num,
              [nlattr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))],
              seq=1, flags=NLM_F_REQUEST | NLM_F_ACK),
        nfmsg(NFQNL_MSG_CONFIG, queue_num,
              [nlattr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
               nlattr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
               nlattr(NFQA_CFG_FLAGS, struct.pack("!I", flags)),
               nlattr(NFQA_CFG_MASK, struct.pack("!I", mask))],
              seq=2, flags=NLM_F_REQUEST | NLM_F_ACK),
    ]


def batch_verdict(queue_num, packet_id, verdict=NF_ACCEPT):
    """Apply verdict to every queued packet whose id is <= packet_id."""
    return nfmsg(NFQNL_MSG_VERDICT_BATCH, queue_num,
                 [nlattr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))])


def parse_packet(msg):
    """(packet id, kernel timestamp in CLOCK_REALTIME seconds or None) of
    an NFQNL_MSG_PACKET message; (None, None) for any other message."""
    if len(msg) < 28:
        return None, None
    _length, mtype = struct.unpack_from("=IH", msg)
    if mtype != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
        return None, None
    pid = stamp = None
    off, end = 20, len(msg)
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", msg, off)
        if alen < 4:
            break
        atype &= 0x3FFF
        if atype == NFQA_PACKET_HDR and alen >= 8:
            pid = struct.unpack_from("!I", msg, off + 4)[0]
        elif atype == NFQA_TIMESTAMP and alen >= 20:
            sec, usec = struct.unpack_from("!QQ", msg, off + 4)
            stamp = sec + usec * 1e-6
            break           # the kernel puts the header first, the stamp later
        off += (alen + 3) & ~3
    return pid, stamp


def packet_id(msg):
    """The packet id of an NFQNL_MSG_PACKET message, else None."""
    return parse_packet(msg)[0]


class DelayLine:
    """Deque of (due, id); release() says which id to accept up to."""

    def __init__(self, delay):
        self.delay = delay
        self.held = collections.deque()
        self.late_max = 0.0     # worst lateness of a release, seconds
        self.wake_max = 0.0     # worst time from queueing to our recv()

    def arrived(self, now, pid):
        self.held.append((now + self.delay, pid))

    def release(self, now):
        """The highest id due by now (popping it and all before), or None."""
        last = None
        held = self.held
        if held and held[0][0] <= now:
            late = now - held[0][0]
            if late > self.late_max:
                self.late_max = late
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        return last

    def timeout(self, now):
        """Seconds until the next packet is due (None: nothing held)."""
        if not self.held:
            return None
        return max(0.0, self.held[0][0] - now)


def enable_kernel_timestamps():
    """Keep the kernel stamping packets (a socket with SO_TIMESTAMP does
    that machine-wide while it is open), so packet messages carry the time
    they were queued.  Returns the socket: keep it open."""
    keep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    keep.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
    return keep


def open_queue(queue_num, gso=True):
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    sock.bind((0, 0))
    for msg in bind_messages(queue_num, gso):
        sock.send(msg)
        reply = sock.recv(RECV_SIZE)
        _l, mtype = struct.unpack_from("=IH", reply)
        if mtype == NLMSG_ERROR:
            err = struct.unpack_from("=i", reply, 16)[0]
            if err:
                raise OSError(-err, f"binding nfqueue {queue_num}: {os.strerror(-err)}")
    return sock


class _Stop(Exception):
    """SIGTERM/SIGINT: leave the loop (a plain flag would not do: Python
    restarts an interrupted select() with the remaining timeout)."""


def _on_signal(signum, frame):
    raise _Stop()


def _loop(sock, queue_num, line, counts):
    monotonic = time.monotonic
    realtime = time.time
    # CLOCK_REALTIME (kernel stamps) -> CLOCK_MONOTONIC (our deadlines);
    # fixed for the line's life: NTP slews far less than a delay's error
    to_mono = monotonic() - realtime()
    recv = sock.recv
    fds = [sock]
    held = line.held
    delay = line.delay
    while True:
        last = line.release(monotonic())
        if last is not None:
            sock.send(batch_verdict(queue_num, last))
            counts["batches"] += 1
        select.select(fds, (), (), line.timeout(monotonic()))
        # drain whatever is waiting, stamping each packet as we see it
        while True:
            try:
                msg = recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            pid, stamp = parse_packet(msg)
            if pid is not None:
                now = monotonic()
                if stamp is not None:
                    # queued at stamp: due `delay` after that, not after
                    # our (possibly late) wakeup; never stamped in the future
                    arrived = min(now, stamp + to_mono)
                    if now - arrived > line.wake_max:
                        line.wake_max = now - arrived
                else:
                    arrived = now
                held.append((arrived + delay, pid))
                counts["packets"] += 1
        if len(held) > counts["max_held"]:
            counts["max_held"] = len(held)


def run(queue_num, delay, gso=True, out=sys.stdout):
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    counts = {"packets": 0, "batches": 0, "max_held": 0}
    line = DelayLine(delay)
    try:
        keep = [enable_kernel_timestamps()]     # held open until we exit
        sock = open_queue(queue_num, gso)
        sock.setblocking(False)
        out.write("ready\n")
        out.flush()
        _loop(sock, queue_num, line, counts)
        keep.clear()
    except _Stop:
        pass
    cpu = os.times()
    out.write(f"packets={counts['packets']} batches={counts['batches']} "
              f"max_held={counts['max_held']} late_max_ms={line.late_max * 1000:.2f} "
              f"wake_max_ms={line.wake_max * 1000:.2f} "
              f"cpu={cpu.user + cpu.system:.3f}\n")
    out.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--queue-num", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--no-gso", action="store_true",
                   help="make the kernel segment GSO packets before queueing them")
    args = p.parse_args(argv)
    try:
        run(args.queue_num, args.delay_ms / 1000.0, gso=not args.no_gso)
    except OSError as e:
        sys.stderr.write(f"delayline: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
