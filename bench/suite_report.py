"""
What the benchmark suite reports: the table of transfer rows, the targets
of issue 6 judged on the same run, the server load results, and the same
again as C{docs/BENCHMARKS.md} with a chart (C{docs/benchmarks.png}).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from suite_load import LoadResult
from suite_procs import MiB
from suite_rows import Row, Run

#: Column heading, value of one run, format.  Sizes: MB = 10^6 bytes, MiB = 2^20 bytes.
COLUMNS: list[tuple[str, Callable[[Run], float | None], str]] = [
    ("MB/s", lambda r: r.mb_per_s, "{:.0f}"),
    ("send CPU s", lambda r: r.sender.cpu, "{:.2f}"),
    ("recv CPU s", lambda r: r.receiver.cpu, "{:.2f}"),
    ("CPU s/GiB", lambda r: r.cpu_per_gib, "{:.2f}"),
    ("send RSS MiB", lambda r: r.sender.rss, "{:.0f}"),
    ("recv RSS MiB", lambda r: r.receiver.rss, "{:.0f}"),
    ("first byte s", lambda r: r.first_byte, "{:.3f}"),
    ("start→done s", lambda r: r.total, "{:.2f}"),
]
TOOL = "tool"
#: Rows whose sides count for the p2pft target on RSS ...
P2PFT_ROWS = ("p2pft", "stdout", "relay")
#: ... and on the first byte (the relay row waits 2 s by design before it dials a relay).
DIRECT_ROWS = ("p2pft", "stdout")
CLIENTS_GOAL = 10_000


def cells(row: Row) -> list[str]:
    """The row's medians as text ("—": not measured; a failed or skipped row: its status)."""
    if not row.ok:
        return [row.status.splitlines()[0]] + [""] * (len(COLUMNS) - 1)
    out = []
    for _, value, fmt in COLUMNS:
        median = row.median(value)
        out.append("—" if median is None else fmt.format(median))
    return out


def text_table(rows: list[Row]) -> str:
    width = max(len(TOOL), *(len(r.label) for r in rows))
    heads = [head for head, _, _ in COLUMNS]
    lines = [f"{TOOL:<{width}}  " + "  ".join(f"{h:>{len(h)}}" for h in heads)]
    for row in rows:
        values = cells(row)
        if row.ok:
            lines.append(f"{row.label:<{width}}  " + "  ".join(f"{v:>{len(h)}}" for v, h in zip(values, heads)))
        else:
            lines.append(f"{row.label:<{width}}  {values[0]}")
    return "\n".join(lines)


def markdown_table(heads: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def notes(rows: list[Row]) -> list[str]:
    """One line per note or failure, each naming its row."""
    out = []
    for row in rows:
        if row.status.startswith("failed"):
            out.append(f"{row.label}: {row.status}")
        out += [f"{row.label}: {note}" for note in row.notes]
    return out


# -- targets


@dataclass
class Target:
    goal: str
    measured: str
    #: Measured value ÷ the target's value (a minimum passes at ≥ 1, a maximum at ≤ 1).
    ratio: float | None = None
    passed: bool | None = None

    @property
    def result(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


def _judged(goal: str, measured: str, value: float, limit: float, at_least: bool) -> Target:
    ratio = value / limit
    return Target(goal, measured, ratio, ratio >= 1 if at_least else ratio <= 1)


def _absolute(goal: str, value: float | None, limit: float, at_least: bool, shown: str) -> Target:
    """C{value} against a fixed limit; C{shown} formats it."""
    if value is None:
        return Target(goal, "not measured")
    return _judged(goal, shown.format(value), value, limit, at_least)


def _relative(goal: str, value: float | None, other: float | None, name: str, factor: float,
              at_least: bool, shown: str) -> Target:
    """C{value} against C{factor} × another tool's C{other}."""
    if value is None or not other:
        return Target(goal, "not measured")
    ratio = value / other
    measured = f"{shown.format(value)} = {ratio:.2f} × {name} ({shown.format(other)})"
    return _judged(goal, measured, ratio, factor, at_least)


def targets(rows: list[Row], load: LoadResult | None) -> list[Target]:
    """The issue's targets, judged on this run."""
    by_key = {row.key: row for row in rows}

    def median(key: str, value: Callable[[Run], float | None]) -> float | None:
        return by_key[key].median(value) if key in by_key else None

    def mb_per_s(run: Run) -> float:
        return run.mb_per_s

    def cpu(run: Run) -> float:
        return run.cpu_per_gib

    first = [f for f in (median(key, lambda r: r.first_byte) for key in DIRECT_ROWS) if f is not None]
    return [
        _relative("p2pft file → file ≥ 0.9 × socat", median("p2pft", mb_per_s), median("socat", mb_per_s),
                  "socat", 0.9, True, "{:.0f} MB/s"),
        _relative("(a ceiling, not an issue target) p2pft file → file ≥ 0.9 × the disk (dd O_DIRECT)",
                  median("p2pft", mb_per_s), median("disk", mb_per_s), "the disk", 0.9, True, "{:.0f} MB/s"),
        _absolute("p2pft stdin → stdout ≥ 1.5 GB/s", median("stdout", mb_per_s), 1500, True, "{:.0f} MB/s"),
        _relative("(a ceiling, not an issue target) p2pft stdin → stdout ≥ 0.9 × the same pipe through plain socat",
                  median("stdout", mb_per_s), median("socatpipe", mb_per_s), "socat", 0.9, True, "{:.0f} MB/s"),
        _absolute("CPU s/GiB, both sides, ≤ 0.9", median("p2pft", cpu), 0.9, False, "{:.2f} CPU-s/GiB"),
        _relative("CPU s/GiB, both sides, ≤ ⅓ of magic-wormhole's", median("p2pft", cpu),
                  median("wormhole", cpu), "magic-wormhole", 1 / 3, False, "{:.2f} CPU-s/GiB"),
        _relative("relay, one session, ≥ 0.8 × iperf3", load.relay_mb_per_s if load else None,
                  median("iperf3", mb_per_s), "iperf3", 0.8, True, "{:.0f} MB/s"),
        _files_target(by_key),
        _rss_target(by_key),
        _absolute("receiver start → first data byte ≤ 0.3 s (direct)", max(first, default=None), 0.3, False,
                  "{:.3f} s"),
        *_load_targets(load),
    ]


def _files_target(by_key: dict[str, Row]) -> Target:
    """Small files, start to done: tar | socat's time ÷ p2pft's (≥ 1: as fast or faster)."""
    goal = "small files, start→done, ≥ 1.0 × tar | socat"
    ours, theirs = (by_key[k].median(lambda r: r.total) if k in by_key else None for k in ("files", "tar"))
    if not ours or not theirs:
        return Target(goal, "not measured")
    speed = theirs / ours
    return _judged(goal, f"{ours:.1f} s = {speed:.2f} × tar | socat's speed ({theirs:.1f} s)", speed, 1.0, True)


def _rss_target(by_key: dict[str, Row]) -> Target:
    """The largest peak RSS of any side of any p2pft row."""
    goal = "peak RSS of each side ≤ 64 MiB"
    sides = [(rss, f"{by_key[key].label}, {side}") for key in P2PFT_ROWS if key in by_key
             for side in ("sender", "receiver")
             if (rss := by_key[key].median(lambda r, side=side: getattr(r, side).rss)) is not None]
    if not sides:
        return Target(goal, "not measured")
    rss, where = max(sides)
    return _judged(goal, f"{rss:.0f} MiB ({where})", rss, 64, False)


def _load_targets(load: LoadResult | None) -> list[Target]:
    held = "server holds 10,000 concurrent clients"
    if load and load.clients < CLIENTS_GOAL:
        holding = Target(held, f"ran {load.clients:,} only")
    else:
        holding = _absolute(held, load and load.clients, CLIENTS_GOAL, True, "{:,} held, then paired")
    return [
        holding,
        _absolute("server pairs ≥ 2,000 pairings/s", load and load.pairings_per_s, 2000, True,
                  "{:,.0f} pairings/s"),
        _absolute("relay ≥ 1 GB/s", load and load.relay_mb_per_s, 1000, True, "{:.0f} MB/s"),
    ]


def target_cells(target: Target) -> list[str]:
    return [target.goal, target.measured, "" if target.ratio is None else f"{target.ratio:.2f}", target.result]


TARGET_HEADS = ["target", "measured", "measured ÷ target", "result"]


def text_targets(items: list[Target]) -> str:
    width = max(len(t.goal) for t in items)
    return "\n".join(f"  {t.result:<4}  {t.goal:<{width}}  {t.measured}"
                     + (f"  ({t.ratio:.2f} of target)" if t.ratio is not None else "") for t in items)


# -- server load


def load_lines(load: LoadResult) -> list[tuple[str, str]]:
    """(what, result) pairs describing the load run."""
    mib = 1 / 1024
    return [
        ("clients", f"{load.clients:,} rendezvous connections to one server process"),
        (f"{load.clients // 2:,} waiting (connect, CLAIM)", f"{load.connect_seconds:.2f} s"),
        ("server RSS idle", f"{load.rss_idle * mib:.1f} MiB"),
        ("server RSS, half the clients waiting", f"{load.rss_waiting * mib:.1f} MiB "
                                                 f"({load.kib_per_client:.2f} KiB per waiting client)"),
        ("server RSS, all clients paired", f"{load.rss_paired * mib:.1f} MiB"),
        ("pairings (partner connects, CLAIM → PAIRED → MSG each way)", f"{load.pairings_per_s:,.0f} pairings/s"),
        ("load generators' CPU", f"{load.generator_cpu:.2f} s"),
        ("relay, one session, one way", f"{load.relay_mb_per_s:.0f} MB/s "
                                        f"({load.relay_bytes / MiB:.0f} MiB; server CPU {load.relay_cpu:.2f} s)"),
    ]


def text_load(load: LoadResult) -> str:
    lines = load_lines(load)
    width = max(len(what) for what, _ in lines)
    return "\n".join(f"  {what:<{width}}  {result}" for what, result in lines)


# -- the document


def chart(rows: list[Row], path: str, title: str) -> None:
    """Bars of MB/s and of CPU s/GiB per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.ok][::-1]
    if not shown:
        raise ImportError("nothing to draw")
    labels = [row.label for row in shown]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(shown) + 1.8), sharey=True)
    for ax, (head, value, fmt), colour in zip(axes, (COLUMNS[0], COLUMNS[3]), ("tab:blue", "tab:orange")):
        values = [row.median(value) for row in shown]
        bars = ax.barh(labels, values, color=colour)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3)
        ax.set_xlabel(head + (" (higher is better)" if head == "MB/s" else " (both sides; lower is better)"))
        ax.set_xlim(0, max(values) * 1.2)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def document(rows: list[Row], items: list[Target], load: LoadResult | None, load_error: str | None,
             info: dict[str, str], png: str | None) -> str:
    """docs/BENCHMARKS.md."""
    setup = "\n".join(f"- **{what}**: {value}" for what, value in info.items())
    parts = [
        "# Benchmarks",
        "Generated by `bench/suite.py` (issue 6); rerun it rather than editing this file. "
        "How the numbers are taken is under [Method](#method).",
        "## The last run",
        setup,
        "## Transfers",
        "Medians over the runs, each column on its own.",
        markdown_table([TOOL] + [head for head, _, _ in COLUMNS], [[row.label] + cells(row) for row in rows]),
    ]
    if png:
        parts.append(f"![MB/s and CPU seconds per GiB of each tool]({png})")
    if notes(rows):
        parts.append("\n".join(f"- {line}" for line in notes(rows)))
    parts += ["## Targets", "Judged on this run only; ratios are between rows of the same run.",
              markdown_table(TARGET_HEADS, [target_cells(t) for t in items])]
    if load is not None:
        parts += ["## Server load", markdown_table(["what", "result"], [list(line) for line in load_lines(load)])]
    if load_error:
        parts += ["## Server load", f"Failed: {load_error}"]
    parts += ["## Method", METHOD]
    return "\n\n".join(parts) + "\n"


METHOD = """\
- Everything runs on one machine inside a network namespace of its own
  (`unshare -n`, only `lo` up): no benchmark traffic can leave it.
- One source file of random bytes (not compressible) for every tool, in the
  same work directory and file system as every output; it is read once
  before the rows and copied once (so the first run does not pay for the
  page cache's first use of memory), and stays in the page cache: the rows
  measure the network path, not the disk.  Nothing is dropped from caches.
- Each transfer: the sender starts first and the harness waits until it is
  ready (p2pft: its `code` JSON event; socat: "listening"; magic-wormhole:
  its code printed); the clock starts when the receiver process is started.
- **first byte s**: receiver start → the first data byte written at the
  receiver: an inotify `IN_MODIFY` watch on the (empty) output directory,
  woken by the kernel on the write itself (for p2pft it agrees with the
  receiver's first `progress` JSON event to within about 2 ms); for
  stdin → stdout, the first byte on the receiver's stdout pipe, which the
  harness drains in 1 MiB reads.
- **MB/s** (10^6 bytes/s): file size ÷ (first data byte → done).  Done is
  the receiver's `done` JSON event for p2pft writing a file (after every
  record was authenticated, the file written, renamed and its file system
  synced with `syncfs`), else the receiver's exit.  **start→done s** includes start-up, pairing and key exchange.
- **CPU s** (user + system) and **RSS MiB** (peak resident set) of each
  side come from `wait4` when it exits; **CPU s/GiB** adds both sides.
  Servers (p2pft's, magic-wormhole's mailbox and transit relay) are not in
  those columns; the relay row notes the p2pft relay's own cost.
- p2pft sends AES-256-GCM records (they are its integrity check: there is
  no separate checksum, docs/PROTOCOL.md says why) and its receiver writes
  whole 2 MiB buffers with `O_DIRECT`; socat is plain TCP with no
  encryption or sync, as a ceiling for file → file, and **socat stdin →
  stdout** is the stdout row's very pipe (cat feeding it, the harness
  draining it) with plain socat in p2pft's place, its ceiling; iperf3 (memory to
  memory) is the link itself.  **dd → disk** writes the source file as
  p2pft's receiver writes its output (2 MiB `O_DIRECT` blocks, then a
  sync), with no network at all: the ceiling of any file → file row that
  keeps what it received on the disk.  socat's output stays in the page
  cache (nothing written yet when it exits), so it is held to no disk.
- On a virtual machine that hands free memory back to its host (free page
  reporting, as this project's machines do), memory freed more than a
  second or so earlier is faulted in from the host when next used: a
  buffered write or read of data not yet in the page cache then costs
  about 2 CPU-seconds per GiB of system time.  The rows run back to back,
  so they meet similar memory; the spread between runs of one row shows
  how much this varies.
- Every run starts with `sync`, and the source file is synced once made:
  no dirty pages of an earlier run (socat's output, tar's files, the
  freshly written source) are written back during the next one, which
  would then share the disk with that writeback (the kernel writes dirty
  pages back about 30 s after they were made).
- The relay row forces the relay path (`bench/relayonly_p2pft.py`, peers
  ignore direct candidates).  Protocol v2 peers dial a relay at once, so its
  first byte no longer includes a wait.  The relay splices the bytes in the
  kernel (docs/OPERATING.md, "How a relay moves bytes").
- The peers run from bytecode compiled before the rows, as an installed
  p2pft does (`PYTHONDONTWRITEBYTECODE` is dropped from their
  environment): otherwise every process compiles its sources again, about
  0.2 CPU-s each.
- Small files: one folder of `--files` files of 0–8 KiB (random sizes,
  random bytes, 500 to a folder), made once; p2pft sends it folder → folder,
  and `tar c | socat` → `socat | tar x` moves the same folder over loopback
  (plain, no checks).  The clock runs from the receiver's start to its
  `done` event (p2pft) or its exit (tar); the column to compare is
  **start→done s**.  The two rows' runs are taken in turn (p2pft, tar,
  p2pft, ...): how fast ext4 creates files drifts by 2× and more from one
  minute to the next here, so both must meet it in the same state.  Outputs are removed only after the last row: ext4
  creates files several times slower for a while after many were deleted,
  which would slow whichever run came next.
- Server load: one `p2pft server` process; two load-generator processes
  (Twisted), each connecting from its own 127.0.0.x, 24 connections at a
  time (under the server's listen backlog).  Half the clients connect and
  each claims a nameplate of its own on WELCOME: a peer *waiting* for its
  partner, which is what a server holds for long (a connection that says
  nothing may stay only so long, and only so many at once): RSS per waiting
  client = (server VmRSS with every one waiting − VmRSS idle) ÷ waiting
  clients.  Then their partners connect and claim the same nameplates, and
  each pair, once PAIRED, exchanges one MSG: pairings/s = pairs ÷ (first
  partner's connect → last MSG, over both generators), a new connection
  included.  The clients stay connected until all are paired.
- Relay throughput: a `p2pft server --relay`, two raw TCP legs
  (`RELAY <token> sender|receiver`, then `OK`), twice `--size` pushed one
  way in 4 MiB sends and drained in 4 MiB `recv_into`s by two threads of
  the harness; the server's CPU seconds are read from /proc."""


def write_docs(root: str, rows: list[Row], items: list[Target], load: LoadResult | None,
               load_error: str | None, info: dict[str, str]) -> list[str]:
    """Write docs/BENCHMARKS.md and (when matplotlib is there) docs/benchmarks.png; the paths written."""
    docs = os.path.join(root, "docs")
    png = os.path.join(docs, "benchmarks.png")
    written = []
    try:
        chart(rows, png, f"p2pft benchmark, {info.get('transfers', '')}")
        written.append(png)
    except ImportError:
        png = None
    with open(os.path.join(docs, "BENCHMARKS.md"), "w") as f:
        f.write(document(rows, items, load, load_error, info, os.path.basename(png) if png else None))
    return [os.path.join(docs, "BENCHMARKS.md")] + written
