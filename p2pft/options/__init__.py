"""
Every command-line option class of p2pft (C{usage.Options}), shared by the
console script (L{p2pft.cli}) and the twistd plugins: L{Options} is the
top level, with one subcommand per command.

  - L{p2pft.options.common}: the base class and shared coercions;
  - L{p2pft.options.peer}: C{send}, C{receive}, C{completion};
  - L{p2pft.options.servers}: C{server}, C{relay};
  - L{p2pft.options.ping}: C{ping};
  - L{p2pft.options.doctor}: C{doctor}.
"""

from __future__ import annotations

from twisted.python import usage

from .common import _Options, format_server
from .doctor import DoctorOptions
from .peer import CompletionOptions, ReceiveOptions, SendOptions
from .ping import PingOptions
from .servers import (
    RelayCommandOptions,
    RelayOptions,
    ServerCommandOptions,
    ServerOptions,
    check_endpoint,
    dual_stack,
)

__all__ = [
    "CompletionOptions", "DoctorOptions", "Options", "PingOptions", "ReceiveOptions", "RelayCommandOptions", "RelayOptions",
    "SendOptions", "ServerCommandOptions", "ServerOptions", "check_endpoint", "dual_stack", "format_server",
]


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
        ["server", None, ServerCommandOptions, "Run a rendezvous server."],
        ["send", None, SendOptions, "Send files and folders."],
        ["receive", None, ReceiveOptions, "Receive files and folders."],
        ["rcv", None, ReceiveOptions, "Alias for receive."],
        ["relay", None, RelayCommandOptions, "Run a relay on its own."],
        ["ping", None, PingOptions, "Check that a rendezvous server answers (exit 0/1)."],
        ["doctor", None, DoctorOptions, "Tell what NAT this host is behind and what it means for direct connections."],
        ["completion", None, CompletionOptions, "Print a bash or zsh completion script."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a command: send, receive, server, relay, ping, doctor or completion")
        if self.subCommand == "rcv":
            self.subCommand = "receive"
