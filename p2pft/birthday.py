"""
Birthday punching through one symmetric NAT.

A NAT that gives every new connection its own random public port
(endpoint-dependent mapping, "symmetric": Linux C{MASQUERADE
--random-fully}, many carrier NATs) never lets the ordinary punch through:
the port the server saw is not the port its next connection gets.  When
only one side's NAT is like that, both sides can still meet by the
birthday paradox (the numbers below are L{BirthdaySchedule}'s defaults):

  * the symmetric ("opening") side connects to the other side's public
    address -- the one the server saw, which its NAT keeps for every
    destination -- from C{opens} fresh local ports at once, each getting
    its own random public port of its NAT;
  * the other ("probing") side connects, from its one punching port, to
    C{probes} random ports of the symmetric NAT's address -- the one the
    server saw, never anything the peer told us.

A port both chose opens its NAT both ways and the two SYNs meet (a TCP
simultaneous open, or the later SYN lands on the prober's listener).  With
N opens, M probes and R ports in the NAT's range the chance is about
C{1 - exp(-N*M/R)}: 512 x 512 over Linux's 64,512 ports is 98 %, for
about 1,024 SYNs (N + M is least, for a given N * M, at N = M).  When
the prober's NAT answers stray SYNs with resets, the opener's SYNs that
come before the probes are refused: so the prober sprays first (the opener
waits C{open_delay}), and every refused or expired open is made again from
another fresh port (a new random mapping), up to C{max_opens}.

Three parts, as for ordinary punching: L{classify} (is our mapping fixed,
from two observations by the server), L{BirthdayPlan} (what to dial when,
how many, what it cost in SYNs: a plain object), and L{BirthdayConnector}
(the sockets, built on L{p2pft.punch.PunchConnector}'s choosing).
"""

from __future__ import annotations

import random

import attrs
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .punch import PunchConnector, _reason
from .punch_schedule import PunchSchedule, refused

log = Logger()

#: Our NAT keeps one public port per local port whatever the destination
#: (or there is no NAT): the port the server saw is the one to punch to.
FIXED = "fixed"
#: Each connection gets a public port of its own: symmetric.
VARIES = "varies"
#: Symmetric, but the home router mapped our punching port (PCP, NAT-PMP,
#: UPnP-IGD): the peer reaches us through that mapped candidate with a
#: plain connect, so neither side sprays (L{role} gives no role).
MAPPED = "mapped"
#: Roles: the symmetric side opens from fresh ports, the other probes.
OPEN = "open"
PROBE = "probe"

#: When Linux retransmits an unanswered SYN (initial RTO 1 s, doubling),
#: seconds after the first: for counting what an attempt sent.
SYN_RETRIES = (1.0, 3.0, 7.0, 15.0, 31.0)


def classify(local: int, seen: int, second_local: int | None = None,
             second_seen: int | None = None) -> str:
    """
    Our mapping, from the rendezvous connection (local port C{local}, seen
    by the server from C{seen}) and, when that port was not kept, a second
    connection from the next local port (C{second_local} = local +- 1, seen
    from C{second_seen}): L{FIXED} when the port was kept, or when the
    second was seen one port along in the same direction (a NAT that
    shifts ports by a fixed rule: ports taken in order are kept in order);
    L{VARIES} otherwise (a random port for each connection).  A NAT that
    hands out ports in sequence to every connection also looks FIXED: the
    ordinary punch is what it gets, as before.
    """
    if seen == local:
        return FIXED
    if second_local is None or second_seen is None:
        return VARIES
    return FIXED if second_seen - seen == second_local - local else VARIES


def role(ours: str | None, theirs: str | None) -> str | None:
    """Our birthday role for our mapping C{ours} and the peer's C{theirs}
    (None: not known, an older peer): only with exactly one symmetric side."""
    if ours == VARIES and theirs == FIXED:
        return OPEN
    if ours == FIXED and theirs == VARIES:
        return PROBE
    return None


def syns(seconds: float) -> int:
    """SYNs one connect sends in C{seconds} before it ends (the first, and
    Linux's retransmissions: L{SYN_RETRIES})."""
    return 1 + sum(1 for t in SYN_RETRIES if t < seconds)


@attrs.frozen
class BirthdaySchedule:
    """
    How hard to try (measured in the NAT lab: docs/PROTOCOL.md and
    bench/natmatrix.py).

    @ivar opens: the opening side's simultaneous attempts from fresh local
        ports (N).
    @ivar probes: ports of the symmetric NAT's address the probing side
        tries (M), each once, drawn at random from C{ports}.
    @ivar ports: the range a symmetric NAT maps into (Linux: 1024-65535).
    @ivar max_opens: fresh-port attempts in all, at most (the bound on what
        the opening side sends the other's public address).
    @ivar open_delay: seconds the opening side waits before its first
        opens, so that the other side's probes are out first.
    @ivar open_timeout: seconds an open stays pending (0.9: one SYN, no
        retransmission -- a mapping the probes missed stays missed) before
        it is made again from a fresh port, a new draw.
    @ivar probe_timeout: seconds a probe stays pending (0.9: one SYN, no
        retransmission; its NAT mapping outlives it, and a later SYN
        through it lands on the listener).
    @ivar reopen_delay: seconds before a refused or expired open is made
        again.
    @ivar burst: attempts started at once, at most; then C{tick}.
    @ivar tick: seconds between bursts.
    @ivar deadline: seconds before it all gives up.
    """

    opens: int = 512
    probes: int = 512
    ports: tuple[int, int] = (1024, 65535)
    max_opens: int = 2048
    open_delay: float = 0.05
    open_timeout: float = 0.9
    probe_timeout: float = 0.9
    reopen_delay: float = 0.01
    burst: int = 128
    tick: float = 0.005
    deadline: float = 8.0


class BirthdayPlan:
    """
    What one side of a birthday punch dials when, as a plain object (no
    sockets, no clock: times are passed in): the L{BirthdayConnector}
    asks it for L{due} attempts, tells it when each L{ended}, and counts.

    @param role: L{OPEN} (dial C{target} from fresh ports) or L{PROBE}
        (dial random ports of C{target}'s host from the punching port).
    @param target: the peer's address as the server saw it.
    @param max_pending: attempts pending at once, at most (file
        descriptors: one per attempt).
    """

    def __init__(self, schedule: BirthdaySchedule, role: str, target: tuple[str, int],
                 rng: random.Random | None = None, max_pending: int | None = None):
        if role not in (OPEN, PROBE):
            raise ValueError(f"unknown birthday role {role!r}")
        self.schedule = schedule
        self.role = role
        self.target = target
        self._random = rng or random.Random()
        self.max_pending = max_pending or schedule.max_opens + schedule.probes
        host, _ = target
        if role == PROBE:
            low, high = schedule.ports
            count = min(schedule.probes, high - low + 1)
            self._queue = [(host, p) for p in self._random.sample(range(low, high + 1), count)]
            self._budget = count
            self._start = 0.0
            self.timeout = schedule.probe_timeout
        else:
            self._queue = [target] * min(schedule.opens, schedule.max_opens)
            self._budget = schedule.max_opens
            self._start = schedule.open_delay
            self.timeout = schedule.open_timeout
        #: Attempts started, attempts refused, SYNs sent (counting
        #: retransmissions), attempts pending now.
        self.attempts = 0
        self.refusals = 0
        self.syns = 0
        self.pending = 0
        self._retry_at: list[float] = []

    def first(self) -> float:
        """Seconds from the start to the first attempts."""
        return self._start

    def due(self, now: float) -> list[tuple[str, int]]:
        """The attempts to start at C{now} (seconds since the start): at most
        C{burst}, and no more than C{max_pending} pending."""
        if now < self._start:
            return []
        ready = sum(1 for t in self._retry_at if t <= now)
        if ready:
            self._retry_at = [t for t in self._retry_at if t > now]
            self._queue.extend([self.target] * ready)
        room = min(self.schedule.burst, self.max_pending - self.pending, self._budget - self.attempts)
        if room <= 0:
            return []
        out, self._queue = self._queue[:room], self._queue[room:]
        self.attempts += len(out)
        self.pending += len(out)
        return out

    def ended(self, now: float, seconds: float, was_refused: bool, sent: bool = True) -> None:
        """An attempt ended C{seconds} after it started (failed, or stopped
        pending), at C{now}; C{was_refused}: by a reset or ICMP; not
        C{sent}: it could not even start (no socket).  An open is made
        again from a fresh port while the budget lasts."""
        self.pending = max(0, self.pending - 1)
        self.syns += syns(seconds) if sent else 0
        if was_refused:
            self.refusals += 1
        if self.role == OPEN and self.attempts + len(self._queue) + len(self._retry_at) < self._budget:
            self._retry_at.append(now + self.schedule.reopen_delay)

    def connected(self) -> None:
        """An attempt connected (its SYNs: one, most likely)."""
        self.pending = max(0, self.pending - 1)
        self.syns += 1

    def next_tick(self, now: float) -> float | None:
        """Seconds from C{now} to the next L{due} worth asking; None when
        nothing is left to start (pending attempts may still connect)."""
        if now < self._start:
            return self._start - now
        if self._queue and self.attempts < self._budget:
            return self.schedule.tick
        if self._retry_at:
            return max(self.schedule.tick, min(self._retry_at) - now)
        return None

    @property
    def exhausted(self) -> bool:
        return not self._queue and not self._retry_at and (self.pending == 0)

    def stats(self) -> dict:
        """What it cost, for the logs and the JSON "done" event."""
        return {"birthday_role": self.role, "birthday_attempts": self.attempts,
                "birthday_syns": self.syns, "birthday_refused": self.refusals}


class _AttemptFactory(ClientFactory):
    def __init__(self, connector: "BirthdayConnector", started: float):
        self._connector = connector
        self.started = started
        self.pending = True

    def buildProtocol(self, addr):
        self.pending = False
        self._connector._connected(self)
        return self._connector._build(False)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if self.pending:
            self.pending = False
            self._connector._ended(self, reason)


class BirthdayConnector(PunchConnector):
    """
    One side of a birthday punch: the L{BirthdayPlan}'s attempts on real
    sockets (opens from fresh ports, without a listener; probes from the
    shared punching port C{local_port}, with a listener there), the
    candidates they connect chosen as L{PunchConnector} chooses.
    """

    def __init__(self, reactor, local_port: int, plan: BirthdayPlan, candidate_factory, leader: bool,
                 schedule: PunchSchedule = PunchSchedule(), interface: str = "", on_lane=None, want=None):
        schedule = attrs.evolve(schedule, deadline=plan.schedule.deadline)
        super().__init__(reactor, local_port, [], candidate_factory, leader, schedule=schedule,
                         interface=interface, on_lane=on_lane, want=want, listen=plan.role == PROBE)
        self.birthday = plan
        self._attempts: dict[_AttemptFactory, object] = {}
        self._epoch = 0.0
        self._timer = None

    def run(self):
        d = super().run()
        self._epoch = self._reactor.seconds()
        log.info("birthday punching: {role} {what} of {host}", role=self.birthday.role,
                 what=(f"{self.birthday.schedule.opens} fresh ports to port {self.birthday.target[1]}"
                       if self.birthday.role == OPEN else f"{len(self.birthday._queue)} ports"),
                 host=self.birthday.target[0])
        self._later(self.birthday.first())
        return d

    def _later(self, delay: float) -> None:
        """The next L{_tick} in C{delay} seconds, unless one comes sooner."""
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self._reactor.seconds() + delay:
                return
            timer.cancel()
        self._timer = self._sockets.later(delay, self._tick, prune=True)

    def _now(self) -> float:
        return self._reactor.seconds() - self._epoch

    def _tick(self) -> None:
        if self._done:
            return
        now = self._now()
        for host, port in self.birthday.due(now):
            self._attempt(host, port)
        delay = self.birthday.next_tick(self._now())
        if delay is not None:
            self._later(delay)

    def _attempt(self, host: str, port: int) -> None:
        factory = _AttemptFactory(self, self._reactor.seconds())
        fresh = self.birthday.role == OPEN
        try:
            self._attempts[factory] = self._reactor.connectTCP(
                host, port, factory, timeout=self.birthday.timeout,
                bindAddress=None if fresh else self._sockets._binding(self._sockets._interface))
        except Exception as e:  # out of descriptors, ports: stop starting more
            log.info("birthday punching: cannot start an attempt: {e}", e=e)
            self.birthday.ended(self._now(), 0, False, sent=False)

    def _connected(self, factory: _AttemptFactory) -> None:
        self._attempts.pop(factory, None)
        self.birthday.connected()

    def _ended(self, factory: _AttemptFactory, reason: Failure) -> None:
        self._attempts.pop(factory, None)
        if self._done:
            return
        self.birthday.ended(self._now(), self._reactor.seconds() - factory.started, refused(reason))
        self.plan.failed(self.birthday.target, "birthday: " + _reason(reason))
        delay = self.birthday.next_tick(self._now())
        if delay is not None:
            self._later(delay)  # (a retry from a fresh port)

    def _finish(self, chosen) -> None:
        if self._done:
            return
        now = self._reactor.seconds()
        for factory, connector in list(self._attempts.items()):
            if factory.pending:
                factory.pending = False
                self.birthday.ended(self._now(), now - factory.started, False)
                connector.stopConnecting()
        self._attempts.clear()
        super()._finish(chosen)
        log.info("birthday punching ({role}): {attempts} attempts, {syns} SYNs, {refused} refused; "
                 "{result}", role=self.birthday.role, attempts=self.birthday.attempts,
                 syns=self.birthday.syns, refused=self.birthday.refusals,
                 result="connected" if self._lanes or chosen is not None else "no connection")
