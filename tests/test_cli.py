"""
Command-line options, the twistd plugins, codes and the user interface.
"""

import io
import json
import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.task import Clock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2pft import cli, codes
from p2pft.errors import NotATerminal
from p2pft.options import Options, ReceiveOptions, SendOptions, dual_stack
from p2pft.transfer import Offer, Result
from p2pft.ui import HumanUI, JsonUI, describe, human_size


def one_file(name, size):
    return Offer(files=1, dirs=0, size=size, top=[name], top_count=1)


def parse(*argv, env=None):
    old = dict(os.environ)
    os.environ.pop("P2PFT_CODE", None)
    os.environ.update(env or {})
    try:
        config = Options()
        config.parseOptions(list(argv))
        return config
    finally:
        os.environ.clear()
        os.environ.update(old)


class OptionTests(SynchronousTestCase):
    def test_send(self):
        c = parse("send", "--code", "7-Apple-River", "--json", "example.org:9000", "f.bin")
        self.assertEqual(c.subCommand, "send")
        s = c.subOptions
        self.assertEqual((s["server"], s["paths"], s["code"], s["json"], s["follow-symlinks"]),
                         (("example.org", 9000), ["f.bin"], "7-Apple-River", True, 0))
        c = parse("send", "-L", "h:1", "a.iso", "photos/", "notes.txt")
        self.assertEqual((c.subOptions["paths"], c.subOptions["follow-symlinks"]),
                         (["a.iso", "photos/", "notes.txt"], 1))

    def test_receive_and_rcv_alias(self):
        for name in ("receive", "rcv"):
            c = parse(name, "--yes", "-o", "/tmp", "[2001:db8::1]:9000", "3-x-y")
            self.assertEqual(c.subCommand, "receive")
            s = c.subOptions
            self.assertEqual((s["server"], s["code"], s["yes"], s["output-dir"], s["overwrite"]),
                             (("2001:db8::1", 9000), "3-x-y", True, "/tmp", False))

    def test_code_from_environment(self):
        self.assertEqual(parse("receive", "h:1", env={"P2PFT_CODE": "5-a-b"}).subOptions["code"], "5-a-b")
        self.assertEqual(parse("send", "h:1", "f", env={"P2PFT_CODE": "5-a-b"}).subOptions["code"], "5-a-b")
        # The command line wins over the environment.
        self.assertEqual(parse("receive", "h:1", "6-c-d", env={"P2PFT_CODE": "5-a-b"}).subOptions["code"], "6-c-d")

    def test_bad_environment_code(self):
        self.assertRaises(usage.UsageError, parse, "receive", "h:1", env={"P2PFT_CODE": "nope"})

    def test_server_port_forms(self):
        self.assertEqual(parse("server").subOptions["port"], dual_stack(9000))
        self.assertEqual(parse("server", "--port", "9100").subOptions["port"], dual_stack(9100))
        self.assertEqual(parse("server", "-p", "9100").subOptions["port"], dual_stack(9100))
        self.assertEqual(parse("server", "--port", "tcp:9000").subOptions["port"], "tcp:9000")
        self.assertEqual(parse("relay").subOptions["port"], dual_stack(9001))

    def test_dual_stack_endpoint(self):
        self.assertIn(dual_stack(9000), ("tcp6:9000:interface=\\:\\:", "tcp:9000"))

    def test_usage_errors(self):
        for argv in ([], ["send"], ["send", "h:1"], ["send", "h:1", "a", "-"], ["receive"],
                     ["receive", "h:1", "c", "extra"], ["send", "h", "f"], ["send", "--code-length", "99", "h:1", "f"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_help_mentions_environment_and_alias(self):
        self.assertIn("P2PFT_CODE", str(ReceiveOptions()))
        self.assertIn("P2PFT_CODE", str(SendOptions()))
        top = str(Options())
        for word in ("server", "send", "receive", "rcv"):
            self.assertIn(word, top)


class PluginTests(SynchronousTestCase):
    def test_tapnames(self):
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertIn("p2pft-server", names)
        self.assertIn("p2pft-relay", names)
        self.assertIn("p2pft", names)

    def test_server_plugin_options_and_service(self):
        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "p2pft-server"]
        options = maker.options()
        options.parseOptions(["--port", "9000", "--relay"])
        self.assertEqual(options["port"], dual_stack(9000))
        service = maker.makeService(options, reactor=Clock())
        self.assertIsNotNone(service.rendezvous.factory.state)

    def test_peer_plugin_refuses_prompting(self):
        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "p2pft"]
        options = maker.options()
        # Refused while parsing, so that twistd prints one line.
        self.assertRaises(usage.UsageError, options.parseOptions, ["receive", "h:1"])

    def test_console_script_installed(self):
        script = os.path.join(os.path.dirname(sys.executable), "p2pft")
        if not os.path.exists(script):
            self.skipTest("p2pft not installed into this interpreter's environment (run scripts/test.sh)")
        out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0)
        self.assertTrue(out.stdout.startswith("p2pft "))


class CodeTests(SynchronousTestCase):
    def test_wordlist(self):
        words = codes.wordlist()
        self.assertEqual(len(words), 256)
        self.assertEqual(len(set(words)), 256)
        self.assertTrue(all(w.isalpha() and w.islower() for w in words))

    def test_make_and_parse(self):
        password = codes.make_password(3)
        self.assertEqual(len(password.split("-")), 3)
        self.assertEqual(codes.parse_code(f" 12-{password.upper()} "), codes.Code("12", password))

    def test_parse_errors(self):
        for bad in ("", "7", "7-", "x-a-b", "0-a", "07-a", "7-a b", "7-a--b", "7-" + "a" * 300, "1234567890123-a"):
            self.assertRaises(codes.CodeError, codes.parse_code, bad)


class UITests(SynchronousTestCase):
    def test_json_events(self):
        out, err = io.StringIO(), io.StringIO()
        ui = JsonUI("h:1", out=out, err=err)
        ui.code("4-a-b", announce=True)
        ui.connected("203.0.113.5:4000", "direct")
        ui.done(Result("f", 10, 0.5, "/x/f"), "direct")
        ui.error("boom")
        events = [json.loads(l) for l in out.getvalue().splitlines()]
        self.assertEqual([e["event"] for e in events], ["code", "connected", "done", "error"])
        self.assertEqual(events[1], {"event": "connected", "peer": "203.0.113.5:4000", "path": "direct"})
        self.assertEqual((events[2]["bytes"], events[2]["file"]), (10, "/x/f"))
        self.assertNotIn("sha256", events[2])
        self.assertIn("Connected to 203.0.113.5:4000 successfully!", err.getvalue())
        self.assertIn("p2pft: error: boom", err.getvalue())

    def test_decide_needs_terminal_or_yes(self):
        ui = HumanUI(err=io.StringIO(), stdin=io.StringIO(""))
        self.failureResultOf(ui.decide(one_file("f", 1)), NotATerminal)
        ui = HumanUI(err=io.StringIO(), assume_yes=True)
        self.assertTrue(self.successResultOf(ui.decide(one_file("f", 1))))

    def test_offer_name_escaped(self):
        err = io.StringIO()
        HumanUI(err=err, assume_yes=True).decide(one_file("evil\x1b[2J", 1))
        self.assertNotIn("\x1b", err.getvalue())

    def test_summary_of_many(self):
        offer = Offer(files=120, dirs=3, size=2_100_000, top=["a.iso", "photos/"] + [f"n{i}" for i in range(6)],
                      top_count=10)
        self.assertEqual(describe(offer),
                         "a.iso, photos/, n0, n1, n2, n3, n4, n5 and 2 more (120 files in 3 folders, 2.1 MB)")
        self.assertEqual(describe(one_file("x", 5)), "x (5 B)")
        self.assertEqual(offer.name, "10 items")

    def test_human_size(self):
        self.assertEqual(human_size(999), "999 B")
        self.assertEqual(human_size(2_100_000), "2.1 MB")
        self.assertEqual(human_size(5 * 10**15), "5000.0 TB")


class ProgressTests(SynchronousTestCase):
    def test_json_progress_is_rate_limited_and_ends_at_total(self):
        clock, out = Clock(), io.StringIO()
        ui = JsonUI("h:1", out=out, err=io.StringIO(), reactor=clock)
        for i in range(100):
            ui.progress(i * 10, 1000)
        clock.advance(0.3)
        ui.progress(995, 1000)
        ui.progress(1000, 1000)
        events = [json.loads(l) for l in out.getvalue().splitlines()]
        self.assertEqual([e["bytes"] for e in events], [0, 995, 1000])
        self.assertEqual({e["event"] for e in events}, {"progress"})
        self.assertEqual({e["total"] for e in events}, {1000})

    def test_unknown_total(self):
        clock, out = Clock(), io.StringIO()
        ui = JsonUI("h:1", out=out, err=io.StringIO(), reactor=clock, progress_bar=True)
        ui.sending(one_file("stdin", None))
        ui.progress(100, None)
        clock.advance(1)
        ui.progress(200, None)
        events = [json.loads(l) for l in out.getvalue().splitlines() if '"progress"' in l]
        self.assertEqual([(e["bytes"], e["total"]) for e in events], [(100, None), (200, None)])

    def test_bar_only_when_wanted(self):
        clock = Clock()
        err = io.StringIO()
        ui = HumanUI(err=err, reactor=clock, progress_bar=True)
        ui.sending(one_file("movie.mkv", 10_000_000))
        ui.progress(5_000_000, 10_000_000, "movie.mkv")
        ui.progress(10_000_000, 10_000_000, "movie.mkv")
        ui.done(Result("movie.mkv", 10_000_000, 1.0), "direct")
        self.assertIn("movie.mkv", err.getvalue())
        self.assertIn("10.0M/10.0M", err.getvalue())
        quiet = io.StringIO()
        ui = HumanUI(err=quiet, reactor=clock, progress_bar=False)
        ui.sending(one_file("movie.mkv", 10))
        ui.progress(10, 10)
        self.assertNotIn("\r", quiet.getvalue())
        # Default: a bar only when stderr is a terminal (a StringIO is not).
        self.assertFalse(HumanUI(err=io.StringIO())._want_bar)

    def test_no_progress_flag(self):
        c = parse("send", "--no-progress", "h:1", "f")
        self.assertTrue(c.subOptions["no-progress"])
        self.assertFalse(cli.make_ui(c.subOptions)._want_bar)


class PromptFailureTests(SynchronousTestCase):
    def test_unreadable_terminal_is_an_error_not_a_crash(self):
        class BrokenTerminal:
            def isatty(self):
                return True

            def readline(self):
                raise OSError("terminal went away")

        class LaterReactor:
            """Runs what the thread hands over later, as a reactor does."""

            def __init__(self):
                self.calls = []

            def callFromThread(self, f, *args):
                self.calls.append((f, args))

        reactor = LaterReactor()
        ui = HumanUI(err=io.StringIO(), stdin=BrokenTerminal(), reactor=reactor)
        d = ui.decide(one_file("f", 1))
        # The prompt runs on its own thread; wait for it to hand over.
        import threading

        for t in threading.enumerate():
            if t.name == "p2pft-prompt":
                t.join(5)
        for f, args in reactor.calls:
            f(*args)
        f = self.failureResultOf(d, OSError)
        self.assertIn("terminal went away", str(f.value))


class OutputOptionTests(SynchronousTestCase):
    def test_output_dash_only(self):
        self.assertEqual(parse("receive", "--output", "-", "h:1", "1-a-b").subOptions["output"], "-")
        self.assertRaises(usage.UsageError, parse, "receive", "--output", "file.txt", "h:1", "1-a-b")
        self.assertRaises(usage.UsageError, parse, "receive", "--json", "--output", "-", "h:1", "1-a-b")
