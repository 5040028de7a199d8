"""
Server load mode of the benchmark suite: many rendezvous clients against
one C{p2pft server} process on loopback, then its relay's throughput.

The clients live in C{WORKERS} load-generator processes (this file run as
C{suite_load.py worker ...}, Twisted), each holding its share of the
connections.  The harness steers them over stdin/stdout (JSON lines):

 1. connect: half the clients connect, a few at a time, and each sends
    C{CLAIM n} for a nameplate of its own as soon as WELCOME arrives: a
    peer waiting for its partner, which is what a server holds for long
    (a connection that says nothing is turned away after a while, and
    only so many may be silent at once); then the server's RSS per
    waiting client is measured;
 2. pair: the other half, the partners, connect the same way and claim
    those nameplates; each pair, once PAIRED, exchanges one MSG; pairings
    per second count from the first partner's connect to the last MSG,
    over all workers (C{time.monotonic()} is one clock for every process),
    so they include what a real pairing costs: a new connection;
 3. quit: the clients, all still connected, disconnect.

Relay: a second server with C{--relay}, two raw TCP legs (WELCOME skipped,
C{RELAY <token> sender|receiver}, C{OK}), and bytes pushed one way with
large sends and drained with large C{recv_into}s, in two threads.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from suite_procs import MiB, PYTHON, BenchError, Procs, cpu_seconds, p2pft_env, rss_kib
from suite_rows import p2pft_server

WORKERS = 2
#: Connections one worker has in progress at once (under the listen backlog).
CONNECT_WINDOW = 24
#: The opaque message each client sends its partner (bytes, before base64).
MESSAGE = 32
#: Size of the relay's send and receive buffers in the harness (bytes).
RELAY_CHUNK = 4 * MiB


@dataclass
class LoadResult:
    clients: int
    #: Seconds until every waiting client had its WELCOME and claimed.
    connect_seconds: float
    #: Server VmRSS in KiB: idle, with every client waiting, with every client paired.
    rss_idle: int
    rss_waiting: int
    rss_paired: int
    pairings_per_s: float
    #: Load generators' CPU seconds (all workers together).
    generator_cpu: float
    relay_bytes: int
    relay_mb_per_s: float
    #: The relay server's CPU seconds while relaying.
    relay_cpu: float

    @property
    def kib_per_client(self) -> float:
        return (self.rss_waiting - self.rss_idle) / (self.clients // 2)


def run_load(clients: int, relay_bytes: int, log_dir: str) -> LoadResult:
    """Measure the server under C{clients} (an even number) rendezvous clients, then its relay."""
    limit = _raise_fd_limit(clients + 1024)  # the server and workers inherit it
    if clients + 128 > limit:
        raise BenchError(f"{clients} clients need more open files than the limit here ({limit})")
    with Procs(log_dir) as procs:
        room = str(clients + 64)
        server, address = p2pft_server(procs, "server", "--max-connections", room, "--max-per-ip", room,
                                       "--hello-timeout", "600")
        rss_idle = rss_kib(server.pid)
        workers = _start_workers(procs, address, clients)
        held = _all(workers, "held", time.monotonic() + 120 + clients / 100)
        rss_waiting = rss_kib(server.pid)
        for w in workers:
            w.send("pair")
        paired = _all(workers, "paired", time.monotonic() + 60 + clients / 100)
        rss_paired = rss_kib(server.pid)
        for w in workers:
            w.send("quit")
        generator_cpu = sum(w.wait_ok(time.monotonic() + 60).usage.cpu for w in workers)
        server.stop()
        relay_server, relay_address = p2pft_server(procs, "relay-server", "--relay")
        relay_mbps, relay_cpu = _relay(relay_server.pid, relay_address, relay_bytes)
    return LoadResult(
        clients, _span(held), rss_idle, rss_waiting, rss_paired, clients / 2 / _span(paired),
        generator_cpu, relay_bytes, relay_mbps, relay_cpu,
    )


def _start_workers(procs: Procs, address: str, clients: int) -> list:
    host, port = address.rsplit(":", 1)
    workers, first = [], 1
    for i in range(WORKERS):
        pairs = clients // 2 // WORKERS + (i < clients // 2 % WORKERS)
        # Each worker from its own 127.0.0.x: a source address has only
        # ~28,000 ephemeral ports for one server address and port.
        argv = [PYTHON, os.path.abspath(__file__), "worker", f"127.0.0.{2 + i}", host, port, str(first), str(pairs)]
        workers.append(procs.start(f"worker-{i}", argv, lines="stdout", stdin=subprocess.PIPE, env=p2pft_env()))
        first += pairs
    return workers


def _all(workers: list, event: str, deadline: float) -> list[dict]:
    """Every worker's C{event} (or the first one's error)."""
    events = []
    for w in workers:
        _, m = w.wait_line(rf'"event": "({event}|error)"', deadline)
        message = json.loads(m.string)
        if message["event"] == "error":
            raise w.failed(message["message"])
        events.append(message)
    return events


def _span(events: list[dict]) -> float:
    """Seconds from the earliest C{first} to the latest C{last} of the workers' events."""
    return max(e["last"] for e in events) - min(e["first"] for e in events)


# -- relay


def _relay(server_pid: int, address: str, total: int) -> tuple[float, float]:
    """Push C{total} bytes through the relay: (MB/s, server CPU seconds)."""
    host, port = address.rsplit(":", 1)
    token = os.urandom(32).hex()
    legs = [_leg(host, int(port), token, side) for side in ("sender", "receiver")]
    try:
        for leg in legs:
            if _read_line(leg) != b"OK":
                raise BenchError("the relay did not answer OK")
        cpu = cpu_seconds(server_pid)
        start = time.monotonic()
        pusher = threading.Thread(target=_push, args=(legs[0], total), daemon=True)
        pusher.start()
        received = _drain(legs[1])
        elapsed = time.monotonic() - start
        pusher.join()
        cpu = cpu_seconds(server_pid) - cpu
    finally:
        for leg in legs:
            leg.close()
    if received != total:
        raise BenchError(f"relay: received {received} of {total} bytes")
    return total / elapsed / 1e6, cpu


def _leg(host: str, port: int, token: str, side: str) -> socket.socket:
    leg = socket.create_connection((host, port), timeout=60)
    if not _read_line(leg).startswith(b"WELCOME "):
        raise BenchError("relay: no WELCOME")
    leg.sendall(f"RELAY {token} {side}\n".encode())
    return leg


def _read_line(sock: socket.socket) -> bytes:
    """One short protocol line, byte by byte (nothing after it is consumed)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(line) > 8192:
            raise BenchError(f"relay: connection closed after {line!r}")
        line += byte
    return line.rstrip(b"\r\n")


def _push(sock: socket.socket, total: int) -> None:
    block = memoryview(os.urandom(RELAY_CHUNK))
    for offset in range(0, total, RELAY_CHUNK):
        sock.sendall(block[: min(RELAY_CHUNK, total - offset)])
    sock.shutdown(socket.SHUT_WR)


def _drain(sock: socket.socket) -> int:
    buf = bytearray(RELAY_CHUNK)
    received = 0
    while n := sock.recv_into(buf):
        received += n
    return received


# -- the load generator process


def _raise_fd_limit(want: int = 0) -> int:
    """Open files: at least C{want} where allowed (CAP_SYS_RESOURCE), else
    the hard limit.  Returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def worker(source: str, host: str, port: int, first_nameplate: int, pairs: int) -> None:
    """From address C{source}, hold C{pairs} clients waiting on nameplates
    from C{first_nameplate} on, then bring in their partners, as the
    harness says."""
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import ClientFactory
    from twisted.protocols.basic import LineReceiver

    _raise_fd_limit()
    payload = b"MSG " + base64.b64encode(bytes(MESSAGE))

    class Client(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            verb = line.split(b" ", 1)[0]
            if verb == b"WELCOME":
                self.sendLine(b"CLAIM %d" % self.nameplate)
                swarm.welcomed()
            elif verb == b"PAIRED":
                self.sendLine(payload)
            elif verb == b"MSG":
                swarm.messaged()
            else:
                swarm.fail(f"unexpected line from the server: {line[:200]!r}")

        def connectionLost(self, reason=None) -> None:
            if not swarm.quitting:
                swarm.fail(f"connection lost: {reason.getErrorMessage()}")

    class Swarm(ClientFactory):
        protocol = Client

        def __init__(self) -> None:
            self.clients: list[Client] = []
            self.quitting = False
            self.failed = False
            self._count = 0
            self._first = 0.0

        def buildProtocol(self, addr):
            client = super().buildProtocol(addr)
            # Waiters and partners alike: nameplates in order of connection.
            client.nameplate = first_nameplate + len(self.clients) % pairs
            self.clients.append(client)
            return client

        def clientConnectionFailed(self, connector, reason) -> None:
            self.fail(f"cannot connect: {reason.getErrorMessage()}")

        def connect(self, then: str = "held") -> None:
            """Connect C{pairs} more clients (each claims on WELCOME)."""
            self._first = time.monotonic()
            self._started = self._count = 0
            self._then = then
            for _ in range(min(CONNECT_WINDOW, pairs)):
                self._connect_one()

        def _connect_one(self) -> None:
            self._started += 1
            reactor.connectTCP(host, port, self, timeout=60, bindAddress=(source, 0))

        def welcomed(self) -> None:
            if self._started < pairs:
                self._connect_one()
            if self._then == "held":
                self._count += 1
                if self._count == pairs:
                    self._report("held")

        def pair(self) -> None:
            self.connect(then="paired")

        def messaged(self) -> None:
            self._count += 1
            if self._count == 2 * pairs:
                self._report("paired")

        def _report(self, event: str) -> None:
            commands.emit(event=event, first=self._first, last=time.monotonic(), clients=2 * pairs)

        def fail(self, message: str) -> None:
            if not self.quitting:
                self.failed = True
                commands.emit(event="error", message=message)
                self.quit()

        def quit(self) -> None:
            self.quitting = True
            for client in self.clients:
                client.transport.loseConnection()
            commands.transport.loseConnection()  # once flushed, stops the reactor

    class Commands(LineReceiver):
        delimiter = b"\n"

        def emit(self, **fields) -> None:
            self.transport.write(json.dumps(fields).encode() + b"\n")

        def lineReceived(self, line: bytes) -> None:
            {b"pair": swarm.pair, b"quit": swarm.quit}[line.strip()]()

        def connectionLost(self, reason=None) -> None:
            swarm.fail("the harness went away")
            reactor.stop()

    swarm = Swarm()
    commands = Commands()
    stdio.StandardIO(commands)
    reactor.callWhenRunning(swarm.connect)
    reactor.run()
    sys.exit(1 if swarm.failed else 0)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
