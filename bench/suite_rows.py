"""
The transfer rows of the benchmark suite: each tool moves the same source
file (or, for iperf3, a timed stream) over loopback, C{runs} times.

Every transfer is timed the same way: the sender starts first and the
harness waits until it says it is ready; the clock starts when the receiver
process is started.  First byte: the first write into the receiver's
(empty) output directory, seen by inotify, or the first byte on the
receiver's stdout pipe.  Done: the receiver's C{done} JSON event (p2pft
writing a file), else the receiver's exit.  CPU seconds and peak RSS come
from C{wait4} when each side exits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from suite_procs import (MiB, BenchError, DataSink, FirstWrite, Proc, Procs, Usage, big_pipe,
                         free_port, p2pft_argv, p2pft_env)

GiB = 1 << 30
#: The code every p2pft transfer uses (one transfer at a time per server).
CODE = "900-bench-run"
#: Block size of socat's reads and writes (bytes).
SOCAT_BLOCK = MiB
#: dd's block when it writes the disk as p2pft's receiver does (its BUFFER).
DISK_BLOCK = "2M"
#: Seconds iperf3 measures the link for.
IPERF_SECONDS = 5


@dataclass
class Run:
    """One transfer.  Times in seconds, sizes in bytes."""

    bytes: int
    #: First data byte at the receiver to done.
    transfer: float
    sender: Usage
    receiver: Usage
    #: Receiver start to its first data byte (None: not measured).
    first_byte: float | None = None
    #: Receiver start to done.
    total: float | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.transfer / 1e6

    @property
    def cpu_per_gib(self) -> float:
        """CPU seconds of both sides together per GiB moved."""
        return (self.sender.cpu + self.receiver.cpu) / (self.bytes / GiB)


@dataclass
class Row:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    #: "ok", "skipped: <why>" or "failed: <why>".
    status: str = "ok"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.runs)

    def median(self, value: Callable[[Run], float | None]) -> float | None:
        """Median over the runs, each column on its own (None: not measured)."""
        values = [v for v in map(value, self.runs) if v is not None]
        return statistics.median(values) if self.ok and values else None


@dataclass
class Bench:
    """What every row shares: the source file, sizes, tools and directories."""

    work: str
    source: str
    size: int
    runs: int
    #: Executables for the optional rows: "socat", "iperf3", "wormhole" (its venv's bin/).
    tools: dict[str, str]
    #: Why an optional tool is missing, by name.
    missing: dict[str, str] = field(default_factory=dict)
    #: Versions of the tools, by name, for labels.
    versions: dict[str, str] = field(default_factory=dict)
    #: The small-files rows' folder (L{suite_files}): its path, files, bytes.
    folder: str = ""
    files: int = 0
    folder_bytes: int = 0
    tar_port: int = 0
    #: Output folders removed when the suite ends (L{suite_files}).
    remove_later: list = field(default_factory=list)

    def deadline(self) -> float:
        """Deadline for one transfer: generous (20 MB/s is the slowest we wait for)."""
        return time.monotonic() + 30 + self.size / 20e6

    def out_dir(self) -> str:
        return tempfile.mkdtemp(prefix="out-", dir=self.work)

    def measure(self, key: str, label: str, runs: Callable[[Procs, Row], None]) -> Row:
        """Make a row: C{runs(procs, row)} appends the runs; an error fails the row."""
        row = Row(key, label)
        try:
            with Procs(os.path.join(self.work, "logs", key)) as procs:
                runs(procs, row)
        except BenchError as e:
            row.status = f"failed: {e}"
        return row


def _received(out: str, size: int) -> None:
    """The output directory holds exactly one file, of the source's size; remove it."""
    files = os.listdir(out)
    sizes = [os.path.getsize(os.path.join(out, f)) for f in files]
    shutil.rmtree(out)
    if sizes != [size]:
        raise BenchError(f"expected one file of {size} bytes, found {dict(zip(files, sizes))}")


@dataclass
class FileTransfer:
    """How one tool sends the source file into a directory."""

    sender: list[str]
    #: The receiver's command line, given the output directory.
    receiver: Callable[[str], list[str]]
    #: Regex on the sender's C{ready_on} stream: it waits for the receiver.
    ready: str
    ready_on: str = "stdout"
    #: Regex on the receiver's stdout that marks it done (None: its exit does).
    done: str | None = None
    #: The path the p2pft C{done} event must report.
    path: str | None = None
    env: dict | None = None


def file_run(bench: Bench, procs: Procs, n: int, how: FileTransfer) -> Run:
    deadline = bench.deadline()
    out = bench.out_dir()
    sender = procs.start(f"sender-{n}", how.sender, lines=how.ready_on, env=how.env)
    sender.wait_line(how.ready, deadline)
    watch = FirstWrite(out)
    try:
        receiver = procs.start(f"receiver-{n}", how.receiver(out), lines="stdout" if how.done else None,
                               env=how.env)
        if how.done:
            done, m = receiver.wait_line(how.done, deadline)
            if how.path and json.loads(m.string)["path"] != how.path:
                raise receiver.failed(f"expected path {how.path!r}")
        r = receiver.wait_ok(deadline)
        s = sender.wait_ok(deadline)
    finally:
        watch.close()
    _received(out, bench.size)
    if watch.time is None:
        raise receiver.failed("no write into the output directory was seen")
    return _timed(bench.size, receiver, watch.time, done if how.done else r.time, s.usage, r.usage)


def _timed(size: int, receiver: Proc, first: float, done: float, sender: Usage, received: Usage) -> Run:
    return Run(size, transfer=done - first, first_byte=first - receiver.started,
               total=done - receiver.started, sender=sender, receiver=received)


def _repeat(bench: Bench, row: Row, one: Callable[[int], Run]) -> None:
    for n in range(bench.runs):
        # No dirty pages of an earlier run (socat's page-cache writes, a
        # removed output's metadata) written back during this one.
        os.sync()
        row.runs.append(one(n))


# -- p2pft


def p2pft_server(procs: Procs, name: str, *options: str) -> tuple[Proc, str]:
    """A p2pft server on a free loopback port: (process, "127.0.0.1:PORT")."""
    server = procs.start(name, p2pft_argv("server", "--port", "tcp:0:interface=127.0.0.1", *options),
                         lines="stderr", env=p2pft_env())
    _, m = server.wait_line(r"listening on (\S+)", time.monotonic() + 30)
    return server, m.group(1)


def _p2pft_transfer(bench: Bench, server: str, relay_only: bool = False) -> FileTransfer:
    return FileTransfer(
        sender=p2pft_argv("send", "--json", "--code", CODE, server, bench.source, relay_only=relay_only),
        receiver=lambda out: p2pft_argv("receive", "--yes", "--json", "-o", out, server, CODE,
                                        relay_only=relay_only),
        ready=r'"event": "code"', done=r'"event": "done"',
        path="relay" if relay_only else "direct", env=p2pft_env(),
    )


def _server_note(row: Row, server: Proc, size: int) -> None:
    usage = server.stop().usage
    moved = size * len(row.runs) / GiB
    row.notes.append(f"server: {usage.cpu / moved:.2f} CPU-s/GiB, peak RSS {usage.rss:.0f} MiB")


def p2pft_file(bench: Bench) -> Row:
    def runs(procs: Procs, row: Row) -> None:
        server, address = p2pft_server(procs, "server")
        how = _p2pft_transfer(bench, address)
        _repeat(bench, row, lambda n: file_run(bench, procs, n, how))

    return bench.measure("p2pft", "p2pft file → file", runs)


def p2pft_relay(bench: Bench) -> Row:
    def runs(procs: Procs, row: Row) -> None:
        server, address = p2pft_server(procs, "server", "--relay")
        how = _p2pft_transfer(bench, address, relay_only=True)
        _repeat(bench, row, lambda n: file_run(bench, procs, n, how))
        _server_note(row, server, bench.size)

    return bench.measure("relay", "p2pft via its relay", runs)


@dataclass
class PipeTransfer:
    """How one tool moves its standard input to the receiver's standard output."""

    sender: list[str]
    receiver: list[str]
    #: Regex on the sender's C{ready_on} stream: it waits for the receiver.
    ready: str
    ready_on: str = "stdout"
    env: dict | None = None


def pipe_run(bench: Bench, procs: Procs, n: int, how: PipeTransfer) -> Run:
    """cat feeds the sender through a pipe; the harness drains the receiver."""
    deadline = bench.deadline()
    r, w = big_pipe()
    try:
        feeder = procs.start(f"cat-{n}", ["cat", bench.source], stdout=w)
        sender = procs.start(f"sender-{n}", how.sender, lines=how.ready_on, stdin=r, env=how.env)
    finally:
        os.close(r)
        os.close(w)
    sender.wait_line(how.ready, deadline)
    sink = DataSink()
    receiver = procs.start(f"receiver-{n}", how.receiver, sink=sink, env=how.env)
    rx = receiver.wait_ok(deadline)
    sx = sender.wait_ok(deadline)
    feeder.wait_ok(deadline)
    if sink.bytes != bench.size:
        raise receiver.failed(f"wrote {sink.bytes} bytes to stdout, expected {bench.size}")
    return _timed(bench.size, receiver, sink.first, rx.time, sx.usage, rx.usage)


def p2pft_stdout(bench: Bench) -> Row:
    def runs(procs: Procs, row: Row) -> None:
        server, address = p2pft_server(procs, "server")
        how = PipeTransfer(
            sender=p2pft_argv("send", "--json", "--code", CODE, address, "-"),
            receiver=p2pft_argv("receive", "--yes", "--no-progress", "--output", "-", address, CODE),
            ready=r'"event": "code"', env=p2pft_env())
        _repeat(bench, row, lambda n: pipe_run(bench, procs, n, how))
        row.notes.append("stdin: a pipe fed by cat (its CPU not counted); stdout: a pipe the harness drains")

    return bench.measure("stdout", "p2pft stdin → stdout", runs)


# -- the others


def socat_file(bench: Bench) -> Row:
    socat = bench.tools.get("socat")

    def transfer() -> FileTransfer:
        port = free_port()
        block = ["-b", str(SOCAT_BLOCK), "-u"]
        return FileTransfer(
            sender=[socat, "-d", "-d", *block, f"OPEN:{bench.source},rdonly",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"],
            receiver=lambda out: [socat, *block, f"TCP:127.0.0.1:{port}", f"CREATE:{out}/copy.bin"],
            ready="listening on", ready_on="stderr",
        )

    def runs(procs: Procs, row: Row) -> None:
        _repeat(bench, row, lambda n: file_run(bench, procs, n, transfer()))
        row.notes.append(f"socat -b {SOCAT_BLOCK}: plain TCP, no encryption, no checksum, no fsync")

    return _if_tool(bench, "socat", "socat file → file (plain)", runs)


def socat_pipe(bench: Bench) -> Row:
    """The stdout row's pipeline with plain socat in p2pft's place."""
    socat = bench.tools.get("socat")

    def transfer() -> PipeTransfer:
        port = free_port()
        block = ["-b", str(SOCAT_BLOCK), "-u"]
        return PipeTransfer(
            sender=[socat, "-d", "-d", *block, "STDIN", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"],
            receiver=[socat, *block, f"TCP:127.0.0.1:{port}", "STDOUT"],
            ready="listening on", ready_on="stderr")

    def runs(procs: Procs, row: Row) -> None:
        _repeat(bench, row, lambda n: pipe_run(bench, procs, n, transfer()))
        row.notes.append("the stdout row's pipe with socat in p2pft's place: plain TCP, no encryption")

    return _if_tool(bench, "socat", "socat stdin → stdout (plain)", runs, key="socatpipe")


def _iperf_run(bench: Bench, procs: Procs, n: int) -> Run:
    iperf3 = bench.tools["iperf3"]
    deadline = time.monotonic() + IPERF_SECONDS + 30
    port = str(free_port())
    server = procs.start(f"server-{n}", [iperf3, "-s", "-1", "-B", "127.0.0.1", "-p", port, "--forceflush"],
                         lines="stdout")
    server.wait_line("Server listening", deadline)
    client = procs.start(f"client-{n}", [iperf3, "-c", "127.0.0.1", "-p", port, "-t", str(IPERF_SECONDS),
                                         "-J"], lines="stdout")
    c = client.wait_ok(deadline)
    s = server.wait_ok(deadline)
    received = json.loads(client.lines.text())["end"]["sum_received"]
    return Run(received["bytes"], transfer=received["seconds"], sender=c.usage, receiver=s.usage)


def iperf3_link(bench: Bench) -> Row:
    def runs(procs: Procs, row: Row) -> None:
        _repeat(bench, row, lambda n: _iperf_run(bench, procs, n))
        row.notes.append(f"{row.median(lambda r: r.mb_per_s) * 8 / 1000:.1f} Gbit/s; "
                         f"{IPERF_SECONDS} s of memory-to-memory TCP, one stream")

    return _if_tool(bench, "iperf3", "iperf3 (the link)", runs)


def _wormhole_servers(bench: Bench, procs: Procs) -> tuple[str, str]:
    """A mailbox server and a transit relay: (--relay-url, --transit-helper)."""
    twistd = os.path.join(bench.tools["wormhole"], "twistd")
    state = os.path.join(bench.work, "logs", "wormhole")
    deadline = time.monotonic() + 60
    listen = ["--port", "tcp:0:interface=127.0.0.1"]
    mailbox = procs.start("mailbox", [twistd, "-n", "--pidfile=", "wormhole-mailbox", *listen,
                                      "--channel-db", os.path.join(state, "mailbox.sqlite")],
                          lines="stdout", cwd=state, env=_plain_env())
    relay = procs.start("transit-relay", [twistd, "-n", "--pidfile=", "transitrelay", *listen],
                        lines="stdout", cwd=state, env=_plain_env())
    _, m = mailbox.wait_line(r"Site starting on (\d+)", deadline)
    _, t = relay.wait_line(r"Factory starting on (\d+)", deadline)
    return f"ws://127.0.0.1:{m.group(1)}/v1", f"tcp:127.0.0.1:{t.group(1)}"


def _plain_env() -> dict:
    """The environment without this checkout on PYTHONPATH (for the wormhole venv)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def wormhole_file(bench: Bench) -> Row:
    def runs(procs: Procs, row: Row) -> None:
        mailbox, relay = _wormhole_servers(bench, procs)
        cli = [os.path.join(bench.tools["wormhole"], "wormhole"), "--relay-url", mailbox,
               "--transit-helper", relay]

        def one(n: int) -> Run:
            code = f"{n + 1}-bench-run"
            how = FileTransfer(
                sender=[*cli, "send", "--hide-progress", "--no-qr", "--code", code, bench.source],
                receiver=lambda out: [*cli, "receive", "--hide-progress", "--accept-file", "-o", out, code],
                ready="wormhole receive", ready_on="stderr", env=_plain_env(),
            )
            return file_run(bench, procs, n, how)

        _repeat(bench, row, one)
        row.notes.append(f"own mailbox server and transit relay on loopback; {_wormhole_path(procs, bench.runs)}")

    return _if_tool(bench, "wormhole", f"magic-wormhole {bench.versions.get('wormhole', '')}".strip(), runs)


def _wormhole_path(procs: Procs, runs: int) -> str:
    """Which way the last transfer went, from the receiver's messages."""
    with open(os.path.join(procs.log_dir, f"receiver-{runs - 1}.log"), errors="replace") as f:
        m = re.search(r"Receiving \(->([^)]*)\)", f.read())
    if not m:
        return "path not reported"
    return f"{'through the transit relay' if 'relay' in m.group(1) else 'direct'} ({m.group(1)})"


def _disk_run(bench: Bench, procs: Procs, n: int) -> Run:
    out = bench.out_dir()
    dd = procs.start(f"dd-{n}", ["dd", f"if={bench.source}", f"of={out}/copy.bin", f"bs={DISK_BLOCK}",
                                 "oflag=direct", "conv=fsync", "status=none"])
    x = dd.wait_ok(bench.deadline())
    _received(out, bench.size)
    return Run(bench.size, transfer=x.time - dd.started, total=x.time - dd.started, sender=x.usage,
               receiver=Usage(0.0, 0.0))


def disk_write(bench: Bench) -> Row:
    """What the disk takes when written as p2pft's receiver writes it
    (whole 2 MiB buffers with O_DIRECT, then a sync): the ceiling of any
    file → file row that keeps what it received, which socat (page cache,
    no sync) is not held to."""
    def runs(procs: Procs, row: Row) -> None:
        _repeat(bench, row, lambda n: _disk_run(bench, procs, n))
        row.notes.append(f"dd bs={DISK_BLOCK} oflag=direct conv=fsync from the source file: no network, "
                         "as p2pft's receiver writes (its CPU in the send column)")

    if not shutil.which("dd"):
        return Row("disk", "dd (the disk)", status="skipped: dd not installed")
    return bench.measure("disk", "dd → disk, O_DIRECT (the disk)", runs)


def _if_tool(bench: Bench, tool: str, label: str, runs: Callable[[Procs, Row], None],
             key: str | None = None) -> Row:
    """The row (its key: C{key}, else the tool's name), or a skipped one
    when the tool is missing."""
    key = key or tool
    if tool not in bench.tools:
        return Row(key, label, status="skipped: " + bench.missing.get(tool, f"{tool} not installed"))
    return bench.measure(key, label, runs)


ROWS = {
    "p2pft": p2pft_file,
    "stdout": p2pft_stdout,
    "relay": p2pft_relay,
    "socat": socat_file,
    "socatpipe": socat_pipe,
    "disk": disk_write,
    "iperf3": iperf3_link,
    "wormhole": wormhole_file,
}
