"""
One error hierarchy (issue 13): every expected failure is a P2pftError and
is reported as its one line; anything else is a bug, reported as one, with
its traceback; and the checks the review found repeated happen once.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.internet import defer
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2pft import cli, client_tap, codes
from p2pft.errors import NotATerminal, P2pftError
from p2pft.options import Options
from tests.files import make_file
from tests.memlink import start_pair
from tests.test_newcomer import FakeReactor, environment


def _recurse(n=0):
    return _recurse(n + 1)


class TransferBugTests(SynchronousTestCase):
    def failing_transfer(self):
        """A real Sender whose blocking work hits a RecursionError."""
        root = os.path.abspath(self.mktemp())
        src, out = os.path.join(root, "src"), os.path.join(root, "out")
        os.makedirs(src)
        os.makedirs(out)
        make_file(os.path.join(src, "f"), 10)
        link, sender, receiver, sd, rd = start_pair(
            [os.path.join(src, "f")], out, run_blocking=lambda f, *a: defer.maybeDeferred(_recurse))
        link.pump()
        rd.addErrback(lambda f: None)
        return sd

    def run_main(self, work, **envs):
        fake = FakeReactor()
        self.patch(cli, "run_peer", lambda *a, **kw: work)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        config = Options()
        config.parseOptions(["send", "--no-progress", "h:1", __file__])
        with environment(**envs):
            f = self.failureResultOf(defer.ensureDeferred(cli._main(fake, config)), SystemExit)
        return f.value.code, err.getvalue()

    def test_recursion_error_in_a_transfer_is_a_bug_with_its_traceback(self):
        status, text = self.run_main(self.failing_transfer(), P2PFT_DEBUG=None)
        self.assertEqual(status, 1)
        last = text.splitlines()[-1]
        self.assertTrue(last.startswith("p2pft: error: unexpected RecursionError: maximum recursion depth"), last)
        self.assertIn("this is a bug in p2pft; please report it", last)
        self.assertNotIn("Traceback", text, "the traceback is printed only with P2PFT_DEBUG")
        [logged] = self.flushLoggedErrors(RecursionError)
        self.assertIn("_recurse", logged.getTraceback())

    def test_debug_prints_the_traceback_of_a_bug(self):
        status, text = self.run_main(self.failing_transfer(), P2PFT_DEBUG="1")
        self.flushLoggedErrors(RecursionError)
        self.assertIn("Traceback", text)
        self.assertIn("_recurse", text)

    def test_an_expected_error_is_its_line_without_a_traceback(self):
        for error in (codes.CodeError("code must start with a number"), NotATerminal()):
            status, text = self.run_main(defer.fail(error), P2PFT_DEBUG="1")
            self.assertEqual((status, text), (1, f"p2pft: error: {error}\n"))
        self.assertEqual(self.flushLoggedErrors(), [])


class HierarchyTests(SynchronousTestCase):
    def test_every_expected_failure_has_the_one_base(self):
        from p2pft.config import ConfigError
        from p2pft.errors import Declined, ScanError, SessionError, TransferFailed, UnsafeName
        from p2pft.punch import PunchFailed
        from p2pft.rendezvous import PeerGone, RendezvousError
        from p2pft.secure import SecurityError, WrongCode
        from p2pft.transfer.text import TextTooLong

        for cls in (TransferFailed, Declined, UnsafeName, ScanError, SessionError, SecurityError, WrongCode,
                    RendezvousError, PeerGone, PunchFailed, codes.CodeError, cli.PreflightError,
                    cli.Interrupted, ConfigError, TextTooLong, NotATerminal):
            self.assertTrue(issubclass(cls, P2pftError), cls)
        self.assertTrue(issubclass(codes.CodeError, ValueError))
        self.assertFalse(issubclass(NotATerminal, RuntimeError))
        self.assertEqual(cli.Interrupted().message, "interrupted")

    def test_the_prompt_refusal_is_not_a_runtime_error(self):
        from p2pft.ui import HumanUI
        from tests.test_cli import one_file

        ui = HumanUI(err=io.StringIO(), stdin=io.StringIO(""))
        f = self.failureResultOf(ui.decide(one_file("f", 1)))
        self.assertFalse(f.check(RuntimeError))
        self.assertIsInstance(f.value, NotATerminal)


class ReviewFindingTests(SynchronousTestCase):
    def test_receive_code_without_a_default_server_says_what_is_missing(self):
        with environment():
            e = self.assertRaises(usage.UsageError, Options().parseOptions, ["receive", "7-apple-river"])
        self.assertTrue(str(e).startswith("receive needs SERVER:PORT ("), str(e))
        self.assertNotIn("server must be", str(e))

    def test_twistd_asks_about_the_terminal_once(self):
        calls = []
        self.patch(cli, "check_answerable", lambda sub, stdin=None: calls.append(sub))
        config = client_tap.Options()
        config.parseOptions(["receive", "h:1", "7-apple-river"])
        client_tap.makeService(config, reactor=FakeReactor())
        self.assertEqual(len(calls), 1)

    def test_session_receive_leaves_the_folder_to_the_destination(self):
        # The CLI's preflight and the receiver's destination check the output
        # folder; session.receive does not repeat it with a third message.
        from p2pft import peer as session

        reached = []

        async def connected(*a, **kw):
            reached.append(True)
            raise P2pftError("stop here")

        self.patch(session, "_connected", connected)
        d = defer.ensureDeferred(session.receive(None, session.Settings(("h", 1)), "/nonexistent/out",
                                                 None, None))
        self.assertEqual(str(self.failureResultOf(d, P2pftError).value), "stop here")
        self.assertEqual(reached, [True])
