"""
The command line: C{p2pft server|send|receive} (C{rcv} is an alias).

The option classes here are shared with the twistd plugins; the console
script runs the same code under L{twisted.internet.task.react} so that a
failure becomes a non-zero exit status with one line on stderr.
"""

from __future__ import annotations

import getopt
import math
import os
import sys

from twisted.internet import defer
from twisted.python import usage

from . import __version__, codes
from .rendezvous import parse_server

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Seconds an interrupted transfer gets to tell the other side.
SHUTDOWN_GRACE = 2.0

CODE_NOTE = (
    "The code can also come from the P2PFT_CODE environment variable, which keeps "
    "it out of the process list."
)
SERVER_NOTE = (
    "The first argument is the server if it looks like HOST:PORT (for send: and is not "
    "an existing file or folder); otherwise the default server is used (P2PFT_SERVER, or "
    "'server = \"HOST:PORT\"' in the config file: see 'p2pft --help').  --server names "
    "one without any guessing.  Options may come before or after the arguments; '--' "
    "ends them."
)
RESUME_HINT = "run the same send and receive again (with a new code) to resume"


def _server(text: str) -> tuple[str, int]:
    try:
        return parse_server(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def format_server(server: tuple[str, int]) -> str:
    """HOST:PORT as the command line takes it back: [V6]:PORT for IPv6."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(value: str) -> str:
    """The --text message, read from standard input for '-' (bounded)."""
    from .errors import TransferFailed
    from .text import MAX_TEXT, encode_text

    if value == "-":
        data = sys.stdin.buffer.read(MAX_TEXT + 1)
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            raise usage.UsageError("--text -: standard input is not UTF-8 text (send it as a file)") from None
    try:
        encode_text(value)
    except TransferFailed as e:
        raise usage.UsageError(f"--text: {e}") from None
    return value


def _looks_like_server(text: str) -> bool:
    try:
        parse_server(text)
    except ValueError:
        return False
    return True


def _no_default() -> str:
    from .config import config_path

    return f"no default server is set: P2PFT_SERVER, or server = \"HOST:PORT\" in {config_path()}"


def _number(name: str, kind):
    """The coercion for an int or float option, with a message that names
    the option (Twisted's own says 'Parameter type enforcement failed')."""
    what = "a whole number" if kind is int else "a number"

    def coerce(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise usage.UsageError(f"--{name} takes {what}, not {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise usage.UsageError(f"--{name} takes a finite number, not {text!r}")
        return value

    return coerce


def _rate(text: str) -> int:
    """'500k', '20M', '1.5G' or a plain number of bytes per second."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text)
    except ValueError:
        value = 0
    if not 1000 <= value * scale < 1e15:
        raise usage.UsageError("--limit-rate takes bytes per second, at least 1000 (e.g. 500k, 20M)")
    return int(value * scale)


class _Options(usage.Options):
    #: Take options anywhere among the arguments (GNU style; '--' ends them).
    permute = True

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter) and handler.coerce in (int, float):
                handler.coerce = _number(name, handler.coerce)

    def parseOptions(self, options=None) -> None:
        options = sys.argv[1:] if options is None else list(options)
        if self.permute and not getattr(self, "subCommands", None) and "--_shell-completion" not in options:
            options = self._permuted(options)
        super().parseOptions(options)

    def _permuted(self, argv: list[str]) -> list[str]:
        """The options first, then '--' and the arguments: what
        getopt.getopt (which stops at the first argument) expects."""
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        flat = []
        for opt, value in opts:
            if opt.startswith("--"):
                flat.append(f"{opt}={value}" if opt[2:] + "=" in self.longOpt else opt)
            else:
                flat.extend([opt, value] if opt[1] + ":" in self.shortOpt else [opt])
        return flat + ["--"] + args

    def opt_version(self) -> None:
        """Print the p2pft version and exit."""
        print(f"p2pft {__version__}")
        sys.exit(0)


class _PeerOptions(_Options):
    optFlags = [
        ["json", None, "Print one JSON object per line on stdout (events: code, paired, "
                       "connected, offer, progress, done, error)."],
        ["no-progress", None, "No progress bar (there is none when stderr is not a terminal)."],
        ["quiet", "q", "Print only errors and what a script needs (the code); no progress bar."],
        ["verbose", "v", "Also log what happens (rendezvous, punching, relays) to stderr."],
    ]
    optParameters = [
        ["server", "s", None, "Rendezvous server HOST:PORT ([V6]:PORT for IPv6), instead of "
                              "the first argument or the default server."],
        ["timeout", None, 60.0, "Seconds to wait for each step once paired (key exchange, "
                                "addresses) before giving up.", float],
        ["relay", None, None, "Use this relay (HOST:PORT) when a direct connection fails, "
                              "instead of the ones the server suggests."],
    ]

    def parseArgs(self, *args) -> None:
        self["args"] = list(args)

    def _check_timeout(self) -> None:
        if not 0 < self["timeout"] <= 86400:
            raise usage.UsageError("--timeout must be between 0 and 86400 seconds")
        if self["relay"] is not None:
            self["relay"] = _server(self["relay"])
        if self["quiet"] and self["verbose"]:
            raise usage.UsageError("--quiet and --verbose do not go together")

    def _code_from_env(self) -> None:
        if self.get("code") == "" and isinstance(self, SendOptions):
            raise usage.UsageError("--code must not be empty")
        if not self.get("code") and os.environ.get("P2PFT_CODE"):
            self["code"] = os.environ["P2PFT_CODE"]
        if self.get("code"):
            try:
                codes.parse_code(self["code"])
            except codes.CodeError as e:
                raise usage.UsageError(str(e)) from None

    def _defaults(self):
        from .config import ConfigError, defaults

        try:
            return defaults()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _split_server(self, first_is_server) -> list[str]:
        """
        Set C{self["server"]} (and a default relay) and return the other
        arguments.  --server names the server; otherwise the first argument
        is the server when C{first_is_server(arg)} says so; otherwise the
        default server (P2PFT_SERVER, the config file), read only then.
        """
        args = self["args"]
        if self["server"] is not None:
            self["server"] = _server(self["server"])
            return args
        if args and first_is_server(args[0]):
            self["server"] = _server(args[0])
            return args[1:]
        found = self._defaults()
        if found.server is None:
            if args and not _looks_like_server(args[0]):
                try:
                    parse_server(args[0])
                except ValueError as e:
                    raise usage.UsageError(f"{e} ({_no_default()})") from None
            raise usage.UsageError(f"{self.needs} ({_no_default()})")
        self["server"] = found.server
        if not self.get("relay") and found.relay is not None:
            self["relay"] = format_server(found.relay)
        return args


class SendOptions(_PeerOptions):
    synopsis = ("[--code CODE] [--code-length N] [--follow-symlinks] [--limit-rate BYTES/S] "
                "[--relay HOST:PORT] [--timeout S] [-q | -v] "
                "[--no-progress] [--json] [SERVER:PORT] (PATH... | --text TEXT)")
    needs = "send needs SERVER:PORT and at least one PATH (or --text TEXT)"
    longdesc = (
        "Send files and folders (folders with everything in them, empty folders too); "
        "PATH '-' alone sends standard input; --text sends a short message instead, which the "
        "receiver prints on its standard output.  Prints a code such as 7-apple-river; "
        "give it to the receiver.  An interrupted transfer resumes when the same send and "
        "receive run again.  Symbolic links inside folders are skipped unless "
        "--follow-symlinks; sockets, FIFOs and devices always are.  " + CODE_NOTE + "  " + SERVER_NOTE
    )
    optFlags = _PeerOptions.optFlags + [
        ["follow-symlinks", "L", "Send what symbolic links inside folders point to."],
    ]
    optParameters = _PeerOptions.optParameters + [
        ["text", "t", None, "Send this text instead of files ('-': read it from standard input); "
                            "the receiver shows it, nothing is written.  At most 64 KiB."],
        ["limit-rate", None, None, "Send at most this many bytes per second (suffixes k, M, G: "
                                   "powers of 1000), to leave room on a slow link."],
        ["code", "c", None, "Use this code instead of asking the server for one (NAMEPLATE-WORD-WORD)."],
        ["code-length", None, codes.DEFAULT_WORDS, "Number of words in a generated code.", int],
    ]

    def postOptions(self) -> None:
        def first_is_server(arg):
            # What looks like HOST:PORT and is not a path to send (so a
            # default server, when it is needed, is never guessed at).
            return _looks_like_server(arg) and not os.path.lexists(arg)

        paths = self._split_server(first_is_server)
        if self["text"] is not None:
            if paths:
                raise usage.UsageError("--text sends text instead of files: give no PATH")
            self["text"] = _text(self["text"])
        elif not paths:
            raise usage.UsageError(self.needs)
        if "-" in paths and len(paths) > 1:
            raise usage.UsageError("'-' (standard input) must be the only PATH")
        self["paths"] = list(paths)
        self._code_from_env()
        self._check_timeout()
        if self["code-length"] < 1 or self["code-length"] > 16:
            raise usage.UsageError("--code-length must be between 1 and 16")
        if self["limit-rate"] is not None:
            self["limit-rate"] = _rate(self["limit-rate"])


class ReceiveOptions(_PeerOptions):
    synopsis = ("[--yes] [--output-dir DIR | --output -] [--overwrite] [--skip-unsafe] [--relay HOST:PORT] [--timeout S] "
                "[-q | -v] [--no-progress] [--json] [SERVER:PORT] [CODE]")
    needs = "receive needs SERVER:PORT"
    longdesc = (
        "Receive files and folders.  Without CODE, asks for it on the terminal.  Shows what "
        "is offered and asks before anything is written (--yes accepts).  Data arrives in "
        "NAME.p2pft-partial files that are kept if the transfer is interrupted: running the "
        "same send and receive again resumes, and files already complete are checked and "
        "skipped.  Nothing is ever written outside the output folder.  " + CODE_NOTE + "  "
        + SERVER_NOTE
    )
    optFlags = _PeerOptions.optFlags + [
        ["yes", "y", "Accept the offer without asking."],
        ["overwrite", None, "Replace existing files of the same names (never folders)."],
        ["skip-unsafe", None, "Leave out the entries whose names cannot be written here (they are "
                              "listed when refused) and receive the rest."],
    ]
    optParameters = _PeerOptions.optParameters + [
        ["output-dir", "o", ".", "Folder to save into."],
        ["output", None, None, "'-': write a single-file transfer to standard output instead "
                               "(messages stay on stderr; cannot resume)."],
    ]

    def postOptions(self) -> None:
        args = self["args"]

        def first_is_server(arg):
            # A code never looks like HOST:PORT.
            return len(args) > 1 or _looks_like_server(arg)

        rest = self._split_server(first_is_server)
        if len(rest) > 1:
            raise usage.UsageError("too many arguments")
        self["code"] = rest[0] if rest else None
        self._code_from_env()
        self._check_timeout()
        if self["output"] not in (None, "-"):
            raise usage.UsageError("--output takes '-' (standard output); use --output-dir for a directory")
        if self["output"] == "-" and self["json"]:
            raise usage.UsageError("--json and --output - both want standard output")


class CompletionOptions(_Options):
    synopsis = "bash|zsh"
    longdesc = ("Print a completion script for bash or zsh: commands, options and the words of "
                "codes (7-ap<TAB> completes to 7-apple).  bash: "
                "p2pft completion bash > ~/.local/share/bash-completion/completions/p2pft ; "
                "zsh: p2pft completion zsh > \"${fpath[1]}/_p2pft\".")

    def parseArgs(self, shell=None, *extra) -> None:
        from .completion import SHELLS

        if shell not in SHELLS or extra:
            raise usage.UsageError("completion takes one of: " + ", ".join(SHELLS))
        self["shell"] = shell


class _RelayLimitOptions(_Options):
    optParameters = [
        ["relay-max-sessions", None, 1000, "Relayed sessions at once.", int],
        ["relay-max-per-ip", None, 16, "Relay connections at once from one IP address.", int],
        ["relay-max-bytes", None, 0, "Bytes one relayed session may carry (0: no limit).", int],
        ["relay-rate", None, 0, "Bytes per second one relayed session may carry (0: no limit).", int],
        ["relay-idle-timeout", None, 300.0, "Seconds a relayed session may stay silent.", float],
    ]

    def relay_limits(self):
        from .server.relay import RelayLimits

        from .channel import KEEPALIVE_INTERVAL

        for name in ("relay-max-sessions", "relay-max-per-ip"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["relay-idle-timeout"] <= KEEPALIVE_INTERVAL:
            raise usage.UsageError(
                f"--relay-idle-timeout must be more than {KEEPALIVE_INTERVAL:g} s "
                "(peers send a keepalive every minute while a person decides)")
        for name in ("relay-max-bytes", "relay-rate"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        return RelayLimits(
            max_sessions=self["relay-max-sessions"], max_per_ip=self["relay-max-per-ip"],
            max_bytes=self["relay-max-bytes"], rate=self["relay-rate"],
            idle_timeout=self["relay-idle-timeout"],
        )


def dual_stack(port: int | str) -> str:
    """An endpoint for IPv6 and IPv4 on every interface, or IPv4 only on a
    host without IPv6."""
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            # Twisted's tcp6 listener keeps the system default; where that is
            # IPv6-only (bindv6only=1, the BSDs) it would shut IPv4 out.
            if s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                return f"tcp:{port}"
            s.bind(("::", 0))
    except (OSError, AttributeError):
        return f"tcp:{port}"
    return f"tcp6:{port}:interface=\\:\\:"


def check_endpoint(value: str) -> str:
    """
    A listening port for the server or relay: a number (0-65535) becomes
    the dual-stack endpoint, anything else must parse as a Twisted server
    endpoint description.  Parsed now, so that a typo is a usage error and
    not a traceback once the reactor runs.
    """
    from twisted.internet.endpoints import serverFromString

    value = value.strip()
    hint = "takes a port number (9000) or a Twisted endpoint (tcp:9000:interface=203.0.113.7)"
    if value.isdigit():
        if not int(value) < 65536:
            raise usage.UsageError(f"--port {hint}; {value} is not a port number (0-65535)")
        return dual_stack(int(value))
    try:
        # No reactor yet (twistd may still install another): the parsers
        # only keep it for listen().
        endpoint = serverFromString(None, value)
    except Exception:
        raise usage.UsageError(f"--port {hint}, not {value!r}") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port < 65536:
        raise usage.UsageError(f"--port {hint}; {port} is not a port number (0-65535)")
    return value


def _opt_port(self, value: str) -> None:
    """Port number (IPv6 and IPv4 on every interface) or Twisted endpoint description, e.g. tcp:9000:interface=203.0.113.7 [default: 9000 for a server, 9001 for a relay]."""  # noqa: E501 (one line: usage.Options prints it as is)
    self["port"] = check_endpoint(value)


class RelayOptions(_RelayLimitOptions):
    synopsis = "[--port PORT] [relay limits]"
    longdesc = (
        "Run a relay on its own: it splices two peers' connections when they cannot "
        "connect directly, and sees only ciphertext.  Tell a rendezvous server about it "
        "with 'p2pft server --advertise-relay HOST:PORT'."
    )
    optParameters = _RelayLimitOptions.optParameters + [
        ["port", "p", None, "Port number (IPv6 and IPv4) or Twisted endpoint description to listen on. [default: 9001]"],
    ]
    opt_port = opt_p = _opt_port

    def postOptions(self) -> None:
        self["port"] = self["port"] or dual_stack(9001)
        self["limits"] = self.relay_limits()


class ServerOptions(_RelayLimitOptions):
    synopsis = "[--port PORT] [--relay] [--advertise-relay HOST:PORT] [--waiting-timeout S] [--hello-timeout S] [--max-connections N] [--max-per-ip N] [relay limits]"
    longdesc = "Run the rendezvous server that introduces peers to each other."
    optFlags = [
        ["relay", None, "Also relay peers that cannot connect directly, on the same port."],
    ]
    optParameters = _RelayLimitOptions.optParameters + [
        ["port", "p", None, "Port number (IPv6 and IPv4) or Twisted endpoint description to listen on. [default: 9000]"],
        ["waiting-timeout", None, 3600.0, "Seconds a peer may wait for its partner.", float],
        ["hello-timeout", None, 60.0, "Seconds a new connection may stay without joining a nameplate.", float],
        ["max-connections", None, 20000, "Most client connections at once (also kept below the open-file limit).", int],
        ["max-per-ip", None, 64, "Most connections at once from one IP address.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["advertise-relay"] = []

    def opt_advertise_relay(self, value: str) -> None:
        """Tell peers to use this relay (HOST:PORT, e.g. a 'p2pft relay'); repeatable."""
        host, port = _server(value)
        self["advertise-relay"].append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    opt_port = opt_p = _opt_port

    def postOptions(self) -> None:
        for name in ("waiting-timeout", "hello-timeout", "max-connections", "max-per-ip"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        self["port"] = self["port"] or dual_stack(9000)
        self["limits"] = self.relay_limits()


class Options(_Options):
    synopsis = "Usage: p2pft [--version]"
    longdesc = (
        "Options go before or after the arguments.  The default server (so that "
        "'p2pft send FILE' and 'p2pft receive CODE' need no SERVER:PORT) comes from "
        "P2PFT_SERVER, else from the config file (TOML: server = \"HOST:PORT\", relay = "
        "\"HOST:PORT\"): $XDG_CONFIG_HOME/p2pft/config.toml or ~/.config/p2pft/config.toml "
        "on Linux, ~/Library/Application Support/p2pft/config.toml on macOS, "
        "%APPDATA%\\p2pft\\config.toml on Windows, or the file P2PFT_CONFIG names."
    )
    subCommands = [
        ["server", None, ServerOptions, "Run a rendezvous server."],
        ["send", None, SendOptions, "Send files and folders."],
        ["receive", None, ReceiveOptions, "Receive files and folders."],
        ["rcv", None, ReceiveOptions, "Alias for receive."],
        ["relay", None, RelayOptions, "Run a relay on its own."],
        ["completion", None, CompletionOptions, "Print a bash or zsh completion script."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a command: send, receive, server, relay or completion")
        if self.subCommand == "rcv":
            self.subCommand = "receive"


def make_ui(sub: usage.Options, reactor=None):
    from .ui import HumanUI, JsonUI

    kw = dict(assume_yes=bool(sub.get("yes")), reactor=reactor, quiet=bool(sub.get("quiet")),
              progress_bar=False if sub.get("no-progress") or sub.get("quiet") else None)
    server = format_server(sub["server"])
    return JsonUI(server, **kw) if sub.get("json") else HumanUI(server, **kw)


class Interrupted(Exception):
    """Ctrl-C before the reactor ran (at the code prompt)."""


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


class PreflightError(Exception):
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

    from .manifest import printable

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
    if not sub["yes"] and not (hasattr(stdin, "isatty") and stdin.isatty()):
        raise usage.UsageError("cannot ask whether to accept: standard input is not a terminal (use --yes)")


async def run_peer(reactor, command: str, sub: usage.Options, ui, channels: list | None = None) -> None:
    """Run send or receive; raise the one-line errors as exceptions.
    The chosen peer connection is appended to C{channels}."""
    from .session import SessionError, Settings, receive, send, send_text

    if command == "receive" and sub["output"] != "-":
        try:
            check_output_dir(sub["output-dir"])
        except PreflightError as e:
            raise SessionError(str(e)) from None
    settings = Settings(
        sub["server"], code=sub.get("code"),
        code_length=sub.get("code-length", codes.DEFAULT_WORDS), timeout=sub["timeout"],
        relay=sub.get("relay"),
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
    was expected (an unexpected one is a bug: P2PFT_DEBUG shows its
    traceback)."""
    from .secure import SecurityError
    from .session import SessionError
    from .transfer import TransferFailed

    if isinstance(e, (SessionError, TransferFailed, SecurityError, RuntimeError)):
        return str(e), True
    if isinstance(e, OSError):
        from .manifest import printable

        return f"{e.strerror or e}" + (f": {printable(str(e.filename))}" if e.filename else ""), True
    return f"unexpected {e.__class__.__name__}: {e} (set P2PFT_DEBUG=1 for details)", False


def _resumable(command: str, sub) -> bool:
    return (sub.get("paths") != ["-"]) if command == "send" else sub.get("output") != "-"


async def _main(reactor, config: Options) -> None:
    command, sub = config.subCommand, config.subOptions
    if command in ("server", "relay"):
        from .server.service import makeRelayService, makeService

        service = (makeService if command == "server" else makeRelayService)(sub, reactor)
        service.startService()
        try:
            port = await service.rendezvous.whenListening()
        except Exception as e:
            sys.stderr.write(f"p2pft: error: cannot listen on {sub['port']}: {e}\n")
            raise SystemExit(EXIT_FAILURE)
        address = port.getHost()
        what = "rendezvous server" if command == "server" else "relay"
        sys.stderr.write(f"p2pft {what} listening on {address.host}:{address.port}\n")
        sys.stderr.flush()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        await defer.Deferred()  # until Ctrl-C / SIGTERM
        return

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
        if os.environ.get("P2PFT_DEBUG") and not expected:
            import traceback

            traceback.print_exc()
        ui.error(message)
        raise SystemExit(EXIT_FAILURE)


def start_logging(err=None) -> None:
    """-v: everything the layers log (twisted.logger), as text on stderr."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(err or sys.stderr)], redirectStandardIO=False)


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
    if sub.get("verbose"):
        start_logging()
    react(_main, [config])
