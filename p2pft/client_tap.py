"""
twistd plugin body for C{twistd -n p2pft send ...} / C{receive ...}.

twistd cannot report an exit status, so the service logs the outcome and
stops the reactor; the C{p2pft} console script is the one for scripts.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer

from twisted.python.failure import Failure

from .options import Options as _CLIOptions


class Options(_CLIOptions):
    synopsis = "Usage: twistd [twistd options] p2pft"
    subCommands = [row for row in _CLIOptions.subCommands if row[0] in ("server", "send", "receive", "rcv")]

    def postOptions(self) -> None:
        super().postOptions()
        if self.subCommand == "receive":
            _check_no_prompt(self.subOptions)


def _check_no_prompt(sub) -> None:
    """twistd cannot prompt for a code; and an offer that cannot be
    answered, found out only after pairing, would burn the sender's code.
    Checked while parsing (once: L{Options.postOptions}), so that twistd
    prints one line."""
    from twisted.python import usage

    from .cli import check_answerable

    if not sub.get("code"):
        raise usage.UsageError("twistd cannot prompt: pass CODE or set P2PFT_CODE")
    check_answerable(sub)


class PeerService(Service):

    def __init__(self, reactor, config: Options):
        self._reactor = reactor
        self._config = config
        self.result: defer.Deferred | None = None
        self._child = None

    def startService(self) -> None:
        super().startService()
        command, sub = self._config.subCommand, self._config.subOptions
        if command == "server":
            from .server.service import makeService

            self._child = makeService(sub, self._reactor)
            self._child.startService()
            return
        from .cli import explain, make_ui, report_bug

        ui = make_ui(sub, self._reactor)
        self.result = defer.ensureDeferred(self._run(command, sub, ui))

        def finished(outcome):
            if isinstance(outcome, Failure) and outcome.check(defer.CancelledError) and not self.running:
                ui.error("interrupted")  # twistd is shutting down (SIGTERM, SIGINT)
            elif isinstance(outcome, Failure):
                message, expected = explain(outcome.value)
                ui.error(message)
                if not expected:  # an expected one is the line above, already in the log
                    report_bug(outcome, command)
            # An early failure (a missing file, a missing output folder)
            # arrives while twistd is still starting services, before the
            # reactor runs: stopping it then would do nothing, and the
            # process would idle forever.  callWhenRunning runs at once when
            # the reactor already runs.
            self._reactor.callWhenRunning(self._stop)

        self.result.addBoth(finished)

    async def _run(self, command: str, sub, ui) -> None:
        from .cli import check_output_dir, run_peer

        if command == "receive" and sub["output"] != "-":
            # What the console script's preflight checks before pairing.
            check_output_dir(sub["output-dir"])
        await run_peer(self._reactor, command, sub, ui)

    def _stop(self) -> None:
        if self._reactor.running:
            self._reactor.stop()

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
    return PeerService(reactor, config)
