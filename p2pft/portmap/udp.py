"""
One request and its answer over UDP, the way PCP and NAT-PMP want it: sent
to the gateway, sent again on a schedule until an answer that parses
arrives, or given up.  RFC 6886 starts at 250 ms and doubles nine times
(over a minute); RFC 6887 starts at 3 s.  A p2pft session cannot wait that
long, so the schedule here is the RFC's start, doubled, cut short:
L{QUICK} sends at 0, 0.25 and 0.75 s and gives up at 1.75 s.  The mapping
is asked for in the background, so even that costs a session nothing but
the mapping itself.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ..util import cancel
from .errors import PortMapError, ReplyError


@attrs.frozen
class Retransmit:
    """Seconds to wait after each send; after the last, give up."""

    waits: tuple[float, ...] = (0.25, 0.5, 1.0)

    @property
    def total(self) -> float:
        return sum(self.waits)


QUICK = Retransmit()


class Exchange(DatagramProtocol):
    """
    The protocol of one exchange: C{done} fires with what C{parse} makes of
    the first answer from C{(gateway, port)} that parses, or fails with a
    L{PortMapError}: the gateway said no (a L{ReplyError} with a result
    code), nothing listens there (an ICMP port unreachable), or no
    usable answer came in time.  Answers that do not parse or do not match
    the request (another nonce, another port) are ignored, as both RFCs
    say; answers from any other address are never even parsed.
    """

    log = Logger()

    def __init__(self, reactor, gateway: str, port: int, payload: bytes, parse: Callable[[bytes], object],
                 schedule: Retransmit = QUICK):
        self._reactor = reactor
        self._peer = (gateway, port)
        self._payload = payload
        self._parse = parse
        self._waits = list(schedule.waits)
        self._timer = None
        self._ignored: str | None = None
        self.done = defer.Deferred()

    def startProtocol(self) -> None:
        self.transport.connect(*self._peer)
        self._send()

    def _send(self) -> None:
        if self.done.called:
            return
        if not self._waits:
            why = f" (ignored: {self._ignored})" if self._ignored else ""
            return self._finish(PortMapError(f"no answer from {self._peer[0]}{why}"))
        try:
            self.transport.write(self._payload)
        except OSError as e:  # (e.g. no route, network down)
            return self._finish(PortMapError(f"cannot send to {self._peer[0]}: {e.strerror or e}"))
        if self.done.called:
            return  # (refused: an earlier send's ICMP, reported from within write())
        self._timer = self._reactor.callLater(self._waits.pop(0), self._send)

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.done.called or tuple(addr[:2]) != self._peer:
            return
        try:
            answer = self._parse(data)
        except ReplyError as e:
            if e.code is None:
                self._ignored = str(e)
                self.log.debug("ignoring an answer from {peer}: {e}", peer=self._peer[0], e=e)
                return
            return self._finish(e)
        self._finish(None, answer)

    def stopProtocol(self) -> None:
        # The port closed under us: the reactor does that when a read
        # fails (an ICMP error other than port unreachable, e.g. host
        # unreachable or administratively prohibited).
        self._finish(PortMapError(f"no answer from {self._peer[0]} (the network reported an error)"))

    def connectionRefused(self) -> None:
        self._finish(PortMapError(f"nothing answers on {self._peer[0]} port {self._peer[1]}"))

    def _finish(self, error: Exception | None, answer=None) -> None:
        if self.done.called:
            return
        cancel(self._timer)
        if self.transport is not None:
            self.transport.stopListening()
        if error is not None:
            self.done.errback(error)
        else:
            self.done.callback(answer)

    def stop(self) -> None:
        """Give up now (the caller no longer wants an answer)."""
        self._finish(PortMapError("cancelled"))


def exchange(reactor, gateway: str, port: int, payload: bytes, parse, schedule: Retransmit = QUICK,
             interface: str = "") -> defer.Deferred:
    """Send C{payload} to C{(gateway, port)} from a fresh UDP port and fire
    with C{parse(answer)} (see L{Exchange}).  Cancelling it stops at once."""
    protocol = Exchange(reactor, gateway, port, payload, parse, schedule)
    try:
        reactor.listenUDP(0, protocol, interface=interface)
    except Exception as e:  # CannotListenError
        return defer.fail(PortMapError(f"cannot open a UDP port: {e}"))
    d = defer.Deferred(lambda _: protocol.stop())
    protocol.done.chainDeferred(d)
    return d
