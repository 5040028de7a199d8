"""
C{--config FILE} for C{p2pft server} and C{p2pft relay}: the merge of a TOML
file under the command line, every way a file can be wrong (one line naming
the file and the key, exit 2), and a real server that listens where its file
says.
"""

from __future__ import annotations

import io
import os
import socket
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.plugin import getPlugins
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pft import cli
from p2pft.options import Options, RelayOptions, ServerOptions, dual_stack
from p2pft.options.configfile import MAX_CONFIG_BYTES, ConfigFileOptions
from p2pft.options.servers import _RelayLimitOptions

from . import procs


class _Files:
    def write(self, text: str | bytes, name: str = "server.toml") -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path

    def parse(self, text: str, *argv: str, options=ServerOptions):
        path = self.write(text)
        config = options()
        config.parseOptions(["--config", path, *argv])
        return config, path

    def error(self, text: str, *argv: str, options=ServerOptions) -> tuple[str, str]:
        path = self.write(text)
        with self.assertRaises(usage.UsageError) as caught:
            options().parseOptions(["--config", path, *argv])
        return str(caught.exception), path


class MergeTests(_Files, SynchronousTestCase):
    SAMPLE = (
        'port = "tcp:9100:interface=127.0.0.1"\n'
        "relay = true\n"
        "relay-max-sessions = 500\n"
        "waiting-timeout = 1800\n"
        "relay-idle-timeout = 120.5\n"
        'advertise-relay = ["relay.example.org:9001", "[2001:db8::1]:9001"]\n'
    )

    def test_every_kind_of_value(self):
        config, _ = self.parse(self.SAMPLE)
        self.assertEqual(config["port"], "tcp:9100:interface=127.0.0.1")
        self.assertTrue(config["relay"])
        self.assertEqual(config["relay-max-sessions"], 500)
        self.assertEqual(config["waiting-timeout"], 1800.0)
        self.assertEqual(config["advertise-relay"], ["relay.example.org:9001", "[2001:db8::1]:9001"])
        # postOptions ran on the merged values.
        self.assertEqual(config["limits"].max_sessions, 500)
        self.assertEqual(config["limits"].idle_timeout, 120.5)

    def test_values_go_through_the_option_handlers(self):
        # A bare port number becomes the dual-stack endpoint, as --port 9100 does.
        config, _ = self.parse('port = "9100"\nadvertise-relay = "relay.example.org:9001"\n')
        self.assertEqual(config["port"], dual_stack(9100))
        self.assertEqual(config["advertise-relay"], ["relay.example.org:9001"])

    def test_command_line_overrides(self):
        config, _ = self.parse(self.SAMPLE, "--relay-max-sessions", "7", "-p", "tcp:9200",
                               "--advertise-relay", "other.example.org:1")
        self.assertEqual(config["relay-max-sessions"], 7)
        self.assertEqual(config["port"], "tcp:9200")
        # A repeatable option on the command line replaces the file's list.
        self.assertEqual(config["advertise-relay"], ["other.example.org:1"])
        self.assertEqual(config["waiting-timeout"], 1800.0)

    def test_options_before_and_after_config(self):
        path = self.write('port = "tcp:9100"\nmax-per-ip = 5\n')
        config = ServerOptions()
        config.parseOptions(["--max-per-ip=9", "--config", path])
        self.assertEqual((config["port"], config["max-per-ip"]), ("tcp:9100", 9))

    def test_false_flag_and_empty_file_keep_defaults(self):
        config, _ = self.parse("relay = false\n")
        self.assertFalse(config["relay"])
        plain = ServerOptions()
        plain.parseOptions([])
        config, _ = self.parse("")
        for key in ("port", "relay", "max-connections", "waiting-timeout", "advertise-relay"):
            self.assertEqual(config[key], plain[key], key)

    def test_relay_command(self):
        config, _ = self.parse('port = "tcp:9101"\nrelay-max-per-ip = 3\nrelay-rate = 500000\n',
                               options=RelayOptions)
        self.assertEqual(config["port"], "tcp:9101")
        self.assertEqual((config["limits"].max_per_ip, config["limits"].rate), (3, 500000))

    def test_through_the_top_level_and_the_twistd_plugins(self):
        path = self.write('port = "tcp:9102"\nrelay = true\n')
        top = Options()
        top.parseOptions(["server", "--config", path])
        self.assertEqual((top.subOptions["port"], top.subOptions["relay"]), ("tcp:9102", True))
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        for tapname in ("p2pft-server", "p2pft-relay"):
            config = makers[tapname].options()
            config.parseOptions(["--config", path] if tapname == "p2pft-server"
                                else ["--config", self.write('port = "tcp:9103"\n')])
            self.assertIn(config["port"], ("tcp:9102", "tcp:9103"))

    def test_a_new_option_works_without_an_edit(self):
        # The keys are read off the Options class, not a list kept by hand.
        class Extended(ConfigFileOptions, _RelayLimitOptions):
            optFlags = [["pretty", None, "A new flag."]]
            optParameters = _RelayLimitOptions.optParameters + [
                ["log-format", None, "text", "A new parameter."],
                ["scrape-every", None, 15, "A new number.", int],
            ]

            def __init__(self):
                super().__init__()
                self["tag"] = []

            def opt_tag(self, value):
                """A new repeatable one."""
                self["tag"].append(value.upper())

        config, path = self.parse('pretty = true\nlog-format = "json"\nscrape-every = 30\n'
                                  'tag = ["a", "b"]\n', options=Extended)
        self.assertEqual((config["pretty"], config["log-format"], config["scrape-every"], config["tag"]),
                         (True, "json", 30, ["A", "B"]))
        message, path = self.error("scrape-every = 'x'\n", options=Extended)
        self.assertEqual(message, f"{path}: scrape-every takes a whole number, not a string")

    def test_help_is_listed_and_wins_over_a_broken_file(self):
        self.assertIn("--config", ServerOptions().__str__())
        self.assertIn("--config", RelayOptions().__str__())
        path = self.write("not toml at all [")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            ServerOptions().parseOptions(["--config", path, "--help"])
        self.assertIn("--config=", out.getvalue())


class ErrorTests(_Files, SynchronousTestCase):
    """Each wrong file is one line that names the file and the key."""

    def test_unknown_key(self):
        message, path = self.error('port = "tcp:9000"\nprot = "tcp:9001"\n')
        self.assertTrue(message.startswith(f"{path}: unknown key 'prot' (known: advertise-relay, "), message)
        self.assertIn("relay-max-sessions", message)
        self.assertNotIn("config,", message)

    def test_keys_that_have_no_place_in_a_file(self):
        for key in ("config", "help", "version"):
            message, path = self.error(f'{key} = "x"\n')
            self.assertEqual(message, f"{path}: {key} cannot be set in a config file")

    def test_a_table_is_not_a_section(self):
        message, path = self.error('[server]\nport = "tcp:9000"\n')
        self.assertIn(f"{path}: unknown key 'server'", message)

    def test_wrong_types(self):
        cases = {
            'relay = "yes"': "relay takes true or false, not a string",
            "relay = 1": "relay takes true or false, not an integer",
            "relay-max-sessions = 2.5": "relay-max-sessions takes a whole number, not a float",
            'relay-max-sessions = "500"': "relay-max-sessions takes a whole number, not a string",
            "relay-max-sessions = true": "relay-max-sessions takes a whole number, not true/false",
            'waiting-timeout = "60"': "waiting-timeout takes a number, not a string",
            "port = 9000": 'port takes a string, not an integer (quote it: port = "9000")',
            "port = [1]": "port takes a string, not an array",
            "port = {a = 1}": "port takes a string, not a table",
            "port = 1979-05-27": "port takes a string, not a date or time",
            'advertise-relay = ["a.example:1", 2]': "advertise-relay takes a string or an array of strings, not an integer",
        }
        for line, expected in cases.items():
            message, path = self.error(line + "\n")
            self.assertEqual(message, f"{path}: {expected}", line)

    def test_a_wrong_type_counts_even_when_overridden(self):
        message, path = self.error("port = 9000\n", "--port", "tcp:9000")
        self.assertEqual(message, f'{path}: port takes a string, not an integer (quote it: port = "9000")')

    def test_values_the_option_handlers_refuse(self):
        cases = {
            'port = "99999"': "port takes a port number (9000) or a Twisted endpoint "
                              "(tcp:9000:interface=203.0.113.7); 99999 is not a port number (0-65535)",
            'port = "tcp:nonsense:x=y"': "port takes a port number (9000) or a Twisted endpoint "
                                         "(tcp:9000:interface=203.0.113.7), not 'tcp:nonsense:x=y'",
            'advertise-relay = ["nope"]': "advertise-relay: server must be HOST:PORT, not 'nope'",
        }
        for line, expected in cases.items():
            message, path = self.error(line + "\n")
            self.assertEqual(message, f"{path}: {expected}", line)

    def test_values_postoptions_refuses(self):
        cases = {
            "relay-max-sessions = -1": "relay-max-sessions must be positive",
            "max-per-ip = 0": "max-per-ip must be positive",
            "relay-rate = -5": "relay-rate must not be negative",
            "relay-idle-timeout = 10": "relay-idle-timeout must be more than 60 s "
                                       "(protocol v1 peers send a keepalive every minute while a person decides)",
        }
        for line, expected in cases.items():
            message, path = self.error(line + "\n")
            self.assertEqual(message, f"{path}: {expected}", line)

    def test_a_command_line_mistake_is_not_blamed_on_the_file(self):
        message, _ = self.error("relay-max-sessions = 5\n", "--max-per-ip", "0")
        self.assertEqual(message, "--max-per-ip must be positive")

    def test_unreadable_files(self):
        missing = os.path.join(os.path.abspath(self.mktemp()), "server.toml")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        for path, expected in ((missing, "No such file or directory"), (folder, "Is a directory")):
            with self.assertRaises(usage.UsageError) as caught:
                ServerOptions().parseOptions(["--config", path])
            self.assertEqual(str(caught.exception), f"cannot read the config file {path}: {expected}")

    def test_not_toml_not_utf8_too_large(self):
        message, path = self.error("port = \n")
        self.assertTrue(message.startswith(f"{path}: not valid TOML: "), message)
        self.assertIn("line 1", message)
        message, path = self.error(b'port = "\xff"\n')
        self.assertEqual(message, f"{path}: not UTF-8 text")
        message, path = self.error("# " + "x" * MAX_CONFIG_BYTES + "\n")
        self.assertEqual(message, f"{path}: too large for a config file (over 64 KiB)")

    def test_console_script_says_it_in_one_line_and_exits_2(self):
        path = self.write("relay-max-sessions = 2.5\n")
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as caught:
            cli.main(["server", "--config", path])
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(err.getvalue(), f"p2pft: error: {path}: relay-max-sessions takes a whole number, "
                                         "not a float (see 'p2pft server --help')\n")


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FirstLine(LineReceiver):
    delimiter = b"\n"

    def __init__(self):
        self.line = defer.Deferred()

    def lineReceived(self, line):
        if not self.line.called:
            self.line.callback(line.decode())
        self.transport.loseConnection()


class RealServerTests(_Files, TestCase):
    async def _serve(self, argv: list[str], config: str, name: str):
        port = _free_loopback_port()
        path = self.write(config.format(port=port))
        server = procs.spawn(self, name, argv + ["--config", path], cwd=os.path.dirname(path))
        await server.wait_for(rf"listening on 127\.0\.0\.1:{port}\b")
        client = _FirstLine()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), client)
        return await client.line.addTimeout(procs.DEADLINE, reactor)

    async def test_server_listens_where_the_file_says(self):
        welcome = await self._serve(
            procs.p2pft_argv("server"),
            'port = "tcp:{port}:interface=127.0.0.1"\nrelay = true\n'
            'advertise-relay = ["relay.example.org:9001"]\n', "server")
        self.assertTrue(welcome.startswith("WELCOME "), welcome)
        self.assertTrue(welcome.endswith(" *,relay.example.org:9001"), welcome)

    async def test_twistd_plugin_reads_it_too(self):
        welcome = await self._serve(
            procs.twistd_argv("-n", "--pidfile=", "--logfile=-", "p2pft-server"),
            'port = "tcp:{port}:interface=127.0.0.1"\n', "twistd-server")
        self.assertTrue(welcome.startswith("WELCOME ") and welcome.endswith(" -"), welcome)
