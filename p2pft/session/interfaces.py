"""What the transfer above the session looks like to it."""

from zope.interface import Interface


class IRecordHandler(Interface):
    """The layer above the session (the transfer)."""

    def recordReceived(kind: int, payload: bytes) -> None:
        "One record of the other side's transfer, in order, exactly once (none while reading is paused)."

    def channelLost(reason: str) -> None:
        "The session ended (after or instead of a normal end)."

    def place(kind: int, size: int):
        """
        Optional.  Where the next record (C{kind}, C{size} bytes), which
        will be delivered at once, may be opened straight into: a writable
        memoryview lent by the handler, then the very payload of the next
        L{recordReceived}; or None.
        """
