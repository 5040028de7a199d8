"""
The first phase of a connection through a relay: C{RELAY <token> <role>}
(C{RELAY <token> <role> <leg>} for legs 1..15), then the relay's C{OK}
(docs/PROTOCOL.md, the relay section).
"""

from __future__ import annotations

from typing import Callable

import attrs
from zope.interface import implementer

from ..util import printable
from .interfaces import IPhase


#: Bytes of a relay's reply without a newline before we give up on it: the
#: relay says C{OK} or one short C{ERROR} line (a rendezvous server relaying
#: on its own port greets with its WELCOME line first).
MAX_RELAY_LINE = 512
#: Characters of a relay's refusal kept for the error line.
MAX_REFUSAL = 200
#: Legs one session may have through a relay: 0 .. RELAY_LEGS - 1 (the
#: relay's own limit, L{p2pft.server.relay.MAX_LEGS}, is the same number).
RELAY_LEGS = 16


def _check_leg(leg: object) -> None:
    if type(leg) is not int or not 0 <= leg < RELAY_LEGS:
        raise ValueError(f"relay leg must be an int from 0 to {RELAY_LEGS - 1}, not {leg!r}")


@implementer(IPhase)
@attrs.define(eq=False)
class RelayGreeting:
    """
    Through a relay: ask it to join us with the other side, then wait for
    its C{OK}.  A rendezvous server relaying on its own port greets first
    with its WELCOME line, which is skipped (once).  On C{OK}, C{joined}
    gets the bytes read after it (the start of the other side's HELLO); on
    anything else C{drop} gets the reason.

    C{leg} is which of the session's connections through this relay this
    is: the relay splices our leg N to the other side's leg N.  Leg 0 sends
    exactly the v1 line (no leg field), so a relay that predates legs still
    serves it; such a relay refuses the others with an ERROR.
    """

    token: str
    role: str
    write: Callable[[bytes], object]
    drop: Callable[[str], object]
    joined: Callable[[bytes], object]
    leg: int = attrs.field(default=0, validator=lambda _, attribute, value: _check_leg(value))
    _buffer: bytes = b""
    _welcomed: bool = False

    def start(self) -> None:
        leg = f" {self.leg}" if self.leg else ""
        self.write(f"RELAY {self.token} {self.role}{leg}\n".encode("ascii"))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        line, newline, rest = self._buffer.partition(b"\n")
        if newline and line.startswith(b"WELCOME ") and not self._welcomed:
            self._welcomed = True
            self._buffer = rest
            line, newline, rest = rest.partition(b"\n")
        if not newline:
            if len(self._buffer) > MAX_RELAY_LINE:
                self.drop("relay sent an overlong line")
            return
        if line.rstrip(b"\r") != b"OK":
            text = line.decode("utf-8", "replace").removeprefix("ERROR ").strip()
            # What a relay says reaches the user's terminal: escaped.
            self.drop(f"relay refused: {printable(text, MAX_REFUSAL)}")
            return
        self.joined(rest)
