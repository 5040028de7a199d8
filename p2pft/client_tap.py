"""
twistd plugin body for C{twistd -n p2pft send ...} / C{receive ...}.

twistd cannot report an exit status, so the service logs the outcome and
stops the reactor; the C{p2pft} console script is the one for scripts.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .cli import Options as _CLIOptions


class Options(_CLIOptions):
    synopsis = "Usage: twistd [twistd options] p2pft"


class PeerService(Service):
    log = Logger()

    def __init__(self, reactor, config: Options):
        self._reactor = reactor
        self._config = config
        self.result: defer.Deferred | None = None
        self._child = None

    def startService(self) -> None:
        super().startService()
        command, sub = self._config.subCommand, self._config.subOptions
        if command == "server":
            from .server_tap import makeService

            self._child = makeService(sub, self._reactor)
            self._child.startService()
            return
        from .cli import make_ui, run_peer

        ui = make_ui(sub, self._reactor)
        self.result = defer.ensureDeferred(run_peer(self._reactor, command, sub, ui))

        def finished(outcome):
            if isinstance(outcome, Exception) or hasattr(outcome, "getErrorMessage"):
                message = outcome.getErrorMessage() if hasattr(outcome, "getErrorMessage") else str(outcome)
                ui.error(message)
                self.log.error("p2pft {command} failed: {message}", command=command, message=message)
            if self._reactor.running:
                self._reactor.stop()

        self.result.addBoth(finished)

    def stopService(self):
        super().stopService()
        if self._child is not None:
            return self._child.stopService()
        if self.result is not None and not self.result.called:
            self.result.cancel()


def makeService(config: Options, reactor=None) -> Service:
    from .cli import _tune_allocator

    _tune_allocator()
    if reactor is None:
        from twisted.internet import reactor
    if config.subCommand == "receive" and not config.subOptions.get("code"):
        from twisted.python import usage

        raise usage.UsageError("twistd cannot prompt: pass CODE or set P2PFT_CODE")
    return PeerService(reactor, config)
