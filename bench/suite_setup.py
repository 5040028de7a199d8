"""
What the benchmark suite needs besides p2pft, and where it runs.

Installing happens before the suite enters its network namespace (which
has no way out): socat and iperf3 from apt (as root), matplotlib into the
Python running the suite, and magic-wormhole with its mailbox server and
transit relay into a virtualenv of their own.  Inside, L{find_tools} only
looks.  L{enter_netns} re-runs the suite under C{unshare -n}: a network
namespace with nothing but loopback, so no benchmark traffic can leave the
machine (magic-wormhole would otherwise offer every interface address).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

from suite_procs import PYTHON, ROOT

WORMHOLE_PACKAGES = [
    "magic-wormhole==0.24.*",
    "magic-wormhole-mailbox-server==0.8.*",
    "magic-wormhole-transit-relay==0.5.*",
]
APT_TOOLS = ("socat", "iperf3")
#: Rows that need each of them.
NEEDED_BY = {"socat": {"socat", "socatpipe", "tar"}, "iperf3": {"iperf3"}}
#: Set in the environment of the suite re-run inside the namespace.
NETNS_MARKER = "P2PFT_BENCH_NETNS"


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def wormhole_venv() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "p2pft-bench", "wormhole-venv")


def _output(argv: list[str]) -> str:
    """What a command prints (stdout, else stderr), "" if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def _version(text: str) -> str:
    """The version number in a tool's --version text ("" if none)."""
    m = re.search(r"version (\d+(?:\.\d+)+)", text) or re.search(r"\d+(?:\.\d+)+", text)
    return m.group(m.lastindex or 0) if m else ""


def _wormhole_version() -> str:
    return _version(_output([os.path.join(wormhole_venv(), "bin", "wormhole"), "--version"]))


# -- installing (outside the namespace)


def install(rows: set[str], charts: bool) -> None:
    """Install what the chosen rows (and the chart) need and do not have."""
    apt = [tool for tool in APT_TOOLS if NEEDED_BY[tool] & rows and not shutil.which(tool)]
    if apt and _is_root():
        _apt_install(apt)
    elif apt:
        say(f"not root: cannot apt-get install {' '.join(apt)}; those rows are skipped")
    if "wormhole" in rows and not _wormhole_version().startswith("0.24."):
        _make_wormhole_venv()
    if charts and subprocess.run([PYTHON, "-c", "import matplotlib"], capture_output=True).returncode:
        say(f"installing matplotlib into {sys.prefix}")
        _run([PYTHON, "-m", "pip", "install", "-q", "matplotlib"])


def _run(argv: list[str], **kw) -> bool:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, **kw)
    if done.returncode:
        say(f"failed ({done.returncode}): {' '.join(argv)}")
    return done.returncode == 0


def _apt_install(packages: list[str]) -> None:
    say(f"installing {' '.join(packages)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = dict(env=env, stdout=subprocess.DEVNULL)
    command = ["apt-get", "install", "-y", "-q", *packages]
    if not _run(command, **quiet) and _run(["apt-get", "update", "-q"], **quiet):
        _run(command, **quiet)


def _make_wormhole_venv() -> None:
    venv = wormhole_venv()
    say(f"installing {', '.join(WORMHOLE_PACKAGES)} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    if _run([PYTHON, "-m", "venv", venv]):
        _run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", *WORMHOLE_PACKAGES])


# -- looking (inside)


def find_tools() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(executables, why each missing one is missing, versions) of the optional tools."""
    tools, missing, versions = {}, {}, {}
    for tool in APT_TOOLS:
        path = shutil.which(tool)
        if path:
            tools[tool] = path
            versions[tool] = _version(_output([path, "-V" if tool == "socat" else "--version"])) or "?"
        else:
            missing[tool] = f"{tool} not installed" + ("" if _is_root() else " (run as root to apt-get install it)")
    version = _wormhole_version()
    if version.startswith("0.24."):
        tools["wormhole"] = os.path.join(wormhole_venv(), "bin")
        versions["wormhole"] = version
    else:
        missing["wormhole"] = f"magic-wormhole 0.24 not installed in {wormhole_venv()}"
    return tools, missing, versions


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import twisted

    with open("/proc/cpuinfo") as f:
        models = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    head = _output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    # The suite's own output (an earlier run's report) does not count.
    dirty = _output(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                     ".", ":!docs/BENCHMARKS.md", ":!docs/benchmarks.png"])
    return {
        "CPU": f"{os.cpu_count()} × {models[0] if models else platform.processor() or '?'}",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Twisted": twisted.__version__,
        "p2pft": f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?",
    }


# -- the namespace


def enter_netns(argv: list[str], optional: bool) -> str:
    """
    Re-run this command (C{argv}: the script and its arguments) in a fresh
    network namespace, or, if we are in it already, bring its loopback up.
    Returns what network the suite runs on.  Without permission to make the
    namespace: exits, unless C{optional} (then plain loopback).
    """
    if os.environ.get(NETNS_MARKER):
        ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), "ip")
        if not _run([ip, "link", "set", "lo", "up"]):
            raise SystemExit("bench: cannot bring up lo in the network namespace")
        return "a loopback-only network namespace (unshare -n)"
    for unshare in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        if subprocess.run([*unshare, "true"], capture_output=True).returncode == 0:
            env = dict(os.environ, **{NETNS_MARKER: "1"})
            sys.stdout.flush()
            os.execvpe("unshare", [*unshare, "--", PYTHON, *argv], env)
    why = "unshare -n is not permitted here (run as root)"
    if not optional:
        raise SystemExit(f"bench: {why}; the benchmark must not send traffic beyond loopback")
    say(f"{why}: running on plain loopback")
    return "plain loopback (no namespace: unshare -n not permitted)"
