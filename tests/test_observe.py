"""
Issue 17, observability: the servers' events (L{p2pft.server.events}) as
the state machines report them, their log lines (text and JSON) and their
metrics; the peers' REPORT; the health check (C{/healthz}, C{p2pft ping});
and a real server with C{--metrics} scraped after a transfer and a refused
client.
"""

from __future__ import annotations

import io
import json
import os
import re

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, Logger, LogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from p2pft import logs
from p2pft.options import Options
from p2pft.rendezvous import RendezvousClientProtocol, RendezvousError, ping
from p2pft.server.events import FanOut, IServerEvents, Refusal
from p2pft.server.logs import LogEvents
from p2pft.server.metrics import HealthPage, Metrics, MetricsPage
from p2pft.server.relay import RelayFactory, RelayLimits
from p2pft.server.rendezvous import RendezvousServerFactory
from tests.files import make_file, sha256_of
from tests.procs import Workspace, p2pft_argv, spawn
from tests.test_server_relay import TOKEN, Transport as _Transport, lose, take

SECRET_CODE = "918273645-alpha-tangerine"
NAMEPLATE, PASSWORD = "918273645", "alpha-tangerine"


class Transport(_Transport):
    def loseWriteConnection(self):
        pass


@implementer(IServerEvents)
class Recording:
    """Every event, as (name, args...)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name not in IServerEvents:
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))

    def named(self, name: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == name]


class CapturedLog:
    """LogEvents writing to a private publisher; its lines as text or JSON."""

    def __init__(self, fmt="text"):
        self.out = io.StringIO()
        publisher = LogPublisher(logs.observer(fmt, self.out, LogLevel.info))
        self.events = LogEvents(Logger(namespace="p2pft.server", observer=publisher))

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


def rendezvous(events, **options):
    clock = Clock()
    factory = RendezvousServerFactory(clock, events=events, **options)

    def connect(host="203.0.113.5", port=40000):
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        welcome, _, rest = transport.value().partition(b"\n")
        transport.clear()
        transport.write(rest)  # what came after WELCOME
        return proto, transport

    return clock, factory, connect


def say(proto, text: str) -> None:
    proto.dataReceived(text.encode("utf-8") + b"\n")


class RendezvousEventTests(SynchronousTestCase):
    def setUp(self):
        self.events = Recording()
        self.clock, self.factory, self.connect = rendezvous(
            self.events, hello_timeout=30, waiting_timeout=100, paired_timeout=50, max_per_ip=2)

    def pair(self):
        a, ta = self.connect()
        b, tb = self.connect(host="198.51.100.9")
        say(a, f"CLAIM {NAMEPLATE}")
        self.clock.advance(2.5)
        say(b, f"CLAIM {NAMEPLATE}")
        ta.clear(), tb.clear()
        return a, ta, b, tb

    def test_connections_pairing_and_its_time(self):
        self.pair()
        self.assertEqual(self.events.named("connected"), [("203.0.113.5",), ("198.51.100.9",)])
        self.assertEqual(self.events.named("paired"), [(2.5,)])
        self.assertEqual(self.events.named("refused"), [])

    def test_refusal_by_fixed_reason_with_the_address_key(self):
        self.connect(), self.connect()
        p, t = self.connect()
        self.assertIn(b"ERROR too many connections from your address", t.value())
        self.assertEqual(self.events.named("refused"), [(Refusal.PER_IP, "203.0.113.5")])

    def test_a_clients_words_never_reach_the_event(self):
        p, t = self.connect()
        say(p, SECRET_CODE)
        # The client still hears what it sent; the event has only the label.
        self.assertEqual(t.value(), f"ERROR unknown command {SECRET_CODE!r}\n".encode())
        self.assertEqual(self.events.named("refused"), [(Refusal.UNKNOWN_COMMAND, "203.0.113.5")])
        say(p, "CLAIM 1")  # a refused connection is not read again
        self.assertEqual(len(self.events.named("refused")), 1)

    def test_every_refusal_of_the_protocol_is_an_event(self):
        for line, why in ((b"\xff\n", Refusal.NOT_UTF8), (b"x" * 9000 + b"\n", Refusal.LINE_TOO_LONG),
                          (b"MSG !!\n", Refusal.BAD_MESSAGE), (b"MSG AAAA\n", Refusal.MSG_BEFORE_PAIRED),
                          (b"CLAIM 0\n", Refusal.INVALID_NAMEPLATE)):
            events = Recording()
            _, _, connect = rendezvous(events)
            p, t = connect()
            p.dataReceived(line)
            self.assertEqual(events.named("refused"), [(why, "203.0.113.5")], line[:20])
            self.assertTrue(t.value().startswith(b"ERROR "))

    def test_hello_timeout_and_expiry(self):
        self.connect()
        self.clock.advance(30)
        self.assertEqual(self.events.named("refused"), [(Refusal.HELLO_TIMEOUT, "203.0.113.5")])
        a, ta = self.connect(port=1)
        say(a, "ALLOCATE")
        self.clock.advance(100)
        self.assertEqual(self.events.named("expired"), [(False,)])
        self.assertIn(b"ERROR nobody claimed the nameplate in time", ta.value())
        self.pair()
        self.clock.advance(50)
        self.assertEqual(self.events.named("expired"), [(False,), (True,)], "one event per nameplate")

    def test_report_once_after_paired(self):
        a, ta, b, tb = self.pair()
        say(a, "REPORT direct 0.183")
        self.assertEqual(self.events.named("peerReport"), [("direct", 0.183)])
        self.assertEqual(ta.value(), b"")
        say(b, "REPORT relay 2")
        self.assertEqual(self.events.named("peerReport"), [("direct", 0.183), ("relay", 2.0)])
        say(a, "REPORT direct 0.1")
        self.assertEqual(ta.value(), b"ERROR one REPORT per connection\n")
        self.assertEqual(len(self.events.named("peerReport")), 2)
        self.assertEqual(self.events.named("refused"), [(Refusal.BAD_REPORT, "203.0.113.5")])

    def test_bad_reports_are_refused(self):
        for line in ("REPORT direct 1.5", "REPORT sideways 1", "REPORT direct -1", "REPORT direct 1e3",
                     "REPORT direct nan", "REPORT direct 0.1234", "REPORT direct 86400.001",
                     "REPORT direct 9999999", "REPORT direct", "REPORT direct 1 x"):
            events = Recording()
            clock, _, connect = rendezvous(events)
            a, ta = connect()
            b, _ = connect(port=2)
            if line != "REPORT direct 1.5":
                say(a, "CLAIM 5"), say(b, "CLAIM 5")
                ta.clear()
            say(a, line)  # (the first: before PAIRED)
            self.assertEqual(events.named("peerReport"), [], line)
            self.assertTrue(ta.value().startswith(b"ERROR "), (line, ta.value()))
            self.assertEqual(len(events.named("refused")), 1, line)


class RelayEventTests(SynchronousTestCase):
    def setUp(self):
        self.events = Recording()
        self.clock = Clock()

    def legs(self, **limits):
        factory = RelayFactory(self.clock, RelayLimits(**limits), self.events)
        protos = []
        for side, host in (("sender", "203.0.113.5"), ("receiver", "198.51.100.9")):
            p = factory.buildProtocol(None)
            p.makeConnection(Transport(host, 5000))
            p.dataReceived(f"RELAY {TOKEN} {side}\n".encode())
            protos.append(p)
        for p in protos:
            take(p.transport)
        return protos

    def test_session_start_and_end_with_bytes_time_and_why(self):
        a, b = self.legs()
        self.assertEqual(self.events.named("relaySessionStarted"), [(1, ("203.0.113.5", "198.51.100.9"))])
        a.dataReceived(b"x" * 1000)
        self.clock.advance(4)
        b.dataReceived(b"y" * 24)
        a.readConnectionLost()
        b.readConnectionLost()
        self.assertEqual(self.events.named("relaySessionEnded"), [(1, 1024, 4.0, "closed")])

    def test_idle_cap_and_loss(self):
        for limits, act, why in (({"idle_timeout": 70}, lambda a, b: self.clock.advance(70), "idle"),
                                 ({"max_bytes": 10}, lambda a, b: a.dataReceived(b"z" * 11), "byte-cap"),
                                 ({}, lambda a, b: lose(a), "lost")):
            self.events.calls.clear()
            a, b = self.legs(**limits)
            act(a, b)
            [(number, _, _, got)] = self.events.named("relaySessionEnded")
            self.assertEqual(got, why)

    def test_relay_refusals(self):
        factory = RelayFactory(self.clock, RelayLimits(), self.events)
        p = factory.buildProtocol(None)
        p.makeConnection(Transport("203.0.113.5", 1))
        p.dataReceived(b"HELLO\n")
        p2 = factory.buildProtocol(None)
        p2.makeConnection(Transport("203.0.113.6", 1))
        p2.dataReceived(f"RELAY {TOKEN} sender\n".encode())
        self.clock.advance(60)
        self.assertEqual(self.events.named("refused"), [(Refusal.RELAY_MALFORMED, "203.0.113.5"),
                                                        (Refusal.RELAY_ALONE, "203.0.113.6")])
        self.assertEqual(p.transport.value(), b"ERROR expected RELAY\n")


class LogLineTests(SynchronousTestCase):
    def test_a_refused_client_is_one_line_with_its_reason_and_no_secret(self):
        log = CapturedLog()
        _, _, connect = rendezvous(log.events)
        p, t = connect()
        say(p, SECRET_CODE)
        [line] = log.lines()
        self.assertIn("refused 203.0.113.5: unknown-command", line)
        for secret in (NAMEPLATE, PASSWORD, "alpha", "tangerine"):
            self.assertNotIn(secret, line)

    def test_a_whole_session_logs_no_code_or_token(self):
        log = CapturedLog("json")
        clock, factory, connect = rendezvous(log.events, paired_timeout=50)
        a, _ = connect()
        b, _ = connect(host="198.51.100.9")
        say(a, f"CLAIM {NAMEPLATE}"), say(b, f"CLAIM {NAMEPLATE}")
        say(a, "REPORT direct 0.2")
        say(b, f"CLAIM {NAMEPLATE}")
        relay = RelayFactory(clock, RelayLimits(), log.events)
        legs = []
        for side in ("sender", "receiver"):
            p = relay.buildProtocol(None)
            p.makeConnection(Transport("203.0.113.5", 1))
            p.dataReceived(f"RELAY {TOKEN} {side}\n".encode())
            legs.append(p)
        legs[0].dataReceived(b"secret bytes")
        lose(legs[0])
        clock.advance(50)
        events = [json.loads(line) for line in log.lines()]
        self.assertEqual([e["event"] for e in events],
                         ["paired", "report", "refused", "relay-start", "relay-end", "expired"])
        self.assertEqual(events[2]["reason"], "already-on-nameplate")
        self.assertEqual(events[4]["bytes"], 12)
        text = log.out.getvalue()
        for secret in (NAMEPLATE, PASSWORD, TOKEN, TOKEN[:16], "secret"):
            self.assertNotIn(secret, text)

    def test_json_lines_parse_and_carry_the_fields(self):
        out = io.StringIO()
        observer = logs.observer("json", out, LogLevel.info)
        log = Logger(namespace="p2pft.server", observer=observer)
        log.info("relay session {session} ended", event="relay-end", session=3, bytes=10, why="idle",
                 odd=object())
        log.debug("hidden at info level")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("boom \n with a newline")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = map(json.loads, lines)
        self.assertEqual((first["level"], first["namespace"], first["text"], first["session"], first["why"]),
                         ("info", "p2pft.server", "relay session 3 ended", 3, "idle"))
        self.assertNotIn("odd", first)
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["traceback"])

    def test_fan_out(self):
        a, b = Recording(), Recording()
        fan = FanOut(a, b)
        verifyObject(IServerEvents, fan)
        fan.paired(1.0)
        self.assertEqual(a.calls, [("paired", 1.0)])
        self.assertEqual(b.calls, [("paired", 1.0)])
        self.assertRaises(AttributeError, getattr, fan, "nonsense")
        verifyObject(IServerEvents, LogEvents())
        verifyObject(IServerEvents, Metrics())


class MetricsTests(SynchronousTestCase):
    def test_events_move_the_metrics(self):
        metrics = Metrics()
        clock, factory, connect = rendezvous(metrics, max_per_ip=2)
        metrics.watch(rendezvous=factory.state)
        a, _ = connect()
        b, _ = connect()
        connect()  # refused
        say(a, "CLAIM 5")
        self.assertEqual(self.value(metrics, "p2pft_nameplates_in_use"), 1)
        clock.advance(3)
        say(b, "CLAIM 5")
        say(a, "REPORT direct 0.25")
        get = self.value
        self.assertEqual(get(metrics, "p2pft_connections_total"), 3)
        self.assertEqual(get(metrics, "p2pft_connections_open"), 2)
        self.assertEqual(get(metrics, "p2pft_refusals_total", reason="per-ip"), 1)
        self.assertEqual(get(metrics, "p2pft_refusals_total", reason="busy"), 0)
        self.assertEqual(get(metrics, "p2pft_pairings_total"), 1)
        self.assertEqual(get(metrics, "p2pft_pairing_seconds_sum"), 3)
        self.assertEqual(get(metrics, "p2pft_peer_sessions_total", path="direct"), 1)
        self.assertEqual(get(metrics, "p2pft_peer_sessions_total", path="relay"), 0)
        self.assertEqual(get(metrics, "p2pft_peer_connect_seconds_bucket", path="direct", le="0.25"), 1)
        self.assertEqual(get(metrics, "p2pft_peer_connect_seconds_bucket", path="direct", le="0.1"), 0)
        a.connectionLost(None)
        b.connectionLost(None)
        self.assertEqual(get(metrics, "p2pft_connections_open"), 0)
        self.assertEqual(get(metrics, "p2pft_nameplates_in_use"), 0)

    def test_relay_metrics(self):
        metrics = Metrics()
        clock = Clock()
        factory = RelayFactory(clock, RelayLimits(), metrics)
        metrics.watch(relay=factory.relay)
        protos = []
        for side in ("sender", "receiver"):
            p = factory.buildProtocol(None)
            p.makeConnection(Transport("203.0.113.5", 1))
            p.dataReceived(f"RELAY {TOKEN} {side}\n".encode())
            protos.append(p)
        self.assertEqual(self.value(metrics, "p2pft_relay_sessions_open"), 1)
        self.assertEqual(self.value(metrics, "p2pft_connections_open"), 2)
        protos[0].dataReceived(b"x" * 500)
        lose(protos[0])
        self.assertEqual(self.value(metrics, "p2pft_relay_sessions_total"), 1)
        self.assertEqual(self.value(metrics, "p2pft_relay_bytes_total"), 500)
        self.assertEqual(self.value(metrics, "p2pft_relay_sessions_ended_total", why="lost"), 1)
        self.assertEqual(self.value(metrics, "p2pft_relay_sessions_open"), 0)

    def test_two_services_in_one_process_do_not_collide(self):
        one, two = Metrics(), Metrics()
        one.paired(1.0)
        self.assertEqual(self.value(one, "p2pft_pairings_total"), 1)
        self.assertEqual(self.value(two, "p2pft_pairings_total"), 0)

    def test_pages(self):
        metrics = Metrics()
        metrics.paired(1.0)
        request = DummyRequest([b""])
        body = MetricsPage(metrics.registry).render_GET(request)
        self.assertIn(b"p2pft_pairings_total 1.0\n", body)
        self.assertNotIn(b"_created", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        up = [True]
        health = HealthPage(lambda: up[0])
        request = DummyRequest([b""])
        self.assertEqual(health.render_GET(request), b"ok\n")
        self.assertEqual(request.responseCode, None)  # 200
        up[0] = False
        request = DummyRequest([b""])
        self.assertEqual(health.render_GET(request), b"not listening\n")
        self.assertEqual(request.responseCode, 503)

    @staticmethod
    def value(metrics, name, **labels):
        return metrics.registry.get_sample_value(name, labels)


class ClientReportTests(SynchronousTestCase):
    def client(self):
        client = RendezvousClientProtocol()
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"WELCOME p2pft 1 203.0.113.5 4000 -\nPAIRED\n")
        return client, transport

    def test_the_report_line(self):
        client, t = self.client()
        client.report("direct", 0.18349)
        client.report("relay", 1e9)
        self.assertEqual(t.value(), b"REPORT direct 0.183\nREPORT relay 86400.000\n")

    def test_an_old_servers_error_is_ignored(self):
        """An old server answers REPORT with ERROR: nothing awaits it, so no
        error reaches the user or the log."""
        seen = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        client, t = self.client()
        paired = client.paired()
        client.report("direct", 0.2)
        closed = client.close()
        client.dataReceived(b"ERROR unknown command 'REPORT'\n")
        client.connectionLost(None)
        self.successResultOf(closed)
        self.successResultOf(paired)
        self.assertEqual([e for e in seen if e.get("log_level", LogLevel.info) >= LogLevel.warn], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_ping_matches_its_pong(self):
        client, t = self.client()
        d = client.ping("healthcheck")
        self.assertNoResult(d)
        client.dataReceived(b"PONG other\n")
        self.assertNoResult(d)
        client.dataReceived(b"PONG healthcheck\n")
        self.successResultOf(d)
        d = client.ping("x")
        client.dataReceived(b"ERROR busy\n")
        self.failureResultOf(d, RendezvousError)


class OptionTests(SynchronousTestCase):
    def parse(self, *argv):
        config = Options()
        config.parseOptions(list(argv))
        return config.subOptions

    def test_metrics_and_log_format(self):
        self.assertEqual(self.parse("server", "--metrics", "127.0.0.1:0")["metrics"], ("127.0.0.1", 0))
        self.assertEqual(self.parse("relay", "--metrics", "[::1]:9101")["metrics"], ("::1", 9101))
        self.assertIsNone(self.parse("server")["metrics"])
        self.assertEqual(self.parse("server")["log-format"], "text")
        self.assertEqual(self.parse("relay", "--log-format", "json")["log-format"], "json")
        for bad in ("localhost:9100", "127.0.0.1", "127.0.0.1:70000", "1.2.3.999:1", ":9100"):
            e = self.assertRaises(usage.UsageError, self.parse, "server", "--metrics", bad)
            self.assertIn("--metrics", str(e))
        self.assertRaises(usage.UsageError, self.parse, "server", "--log-format", "xml")

    def test_the_twistd_plugins_leave_the_log_format_to_twistd(self):
        from p2pft import relay_tap, server_tap

        for tap in (server_tap, relay_tap):
            options = tap.Options()
            self.assertRaises(usage.UsageError, options.parseOptions, ["--log-format", "json"])
            options = tap.Options()
            options.parseOptions(["--metrics", "127.0.0.1:0"])
            self.assertEqual(options["metrics"], ("127.0.0.1", 0))
        self.assertIsNotNone(logs.stderr_json())

    def test_ping_options(self):
        s = self.parse("ping", "127.0.0.1:9000")
        self.assertEqual((s["server"], s["timeout"]), (("127.0.0.1", 9000), 5.0))
        self.assertRaises(usage.UsageError, self.parse, "ping")
        self.assertRaises(usage.UsageError, self.parse, "ping", "--timeout", "0", "h:1")
        self.assertRaises(usage.UsageError, self.parse, "ping", "--timeout", "301", "h:1")


class Silent(Protocol):
    pass


class PingTests(TestCase):
    timeout = 30

    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return ("127.0.0.1", port.getHost().port)

    async def test_ping_a_server(self):
        factory = RendezvousServerFactory(reactor)
        version, seconds = await ping(reactor, self.listen(factory), 10)
        self.assertEqual(version, "1")
        self.assertGreaterEqual(seconds, 0)

    async def test_ping_something_else(self):
        address = self.listen(Factory.forProtocol(Silent))
        with self.assertRaises(RendezvousError) as e:
            await ping(reactor, address, 0.3)
        self.assertEqual(str(e.exception), "no answer within 0.3 s")

    async def test_ping_a_closed_port(self):
        factory = Factory.forProtocol(Silent)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        address = ("127.0.0.1", port.getHost().port)
        await port.stopListening()
        with self.assertRaises(RendezvousError) as e:
            await ping(reactor, address, 5)
        self.assertEqual(str(e.exception), "cannot connect: connection refused")


class _Refused(LineReceiver):
    """Connects, says one line after WELCOME, collects what comes back."""

    delimiter = b"\n"

    def __init__(self, line: bytes):
        self.line, self.got, self.done = line, [], defer.Deferred()

    def lineReceived(self, line):
        self.got.append(line)
        if line.startswith(b"WELCOME"):
            self.sendLine(self.line)

    def connectionLost(self, reason=None):
        self.done.callback(self.got)


class ServerProcessTests(TestCase):
    """Issue 17's test: a real server with --metrics, a transfer through
    it and a refused client, then a scrape."""

    timeout = 120

    async def test_transfer_refusal_and_scrape(self):
        ws = Workspace(self)
        server = spawn(self, "server", p2pft_argv(
            "server", "--port", "tcp:0:interface=127.0.0.1", "--metrics", "127.0.0.1:0", "--log-format", "json"))
        m = await server.wait_for(r"rendezvous server listening on 127\.0\.0\.1:(\d+)", "err")
        addr = f"127.0.0.1:{m.group(1)}"
        metrics_port = int((await server.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)", "err")).group(1))

        src = make_file(os.path.join(ws.src, "holiday-photos.bin"), 100_000)
        sender = spawn(self, "sender", p2pft_argv("send", "--code", SECRET_CODE, addr, src))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "-o", ws.out, addr, SECRET_CODE))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(sha256_of(os.path.join(ws.out, "holiday-photos.bin")), sha256_of(src))

        refused = _Refused(f"HELLO {SECRET_CODE}".encode())
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(m.group(1)))
        await endpoint.connect(ClientFactory.forProtocol(lambda: refused))
        got = await refused.done
        self.assertTrue(got[-1].startswith(b"ERROR unknown command"), got)

        ping_proc = spawn(self, "ping", p2pft_argv("ping", addr))
        self.assertEqual(await ping_proc.wait_exit(), 0, ping_proc.text())
        self.assertRegex(ping_proc.out.decode(), rf"^p2pft ping {re.escape(addr)}: ok, p2pft 1 answered in \d+ ms\n$")

        # The sender's REPORT is its last line: the server logs it when it
        # counted it.
        await server.wait_for(r'"event": "report"', "err")
        agent = Agent(reactor)
        response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/metrics".encode())
        self.assertEqual(response.code, 200)
        text = (await readBody(response)).decode()

        def sample(line):
            found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
            self.assertIsNotNone(found, line)
            return float(found.group(1))

        self.assertEqual(sample("p2pft_pairings_total"), 1)
        self.assertEqual(sample('p2pft_refusals_total{reason="unknown-command"}'), 1)
        self.assertEqual(sample('p2pft_peer_sessions_total{path="relay"}'), 0)
        self.assertEqual(sample('p2pft_peer_connect_seconds_count{path="direct"}'), 1)
        self.assertGreaterEqual(sample("p2pft_connections_total"), 4)  # sender, receiver, refused, ping
        self.assertEqual(sample("p2pft_pairing_seconds_count"), 1)

        response = await agent.request(b"GET", f"http://127.0.0.1:{metrics_port}/healthz".encode())
        self.assertEqual((response.code, await readBody(response)), (200, b"ok\n"))

        lines = [json.loads(line) for line in server.err.decode().splitlines()]
        ours = [e for e in lines if e["namespace"] == "p2pft.server"]
        self.assertEqual([e["event"] for e in ours],
                         ["listening", "listening", "paired", "report", "refused"])
        [refusal] = [e for e in lines if e.get("event") == "refused"]
        self.assertEqual((refusal["reason"], refusal["address"]), ("unknown-command", "127.0.0.1"))
        log = server.err.decode()
        for secret in (NAMEPLATE, PASSWORD, "alpha", "tangerine", "holiday"):
            self.assertNotIn(secret, log)



class ReviewFixTests(SynchronousTestCase):
    """What a review of the observability found."""

    def test_a_flood_of_refusals_is_counted_not_logged_line_by_line(self):
        from p2pft.server.events import Refusal
        from p2pft.server.logs import REFUSAL_LOG_BURST, REFUSAL_LOG_RATE

        lines = []
        publisher = LogPublisher(lines.append)
        clock = Clock()
        events = LogEvents(Logger(namespace="p2pft.server", observer=publisher), clock=clock)
        reason = list(Refusal)[0]
        for _ in range(5000):  # one client looping connect, bad line, close
            events.refused(reason, "198.51.100.7")
        self.assertEqual(len(lines), REFUSAL_LOG_BURST)
        clock.advance(1)
        events.refused(reason, "198.51.100.7")
        self.assertEqual(len(lines), REFUSAL_LOG_BURST + 1)
        self.assertEqual(lines[-1]["unlogged"], 5000 - REFUSAL_LOG_BURST)
        self.assertIn("more for that reason, not logged", lines[-1]["log_format"])
        self.assertGreaterEqual(REFUSAL_LOG_RATE, 1)

    def test_an_accept_header_the_library_chokes_on_gets_the_plain_format(self):
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        from p2pft.server.metrics import MetricsPage

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text; version=\xe9"])
        body = MetricsPage(CollectorRegistry()).render_GET(request)
        self.assertIsInstance(body, bytes)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()])
