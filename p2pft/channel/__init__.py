"""
The secure channel on one TCP connection (layer 4): L{PeerConnection}, a
thin protocol over the phases of a connection.
"""

from .connection import (KEEPALIVE, KEEPALIVE_INTERVAL, READ_SIZE, SEND_SIZE, IRecordHandler,
                         PeerConnection)

__all__ = ["KEEPALIVE", "KEEPALIVE_INTERVAL", "READ_SIZE", "SEND_SIZE", "IRecordHandler", "PeerConnection"]
