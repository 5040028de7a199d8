"""
The relay from the peer's side: the server's relay options reaching the
relay (C{p2pft server --relay}, C{--advertise-relay}), the relays a client
reads from WELCOME, real peer connections (PunchConnector + PeerConnection)
through a relay on loopback, the punch error's reasons; then the real CLI
through the NAT lab, where two symmetric NATs leave the relay as the only
path.  The relay server itself is tested in tests/test_server_relay.py.

Tests marked C{# Regression:} failed before the fix they describe.
"""

from __future__ import annotations

import os

from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pft.channel import PeerConnection
from p2pft.channel.greeting import RELAY_LEGS, RelayGreeting
from p2pft.options import Options
from p2pft.punch import PunchConnector, PunchFailed, PunchSchedule, _reason
from p2pft.rendezvous import RendezvousClientProtocol
from p2pft.secure import RECEIVER, SENDER, Pake
from p2pft.server.relay import MAX_LEGS, RelayFactory, RelayLimits, RelayServer
from p2pft.server.rendezvous import RendezvousServerFactory
from p2pft.server.service import makeService
from p2pft.candidates import relays
from p2pft.peer import Settings
from tests.files import make_file, sha256_of
from tests.natlab import Nat, start_lab
from tests.procs import p2pft_argv, spawn
from tests.procs import Workspace
from tests import test_server_relay
from tests.test_server_relay import OTHER_TOKEN, TOKEN, bounded


class RelayOptionsAndWelcomeTests(SynchronousTestCase):
    def test_server_options_advertise(self):
        """`p2pft server --relay` advertises itself as `*`, first; each
        --advertise-relay is added; without --relay there is no relay."""
        cases = (
            ([], None, "-"),
            (["--relay"], True, "*"),
            (["--advertise-relay", "192.0.2.7:9001"], None, "192.0.2.7:9001"),
            (["--advertise-relay", "192.0.2.7:9001", "--relay", "--advertise-relay", "[2001:db8::1]:9002"],
             True, "*,192.0.2.7:9001,[2001:db8::1]:9002"),
        )
        for args, relay, expected in cases:
            with self.subTest(args=args):
                config = Options()
                config.parseOptions(["server", "--port", "tcp:0:interface=127.0.0.1", *args])
                service = makeService(config.subOptions, Clock())
                factory = service.rendezvous.factory
                self.assertEqual(factory.advertised_relays, expected)
                self.assertEqual(factory.relay is not None, bool(relay))

    def test_server_relay_limits_reach_the_relay(self):
        config = Options()
        config.parseOptions(["server", "--relay", "--relay-max-bytes", "100000", "--relay-rate", "5000",
                             "--relay-max-per-ip", "3", "--relay-max-sessions", "7",
                             "--relay-idle-timeout", "90"])
        limits = makeService(config.subOptions, Clock()).rendezvous.factory.relay.limits
        self.assertEqual((limits.max_bytes, limits.rate, limits.max_per_ip, limits.max_sessions,
                          limits.idle_timeout), (100000, 5000, 3, 7, 90.0))

    def test_client_reads_advertised_relays(self):
        client = RendezvousClientProtocol()
        client.makeConnection(StringTransport())
        client.dataReceived(b"WELCOME p2pft 1 198.51.100.4 4444 *,192.0.2.7:9001,[2001:db8::1]:9002\n")
        self.assertEqual(client.relays, ["*", "192.0.2.7:9001", "[2001:db8::1]:9002"])
        # "*" is the server at the address the client reached it on; a relay
        # the user named wins over every advertised one (no fallback).
        server = ("rv.example", 9000)
        self.assertEqual(relays(Settings(server), client.relays, "198.51.100.1"),
                         ([("198.51.100.1", 9000), ("192.0.2.7", 9001), ("2001:db8::1", 9002)], []))
        self.assertEqual(relays(Settings(server), client.relays, "::ffff:198.51.100.1")[0][0],
                         ("198.51.100.1", 9000))
        self.assertEqual(relays(Settings(server, relay=("192.0.2.99", 9999)), client.relays, "198.51.100.1"),
                         ([("192.0.2.99", 9999)], []))

    def test_server_cannot_point_peers_at_local_addresses(self):
        client = RendezvousClientProtocol()
        client.makeConnection(StringTransport())
        client.dataReceived(b"WELCOME p2pft 1 198.51.100.4 4444 "
                            b"127.0.0.1:22,[::1]:22,[fe80::1]:80,0.0.0.0:1,224.0.0.1:5,relay.example:9001\n")
        server = ("rv.example", 9000)
        # (A name is resolved first, then filtered: tests/test_hostile_peer.py.)
        self.assertEqual(relays(Settings(server), client.relays, "198.51.100.1"), ([], [("relay.example", 9001)]))
        # A server on loopback (a local test or demo) may name local relays.
        self.assertEqual(relays(Settings(("127.0.0.1", 9000)), client.relays, "127.0.0.1")[0][:2],
                         [("127.0.0.1", 22), ("::1", 22)])


class RelayLegLineTests(SynchronousTestCase):
    """The relay line a peer's leg sends (docs/PROTOCOL.md §6)."""

    def line(self, **kw) -> bytes:
        written = []
        RelayGreeting(TOKEN, "receiver", written.append, None, None, **kw).start()
        [line] = written
        return line

    def test_leg_zero_is_the_v1_line(self):
        self.assertEqual(self.line(), f"RELAY {TOKEN} receiver\n".encode())
        self.assertEqual(self.line(leg=0), f"RELAY {TOKEN} receiver\n".encode())

    def test_other_legs_carry_their_number(self):
        self.assertEqual(self.line(leg=1), f"RELAY {TOKEN} receiver 1\n".encode())
        self.assertEqual(self.line(leg=15), f"RELAY {TOKEN} receiver 15\n".encode())

    def test_leg_out_of_range_is_a_programming_error(self):
        for leg in (-1, RELAY_LEGS, True, 1.0, "1"):
            with self.subTest(leg=leg):
                self.assertRaises(ValueError, RelayGreeting, TOKEN, "sender", None, None, None, leg=leg)

    def test_the_relay_takes_every_leg_a_peer_may_send(self):
        self.assertEqual(RELAY_LEGS, MAX_LEGS)


class PunchErrorTextTests(SynchronousTestCase):
    """The per-address reasons that end up in the one-line punch error
    (seen in the NAT lab: a dial to the peer's private LAN address fails
    this way while the relay leg is refused)."""

    def test_relay_refusal_reason(self):
        self.assertEqual(_reason(Failure(error.ConnectionRefusedError())), "refused")

    def test_connect_failure_wrapping_a_failure_is_readable(self):
        # Regression: when a connecting socket is reported lost before it connected
        # (epoll POLLERR/POLLHUP, e.g. an ICMP unreachable from a router),
        # Twisted's tcp.BaseClient.connectionLost raises
        # ConnectError(string=<Failure ConnectionLost>).  p2pft/punch.py
        # _reason() does not recognise it and falls back to the first 80
        # characters of getErrorMessage(), so the user's one-line error reads
        # "...10.201.2.10:34867: An error occurred while connecting: [Failure
        # instance: Traceback (failure with n; 203.0.113.10:9999: relay:
        # refused; ...".  Suggested fix: in _reason, unwrap it first --
        #     if failure.check(error.ConnectError) and failure.value.args \
        #             and isinstance(failure.value.args[0], Failure):
        #         return _reason(failure.value.args[0])
        # (giving "closed"), or map it to "unreachable".
        wrapped = Failure(error.ConnectError(string=Failure(error.ConnectionLost())))
        text = _reason(wrapped)
        self.assertNotIn("Failure instance", text)
        self.assertNotIn("Traceback", text)


class PeerConnectionsThroughARelayTests(TestCase):
    timeout = 60
    # (The harness only: importing the class would run its tests here too.)
    listen = test_server_relay.LoopbackRelayTests.listen
    leg = test_server_relay.LoopbackRelayTests.leg

    def keys(self):
        s, r = Pake("w-w", "1", SENDER), Pake("w-w", "1", RECEIVER)
        ms, mr = s.start(), r.start()
        return s.finish(mr), r.finish(ms)

    async def punch_through(self, port, schedule=None):
        """Both peers' real PunchConnector + PeerConnection, no direct
        candidates, one relay."""
        ks, kr = self.keys()
        schedule = schedule or PunchSchedule(relay_delay=0, deadline=10, handshake_timeout=5)
        connectors = []
        for keys, leader in ((ks, True), (kr, False)):
            connectors.append(PunchConnector(
                reactor, 0, [],
                lambda c, relay, keys=keys: PeerConnection(c, keys, reactor, 5, relay=relay),
                leader, schedule, "127.0.0.1", relays=[("127.0.0.1", port)],
            ))
        return [c.run() for c in connectors]

    async def check_channels(self, s_chan, r_chan, port):
        self.addCleanup(s_chan.transport.abortConnection)
        self.addCleanup(r_chan.transport.abortConnection)
        self.assertEqual((s_chan.path, r_chan.path), ("relay", "relay"))
        self.assertEqual((s_chan.peer, r_chan.peer), (f"127.0.0.1:{port}",) * 2)
        got = {"s": defer.Deferred(), "r": defer.Deferred()}

        class Handler:
            def __init__(self, name):
                self.name = name

            def recordReceived(self, kind, seq, payload):
                if kind == 0:  # KEEPALIVE: the session above swallows them
                    return
                if not got[self.name].called:
                    got[self.name].callback((kind, payload))

            def channelLost(self, reason):
                pass

        s_chan.attach(Handler("s"))
        r_chan.attach(Handler("r"))
        big = os.urandom(200_000)
        s_chan.send(9, b"to the receiver")
        r_chan.send(7, big)
        self.assertEqual(await bounded(got["r"], "record to receiver"), (9, b"to the receiver"))
        self.assertEqual(await bounded(got["s"], "record to sender"), (7, big))

    async def test_peer_connections_through_a_standalone_relay(self):
        factory = RelayFactory(reactor, RelayLimits())
        port = self.listen(factory)
        sd, rd = await self.punch_through(port)
        s_chan = await bounded(sd, "sender's channel")
        r_chan = await bounded(rd, "receiver's channel")
        await self.check_channels(s_chan, r_chan, port)
        self.assertEqual(factory.relay.spliced, 1)

    async def test_peer_connections_through_a_rendezvous_port_relay(self):
        """On a rendezvous port the WELCOME line comes first; the client
        skips it."""
        factory = RendezvousServerFactory(reactor, relay=RelayServer(reactor), relays=("*",))
        port = self.listen(factory)
        sd, rd = await self.punch_through(port)
        s_chan = await bounded(sd, "sender's channel")
        r_chan = await bounded(rd, "receiver's channel")
        await self.check_channels(s_chan, r_chan, port)
        self.assertEqual(factory.relay.spliced, 1)
        self.assertEqual(factory.state.connections, 0)

    async def test_refusing_relay_reason_reaches_the_punch_error(self):
        factory = RelayFactory(reactor, RelayLimits(max_sessions=1))
        port = self.listen(factory)
        # Someone else holds the only session.
        admitted = defer.Deferred()
        join = factory.relay.join

        def joined(*args):
            reason = join(*args)
            if not admitted.called:
                admitted.callback(reason)
            return reason

        factory.relay.join = joined
        await self.leg(port, "sender", 0, token=OTHER_TOKEN)
        self.assertIsNone(await bounded(admitted, "the squatter is admitted"))
        self.assertEqual(factory.relay.sessions, 1)
        sd, rd = await self.punch_through(
            port, PunchSchedule(relay_delay=0, deadline=1, handshake_timeout=5))
        for d in (sd, rd):
            try:
                await bounded(d, "punch gives up")
            except PunchFailed as e:
                self.assertIn(f"127.0.0.1:{port}: relay refused: relay is full, try again later", str(e))
            else:
                self.fail("punching through a full relay succeeded")


# ---------------------------------------------------------------------------
# the real CLI through the NAT lab


SERVER_PORT = 9000

RELAY_PORT = 9001


class NatLabRelayTests(TestCase):
    """a and b behind symmetric NATs: no direct path (one symmetric side
    goes direct by birthday punching), only a relay."""

    timeout = 90

    async def start(self, *server_args):
        """The lab, and a rendezvous server on the server host."""
        lab = start_lab(self, a=Nat("symmetric"), b=Nat("symmetric"))
        ws = Workspace(self)
        server = spawn(self, "server", lab.exec_argv("server", p2pft_argv(
            "server", "--port", f"tcp:{SERVER_PORT}:interface={lab.server_ip}", *server_args)))
        await server.wait_for(r"p2pft rendezvous server listening on ", "err", timeout=20)
        return lab, ws, [server]

    async def start_standalone(self):
        """The lab, a standalone relay and a rendezvous server (no --relay)
        that advertises it, both on the server host."""
        lab = start_lab(self, a=Nat("symmetric"), b=Nat("symmetric"))
        ws = Workspace(self)
        ip = lab.server_ip
        relay = spawn(self, "relay", lab.exec_argv("server", p2pft_argv(
            "relay", "--port", f"tcp:{RELAY_PORT}:interface={ip}")))
        await relay.wait_for(rf"p2pft relay listening on {ip}:{RELAY_PORT}", "err", timeout=20)
        server = spawn(self, "server", lab.exec_argv("server", p2pft_argv(
            "server", "--port", f"tcp:{SERVER_PORT}:interface={ip}",
            "--advertise-relay", f"{ip}:{RELAY_PORT}")))
        await server.wait_for(r"p2pft rendezvous server listening on ", "err", timeout=20)
        return lab, ws, [relay, server]

    def peers(self, lab, ws, src, code, *peer_args):
        addr = f"{lab.server_ip}:{SERVER_PORT}"
        sender = spawn(self, "sender", lab.exec_argv(
            "a", p2pft_argv("send", "--json", "--code", code, *peer_args, addr, src)))
        receiver = spawn(self, "receiver", lab.exec_argv(
            "b", p2pft_argv("receive", "--json", "--yes", "-o", ws.out, *peer_args, addr, code)))
        return sender, receiver

    def assertOneLineError(self, proc, diagnostics, *needles) -> str:
        err = proc.err.decode(errors="replace")
        errors = [line for line in err.splitlines() if line.startswith("p2pft: error:")]
        self.assertEqual(len(errors), 1, diagnostics())
        self.assertEqual(err.rstrip("\n").splitlines()[-1], errors[0], diagnostics())
        # No Python traceback printed (the error line's own text is checked
        # by PunchErrorTextTests).
        self.assertNotIn("Traceback (most recent call last)", err, diagnostics())
        for needle in needles:
            self.assertIn(needle, errors[0], diagnostics())
        [event] = [e for e in proc.events() if e["event"] == "error"]
        self.assertEqual("p2pft: error: " + event["message"], errors[0])
        return errors[0]

    async def test_standalone_relay_advertised_by_the_server(self):
        lab, ws, procs = await self.start_standalone()
        src = make_file(os.path.join(ws.src, "relayed.bin"), 1024 * 1024 + 13)
        started = reactor.seconds()
        sender, receiver = self.peers(lab, ws, src, "61-relay-alone")
        diagnostics = lambda: "".join(p.text() for p in (sender, receiver, *procs)) + lab.dump()
        self.assertEqual(await receiver.wait_exit(40), 0, diagnostics())
        self.assertEqual(await sender.wait_exit(10), 0, diagnostics())
        print(f"\n    relayed 1 MiB in {reactor.seconds() - started:.2f} s", end=" ")
        self.assertEqual(sha256_of(os.path.join(ws.out, "relayed.bin")), sha256_of(src))
        self.assertEqual(os.listdir(ws.out), ["relayed.bin"])
        for proc in (sender, receiver):
            [connected] = [e for e in proc.events() if e["event"] == "connected"]
            self.assertEqual(connected["path"], "relay", diagnostics())
            # Through the standalone relay, not the rendezvous port.
            self.assertEqual(connected["peer"], f"{lab.server_ip}:{RELAY_PORT}", diagnostics())
            done = proc.events()[-1]
            self.assertEqual((done["event"], done["path"]), ("done", "relay"), diagnostics())
            self.assertEqual(done["bytes"], os.path.getsize(src))

    async def test_named_relay_that_does_not_exist_fails_without_fallback(self):
        lab, ws, procs = await self.start("--relay")
        src = make_file(os.path.join(ws.src, "nowhere.bin"), 64 * 1024)
        missing = f"{lab.server_ip}:9999"
        started = reactor.seconds()
        sender, receiver = self.peers(lab, ws, src, "62-no-such-relay", "--relay", missing)
        diagnostics = lambda: "".join(p.text() for p in (sender, receiver, *procs)) + lab.dump()
        # The punch deadline is 20 s; both must be done well before 40.
        self.assertEqual(await sender.wait_exit(40), 1, diagnostics())
        self.assertEqual(await receiver.wait_exit(10), 1, diagnostics())
        elapsed = reactor.seconds() - started
        print(f"\n    both failed after {elapsed:.2f} s", end=" ")
        self.assertLess(elapsed, 35, diagnostics())
        for proc in (sender, receiver):
            # The line names the relay and why it failed.
            self.assertOneLineError(proc, diagnostics, f"{missing}: relay: refused")
            self.assertEqual([e for e in proc.events() if e["event"] == "connected"], [],
                             "no silent fallback to the server's relay\n" + diagnostics())
        self.assertEqual(os.listdir(ws.out), [])

    async def test_relay_byte_cap_fails_both_sides_cleanly(self):
        lab, ws, procs = await self.start("--relay", "--relay-max-bytes", "100000")
        src = make_file(os.path.join(ws.src, "capped.bin"), 1024 * 1024)
        started = reactor.seconds()
        # Both sides reconnect after the cut (3 s here, 5 minutes by
        # default): the relay refuses the spent session, so they fail.
        sender, receiver = self.peers(lab, ws, src, "63-relay-cap", "--reconnect-timeout", "3")
        diagnostics = lambda: "".join(p.text() for p in (sender, receiver, *procs)) + lab.dump()
        self.assertEqual(await sender.wait_exit(40), 1, diagnostics())
        self.assertEqual(await receiver.wait_exit(10), 1, diagnostics())
        print(f"\n    both failed after {reactor.seconds() - started:.2f} s", end=" ")
        for proc in (sender, receiver):
            # The relay was used (and then cut): the failure is the transfer's.
            [connected] = [e for e in proc.events() if e["event"] == "connected"]
            self.assertEqual(connected["path"], "relay", diagnostics())
            self.assertEqual(connected["peer"], f"{lab.server_ip}:{SERVER_PORT}", diagnostics())
            self.assertOneLineError(proc, diagnostics, "connection lost before the transfer completed",
                                    "relay refused: this session used up its byte allowance on this relay")
        self.assertEqual(os.listdir(ws.out), [], "no file, no partial file left")
