"""
The benchmark suite (issue 6): p2pft side by side with raw socat, iperf3
and magic-wormhole on one loopback link, and a load test of the server.

    .venv/bin/python bench/suite.py [--size MiB] [--runs N] [--only ROWS]
        [--clients N] [--work-dir DIR] [--no-write] [--smoke]

Rows (C{--only}, comma-separated): p2pft (file → file, encrypted), stdout
(stdin → stdout), relay (p2pft through its relay), socat, socatpipe (the
stdout row's pipe with plain socat in p2pft's place), disk (dd writing
the source to the disk with O_DIRECT and a sync, as p2pft's receiver
writes: no network), iperf3, wormhole
(magic-wormhole 0.24 with its own mailbox server and transit relay), files
(p2pft moving a folder of C{--files} files of 0-8 KiB), tar (the same
folder by tar c | socat -> socat | tar x), load (the server under many
clients, then its relay's throughput).

It installs what the chosen rows need and the machine lacks (socat and
iperf3 from apt as root, matplotlib, a virtualenv with magic-wormhole),
then re-runs itself inside a loopback-only network namespace (C{unshare
-n}) and runs each row C{--runs} times.  It prints a table of medians, the
issue's targets judged on this run, and the load results, and writes them
to docs/BENCHMARKS.md with a chart (docs/benchmarks.png) unless
C{--no-write}.  C{--smoke} is the tiny version CI runs so that this script
cannot rot: 4 MiB, one run, the p2pft rows and 200 clients, no installs,
no documents, plain loopback if no namespace can be made.  Exit status 1 if
any row failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from suite_load import WORKERS, LoadResult, run_load
from suite_procs import MiB, ROOT, BenchError
from suite_report import Target, notes, targets, text_load, text_table, text_targets, write_docs
from suite_files import files_and_tar, make_folder
from suite_rows import ROWS as FILE_ROWS_, Bench, Row
from suite_setup import NETNS_MARKER, enter_netns, find_tools, install, machine, say

ROWS = {**FILE_ROWS_, "files": None, "tar": None}  # (files and tar: L{files_and_tar}, their runs in turn)
ALL = [*ROWS, "load"]
SMOKE_ROWS = ["p2pft", "stdout", "relay", "files", "load"]
DEFAULTS = {"size": 1024, "runs": 3, "clients": 10_000, "files": 50_000}
SMOKE = {"size": 4, "runs": 1, "clients": 200, "files": 300}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/suite.py", description=__doc__.split("\n\n")[0].strip(),
        epilog="rows: p2pft (file to file, encrypted), stdout (stdin to stdout), relay (p2pft through "
               "its relay), socat, socatpipe (the stdout row's pipe through plain socat), disk (dd writing the disk as p2pft's receiver does), iperf3, wormhole (magic-wormhole 0.24), files (a folder of small files), "
               "tar (the same folder by tar | socat), load (the server under many clients, and its "
               "relay's throughput)")
    p.add_argument("--size", type=int, metavar="MiB", help="size of the transfers (default 1024)")
    p.add_argument("--runs", type=int, metavar="N", help="runs per row; medians are reported (default 3)")
    p.add_argument("--only", metavar="ROWS", help=f"comma-separated rows to run (default: {','.join(ALL)})")
    p.add_argument("--clients", type=int, metavar="N", help="rendezvous clients in the load row (default 10000)")
    p.add_argument("--files", type=int, metavar="N",
                   help="files of 0-8 KiB in the small-files rows, files and tar (default 50000)")
    p.add_argument("--work-dir", metavar="DIR", help="keep the source file, outputs and logs here "
                                                     "(default: a temporary directory, removed afterwards)")
    p.add_argument("--no-write", action="store_true", help="do not write docs/BENCHMARKS.md and the chart")
    p.add_argument("--smoke", action="store_true",
                   help="tiny, for CI: 4 MiB, 1 run, rows p2pft,stdout,relay,load with 200 clients; "
                        "no installs, no documents; plain loopback if no namespace can be made")
    a = p.parse_args(argv)
    for name, value in (SMOKE if a.smoke else DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.rows = a.only.split(",") if a.only else SMOKE_ROWS if a.smoke else ALL
    unknown = set(a.rows) - set(ALL)
    if unknown:
        p.error(f"unknown rows {', '.join(sorted(unknown))} (choose from {','.join(ALL)})")
    if a.size < 1 or a.runs < 1:
        p.error("--size and --runs must be at least 1")
    if a.clients % 2 or a.clients < 2 * WORKERS:
        p.error(f"--clients must be even and at least {2 * WORKERS}")
    a.write = not (a.no_write or a.smoke)
    return a


def make_source(path: str, size: int) -> None:
    """Random bytes (reused when a file of that size is there), then read
    once and copied once to warm the page cache and its memory.  Then a
    sync: otherwise the kernel writes a new file's dirty pages back some
    30 s later (vm.dirty_expire_centisecs), in the middle of the first
    row, which then measures a disk shared with that writeback."""
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
    copy = path + ".warm-up"
    shutil.copyfile(path, copy)
    os.unlink(copy)
    os.sync()


def compile_checkout() -> None:
    """Byte-compile the checkout, as installing p2pft does: the peers then
    start from bytecode (see suite_procs.p2pft_env)."""
    import compileall
    compileall.compile_dir(os.path.join(ROOT, "p2pft"), quiet=1)


def command_line() -> str:
    """This command as run from the checkout."""
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT + os.sep) else sys.executable
    return " ".join([python, "bench/suite.py", *sys.argv[1:]])


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if not os.environ.get(NETNS_MARKER) and not a.smoke:
        install(set(a.rows), charts=a.write)
    network = enter_netns([os.path.abspath(__file__), *argv], optional=a.smoke)
    sys.stdout.reconfigure(errors="replace")

    work = a.work_dir or tempfile.mkdtemp(prefix="p2pft-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        return run(a, work, network)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def run(a: argparse.Namespace, work: str, network: str) -> int:
    size = a.size * MiB
    source = os.path.join(work, f"source-{a.size}MiB.bin")
    if set(a.rows) & set(ROWS):
        make_source(source, size)
    bench = Bench(work, source, size, a.runs, *find_tools())
    if set(a.rows) & {"files", "tar"}:
        bench.folder = os.path.join(work, f"small-{a.files}")
        bench.files = a.files
        say(f"making {a.files} small files ...")
        bench.folder_bytes = make_folder(bench.folder, a.files)
    compile_checkout()
    started = time.monotonic()
    rows = []
    try:
        for key in (k for k in FILE_ROWS_ if k in a.rows):
            say(f"{key} ...")
            rows.append(ROWS[key](bench))
        small = [k for k in ("files", "tar") if k in a.rows]
        if small:
            say(f"{' and '.join(small)}, in turn ...")
            rows.extend(files_and_tar(bench, small))
    finally:
        for path in bench.remove_later:
            shutil.rmtree(path, ignore_errors=True)
    load, load_error = measure_load(a.clients, 2 * size, work) if "load" in a.rows else (None, None)
    items = targets(rows, load)

    title = f"{a.size} MiB, medians of {a.runs} run{'s' if a.runs > 1 else ''}"
    print(f"\np2pft benchmark suite: {title}, on {network}\n")
    print_report(rows, items, load, load_error)
    print(f"\n({time.monotonic() - started:.0f} s)")
    if a.write:
        info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), **machine(),
                "tools": ", ".join(f"{t} {v}" for t, v in sorted(bench.versions.items())) or "none",
                "network": network, "transfers": title, "command": f"`{command_line()}`"}
        for path in write_docs(ROOT, rows, items, load, load_error, info):
            say(f"wrote {os.path.relpath(path, ROOT)}")
    failed = load_error or any(row.status.startswith("failed") for row in rows)
    return 1 if failed else 0


def measure_load(clients: int, relay_bytes: int, work: str) -> tuple[LoadResult | None, str | None]:
    """(results, None) or (None, why it failed)."""
    say(f"load: {clients} clients ...")
    try:
        return run_load(clients, relay_bytes, os.path.join(work, "logs", "load")), None
    except BenchError as e:
        return None, str(e)


def print_report(rows: list[Row], items: list[Target], load: LoadResult | None, load_error: str | None) -> None:
    if rows:
        print(text_table(rows))
        for line in notes(rows):
            print(f"  {line}")
    print("\ntargets (this run)\n" + text_targets(items))
    if load:
        print(f"\nserver load\n{text_load(load)}")
    if load_error:
        print(f"\nserver load failed: {load_error}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
