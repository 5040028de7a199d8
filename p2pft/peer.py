"""
One peer's run: connect a session (L{p2pft.connect}: rendezvous, PAKE,
punching and relays, lanes of a L{p2pft.session.SessionLink}), run the
transfer on it, report.  L{send} and L{receive} are the two entry points of
the CLI and the twistd plugin.
"""

from __future__ import annotations

import os

from twisted.internet import defer, threads

from .connect import FEATURES, MTIME_NS, Session, Settings, establish
from .errors import SessionError
from .secure import RECEIVER, SENDER
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

__all__ = ["FEATURES", "MTIME_NS", "SessionError", "Settings", "receive", "send", "send_text"]


async def _connected(reactor, settings: Settings, role: str, ui, channels: list | None) -> Session:
    """Everything up to the first lane, announced."""
    session = await establish(reactor, settings, role, ui)
    if channels is not None:
        channels.append(session.link)
    ui.connected(session.link.peer, session.path)
    return session


async def _finish(endpoint, ui, session: Session) -> Result:
    """Run the transfer C{endpoint} (started by C{start}) to its end; stop
    looking for lanes either way; report."""
    try:
        result = await endpoint.start()
    finally:
        session.finder.stop()
    link = session.link
    ui.done(result, link.path, routes={**_routes(link), **session.finder.stats()})
    return result


def _routes(link) -> dict:
    """How many payload bytes went each way, and the most streams at once."""
    return {"bytes_direct": link.delivered.direct + link.received.direct,
            "bytes_relay": link.delivered.relay + link.received.relay,
            "streams": max(link.sent.streams, 1)}


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
    session = await _connected(reactor, settings, SENDER, ui, channels)
    sender = Sender(session.link, reactor, manifest, progress=ui.progress, run_blocking=_in_thread, rate=rate,
                    mtime_ns=MTIME_NS in session.features)
    return await _run(sender, ui, session)


async def send_text(reactor, settings: Settings, message: str, ui, channels: list | None = None) -> Result:
    """Send a short text (checked before we connect) for the receiver to
    show; fire once it was acknowledged."""
    text.encode_text(message)
    session = await _connected(reactor, settings, SENDER, ui, channels)
    sender = TextSender(session.link, reactor, message, supported=text.FEATURE in session.features)
    return await _finish(sender, ui, session)


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
    session = await _connected(reactor, settings, SENDER, ui, channels)
    if manifest.checker.streams:
        sender = StreamSender(session.link, reactor, manifest, FDReader(0, reactor), progress=ui.progress,
                              rate=rate)
    else:
        sender = Sender(session.link, reactor, manifest, progress=ui.progress, run_blocking=_in_thread, rate=rate,
                        mtime_ns=MTIME_NS in session.features)
    return await _run(sender, ui, session)


async def _run(sender: Sender, ui, session: Session) -> Result:
    ui.sending(sender.offer)
    return await _finish(sender, ui, session)


async def receive(reactor, settings: Settings, output_dir: str, decide, ui, overwrite: bool = False,
                  channels: list | None = None, stdout=None, skip_unsafe: bool = False) -> Result:
    """Receive an offer into C{output_dir}, or a single file to C{stdout} (a
    binary stream) when given.  C{skip_unsafe}: leave out entries whose
    names cannot be written there instead of refusing the offer.  The
    output folder is checked by the receiver's destination (and, before
    pairing, by the CLI's preflight)."""
    session = await _connected(reactor, settings, RECEIVER, ui, channels)
    if stdout is not None:
        receiver = StdoutReceiver(session.link, reactor, stdout, decide, progress=ui.progress,
                                  show_text=ui.text, mtime_ns=MTIME_NS in session.features)
    else:
        receiver = Receiver(session.link, reactor, output_dir, decide, overwrite=overwrite,
                            progress=ui.progress, run_blocking=_in_thread, show_text=ui.text,
                            skip_unsafe=skip_unsafe, mtime_ns=MTIME_NS in session.features)
    return await _finish(receiver, ui, session)
