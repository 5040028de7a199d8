"""What the layer above and the phases of a connection look like."""

from zope.interface import Interface


class IRecordHandler(Interface):
    """The layer above a chosen channel (the transfer)."""

    def recordReceived(kind: int, payload: bytes) -> None:
        "One authenticated record, in order (none while reading is paused)."

    def channelLost(reason: str) -> None:
        "The connection ended (after or instead of a normal end)."


class IPhase(Interface):
    """One phase of a L{PeerConnection}: it gets every byte read meanwhile."""

    def dataReceived(data: bytes) -> None:
        "Bytes read from the connection, in order."
