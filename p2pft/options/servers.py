"""
The options of the commands that run on the public host: C{server} and
C{relay} (also the twistd plugins C{p2pft-server} and C{p2pft-relay}).
They parse into plain values (an endpoint description, L{RelayLimits})
that L{p2pft.server.service} takes; the server code imports nothing from
here.
"""

from __future__ import annotations

import re

from twisted.python import usage

from .common import _Options, server_address
from .configfile import ConfigFileOptions

_METRICS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})")


def metrics_address(value: str) -> tuple[str, int]:
    """C{--metrics IP:PORT} ([V6]:PORT): an IP literal (the interface to
    listen on) and a port, 0 for any free one."""
    import ipaddress

    m = _METRICS.fullmatch(value.strip())
    try:
        if not m:
            raise ValueError
        host, port = str(ipaddress.ip_address(m.group(1) or m.group(3))), int(m.group(2) or m.group(4))
    except ValueError:
        raise usage.UsageError(f"--metrics takes IP:PORT (127.0.0.1:9100, [::1]:9100), not {value!r}") from None
    if port > 65535:
        raise usage.UsageError(f"--metrics: {port} is not a port number (0-65535)")
    return host, port


class _RelayLimitOptions(_Options):
    optParameters = [
        ["relay-max-sessions", None, 1000, "Relayed sessions at once.", int],
        ["relay-max-per-ip", None, 16, "Relay connections at once from one IP address.", int],
        ["relay-max-bytes", None, 0, "Bytes one relayed session may carry (0: no limit).", int],
        ["relay-rate", None, 0, "Bytes per second one relayed session may carry (0: no limit).", int],
        ["relay-idle-timeout", None, 300.0, "Seconds a relayed session may stay silent.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["metrics"] = None

    def opt_metrics(self, value: str) -> None:
        """Serve Prometheus metrics on http://IP:PORT/metrics and a health check on /healthz (port 0: any free port, shown in the log) [default: none]."""  # noqa: E501
        self["metrics"] = metrics_address(value)

    #: Seconds between keepalives of protocol v1 peers (v2 peers send one
    #: every 5 s): a relay serves pairs of either version.
    V1_KEEPALIVE = 60.0

    def relay_limits(self):
        from ..server.relay import RelayLimits

        for name in ("relay-max-sessions", "relay-max-per-ip"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["relay-idle-timeout"] <= self.V1_KEEPALIVE:
            raise usage.UsageError(
                f"--relay-idle-timeout must be more than {self.V1_KEEPALIVE:g} s "
                "(protocol v1 peers send a keepalive every minute while a person decides)")
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


class RelayOptions(ConfigFileOptions, _RelayLimitOptions):
    synopsis = "[--config FILE] [--port PORT] [--metrics IP:PORT] [relay limits]"
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


class ServerOptions(ConfigFileOptions, _RelayLimitOptions):
    synopsis = "[--config FILE] [--port PORT] [--relay] [--advertise-relay HOST:PORT] [--waiting-timeout S] [--hello-timeout S] [--max-connections N] [--max-per-ip N] [--metrics IP:PORT] [relay limits]"
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
        host, port = server_address(value)
        self["advertise-relay"].append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    opt_port = opt_p = _opt_port

    def postOptions(self) -> None:
        for name in ("waiting-timeout", "hello-timeout", "max-connections", "max-per-ip"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        self["port"] = self["port"] or dual_stack(9000)
        self["limits"] = self.relay_limits()


LOG_NOTE = (
    "  Logs go to stderr, one line per event (start-up, refusals with their reason and the "
    "client's address, pairings, expiries, relay sessions); no code, nameplate, token or "
    "file name ever appears in them.  P2PFT_DEBUG=1 adds debug lines."
)


class _LogFormatOptions(_Options):
    """What the console script adds to a server's options: its log format
    (under twistd, twistd's own --logger chooses: p2pft.logs.stderr_json for
    JSON lines)."""

    def __init__(self) -> None:
        super().__init__()
        self["log-format"] = "text"

    def opt_log_format(self, value: str) -> None:
        """text (human lines) or json (one JSON object per line, for log shippers) [default: text]."""
        from ..logs import FORMATS

        if value not in FORMATS:
            raise usage.UsageError(f"--log-format takes text or json, not {value!r}")
        self["log-format"] = value


class ServerCommandOptions(ServerOptions, _LogFormatOptions):
    """C{p2pft server}."""

    synopsis = ServerOptions.synopsis.replace(" [relay limits]", " [--log-format text|json] [relay limits]")
    longdesc = ServerOptions.longdesc + LOG_NOTE


class RelayCommandOptions(RelayOptions, _LogFormatOptions):
    """C{p2pft relay}."""

    synopsis = RelayOptions.synopsis.replace(" [relay limits]", " [--log-format text|json] [relay limits]")
    longdesc = RelayOptions.longdesc + LOG_NOTE
