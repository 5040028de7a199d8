"""
The secure channel on one TCP connection (layer 4): a thin Twisted
protocol around the plain machines of L{p2pft.secure}.

A L{PeerConnection} starts as a punching candidate
(L{p2pft.punch.ICandidate}): it runs the proof handshake and reports to its
connector.  Once chosen it becomes an encrypted record channel for the
transfer layer (L{IRecordHandler} above, records below).  A candidate that
fails the handshake is dropped silently.

The protocol (C{connection}) only moves bytes: it holds the current phase
and forwards what it reads to it.  The phases, in order, are plain objects
that tests drive without sockets:

1. C{greeting.RelayGreeting}, only through a relay: C{RELAY <token>
   <role>}, then the relay's C{OK}; hands the bytes after it on.
2. C{candidate.CandidateHandshake}: HELLO / PROOF / SELECT
   (L{p2pft.secure.Handshake}) under the handshake timer.
3. C{records.Records}: the chosen connection's records, sealed and opened
   with the connection's binding, for an L{ILaneHandler}.

C{interfaces} holds L{ILaneHandler} and the phases' C{IPhase}.
"""

from .connection import PeerConnection
from .interfaces import ILaneHandler
from .records import KEEPALIVE, KEEPALIVE_INTERVAL

__all__ = ["KEEPALIVE", "KEEPALIVE_INTERVAL", "ILaneHandler", "PeerConnection"]
