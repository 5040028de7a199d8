"""
The rendezvous layer: a line-based protocol that introduces two peers.

The server allocates short nameplates, pairs exactly two connections per
nameplate, tells each connection the address it sees it from, and forwards
opaque messages between the two members of a pair.  It knows nothing about
files, keys or candidates.  The wire format is in docs/PROTOCOL.md.

The rules live in L{RendezvousServer}, a plain object driven through method
calls and a clock; L{RendezvousServerProtocol} only turns lines into those
calls and calls into lines.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import Interface, implementer

from .addresses import ip_key
from .codes import valid_nameplate
from .server.limits import FIRST_LINE_MIN_WAIT, ClaimLimiter, Lobby
from .server.relay import RelayMixin, RelayServer
from .util import OneShot

PROTOCOL_NAME = "p2pft"
PROTOCOL_VERSION = "1"

#: Longest line either side accepts, delimiter excluded.
MAX_LINE = 8192
#: Largest opaque message payload (decoded bytes).
MAX_MESSAGE = 4096
#: Messages one connection may send through the server.
MAX_MESSAGES = 64

_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")

# Claims.  The only claim that can spoil somebody's code is one that joins
# a nameplate a peer at another address is waiting on: the claimer gets one
# SPAKE2 guess at that peer's code, and a wrong guess burns it.  Those
# claims are metered per address key (an IPv4 address, or an IPv6 /64:
# L{ip_key}) with a token bucket; joining a nameplate first taken from the
# same address key, or creating one, is free.

#: Claims of other addresses' nameplates one address key may make at once.
#: Sized for many real users behind one IPv4 address (an office NAT, a
#: carrier-grade NAT, a classroom): 30 people all typing a code within the
#: same minute.
CLAIM_BURST = 30
#: ...then this many a second (12 a minute), sustained.  A pairing whose two
#: members go on to confirm the key gives its claim back, so real users,
#: whose pairings confirm unless someone mistyped a code, are held back
#: only by how many of their claims are still being confirmed at once.
CLAIM_RATE = 0.2
#: What a pairing that ends without confirming costs its claimer in all,
#: the claim's own token included: a wrong code, an abandoned pairing, an
#: attacker's guess.  At CLAIM_RATE an address pays for one failure every
#: 25 s, 144 an hour.
UNCONFIRMED_CLAIM_COST = 5
#: The deepest an address's claims can go into debt: after a burst of
#: failures it may claim again within (1 + CLAIM_DEBT) / CLAIM_RATE = 155 s.
CLAIM_DEBT = 30
#: MSGs each member of a pair has sent once the key is confirmed: the
#: SPAKE2 message, the key confirmation, and the candidates, which a peer
#: sends only after its partner's confirmation opened (PROTOCOL.md §2), so
#: nobody who lacks the code can make a peer send its third.
CONFIRMED_MESSAGES = 3
#: Address keys whose claims are remembered at once, beyond those whose
#: buckets have refilled (forgotten anyway): about 400 bytes each, 40 MB
#: in all (measured with IPv6 keys).
MAX_CLAIM_KEYS = 100_000
#: At most this share of --max-connections may be connections that have not
#: said their first line yet (see L{Lobby}); the rest stays for clients on
#: nameplates.  But at least LOBBY_MIN (or all of them, on a server
#: allowed fewer), so a small server is not starved of new clients.
LOBBY_SHARE = 0.25
LOBBY_MIN = 100


class RendezvousError(Exception):
    """The rendezvous server refused us, or the conversation broke."""


class PeerGone(RendezvousError):
    """The other member of our pair left the rendezvous server."""


def normalise_host(host: str) -> str:
    """Turn an IPv4-mapped IPv6 address (dual-stack listener) into IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


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


# --------------------------------------------------------------------------
# Server


class IRendezvousConnection(Interface):
    """What the server state needs from one client connection."""

    def sendLine(line: bytes) -> None:
        "Send one protocol line."

    def refuse(reason: str) -> None:
        "Send ERROR with the reason and close the connection."


@attrs.define(eq=False)
class _Nameplate:
    name: str
    members: list
    timer: IDelayedCall | None = None
    #: Once two members met, the nameplate never takes another one.
    paired: bool = False
    expired: bool = False
    #: The address key of the member that took the nameplate first.
    owner: str = ""
    #: The address key that paid for joining it, until the pair confirms
    #: (refunded) or breaks up unconfirmed (charged the rest).
    claimer: str | None = None


@attrs.define(eq=False)
class _Member:
    connection: IRendezvousConnection
    ip: str = ""
    nameplate: _Nameplate | None = None
    messages: int = 0
    timer: IDelayedCall | None = None


class RendezvousServer:
    """
    Every nameplate and every connection of one rendezvous server.

    A connection is C{connected} (said nothing yet), then C{waiting} on a
    nameplate, then C{paired}.  A nameplate lives from its first member until
    both of its members are gone or its timer fires; meanwhile nobody else may
    join it.

    @param hello_timeout: seconds a new connection may stay without joining.
    @param waiting_timeout: seconds one member may wait for its partner.
    @param paired_timeout: seconds a pair may keep using the server.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        hello_timeout: float = 60,
        waiting_timeout: float = 3600,
        paired_timeout: float = 600,
        max_nameplates: int = 100_000,
        max_connections: int = 20_000,
        max_per_ip: int = 64,
    ):
        self._clock = clock
        self.hello_timeout = hello_timeout
        self.waiting_timeout = waiting_timeout
        self.paired_timeout = paired_timeout
        self.max_nameplates = max_nameplates
        #: Connections that have not sent ALLOCATE, CLAIM or RELAY yet.
        self.lobby = Lobby(clock, 1, hello_timeout, FIRST_LINE_MIN_WAIT)
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.claims = ClaimLimiter(clock, CLAIM_BURST, CLAIM_RATE, -CLAIM_DEBT, MAX_CLAIM_KEYS)
        self._nameplates: dict[str, _Nameplate] = {}
        self._members: dict[IRendezvousConnection, _Member] = {}
        self._per_ip: dict[str, int] = {}
        self.pairings = 0

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @max_connections.setter
    def max_connections(self, n: int) -> None:
        self._max_connections = n
        self.lobby.capacity = max(1, int(n * LOBBY_SHARE), min(n, LOBBY_MIN))

    # -- what connections tell us

    def connected(self, conn: IRendezvousConnection, ip: str = "") -> None:
        """A new connection from C{ip}; refused when the server or that
        address already holds too many."""
        if len(self._members) >= self.max_connections:
            return conn.refuse("server is busy, try again later")
        if self._per_ip.get(ip, 0) >= self.max_per_ip:
            return conn.refuse("too many connections from your address")
        if not self.lobby.enter(conn, lambda: conn.refuse("timed out waiting for ALLOCATE or CLAIM")):
            return conn.refuse("server is busy, try again later")
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        member = _Member(conn, ip=ip)
        member.timer = self._clock.callLater(
            self.hello_timeout, conn.refuse, "timed out waiting for ALLOCATE or CLAIM"
        )
        self._members[conn] = member

    def allocate(self, conn: IRendezvousConnection) -> None:
        self.lobby.leave(conn)
        member = self._members[conn]
        if member.nameplate is not None:
            return conn.refuse("already on a nameplate")
        name = self._free_nameplate()
        if name is None:
            return conn.refuse("server is full, try again later")
        conn.sendLine(f"NAMEPLATE {name}".encode("ascii"))
        self._join(member, name)

    def claim(self, conn: IRendezvousConnection, name: str) -> None:
        self.lobby.leave(conn)
        member = self._members[conn]
        if member.nameplate is not None:
            return conn.refuse("already on a nameplate")
        if not valid_nameplate(name):
            return conn.refuse("invalid nameplate")
        nameplate = self._nameplates.get(name)
        if nameplate is not None and nameplate.paired:
            return conn.refuse(f"nameplate {name} is in use")
        if nameplate is None and len(self._nameplates) >= self.max_nameplates:
            return conn.refuse("server is full, try again later")
        if nameplate is not None and nameplate.owner != member.ip:
            # A guess at a stranger's code: it costs, and costs more unless
            # the pair goes on to confirm the key.
            if not self.claims.try_take(member.ip):
                return conn.refuse("too many claims from your address, try again later")
            nameplate.claimer = member.ip
        self._join(member, name)

    def message(self, conn: IRendezvousConnection, payload: str) -> None:
        member = self._members[conn]
        nameplate = member.nameplate
        if nameplate is None or not nameplate.paired:
            return conn.refuse("MSG before PAIRED")
        member.messages += 1
        if member.messages > MAX_MESSAGES:
            return conn.refuse("too many messages")
        for other in nameplate.members:
            if other is not member:
                other.connection.sendLine(f"MSG {payload}".encode("ascii"))
        if nameplate.claimer is not None and all(
            m.messages >= CONFIRMED_MESSAGES for m in nameplate.members
        ):
            # Both confirmed the key: that claim was no guess.
            self.claims.refund(nameplate.claimer, 1)
            nameplate.claimer = None

    def disconnected(self, conn: IRendezvousConnection) -> None:
        self.lobby.leave(conn)
        member = self._members.pop(conn, None)
        if member is None:
            return
        left = self._per_ip.get(member.ip, 1) - 1
        if left:
            self._per_ip[member.ip] = left
        else:
            self._per_ip.pop(member.ip, None)
        _cancel(member.timer)
        nameplate = member.nameplate
        if nameplate is None:
            return
        if nameplate.paired and nameplate.claimer is not None:
            # The pair broke up (or expired) before confirming the key.
            self.claims.charge(nameplate.claimer, UNCONFIRMED_CLAIM_COST - 1)
            nameplate.claimer = None
        nameplate.members.remove(member)
        if not nameplate.members:
            _cancel(nameplate.timer)
            del self._nameplates[nameplate.name]
            self.log.debug("freed nameplate {name}", name=nameplate.name)
        elif nameplate.paired and not nameplate.expired:
            # The pair is broken; nobody may take the empty seat.
            for other in nameplate.members:
                other.connection.sendLine(b"GONE")

    # -- state

    @property
    def nameplates(self) -> frozenset[str]:
        return frozenset(self._nameplates)

    @property
    def connections(self) -> int:
        return len(self._members)

    # -- internals

    def _free_nameplate(self) -> str | None:
        if len(self._nameplates) >= self.max_nameplates:
            return None
        n = 1
        while str(n) in self._nameplates:
            n += 1
        return str(n)

    def _join(self, member: _Member, name: str) -> None:
        _cancel(member.timer)
        member.timer = None
        nameplate = self._nameplates.get(name)
        if nameplate is None:
            nameplate = self._nameplates[name] = _Nameplate(name, [], owner=member.ip)
            nameplate.timer = self._clock.callLater(
                self.waiting_timeout, self._expire, nameplate,
                "nobody claimed the nameplate in time",
            )
        nameplate.members.append(member)
        member.nameplate = nameplate
        if len(nameplate.members) == 2:
            nameplate.paired = True
            _cancel(nameplate.timer)
            nameplate.timer = self._clock.callLater(
                self.paired_timeout, self._expire, nameplate, "pairing lasted too long"
            )
            self.pairings += 1
            self.log.info("paired nameplate {name}", name=name)
            for m in nameplate.members:
                m.connection.sendLine(b"PAIRED")

    def _expire(self, nameplate: _Nameplate, reason: str) -> None:
        nameplate.timer = None
        nameplate.expired = True
        for member in list(nameplate.members):
            member.connection.refuse(reason)


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


@implementer(IRendezvousConnection, IPushProducer, IHalfCloseableProtocol)
class RendezvousServerProtocol(RelayMixin, LineReceiver):
    """
    One client connection: parse lines, hand them to L{RendezvousServer}.

    It registers itself as the producer of its own transport's output, so
    when a client stops reading (and replies pile up past the transport's
    buffer size) the server stops reading that client's input: a client
    can never make the server buffer without bound.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    log = Logger()
    _closing = False
    _abort_timer = None
    _lines = 0

    def connectionMade(self) -> None:
        self.state: RendezvousServer = self.factory.state
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        host = normalise_host(peer.host)
        self.sendLine(
            f"WELCOME {PROTOCOL_NAME} {PROTOCOL_VERSION} {host} {peer.port} "
            f"{self.factory.advertised_relays}".encode()
        )
        self.state.connected(self, ip_key(host))

    # IPushProducer: our output is backed up / drained.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        self._lines += 1
        try:
            text = line.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            return self.refuse("line is not UTF-8")
        words = text.split(" ")
        command, args = words[0], words[1:]
        if command == "ALLOCATE" and not args:
            self.state.allocate(self)
        elif command == "CLAIM" and len(args) == 1:
            self.state.claim(self, args[0])
        elif command == "MSG" and len(args) == 1:
            try:
                decode_payload(args[0])
            except ValueError as e:
                return self.refuse(str(e))
            self.state.message(self, args[0])
        elif command == "PING" and len(args) <= 1:
            self.sendLine(" ".join(["PONG"] + args).encode("utf-8"))
        elif command == "RELAY" and self.factory.relay is not None:
            if self._lines != 1:
                return self.refuse("RELAY must be the first line")
            # This connection is a relay leg, not a rendezvous client.
            self.state.disconnected(self)
            self.relayStart(args)
        else:
            self.refuse(f"unknown command {_printable(command)!r}")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse("line too long")

    def refuse(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.log.info(
            "refusing {peer}: {reason}", peer=self.transport.getPeer(), reason=reason
        )
        self.sendLine(f"ERROR {reason}".encode("utf-8"))
        # Out of every nameplate and count at once, not when the close ends.
        self.state.disconnected(self)
        # A client that stops reading must not hold its socket: abort after
        # a grace period if the close does not complete.
        self._abort_timer = self.factory.clock.callLater(10, self.transport.abortConnection)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        _cancel(self._abort_timer)
        self.state.disconnected(self)
        self.relayLost()


def _printable(text: str, limit: int = 32) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class RendezvousServerFactory(Factory):
    """
    @param relay: a L{RelayServer} to also serve C{RELAY} connections on
        this port (C{p2pft server --relay}), or None.
    @param relays: relay addresses to advertise in WELCOME: C{"*"} means
        this server's own address and port, others are C{HOST:PORT}.
    """

    protocol = RendezvousServerProtocol

    def __init__(self, clock: IReactorTime, relay: RelayServer | None = None,
                 relays: tuple[str, ...] = (), **options):
        self.clock = clock
        self.relay = relay
        self.advertised_relays = ",".join(relays) if relays else "-"
        self.state = RendezvousServer(clock, **options)


# --------------------------------------------------------------------------
# Client


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

    def __init__(self) -> None:
        self._welcomed = OneShot()
        self._paired = OneShot()
        self._closed = OneShot()
        self._allocated: defer.Deferred | None = None
        self._inbox: list[bytes] = []
        self._readers: list[defer.Deferred] = []
        self._failure: RendezvousError | None = None

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

    def close(self) -> defer.Deferred:
        """Close after flushing; fires once the connection is gone."""
        self.transport.loseConnection()
        return self._closed.when()

    # -- protocol

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
            self._fail(RendezvousError(f"server: {_printable(rest, 200)}"))
            self.transport.loseConnection()
        elif command == "PONG":
            pass
        else:
            self._fail(RendezvousError(f"server sent unknown {_printable(command)!r}"))
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
            relays = [] if parts[4] == "-" else parts[4].split(",")[:8]
            for spec in relays:
                if spec != "*":
                    _check_advertised_relay(spec)
        except ValueError:
            self._fail(RendezvousError("server sent a malformed WELCOME"))
            self.transport.loseConnection()
            return
        self.relays = relays
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
        pending = [self._allocated] + self._readers
        self._readers = []
        self._allocated = None
        for d in pending:
            if d is not None and not d.called:
                d.errback(error)


#: A host name a server may advertise as a relay: ASCII letters, digits,
#: hyphens and dots (RFC 1123; IDNs in their xn-- form), 253 at most.  It
#: reaches the user's terminal in error messages, so nothing else.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


def _check_advertised_relay(spec: str) -> None:
    """Raise ValueError unless C{spec} is C{HOST:PORT} with an IP literal
    (no scope) or a plain host name."""
    host, _ = parse_server(spec)
    if "%" in host or spec != spec.strip():
        raise ValueError("malformed relay")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError("malformed relay host") from None


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

