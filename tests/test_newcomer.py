"""
What a new user hits in the first hour (issue 11): twistd hanging after an
early error, a frozen progress bar on resume, problems found only after
pairing, tracebacks for bad option values, options after arguments, no
default server, completion and verbosity, messages, packaging.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from p2pft import cli, codes
from p2pft.config import ConfigError, config_path, defaults, read_file
from p2pft.options import Options
from p2pft.transfer import Result
from p2pft.ui import BAR_NAME_WIDTH, HumanUI
from tests.files import make_file
from tests.procs import ROOT, env, p2pft_argv, spawn, twistd_argv

#: A subprocess that fails early exits in about a second; far more than that
#: means it hangs.
EXIT_DEADLINE = 20.0


@contextlib.contextmanager
def environment(**values):
    """os.environ with these values (None: unset), and no config file or
    default server from the machine running the tests."""
    old = dict(os.environ)
    for name in ("P2PFT_CODE", "P2PFT_SERVER", "P2PFT_RELAY", "P2PFT_CONFIG"):
        os.environ.pop(name, None)
    os.environ["XDG_CONFIG_HOME"] = os.path.abspath("no-such-config-home")
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def parse(*argv, **envs):
    with environment(**envs):
        config = Options()
        config.parseOptions(list(argv))
        return config


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_main(testcase, *argv, stdin=None, **envs):
    """cli.main in this process; (exit status, stderr lines).  The reactor
    is never run: reaching it is a failure of the option checks."""
    import twisted.internet.task

    def no_react(*a, **kw):
        raise AssertionError(f"{argv} reached the reactor")

    testcase.patch(twisted.internet.task, "react", no_react)
    err = io.StringIO()
    testcase.patch(sys, "stderr", err)
    testcase.patch(sys, "stdin", stdin or NotATerminal())
    testcase.patch(sys, "stdout", io.StringIO())
    with environment(**envs):
        try:
            cli.main(list(argv))
        except SystemExit as e:
            return e.code, err.getvalue().splitlines()
    raise AssertionError(f"{argv}: main returned")


class Listener:
    """A loopback TCP port that counts the connections it gets: a command
    that must stop before contacting its server must leave it at 0."""

    def __init__(self, testcase):
        self.connections = 0
        outer = self

        class Count(Protocol):
            def connectionMade(self):
                outer.connections += 1

        self.port = reactor.listenTCP(0, Factory.forProtocol(Count), interface="127.0.0.1")
        testcase.addCleanup(self.port.stopListening)
        self.address = f"127.0.0.1:{self.port.getHost().port}"


# -- 2. twistd exits after an early error ---------------------------------------------


class TwistdEarlyErrorTests(TestCase):
    """twistd -n p2pft send/receive: an error found before the reactor runs
    used to be logged while the process idled forever."""

    timeout = 60

    async def run_twistd(self, *args):
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        proc = spawn(self, "twistd", twistd_argv("-n", "--pidfile=", "p2pft", *args), cwd=cwd)
        status = await proc.wait_exit(timeout=EXIT_DEADLINE)
        return status, proc.out.decode() + proc.err.decode()

    async def test_send_missing_file(self):
        status, text = await self.run_twistd("send", "127.0.0.1:9", "/nonexistent/file")
        self.assertIn("/nonexistent/file: no such file", text)
        self.assertIn("Main loop terminated", text)

    async def test_receive_missing_output_folder(self):
        status, text = await self.run_twistd("receive", "--yes", "-o", "/nonexistent/out", "127.0.0.1:9", "1-a-b")
        self.assertIn("the output folder /nonexistent/out does not exist", text)

    async def test_receive_that_cannot_ask_is_one_line(self):
        # stdin of a spawned process is a pipe: the offer could not be answered.
        status, text = await self.run_twistd("receive", "127.0.0.1:9", "1-a-b")
        self.assertEqual(status, 1)
        self.assertIn("use --yes", text)
        self.assertNotIn("Traceback", text)


# -- 3. the progress bar on a resumed transfer -----------------------------------------


class ResumedProgressBarTests(SynchronousTestCase):
    def test_bar_keeps_redrawing_with_the_rate_of_what_moves(self):
        clock, err = Clock(), Terminal()
        clock.advance(1000)
        ui = HumanUI(err=err, reactor=clock, progress_bar=True)
        total = 2_150_000_000
        done = 1_150_000_000  # resumed: the first report already counts it
        ui.progress(done, total, "big.iso")
        for _ in range(5):
            clock.advance(1)
            done += 100_000_000
            ui.progress(done, total, "big.iso")
        frames = err.getvalue().split("\r")
        self.assertIn("1.65G/2.15G", frames[-1])
        self.assertRegex(frames[-1], r"\b100MB/s")
        self.assertNotIn("TB/s", err.getvalue())


# -- 4. what can be checked before pairing ----------------------------------------------


class PreflightTests(TestCase):
    timeout = 60

    def test_no_write_permission(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        # As a non-root user would see a folder of mode 0o500.
        e = self.assertRaises(cli.PreflightError, cli.check_output_dir, path,
                              access=lambda p, mode: not mode & os.W_OK)
        self.assertIn("cannot write into the output folder", str(e))

    def test_probe_file_where_access_says_yes(self):
        # Root may write anywhere by access(), but not into sysfs; an
        # ordinary user cannot either.
        if not os.path.isdir("/sys/kernel"):
            self.skipTest("no /sys")
        e = self.assertRaises(cli.PreflightError, cli.check_output_dir, "/sys/kernel")
        self.assertIn("cannot write into the output folder /sys/kernel", str(e))
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        cli.check_output_dir(path)
        self.assertEqual(os.listdir(path), [])  # the probe is gone

    async def test_read_only_folder_before_contacting_the_server(self):
        """A real receiver, as an ordinary user (nobody, when the tests run
        as root), on a folder of mode 0o500: one line, exit 1, and the
        server never hears of it (the sender's code is not burnt)."""
        server = Listener(self)
        root = os.path.abspath(self.mktemp())
        out = os.path.join(root, "out")
        os.makedirs(out)
        os.chmod(root, 0o755)
        os.chmod(out, 0o500)
        self.addCleanup(os.chmod, out, 0o700)
        argv = p2pft_argv("receive", "--yes", "-o", out, server.address, "1-a-b")
        if os.getuid() == 0:
            # Root without its capabilities is held to the folder's mode.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("running as root, and no setpriv to drop root's capabilities")
            argv = [setpriv, "--inh-caps=-all", "--bounding-set=-all"] + argv
        proc = spawn(self, "receiver", argv, XDG_CONFIG_HOME=root)
        status = await proc.wait_exit(timeout=EXIT_DEADLINE)
        self.assertEqual(status, 1, proc.text())
        self.assertIn("cannot write into the output folder", proc.err.decode())
        self.assertEqual(len(proc.err.decode().strip().splitlines()), 1, proc.text())
        self.assertEqual(server.connections, 0)

    async def test_receiver_that_cannot_ask_stops_before_the_server(self):
        server = Listener(self)
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        proc = spawn(self, "receiver", p2pft_argv("receive", "-o", out, server.address, "1-a-b"))
        status = await proc.wait_exit(timeout=EXIT_DEADLINE)
        self.assertEqual(status, 2, proc.text())
        self.assertIn("use --yes", proc.err.decode())
        self.assertEqual(server.connections, 0)


# -- 5. bad option values: one line, exit 2 ---------------------------------------------

GARBAGE = ["abc", "9000x", "tcp:abc", "-1", "nan", "1e999", "", "99999", "tcp:99999"]
#: Options that take any text (a folder name) and so no garbage of that kind.
ANY_TEXT = {"output-dir"}


class BadValueTests(SynchronousTestCase):
    def test_port_forms_from_the_issue(self):
        for value in ("9000x", "abc", "tcp:abc", "70000", "tcp:70000"):
            for command in ("server", "relay"):
                status, lines = run_main(self, command, "--port", value)
                self.assertEqual(status, 2, (command, value, lines))
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(lines[0].startswith("p2pft: error: --port takes a port number"), lines)

    def test_every_option_of_every_command(self):
        tried = 0
        for command, _, options_class, _ in Options.subCommands:
            if command in ("rcv", "completion"):
                continue
            options = options_class()
            rest = {"send": ["127.0.0.1:9", "f"], "receive": ["127.0.0.1:9", "1-a-b"]}.get(command, [])
            for name in sorted(n.rstrip("=") for n in options.longOpt if n.endswith("=")):
                if name in ANY_TEXT:
                    continue
                for value in GARBAGE:
                    accepted = _accepts(options_class, name, value, rest)
                    if accepted:
                        continue
                    status, lines = run_main(self, command, f"--{name}={value}", *rest)
                    tried += 1
                    self.assertEqual(status, 2, (command, name, value, lines))
                    self.assertEqual(len(lines), 1, (command, name, value, lines))
                    self.assertTrue(lines[0].startswith("p2pft: error: "), lines)
                    self.assertNotIn("enforcement", lines[0])
                    self.assertNotIn("Traceback", lines[0])
        self.assertGreater(tried, 100)

    def test_number_messages_name_the_option(self):
        e = self.assertRaises(usage.UsageError, parse, "send", "--timeout", "soon", "h:1", "f")
        self.assertEqual(str(e), "--timeout takes a number, not 'soon'")
        e = self.assertRaises(usage.UsageError, parse, "server", "--max-per-ip", "1.5")
        self.assertEqual(str(e), "--max-per-ip takes a whole number, not '1.5'")
        self.assertRaises(usage.UsageError, parse, "server", "--waiting-timeout", "nan")


#: Garbage that is a valid value of these options (a count, seconds, a rate).
VALID = {"99999": {"relay-max-sessions", "relay-max-per-ip", "relay-max-bytes", "relay-rate",
                   "relay-idle-timeout", "waiting-timeout", "hello-timeout", "max-connections",
                   "max-per-ip", "limit-rate"}}


def _accepts(options_class, name, value, rest) -> bool:
    return name in VALID.get(value, ())


# -- 6. options after arguments; the IPv6 hint ------------------------------------------


class OptionOrderTests(SynchronousTestCase):
    def test_options_after_arguments(self):
        s = parse("receive", "h:1", "1-a-b", "--yes", "-o", "/tmp").subOptions
        self.assertEqual((s["server"], s["code"], s["yes"], s["output-dir"]), (("h", 1), "1-a-b", True, "/tmp"))
        s = parse("send", "h:1", "a", "--code=7-x-y", "b", "-L").subOptions
        self.assertEqual((s["paths"], s["code"], s["follow-symlinks"]), (["a", "b"], "7-x-y", True))

    def test_double_dash_ends_options(self):
        s = parse("send", "h:1", "--", "-odd-name", "--yes").subOptions
        self.assertEqual(s["paths"], ["-odd-name", "--yes"])
        self.assertEqual(parse("send", "h:1", "-").subOptions["paths"], ["-"])

    def test_ipv6_hint_is_a_command_that_parses(self):
        err = io.StringIO()
        sub = parse("send", "[::1]:47011", "f").subOptions
        ui = cli.make_ui(sub)
        ui._err = err
        ui.code("3-a-b", announce=True)
        hint = re.search(r"run:\s+p2pft (receive .*)", err.getvalue()).group(1)
        self.assertEqual(hint, "receive [::1]:47011 3-a-b")
        again = parse(*hint.split()).subOptions
        self.assertEqual((again["server"], again["code"]), (("::1", 47011), "3-a-b"))


# -- 7. the default server --------------------------------------------------------------


class DefaultServerTests(SynchronousTestCase):
    def write_config(self, text: str) -> str:
        home = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(home, "p2pft"))
        with open(os.path.join(home, "p2pft", "config.toml"), "w") as f:
            f.write(text)
        return home

    def test_config_paths(self):
        self.assertEqual(config_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}, "linux"), "/x/p2pft/config.toml")
        self.assertEqual(config_path({"HOME": "/h"}, "linux"), "/h/.config/p2pft/config.toml")
        self.assertEqual(config_path({"HOME": "/h", "XDG_CONFIG_HOME": "rel"}, "linux"), "/h/.config/p2pft/config.toml")
        self.assertEqual(config_path({"HOME": "/h"}, "darwin"),
                         "/h/Library/Application Support/p2pft/config.toml")
        self.assertEqual(config_path({"HOME": "/h", "APPDATA": "C:/AD"}, "win32"),
                         os.path.join("C:/AD", "p2pft", "config.toml"))
        self.assertEqual(config_path({"P2PFT_CONFIG": "/c.toml"}, "linux"), "/c.toml")

    def test_send_and_receive_with_the_environment(self):
        s = parse("send", "f", P2PFT_SERVER="example.org:9000").subOptions
        self.assertEqual((s["server"], s["paths"]), (("example.org", 9000), ["f"]))
        s = parse("receive", "3-a-b", P2PFT_SERVER="example.org:9000").subOptions
        self.assertEqual((s["server"], s["code"]), (("example.org", 9000), "3-a-b"))
        s = parse("receive", P2PFT_SERVER="example.org:9000").subOptions
        self.assertEqual((s["server"], s["code"]), (("example.org", 9000), None))

    def test_config_file_with_relay(self):
        home = self.write_config('server = "p2pft.example.org:9000"\nrelay = "[2001:db8::7]:9001"\n')
        s = parse("send", "a.iso", XDG_CONFIG_HOME=home).subOptions
        self.assertEqual((s["server"], s["relay"]), (("p2pft.example.org", 9000), ("2001:db8::7", 9001)))
        # A server named on the command line brings no default relay.
        s = parse("send", "other.org:1", "a.iso", XDG_CONFIG_HOME=home).subOptions
        self.assertEqual((s["server"], s["relay"]), (("other.org", 1), None))
        # The environment wins over the file.
        s = parse("receive", "4-a-b", XDG_CONFIG_HOME=home, P2PFT_SERVER="env.org:2").subOptions
        self.assertEqual(s["server"], ("env.org", 2))

    def test_which_argument_is_a_server(self):
        default = {"P2PFT_SERVER": "d.org:9"}
        here = os.path.abspath(self.mktemp())
        os.makedirs(here)
        lookalike = os.path.join(here, "h:1")
        make_file(lookalike, 1)
        s = parse("send", "h:1", "b", **default).subOptions
        self.assertEqual((s["server"], s["paths"]), (("h", 1), ["b"]))
        s = parse("send", lookalike, "b", **default).subOptions  # an existing file
        self.assertEqual((s["server"], s["paths"]), (("d.org", 9), [lookalike, "b"]))
        s = parse("send", "a", "b", **default).subOptions
        self.assertEqual((s["server"], s["paths"]), (("d.org", 9), ["a", "b"]))
        s = parse("send", "--server", "x.org:5", "h:1", **default).subOptions
        self.assertEqual((s["server"], s["paths"]), (("x.org", 5), ["h:1"]))
        s = parse("receive", "-s", "[::1]:5", "3-a-b", **default).subOptions
        self.assertEqual((s["server"], s["code"]), (("::1", 5), "3-a-b"))
        self.assertRaises(usage.UsageError, parse, "receive", "--server", "x.org:5", "h:1", "3-a-b", **default)
        # Without a default the seed's form still needs SERVER:PORT first.
        e = self.assertRaises(usage.UsageError, parse, "send", "a", "b")
        self.assertIn("server must be HOST:PORT, not 'a' (no default server is set", str(e))
        e = self.assertRaises(usage.UsageError, parse, "receive", "3-a-b")  # a code: the server is missing
        self.assertIn("receive needs SERVER:PORT (no default server is set", str(e))

    def test_bad_config_is_one_line_naming_the_file(self):
        for text in ('server = "x:1', 'server = 5', 'server = "nohost"', 'sever = "x:1"', "\xff"):
            home = self.write_config(text) if text != "\xff" else None
            if home is None:
                home = os.path.abspath(self.mktemp())
                os.makedirs(os.path.join(home, "p2pft"))
                with open(os.path.join(home, "p2pft", "config.toml"), "wb") as f:
                    f.write(b"server = \"\xff\"")
            path = os.path.join(home, "p2pft", "config.toml")
            self.assertRaises(ConfigError, read_file, path)
            status, lines = run_main(self, "send", "f", XDG_CONFIG_HOME=home)
            self.assertEqual(status, 2, lines)
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(path, lines[0])
        # A command that names its server does not need the file.
        self.assertEqual(parse("send", "h:1", "f", XDG_CONFIG_HOME=home).subOptions["server"], ("h", 1))

    def test_no_default(self):
        with environment():
            self.assertEqual(defaults().server, None)


# -- 8. completion and verbosity --------------------------------------------------------


class CompletionTests(SynchronousTestCase):
    def complete(self, *words):
        status, _ = run_main(self, "completion", "bash")
        self.assertEqual(status, 0)
        script = sys.stdout.getvalue()
        line = " ".join(f"'{w}'" for w in words)
        program = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _p2pft; "
                   'printf "%s\\n" "${COMPREPLY[@]}"')
        out = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                             timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout.split()

    def test_bash_completes_code_words(self):
        self.assertIn("apple", codes.wordlist())
        self.assertEqual(self.complete("p2pft", "receive", "7-ap"), ["7-apple", "7-apron"])
        self.assertIn("7-apple-river", self.complete("p2pft", "receive", "7-apple-riv"))
        self.assertIn("7-apple", self.complete("p2pft", "send", "--code", "7-ap"))

    def test_bash_completes_commands_and_options(self):
        self.assertIn("receive", self.complete("p2pft", "re"))
        self.assertIn("--yes", self.complete("p2pft", "receive", "--y"))
        self.assertIn("--quiet", self.complete("p2pft", "send", "--q"))

    def test_zsh_script(self):
        status, _ = run_main(self, "completion", "zsh")
        self.assertEqual(status, 0)
        script = sys.stdout.getvalue()
        self.assertTrue(script.startswith("#compdef p2pft"))
        self.assertIn(" apple ", script)
        self.assertIn("--output-dir", script)

    def test_unknown_shell(self):
        status, lines = run_main(self, "completion", "fish")
        self.assertEqual((status, len(lines)), (2, 1))
        self.assertIn("completion takes one of: bash, zsh", lines[0])


class VerbosityTests(SynchronousTestCase):
    def test_quiet_prints_only_the_code_and_errors(self):
        err = io.StringIO()
        sub = parse("send", "-q", "h:1", "f").subOptions
        ui = cli.make_ui(sub)
        self.assertFalse(ui._want_bar)
        ui._err = err
        ui.code("3-a-b", announce=True)
        ui.paired()
        ui.connected("203.0.113.5:4000", "direct")
        ui.done(Result("f", 10, 0.5), "direct")
        ui.error("boom")
        self.assertEqual(err.getvalue().splitlines(), ["3-a-b", "p2pft: error: boom"])

    def test_verbose_starts_logging(self):
        started = []
        self.patch(cli, "start_logging", lambda: started.append(True))
        import twisted.internet.task

        self.patch(twisted.internet.task, "react", lambda *a: started.append("react"))
        with environment():
            cli.main(["send", "-v", "h:1", "f"])
        self.assertEqual(started, [True, "react"])
        self.assertRaises(usage.UsageError, parse, "send", "-q", "-v", "h:1", "f")


# -- 9. messages ------------------------------------------------------------------------


class FakeReactor:
    """Just what cli._main touches for a peer command."""

    def __init__(self):
        self.triggers = []
        self.clock = Clock()

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append(f)


class MessageTests(SynchronousTestCase):
    def test_ctrl_c_at_the_code_prompt(self):
        def interrupted(prompt):
            raise KeyboardInterrupt

        import builtins

        self.patch(builtins, "input", interrupted)
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        status, lines = run_main(self, "receive", "--yes", "-o", out, "h:1", stdin=Terminal())
        self.assertEqual(status, 130)
        self.assertIn("p2pft: error: interrupted", lines)

    def run_failing(self, error, **envs):
        fake = FakeReactor()
        self.patch(cli, "run_peer", lambda *a, **kw: defer.fail(error) if error else defer.Deferred())
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        config = parse("send", "--no-progress", "h:1", "f")
        with environment(**envs):
            d = defer.ensureDeferred(cli._main(fake, config))
            if error is None:
                for trigger in fake.triggers:
                    trigger()
            f = self.failureResultOf(d, SystemExit)
        return f.value.code, err.getvalue()

    def test_interrupted_line_says_how_to_resume(self):
        status, text = self.run_failing(None)
        self.assertEqual(status, 130)
        self.assertIn("p2pft: error: interrupted; run the same send and receive again", text)

    def test_debug_traceback_only_for_unexpected_errors(self):
        from p2pft.peer import SessionError

        status, text = self.run_failing(SessionError("wrong code"), P2PFT_DEBUG="1")
        self.assertEqual((status, text), (1, "p2pft: error: wrong code\n"))
        status, text = self.run_failing(KeyError("bug"), P2PFT_DEBUG="1")
        self.assertIn("Traceback", text)
        self.assertIn("p2pft: error: unexpected KeyError", text)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1, "a bug is logged with its traceback")

    def test_done_line_in_human_sizes(self):
        err = io.StringIO()
        HumanUI(err=err).done(Result("big.iso", 2_150_000_000, 10.0, "/x/big.iso", 1, 1_150_000_000), "direct")
        line = err.getvalue()
        self.assertNotIn("bytes", line)
        self.assertIn("big.iso: 2.1 GB in 10.00 s (100.0 MB/s, direct); 1.1 GB of it already there", line)
        err = io.StringIO()
        HumanUI(err=err).done(Result("photos", 12_345, 1.0, "/x/photos", 1204), "relay")
        self.assertIn("photos: 1,204 files, 12.3 kB in", err.getvalue())

    def test_bar_shows_the_tail_of_a_long_path(self):
        clock, err = Clock(), Terminal()
        ui = HumanUI(err=err, reactor=clock, progress_bar=True)
        name = "photos/2026/summer holidays/day 12 at the lake/IMG_20260812_184512.jpg"
        ui.progress(1000, 10_000, name)
        frame = err.getvalue().split("\r")[-1]
        self.assertIn("IMG_20260812_184512.jpg", frame)
        self.assertTrue(frame.startswith("\u2026"), frame)
        self.assertEqual(frame.index("IMG") + len("IMG_20260812_184512.jpg"), BAR_NAME_WIDTH)

    def test_names_escaped_once_on_the_other_side(self):
        from p2pft.errors import TransferFailed
        from tests.memlink import start_pair

        root = os.path.abspath(self.mktemp())
        src, out = os.path.join(root, "src"), os.path.join(root, "out")
        os.makedirs(src)
        os.makedirs(out)
        name = "x\ue000.txt"  # a private-use character: allowed, shown escaped
        make_file(os.path.join(src, name), 100)
        make_file(os.path.join(out, name), 5)
        link, sender, receiver, sd, rd = start_pair([os.path.join(src, name)], out)
        link.pump()
        message = str(self.failureResultOf(sd, TransferFailed).value)
        self.failureResultOf(rd)
        self.assertIn("x\\ue000.txt already exists", message)
        self.assertNotIn("\\\\", message)

    def test_no_route_is_words(self):
        from p2pft.connect import SessionError, connect_rendezvous as _connect_rendezvous

        memory = MemoryReactorClock()
        d = defer.ensureDeferred(_connect_rendezvous(memory, ("192.0.2.1", 9000)))
        host, port, factory, timeout, bind = memory.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(error.NoRouteError(113, "No route to host")))
        f = self.failureResultOf(d, SessionError)
        self.assertEqual(str(f.value), "cannot reach the rendezvous server 192.0.2.1:9000: no route to host")


# -- 10. packaging ----------------------------------------------------------------------


class PackagingTests(SynchronousTestCase):
    def test_pyproject_uses_the_setuptools_backend(self):
        import tomllib

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)
        self.assertEqual(project["build-system"]["build-backend"], "setuptools.build_meta")
        self.assertTrue(os.path.exists(os.path.join(ROOT, "setup.cfg")))
        # ... and the installed plugins are still found.
        out = subprocess.run(twistd_argv("--help"), capture_output=True, text=True, timeout=60, env=env(),
                             cwd=ROOT)
        for name in ("p2pft", "p2pft-server", "p2pft-relay"):
            self.assertRegex(out.stdout, rf"\n\s+{re.escape(name)}\s")

    def test_test_script_comment(self):
        with open(os.path.join(ROOT, "scripts", "test.sh")) as f:
            self.assertNotIn("~35 s", f.read())
