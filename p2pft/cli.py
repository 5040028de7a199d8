"""
The command line: C{p2pft server|relay|send|receive|ping|doctor} (C{rcv}
is an alias).

The console script runs the same code as the twistd plugins under
L{twisted.internet.task.react}, so that a failure becomes a non-zero exit
status with one line on stderr.  The option classes are L{p2pft.options}.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from . import codes
from .errors import NotATerminal, P2pftError
from .options import Options, format_server
from .util import printable

log = Logger()

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Seconds an interrupted transfer gets to tell the other side.
SHUTDOWN_GRACE = 2.0

RESUME_HINT = "run the same send and receive again (with a new code) to resume"
#: What an unexpected error's line adds: it is a bug, and how to report it.
BUG_HINT = "this is a bug in p2pft; please report it, with the traceback P2PFT_DEBUG=1 prints"


def make_ui(sub: usage.Options, reactor=None):
    from .ui import HumanUI, JsonUI

    kw = dict(assume_yes=bool(sub.get("yes")), reactor=reactor, quiet=bool(sub.get("quiet")),
              progress_bar=False if sub.get("no-progress") or sub.get("quiet") else None)
    server = format_server(sub["server"])
    return JsonUI(server, **kw) if sub.get("json") else HumanUI(server, **kw)


class Interrupted(P2pftError):
    """Ctrl-C before the reactor ran (at the code prompt)."""

    default = "interrupted"


def ask_code() -> str:
    """Prompt for a code on the terminal (the seed's `p2pft rcv SERVER:PORT`)."""
    if not sys.stdin.isatty():
        raise usage.UsageError("no code given (pass CODE, set P2PFT_CODE, or run on a terminal)")
    try:
        text = input("Enter the code: ")
    except EOFError:
        raise usage.UsageError("no code given") from None
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise Interrupted() from None
    try:
        codes.parse_code(text)
    except codes.CodeError as e:
        raise usage.UsageError(str(e)) from None
    return text


class PreflightError(P2pftError):
    """Something checked before contacting the server; one line."""


def check_output_dir(path: str, access=os.access) -> None:
    """
    Refuse an output folder we cannot write into before pairing (which
    would burn the sender's code): missing, not a folder, no write or
    search permission, or (what access() cannot see: root, read-only mounts,
    ACLs) a probe file that cannot be created and removed.
    """
    import errno
    import tempfile

    shown = printable(path)
    if not os.path.isdir(path):
        raise PreflightError(f"the output folder {shown} does not exist" if not os.path.lexists(path)
                             else f"the output folder {shown} is not a folder")
    if not access(path, os.W_OK | os.X_OK):
        raise PreflightError(f"cannot write into the output folder {shown}: permission denied")
    try:
        fd, probe = tempfile.mkstemp(prefix=".p2pft-probe-", dir=path)
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e)).lower()
        raise PreflightError(f"cannot write into the output folder {shown}: {why}") from None
    os.close(fd)
    os.unlink(probe)


def preflight(command: str, sub: usage.Options, stdin=None, ask=None) -> None:
    """What can be checked before contacting the server (which would burn
    the sender's code): the output folder, then the code (asked for on the
    terminal when missing), then whether the offer can be answered."""
    if command != "receive":
        return
    stdin = sys.stdin if stdin is None else stdin
    if sub["output"] != "-":
        check_output_dir(sub["output-dir"])
    if not sub.get("code"):
        sub["code"] = (ask or ask_code)()
    check_answerable(sub, stdin)


def check_answerable(sub: usage.Options, stdin=None) -> None:
    """A receiver without --yes must be able to ask whether to accept: an
    offer that cannot be answered, found out only after pairing, would burn
    the sender's code.  A usage error, so that it is refused while parsing
    (by the CLI's L{preflight}, by the twistd plugin's options)."""
    stdin = sys.stdin if stdin is None else stdin
    if not sub["yes"] and not (hasattr(stdin, "isatty") and stdin.isatty()):
        raise usage.UsageError(NotATerminal.default)


async def run_peer(reactor, command: str, sub: usage.Options, ui, channels: list | None = None) -> None:
    """Run send or receive (after L{preflight}); raise the one-line errors
    as L{P2pftError}s.  The chosen peer connection is appended to
    C{channels}."""
    from .peer import Settings, receive, send, send_text

    settings = Settings(
        sub["server"], code=sub.get("code"),
        code_length=sub.get("code-length", codes.DEFAULT_WORDS), timeout=sub["timeout"],
        relay=sub.get("relay"), streams=sub.get("streams", "auto"),
        reconnect_timeout=sub["reconnect-timeout"], port_mapping=sub.get("port-mapping", True),
    )
    if command == "send" and sub["text"] is not None:
        await send_text(reactor, settings, sub["text"], ui, channels=channels)
    elif command == "send":
        await send(reactor, settings, sub["paths"], ui, channels=channels,
                   follow_symlinks=bool(sub["follow-symlinks"]), rate=sub["limit-rate"])
    else:
        await receive(reactor, settings, sub["output-dir"], ui.decide, ui,
                      overwrite=bool(sub["overwrite"]), channels=channels,
                      stdout=sys.stdout.buffer if sub["output"] == "-" else None,
                      skip_unsafe=bool(sub["skip-unsafe"]))


def explain(e: BaseException) -> tuple[str, bool]:
    """The one-line message for a failed send or receive, and whether it
    was expected: a L{P2pftError} is its message, an L{OSError} its
    C{strerror} and file name; anything else is a bug in p2pft (its caller
    logs the traceback, see L{report_bug})."""
    if isinstance(e, P2pftError):
        return e.message, True
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {printable(str(e.filename))}" if e.filename else ""), True
    return f"unexpected {e.__class__.__name__}: {printable(str(e))} ({BUG_HINT})", False


def report_bug(failure: Failure, command: str, debug: bool = False, err=None) -> None:
    """An unexpected error: its traceback into the log (twisted.logger, at
    error level: shown with -v and in twistd's log), and, with
    C{P2PFT_DEBUG} (C{debug}), on stderr too."""
    log.failure("p2pft {command} failed", failure, command=command, level=LogLevel.error)
    if debug:
        failure.printTraceback(file=err or sys.stderr)


def _resumable(command: str, sub) -> bool:
    return (sub.get("paths") != ["-"]) if command == "send" else sub.get("output") != "-"


async def _main(reactor, config: Options) -> None:
    command, sub = config.subCommand, config.subOptions
    if command in ("server", "relay"):
        return await _serve(reactor, command, sub)
    if command == "ping":
        return await _ping(reactor, sub)
    if command == "doctor":
        return await _doctor(reactor, sub)

    ui = make_ui(sub, reactor)
    channels: list = []
    work = defer.ensureDeferred(run_peer(reactor, command, sub, ui, channels))
    interrupted = []

    def on_shutdown():
        # Ctrl-C or SIGTERM: cancelling makes the transfer send ABORT
        # ("interrupted") and close; give that up to SHUTDOWN_GRACE seconds
        # to reach the other side before the reactor tears sockets down.
        if work.called:
            return None
        interrupted.append(True)
        work.cancel()
        closing = [c.whenClosed() for c in channels]
        if not closing:
            return None
        return defer.DeferredList(closing).addTimeout(SHUTDOWN_GRACE, reactor).addErrback(lambda f: None)

    reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        await work
    except Exception as e:
        if interrupted:
            ui.error("interrupted" + (f"; {RESUME_HINT}" if _resumable(command, sub) else ""))
            raise SystemExit(EXIT_INTERRUPTED)
        message, expected = explain(e)
        if not expected:
            report_bug(Failure(), command, debug=bool(os.environ.get("P2PFT_DEBUG")))
        ui.error(message)
        raise SystemExit(EXIT_FAILURE)


async def _serve(reactor, command: str, sub) -> None:
    """C{p2pft server} / C{p2pft relay}: the twistd service, run until
    Ctrl-C or SIGTERM.  Its log starts once it listens: twisted.logger
    keeps the events until then (the start-up lines among them), and a
    server that cannot listen says so in its one error line instead."""
    from .server.service import makeRelayService, makeService

    service = (makeService if command == "server" else makeRelayService)(sub, reactor)
    service.startService()
    for listener, where in ((service.rendezvous, sub["port"]), (service.metrics, "--metrics")):
        if listener is None:
            continue
        try:
            await listener.whenListening()
        except Exception as e:
            service.stopService()
            sys.stderr.write(f"p2pft: error: cannot listen on {where}: {e}\n")
            raise SystemExit(EXIT_FAILURE)
    start_logging(sub["log-format"], LogLevel.debug if os.environ.get("P2PFT_DEBUG") else LogLevel.info)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    await defer.Deferred()  # until Ctrl-C / SIGTERM


async def _ping(reactor, sub) -> None:
    """C{p2pft ping HOST:PORT}: one line, exit 0 if the server answered."""
    from .rendezvous import ping

    shown = format_server(sub["server"])
    try:
        version, seconds = await ping(reactor, sub["server"], sub["timeout"])
    except P2pftError as e:
        sys.stderr.write(f"p2pft: error: ping {shown}: {e}\n")
        raise SystemExit(EXIT_FAILURE)
    sys.stdout.write(f"p2pft ping {shown}: ok, p2pft {version} answered in {seconds * 1000:.0f} ms\n")


async def _doctor(reactor, sub) -> None:
    """C{p2pft doctor SERVER:PORT}: what NAT we are behind (p2pft.doctor)."""
    import json

    from .doctor import as_json, diagnose, lines

    shown = format_server(sub["server"])
    try:
        report = await diagnose(reactor, sub["server"], sub["timeout"], port_mapping=not sub["no-port-mapping"])
    except P2pftError as e:
        sys.stderr.write(f"p2pft: error: doctor {shown}: {e.message}\n")
        raise SystemExit(EXIT_FAILURE)
    text = json.dumps(as_json(report)) + "\n" if sub["json"] else "".join(line + "\n" for line in lines(report))
    sys.stdout.write(text)


def start_logging(fmt: str = "text", level=None, err=None) -> None:
    """Everything the layers log (twisted.logger) on stderr, as text or
    JSON lines: a server always, a peer with -v or P2PFT_DEBUG."""
    from . import logs

    logs.start(fmt, err or sys.stderr, LogLevel.debug if level is None else level)


def _tune_allocator() -> None:
    """
    Keep glibc from handing megabyte-sized buffers back to the kernel after
    every record: fresh mmap'd pages must be zeroed by the kernel on first
    touch, which costs more system time than the encryption itself.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> None:
    from twisted.internet.task import react

    _tune_allocator()

    argv = sys.argv[1:] if argv is None else argv
    config = Options()
    try:
        config.parseOptions(argv)
        command, sub = config.subCommand, config.subOptions
        if command == "completion":
            from .completion import script

            sys.stdout.write(script(sub["shell"], Options.subCommands))
            sys.exit(0)
        preflight(command, sub)
    except usage.UsageError as e:
        hint = f"p2pft {config.subCommand} --help" if config.subCommand else "p2pft --help"
        sys.stderr.write(f"p2pft: error: {e} (see '{hint}')\n")
        sys.exit(EXIT_USAGE)
    except PreflightError as e:
        sys.stderr.write(f"p2pft: error: {e}\n")
        sys.exit(EXIT_FAILURE)
    except (KeyboardInterrupt, Interrupted):
        sys.stderr.write("p2pft: error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    if command not in ("server", "relay", "ping", "doctor") and (sub.get("verbose") or os.environ.get("P2PFT_DEBUG")):
        start_logging()
    _freeze_startup_objects(command)
    react(_main, [config])


def _freeze_startup_objects(command: str) -> None:
    """Keep the garbage collector off what start-up made (modules,
    classes, interfaces: ~200,000 objects that live as long as the
    process), so its full collections during a transfer walk only what
    the transfer made: they were 7 % of a receiver's CPU."""
    import gc
    import importlib

    if command in ("send", "receive"):
        importlib.import_module("p2pft.peer")  # what every transfer imports anyway
    gc.freeze()
