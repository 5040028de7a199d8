"""
The rendezvous layer, client side: the line protocol that introduces two
peers, as a peer speaks it, and the wire helpers both sides use (the
protocol's name and version, line and message limits, the payload codec,
HOST:PORT parsing).  The server is L{p2pft.server.rendezvous}; it imports
these, never the other way round.

The server allocates short nameplates, pairs exactly two connections per
nameplate, tells each connection the address it sees it from, and forwards
opaque messages between the two members of a pair.  It knows nothing about
files, keys or candidates.  The wire format is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import LineReceiver

from .codes import valid_nameplate
from .errors import P2pftError
from .util import OneShot, no_delay, printable

PROTOCOL_NAME = "p2pft"
PROTOCOL_VERSION = "1"

#: Longest line either side accepts, delimiter excluded.
MAX_LINE = 8192
#: Largest opaque message payload (decoded bytes).
MAX_MESSAGE = 4096
#: The largest seconds a REPORT line carries (both sides apply it): a day,
#: far beyond any real session's time to connect, so that one hostile
#: report cannot add much to the server's connect-time sum.
MAX_REPORT_SECONDS = 86400.0

_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


class RendezvousError(P2pftError):
    """The rendezvous server refused us, or the conversation broke."""


class PeerGone(RendezvousError):
    """The other member of our pair left the rendezvous server."""


def encode_payload(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def decode_payload(text: str) -> bytes:
    if len(text) > (MAX_MESSAGE * 4) // 3 + 4 or not _B64.match(text):
        raise ValueError("malformed message payload")
    try:
        payload = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError("malformed message payload") from e
    if len(payload) > MAX_MESSAGE:
        raise ValueError("message too large")
    return payload



class RendezvousClientProtocol(LineReceiver):
    """
    The client side, with a Deferred API for linear session code::

        host, port = await client.welcomed
        nameplate = await client.allocate()     # or: await client.claim("7")
        await client.paired
        client.send(b"...");  payload = await client.receive()

    Any ERROR line or a lost connection fails every pending and future
    Deferred with L{RendezvousError}.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    #: Relays the server advertised: "*" (the server itself) or "HOST:PORT".
    relays: list[str] = []
    #: Where the server sees our partner from (host, port), as its PAIRED
    #: said; None from a server that does not say (before p2pft 0.5).
    partner: tuple[str, int] | None = None
    #: What tells the time (an IReactorTime), set by whoever builds the
    #: protocol (L{RendezvousClientFactory}); None: round trips are not
    #: measured.
    clock = None
    #: The shortest round trip to the server seen so far, seconds: from the
    #: connection's establishment to WELCOME (the server sends it as it
    #: accepts, so one round trip) and from each PING to its PONG; None
    #: until measured.  For timed punching (docs/PROTOCOL.md section 2).
    rtt: float | None = None

    def __init__(self) -> None:
        self._welcomed = OneShot()
        self._paired = OneShot()
        self._closed = OneShot()
        self._allocated: defer.Deferred | None = None
        self._inbox: list[bytes] = []
        self._readers: list[defer.Deferred] = []
        self._failure: RendezvousError | None = None
        self._pongs: dict[str, defer.Deferred] = {}
        self._pinged: dict[str, float] = {}  # token -> when its PING left
        self._made: float | None = None

    def _sample(self, since: float | None) -> None:
        """One round trip measured: from C{since} (clock seconds) to now."""
        if self.clock is None or since is None:
            return
        seconds = max(0.0, self.clock.seconds() - since)
        self.rtt = seconds if self.rtt is None else min(self.rtt, seconds)

    # -- API

    def welcomed(self) -> defer.Deferred:
        """Fires with the (host, port) the server sees us as."""
        return self._welcomed.when()

    def paired(self) -> defer.Deferred:
        """Fires when a partner joined our nameplate."""
        return self._paired.when()

    def allocate(self) -> defer.Deferred:
        self._allocated = defer.Deferred()
        self.sendLine(b"ALLOCATE")
        return self._allocated

    def claim(self, nameplate: str) -> None:
        self.sendLine(f"CLAIM {nameplate}".encode("ascii"))

    def send(self, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE:
            raise ValueError("message too large for the rendezvous server")
        self.sendLine(f"MSG {encode_payload(payload)}".encode("ascii"))

    def receive(self) -> defer.Deferred:
        if self._inbox:
            return defer.succeed(self._inbox.pop(0))
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred(lambda d: self._readers.remove(d) if d in self._readers else None)
        self._readers.append(d)
        return d

    def report(self, path: str, seconds: float) -> None:
        """Tell the server how this session connected (C{direct} or
        C{relay}, C{seconds} from PAIRED to the chosen connection): the
        sender's last line, just before it closes (docs/PROTOCOL.md section
        1).  A server without REPORT answers ERROR, which nobody awaits
        any more: harmless."""
        self.sendLine(f"REPORT {path} {max(0.0, min(seconds, MAX_REPORT_SECONDS)):.3f}".encode("ascii"))

    def ping(self, token: str = "p2pft") -> defer.Deferred:
        """Send PING C{token}; fires when the matching PONG comes back."""
        if self._failure is not None:
            return defer.fail(self._failure)
        if token not in self._pongs and self.clock is not None:
            self._pinged[token] = self.clock.seconds()
        d = self._pongs.setdefault(token, defer.Deferred())
        self.sendLine(f"PING {token}".encode("ascii"))
        return d

    def close(self) -> defer.Deferred:
        """Close after flushing; fires once the connection is gone."""
        self.transport.loseConnection()
        return self._closed.when()

    # -- protocol

    def connectionMade(self) -> None:
        no_delay(self.transport)  # PING's round trip is measured: no waiting behind an ACK
        if self.clock is not None:
            self._made = self.clock.seconds()

    def lineReceived(self, line: bytes) -> None:
        try:
            command, _, rest = line.rstrip(b"\r").decode("utf-8").partition(" ")
        except UnicodeDecodeError:
            return self._fail(RendezvousError("server sent a line that is not UTF-8"))
        if command == "WELCOME":
            self._welcome(rest)
        elif command == "NAMEPLATE" and self._allocated is not None:
            if not valid_nameplate(rest):
                # It becomes part of the code we print and the command line
                # we tell the user to run: a number, or nothing.
                self._fail(RendezvousError("server sent a malformed NAMEPLATE"))
                self.transport.loseConnection()
                return
            d, self._allocated = self._allocated, None
            d.callback(rest)
        elif command == "PAIRED":
            self.partner = _address(rest)
            self._paired.fire(None)
        elif command == "MSG":
            try:
                payload = decode_payload(rest)
            except ValueError:
                return self._fail(RendezvousError("server sent a malformed message"))
            if self._readers:
                self._readers.pop(0).callback(payload)
            else:
                self._inbox.append(payload)
        elif command == "GONE":
            self._fail(PeerGone("the other side left the rendezvous server"))
        elif command == "ERROR":
            self._fail(RendezvousError(f"server: {printable(rest, 200)}"))
            self.transport.loseConnection()
        elif command == "PONG":
            self._sample(self._pinged.pop(rest, None))
            d = self._pongs.pop(rest, None)
            if d is not None:
                d.callback(None)
        else:
            self._fail(RendezvousError(f"server sent unknown {printable(command, 32)!r}"))
            self.transport.loseConnection()

    def _welcome(self, rest: str) -> None:
        parts = rest.split(" ")
        if self._welcomed.done:
            return
        if len(parts) == 4:
            parts.append("-")
        if len(parts) != 5 or parts[0] != PROTOCOL_NAME or parts[1] != PROTOCOL_VERSION:
            self._fail(RendezvousError("not a p2pft rendezvous server (or another version)"))
            self.transport.loseConnection()
            return
        try:
            if "%" in parts[2] or not (parts[3].isascii() and parts[3].isdigit()):
                raise ValueError("scoped address or odd port")
            host, port = str(ipaddress.ip_address(parts[2])), int(parts[3])
            if not 0 < port < 65536:
                raise ValueError("port out of range")
            # Checked where they are used (p2pft.candidates.relays): a bad
            # one is ignored there, with a warning, and the rest still serve.
            relays = [] if parts[4] == "-" else parts[4].split(",")[:8]
        except ValueError:
            self._fail(RendezvousError("server sent a malformed WELCOME"))
            self.transport.loseConnection()
            return
        self.relays = relays
        self._sample(self._made)
        self._welcomed.fire((host, port))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(RendezvousError("server sent an overlong line"))
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._fail(RendezvousError("lost the connection to the rendezvous server"))
        self._closed.fire(None)

    def _fail(self, error: RendezvousError) -> None:
        if self._failure is None:
            self._failure = error
        self._welcomed.fail(error)
        self._paired.fail(error)
        pending = [self._allocated] + self._readers + list(self._pongs.values())
        self._readers = []
        self._pongs = {}
        self._allocated = None
        for d in pending:
            if d is not None and not d.called:
                d.errback(error)


class RendezvousClientFactory(ClientFactory):
    """Builds L{RendezvousClientProtocol}s that measure their round trips
    with C{clock}."""

    protocol = RendezvousClientProtocol

    def __init__(self, clock):
        self.clock = clock

    def buildProtocol(self, addr):
        client = super().buildProtocol(addr)
        client.clock = self.clock
        return client


def _address(text: str) -> tuple[str, int] | None:
    """C{"HOST PORT"} (an IP literal and a port) as a tuple; None for
    anything else (nothing, or a malformed one: ignored, as an older
    server's bare PAIRED)."""
    parts = text.split(" ")
    if len(parts) != 2 or "%" in parts[0] or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    try:
        host, port = str(ipaddress.ip_address(parts[0])), int(parts[1])
    except ValueError:
        return None
    return (host, port) if 0 < port < 65536 else None


def parse_server(text: str) -> tuple[str, int]:
    """Parse C{HOST:PORT} or C{[V6]:PORT}; raise ValueError with a reason."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"server must be HOST:PORT, not {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


async def ping(reactor, server: tuple[str, int], timeout: float) -> tuple[str, float]:
    """
    C{p2pft ping}: connect to C{server}, read its WELCOME, send PING, wait
    for the PONG, close; all within C{timeout} seconds.  Fire with the
    protocol version and the seconds it took, or fail with
    L{RendezvousError} and one line.
    """
    from twisted.internet import error
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.protocol import ClientFactory

    host, port = server
    start = reactor.seconds()

    async def exchange():
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        client = await endpoint.connect(ClientFactory.forProtocol(RendezvousClientProtocol))
        try:
            await client.welcomed()
            await client.ping("healthcheck")
        finally:
            client.transport.loseConnection()

    d = defer.ensureDeferred(exchange())
    d.addTimeout(timeout, reactor)
    try:
        await d
    except defer.TimeoutError:
        raise RendezvousError(f"no answer within {timeout:g} s") from None
    except (error.ConnectError, error.DNSLookupError) as e:
        why = {error.ConnectionRefusedError: "connection refused", error.DNSLookupError: "name not found"}.get(
            type(e), printable(str(e), 200))
        raise RendezvousError(f"cannot connect: {why}") from None
    return PROTOCOL_VERSION, reactor.seconds() - start
