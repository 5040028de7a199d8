"""
What the servers tell their operator, as one small interface: the state
machines (L{p2pft.server.rendezvous}, L{p2pft.server.nameplates},
L{p2pft.server.relay}, L{p2pft.server.splice}) call an L{IServerEvents} at
each event an operator cares about, and know nothing about logs or
metrics.  L{p2pft.server.logs} writes them as log lines,
L{p2pft.server.metrics} counts them; L{FanOut} gives one event to both.

What an event may carry is chosen here, once: an address key (an IPv4
address or an IPv6 /64, what the per-address limits count), a fixed
reason name from L{Refusal} or L{ENDINGS}, numbers.  Never a nameplate, a
code, a relay token, a message or anything else a client typed: a client's
own words (an unknown command, say) may be a code pasted in the wrong
place, and a nameplate ties a code someone shared to an address.
"""

from __future__ import annotations

import enum

from zope.interface import Interface, implementer


class Refusal(enum.Enum):
    """
    Every reason a server refuses a connection: the value is the fixed name
    logs and the C{reason} label of the refusal metric use (a bounded
    set), C{text} the ERROR line's text (a format string for the few that
    name what was refused, filled in for the client only).
    """

    BUSY = ("busy", "server is busy, try again later")
    PER_IP = ("per-ip", "too many connections from your address")
    HELLO_TIMEOUT = ("hello-timeout", "timed out waiting for ALLOCATE or CLAIM")
    ALREADY_ON_NAMEPLATE = ("already-on-nameplate", "already on a nameplate")
    FULL = ("full", "server is full, try again later")
    INVALID_NAMEPLATE = ("invalid-nameplate", "invalid nameplate")
    NAMEPLATE_IN_USE = ("nameplate-in-use", "nameplate {name} is in use")
    CLAIM_RATE = ("claim-rate", "too many claims from your address, try again later")
    MSG_BEFORE_PAIRED = ("msg-before-paired", "MSG before PAIRED")
    TOO_MANY_MESSAGES = ("too-many-messages", "too many messages")
    BAD_MESSAGE = ("bad-message", "{detail}")
    NOT_UTF8 = ("not-utf8", "line is not UTF-8")
    LINE_TOO_LONG = ("line-too-long", "line too long")
    UNKNOWN_COMMAND = ("unknown-command", "unknown command {command!r}")
    RELAY_NOT_FIRST = ("relay-not-first", "RELAY must be the first line")
    BAD_REPORT = ("bad-report", "{detail}")
    # The relay's.
    RELAY_FULL = ("relay-full", "relay is full, try again later")
    RELAY_BUSY = ("relay-busy", "relay is busy, try again later")
    RELAY_PER_IP = ("relay-per-ip", "too many relay connections from your address")
    RELAY_TIMEOUT = ("relay-timeout", "timed out waiting for RELAY")
    RELAY_MALFORMED = ("relay-malformed", "{detail}")
    RELAY_SIDE_TAKEN = ("relay-side-taken", "this session already has a {side}")
    RELAY_TOO_MANY_LEGS = ("relay-too-many-legs", "this session has too many legs")
    RELAY_ALONE = ("relay-alone", "the other side never came")
    RELAY_SPENT = ("relay-spent", "this session used up its byte allowance on this relay")
    RELAY_DATA_BEFORE_OK = ("relay-data-before-ok", "data before OK")

    def __init__(self, label: str, text: str):
        self.label = label
        self.text = text

    def message(self, **fields) -> str:
        """The ERROR text for the client."""
        return self.text.format(**fields) if fields else self.text


#: Why a relayed session ended (the C{why} of L{IServerEvents.relaySessionEnded}).
ENDINGS = ("closed", "lost", "idle", "byte-cap")
#: What a peer may report (L{IServerEvents.peerReport}).
PATHS = ("direct", "relay")


class IServerEvents(Interface):
    """What happened on a server, one call per event."""

    def listening(service: str, address: str, settings: dict) -> None:
        "C{service} (rendezvous, relay) listens on C{address} with these limits."

    def connected(address: str) -> None:
        "A client connection from the address key C{address} arrived."

    def refused(reason: Refusal, address: str) -> None:
        "A connection from C{address} was refused (ERROR, then closed)."

    def paired(seconds: float) -> None:
        "A nameplate got its second member C{seconds} after its first."

    def expired(paired: bool) -> None:
        "A nameplate timed out, its members waiting (C{paired}: or pairing) too long."

    def relaySessionStarted(session: int, addresses: tuple[str, str]) -> None:
        "A relay session's first two legs were spliced (one token, however many legs): session number C{session}."

    def relaySessionEnded(session: int, bytes: int, seconds: float, why: str) -> None:
        """Session C{session} ended (its last leg) after C{bytes} (all legs,
        both ways) and C{seconds}; C{why}, its last pair's, is one of
        L{ENDINGS}."""

    def peerReport(path: str, seconds: float) -> None:
        "A sender reported its session went C{path} (L{PATHS}), C{seconds} after pairing."


@implementer(IServerEvents)
class NoEvents:
    """Tells nobody (tests, and servers built without an observer)."""

    def listening(self, service, address, settings):
        pass

    def connected(self, address):
        pass

    def refused(self, reason, address):
        pass

    def paired(self, seconds):
        pass

    def expired(self, paired):
        pass

    def relaySessionStarted(self, session, addresses):
        pass

    def relaySessionEnded(self, session, bytes, seconds, why):
        pass

    def peerReport(self, path, seconds):
        pass


NO_EVENTS = NoEvents()


@implementer(IServerEvents)
class FanOut:
    """Each event to every one of C{observers}, in order."""

    def __init__(self, *observers: IServerEvents):
        self.observers = observers

    def __getattr__(self, name):
        if name not in IServerEvents:
            raise AttributeError(name)
        calls = [getattr(o, name) for o in self.observers]

        def fan(*args, **kw):
            for call in calls:
                call(*args, **kw)

        setattr(self, name, fan)  # looked up once per name
        return fan
