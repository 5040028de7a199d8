"""The ways a transfer can fail, shared by the transfer layer's modules."""


class TransferFailed(Exception):
    """The transfer did not complete; the message says why, in one line."""


class Declined(TransferFailed):
    """The receiver said no (or could not take the offer)."""


class UnsafeName(TransferFailed):
    """The sender offered a name we will not write."""


class ScanError(Exception):
    """A path the user asked to send cannot be sent (reported before
    connecting)."""
