"""What the layer above and the phases of a connection look like."""

from zope.interface import Interface


class ILaneHandler(Interface):
    """The layer above a chosen connection (the session, L{p2pft.session})."""

    def recordReceived(kind: int, seq: int, payload: bytes) -> None:
        "One authenticated record, in the order it was sent on this connection (none while reading is paused)."

    def channelLost(reason: str) -> None:
        "The connection ended (after or instead of a normal end)."

    def place(kind: int, seq: int, size: int):
        """
        Optional.  A writable memoryview of C{size} bytes to open the
        record (C{kind}, C{seq}) straight into, or None.  Asked only when
        the record would be handed on at once; if a view is lent, the very
        same object is the payload of the next L{recordReceived}.
        """


class IPhase(Interface):
    """One phase of a L{PeerConnection}: it gets every byte read meanwhile."""

    def dataReceived(data: bytes) -> None:
        "Bytes read from the connection, in order."
