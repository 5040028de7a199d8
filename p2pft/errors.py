"""
The ways p2pft can fail that are not bugs: every one derives from
L{P2pftError} and carries the one line the user sees
(L{P2pftError.message}).  The CLI (L{p2pft.cli.explain}) reports such an
error as that line; anything else that escapes a run is a bug in p2pft and
is reported as one, with its traceback in the log.

The hierarchy, and where each class lives (a class that belongs to one
layer stays in that layer's module, so that no layer imports a higher one):

  P2pftError
    TransferFailed          here; the transfer did not complete
      Declined              here; the receiver said no
      UnsafeName            here; a name we will not write
      TextTooLong           p2pft.transfer.text
    ScanError               here; a path to send cannot be sent
    NotATerminal            here; an offer nobody can answer
    CodeError               p2pft.codes (also a ValueError)
    RendezvousError         p2pft.rendezvous
      PeerGone              p2pft.rendezvous
    SecurityError           p2pft.secure
      WrongCode             p2pft.secure
    PunchFailed             p2pft.punch
    SessionError            here; one peer's run (p2pft.peer) failed
    ConfigError             p2pft.config
    PreflightError          p2pft.cli
    Interrupted             p2pft.cli

Raise the class that says what went wrong; never catch one to re-raise
another with the same text just to make it reportable: every one of them
already is.
"""


class P2pftError(Exception):
    """An expected failure; C{str()} of it is the one line to show."""

    #: What to say when raised without a message.
    default = "failed"

    @property
    def message(self) -> str:
        """The one line the user sees."""
        return str(self) or self.default


class TransferFailed(P2pftError):
    """The transfer did not complete; the message says why, in one line."""


class Declined(TransferFailed):
    """The receiver said no (or could not take the offer)."""


class UnsafeName(TransferFailed):
    """The sender offered a name we will not write."""


class ScanError(P2pftError):
    """A path the user asked to send cannot be sent (reported before
    connecting)."""


class SessionError(P2pftError):
    """One peer's run failed (p2pft.peer and the layers it drives below
    it: pairing, candidates, punching); the message says why."""


class NotATerminal(P2pftError):
    """An offer must be accepted, and there is nobody to ask: standard input
    is not a terminal and --yes was not given."""

    default = "cannot ask whether to accept: standard input is not a terminal (use --yes)"

    def __init__(self, message: str = default) -> None:
        super().__init__(message)
