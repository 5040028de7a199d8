"""
The default rendezvous server (and relay), so that C{p2pft send FILE} and
C{p2pft receive CODE} work without naming one every time.

Where a default comes from, first found wins:

  1. C{P2PFT_SERVER} / C{P2PFT_RELAY} in the environment;
  2. the config file, TOML, in the platform's usual place (L{config_path}):

       server = "p2pft.example.org:9000"
       relay = "relay.example.org:9001"   # optional
       port-mapping = false               # optional: never ask the router
                                          # for a port mapping

A default relay goes with the default server: it is used only when the
server is the default one (a server named on the command line suggests its
own relays).  Only the parts that are needed are read, so a broken config
file does not stop a command that names its server; when it is needed, a
broken file is one line that names the file.
"""

from __future__ import annotations

import os
import sys

import attrs

from .errors import P2pftError
from .rendezvous import parse_server

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, installed for 3.10 only (setup.cfg)
    import tomli as tomllib

#: Larger than any sensible config file; a bigger one is a mistake (a
#: device, a log file given by accident), not something to parse.
MAX_CONFIG_BYTES = 64 * 1024
#: The keys a config file may hold.
KEYS = ("server", "relay", "port-mapping")


class ConfigError(P2pftError):
    """A config file or variable that cannot be used; one line, naming it."""


@attrs.frozen
class Defaults:
    server: tuple[str, int] | None = None
    relay: tuple[str, int] | None = None
    #: Where the server came from (for messages): a variable or a file.
    origin: str = ""


def config_path(environ=None, platform: str | None = None) -> str:
    """The config file's path: C{$XDG_CONFIG_HOME/p2pft/config.toml} (else
    C{~/.config/...}) on Linux and the BSDs, C{~/Library/Application
    Support/p2pft/config.toml} on macOS, C{%APPDATA%\\p2pft\\config.toml} on
    Windows.  C{P2PFT_CONFIG} names another file."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get("P2PFT_CONFIG"):
        return environ["P2PFT_CONFIG"]
    home = environ.get("HOME") or os.path.expanduser("~")
    if platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    elif platform.startswith("win"):
        base = environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    else:
        xdg = environ.get("XDG_CONFIG_HOME")
        # The XDG spec: a relative value is invalid and must be ignored.
        base = xdg if xdg and os.path.isabs(xdg) else os.path.join(home, ".config")
    return os.path.join(base, "p2pft", "config.toml")


def _address(text, where: str, key: str) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {key} must be a string like \"example.org:9000\"")
    try:
        return parse_server(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {key}: {e}") from None


def read_file(path: str) -> dict:
    """The checked keys of one config file ({} when it does not exist)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: too large for a config file")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(KEYS)})")
    found = {key: _address(table[key], path, key) for key in ("server", "relay") if key in table}
    if "port-mapping" in table:
        if not isinstance(table["port-mapping"], bool):
            raise ConfigError(f"{path}: port-mapping must be true or false")
        found["port-mapping"] = table["port-mapping"]
    return found


def port_mapping(environ=None) -> bool:
    """Whether the config file lets us ask the router for a port mapping
    (C{port-mapping = false} says no; the default is yes)."""
    path = config_path(environ)
    try:
        return read_file(path).get("port-mapping", True)
    except ConfigError as e:
        if str(e).startswith(f"{path}: port-mapping"):
            raise
        return True  # a file broken otherwise is reported where its server is needed


def defaults(environ=None) -> Defaults:
    """The default server and relay, from the environment or the file."""
    environ = os.environ if environ is None else environ
    file: dict | None = None
    path = config_path(environ)

    def from_file() -> dict:
        nonlocal file
        if file is None:
            file = read_file(path)
        return file

    if environ.get("P2PFT_SERVER"):
        server, origin = _address(environ["P2PFT_SERVER"], "P2PFT_SERVER", "the server"), "P2PFT_SERVER"
    else:
        server, origin = from_file().get("server"), path
    if server is None:
        return Defaults()
    if environ.get("P2PFT_RELAY"):
        relay = _address(environ["P2PFT_RELAY"], "P2PFT_RELAY", "the relay")
    else:
        relay = from_file().get("relay")
    return Defaults(server, relay, origin)
