"""
The session layer (protocol v2): the set of authenticated connections one
transfer runs on, between the secure channel (L{p2pft.channel}: one
connection, its records) and the transfer (L{p2pft.transfer}).

  sequence   L{Outbox} and L{Inbox}: numbered records kept until
             acknowledged, and put back in order; plain objects
  link       L{SessionLink}: the transfer's channel over lanes that join
             and leave while it runs (upgrade to direct, cuts, parallel
             streams); reconnection is asked of the layer above
"""

from .interfaces import IRecordHandler
from .link import CONTROL, WINDOW, SessionLink

__all__ = ["CONTROL", "WINDOW", "IRecordHandler", "SessionLink"]
