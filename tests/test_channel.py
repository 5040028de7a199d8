"""
The secure channel on one connection (L{p2pft.channel}): each phase on its
own (bytes in, writes and events out, no sockets), the phase changes of a
PeerConnection on a StringTransport, and a chosen pair over iosim.
"""

import socket

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pft.channel import KEEPALIVE, KEEPALIVE_INTERVAL, PeerConnection
from p2pft.channel.candidate import CandidateHandshake
from p2pft.channel.greeting import MAX_RELAY_LINE, RelayGreeting
from p2pft.channel.records import KEEPCNT, KEEPIDLE, KEEPINTVL, READ_SIZE, SEND_SIZE, Records
from p2pft.secure import MAGIC, RECEIVER, SENDER, Handshake, Pake, SecurityError


def session_keys():
    """Both sides' keys of one session: (sender's, receiver's)."""
    s, r = Pake("w-w", "1", SENDER), Pake("w-w", "1", RECEIVER)
    ms, mr = s.start(), r.start()
    return s.finish(mr), r.finish(ms)


class ChannelTests(SynchronousTestCase):
    """A chosen channel: one that has nothing to say sends KEEPALIVE
    records, which the other side swallows without losing step; one whose
    reader pauses holds the records that arrive meanwhile."""

    def chosen_pair(self, clock):
        """Two PeerConnections over iosim that chose each other, each
        with a handler collecting its records: (sender, receiver, pump, got)."""
        from twisted.test import iosim

        s_keys, r_keys = session_keys()

        class Connector:
            def __init__(self, leader):
                self.leader, self.chosen = leader, None

            def authenticated(self, c):
                if self.leader:
                    c.select()
                    self.chosen = c

            def selected(self, c):
                self.chosen = c

            def lost(self, c, reason=None):
                pass

        sc, rc = Connector(True), Connector(False)
        sp = PeerConnection(sc, s_keys, clock)
        rp = PeerConnection(rc, r_keys, clock)
        pump = iosim.connect(sp, iosim.makeFakeServer(sp), rp, iosim.makeFakeClient(rp), clock=clock)
        pump.flush()
        self.assertIs(sc.chosen, sp)
        self.assertIs(rc.chosen, rp)
        got = []

        class Handler:
            def recordReceived(self, kind, seq, payload):
                if kind != KEEPALIVE:  # the session above swallows them
                    got.append((kind, payload))

            def channelLost(self, reason):
                pass

        sp.attach(Handler())
        rp.attach(Handler())
        return sp, rp, pump, got

    def test_keepalive(self):
        clock = Clock()
        sp, rp, pump, got = self.chosen_pair(clock)
        sent_before = sp._records._sealer._counter
        clock.advance(KEEPALIVE_INTERVAL + 1)
        pump.flush()
        self.assertEqual(sp._records._sealer._counter, sent_before + 1, "one keepalive sent")
        self.assertEqual(got, [], "keepalives are not handed up")
        # Records after a keepalive still open: the counters stay in step.
        sp.send(9, b"after")
        pump.flush()
        self.assertEqual(got, [(9, b"after")])
        # Busy channels send no keepalives.
        clock.advance(KEEPALIVE_INTERVAL / 2)
        sp.send(9, b"busy")
        clock.advance(KEEPALIVE_INTERVAL / 2 + 1)
        pump.flush()
        self.assertEqual(got[-1], (9, b"busy"))
        n = sp._records._sealer._counter
        clock.advance(KEEPALIVE_INTERVAL / 2)
        pump.flush()
        self.assertEqual(sp._records._sealer._counter, n + 1)

    def test_chosen_channel_reads_and_sends_big_pieces(self):
        sp, rp, pump, got = self.chosen_pair(Clock())
        for p in (sp, rp):
            self.assertEqual((p.transport.bufferSize, p.transport.SEND_LIMIT), (READ_SIZE, SEND_SIZE))

    def test_paused_channel_holds_records_and_stops_reading(self):
        sp, rp, pump, got = self.chosen_pair(Clock())
        sp.send(9, b"one")
        sp.send(9, b"two")
        pump.flush()
        self.assertEqual(got, [(9, b"one"), (9, b"two")])
        del got[:]

        class Pausing:
            def recordReceived(self, kind, seq, payload):
                got.append(payload)
                if payload == b"b":
                    rp.pauseReading()

            def channelLost(self, reason):
                pass
        rp.attach(Pausing())
        calls = []
        rp.transport.pauseProducing = lambda: calls.append("pause")
        rp.transport.resumeProducing = lambda: calls.append("resume")
        for payload in (b"a", b"b", b"c", b"d"):
            sp.send(9, payload)
        pump.flush()
        self.assertEqual(got, [b"a", b"b"], "records after the pause are held")
        self.assertEqual(calls, ["pause"], "the socket is not read meanwhile")
        sp.send(9, b"e")
        pump.flush()  # (iosim's transport cannot stop reading)
        self.assertEqual(got, [b"a", b"b"])
        rp.resumeReading()
        pump.flush()
        self.assertEqual(got, [b"a", b"b", b"c", b"d", b"e"], "nothing lost or reordered")
        self.assertEqual(calls, ["pause", "resume"])


TOKEN = "ab" * 32
HANDSHAKE_KEY = b"k" * 32
#: What a rendezvous server relaying on its own port says first.
WELCOME = b"WELCOME p2pft 1 192.0.2.7 40000 *\n"


def splits(stream: bytes):
    """The stream cut in two at every byte boundary, then byte by byte."""
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]
    yield [stream[i:i + 1] for i in range(len(stream))]


class Events:
    """Collects what a phase did, in order, as (what, value) pairs."""

    def __init__(self):
        self.log = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.log.append((name, *args))


class RelayGreetingTests(SynchronousTestCase):
    def greeting(self, role=SENDER):
        self.events = Events()
        return RelayGreeting(TOKEN, role, self.events.write, self.events.drop, self.events.joined)

    def feed(self, greeting, pieces):
        """Like the connection: bytes after C{joined} go to the next phase;
        returns them (the rest C{joined} got, then what followed)."""
        after = None
        for piece in pieces:
            if after is None:
                greeting.dataReceived(piece)
                joined = [e for e in self.events.log if e[0] == "joined"]
                if joined:
                    after = joined[0][1]
            else:
                after += piece
        return after

    def test_asks_for_its_side(self):
        for role in (SENDER, RECEIVER):
            g = self.greeting(role)
            g.start()
            self.assertEqual(self.events.log, [("write", f"RELAY {TOKEN} {role}\n".encode())])

    def test_ok_then_hello_split_anywhere(self):
        """The relay's OK line and the start of the other side's HELLO in
        one segment, or cut anywhere: the HELLO goes on whole."""
        hello = MAGIC + b"n" * 16
        for first in (b"OK\n", b"OK\r\n", WELCOME + b"OK\n"):
            for pieces in splits(first + hello):
                g = self.greeting()
                self.assertEqual(self.feed(g, pieces), hello, pieces)
                self.assertEqual([e[0] for e in self.events.log], ["joined"])

    def test_welcome_skipped_only_once(self):
        for pieces in ([WELCOME + WELCOME], [WELCOME, WELCOME]):
            g = self.greeting()
            for piece in pieces:
                g.dataReceived(piece)
            self.assertEqual(self.events.log, [("drop", "relay refused: " + WELCOME.decode().strip())])

    def test_refusal_is_a_printable_reason(self):
        for line, reason in [
            (b"ERROR no peer with that token arrived\n", "no peer with that token arrived"),
            (b"ERROR relay is busy, try again later\r\n", "relay is busy, try again later"),
            (b"NOPE\n", "NOPE"),
            (b"ERROR \x1b]0;owned\x07 \xff\n", "\\x1b]0;owned\\x07 \ufffd"),
            (b"ERROR " + b"x" * 300 + b"\n", "x" * 200 + "..."),
            (WELCOME + b"ERROR timed out waiting for RELAY\n", "timed out waiting for RELAY"),
        ]:
            g = self.greeting()
            g.dataReceived(line)
            self.assertEqual(self.events.log, [("drop", "relay refused: " + reason)], line)

    def test_overlong_line_refused(self):
        g = self.greeting()
        g.dataReceived(b"O" * MAX_RELAY_LINE)
        self.assertEqual(self.events.log, [])
        g.dataReceived(b"K")
        self.assertEqual(self.events.log, [("drop", "relay sent an overlong line")])

    def test_overlong_counts_after_the_welcome(self):
        g = self.greeting()
        g.dataReceived(WELCOME + b"O" * MAX_RELAY_LINE)
        self.assertEqual(self.events.log, [])
        g.dataReceived(b"\n")
        self.assertEqual(self.events.log, [("drop", "relay refused: " + "O" * 200 + "...")])


def leader_and_follower():
    """Two handshakes on one connection with fixed nonces."""
    return (Handshake(HANDSHAKE_KEY, SENDER, nonce=b"L" * 16),
            Handshake(HANDSHAKE_KEY, RECEIVER, nonce=b"F" * 16))


class CandidateHandshakeTests(SynchronousTestCase):
    def phase(self, handshake):
        self.events = Events()
        return CandidateHandshake(handshake, self.events.write, self.events.drop,
                                  self.events.authenticated, self.events.selected)

    def test_hello_proof_authenticated(self):
        leader, follower = leader_and_follower()
        phase = self.phase(leader)
        phase.hello()
        self.assertEqual(self.events.log, [("write", MAGIC + b"L" * 16)])
        (_, proof), = follower.receive(leader.hello())
        phase.dataReceived(follower.hello() + proof)
        self.assertEqual([e[0] for e in self.events.log], ["write", "write", "authenticated"])
        self.assertEqual(follower.receive(self.events.log[1][1]), [("authenticated",)])

    def test_select_writes_the_select_proof(self):
        leader, follower = leader_and_follower()
        phase = self.phase(leader)
        self.assertRaises(SecurityError, phase.select)
        (_, proof), = follower.receive(leader.hello())
        phase.dataReceived(follower.hello() + proof)
        follower.receive(self.events.log[-2][1])
        phase.select()
        self.assertEqual(follower.receive(self.events.log[-1][1]), [("selected", b"")])

    def test_follower_hands_on_what_follows_select(self):
        """SELECT and the first records in one segment, or cut anywhere:
        C{selected} gets the record bytes read with it, and the rest follows."""
        records = b"R" * 40
        leader, twin = leader_and_follower()
        (_, leader_proof), = leader.receive(twin.hello())
        (_, follower_proof), = twin.receive(leader.hello())
        leader.receive(follower_proof)
        for pieces in splits(leader.hello() + leader_proof + leader.select() + records):
            phase = self.phase(leader_and_follower()[1])
            after = None
            for piece in pieces:
                if after is None:
                    phase.dataReceived(piece)
                    selected = [e for e in self.events.log if e[0] == "selected"]
                    after = selected[0][1] if selected else None
                else:
                    after += piece
            self.assertEqual(after, records, pieces)
            self.assertEqual(self.events.log[:2], [("write", follower_proof), ("authenticated",)])
            self.assertEqual([e[0] for e in self.events.log], ["write", "authenticated", "selected"])

    def test_bad_bytes_dropped(self):
        phase = self.phase(leader_and_follower()[0])
        phase.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.events.log, [("drop", "not a p2pft peer")])

    def test_timer_drops_until_authenticated(self):
        clock = Clock()
        phase = self.phase(leader_and_follower()[0])
        phase.startTimer(clock, 10)
        clock.advance(9.9)
        self.assertEqual(self.events.log, [])
        clock.advance(0.1)
        self.assertEqual(self.events.log, [("drop", "handshake timed out")])

    def test_timer_cancelled_before_authenticated_is_reported(self):
        clock = Clock()
        leader, follower = leader_and_follower()
        phase = self.phase(leader)
        timers = []
        phase.authenticated = lambda: timers.append(list(clock.getDelayedCalls()))
        phase.startTimer(clock, 10)
        (_, proof), = follower.receive(leader.hello())
        phase.dataReceived(follower.hello() + proof)
        self.assertEqual(timers, [[]])
        clock.advance(60)
        self.assertNotIn("drop", [e[0] for e in self.events.log])


class FakeSocket:
    def __init__(self):
        self.options = {}

    def setsockopt(self, level, name, value):
        self.options[(level, name)] = value


class TCPTransport(StringTransport):
    """A StringTransport with what a TCP transport adds."""

    def __init__(self):
        super().__init__()
        self.socket = FakeSocket()
        self.tcp_keepalive = None
        self.write_closed = False

    def setTcpKeepAlive(self, on):
        self.tcp_keepalive = on

    def getHandle(self):
        return self.socket

    def loseWriteConnection(self):
        self.write_closed = True


class Handler:
    def __init__(self):
        self.got, self.lost = [], []

    def recordReceived(self, kind, seq, payload):
        if kind != KEEPALIVE:  # the session above swallows them
            self.got.append((kind, payload))

    def channelLost(self, reason):
        self.lost.append(reason)


class RecordsTests(SynchronousTestCase):
    BINDING = b"L" * 16 + b"F" * 16

    def setUp(self):
        ours, theirs = session_keys()
        self.clock, self.transport, self.failed = Clock(), TCPTransport(), []
        self.records = Records(self.transport, self.clock, ours.sealer(self.BINDING),
                               ours.opener(self.BINDING), self.failed.append)
        self.peer_sealer, self.peer_opener = theirs.sealer(self.BINDING), theirs.opener(self.BINDING)
        self.records.start()

    def wire(self, *records):
        return b"".join(b"".join(self.peer_sealer.seal(kind, payload)) for kind, payload in records)

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return [(kind, payload) for kind, _, payload in self.peer_opener.feed(data)]

    def test_start_tunes_the_transport(self):
        self.assertEqual((self.transport.bufferSize, self.transport.SEND_LIMIT), (READ_SIZE, SEND_SIZE))
        self.assertEqual(self.transport.tcp_keepalive, 1)
        options = (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT))
        expected = {(socket.IPPROTO_TCP, getattr(socket, name)): value
                    for name, value in options if hasattr(socket, name)}
        self.assertEqual(self.transport.socket.options, expected)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [KEEPALIVE_INTERVAL])

    def test_early_records_wait_for_attach_unopened(self):
        early = self.wire((9, b"early"), (KEEPALIVE, b""), (9, b"more"))
        self.records.dataReceived(early[:7])
        self.records.dataReceived(early[7:])
        handler = Handler()
        self.records.attach(handler)
        self.assertEqual(handler.got, [(9, b"early"), (9, b"more")])
        self.records.dataReceived(self.wire((9, b"then")))
        self.assertEqual(handler.got[-1], (9, b"then"))

    def test_early_forgery_found_at_attach(self):
        self.records.dataReceived(b"\0" * 13)
        self.assertEqual(self.failed, [], "nothing is opened before attach")
        self.records.attach(Handler())
        self.assertEqual(self.failed, ["record length out of range"])

    def test_keepalives_swallowed_others_in_order(self):
        handler = Handler()
        self.records.attach(handler)
        self.records.dataReceived(self.wire((KEEPALIVE, b""), (9, b"a"), (KEEPALIVE, b""), (10, b"b")))
        self.assertEqual(handler.got, [(9, b"a"), (10, b"b")])

    def test_forged_record_fails_the_channel(self):
        handler = Handler()
        self.records.attach(handler)
        data = bytearray(self.wire((9, b"a"), (9, b"b")))
        data[-1] ^= 1
        self.records.dataReceived(bytes(data))
        self.assertEqual(handler.got, [], "a segment that fails to open delivers nothing")
        self.assertEqual(self.failed, ["a record failed authentication (tampered, replayed or reordered)"])

    def test_lost_before_or_after_attach(self):
        self.records.lost("gone")
        handler = Handler()
        self.records.attach(handler)
        self.assertEqual(handler.lost, ["gone"])
        self.records.lost("again")
        self.assertEqual(handler.lost, ["gone", "again"])

    def test_pause_holds_records_and_stops_reading(self):
        got = []

        class Pausing(Handler):
            def recordReceived(inner, kind, seq, payload):
                got.append(payload)
                if payload in (b"b", b"d"):
                    self.records.pauseReading()

        self.records.attach(Pausing())
        self.records.dataReceived(self.wire(*((9, p) for p in (b"a", b"b", b"c", b"d", b"e"))))
        self.assertEqual((got, self.transport.producerState), ([b"a", b"b"], "paused"))
        self.records.resumeReading()
        self.assertEqual((got, self.transport.producerState), ([b"a", b"b", b"c", b"d"], "paused"),
                         "paused again while catching up: the socket stays paused")
        self.records.resumeReading()
        self.assertEqual((got, self.transport.producerState), ([b"a", b"b", b"c", b"d", b"e"], "producing"))

    def test_close_shuts_our_side_and_ignores_the_rest(self):
        handler = Handler()
        self.records.attach(handler)
        self.records.pauseReading()
        self.records.dataReceived(self.wire((9, b"held")))
        self.records.close()
        self.assertTrue(self.transport.write_closed)
        self.assertEqual(self.transport.producerState, "producing", "closing resumes reading")
        self.assertEqual(self.clock.getDelayedCalls(), [], "no keepalive after close")
        self.records.dataReceived(self.wire((9, b"late")) + b"garbage")
        self.records.resumeReading()
        self.assertEqual((handler.got, self.failed), ([], []))

    def test_close_without_half_close(self):
        transport = StringTransport()
        records = Records(transport, self.clock, None, None, self.failed.append)
        records.close()
        self.assertTrue(transport.disconnecting)

    def test_keepalive_only_when_idle(self):
        self.clock.advance(KEEPALIVE_INTERVAL)
        self.assertEqual(self.sent(), [(KEEPALIVE, b"")])
        self.clock.advance(KEEPALIVE_INTERVAL / 2)
        self.records.send(9, b"busy")
        self.clock.advance(KEEPALIVE_INTERVAL / 2)
        self.assertEqual(self.sent(), [(9, b"busy")])
        self.clock.advance(KEEPALIVE_INTERVAL / 2 - 0.001)
        self.assertEqual(self.sent(), [])
        self.clock.advance(0.001)
        self.assertEqual(self.sent(), [(KEEPALIVE, b"")])

    def test_no_keepalive_once_disconnecting(self):
        self.transport.disconnecting = True
        self.clock.advance(KEEPALIVE_INTERVAL * 3)
        self.assertEqual((self.sent(), self.clock.getDelayedCalls()), ([], []))


class Connector:
    """The punching connector as a candidate sees it; the leader selects."""

    def __init__(self, leader):
        self.leader, self.log = leader, []

    def authenticated(self, c):
        self.log.append("authenticated")
        if self.leader:
            c.select()

    def selected(self, c):
        self.log.append("selected")

    def lost(self, c, reason=None):
        self.log.append(("lost", reason))


class PeerConnectionPhaseTests(SynchronousTestCase):
    """The thin protocol hands bytes from phase to phase, whatever the
    segments look like."""

    def connection(self, keys, relay=False):
        self.clock, self.connector = Clock(), Connector(keys.role == SENDER)
        conn = PeerConnection(self.connector, keys, self.clock, 10, relay=relay)
        conn.makeConnection(TCPTransport())
        return conn

    def take(self, conn):
        data = conn.transport.value()
        conn.transport.clear()
        return data

    def test_relay_ok_and_hello_in_one_segment(self):
        ours, theirs = session_keys()
        for welcome in (b"", WELCOME):
            hello = Handshake(theirs.handshake_key(), theirs.role).hello()
            for pieces in splits(welcome + b"OK\n" + hello):
                conn = self.connection(ours, relay=True)
                self.assertEqual(self.take(conn), f"RELAY {ours.relay_token()} sender\n".encode())
                peer = Handshake(theirs.handshake_key(), theirs.role, nonce=hello[len(MAGIC):])
                for piece in pieces:
                    conn.dataReceived(piece)
                events = peer.receive(self.take(conn))
                self.assertEqual(events[0][0], "send", pieces)
                self.assertEqual(events[1:], [("authenticated",)], "our HELLO, then our PROOF of their HELLO")
                self.assertEqual((conn.lost_reason, conn.path), (None, "relay"))

    def follower_after_proofs(self, sender_keys, receiver_keys):
        """A follower whose HELLO and PROOF went out and who read the
        leader's HELLO; returns it, the leader's PROOF, and the leader's
        SELECT with two records after it."""
        conn = self.connection(receiver_keys)
        leader = Handshake(sender_keys.handshake_key(), SENDER)
        (_, proof), = leader.receive(self.take(conn))
        conn.dataReceived(leader.hello())
        self.assertEqual(leader.receive(self.take(conn)), [("authenticated",)])
        sealer = sender_keys.sealer(leader.binding)
        return conn, proof, leader.select() + b"".join(sealer.seal(9, b"first") + sealer.seal(9, b"second"))

    def test_select_and_first_records_in_one_segment(self):
        keys = session_keys()
        for cut in range(len(self.follower_after_proofs(*keys)[2]) + 1):
            conn, proof, segment = self.follower_after_proofs(*keys)
            conn.dataReceived(proof + segment[:cut])
            conn.dataReceived(segment[cut:])
            self.assertEqual(self.connector.log, ["authenticated", "selected"])
            handler = Handler()
            conn.attach(handler)
            self.assertEqual(handler.got, [(9, b"first"), (9, b"second")], cut)

    def test_leader_becomes_the_channel_when_it_selects(self):
        sender_keys, receiver_keys = session_keys()
        conn = self.connection(sender_keys)
        follower = Handshake(receiver_keys.handshake_key(), RECEIVER)
        (_, proof), = follower.receive(self.take(conn))
        conn.dataReceived(follower.hello() + proof)
        self.assertEqual(self.connector.log, ["authenticated"])
        written = self.take(conn)
        self.assertEqual(follower.receive(written)[-1], ("selected", b""))
        self.assertEqual(conn.transport.bufferSize, READ_SIZE)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [KEEPALIVE_INTERVAL],
                         "the handshake timer is gone, the keepalive ticker runs")
        conn.send(9, b"hi")
        opener = receiver_keys.opener(follower.binding)
        self.assertEqual(opener.feed(self.take(conn)), [(9, 0, b"hi")])

    def test_timeout_while_the_relay_waits(self):
        conn = self.connection(session_keys()[0], relay=True)
        self.clock.advance(10)
        self.assertTrue(conn.transport.disconnected)
        conn.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(self.connector.log, [("lost", "handshake timed out")])

    def test_relay_refusal_reaches_the_connector(self):
        conn = self.connection(session_keys()[0], relay=True)
        conn.dataReceived(b"ERROR relay is busy, try again later\n")
        self.assertTrue(conn.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [], "abandoning cancels the timer")
        conn.connectionLost(None)
        self.assertEqual(self.connector.log, [("lost", "relay refused: relay is busy, try again later")])

    def test_chosen_channel_lost(self):
        ours, theirs = session_keys()
        conn = self.connection(ours)
        follower = Handshake(theirs.handshake_key(), RECEIVER)
        (_, proof), = follower.receive(self.take(conn))
        conn.dataReceived(follower.hello() + proof)
        handler, order = Handler(), []
        conn.whenClosed().addCallback(lambda _: order.append(("closed", self.clock.getDelayedCalls())))
        handler.channelLost = lambda reason: order.append(("lost", reason))
        conn.attach(handler)
        conn.dataReceived(b"\0" * 13)  # a record length out of range
        self.assertEqual(conn.lost_reason, "record length out of range")
        conn.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(order, [("closed", []), ("lost", "record length out of range")])
        self.assertEqual(self.connector.log, ["authenticated"])
