"""
Connecting one session, and keeping it connected (protocol v2):

  rendezvous (pair on a nameplate)  ->  PAKE + key confirmation
  -> candidates (sealed)  ->  punch and relay at once  ->  lanes of a
  L{SessionLink}

L{establish} returns as soon as the first connection proves the key (a
relay's or a direct one), with a L{LaneFinder} that goes on in the
background: punching until its deadline (a direct lane that proves the key
later takes over from the relay), parallel streams (C{--streams}), and,
when every lane is lost, reconnection -- through the relay again, and by
meeting again on the rendezvous server on a nameplate derived from the
session key, exchanging fresh candidates sealed under fresh keys, and
punching again -- until C{--reconnect-timeout}.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet import defer, error, task
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger

from . import birthday, codes
from .addresses import global_ipv6_addresses, is_loopback, is_public, normalise_host, parse_ip
from .candidates import own_candidates, parse_candidates, relays, resolve_relays
from .channel import PeerConnection
from .errors import SessionError
from .portmap import SessionMapping
from .punch import PunchConnector, PunchSchedule
from .punch_schedule import MAX_TIMED_DELAY, STAGGER, peer_rtt, peer_sent, timed_delay
from .rendezvous import PeerGone, RendezvousClientFactory, RendezvousClientProtocol, RendezvousError
from .secure import RECEIVER, SENDER, Pake, SecurityError, WrongCode
from .session import CONTROL, SessionLink, auto
from .transfer import text
from .util import cancel, dump_object, load_object

log = Logger()

#: What both sides say in their key confirmation: the protocol version.
PROTOCOL = "p2pft/v2"
#: Default seconds to wait for each step once paired.
MESSAGE_TIMEOUT = 60.0
#: What this p2pft announces in its key confirmation beyond the protocol
#: (docs/PROTOCOL.md section 2): "text", it takes TEXT records; "mtime-ns",
#: manifest times in nanoseconds (used only when both sides announce it).
MTIME_NS = "mtime-ns"
FEATURES = (text.FEATURE, MTIME_NS)
#: Seconds a session may spend without any connection before it fails
#: (its partial data kept for an ordinary resume).  Five minutes covers a
#: home router rebooting (one to three minutes), a relay restarting, a
#: laptop lid closed briefly or a change of network; longer, and a person
#: would rather be told.
RECONNECT_TIMEOUT = 300.0
#: Seconds to wait on the rendezvous server for the other side when
#: looking for a direct path again after reconnecting through a relay (the
#: other side comes at about the same moment: it reconnected too).
UPGRADE_WAIT = 30.0
#: Seconds of one reconnection attempt through the relay: more than the 10 s
#: a connection there may wait for the other side and prove the key, after
#: which both sides dial it again (a side that noticed the loss later, or
#: woke up later, finds the other's next attempt).
RELAY_ROUND = 12.0
#: Most parallel streams (the relay takes legs 0..15).
MAX_STREAMS = 16
#: Seconds after the first punching began at which the leader punches
#: again from fresh ports while the session is not direct (both NATs keep
#: their mappings; L{LaneFinder.repunch_later}): four new port pairs at
#: most.  Measured in the lab (two ICMP-answering NATs, 0 ms, 2 s
#: transfers): each new pair goes direct about half the time when the
#: first got stuck; the first comes after ordinary punching has had time
#: (0.1-0.6 s to direct at 0-120 ms round trip).
REPUNCH_AFTER = (0.6, 1.2, 2.4, 4.8)
#: Unsequenced records of the lane finders (L{SessionLink} control kinds):
#: leader -> follower GROW {"leg": k} (dial relay leg k) or {"punch": n,
#: "candidates": [...]} (punch stream n from a fresh port; here is mine);
#: follower -> leader GROWN {"punch": n, "candidates": [...]}.
GROW = CONTROL
GROWN = CONTROL + 1


def birthday_schedule(text: str | None) -> birthday.BirthdaySchedule | None:
    """The birthday schedule C{P2PFT_BIRTHDAY} asks for (a knob for the
    benchmarks, bench/natmatrix.py): unset or empty, the default; "off",
    none; "N,M" (opens, probes), the default with those."""
    if not text:
        return birthday.BirthdaySchedule()
    if text.strip().lower() == "off":
        return None
    try:
        opens, probes = (int(x) for x in text.split(","))
        if not (0 < opens <= 4096 and 0 < probes <= 8192):
            raise ValueError
    except ValueError:
        raise SessionError(f"P2PFT_BIRTHDAY must be off or OPENS,PROBES, not {text!r}") from None
    return birthday.BirthdaySchedule(opens=opens, probes=probes, max_opens=4 * opens)


def timed_setting(text: str | None) -> bool:
    """Whether C{P2PFT_TIMED} (a knob for the benchmarks, bench/natmatrix.py)
    turns timed punching on: "on", yes; unset, empty or "off", no (it did
    not help in the lab: docs/PROTOCOL.md section 3, "Timed start")."""
    value = (text or "off").strip().lower()
    if value not in ("on", "off"):
        raise SessionError(f"P2PFT_TIMED must be on or off, not {text!r}")
    return value == "on"


def stagger_setting(text: str | None) -> float:
    """The follower's stagger C{P2PFT_STAGGER} asks for (a knob for the
    benchmarks): unset or empty, L{STAGGER}; else milliseconds, 0 to 500
    (0: none)."""
    if not text or not text.strip():
        return STAGGER
    try:
        ms = float(text)
        if not 0 <= ms <= 500:
            raise ValueError
    except ValueError:
        raise SessionError(f"P2PFT_STAGGER must be milliseconds from 0 to 500, not {text!r}") from None
    return ms / 1000.0


@attrs.define
class Settings:
    server: tuple[str, int]
    code: str | None = None
    code_length: int = codes.DEFAULT_WORDS
    timeout: float = MESSAGE_TIMEOUT
    #: A relay the user named (HOST, PORT): used instead of the server's.
    relay: tuple[str, int] | None = None
    schedule: PunchSchedule = PunchSchedule()
    #: An IHostnameResolver for relay names the server advertises (None:
    #: the reactor's).
    resolver: object = None
    #: Parallel streams: a number, or "auto".
    streams: int | str = "auto"
    reconnect_timeout: float = RECONNECT_TIMEOUT
    #: Ask the router to map the punching port (PCP, NAT-PMP, UPnP-IGD).
    port_mapping: bool = True
    #: Birthday punching through one symmetric NAT (None: never).
    birthday: birthday.BirthdaySchedule | None = attrs.field(
        factory=lambda: birthday_schedule(os.environ.get("P2PFT_BIRTHDAY")))
    #: Timed punching: a side that would start before the other holds its
    #: first attempts back so both sides' SYNs leave together
    #: (L{timed_delay}); off unless P2PFT_TIMED=on (measured: no help).
    timed: bool = attrs.field(factory=lambda: timed_setting(os.environ.get("P2PFT_TIMED")))
    #: Seconds the follower starts after the leader (L{STAGGER}).
    stagger: float = attrs.field(factory=lambda: stagger_setting(os.environ.get("P2PFT_STAGGER")))


def _timeout(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    def translate(f):
        f.trap(defer.TimeoutError)
        raise SessionError(f"timed out after {seconds:g} s waiting for {what}")

    d.addTimeout(seconds, reactor)
    return d.addErrback(translate)


async def connect_rendezvous(reactor, server: tuple[str, int], port: int = 0) -> RendezvousClientProtocol:
    """
    Connect to the server, over IPv4 when it has an IPv4 address: that is
    the family NATs translate, so the address the server sees is the public
    candidate the other peer needs (IPv6 addresses are added as extra
    candidates).  Over IPv6 only for an IPv6 literal or a server without
    IPv4.  The socket is bound with SO_REUSEADDR + SO_REUSEPORT so the punch
    listener and outgoing attempts can share its port later; C{port}: the
    local port (0: any).
    """
    host, server_port = server
    binding = makeBinding("", port, reuseAddress=True, reusePort=True)
    factory = RendezvousClientFactory(reactor)
    try:
        if ":" in host:
            endpoint = HostnameEndpoint(reactor, host, server_port, timeout=10, bindAddress=binding)
            return await endpoint.connect(factory)
        try:
            return await TCP4ClientEndpoint(reactor, host, server_port, timeout=10, bindAddress=binding).connect(factory)
        except error.DNSLookupError:
            # No IPv4 address for that name: try whatever it has.
            endpoint = HostnameEndpoint(reactor, host, server_port, timeout=10, bindAddress=binding)
            return await endpoint.connect(factory)
    except (error.ConnectError, error.DNSLookupError) as e:
        why = {error.ConnectionRefusedError: "connection refused", error.TimeoutError: "timed out",
               error.DNSLookupError: "name not found", error.NoRouteError: "no route to host"}.get(
                   type(e), str(e.args[0] if e.args and e.args[0] else e.__doc__).lower())
        raise SessionError(f"cannot reach the rendezvous server {host}:{server_port}: {why}") from None


_encode = dump_object


def _decode(data: bytes) -> dict:
    try:
        return load_object(data)
    except ValueError:
        raise SessionError("the other side sent a malformed message") from None


async def _close(reactor, client) -> None:
    """Close the rendezvous connection once what we sent has left (a key
    confirmation written just before we fail must still reach the other
    side, or it would see us vanish instead of a wrong code), but never
    wait long."""
    closed = client.close()
    closed.addTimeout(2, reactor)
    try:
        await closed
    except defer.TimeoutError:
        pass


@attrs.define
class Session:
    """A connected session: its link (the transfer's channel), what the
    other side can do, and what finds its lanes."""

    link: SessionLink
    finder: "LaneFinder"
    #: What the other side's p2pft announced it can do (L{FEATURES}).
    features: frozenset = frozenset()
    #: Seconds from PAIRED to the first lane.
    connect_seconds: float = 0.0

    @property
    def path(self) -> str:
        return self.link.path


async def establish(reactor, settings: Settings, role: str, ui) -> Session:
    """Everything up to the first lane of a session."""
    client = await connect_rendezvous(reactor, settings.server)
    reporting = False
    try:
        session = await _pair_and_punch(reactor, client, settings, role, ui)
        if role == SENDER:
            # One anonymous count for the server's metrics, once per
            # session (so by one side only): the path the session settled
            # on once its first punching is over, sent from the background.
            reporting = True
            session.finder.report_later(client, session.connect_seconds)
        return session
    finally:
        if not reporting:
            await _close(reactor, client)


async def _pair_and_punch(reactor, client, settings: Settings, role: str, ui) -> Session:
    public = await _timeout(reactor, client.welcomed(), 30, "the rendezvous server")
    # A second sample of our round trip to the server (the first: WELCOME),
    # for timed punching; its PONG is back long before the candidates go.
    client.ping("rtt").addErrback(lambda f: None)
    # Asked now, in the background; offered with our candidates (p2pft.portmap.session).
    router = SessionMapping.start(reactor, client, settings.port_mapping, ui)
    if settings.code:
        code = codes.parse_code(settings.code)
        client.claim(code.nameplate)
    else:
        nameplate = await _timeout(reactor, client.allocate(), 30, "a nameplate")
        code = codes.Code(nameplate, codes.make_password(settings.code_length))
    ui.code(str(code), announce=not settings.code)
    # While we wait for the other side: is our NAT's mapping fixed?
    observed: list = []
    if settings.birthday is not None:
        mapping = defer.ensureDeferred(observe_mapping(reactor, settings.server, client, public))
        mapping.addCallback(observed.append)
        mapping.addErrback(lambda f: log.info("observing our NAT's mapping: {e}", e=f.getErrorMessage()))
    await client.paired()
    paired_at = reactor.seconds()
    ui.paired()
    # Key agreement, then key confirmation, then candidates: nothing but the
    # SPAKE2 message leaves in the clear.
    keys, box, features = await _agree_keys(reactor, client, code, role, settings.timeout)
    server_host = client.transport.getPeer().host
    mine, local_port = _own(client, public, server_host)
    mapped = await router.candidates()
    mine += mapped
    if settings.birthday is not None and not observed:
        await _race(reactor, [mapping], MAPPING_WAIT)
    ours = observed[0] if observed else None
    if mapped and ours == birthday.VARIES:
        ours = birthday.MAPPED  # reached through the router's mapping: no birthday punching either way
    sent = reactor.seconds() - paired_at
    client.send(box.seal(_encode(candidates_message(mine, ours, client.rtt, sent))))
    message = _decode(box.open(
        await _timeout(reactor, client.receive(), settings.timeout, "the other side's addresses")))
    theirs = parse_candidates(message, server_host, mine)
    delay = first_delay(settings, role, timed_delay(
        client.rtt, peer_rtt(message.get("rtt_ms")), sent, peer_sent(message.get("sent_ms")),
        reactor.seconds() - paired_at))
    log.info("punching from port {port} to {theirs} at {at:.3f} (our round trip to the server {ours}, "
             "theirs {rtt}: first attempts after {delay:.3f} s)", port=local_port, theirs=theirs,
             at=reactor.seconds(), ours=_ms(client.rtt), rtt=_ms(peer_rtt(message.get("rtt_ms"))), delay=delay)

    dial, names = relays(settings, client.relays, server_host)
    finder = LaneFinder(reactor, settings, role, keys, ui, dial)
    finder.server_rtts = (client.rtt, peer_rtt(message.get("rtt_ms")))
    router.until(finder.link.whenClosed())
    connector = finder.punch(local_port, theirs, mine, delay=delay)
    side = birthday.role(ours, message.get("mapping"))
    target = _birthday_target(client.partner, mine)
    log.info("our NAT's mapping: {ours}; theirs: {theirs}; the server sees them from {target}",
             ours=ours or "not known", theirs=message.get("mapping") if isinstance(
                 message.get("mapping"), str) else "not known", target=client.partner)
    also = []
    if side is not None and target is not None and settings.birthday is not None:
        also.append(finder.birthday(local_port, side, target))
    elif birthday.VARIES not in (ours, message.get("mapping")):
        finder.repunch_later()
    if names:
        # Resolved while we punch (DNS must not hold up the race); only
        # what the names resolve to, filtered, is ever dialled.
        resolving = resolve_relays(settings.resolver or reactor.nameResolver, names, server_host)
        resolving.addCallback(finder.add_relays)
        resolving.addErrback(lambda f: log.failure("resolving relays", f))
    await _punch_watching_partner(reactor, client, connector, role, settings.schedule, also)
    return Session(finder.link, finder, features, max(0.0, reactor.seconds() - paired_at))


def candidates_message(mine: list, mapping: str | None, rtt: float | None, sent: float | None = None) -> dict:
    """Message 3 (docs/PROTOCOL.md section 2): our candidates, what we know
    of our NAT's C{mapping}, our round trip to the server C{rtt} and the
    seconds from our PAIRED to this message, C{sent} (as C{rtt_ms} and
    C{sent_ms}, for timed punching), each only when known."""
    message: dict = {"candidates": mine}
    if mapping:
        message["mapping"] = mapping
    if rtt is not None and sent is not None:
        message["rtt_ms"] = round(rtt * 1000, 2)
        message["sent_ms"] = round(sent * 1000, 2)
    return message


def first_delay(settings: Settings, role: str, aligned: float) -> float:
    """Seconds before our first attempts of the first punching: C{aligned}
    (L{timed_delay}: until the peer starts) unless C{settings.timed} is
    off, and the follower C{settings.stagger} after that."""
    return (aligned if settings.timed else 0.0) + (settings.stagger if role == RECEIVER else 0.0)


def _ms(seconds: float | None) -> str:
    return "not known" if seconds is None else f"{seconds * 1000:.1f} ms"


#: Seconds to wait for our mapping's second observation once the
#: candidates are due (it started when we joined the nameplate, so it is
#: done unless the other side was there first and the server is far).
MAPPING_WAIT = 2.0


async def observe_mapping(reactor, server: tuple[str, int], client, public: tuple[str, int]) -> str | None:
    """
    Whether our NAT maps the punching port the same way whatever the
    destination (L{birthday.FIXED}) or gives each connection a port of
    its own (L{birthday.VARIES}), from what the server saw of the
    rendezvous connection C{client} (C{public}) and, when that port was not
    kept, of a second connection from the next local port (WELCOME only:
    one short connection; see L{birthday.classify}).  None: not known.
    """
    local = client.transport.getHost().port
    if public[1] == local:
        return birthday.FIXED
    for second in (local + 1, local - 1):
        if not 1024 <= second < 65536:
            continue
        try:
            probe = await connect_rendezvous(reactor, server, port=second)
        except SessionError:
            continue  # that port is taken here
        try:
            seen = await _timeout(reactor, probe.welcomed(), 10, "the rendezvous server")
        finally:
            await _close(reactor, probe)
        return birthday.classify(local, public[1], second, seen[1])
    return None


def _birthday_target(partner: tuple[str, int] | None, mine) -> tuple[str, int] | None:
    """Where a birthday punch may aim: the partner's address as the server
    saw it (PAIRED), if it is public and not one of ours (a peer behind our
    own NAT shares our public address)."""
    if partner is None:
        return None
    ip = parse_ip(partner[0])
    own = {str(parse_ip(h)) for h, _ in mine if parse_ip(h) is not None}
    if ip is None or not is_public(ip) or str(ip) in own:
        return None
    return (str(ip), partner[1])


def _own(client, public: tuple[str, int], server_host: str) -> tuple[list[list], int]:
    """Our candidates as the rendezvous connection C{client} shows them
    (C{public}: the address the server saw), and its local port (the one
    punching shares)."""
    local = client.transport.getHost()
    mine = own_candidates(public, (normalise_host(local.host), local.port),
                          [] if is_loopback(server_host) else global_ipv6_addresses())
    return mine, local.port


async def _agree_keys(reactor, client, code: codes.Code, role: str, timeout: float):
    """SPAKE2 over the rendezvous server, then key confirmation (which also
    carries the protocol version and the L{FEATURES} each side announces):
    the session keys, the L{Box} for the rest of the rendezvous messages
    (one box: its nonces count on from the confirmation's), and the other
    side's features; or L{WrongCode}."""
    pake = Pake(code.password, code.nameplate, role)
    client.send(pake.start())
    keys = pake.finish(await _timeout(reactor, client.receive(), timeout, "the other side"))
    box = keys.box()
    client.send(box.seal(_encode({"confirm": PROTOCOL, "features": list(FEATURES)})))
    try:
        confirm = _decode(box.open(await _timeout(reactor, client.receive(), timeout, "key confirmation")))
    except SecurityError:
        raise WrongCode(
            "wrong code: the other side used a different code, or someone tampered "
            "with the exchange (this code is now used up)"
        ) from None
    version = confirm.get("confirm")
    if version != PROTOCOL:
        if version == "p2pft/v1":
            raise SessionError("the other side runs an older p2pft (protocol v1); "
                               "both sides need p2pft 0.2 or later: ask them to update")
        raise SessionError("the other side speaks another version of p2pft")
    features = confirm.get("features")
    features = frozenset(f for f in features if isinstance(f, str)) if isinstance(features, list) else frozenset()
    return keys, box, features


def _first_of(waits: list[defer.Deferred]) -> defer.Deferred:
    """Fires with the first of C{waits} to succeed (the first lane, from
    whichever connector), or fails as the first of them when all failed;
    cancelling it cancels them all."""
    result = defer.Deferred(lambda _: [d.cancel() for d in waits if not d.called])
    failures: list = []

    def succeeded(value):
        if not result.called:
            result.callback(value)

    def failed(failure):
        failures.append(failure)
        if len(failures) == len(waits) and not result.called:
            result.errback(failures[0])

    for d in waits:
        d.addCallbacks(succeeded, failed)
    return result


async def _punch_watching_partner(reactor, client, connector, role, schedule, also=()):
    """
    Punch until the first lane, but stop early if the partner leaves the
    rendezvous server: the sender at once (the receiver only leaves after
    the sender chose), the receiver after a grace period (the sender leaves
    right after choosing, so its SELECT may still be on the way).  The
    server itself going away is fine: it is not needed any more.
    """
    punched = connector.run()
    if also:
        # (birthday punching): the first lane from any of them.
        punched = _first_of([punched, *also])
    watch = client.receive()  # nothing more is expected; only GONE matters
    timers = []

    def partner_left(failure):
        failure.trap(PeerGone)
        grace = schedule.gone_grace if role == RECEIVER else 0
        timers.append(reactor.callLater(grace, lambda: punched.called or punched.cancel()))

    watch.addErrback(partner_left).addErrback(lambda f: None)
    try:
        return await punched
    except defer.CancelledError:
        # (Both sides' deadlines are about equal: whichever gives up second
        # says what it tried too, as the first one did.)
        tried = connector.plan.tried()
        raise SessionError("the other side left before a connection was made"
                           + (f" (tried: {tried})" if tried else "")) from None
    finally:
        watch.cancel()
        for t in timers:
            cancel(t)


def _race(reactor, waits: list[defer.Deferred], timeout: float) -> defer.Deferred:
    """Fires with the index of the first of C{waits} to fire (success or
    failure), or None after C{timeout} seconds; the others are cancelled."""
    result = defer.Deferred()

    def fired(value, index):
        if not result.called:
            result.callback(index)

    for index, d in enumerate(waits):
        d.addBoth(fired, index)
    timer = reactor.callLater(max(0.0, timeout), lambda: result.called or result.callback(None))

    def settle(index):
        cancel(timer)
        for d in waits:
            if not d.called:
                d.cancel()
        return index

    return result.addBoth(settle)


def _descriptors(reserve: int = 256) -> int:
    """How many birthday attempts may be pending at once: the file
    descriptors we may open (the soft limit raised to the hard one, up to
    8192, where it is lower), less C{reserve} for everything else."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(16, (8192 if soft == -1 else soft) - reserve)


class LaneFinder:
    """
    Finds the lanes of one session and hands them to its L{SessionLink}:
    the punching attempts (L{punch}), parallel streams through the relay,
    and reconnection when every lane is lost.  The leader (the sender)
    chooses which connections join; the follower joins what it chose.
    """

    def __init__(self, reactor, settings: Settings, role: str, keys, ui, relays: list[tuple[str, int]]):
        self._reactor = reactor
        self._settings = settings
        self._role = role
        self._leader = role == SENDER
        self._keys = keys
        self._ui = ui
        self.relays = list(relays)
        self._connectors: list[PunchConnector] = []
        self._stopped = False
        self._direct_at: float | None = None
        self._announced = False  # "reconnected" said for this reconnection
        self._reconnecting: defer.Deferred | None = None
        self._upgrading: defer.Deferred | None = None
        self._lost_at: float | None = None
        self._arrived: list[defer.Deferred] = []
        self._legs = 1  # relay legs in use: 0 .. _legs-1
        self._punched = 0  # direct streams punched so far (numbered from 1)
        self._growing: dict[int, defer.Deferred] = {}  # direct streams being punched
        self._replies: dict[int, defer.Deferred] = {}  # leader: GROWN awaited
        self._main: list[PunchConnector] = []  # punching for the session's path, not a stream
        self._auto = auto.AutoStreams()  # --streams auto
        self._auto_started = False
        self._auto_timer = None
        self._tcp_seen: dict = {}  # lane -> its TCP's counts, last seen (L{_tcp})
        self._birthdays: list = []  # the birthday plans run (L{stats})
        self.repunches = 0  # punching again from fresh ports (L{repunch_later})
        #: Our round trip to the rendezvous server and the peer's (seconds;
        #: None: not known), from the first meeting (L{_follow_delay}).
        self.server_rtts: tuple = (None, None)
        self._repunch_timer = None
        self.link = SessionLink(reactor, self._leader, lost_all=self._lost_all,
                                path_changed=self._path_changed, control=self._control)

    # -- starting connectors ---------------------------------------------

    def punch(self, local_port: int, theirs, mine, relays=None, stream: bool = False,
              delay: float = 0.0) -> PunchConnector:
        """A connector that punches from C{local_port} to the peer's
        candidates C{theirs} and dials the relays (at once), whose lanes
        join the link; the caller runs it.  C{stream}: a further direct
        stream, not the session's path; C{delay}: seconds before its first
        attempts at C{theirs} (timed punching)."""
        own_hosts = frozenset(str(parse_ip(h)) for h, _ in mine if parse_ip(h) is not None)
        connector = self._keep(PunchConnector(
            self._reactor, local_port, theirs, self._factory(0), leader=self._leader,
            schedule=self._settings.schedule, relays=self.relays if relays is None else relays,
            own_hosts=own_hosts, on_lane=self._lane, want=self._on_direct if stream else self._want,
            delay=delay))
        if not stream:
            self._main = [c for c in self._main if c.running] + [connector]
        return connector

    def birthday(self, local_port: int, side: str, target: tuple[str, int]) -> defer.Deferred:
        """Birthday punching (L{p2pft.birthday}) in the background as side
        C{side}, at the peer's server-observed address C{target}; its lane,
        if any, joins as a direct one would.  Running: fires with its first
        lane, as L{PunchConnector.run}."""
        plan = birthday.BirthdayPlan(self._settings.birthday, side, target, max_pending=_descriptors())
        connector = self._keep(birthday.BirthdayConnector(
            self._reactor, local_port, plan, self._factory(0), leader=self._leader,
            schedule=self._settings.schedule, on_lane=self._lane, want=self._want))
        self._main.append(connector)
        self._birthdays.append(plan)
        running = connector.run()
        running.addErrback(lambda f: log.info("birthday punching: {e}", e=f.getErrorMessage()) or f)
        return running

    def stats(self) -> dict:
        """What birthday punching cost and how often we punched again from
        fresh ports, for the "done" event (nothing when neither ran)."""
        out: dict = {"repunches": self.repunches} if self.repunches else {}
        for plan in self._birthdays:
            for key, value in plan.stats().items():
                out[key] = value if isinstance(value, str) else out.get(key, 0) + value
        return out

    def _relay_leg(self, leg: int, deadline: float, want=None) -> PunchConnector | None:
        """Dial relay leg C{leg} for up to C{deadline} seconds (running):
        a further leg (1 and up) at the relay the session runs through,
        leg 0 (a reconnection) at every relay."""
        relays = self.relays
        if leg:
            using = [lane.conn.transport.getPeer() for lane in self.link.live if lane.path == "relay"]
            relays = [(normalise_host(using[0].host), using[0].port)] if using else relays
        if not relays:
            return None
        schedule = attrs.evolve(self._settings.schedule, deadline=deadline)
        connector = self._keep(PunchConnector(
            self._reactor, 0, [], self._factory(leg), leader=self._leader, schedule=schedule,
            relays=relays, on_lane=self._lane, want=want, listen=False))
        connector.run().addErrback(lambda f: log.debug("relay leg {leg}: {f}", leg=leg, f=f.getErrorMessage()))
        return connector

    def _keep(self, connector: PunchConnector) -> PunchConnector:
        self._connectors = [c for c in self._connectors if c.running]
        self._connectors.append(connector)
        return connector

    def _factory(self, leg: int):
        keys, reactor, timeout = self._keys, self._reactor, self._settings.schedule.handshake_timeout
        return lambda c, relay: PeerConnection(c, keys, reactor, timeout, relay=relay, leg=leg if relay else 0)

    def add_relays(self, found: list[tuple[str, int]]) -> None:
        new = [r for r in found if r not in self.relays]
        self.relays.extend(new)
        for connector in self._connectors:
            if connector.running:
                connector.add_relays(new)

    def stop(self) -> None:
        """The transfer is over: stop looking for lanes."""
        self._stopped = True
        cancel(self._auto_timer)
        cancel(self._repunch_timer)
        for growing in list(self._growing.values()):
            growing.cancel()
        for connector in self._connectors:
            if connector.running:
                connector.stop()
        self._connectors = []
        for running in (self._reconnecting, self._upgrading):
            if running is not None:
                running.cancel()

    def report_later(self, client, first_seconds: float) -> None:
        """Sender: once the first punching is over (a direct lane joined,
        or its deadline passed, or the transfer ended), REPORT the path and
        the seconds from PAIRED to it to the rendezvous server C{client},
        then close it."""
        start = self._reactor.seconds() - first_seconds

        async def report():
            try:
                while any(c.running for c in self._main) and not self._stopped and self.link.path != "direct":
                    await task.deferLater(self._reactor, 0.25, lambda: None)
                path = self.link.path if self.link.path != "none" else "relay"
                at = self._direct_at if path == "direct" and self._direct_at is not None else start + first_seconds
                client.report(path, max(0.0, at - start))
            finally:
                await _close(self._reactor, client)

        defer.ensureDeferred(report()).addErrback(lambda f: log.failure("reporting", f))

    # -- lanes arriving ----------------------------------------------------

    def _want(self, candidate) -> bool:
        """The leader joins a connection that proved the key if the
        session has none, or if it is the first direct one."""
        if not self._has_lane():
            return True
        return candidate.path == "direct" and self.link.path != "direct"

    def _lane(self, candidate) -> None:
        if self._stopped:
            return candidate.abandon()
        self.link.join(candidate)
        if self._reconnecting is not None and not self._announced:
            # Back, however it came: say so now (the search winds down on
            # its own).
            self._announced = True
            self._ui.reconnected(self.link.path, self.link.peer, self._reactor.seconds() - self._lost_at)
        if candidate.path == "direct":
            if self._direct_at is None:
                self._direct_at = self._reactor.seconds()
            # Direct: nothing else is needed from this round of punching.
            for connector in self._main:
                if connector.running:
                    connector.stop()
        arrived, self._arrived = self._arrived, []
        for d in arrived:
            d.callback(candidate)
        if self._leader:
            self._grow()

    # -- parallel streams ----------------------------------------------------

    @property
    def _target(self) -> int:
        streams = self._settings.streams
        return streams if isinstance(streams, int) else self._auto.target

    def _grow(self) -> None:
        """Leader: open streams up to the target on the path the session
        runs on: relay legs 1, 2, ... through the relay; through NATs, each
        further direct stream is punched from a fresh port pair, each side's
        port observed by the rendezvous server (L{_punch_stream})."""
        link = self.link
        if self._stopped or link.path == "none":
            return
        if self._settings.streams == "auto" and not self._auto_started:
            self._auto_started = True
            self._auto_step()
        target = min(self._target, MAX_STREAMS)
        if link.path == "relay":
            while self.relays and self._legs < target:
                leg = self._legs
                self._legs += 1
                if link.send_control(GROW, _encode({"leg": leg})):
                    self._relay_leg(leg, self._settings.schedule.handshake_timeout, want=self._on_relay)
            return
        direct = sum(1 for lane in link.live if lane.path == "direct")
        for _ in range(target - direct - len(self._growing)):
            if self._punched >= 4 * MAX_STREAMS:
                return  # (the receiver takes stream numbers up to that)
            self._punched += 1
            self._start_stream(self._punched)

    def _tcp(self) -> tuple[int, int, int] | None:
        """Over every lane so far, what TCP says: bytes the other side
        acknowledged, segments retransmitted, segments sent (a lane that is
        gone keeps its last counts); None where the kernel does not say."""
        seen = self._tcp_seen
        for lane in self.link.up:
            counts = lane.conn.tcp_counts()
            if counts is None:
                return None
            seen[lane] = counts
        return tuple(sum(c[i] for c in seen.values()) for i in range(3))

    def _auto_step(self) -> None:
        """C{--streams auto}: tell it what TCP says, every second, and
        grow when it wants more."""
        self._auto_timer = None
        if self._stopped or self._auto.done:
            return
        tcp = self._tcp() or (self.link.acknowledged, None, None)
        if self._auto.tick(self._reactor.seconds(), *tcp):
            log.info("streams auto: {n} streams", n=self._auto.target)
            self._grow()
        if self._auto.done:
            log.info("streams auto: staying at {n} ({why})", n=self._auto.target, why=self._auto.why)
            return
        self._auto_timer = self._reactor.callLater(1.0, self._auto_step)

    def repunch_later(self, delays=REPUNCH_AFTER, start: float | None = None) -> None:
        """
        Leader, when both NATs keep their mappings: if the session is not
        direct C{delays[0]} seconds after C{start} (default: now), punch again from fresh ports
        on both sides, each observed by the rendezvous server (GROW with
        C{"fresh": true}, as for a further direct stream, but for the
        session's path), and again after each further delay.  A port pair
        can get stuck (a NAT's conntrack entry in SYN_SENT2 drops every
        later SYN on it for about 120 s; ICMP-answering NATs at next to no
        latency), and a new pair is a new draw.
        """
        if not self._leader or not delays:
            return
        start = self._reactor.seconds() if start is None else start

        def check():
            if self._stopped or self.link.path == "direct" or self._reconnecting is not None:
                return
            if self._punched < 4 * MAX_STREAMS:
                self._punched += 1
                self.repunches += 1
                log.info("not direct after {s:g} s: punching again from fresh ports", s=delays[0])
                self._start_stream(self._punched, fresh=True)
            self.repunch_later(delays[1:], start)

        self._repunch_timer = self._reactor.callLater(max(0.0, start + delays[0] - self._reactor.seconds()), check)

    def _start_stream(self, number: int, theirs: dict | None = None, fresh: bool = False) -> None:
        """Punch direct stream C{number} in the background (the leader
        first; the follower with the leader's GROW, C{theirs}); C{fresh}:
        not a further stream but the session's path again (L{repunch_later})."""
        d = defer.ensureDeferred(self._punch_stream(number, theirs, fresh))
        self._growing[number] = d
        d.addErrback(lambda f: log.info("stream {n}: {e}", n=number, e=f.getErrorMessage()))
        d.addBoth(lambda _: self._growing.pop(number, None))

    async def _punch_stream(self, number: int, theirs=None, fresh: bool = False) -> None:
        """One more direct stream: a fresh port, observed by the rendezvous
        server (its WELCOME), told to the other side over the session (GROW
        from the leader, GROWN in reply), then punched like the first."""
        reactor = self._reactor
        client = await connect_rendezvous(reactor, self._settings.server)
        try:
            public = await _timeout(reactor, client.welcomed(), 10, "the rendezvous server")
            server_host = client.transport.getPeer().host
            mine, local_port = _own(client, public, server_host)
            if self._leader:
                reply = defer.Deferred()
                self._replies[number] = reply
                grow = {"punch": number, "candidates": mine, **({"fresh": True} if fresh else {})}
                if not self.link.send_control(GROW, _encode(grow)):
                    return
                try:
                    theirs = await _timeout(reactor, reply, 10, "the other side's stream address")
                finally:
                    self._replies.pop(number, None)
            else:
                if not self.link.send_control(GROWN, _encode({"punch": number, "candidates": mine})):
                    return
            theirs = parse_candidates(theirs, server_host, mine)
            connector = self.punch(local_port, theirs, mine, relays=[], stream=not fresh,
                                   delay=self._follow_delay() if fresh else 0.0)
            punched = connector.run()
            punched.addErrback(lambda f: log.info("stream {n}: {e}", n=number, e=f.getErrorMessage()))
            await _race(reactor, [punched], self._settings.schedule.handshake_timeout)
            connector.stop()
        finally:
            await _close(reactor, client)

    def _follow_delay(self) -> float:
        """Follower, punching again from fresh ports: seconds to hold its
        first attempts back so that they follow the leader's by
        C{settings.stagger}.  The leader starts when our GROWN reaches it,
        over the session's link (not direct: through the relay, which is
        usually the rendezvous server): about half of our round trip to the
        server plus half of the leader's, when both are known (at most
        L{MAX_TIMED_DELAY}); the leader itself never waits."""
        if self._leader:
            return 0.0
        ours, theirs = self.server_rtts
        one_way = min(MAX_TIMED_DELAY, (ours + theirs) / 2) if ours is not None and theirs is not None else 0.0
        return (one_way if self._settings.timed else 0.0) + self._settings.stagger

    def _control(self, kind: int, payload: bytes) -> None:
        if self._stopped or kind not in (GROW, GROWN):
            return
        try:
            message = _decode(payload)
        except SessionError:
            return
        if kind == GROWN and self._leader:
            reply = self._replies.get(message.get("punch"))
            if reply is not None and not reply.called:
                reply.callback(message)
            return
        if kind != GROW or self._leader:
            return
        leg, punch = message.get("leg"), message.get("punch")
        if type(leg) is int and 0 < leg < MAX_STREAMS:
            self._relay_leg(leg, self._settings.schedule.handshake_timeout)
        elif type(punch) is int and 0 < punch <= 4 * MAX_STREAMS and punch not in self._growing:
            self._start_stream(punch, message, fresh=message.get("fresh") is True)

    def _on_relay(self, candidate) -> bool:
        """Leader: a further relay leg joins while the session is on the relay."""
        return self.link.path == "relay"

    def _on_direct(self, candidate) -> bool:
        """Leader: a further direct stream joins while the session is direct."""
        return candidate.path == "direct" and self.link.path == "direct"

    def _path_changed(self, path: str, peer: str, streams: int) -> None:
        if self._reconnecting is None or self._announced:
            self._ui.path(path, peer, streams)

    # -- reconnection --------------------------------------------------------

    def _lost_all(self, reason: str) -> None:
        if self._stopped:
            return self.link.give_up(f"connection lost ({reason})")
        if self._reconnecting is not None:
            return
        if self._upgrading is not None:
            self._upgrading.cancel()
        self._lost_at = self._reactor.seconds()
        self._announced = False
        self._ui.reconnecting(reason)
        self._reconnecting = defer.ensureDeferred(self._reconnect(reason))
        self._reconnecting.addErrback(lambda f: f.trap(defer.CancelledError))

    def _has_lane(self) -> bool:
        return bool(self.link.up)

    async def _reconnect(self, reason: str) -> None:
        reactor, settings = self._reactor, self._settings
        deadline = self._lost_at + settings.reconnect_timeout
        self._legs = 1
        # The relay, at once and again every RELAY_ROUND seconds for as long
        # as we may wait: both sides dial it with the session's token, so it
        # needs no server, and each round overlaps the other side's.
        self._last_relay = None
        relaying = defer.ensureDeferred(self._relay_rounds(deadline))
        relaying.addErrback(lambda f: f.trap(defer.CancelledError))
        try:
            while not self._has_lane() and reactor.seconds() < deadline and not self._stopped:
                try:
                    await self._meet(deadline)
                except (SessionError, RendezvousError, SecurityError, error.ConnectError) as e:
                    log.info("reconnecting: {e}", e=e)
                except defer.CancelledError:
                    raise
                except Exception:
                    log.failure("reconnecting")  # a bug: keep trying the other ways meanwhile
                if not self._has_lane() and reactor.seconds() < deadline:
                    await task.deferLater(reactor, min(1.0, max(0.0, deadline - reactor.seconds())),
                                          lambda: None)
        finally:
            self._reconnecting = None
            relaying.cancel()
            relay = self._last_relay
            if relay is not None and relay.running and self.link.path == "direct":
                relay.stop()
        if self._has_lane():
            if self._leader:
                self._grow()
            if self.link.path == "relay" and not self._stopped:
                # Back on the relay first (it answers fastest): meet and
                # punch anyway, as at the start, so a direct path that is
                # there again takes over.
                self._upgrading = defer.ensureDeferred(self._upgrade())
                self._upgrading.addErrback(lambda f: f.trap(defer.CancelledError))
        elif not self._stopped:
            detail = relay.plan.failure() if relay is not None and relay.plan.errors else "nobody answered"
            self.link.give_up(f"{reason.rstrip('.')}; reconnecting for {settings.reconnect_timeout:g} s "
                              f"failed: {detail}")

    async def _relay_rounds(self, deadline: float) -> None:
        reactor = self._reactor
        while not self._has_lane() and not self._stopped:
            left = deadline - reactor.seconds()
            if left <= 0:
                return
            connector = self._relay_leg(0, min(RELAY_ROUND, left), want=self._want)
            if connector is None:
                return
            self._last_relay = connector
            await _race(reactor, [self._arrival()], min(RELAY_ROUND, left))
            if connector.running and not self._has_lane():
                connector.stop()

    async def _upgrade(self) -> None:
        try:
            # A few tries: the reconnection's own meeting may still hold
            # the nameplate for a moment ("in use").
            for attempt in range(3):
                try:
                    return await self._meet(self._reactor.seconds() + UPGRADE_WAIT, upgrade=True)
                except (SessionError, RendezvousError, SecurityError, error.ConnectError) as e:
                    log.info("looking for a direct path again: {e}", e=e)
                if self._stopped or self.link.path == "direct":
                    return
                await task.deferLater(self._reactor, 1.0, lambda: None)
        finally:
            self._upgrading = None

    async def _meet(self, deadline: float, upgrade: bool = False) -> None:
        """One meeting on the rendezvous server: the nameplate only we can
        derive, fresh nonces in the clear, then our fresh candidates sealed
        under keys of those nonces, then punching from the new port until a
        lane arrives (or, C{upgrade}: a direct one) or the punch gives up."""
        reactor, keys = self._reactor, self._keys
        client = await connect_rendezvous(reactor, self._settings.server)
        try:
            public = await _timeout(reactor, client.welcomed(), 10, "the rendezvous server")
            client.claim(keys.reconnect_nameplate())
            waits = [client.paired()] if upgrade else [client.paired(), self._arrival()]
            first = await _race(reactor, waits, deadline - reactor.seconds())
            if first != 0:
                return  # a lane arrived some other way, or time is up
            # Paired: go through with it even if a relay lane came back
            # meanwhile -- this meeting is what can find a direct path.
            nonce = os.urandom(16)
            client.send(nonce)
            theirs_nonce = await _timeout(reactor, client.receive(), 10, "the other side")
            if len(theirs_nonce) != 16:
                raise SessionError("the other side sent a malformed message")
            pair = (nonce, theirs_nonce) if self._leader else (theirs_nonce, nonce)
            box = keys.reconnect_box(*pair)
            server_host = client.transport.getPeer().host
            mine, local_port = _own(client, public, server_host)
            client.send(box.seal(_encode({"candidates": mine})))
            try:
                message = box.open(await _timeout(reactor, client.receive(), 10, "the other side's addresses"))
            except SecurityError:
                raise SessionError("someone else met us on the reconnection nameplate") from None
            theirs = parse_candidates(_decode(message), server_host, mine)
            # A third message: the server gives back the claim of a
            # pairing whose members each sent three (docs/PROTOCOL.md §1).
            client.send(box.seal(_encode({})))
            log.info("reconnecting: punching from port {port} to {theirs}", port=local_port, theirs=theirs)
            connector = self.punch(local_port, theirs, mine, relays=[])
            punched = connector.run()
            punched.addErrback(lambda f: log.info("reconnection punch: {e}", e=f.getErrorMessage()))
            await _race(reactor, [punched] if upgrade else [punched, self._arrival()],
                        deadline - reactor.seconds() if not upgrade else self._settings.schedule.deadline)
        finally:
            await _close(reactor, client)

    def _arrival(self) -> defer.Deferred:
        d = defer.Deferred(lambda d: self._arrived.remove(d) if d in self._arrived else None)
        self._arrived.append(d)
        return d
