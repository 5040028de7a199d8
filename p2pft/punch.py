"""
The punching connector: turn two peers' candidate addresses into exactly one
authenticated TCP connection.

Every socket shares the local port of the rendezvous connection
(SO_REUSEADDR + SO_REUSEPORT through L{twisted.internet.tcp.makeBinding}):
one listener, and one outgoing attempt per remote candidate, redialled on a
schedule until the deadline.  Through NATs that drop unsolicited SYNs the
two sides' SYNs cross and Linux completes a simultaneous open on the
pending C{connect()}; elsewhere the SYN may land on the listener instead.
Both paths build the same candidate protocol, so nothing above cares which.

A candidate counts only once it reports itself I{authenticated} (it proved
the session key).  The leader (the sender) takes the first such candidate
and tells it to L{ICandidate.select}; the follower takes the candidate that
reports I{selected}.  Everything else is closed.

Three parts: L{AttemptPlan} decides what to dial and when (attempts, caps,
pacing, the racing rule, the relays' delay), a plain object; L{_Sockets}
holds the listeners, dials and timers; L{PunchConnector} runs them and
chooses.
"""

from __future__ import annotations

import random

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from .addresses import is_public, parse_ip


def _reason(failure: Failure) -> str:
    """A few words for why an attempt failed (for the final error line)."""
    inner = failure.value.args[0] if failure.value.args else None
    if failure.check(error.ConnectError) and isinstance(inner, Failure):
        # Twisted wraps some connect failures (ICMP unreachable) in another.
        return _reason(inner)
    for kind, words in (
        (error.ConnectionRefusedError, "refused"),
        (error.TimeoutError, "timed out"),
        (error.NoRouteError, "no route"),
        (error.ConnectionDone, "closed"),
        (error.ConnectionLost, "closed"),
        (error.DNSLookupError, "name not found"),
    ):
        if failure.check(kind):
            return words
    text = failure.getErrorMessage().splitlines()
    return text[0][:80] if text else failure.type.__name__


class PunchFailed(Exception):
    """No candidate connection could be established and authenticated."""


class ICandidate(Interface):
    """A protocol on one candidate connection, as the connector sees it."""

    transport = Attribute("The TCP transport.")

    def select() -> None:
        "Leader only: commit to this connection (tells the follower)."

    def abandon() -> None:
        "Drop this connection: another one was chosen, or we gave up."


@attrs.frozen
class PunchSchedule:
    """
    How hard to try.  See docs/PROTOCOL.md for the reasoning.

    @ivar redial: seconds between a failed attempt (timeout, unreachable)
        at a candidate and the next attempt at it.
    @ivar redial_refused: seconds before redialling the peer's public
        address (its first candidate, the one the server observed) when it
        answered with RST, plus up to as much again at random.  A NAT that
        answers unsolicited SYNs with RST lets a connection through only
        while our own SYN is in flight through our NAT at the same moment
        as the peer's SYN through theirs, and each refused attempt lasts one
        round trip: so retry soon, at a jittered pace, to make those windows
        overlap -- but never in a tight loop.
    @ivar max_attempts: attempts at the peer's public address (and at each
        relay), at most (a peer's addresses are untrusted: this bounds what
        we send to any of them).
    @ivar redial_others: seconds before redialling any other candidate
        (private, link-local, loopback on a loopback server, or a further
        public address such as a global IPv6 one) that answered with RST.
        No NAT races us there: an RST from a LAN address is the peer before
        its listener is up (both sides start within about one server round
        trip of each other) or some other host.  A quarter of a second
        keeps the same-LAN case well inside the relay delay while sending
        any such address at most 4 SYNs a second.
    @ivar max_attempts_others: attempts per other candidate, at most: 20
        at the pace above covers 5 s of resets, several times what a peer
        on our LAN needs to start listening; after that the address is not
        the peer.  With 16 candidates, at most 300 attempts in all at
        addresses other than the peer's public one (60 a second).
    @ivar relay_delay: seconds before relays are tried: direct paths that
        work connect well within it, so they win.
    @ivar relay_delay_refused: the same, when the peer's NAT has been
        answering our SYNs with RST: it is alive and the crossing SYNs are
        racing, so direct will most likely win given a little longer.
    @ivar attempt_timeout: seconds one outgoing connect may stay pending.
        Long enough for the kernel's SYN retransmissions (1 s, 3 s) to cross
        the other side's SYN; while it is pending, redialling the same
        4-tuple would fail anyway.
    @ivar deadline: seconds before the whole attempt gives up.
    @ivar handshake_timeout: seconds a connected candidate has to prove
        the key.
    @ivar gone_grace: seconds the follower keeps trying after the leader
        left the rendezvous server (its SELECT may still be in flight).
    """

    redial: float = 0.5
    redial_refused: float = 0.001
    max_attempts: int = 6000
    redial_others: float = 0.25
    max_attempts_others: int = 20
    relay_delay: float = 2.0
    relay_delay_refused: float = 6.0
    attempt_timeout: float = 4.0
    deadline: float = 20.0
    handshake_timeout: float = 10.0
    gone_grace: float = 3.0


class AttemptPlan:
    """
    What to try, and how hard: the per-address attempt schedule of one
    punching attempt as a plain object (no sockets, no clock), which the
    L{PunchConnector} consults and tells what happened.

    It holds the addresses (the peer's candidates and the relays, each
    once), the one candidate raced at the fast pace after RSTs, how many
    attempts each address has had and may have, the wait before the next,
    when the relays are due, and why each address failed (for the final
    error).  See L{PunchConnector} for the parameters.
    """

    def __init__(self, schedule: PunchSchedule, candidates: list[tuple[str, int]],
                 relays: list[tuple[str, int]] = (), own_hosts: frozenset[str] = frozenset(),
                 rng: random.Random | None = None):
        self.schedule = schedule
        self.candidates = list(dict.fromkeys(candidates))
        self.relays = list(dict.fromkeys(relays))
        first = parse_ip(self.candidates[0][0]) if self.candidates else None
        #: The candidate raced at the fast pace: the peer's public address --
        #: never one of our own (C{own_hosts}): a peer behind our NAT has our
        #: public address, and a hostile one may name it to aim the race at
        #: our own services.
        racing = first is not None and is_public(first) and str(first) not in own_hosts
        self.racing = self.candidates[0] if racing else None
        self._random = rng or random.Random()
        self._attempts: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], str] = {}
        #: RSTs from the raced candidate: its NAT is there and racing us.
        self.refused = 0
        #: Whether the relays' time has come (relays learnt later are
        #: dialled at once).
        self.relays_due = False

    def add_relays(self, relays: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Take the relays in C{relays} not known yet; return them."""
        new = [r for r in dict.fromkeys(relays) if r not in self.relays]
        self.relays.extend(new)
        return new

    def attempting(self, address: tuple[str, int]) -> None:
        """An attempt at C{address} starts."""
        self._attempts[address] = self._attempts.get(address, 0) + 1

    def failed(self, address: tuple[str, int], why: str) -> None:
        """C{address} failed, for the reason C{why} (a few words)."""
        self.errors[address] = why

    def next_attempt(self, address: tuple[str, int], reason: Failure, relay: bool) -> float | None:
        """Seconds before the next attempt at C{address}, whose last one
        failed with C{reason}; None when it has had all it may have."""
        racing = not relay and address == self.racing
        cap = self.schedule.max_attempts if relay or racing else self.schedule.max_attempts_others
        if self._attempts.get(address, 0) >= cap:
            return None
        if relay:
            return self.schedule.redial
        if reason.check(error.ConnectionRefusedError) and racing:
            # The peer's public address (the one the server saw) answers:
            # its NAT is there and racing us.
            self.refused += 1
            return self.schedule.redial_refused * (1 + self._random.random())
        if reason.check(error.ConnectionRefusedError):
            # A reset from elsewhere (a private address: some other host
            # here, or the peer not listening yet) says nothing of a race.
            return self.schedule.redial_others
        return self.schedule.redial

    def relay_hold(self, waited: float) -> float:
        """Seconds more to hold the relays back, once C{schedule.relay_delay}
        (C{waited} seconds since the start) is over: 0 to dial them now."""
        if self.refused and waited < self.schedule.relay_delay_refused:
            return self.schedule.relay_delay_refused - waited
        return 0.0

    def failure(self) -> PunchFailed:
        """The error to report when the deadline passes."""
        detail = "; ".join(f"{h}:{p}: {e}" for (h, p), e in self.errors.items())
        how = "directly or through a relay" if self.relays else "directly"
        return PunchFailed(f"could not connect to the other side {how}" + (f" ({detail})" if detail else ""))


class _DialFactory(ClientFactory):
    def __init__(self, connector: "PunchConnector", address: tuple[str, int], relay: bool = False):
        self._connector = connector
        self.address = address
        self.relay = relay
        self.pending = True

    def buildProtocol(self, addr):
        self.pending = False
        return self._connector._build(self.relay)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.pending = False
        self._connector._dialFailed(self.address, reason, self.relay)

    def clientConnectionLost(self, connector, reason: Failure) -> None:
        # Closed before it was chosen (a stray listener, a failed proof):
        # try that address again on the schedule -- but not a relay that
        # refused us: its reason stands.
        if not self.relay:
            self._connector._dialFailed(self.address, reason)


class _ListenFactory(Factory):
    def __init__(self, connector: "PunchConnector"):
        self._connector = connector

    def buildProtocol(self, addr):
        return self._connector._build(False)


class _Sockets:
    """
    The sockets and timers of one punching attempt: the listeners and the
    outgoing attempts on the shared local port, the relay dials from any
    port, the timers; all stopped at once by L{close}.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTCP | IReactorTime, local_port: int, interface: str,
                 attempt_timeout: float):
        self._reactor = reactor
        self._local_port = local_port
        self._interface = interface
        self._attempt_timeout = attempt_timeout
        self._listeners: list = []
        self._dialling: dict[tuple[tuple[str, int], bool], tuple] = {}
        self._timers: list = []

    def listen(self, factory: Factory) -> None:
        """Listen on the shared port, on both address families unless we
        have an interface: a peer may reach us over either."""
        interfaces = [self._interface] if self._interface else ["", "::"]
        for interface in interfaces:
            try:
                self._listeners.append(self._reactor.listenTCP(
                    self._binding(interface), factory, interface=interface,
                ))
            except error.CannotListenError as e:
                # Dialling alone can still succeed (simultaneous open).
                self.log.info("cannot listen on {interface} port {port}: {e}",
                              interface=interface or "0.0.0.0", port=self._local_port, e=e)

    def dial(self, address: tuple[str, int], factory: "_DialFactory") -> None:
        host, port = address
        connector = self._reactor.connectTCP(
            host, port, factory, timeout=self._attempt_timeout,
            # A relay is an ordinary outgoing connection; only punching
            # needs the shared port.
            bindAddress=None if factory.relay else self._binding(self._interface),
        )
        self._dialling[(address, factory.relay)] = (connector, factory)

    def dialled(self, address: tuple[str, int], relay: bool) -> None:
        """The attempt at C{address} ended (failed, or connected and lost)."""
        self._dialling.pop((address, relay), None)

    def later(self, delay: float, f, *args, prune: bool = False):
        """Call C{f} after C{delay} seconds, unless L{close} comes first;
        C{prune}: forget the timers that are done first (redials add many)."""
        if prune:
            self._timers = [t for t in self._timers if t.active()]
        timer = self._reactor.callLater(delay, f, *args)
        self._timers.append(timer)
        return timer

    def close(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        for connector, factory in list(self._dialling.values()):
            if factory.pending:
                factory.pending = False
                connector.stopConnecting()
        self._dialling.clear()
        for listener in self._listeners:
            listener.stopListening()

    def _binding(self, interface: str):
        return makeBinding(interface, self._local_port, reuseAddress=True, reusePort=True)


class PunchConnector:
    """
    One punching attempt: which candidate to choose, told by the
    candidates; what to dial when is its L{AttemptPlan}'s, the sockets
    and timers are its L{_Sockets}'.

    @param candidate_factory: called with this connector and whether the
        connection goes through a relay; returns a new L{ICandidate}
        protocol that reports back through L{authenticated}, L{selected}
        and L{lost}.
    @param candidates: the peer's addresses (IP literals), its public
        (server-observed) one first: only that one, and only if it is a
        public address not in C{own_hosts}, is raced at the fast pace after
        RSTs.
    @param relays: relay addresses (IP literals, or a name the user gave),
        dialled (from any port) after C{schedule.relay_delay}; see also
        L{add_relays}.
    @param leader: whether we choose the connection (the sender) or wait for
        the other side's choice.
    """

    def __init__(
        self,
        reactor: IReactorTCP | IReactorTime,
        local_port: int,
        candidates: list[tuple[str, int]],
        candidate_factory,
        leader: bool,
        schedule: PunchSchedule = PunchSchedule(),
        interface: str = "",
        rng: random.Random | None = None,
        relays: list[tuple[str, int]] = (),
        own_hosts: frozenset[str] = frozenset(),
    ):
        self._reactor = reactor
        self.plan = AttemptPlan(schedule, candidates, relays, own_hosts, rng)
        self._sockets = _Sockets(reactor, local_port, interface, schedule.attempt_timeout)
        self._factory = candidate_factory
        self._leader = leader
        self._schedule = schedule
        self._live: list = []
        self._result: defer.Deferred | None = None
        self._done = False
        self._relay_timer = None

    @property
    def refused(self) -> int:
        """RSTs from the raced candidate so far."""
        return self.plan.refused

    def run(self) -> defer.Deferred:
        """Start; the Deferred fires with the chosen L{ICandidate}."""
        self._result = defer.Deferred(lambda d: self._finish(None))
        self._started = self._reactor.seconds()
        self._sockets.listen(_ListenFactory(self))
        self._sockets.later(self._schedule.deadline, self._giveUp)
        for address in self.plan.candidates:
            self._dial(address)
        if self.plan.relays:
            self._relaysAfter(self._schedule.relay_delay)
        return self._result

    def add_relays(self, relays: list[tuple[str, int]]) -> None:
        """Relay addresses learnt after L{run} (names resolved meanwhile):
        dialled with the others, or at once if their time has come."""
        if self._done or self._result is None:
            return
        new = self.plan.add_relays(relays)
        if new and self.plan.relays_due:
            for address in new:
                self._dial(address, relay=True)
        elif new and (self._relay_timer is None or not self._relay_timer.active()):
            self._relaysAfter(self._started + self._schedule.relay_delay - self._reactor.seconds())

    def _relaysAfter(self, delay: float) -> None:
        self._relay_timer = self._sockets.later(max(delay, 0), self._dialRelays)

    def _dialRelays(self) -> None:
        hold = self.plan.relay_hold(self._reactor.seconds() - self._started)
        if hold:
            self._relaysAfter(hold)
            return
        self.plan.relays_due = True
        for address in self.plan.relays:
            self._dial(address, relay=True)

    def _dial(self, address: tuple[str, int], relay: bool = False) -> None:
        if self._done:
            return
        self.plan.attempting(address)
        self._sockets.dial(address, _DialFactory(self, address, relay))

    def _dialFailed(self, address: tuple[str, int], reason: Failure, relay: bool = False) -> None:
        self._sockets.dialled(address, relay)
        self.plan.failed(address, ("relay: " if relay else "") + _reason(reason))
        if self._done:
            return
        delay = self.plan.next_attempt(address, reason, relay)
        if delay is not None:
            self._sockets.later(delay, self._dial, address, relay, prune=not relay)

    def _build(self, relay: bool):
        if self._done:
            return None
        candidate = self._factory(self, relay)
        self._live.append(candidate)
        return candidate

    # -- what candidates tell us

    def authenticated(self, candidate) -> None:
        if self._done:
            return candidate.abandon()
        if self._leader:
            candidate.select()
            self._finish(candidate)

    def selected(self, candidate) -> None:
        if self._done:
            return candidate.abandon()
        self._finish(candidate)

    def lost(self, candidate, reason: str | None = None) -> None:
        if candidate in self._live:
            self._live.remove(candidate)
        if reason:
            peer = candidate.transport.getPeer()
            self.plan.failed((peer.host, peer.port), reason)

    # -- ending

    def _giveUp(self) -> None:
        failure = self.plan.failure()
        self._finish(None)
        if self._result is not None and not self._result.called:
            self._result.errback(failure)

    def _finish(self, chosen) -> None:
        if self._done:
            return
        self._done = True
        self._sockets.close()
        for candidate in list(self._live):
            if candidate is not chosen:
                candidate.abandon()
        self._live = []
        if chosen is not None and not self._result.called:
            self._result.callback(chosen)
