"""
C{p2pft doctor}: the NAT's kind from two observations, what it means, the
router probes on fakes, the output (lines and --json), and the command
itself against a real rendezvous server on loopback (which asks no router:
the server is on this host).  The lab test (a symmetric NAT with a real
miniupnpd) is tests/test_doctor_lab.py.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pft import doctor
from p2pft.doctor import KEEPS, NONE, RANDOM, SHIFTS, Observation, Report, Router, classify
from p2pft.errors import SessionError
from p2pft.portmap import Mapping, PortMapError, natpmp, pcp
from p2pft.server.rendezvous import RendezvousServerFactory
from tests.procs import p2pft_argv, spawn


def obs(local, public):
    return Observation(("10.0.0.5", local), ("203.0.113.21", public))


class ClassifyTests(SynchronousTestCase):
    def test_kinds(self):
        self.assertEqual(classify((Observation(("203.0.113.31", 5000), ("203.0.113.31", 5000)),
                                   Observation(("203.0.113.31", 5001), ("203.0.113.31", 5001)))), NONE)
        self.assertEqual(classify((obs(5000, 5000), obs(6000, 6000))), KEEPS)
        self.assertEqual(classify((obs(5000, 25000), obs(6000, 26000))), SHIFTS)
        self.assertEqual(classify((obs(5000, 41234), obs(6000, 1777))), RANDOM)
        # One local port kept, the other not: not consistent.
        self.assertEqual(classify((obs(5000, 5000), obs(6000, 6001))), RANDOM)
        two = (obs(5000, 5000), Observation(("10.0.0.5", 6000), ("203.0.113.99", 6000)))
        self.assertEqual(classify(two), RANDOM)


def report(kind_obs, router=None, ipv6=()):
    return Report("203.0.113.10:9000", kind_obs, router or Router("10.0.0.1", {"pcp": None, "nat-pmp": None,
                                                                                  "upnp": None}), ipv6)


class OutputTests(SynchronousTestCase):
    def test_symmetric_without_a_router(self):
        r = report((obs(5000, 41234), obs(6000, 1777)))
        out = doctor.lines(r)
        self.assertEqual(out[0], "p2pft doctor 203.0.113.10:9000")
        self.assertIn("203.0.113.21 (local port 5000 -> 41234, 6000 -> 1777)", out[1])
        self.assertIn("NAT: symmetric", out[2])
        self.assertEqual(out[3], "Router 10.0.0.1: PCP no, NAT-PMP no, UPnP-IGD no; no port mapping.")
        self.assertEqual(out[4], "IPv6: no global address.")
        self.assertTrue(out[5].startswith("Direct connections: unlikely: "), out[5])
        data = doctor.as_json(r)
        self.assertEqual((data["nat"], data["direct"]), ("random-ports", "unlikely"))
        json.dumps(data)

    def test_symmetric_with_a_router_that_maps(self):
        router = Router("10.0.0.1", {"pcp": "epoch 5", "nat-pmp": "external address 203.0.113.21", "upnp": None},
                        ("pcp", "203.0.113.21:5000", 0.012))
        r = report((obs(5000, 41234), obs(6000, 1777)), router)
        out = doctor.lines(r)
        self.assertEqual(out[3], "Router 10.0.0.1: PCP yes, NAT-PMP yes, UPnP-IGD no; a test mapping with PCP "
                                 "worked (203.0.113.21:5000, 12 ms) and was deleted.")
        self.assertTrue(out[5].startswith("Direct connections: likely: your router maps ports (PCP)"), out[5])
        self.assertEqual(doctor.as_json(r)["router"]["mapping"],
                         {"protocol": "pcp", "external": "203.0.113.21:5000", "seconds": 0.012})

    def test_keeps_ports_and_ipv6(self):
        r = report((obs(5000, 5000), obs(6000, 6000)), ipv6=("2001:db8::5",))
        out = doctor.lines(r)
        self.assertIn("keeps ports", out[2])
        self.assertEqual(out[4], "IPv6: 2001:db8::5")
        self.assertTrue(out[5].startswith("Direct connections: likely"))

    def test_router_not_asked(self):
        r = report((obs(5000, 5000), obs(6000, 6000)), Router(None, skipped="--no-port-mapping"))
        self.assertEqual(doctor.lines(r)[3], "Router: not asked (--no-port-mapping).")


class FakeAddress:
    def __init__(self, host, port):
        self.host, self.port = host, port


class FakeRendezvous:
    def __init__(self, port, public):
        self.port, self.public, self.closed = port, public, False
        self.transport = self

    def welcomed(self):
        return defer.succeed(self.public)

    def getHost(self):
        return FakeAddress("10.0.0.5", self.port)

    def loseConnection(self):
        self.closed = True


class ProbeTests(SynchronousTestCase):
    def test_observes_twice_at_once_and_closes(self):
        made = []

        async def connect(reactor, server):
            made.append(FakeRendezvous(5000 + len(made), ("203.0.113.21", 41000 + len(made))))
            return made[-1]

        a, b = self.successResultOf(defer.ensureDeferred(doctor.observe_twice(task.Clock(), ("s", 1), 5, connect)))
        self.assertEqual((a.local, a.public), (("10.0.0.5", 5000), ("203.0.113.21", 41000)))
        self.assertEqual(b.local[1], 5001)
        self.assertTrue(all(c.closed for c in made))

    def test_unreachable_server_is_one_line(self):
        async def connect(reactor, server):
            raise SessionError("cannot reach the rendezvous server s:1: connection refused")

        f = self.failureResultOf(defer.ensureDeferred(doctor.diagnose(task.Clock(), ("s", 1), connect=connect)))
        self.assertEqual(f.getErrorMessage(), "cannot reach the rendezvous server s:1: connection refused")

    def test_router_probes_then_one_mapping_deleted(self):
        sent = []

        def send(reactor, gateway, port, payload, parse):
            sent.append(payload)
            if payload == natpmp.external_address_request():
                return defer.succeed(parse(bytes([0, 128, 0, 0, 0, 0, 0, 9, 203, 0, 113, 21])))
            return defer.fail(PortMapError("no answer"))

        class Mapper:
            def __init__(self, reactor):
                self.unmapped = False

            def map(self, port):
                return defer.succeed(Mapping("nat-pmp", ("203.0.113.21", port), port, 300, "10.0.0.1", 0.004))

            def unmap(self):
                mappers.append(self)
                return defer.succeed(None)

        mappers = []
        clock = task.Clock()
        clock.callFromThread = lambda f, *a: f(*a)

        def upnp(ms, location=None):
            raise PortMapError("UPnP: no device answered")

        d = defer.ensureDeferred(doctor.probe_router(clock, 5000, "10.0.0.1", "10.0.0.5", make_mapper=Mapper,
                                                     upnp_probe=upnp, send=send))
        router = self.successResultOf(d)
        self.assertEqual(router.answers, {"pcp": None, "nat-pmp": "external address 203.0.113.21", "upnp": None})
        self.assertEqual(router.mapping, ("nat-pmp", "203.0.113.21:5000", 0.004))
        self.assertEqual(len(mappers), 1)
        self.assertEqual(sent[0], pcp.encode_announce("10.0.0.5"))

    def test_nothing_answers_no_mapping_tried(self):
        clock = task.Clock()
        clock.callFromThread = lambda f, *a: f(*a)

        def upnp(ms, location=None):
            raise PortMapError("UPnP: no device answered")

        d = defer.ensureDeferred(doctor.probe_router(
            clock, 5000, "10.0.0.1", "10.0.0.5", make_mapper=lambda r: self.fail("mapped"), upnp_probe=upnp,
            send=lambda *a: defer.fail(PortMapError("no answer"))))
        self.assertIsNone(self.successResultOf(d).mapping)

    def test_no_gateway(self):
        router = self.successResultOf(defer.ensureDeferred(doctor.probe_router(task.Clock(), 5000, None, None)))
        self.assertEqual(router.skipped, "no default gateway")


class AnnounceTests(SynchronousTestCase):
    def test_announce_layout_and_answer(self):
        data = pcp.encode_announce("10.0.0.5")
        self.assertEqual(len(data), 24)
        self.assertEqual(data[:8], b"\x02\x00\x00\x00\x00\x00\x00\x00")
        answer = b"\x02\x80\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x07" + bytes(12)
        self.assertEqual(pcp.parse_announce(answer), 7)
        from p2pft.portmap import ReplyError

        for bad in (answer[:20], answer + b"\x00", b"\x02\x81" + answer[2:], b"\x02\x80\x00\x04" + answer[4:]):
            self.assertRaises(ReplyError, pcp.parse_announce, bad)


class OptionsTests(SynchronousTestCase):
    def test_options(self):
        from p2pft.options import Options

        o = Options()
        o.parseOptions(["doctor", "--json", "example.org:9000"])
        self.assertEqual((o.subCommand, o.subOptions["server"], o.subOptions["json"]),
                         ("doctor", ("example.org", 9000), True))
        for bad in (["doctor"], ["doctor", "nonsense"], ["doctor", "--timeout", "0", "h:1"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)

    def test_completion_knows_doctor(self):
        from p2pft.completion import script
        from p2pft.options import Options

        text = script("bash", Options.subCommands)
        self.assertIn("doctor)", text)
        self.assertIn("--no-port-mapping", text)


class CommandTests(TestCase):
    timeout = 60

    async def test_doctor_against_a_loopback_server(self):
        port = reactor.listenTCP(0, RendezvousServerFactory(reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        proc = spawn(self, "doctor", p2pft_argv("doctor", "--json", address))
        self.assertEqual(await proc.wait_exit(), 0, proc.err.decode())
        data = json.loads(proc.out)
        self.assertEqual(data["server"], address)
        self.assertEqual(data["nat"], "none")
        self.assertEqual(data["router"]["skipped"], "the server is on this host: no router in between")
        proc = spawn(self, "doctor", p2pft_argv("doctor", address))
        self.assertEqual(await proc.wait_exit(), 0, proc.err.decode())
        self.assertIn("NAT: none", proc.out.decode())

    async def test_unreachable_server_exits_1_with_one_line(self):
        port = reactor.listenTCP(0, RendezvousServerFactory(reactor), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        proc = spawn(self, "doctor", p2pft_argv("doctor", f"127.0.0.1:{number}"))
        self.assertEqual(await proc.wait_exit(), 1)
        self.assertEqual(proc.err.decode(), f"p2pft: error: doctor 127.0.0.1:{number}: cannot reach the rendezvous "
                                            f"server 127.0.0.1:{number}: connection refused\n")
