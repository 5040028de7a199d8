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

Three parts: L{p2pft.punch_schedule.AttemptPlan} decides what to dial and
when (attempts, caps, pacing, the racing rule, the relays' delay), a plain
object; L{_Sockets} holds the listeners, dials and timers; L{PunchConnector}
runs them and chooses.
"""

from __future__ import annotations

import random

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from .errors import P2pftError
from .punch_schedule import AttemptPlan, PunchSchedule, refused
from .util import cancel


def _reason(failure: Failure) -> str:
    """A few words for why an attempt failed (for the final error line)."""
    inner = failure.value.args[0] if failure.value.args else None
    if failure.check(error.ConnectError) and isinstance(inner, Failure) and refused(failure):
        return "refused (ICMP)"
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


class PunchFailed(P2pftError):
    """No candidate connection could be established and authenticated."""


class ICandidate(Interface):
    """A protocol on one candidate connection, as the connector sees it."""

    transport = Attribute("The TCP transport.")

    def select() -> None:
        "Leader only: commit to this connection (tells the follower)."

    def abandon() -> None:
        "Drop this connection: another one was chosen, or we gave up."


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
            cancel(timer)
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
    @param on_lane: protocol v2: instead of ending at the first chosen
        connection, hand every chosen one to C{on_lane(candidate)} and keep
        going until the deadline or L{stop} (the Deferred of L{run} fires
        with the first).  The leader chooses a candidate that proved the
        key only if C{want(candidate)} (default: always).
    @param listen: whether to listen on the shared port (not for a
        connector that only dials relays).
    @param delay: seconds before the first attempts at the candidates (a
        timed start, L{p2pft.punch_schedule.timed_delay}); the listener and
        the relays start at once all the same.
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
        on_lane=None,
        want=None,
        listen: bool = True,
        delay: float = 0.0,
    ):
        self._reactor = reactor
        self._delay = delay
        self._on_lane = on_lane
        self._want = want
        self._listen = listen
        self._lanes = 0
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
        if self._listen:
            self._sockets.listen(_ListenFactory(self))
        self._sockets.later(self._schedule.deadline, self._giveUp)
        if self._delay > 0 and self.plan.candidates:
            self._sockets.later(self._delay, self._dialCandidates)
        else:
            self._dialCandidates()
        if self.plan.relays:
            self._relaysAfter(self._schedule.relay_delay)
        return self._result

    def _dialCandidates(self) -> None:
        for address in self.plan.candidates:
            self._dial(address)

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
            if self._want is not None and not self._want(candidate):
                return self._drop(candidate)
            candidate.select()
            self._chosen(candidate)

    def selected(self, candidate) -> None:
        if self._done:
            return candidate.abandon()
        self._chosen(candidate)

    def _drop(self, candidate) -> None:
        if candidate in self._live:
            self._live.remove(candidate)
        candidate.abandon()

    def _chosen(self, candidate) -> None:
        if self._on_lane is None:
            return self._finish(candidate)
        if candidate in self._live:
            self._live.remove(candidate)
        self._lanes += 1
        self._on_lane(candidate)
        if self._result is not None and not self._result.called:
            self._result.callback(candidate)

    @property
    def running(self) -> bool:
        return self._result is not None and not self._done

    def stop(self) -> None:
        """Stop trying (the lanes handed out stay); a L{run} still waiting
        fails with L{PunchFailed}."""
        self._finish(None)
        if self._result is not None and not self._result.called and not self._lanes:
            self._result.errback(PunchFailed("stopped"))

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
        if self._lanes:
            return
        if self._result is not None and not self._result.called:
            self._result.errback(PunchFailed(failure))

    def _finish(self, chosen) -> None:
        if self._done:
            return
        self._done = True
        if self.plan.candidates:
            self._sockets.log.info("punching over: attempts {attempts}, refused (raced) {refused}; {errors}",
                                   attempts=dict(self.plan._attempts), refused=self.plan.refused,
                                   errors=self.plan.errors)
        self._sockets.close()
        for candidate in list(self._live):
            if candidate is not chosen:
                candidate.abandon()
        self._live = []
        if chosen is not None and not self._result.called:
            self._result.callback(chosen)
