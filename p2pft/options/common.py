"""
What every p2pft command's options share: GNU-style permuting (options
anywhere among the arguments), number options whose errors name the option,
and HOST:PORT arguments.
"""

from __future__ import annotations

import getopt
import math
import sys

from twisted.python import usage

from .. import __version__
from ..rendezvous import parse_server


def server_address(text: str) -> tuple[str, int]:
    try:
        return parse_server(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def format_server(server: tuple[str, int]) -> str:
    """HOST:PORT as the command line takes it back: [V6]:PORT for IPv6."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def looks_like_server(text: str) -> bool:
    try:
        parse_server(text)
    except ValueError:
        return False
    return True


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
