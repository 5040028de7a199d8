"""
One p2pft session, layer by layer:

  rendezvous (pair on a nameplate)  ->  PAKE + key confirmation
  -> candidates (sealed)  ->  punch (one authenticated connection)
  -> transfer  ->  result

The layers never call each other; this module passes each one's output to
the next.  L{send} and L{receive} are the two entry points of the CLI and
the twistd plugin.
"""

from __future__ import annotations

import os
import re

import attrs
from twisted.internet import defer, error, threads
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import ClientFactory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from zope.interface import implementer

from . import codes
from .transfer import text
from .addresses import Address, global_ipv6_addresses, is_host_or_link_only, is_loopback, normalise_host, parse_ip
from .channel import PeerConnection
from .punch import PunchConnector, PunchFailed, PunchSchedule
from .rendezvous import PeerGone, RendezvousClientProtocol, RendezvousError
from .secure import RECEIVER, SENDER, Pake, SecurityError, WrongCode
from .errors import ScanError
from .transfer.manifest import FILE, Entry, ManifestChecker
from .transfer.scan import Manifest, scan, stream_manifest
from .transfer import (
    FDReader,
    Receiver,
    Result,
    Sender,
    StdoutReceiver,
    StreamSender,
    TextSender,
    TransferFailed,
    is_stream,
)
from .util import cancel, dump_object, load_object, printable

log = Logger()

#: Default seconds to wait for each step once paired.
MESSAGE_TIMEOUT = 60.0
#: What this p2pft announces in its key confirmation beyond protocol v1
#: (docs/PROTOCOL.md section 2): "text", it takes TEXT records; "mtime-ns",
#: manifest times in nanoseconds (used only when both sides announce it).
MTIME_NS = "mtime-ns"
FEATURES = (text.FEATURE, MTIME_NS)
#: Most candidates accepted from the peer (a host has a few addresses: one
#: per interface and family, and the one the server saw).
MAX_CANDIDATES = 16
#: Addresses dialled per relay name the server advertised, at most (one per
#: family is what a dual-stack relay needs; a name resolving to a hundred
#: addresses must not make us open a hundred connections).
MAX_RELAY_ADDRESSES = 2
#: What a relay name the server advertises must look like: a DNS host name
#: (letters, digits, hyphens, dots; RFC 1123), and not a numeric form only
#: the C library's legacy parser reads as an address (C{127.1},
#: C{2130706433}, C{0x7f.1}: a last label of digits or 0x-hex, which no
#: top-level domain is).
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)(?![0-9]+\.?\Z)(?!0[xX][0-9a-fA-F]*\.?\Z)"
    r"[A-Za-z0-9-]{1,63}(?<!-)\.?\Z")


class SessionError(Exception):
    """A failure to report to the user, in one line."""


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


def _timeout(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    def translate(f):
        f.trap(defer.TimeoutError)
        raise SessionError(f"timed out after {seconds:g} s waiting for {what}")

    d.addTimeout(seconds, reactor)
    return d.addErrback(translate)


async def _connect_rendezvous(reactor, server: tuple[str, int]) -> RendezvousClientProtocol:
    """
    Connect to the server, over IPv4 when it has an IPv4 address: that is
    the family NATs translate, so the address the server sees is the public
    candidate the other peer needs (IPv6 addresses are added as extra
    candidates).  Over IPv6 only for an IPv6 literal or a server without
    IPv4.  The socket is bound with SO_REUSEADDR + SO_REUSEPORT so the punch
    listener and outgoing attempts can share its port later.
    """
    host, port = server
    binding = makeBinding("", 0, reuseAddress=True, reusePort=True)
    factory = ClientFactory.forProtocol(RendezvousClientProtocol)
    try:
        if ":" in host:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=10, bindAddress=binding)
            return await endpoint.connect(factory)
        try:
            return await TCP4ClientEndpoint(reactor, host, port, timeout=10, bindAddress=binding).connect(factory)
        except error.DNSLookupError:
            # No IPv4 address for that name: try whatever it has.
            endpoint = HostnameEndpoint(reactor, host, port, timeout=10, bindAddress=binding)
            return await endpoint.connect(factory)
    except (error.ConnectError, error.DNSLookupError) as e:
        why = {error.ConnectionRefusedError: "connection refused", error.TimeoutError: "timed out",
               error.DNSLookupError: "name not found", error.NoRouteError: "no route to host"}.get(
                   type(e), str(e.args[0] if e.args and e.args[0] else e.__doc__).lower())
        raise SessionError(f"cannot reach the rendezvous server {host}:{port}: {why}") from None


@attrs.define
class _Established:
    channel: PeerConnection
    path: str = "direct"
    #: What the other side's p2pft announced it can do (L{FEATURES}).
    features: frozenset = frozenset()


async def _establish(reactor, settings: Settings, role: str, ui) -> _Established:
    client = await _connect_rendezvous(reactor, settings.server)
    try:
        return await _pair_and_punch(reactor, client, settings, role, ui)
    finally:
        # Wait until what we sent has left (a key confirmation written just
        # before we fail must still reach the other side, or it would see
        # us vanish instead of a wrong code), but never for long.
        closed = client.close()
        closed.addTimeout(2, reactor)
        try:
            await closed
        except defer.TimeoutError:
            pass


async def _pair_and_punch(reactor, client, settings, role, ui) -> _Established:
    public = await _timeout(reactor, client.welcomed(), 30, "the rendezvous server")
    if settings.code:
        code = codes.parse_code(settings.code)
        client.claim(code.nameplate)
    else:
        nameplate = await _timeout(reactor, client.allocate(), 30, "a nameplate")
        code = codes.Code(nameplate, codes.make_password(settings.code_length))
    ui.code(str(code), announce=not settings.code)
    await client.paired()
    ui.paired()

    # Key agreement, then key confirmation, then candidates: nothing but the
    # SPAKE2 message leaves in the clear.
    pake = Pake(code.password, code.nameplate, role)
    client.send(pake.start())
    keys = pake.finish(await _timeout(reactor, client.receive(), settings.timeout, "the other side"))
    box = keys.box()
    client.send(box.seal(_encode({"confirm": "p2pft/v1", "features": list(FEATURES)})))
    try:
        confirm = _decode(box.open(await _timeout(reactor, client.receive(), settings.timeout, "key confirmation")))
    except SecurityError:
        raise WrongCode(
            "wrong code: the other side used a different code, or someone tampered "
            "with the exchange (this code is now used up)"
        ) from None
    if confirm.get("confirm") != "p2pft/v1":
        raise SessionError("the other side speaks another version of p2pft")
    features = confirm.get("features")
    features = frozenset(f for f in features if isinstance(f, str)) if isinstance(features, list) else frozenset()

    local = client.transport.getHost()
    server_host = client.transport.getPeer().host
    mine = _candidates(public, (normalise_host(local.host), local.port),
                       [] if is_loopback(server_host) else global_ipv6_addresses())
    client.send(box.seal(_encode({"candidates": mine})))
    theirs = _parse_candidates(_decode(box.open(
        await _timeout(reactor, client.receive(), settings.timeout, "the other side's addresses")
    )), server_host, mine)
    log.info("punching from port {port} to {theirs}", port=local.port, theirs=theirs)

    relays, names = _relays(settings, client.relays, server_host)
    connector = PunchConnector(
        reactor, local.port, theirs,
        lambda c, relay: PeerConnection(c, keys, reactor, settings.schedule.handshake_timeout, relay=relay),
        leader=(role == SENDER), schedule=settings.schedule, relays=relays,
        own_hosts=frozenset(str(parse_ip(h)) for h, _ in mine if parse_ip(h) is not None),
    )
    if names:
        # Resolved while we punch (DNS must not hold up the race); only
        # what the names resolve to, filtered, is ever dialled.
        resolving = _resolve_relays(settings.resolver or reactor.nameResolver, names, server_host)
        resolving.addCallback(connector.add_relays)
        resolving.addErrback(lambda f: log.failure("resolving relays", f))
    channel = await _punch_watching_partner(reactor, client, connector, role, settings.schedule)
    return _Established(channel, channel.path, features)


def _relays(settings: Settings, specs: list[str],
            server_host: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """
    The relay the user named (trusted as given: dialled as named), else the
    ones the server advertised, as (addresses to dial, names to resolve
    first with L{_resolve_relays}).  C{"*"} is the server itself, at the
    address we reached it on.  The server is not trusted to steer our
    connections: an address that leads to this host or this link only
    (L{is_host_or_link_only}; IPv4-mapped IPv6 is judged as the IPv4
    address it is) is ignored unless the server itself is on loopback, and
    so is anything that is neither an IP literal nor a DNS host name.
    """
    from .rendezvous import parse_server

    if settings.relay is not None:
        return [settings.relay], []
    server_host = normalise_host(server_host)
    out, names = [], []
    for spec in specs:
        if spec == "*":
            out.append((server_host, settings.server[1]))
            continue
        try:
            host, port = parse_server(spec)
        except ValueError:
            host, port = "", 0
        ip = parse_ip(host)
        if ip is not None and _relay_allowed(ip, server_host):
            out.append((str(ip), port))
        elif ip is None and port and _HOST_NAME.match(host):
            names.append((host, port))
        else:
            log.warn("ignoring relay {spec} advertised by the server", spec=printable(spec, 80))
    return out, names


def _relay_allowed(ip: Address, server_host: str) -> bool:
    return not is_host_or_link_only(ip) or is_loopback(server_host)


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what a name resolves to (an L{IResolutionReceiver})."""

    def __init__(self):
        self.found: list[str] = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def _resolve_relays(resolver, names: list[tuple[str, int]], server_host: str) -> defer.Deferred:
    """
    Resolve relay names with C{resolver} (an
    L{twisted.internet.interfaces.IHostnameResolver}: the reactor's
    C{nameResolver}, getaddrinfo on a thread) and fire with the addresses
    to dial: what each name resolves to, filtered like a literal relay
    address (L{_relays}), at most L{MAX_RELAY_ADDRESSES} per name.  A name
    that resolves to nothing usable is dropped.
    """
    def usable(found: list[str], spec: str, port: int) -> list[tuple[str, int]]:
        keep = []
        for host in found:
            ip = parse_ip(host)  # (a scoped link-local address: None)
            if ip is None or not _relay_allowed(ip, server_host):
                log.warn("ignoring relay {spec}: it resolves to {ip}", spec=spec, ip=printable(host, 80))
            elif (str(ip), port) not in keep:
                keep.append((str(ip), port))
        return keep[:MAX_RELAY_ADDRESSES]

    lookups = []
    for host, port in names:
        receiver = _Addresses()
        resolver.resolveHostName(receiver, host, port)
        lookups.append(receiver.done.addCallback(usable, printable(host, 80), port))
    d = defer.gatherResults(lookups, consumeErrors=True)
    return d.addCallback(lambda found: [a for addresses in found for a in addresses])


async def _punch_watching_partner(reactor, client, connector, role, schedule) -> PeerConnection:
    """
    Punch, but stop early if the partner leaves the rendezvous server: the
    sender at once (the receiver only leaves after the sender chose), the
    receiver after a grace period (the sender leaves right after choosing,
    so its SELECT may still be on the way).  The server itself going away is
    fine: it is not needed any more.
    """
    punched = connector.run()
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
        raise SessionError("the other side left before a direct connection was made") from None
    except PunchFailed as e:
        raise SessionError(str(e)) from None
    finally:
        watch.cancel()
        for t in timers:
            cancel(t)


def _candidates(public: tuple[str, int], local: tuple[str, int], ipv6: list[str] = ()) -> list[list]:
    """
    What we tell the peer: the address the server saw (our NAT's public
    side), the local address of the rendezvous connection (for a peer on the
    same LAN), and our global IPv6 addresses on the same port number (IPv6
    rarely has NAT).  A peer on a loopback server gets no IPv6 addresses:
    both ends are on this machine.
    """
    found = [list(public)]
    for host, port in [local] + [(v6, local[1]) for v6 in ipv6]:
        if [host, port] not in found and host not in ("0.0.0.0", "::"):
            found.append([host, port])
    return found


def _parse_candidates(message: dict, server_host: str = "", mine=()) -> list[tuple[str, int]]:
    """
    The peer's candidates, as docs/PROTOCOL.md section 2 says: of the first
    C{4 * MAX_CANDIDATES} entries, those that are C{[host, port]} with
    C{host} a str holding an IP literal and C{port} an int (not a bool) in
    1..65535, and whose address can be another computer's
    (L{_candidate_allowed}) and is not one of C{mine} (our own candidates,
    mirrored back at us); duplicates dropped; at most L{MAX_CANDIDATES}.
    """
    ours = {(str(parse_ip(h)), p) for h, p in mine if parse_ip(h) is not None}
    raw = message.get("candidates")
    if not isinstance(raw, list):
        raise SessionError("the other side sent no addresses")
    loopback_server = is_loopback(server_host)
    out: list[tuple[str, int]] = []
    for item in raw[: MAX_CANDIDATES * 4]:
        if len(out) == MAX_CANDIDATES:
            break
        if not (isinstance(item, list) and len(item) == 2):
            continue
        host, port = item
        ip = parse_ip(host)
        if ip is None or type(port) is not int or not 0 < port < 65536:
            continue
        if not _candidate_allowed(ip, host, loopback_server):
            continue
        if (str(ip), port) not in out and (str(ip), port) not in ours:
            out.append((str(ip), port))
    if not out:
        raise SessionError("the other side sent no usable addresses")
    return out


def _candidate_allowed(ip: Address, host: str, loopback_server: bool) -> bool:
    """Loopback only when the server is on loopback (both peers are then on
    this machine); never an address that is this host or many hosts
    (unspecified, 0.0.0.0/8, multicast, broadcast), nor IPv6 link-local (it
    needs a scope we cannot know), IPv4-mapped (IPv4 in disguise: the IPv4
    form is what a peer sends) or IPv4-compatible.  IPv4 link-local is kept:
    a peer on the same link without DHCP has nothing else."""
    if ":" in host and ip.version == 4:
        return False  # ::ffff:a.b.c.d
    if ip.is_loopback:
        return loopback_server
    if ip.version == 4 and ip.is_link_local:
        return True
    return not is_host_or_link_only(ip)


_encode = dump_object


def _decode(data: bytes) -> dict:
    try:
        return load_object(data)
    except ValueError:
        raise SessionError("the other side sent a malformed message") from None


def _translate(e: Exception) -> Exception:
    if isinstance(e, (SessionError, TransferFailed, WrongCode)):
        return e
    if isinstance(e, (RendezvousError, SecurityError, codes.CodeError)):
        return SessionError(str(e))
    return e


async def _connected(reactor, settings: Settings, role: str, ui, channels: list | None) -> _Established:
    """Everything up to a chosen, announced channel, with one-line errors."""
    try:
        est = await _establish(reactor, settings, role, ui)
    except Exception as e:
        raise _translate(e) from None
    if channels is not None:
        channels.append(est.channel)
    ui.connected(est.channel.peer, est.path)
    return est


def _in_thread(f, *args) -> defer.Deferred:
    return threads.deferToThread(f, *args)


async def send(reactor, settings: Settings, paths: list[str], ui, channels: list | None = None,
               follow_symlinks: bool = False, rate: int | None = None) -> Result:
    """Send files and folders (C{["-"]}: standard input); fire with the
    L{Result} once the receiver acknowledged everything.  Every path is
    checked before we connect."""
    if list(paths) == ["-"]:
        return await _send_stdin(reactor, settings, ui, channels, rate)
    try:
        manifest = scan(paths, follow_symlinks, notice=ui.say)
    except ScanError as e:
        raise SessionError(str(e)) from None
    est = await _connected(reactor, settings, SENDER, ui, channels)
    sender = Sender(est.channel, reactor, manifest, progress=ui.progress, run_blocking=_in_thread, rate=rate,
                    mtime_ns=MTIME_NS in est.features)
    return await _run(sender, ui, est)


async def send_text(reactor, settings: Settings, message: str, ui, channels: list | None = None) -> Result:
    """Send a short text (checked before we connect) for the receiver to
    show; fire once it was acknowledged."""
    try:
        text.encode_text(message)
    except TransferFailed as e:
        raise SessionError(str(e)) from None
    est = await _connected(reactor, settings, SENDER, ui, channels)
    sender = TextSender(est.channel, reactor, message, supported=text.FEATURE in est.features)
    result = await sender.start()
    ui.done(result, est.path)
    return result


async def _send_stdin(reactor, settings: Settings, ui, channels, rate: int | None) -> Result:
    """Standard input: a stream of unknown length (pipe, terminal), or, when
    it is redirected from a regular file, that file with its size."""
    if is_stream(0):
        manifest = stream_manifest()
    else:
        checker = ManifestChecker()
        checker.add(Entry("stdin", FILE, os.fstat(0).st_size))
        checker.finish()
        manifest = Manifest(checker, ["/dev/stdin"])
    est = await _connected(reactor, settings, SENDER, ui, channels)
    if manifest.checker.streams:
        sender = StreamSender(est.channel, reactor, manifest, FDReader(0, reactor), progress=ui.progress, rate=rate)
    else:
        sender = Sender(est.channel, reactor, manifest, progress=ui.progress, run_blocking=_in_thread, rate=rate,
                        mtime_ns=MTIME_NS in est.features)
    return await _run(sender, ui, est)


async def _run(sender: Sender, ui, est: _Established) -> Result:
    ui.sending(sender.offer)
    result = await sender.start()
    ui.done(result, est.path)
    return result


async def receive(reactor, settings: Settings, output_dir: str, decide, ui, overwrite: bool = False,
                  channels: list | None = None, stdout=None, skip_unsafe: bool = False) -> Result:
    """Receive an offer into C{output_dir}, or a single file to C{stdout} (a
    binary stream) when given.  C{skip_unsafe}: leave out entries whose
    names cannot be written there instead of refusing the offer."""
    if stdout is None and not os.path.isdir(output_dir):
        raise SessionError(f"{output_dir}: no such directory")
    est = await _connected(reactor, settings, RECEIVER, ui, channels)
    if stdout is not None:
        receiver = StdoutReceiver(est.channel, reactor, stdout, decide, progress=ui.progress,
                                  show_text=ui.text, mtime_ns=MTIME_NS in est.features)
    else:
        receiver = Receiver(est.channel, reactor, output_dir, decide, overwrite=overwrite,
                            progress=ui.progress, run_blocking=_in_thread, show_text=ui.text,
                            skip_unsafe=skip_unsafe, mtime_ns=MTIME_NS in est.features)
    result = await receiver.start()
    ui.done(result, est.path)
    return result
