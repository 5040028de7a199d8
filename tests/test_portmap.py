"""
Router port mapping (p2pft.portmap): the NAT-PMP and PCP messages against
the RFCs' layouts, hostile and malformed answers, the UDP exchange's
retransmit schedule on a Clock, the façade's race, renewal and delete, the
session's bounded wait, the default gateway, and --no-port-mapping.  The
real thing (a real miniupnpd) is tests/test_portmap_lab.py.
"""

from __future__ import annotations

import os
import struct

import attrs
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from p2pft.portmap import IPortMapper, PortMapError, PortMapper, ReplyError, SessionMapping, natpmp, pcp
from p2pft.portmap.clients import Held, IMapClient, NatPmpClient, PcpClient, on_thread
from p2pft.portmap.gateway import parse_routes
from p2pft.portmap.udp import Exchange, Retransmit


# -- NAT-PMP (RFC 6886) ------------------------------------------------------


class NatPmpTests(SynchronousTestCase):
    def test_external_address_request_is_two_bytes(self):
        # Section 3.2: version 0, opcode 0.
        self.assertEqual(natpmp.external_address_request(), b"\x00\x00")

    def test_map_request_layout(self):
        # Section 3.3: version, opcode 2 (TCP), reserved, internal port,
        # suggested external port, lifetime.
        self.assertEqual(natpmp.map_request(40000, 40001, 300),
                         bytes([0, 2, 0, 0]) + struct.pack("!HHI", 40000, 40001, 300))

    def test_delete_is_lifetime_zero(self):
        self.assertEqual(natpmp.map_request(40000, 0, 0)[4:], struct.pack("!HHI", 40000, 0, 0))

    def test_map_request_refuses_nonsense(self):
        for args in ((0, 1, 1), (70000, 1, 1), (1, -1, 1), (1, 1, -1), (1, 1, 2**32), (True, 1, 1)):
            self.assertRaises(ValueError, natpmp.map_request, *args)

    def test_parse_external_address(self):
        answer = struct.pack("!BBHI4s", 0, 128, 0, 1234, bytes([203, 0, 113, 21]))
        self.assertEqual(natpmp.parse_external_address(answer), natpmp.ExternalAddress(1234, "203.0.113.21"))

    def test_parse_map(self):
        answer = struct.pack("!BBHIHHI", 0, 130, 0, 99, 40000, 41000, 7200)
        self.assertEqual(natpmp.parse_map(answer, 40000), natpmp.MapResult(99, 40000, 41000, 7200))

    def test_refusal_carries_its_result_code(self):
        # Failure answers may be the 8-byte header alone (section 3.5).
        e = self.assertRaises(ReplyError, natpmp.parse_map, struct.pack("!BBHI", 0, 130, 2, 5), 40000)
        self.assertEqual(e.code, 2)
        self.assertIn("not authorized", str(e))

    def test_hostile_and_malformed_answers(self):
        good = struct.pack("!BBHIHHI", 0, 130, 0, 99, 40000, 41000, 7200)
        for bad in (b"", b"\x00", good[:15], good + b"\x00",  # short, long
                    b"\x01" + good[1:],  # another version
                    good[:1] + b"\x81" + good[2:],  # answer to another opcode
                    good[:1] + b"\x02" + good[2:],  # a request, not an answer
                    good[:8] + struct.pack("!HHI", 40001, 41000, 7200),  # another internal port
                    good[:8] + struct.pack("!HHI", 40000, 0, 7200)):  # external port 0
            e = self.assertRaises(ReplyError, natpmp.parse_map, bad, 40000)
            self.assertIsNone(e.code, bad)
        for bad in (struct.pack("!BBHI4s", 0, 128, 0, 1, bytes(4)), b"\x00\x80\x00\x00\x00"):
            self.assertRaises(ReplyError, natpmp.parse_external_address, bad)


# -- PCP (RFC 6887) ----------------------------------------------------------

NONCE = bytes(range(12))


def pcp_answer(request: pcp.MapRequest, result=0, lifetime=300, port=41000, ip=b"\xcb\x00\x71\x15", nonce=None,
               protocol=pcp.PROTO_TCP, internal=None, opcode=0x81, version=2, extra=b""):
    header = struct.pack("!BBBBII", version, opcode, 0, result, lifetime, 77) + bytes(12)
    body = (nonce or request.nonce) + struct.pack("!B3xHH", protocol, internal or request.internal_port, port)
    return header + body + bytes(10) + b"\xff\xff" + ip + extra


class PcpTests(SynchronousTestCase):
    def setUp(self):
        self.request = pcp.MapRequest(NONCE, "10.201.1.10", 40000, 300, external_port=40000)

    def test_map_request_layout(self):
        data = pcp.encode_map(self.request)
        self.assertEqual(len(data), 60)
        # Section 7.1: version 2, R=0 + opcode MAP (1), reserved, lifetime,
        # client IP as IPv4-mapped IPv6.
        self.assertEqual(data[:4], b"\x02\x01\x00\x00")
        self.assertEqual(struct.unpack("!I", data[4:8])[0], 300)
        self.assertEqual(data[8:24], bytes(10) + b"\xff\xff" + bytes([10, 201, 1, 10]))
        # Section 11.1: nonce, protocol 6, 3 reserved, internal port,
        # suggested external port, suggested external IP (any: ::ffff:0.0.0.0).
        self.assertEqual(data[24:36], NONCE)
        self.assertEqual(data[36:44], b"\x06\x00\x00\x00" + struct.pack("!HH", 40000, 40000))
        self.assertEqual(data[44:], bytes(10) + b"\xff\xff" + bytes(4))

    def test_delete_keeps_the_nonce(self):
        data = pcp.encode_map(self.request.deleting())
        self.assertEqual(struct.unpack("!I", data[4:8])[0], 0)
        self.assertEqual(data[24:36], NONCE)
        self.assertEqual(data[40:44], struct.pack("!HH", 40000, 0))

    def test_parse_map(self):
        result = pcp.parse_map(pcp_answer(self.request), self.request)
        self.assertEqual(result, pcp.MapResult(300, 77, 40000, 41000, "203.0.113.21"))

    def test_options_after_the_body_are_skipped(self):
        option = b"\x01\x00\x00\x04" + bytes(4)  # any option, 4-byte aligned
        self.assertEqual(pcp.parse_map(pcp_answer(self.request, extra=option), self.request).external_port, 41000)

    def test_refusal_carries_its_result_code(self):
        e = self.assertRaises(ReplyError, pcp.parse_map, pcp_answer(self.request, result=8), self.request)
        self.assertEqual(e.code, 8)
        self.assertIn("no resources", str(e))
        # An error answer without the body (what a server could parse).
        e = self.assertRaises(ReplyError, pcp.parse_map, pcp_answer(self.request, result=2)[:24], self.request)
        self.assertEqual(e.code, 2)

    def test_a_nat_pmp_server_says_unsupported_version(self):
        # RFC 6887 section 9: a NAT-PMP-only server answers version 0.
        e = self.assertRaises(ReplyError, pcp.parse_map, struct.pack("!BBHI", 0, 129, 1, 5), self.request)
        self.assertEqual(e.code, pcp.UNSUPP_VERSION)

    def test_hostile_and_malformed_answers(self):
        good = pcp_answer(self.request)
        for bad in (b"", good[:3], good[:59], good + b"\x00",  # short, not 4-aligned
                    good + bytes(1100),  # too long
                    pcp_answer(self.request, opcode=0x01),  # a request echoed
                    pcp_answer(self.request, opcode=0x82),  # another opcode
                    pcp_answer(self.request, nonce=bytes(12)),  # someone else's
                    pcp_answer(self.request, protocol=17),  # UDP
                    pcp_answer(self.request, internal=40001),
                    pcp_answer(self.request, port=0),
                    pcp_answer(self.request, ip=bytes(4))):  # no external address
            e = self.assertRaises(ReplyError, pcp.parse_map, bad, self.request)
            self.assertIsNone(e.code, bad[:8])

    def test_request_refuses_nonsense(self):
        for kw in ({"nonce": b"short"}, {"internal_port": 0}, {"external_port": 70000}, {"lifetime": -1},
                   {"client_ip": "not-an-ip"}):
            self.assertRaises(ValueError, attrs.evolve, self.request, **kw)


# -- the UDP exchange --------------------------------------------------------


class FakeUDP:
    def __init__(self):
        self.sent: list[bytes] = []
        self.peer = None
        self.stopped = False

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data):
        self.sent.append(data)

    def stopListening(self):
        self.stopped = True


class ExchangeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.exchange = Exchange(self.clock, "10.0.0.1", 5351, b"ask", self.parse, Retransmit((0.25, 0.5, 1.0)))
        self.transport = FakeUDP()
        self.exchange.makeConnection(self.transport)

    @staticmethod
    def parse(data):
        if data == b"no":
            raise ReplyError("refused", code=2)
        if data != b"yes":
            raise ReplyError("malformed")
        return "mapped"

    def test_retransmits_then_gives_up_after_the_schedule(self):
        self.assertEqual(self.transport.peer, ("10.0.0.1", 5351))
        self.assertEqual(self.transport.sent, [b"ask"])
        self.clock.advance(0.25)
        self.clock.advance(0.5)
        self.assertEqual(len(self.transport.sent), 3)
        self.assertNoResult(self.exchange.done)
        self.clock.advance(1.0)
        self.assertEqual(len(self.transport.sent), 3)
        f = self.failureResultOf(self.exchange.done, PortMapError)
        self.assertIn("no answer from 10.0.0.1", f.getErrorMessage())
        self.assertTrue(self.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answer(self):
        self.exchange.datagramReceived(b"yes", ("10.0.0.1", 5351))
        self.assertEqual(self.successResultOf(self.exchange.done), "mapped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answers_from_elsewhere_and_malformed_ones_are_ignored(self):
        self.exchange.datagramReceived(b"yes", ("10.0.0.2", 5351))
        self.exchange.datagramReceived(b"yes", ("10.0.0.1", 5350))
        self.exchange.datagramReceived(b"garbage", ("10.0.0.1", 5351))
        self.assertNoResult(self.exchange.done)
        self.clock.pump([0.25, 0.5, 1.0])
        f = self.failureResultOf(self.exchange.done, PortMapError)
        self.assertIn("ignored: malformed", f.getErrorMessage())

    def test_refusal_ends_at_once(self):
        self.exchange.datagramReceived(b"no", ("10.0.0.1", 5351))
        self.assertEqual(self.failureResultOf(self.exchange.done, ReplyError).value.code, 2)

    def test_a_port_closed_by_a_read_error_ends_at_once(self):
        self.exchange.doStop()
        self.assertIn("the network reported an error", self.failureResultOf(self.exchange.done).getErrorMessage())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_port_unreachable_ends_at_once(self):
        self.exchange.connectionRefused()
        self.assertIn("nothing answers", self.failureResultOf(self.exchange.done).getErrorMessage())


# -- the protocol clients, over a fake exchange ---------------------------------


class PcpClientTests(SynchronousTestCase):
    def test_map_renew_delete_use_one_nonce(self):
        from p2pft.portmap import clients

        sent = []

        def fake_exchange(reactor, gateway, port, payload, parse, schedule):
            self.assertEqual((gateway, port), ("10.0.0.1", 5351))
            request = pcp.MapRequest(payload[24:36], "10.0.0.5", struct.unpack("!H", payload[40:42])[0],
                                     struct.unpack("!I", payload[4:8])[0],
                                     external_port=struct.unpack("!H", payload[42:44])[0])
            sent.append(request)
            return defer.succeed(parse(pcp_answer(request, lifetime=request.lifetime)))

        self.patch(clients, "exchange", fake_exchange)
        client = PcpClient(task.Clock(), "10.0.0.1", "10.0.0.5")
        held = self.successResultOf(defer.ensureDeferred(client.map(40000, 300)))
        self.assertEqual(held, Held(("203.0.113.21", 41000), 300))
        self.successResultOf(defer.ensureDeferred(client.renew()))
        self.successResultOf(defer.ensureDeferred(client.delete()))
        self.assertEqual(len({r.nonce for r in sent}), 1)
        self.assertEqual([r.lifetime for r in sent], [300, 300, 0])
        # The renewal suggests the port granted.
        self.assertEqual(sent[1].external_port, 41000)
        self.failureResultOf(defer.ensureDeferred(client.renew()), PortMapError)

    def test_verifies(self):
        verifyObject(IMapClient, PcpClient(task.Clock(), "10.0.0.1", "10.0.0.5"))
        verifyObject(IMapClient, NatPmpClient(task.Clock(), "10.0.0.1"))


class OnThreadTests(SynchronousTestCase):
    def test_times_out_and_undoes_a_late_result(self):
        clock = task.Clock()
        calls = []
        clock.callFromThread = lambda f, *a: calls.append((f, a))
        late = []
        import threading

        go = threading.Event()
        d = on_thread(clock, lambda: (go.wait(5), "mapped")[1], timeout=3.0, late=late.append)
        clock.advance(3.0)
        self.assertIn("no answer within 3 s", self.failureResultOf(d, PortMapError).getErrorMessage())
        go.set()
        for thread in threading.enumerate():
            if thread.name == "p2pft-upnp":
                thread.join(5)
        [(f, args)] = calls
        f(*args)
        self.assertEqual(late, ["mapped"])


class SsdpTests(SynchronousTestCase):
    def test_location_on_the_gateway_only(self):
        from p2pft.portmap.clients import ssdp_location

        answer = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                  b"LOCATION: http://10.201.1.1:32939/rootDesc.xml\r\nST: x\r\n\r\n")
        self.assertEqual(ssdp_location(answer, "10.201.1.1"), "http://10.201.1.1:32939/rootDesc.xml")
        self.assertIsNone(ssdp_location(answer, "10.201.1.2"))
        for bad in (answer.replace(b"http://", b"file://"), answer.replace(b":32939", b""),
                    answer.replace(b"200 OK", b"404 Not Found"), answer.replace(b"LOCATION", b"X"),
                    answer + bytes(5000), b"M-SEARCH * HTTP/1.1\r\n\r\n"):
            self.assertIsNone(ssdp_location(bad, "10.201.1.1"), bad[:40])


# -- the façade ------------------------------------------------------------------


@implementer(IMapClient)
@attrs.define(eq=False, slots=False)
class FakeClient:
    name: str
    answer: defer.Deferred = attrs.field(factory=defer.Deferred)
    log: list = attrs.field(factory=list)
    renewals: list = attrs.field(factory=list)

    def map(self, internal_port, lifetime):
        self.log.append(("map", internal_port, lifetime))
        return self.answer

    def renew(self):
        self.log.append(("renew",))
        d = defer.Deferred()
        self.renewals.append(d)
        return d

    def delete(self):
        self.log.append(("delete",))
        return defer.succeed(None)

    def delete_blocking(self):
        self.log.append(("delete_blocking",))

    def forget(self):
        self.log.append(("forget",))

    def abandon(self):
        self.log.append(("abandon",))


class FakeReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.triggers = {}

    def addSystemEventTrigger(self, phase, event, f, *args):
        key = object()
        self.triggers[key] = (phase, event, f)
        return key

    def removeSystemEventTrigger(self, key):
        del self.triggers[key]


class PortMapperTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.pcp, self.natpmp, self.upnp = FakeClient("pcp"), FakeClient("nat-pmp"), FakeClient("upnp")
        self.events = []
        self.mapper = PortMapper(self.reactor, find_gateway=lambda: "10.0.0.1", find_local=lambda gw: "10.0.0.5",
                                 clients=lambda *a: [[self.pcp, self.natpmp], [self.upnp]],
                                 on_event=lambda action, m: self.events.append((action, m.protocol)))
        self.addCleanup(self.mapper.unmap_blocking)

    def test_verifies(self):
        verifyObject(IPortMapper, self.mapper)

    def test_real_clients(self):
        # The real clients (attrs classes, unhashable) through the race.
        from p2pft.portmap.mapper import make_clients

        clock = task.Clock()
        clock.listenUDP = lambda *a, **kw: (_ for _ in ()).throw(OSError("no network in unit tests"))
        mapper = PortMapper(clock, find_gateway=lambda: "10.0.0.1", find_local=lambda gw: "10.0.0.5",
                            clients=lambda r, g, l, p: make_clients(r, g, l, ("pcp", "nat-pmp")))
        self.assertIsNone(self.successResultOf(mapper.map(40000)))
        self.assertFalse(mapper.hopeful)

    def test_pcp_first_nat_pmp_after_it_upnp_alongside(self):
        d = self.mapper.map(40000)
        self.assertEqual(self.pcp.log, [("map", 40000, 300)])
        self.assertEqual(self.upnp.log, [("map", 40000, 300)])
        self.assertEqual(self.natpmp.log, [])
        self.pcp.answer.errback(ReplyError("PCP: the gateway speaks NAT-PMP only", code=1))
        self.assertEqual(self.natpmp.log, [("map", 40000, 300)])
        self.reactor.advance(0.02)
        self.natpmp.answer.callback(Held(("203.0.113.21", 40000), 300))
        mapping = self.successResultOf(d)
        self.assertEqual((mapping.protocol, mapping.external, mapping.seconds), ("nat-pmp", ("203.0.113.21", 40000), 0.02))
        self.assertEqual(self.events, [("mapped", "nat-pmp")])
        # The others are told: UPnP need not map after all.
        self.assertIn(("abandon",), self.upnp.log)
        # UPnP grants another port, later: deleted at once.
        self.upnp.answer.callback(Held(("203.0.113.21", 40002), 300))
        self.assertEqual(self.upnp.log[-1], ("delete",))
        self.assertEqual(self.mapper.mapping, mapping)

    def test_the_same_entry_granted_twice_is_not_deleted(self):
        # miniupnpd keeps one table for all three protocols: UPnP "updating
        # existing port mapping" is PCP's entry, and deleting it would
        # delete the mapping in use.
        self.mapper.map(40000)
        self.pcp.answer.callback(Held(("203.0.113.21", 40000), 300))
        self.upnp.answer.callback(Held(("203.0.113.21", 40000), 300))
        self.assertEqual(self.upnp.log[-1], ("forget",))
        self.assertNotIn(("delete",), self.upnp.log)

    def test_none_when_nobody_maps(self):
        d = self.mapper.map(40000)
        self.pcp.answer.errback(PortMapError("no answer"))
        self.natpmp.answer.errback(PortMapError("no answer"))
        self.assertNoResult(d)
        self.upnp.answer.errback(PortMapError("UPnP: no device answered"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.reactor.triggers, {})

    def test_bounded_in_time_and_a_late_grant_is_deleted(self):
        d = self.mapper.map(40000)
        self.reactor.advance(3.0)
        self.assertIsNone(self.successResultOf(d))
        self.pcp.answer.callback(Held(("203.0.113.21", 40000), 300))
        self.assertEqual(self.pcp.log[-1], ("delete",))
        self.assertIsNone(self.mapper.mapping)

    def test_no_gateway_no_question(self):
        mapper = PortMapper(self.reactor, find_gateway=lambda: None, clients=lambda *a: self.fail("asked"))
        self.assertIsNone(self.successResultOf(mapper.map(40000)))

    def test_renewed_at_half_its_lifetime_then_deleted_once(self):
        self.mapper.map(40000)
        self.upnp.answer.callback(Held(("203.0.113.21", 40000), 120))
        self.reactor.advance(59)
        self.assertEqual(self.upnp.renewals, [])
        self.reactor.advance(1)
        [renewal] = self.upnp.renewals
        renewal.callback(Held(("203.0.113.21", 40000), 120))
        self.reactor.advance(60)
        self.assertEqual(len(self.upnp.renewals), 2)
        self.upnp.renewals[1].errback(PortMapError("no answer"))
        self.reactor.advance(10)  # retried until it expires
        self.assertEqual(len(self.upnp.renewals), 3)
        self.successResultOf(self.mapper.unmap())
        self.successResultOf(self.mapper.unmap())
        self.assertEqual(self.reactor.triggers, {})
        self.assertEqual(self.upnp.log.count(("delete",)), 1)
        self.assertEqual(self.events, [("mapped", "upnp"), ("deleted", "upnp")])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(self.mapper.mapping)

    def test_deleted_at_shutdown_and_at_exit(self):
        from p2pft.portmap import mapper as module

        self.mapper.map(40000)
        self.pcp.answer.callback(Held(("203.0.113.21", 40000), 300))
        [(phase, event, f)] = self.reactor.triggers.values()
        self.assertEqual((phase, event), ("before", "shutdown"))
        self.assertIn(self.mapper, module._held)
        module._delete_at_exit()
        self.assertEqual(self.pcp.log[-1], ("delete_blocking",))
        self.assertNotIn(self.mapper, module._held)
        self.assertEqual(self.reactor.triggers, {})
        f()  # the trigger, had it run: nothing left to delete
        self.assertEqual(self.pcp.log.count(("delete",)), 0)

    def test_shutdown_waits_for_a_delete_under_way(self):
        self.mapper.map(40000)
        self.pcp.answer.callback(Held(("203.0.113.21", 40000), 300))
        slow = defer.Deferred()
        self.pcp.delete = lambda: slow
        underway = self.mapper.unmap()
        [(phase, event, f)] = self.reactor.triggers.values()
        self.assertIs(f(), underway)
        self.assertNoResult(underway)
        slow.callback(None)
        self.successResultOf(underway)
        self.assertEqual(self.reactor.triggers, {})

    def test_hopeful_while_a_quick_answer_may_come(self):
        self.upnp.quick = False
        self.mapper.map(40000)
        self.assertTrue(self.mapper.hopeful)  # PCP asked
        hopeless = self.mapper.when_hopeless()
        self.pcp.answer.errback(PortMapError("nothing answers"))
        self.assertTrue(self.mapper.hopeful)  # NAT-PMP asked
        self.natpmp.answer.errback(PortMapError("nothing answers"))
        # UPnP is still searching, but no router answered it: no hope.
        self.assertFalse(self.mapper.hopeful)
        self.successResultOf(hopeless)
        self.upnp.on_found()  # the router answered the search after all
        self.assertTrue(self.mapper.hopeful)
        self.upnp.answer.callback(Held(("203.0.113.21", 40000), 300))
        self.assertFalse(self.mapper.hopeful)

    def test_session_ended_before_the_grant(self):
        d = self.mapper.map(40000)
        self.mapper.unmap()
        self.pcp.answer.callback(Held(("203.0.113.21", 40000), 300))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.pcp.log[-1], ("delete",))


# -- what a session asks -----------------------------------------------------------


class FakeAddress:
    def __init__(self, host, port):
        self.host, self.port = host, port


class FakeClientConnection:
    def __init__(self, server_host):
        self.transport = self
        self._server = server_host

    def getPeer(self):
        return FakeAddress(self._server, 9000)

    def getHost(self):
        return FakeAddress("10.201.1.10", 40000)


class FakeMapper:
    def __init__(self, reactor, on_event=None):
        self.asked = []
        self.unmapped = 0
        self.answer = defer.Deferred()
        self.on_event = on_event
        self.hopeless = defer.Deferred()

    def when_hopeless(self):
        return self.hopeless

    def map(self, port):
        self.asked.append(port)
        return self.answer

    def unmap(self):
        self.unmapped += 1
        return defer.succeed(None)


class SessionMappingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.mappers = []

    def make(self, reactor, on_event=None):
        self.mappers.append(FakeMapper(reactor, on_event))
        return self.mappers[-1]

    def start(self, server="203.0.113.10", enabled=True):
        return SessionMapping.start(self.clock, FakeClientConnection(server), enabled, None, make_mapper=self.make)

    def test_a_mapping_there_in_time_is_a_candidate(self):
        session = self.start()
        self.assertEqual(self.mappers[0].asked, [40000])
        d = defer.ensureDeferred(session.candidates(0.4))
        self.clock.advance(0.1)
        from p2pft.portmap import Mapping

        self.mappers[0].answer.callback(Mapping("pcp", ("203.0.113.21", 41000), 40000, 300, "10.201.1.1", 0.1))
        self.assertEqual(self.successResultOf(d), [["203.0.113.21", 41000]])
        closed = defer.Deferred()
        session.until(closed)
        closed.callback(None)
        self.assertEqual(self.mappers[0].unmapped, 1)

    def test_the_wait_is_bounded_and_a_late_mapping_deleted(self):
        session = self.start()
        d = defer.ensureDeferred(session.candidates(0.4))
        self.clock.advance(0.4)
        self.assertEqual(self.successResultOf(d), [])
        self.mappers[0].answer.callback(object())
        self.assertEqual(self.mappers[0].unmapped, 1)

    def test_the_wait_counts_from_the_ask(self):
        # A side that waited for its partner longer than that waits no more.
        session = self.start()
        self.clock.advance(0.3)
        d = defer.ensureDeferred(session.candidates(0.4))
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), [])
        session = self.start()
        self.clock.advance(5)
        d = defer.ensureDeferred(session.candidates(0.4))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), [])

    def test_no_waiting_once_nothing_is_on_its_way(self):
        session = self.start()
        d = defer.ensureDeferred(session.candidates(0.4))
        self.clock.advance(0.01)
        self.mappers[0].hopeless.callback(None)
        self.assertEqual(self.successResultOf(d), [])

    def test_no_mapping_no_candidate(self):
        session = self.start()
        d = defer.ensureDeferred(session.candidates(0.4))
        self.mappers[0].answer.callback(None)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_off_loopback_and_ipv6_ask_nothing(self):
        for kw in ({"enabled": False}, {"server": "127.0.0.1"}, {"server": "2001:db8::1"}):
            session = self.start(**kw)
            self.assertEqual(self.successResultOf(defer.ensureDeferred(session.candidates())), [])
            self.successResultOf(session.end())
        self.assertEqual(self.mappers, [])


# -- the gateway -------------------------------------------------------------------

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0001C90A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0101C90A\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""


class GatewayTests(SynchronousTestCase):
    def test_default_route_lowest_metric(self):
        self.assertEqual(parse_routes(ROUTES), "10.201.1.1")

    def test_none_without_a_default_route(self):
        self.assertIsNone(parse_routes(ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[1]))
        self.assertIsNone(parse_routes(""))
        self.assertIsNone(parse_routes("header\nbroken line\neth0\tzz\tyy\t3\t0\t0\t0\t0\n"))
        # Down (no RTF_UP) or not through a gateway.
        self.assertIsNone(parse_routes("h\neth0\t00000000\t0101C90A\t0002\t0\t0\t0\t00000000\n"))


# -- options -------------------------------------------------------------------------


class OptionTests(SynchronousTestCase):
    def parse(self, *argv, config=None):
        from p2pft.options import Options

        path = self.mktemp()
        if config is not None:
            with open(path, "w") as f:
                f.write(config)
        old = os.environ.get("P2PFT_CONFIG")
        os.environ["P2PFT_CONFIG"] = path
        try:
            options = Options()
            options.parseOptions(list(argv))
        finally:
            if old is None:
                del os.environ["P2PFT_CONFIG"]
            else:
                os.environ["P2PFT_CONFIG"] = old
        return options.subOptions

    def test_on_by_default(self):
        self.assertTrue(self.parse("receive", "--yes", "example.org:9000", "7-apple-river")["port-mapping"])

    def test_no_port_mapping(self):
        sub = self.parse("send", "--no-port-mapping", "example.org:9000", __file__)
        self.assertFalse(sub["port-mapping"])

    def test_config_file_key(self):
        sub = self.parse("send", "example.org:9000", __file__, config="port-mapping = false\n")
        self.assertFalse(sub["port-mapping"])

    def test_config_file_key_must_be_a_bool(self):
        from twisted.python import usage

        e = self.assertRaises(usage.UsageError, self.parse, "send", "example.org:9000", __file__,
                              config='port-mapping = "no"\n')
        self.assertIn("port-mapping must be true or false", str(e))
