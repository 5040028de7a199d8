"""
The options of the peer's commands: C{send}, C{receive} (C{rcv}) and
C{completion}.  Parsing checks everything that can be checked before the
server is contacted (which would burn the sender's code).
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from .. import codes
from ..rendezvous import parse_server
from .common import _Options, format_server, looks_like_server, server_address

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


def _text(value: str) -> str:
    """The --text message, read from standard input for '-' (bounded)."""
    from ..errors import TransferFailed
    from ..transfer.text import MAX_TEXT, encode_text

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


def _no_default() -> str:
    from ..config import config_path

    return f"no default server is set: P2PFT_SERVER, or server = \"HOST:PORT\" in {config_path()}"


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


def _streams(text: str) -> int | str:
    if text == "auto":
        return text
    if not (text.isdigit() and 1 <= int(text) <= 16):
        raise usage.UsageError("--streams takes a number from 1 to 16, or auto")
    return int(text)


class _PeerOptions(_Options):
    optFlags = [
        ["json", None, "Print one JSON object per line on stdout (events: code, paired, "
                       "connected, path, reconnecting, reconnected, offer, progress, text, done, error, "
                       "port-mapping)."],
        ["no-progress", None, "No progress bar (there is none when stderr is not a terminal)."],
        ["quiet", "q", "Print only errors and what a script needs (the code); no progress bar."],
        ["verbose", "v", "Also log what happens (rendezvous, punching, relays) to stderr."],
        ["no-port-mapping", None, "Do not ask the router to forward a port (PCP, NAT-PMP, UPnP-IGD) "
                                  "for the direct connection; also port-mapping = false in the config file."],
    ]
    optParameters = [
        ["server", "s", None, "Rendezvous server HOST:PORT ([V6]:PORT for IPv6), instead of "
                              "the first argument or the default server."],
        ["timeout", None, 60.0, "Seconds to wait for each step once paired (key exchange, "
                                "addresses) before giving up.", float],
        ["relay", None, None, "Use this relay (HOST:PORT), dialled at once next to the direct "
                              "attempts, instead of the ones the server suggests."],
        ["reconnect-timeout", None, 300.0, "Seconds to keep trying to reconnect when every connection "
                                           "is lost (network change, sleep, relay restart) before "
                                           "failing; the data received is kept for a resume.", float],
    ]

    def parseArgs(self, *args) -> None:
        self["args"] = list(args)

    def _check_timeout(self) -> None:
        if not 0 < self["timeout"] <= 86400:
            raise usage.UsageError("--timeout must be between 0 and 86400 seconds")
        if not 0 <= self["reconnect-timeout"] <= 86400:
            raise usage.UsageError("--reconnect-timeout must be between 0 and 86400 seconds")
        if self["relay"] is not None:
            self["relay"] = server_address(self["relay"])
        if self["quiet"] and self["verbose"]:
            raise usage.UsageError("--quiet and --verbose do not go together")
        self["port-mapping"] = not self["no-port-mapping"] and self._config_port_mapping()

    def _config_port_mapping(self) -> bool:
        from ..config import ConfigError, port_mapping

        try:
            return port_mapping()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

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
        from ..config import ConfigError, defaults

        try:
            return defaults()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _meant_otherwise(self, arg: str) -> bool:
        """Whether a first argument that is not HOST:PORT was never meant as
        the server (so the error is what is missing, not a bad server)."""
        return False

    def _split_server(self, first_is_server) -> list[str]:
        """
        Set C{self["server"]} (and a default relay) and return the other
        arguments.  --server names the server; otherwise the first argument
        is the server when C{first_is_server(arg)} says so; otherwise the
        default server (P2PFT_SERVER, the config file), read only then.
        """
        args = self["args"]
        if self["server"] is not None:
            self["server"] = server_address(self["server"])
            return args
        if args and first_is_server(args[0]):
            self["server"] = server_address(args[0])
            return args[1:]
        found = self._defaults()
        if found.server is None:
            if args and not looks_like_server(args[0]) and not self._meant_otherwise(args[0]):
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
                "[--streams N|auto] [--relay HOST:PORT] [--timeout S] [--reconnect-timeout S] [-q | -v] "
                "[--no-progress] [--no-port-mapping] [--json] [SERVER:PORT] (PATH... | --text TEXT)")
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
        ["streams", None, "auto", "Parallel connections to stripe the data over (direct or through "
                                  "the relay), 1-16, or 'auto': one, and 4 to 8 when that one loses "
                                  "packets -- on lossy paths one TCP connection cannot fill the link."],
    ]

    def postOptions(self) -> None:
        def first_is_server(arg):
            # What looks like HOST:PORT and is not a path to send (so a
            # default server, when it is needed, is never guessed at).
            return looks_like_server(arg) and not os.path.lexists(arg)

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
        self["streams"] = _streams(self["streams"])


class ReceiveOptions(_PeerOptions):
    synopsis = ("[--yes] [--output-dir DIR | --output -] [--overwrite] [--skip-unsafe] [--relay HOST:PORT] [--timeout S] "
                "[--reconnect-timeout S] "
                "[-q | -v] [--no-progress] [--no-port-mapping] [--json] [SERVER:PORT] [CODE]")
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

    def _meant_otherwise(self, arg: str) -> bool:
        # 'receive 7-apple-river' without a default server: the code.
        try:
            codes.parse_code(arg)
        except codes.CodeError:
            return False
        return True

    def postOptions(self) -> None:
        args = self["args"]

        def first_is_server(arg):
            # A code never looks like HOST:PORT.
            return len(args) > 1 or looks_like_server(arg)

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
        from ..completion import SHELLS

        if shell not in SHELLS or extra:
            raise usage.UsageError("completion takes one of: " + ", ".join(SHELLS))
        self["shell"] = shell
