"""
The rendezvous server: allocates nameplates, pairs exactly two connections
per nameplate, tells each connection the address it sees it from, and
forwards opaque messages between the two members of a pair (the client side
and the wire helpers are L{p2pft.rendezvous}; the format is in
docs/PROTOCOL.md).

The rules live in L{RendezvousServer}, a plain object driven through method
calls and a clock; L{RendezvousServerProtocol} only turns lines into those
calls and calls into lines.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from zope.interface import Interface, implementer

from ..addresses import ip_key, normalise_host
from ..codes import valid_nameplate
from ..rendezvous import MAX_LINE, MAX_REPORT_SECONDS, PROTOCOL_NAME, PROTOCOL_VERSION, decode_payload
from ..util import cancel as _cancel, no_delay, printable
from .events import NO_EVENTS, PATHS, IServerEvents, Refusal
from .limits import CLOSE_GRACE, FIRST_LINE_MIN_WAIT, AddressCounts, Lobby
from .nameplates import ClaimMeter, Member, Nameplates
from .relay import Leg, RelayServer
from .splice import TransportLeg

#: Messages one connection may send through the server.
MAX_MESSAGES = 64

#: A peer's REPORT seconds: a decimal number with at most 3 decimals (ms),
#: at most L{MAX_REPORT_SECONDS}.
_REPORT_SECONDS = re.compile(r"(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?\Z")

#: At most this share of --max-connections may be connections that have not
#: said their first line yet (see L{Lobby}); the rest stays for clients on
#: nameplates.  But at least LOBBY_MIN (or all of them, on a server
#: allowed fewer), so a small server is not starved of new clients.
LOBBY_SHARE = 0.25
LOBBY_MIN = 100


def lobby_places(max_connections: int) -> int:
    """Places in the lobby of a server allowed C{max_connections}."""
    return max(1, int(max_connections * LOBBY_SHARE), min(max_connections, LOBBY_MIN))


class IRendezvousConnection(Interface):
    """What the server state needs from one client connection."""

    def sendLine(line: bytes) -> None:
        "Send one protocol line."

    def refuse(reason: str) -> None:
        """Send ERROR with the reason and close the connection (the server's
        decisions come through L{RendezvousServer.refuse}, which tells the
        events observer)."""


class RendezvousServer:
    """
    Every connection of one rendezvous server, and its nameplates
    (L{Nameplates}).

    A connection is C{connected} (said nothing yet), then C{waiting} on a
    nameplate, then C{paired}.  A nameplate lives from its first member until
    both of its members are gone or its timer fires; meanwhile nobody else may
    join it.

    @param hello_timeout: seconds a new connection may stay without joining.
    @param waiting_timeout: seconds one member may wait for its partner.
    @param paired_timeout: seconds a pair may keep using the server.
    """

    def __init__(
        self,
        clock: IReactorTime,
        hello_timeout: float = 60,
        waiting_timeout: float = 3600,
        paired_timeout: float = 600,
        max_nameplates: int = 100_000,
        max_connections: int = 20_000,
        max_per_ip: int = 64,
        events: IServerEvents = NO_EVENTS,
    ):
        self._clock = clock
        self.events = events
        self.hello_timeout = hello_timeout
        #: Connections that have not sent ALLOCATE, CLAIM or RELAY yet.
        self.lobby = Lobby(clock, lambda: lobby_places(self.max_connections), hello_timeout,
                           FIRST_LINE_MIN_WAIT)
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.claims = ClaimMeter(clock)
        self._nameplates = Nameplates(clock, max_nameplates, waiting_timeout, paired_timeout, events)
        self._members: dict[IRendezvousConnection, Member] = {}
        self._per_ip = AddressCounts()

    # -- what connections tell us

    def connected(self, conn: IRendezvousConnection, ip: str = "",
                  observed: tuple[str, int] | None = None) -> None:
        """A new connection from C{ip} (its address key), seen from
        C{observed} (host, port: told to its partner in PAIRED); refused
        when the server or that address already holds too many."""
        self.events.connected(ip)
        if len(self._members) >= self.max_connections:
            return self.refuse(conn, Refusal.BUSY, ip)
        if self._per_ip.full(ip, self.max_per_ip):
            return self.refuse(conn, Refusal.PER_IP, ip)
        if not self.lobby.enter(conn, lambda: self.refuse(conn, Refusal.HELLO_TIMEOUT, ip)):
            return self.refuse(conn, Refusal.BUSY, ip)
        self._per_ip.add(ip)
        member = Member(conn, ip=ip, observed=observed)
        member.timer = self._clock.callLater(self.hello_timeout, self.refuse, conn, Refusal.HELLO_TIMEOUT, ip)
        self._members[conn] = member

    def allocate(self, conn: IRendezvousConnection) -> None:
        self.lobby.leave(conn)
        member = self._members[conn]
        if member.nameplate is not None:
            return self.refuse(conn, Refusal.ALREADY_ON_NAMEPLATE, member.ip)
        name = self._nameplates.free_name()
        if name is None:
            return self.refuse(conn, Refusal.FULL, member.ip)
        conn.sendLine(f"NAMEPLATE {name}".encode("ascii"))
        self._join(member, name)

    def claim(self, conn: IRendezvousConnection, name: str) -> None:
        self.lobby.leave(conn)
        member = self._members[conn]
        if member.nameplate is not None:
            return self.refuse(conn, Refusal.ALREADY_ON_NAMEPLATE, member.ip)
        if not valid_nameplate(name):
            return self.refuse(conn, Refusal.INVALID_NAMEPLATE, member.ip)
        nameplate = self._nameplates.get(name)
        if nameplate is not None and nameplate.paired:
            return self.refuse(conn, Refusal.NAMEPLATE_IN_USE, member.ip, name=name)
        if nameplate is None and self._nameplates.full():
            return self.refuse(conn, Refusal.FULL, member.ip)
        if not self.claims.claim(nameplate, member.ip):
            return self.refuse(conn, Refusal.CLAIM_RATE, member.ip)
        self._join(member, name)

    def message(self, conn: IRendezvousConnection, payload: str) -> None:
        member = self._members[conn]
        nameplate = member.nameplate
        if nameplate is None or not nameplate.paired:
            return self.refuse(conn, Refusal.MSG_BEFORE_PAIRED, member.ip)
        member.messages += 1
        if member.messages > MAX_MESSAGES:
            return self.refuse(conn, Refusal.TOO_MANY_MESSAGES, member.ip)
        for other in nameplate.members:
            if other is not member:
                other.connection.sendLine(f"MSG {payload}".encode("ascii"))
        self.claims.messaged(nameplate)

    def report(self, conn: IRendezvousConnection, path: str, seconds: str) -> None:
        """A peer's REPORT: how its session connected.  Once per member,
        after PAIRED; counted as the peer says (nothing can check it)."""
        member = self._members[conn]
        if member.nameplate is None or not member.nameplate.paired:
            return self.refuse(conn, Refusal.BAD_REPORT, member.ip, detail="REPORT before PAIRED")
        if member.reported:
            return self.refuse(conn, Refusal.BAD_REPORT, member.ip, detail="one REPORT per connection")
        if path not in PATHS or not _REPORT_SECONDS.match(seconds) or float(seconds) > MAX_REPORT_SECONDS:
            return self.refuse(conn, Refusal.BAD_REPORT, member.ip, detail="malformed REPORT")
        member.reported = True
        self.events.peerReport(path, float(seconds))

    def refuse(self, conn: IRendezvousConnection, why: Refusal, ip: str, **fields) -> None:
        """Refuse C{conn} (from address key C{ip}): tell the events
        observer why, and the client (the ERROR line's text, with
        C{fields}, goes to the client only)."""
        self.events.refused(why, ip)
        conn.refuse(why.message(**fields))

    def disconnected(self, conn: IRendezvousConnection) -> None:
        self.lobby.leave(conn)
        member = self._members.pop(conn, None)
        if member is None:
            return
        self._per_ip.remove(member.ip)
        _cancel(member.timer)
        if member.nameplate is not None:
            self.claims.parted(member.nameplate)
            self._nameplates.leave(member)

    # -- state

    @property
    def nameplates(self) -> frozenset[str]:
        return self._nameplates.names

    @property
    def connections(self) -> int:
        return len(self._members)

    @property
    def nameplates_in_use(self) -> int:
        return len(self._nameplates)

    @property
    def pairings(self) -> int:
        return self._nameplates.pairings

    def _join(self, member: Member, name: str) -> None:
        _cancel(member.timer)
        member.timer = None
        self._nameplates.join(member, name)


@implementer(IRendezvousConnection, IPushProducer, IHalfCloseableProtocol)
class RendezvousServerProtocol(LineReceiver):
    """
    One client connection: parse lines, hand them to L{RendezvousServer}.

    It registers itself as the producer of its own transport's output, so
    when a client stops reading (and replies pile up past the transport's
    buffer size) the server stops reading that client's input: a client
    can never make the server buffer without bound.

    A connection whose first line is C{RELAY} (on a server with a relay)
    is handed to the relay: from then on its bytes, its half-close and its
    loss go to the L{RelayServer}'s record of it.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    _closing = False
    _ip = ""
    _abort_timer = None
    _lines = 0
    #: The relay's record of this connection, once it said RELAY.
    _leg: Leg | None = None

    def connectionMade(self) -> None:
        self.state: RendezvousServer = self.factory.state
        no_delay(self.transport)
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        host = normalise_host(peer.host)
        self.sendLine(
            f"WELCOME {PROTOCOL_NAME} {PROTOCOL_VERSION} {host} {peer.port} "
            f"{self.factory.advertised_relays}".encode()
        )
        self._ip = ip_key(host)
        self.state.connected(self, self._ip, (host, peer.port))

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
            return self._refuse(Refusal.NOT_UTF8)
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
                return self._refuse(Refusal.BAD_MESSAGE, detail=str(e))
            self.state.message(self, args[0])
        elif command == "REPORT" and len(args) == 2:
            self.state.report(self, args[0], args[1])
        elif command == "PING" and len(args) <= 1:
            self.sendLine(" ".join(["PONG"] + args).encode("utf-8"))
        elif command == "RELAY" and self.factory.relay is not None:
            if self._lines != 1:
                return self._refuse(Refusal.RELAY_NOT_FIRST)
            # This connection is a relay leg, not a rendezvous client.
            self.state.disconnected(self)
            self._relay: RelayServer = self.factory.relay
            self._leg = self._relay.adopt(TransportLeg(self.transport))
            if self._relay.request(self._leg, args):
                self.setRawMode()
        else:
            self._refuse(Refusal.UNKNOWN_COMMAND, command=printable(command, 32))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(Refusal.LINE_TOO_LONG)

    def _refuse(self, why: Refusal, **fields) -> None:
        """A line this protocol cannot take: the server's refusal."""
        if not self._closing:
            self.state.refuse(self, why, self._ip, **fields)

    def refuse(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.sendLine(f"ERROR {reason}".encode("utf-8"))
        # Out of every nameplate and count at once, not when the close ends.
        self.state.disconnected(self)
        # A client that stops reading must not hold its socket: abort after
        # a grace period if the close does not complete.
        self._abort_timer = self.factory.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        _cancel(self._abort_timer)
        self.state.disconnected(self)
        if self._leg is not None:
            self._relay.lost(self._leg)

    def rawDataReceived(self, data: bytes) -> None:
        self._relay.received(self._leg, data)

    def readConnectionLost(self) -> None:
        # IHalfCloseableProtocol: the peer shut its sending side.
        if self._leg is not None:
            self._relay.readClosed(self._leg)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class RendezvousServerFactory(Factory):
    """
    @param relay: a L{RelayServer} to also serve C{RELAY} connections on
        this port (C{p2pft server --relay}), or None.
    @param relays: relay addresses to advertise in WELCOME: C{"*"} means
        this server's own address and port, others are C{HOST:PORT}.
    """

    protocol = RendezvousServerProtocol
    noisy = False  # the service logs its own start-up line

    def __init__(self, clock: IReactorTime, relay: RelayServer | None = None,
                 relays: tuple[str, ...] = (), events: IServerEvents = NO_EVENTS, **options):
        self.clock = clock
        self.relay = relay
        self.advertised_relays = ",".join(relays) if relays else "-"
        self.state = RendezvousServer(clock, events=events, **options)
