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

import attrs
from twisted.internet import defer, error, threads
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger

from . import codes
from .addresses import global_ipv6_addresses, is_loopback, normalise_host, parse_ip
from .candidates import own_candidates, parse_candidates, relays, resolve_relays
from .channel import PeerConnection
from .errors import SessionError
from .punch import PunchConnector, PunchSchedule
from .rendezvous import PeerGone, RendezvousClientProtocol
from .secure import RECEIVER, SENDER, Pake, SecurityError, WrongCode
from .transfer import text
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
    is_stream,
)
from .util import cancel, dump_object, load_object

__all__ = ["FEATURES", "MTIME_NS", "SessionError", "Settings", "receive", "send", "send_text"]

log = Logger()

#: Default seconds to wait for each step once paired.
MESSAGE_TIMEOUT = 60.0
#: What this p2pft announces in its key confirmation beyond protocol v1
#: (docs/PROTOCOL.md section 2): "text", it takes TEXT records; "mtime-ns",
#: manifest times in nanoseconds (used only when both sides announce it).
MTIME_NS = "mtime-ns"
FEATURES = (text.FEATURE, MTIME_NS)


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
    #: Seconds from PAIRED to the chosen connection.
    connect_seconds: float = 0.0


async def _establish(reactor, settings: Settings, role: str, ui) -> _Established:
    client = await _connect_rendezvous(reactor, settings.server)
    try:
        est = await _pair_and_punch(reactor, client, settings, role, ui)
        if role == SENDER:
            # One anonymous count for the server's metrics, once per
            # session (so by one side only): how it connected.
            client.report(est.path, est.connect_seconds)
        return est
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
    paired_at = reactor.seconds()
    ui.paired()
    # Key agreement, then key confirmation, then candidates: nothing but the
    # SPAKE2 message leaves in the clear.
    keys, box, features = await _agree_keys(reactor, client, code, role, settings.timeout)

    local = client.transport.getHost()
    server_host = client.transport.getPeer().host
    mine = own_candidates(public, (normalise_host(local.host), local.port),
                          [] if is_loopback(server_host) else global_ipv6_addresses())
    client.send(box.seal(_encode({"candidates": mine})))
    theirs = parse_candidates(_decode(box.open(
        await _timeout(reactor, client.receive(), settings.timeout, "the other side's addresses")
    )), server_host, mine)
    log.info("punching from port {port} to {theirs}", port=local.port, theirs=theirs)

    dial, names = relays(settings, client.relays, server_host)
    connector = PunchConnector(
        reactor, local.port, theirs,
        lambda c, relay: PeerConnection(c, keys, reactor, settings.schedule.handshake_timeout, relay=relay),
        leader=(role == SENDER), schedule=settings.schedule, relays=dial,
        own_hosts=frozenset(str(parse_ip(h)) for h, _ in mine if parse_ip(h) is not None),
    )
    if names:
        # Resolved while we punch (DNS must not hold up the race); only
        # what the names resolve to, filtered, is ever dialled.
        resolving = resolve_relays(settings.resolver or reactor.nameResolver, names, server_host)
        resolving.addCallback(connector.add_relays)
        resolving.addErrback(lambda f: log.failure("resolving relays", f))
    channel = await _punch_watching_partner(reactor, client, connector, role, settings.schedule)
    return _Established(channel, channel.path, features, max(0.0, reactor.seconds() - paired_at))


async def _agree_keys(reactor, client, code: codes.Code, role: str, timeout: float):
    """SPAKE2 over the rendezvous server, then key confirmation (which also
    carries the L{FEATURES} each side announces): the session keys, the
    L{Box} for the rest of the rendezvous messages (one box: its nonces
    count on from the confirmation's), and the other side's features; or
    L{WrongCode}."""
    pake = Pake(code.password, code.nameplate, role)
    client.send(pake.start())
    keys = pake.finish(await _timeout(reactor, client.receive(), timeout, "the other side"))
    box = keys.box()
    client.send(box.seal(_encode({"confirm": "p2pft/v1", "features": list(FEATURES)})))
    try:
        confirm = _decode(box.open(await _timeout(reactor, client.receive(), timeout, "key confirmation")))
    except SecurityError:
        raise WrongCode(
            "wrong code: the other side used a different code, or someone tampered "
            "with the exchange (this code is now used up)"
        ) from None
    if confirm.get("confirm") != "p2pft/v1":
        raise SessionError("the other side speaks another version of p2pft")
    features = confirm.get("features")
    features = frozenset(f for f in features if isinstance(f, str)) if isinstance(features, list) else frozenset()
    return keys, box, features


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
    finally:
        watch.cancel()
        for t in timers:
            cancel(t)


_encode = dump_object


def _decode(data: bytes) -> dict:
    try:
        return load_object(data)
    except ValueError:
        raise SessionError("the other side sent a malformed message") from None


async def _connected(reactor, settings: Settings, role: str, ui, channels: list | None) -> _Established:
    """Everything up to a chosen, announced channel."""
    est = await _establish(reactor, settings, role, ui)
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
    manifest = scan(paths, follow_symlinks, notice=ui.say)
    est = await _connected(reactor, settings, SENDER, ui, channels)
    sender = Sender(est.channel, reactor, manifest, progress=ui.progress, run_blocking=_in_thread, rate=rate,
                    mtime_ns=MTIME_NS in est.features)
    return await _run(sender, ui, est)


async def send_text(reactor, settings: Settings, message: str, ui, channels: list | None = None) -> Result:
    """Send a short text (checked before we connect) for the receiver to
    show; fire once it was acknowledged."""
    text.encode_text(message)
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
    names cannot be written there instead of refusing the offer.  The
    output folder is checked by the receiver's destination (and, before
    pairing, by the CLI's preflight)."""
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
