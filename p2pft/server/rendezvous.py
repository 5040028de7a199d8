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

import attrs
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import Interface, implementer

from ..addresses import ip_key
from ..codes import valid_nameplate
from ..rendezvous import MAX_LINE, PROTOCOL_NAME, PROTOCOL_VERSION, decode_payload, normalise_host, printable
from .limits import CLOSE_GRACE, FIRST_LINE_MIN_WAIT, AddressCounts, ClaimLimiter, Lobby
from .relay import Leg, RelayServer
from .splice import TransportLeg

#: Messages one connection may send through the server.
MAX_MESSAGES = 64

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
        self._per_ip = AddressCounts()
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
        if self._per_ip.full(ip, self.max_per_ip):
            return conn.refuse("too many connections from your address")
        if not self.lobby.enter(conn, lambda: conn.refuse("timed out waiting for ALLOCATE or CLAIM")):
            return conn.refuse("server is busy, try again later")
        self._per_ip.add(ip)
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
        self._per_ip.remove(member.ip)
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
    log = Logger()
    _closing = False
    _abort_timer = None
    _lines = 0
    #: The relay's record of this connection, once it said RELAY.
    _leg: Leg | None = None

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
            self._relay: RelayServer = self.factory.relay
            self._leg = self._relay.adopt(TransportLeg(self.transport))
            if self._relay.request(self._leg, args):
                self.setRawMode()
        else:
            self.refuse(f"unknown command {printable(command)!r}")

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

    def __init__(self, clock: IReactorTime, relay: RelayServer | None = None,
                 relays: tuple[str, ...] = (), **options):
        self.clock = clock
        self.relay = relay
        self.advertised_relays = ",".join(relays) if relays else "-"
        self.state = RendezvousServer(clock, **options)
