"""
The secure channel's plain machines: SPAKE2, key schedule, boxes, the
candidate handshake and AEAD records.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pft.secure import (
    HELLO_SIZE,
    MAX_RECORD,
    RECEIVER,
    SENDER,
    Handshake,
    Pake,
    RecordOpener,
    RecordSealer,
    SecurityError,
)


BINDING = b"n" * 32


def agree(sender_pw="apple-river", receiver_pw="apple-river", nameplate="4"):
    s, r = Pake(sender_pw, nameplate, SENDER), Pake(receiver_pw, nameplate, RECEIVER)
    ms, mr = s.start(), r.start()
    return s.finish(mr), r.finish(ms)


class PakeTests(SynchronousTestCase):
    def test_same_code_same_key(self):
        ks, kr = agree()
        self.assertEqual(ks.key, kr.key)
        self.assertEqual(len(ks.key), 32)

    def test_wrong_code_different_key_and_box_fails(self):
        ks, kr = agree(receiver_pw="apple-rivet")
        self.assertNotEqual(ks.key, kr.key)
        sealed = ks.box().seal(b"confirm")
        self.assertRaises(SecurityError, kr.box().open, sealed)

    def test_nameplate_is_bound(self):
        s, r = Pake("w-w", "4", SENDER), Pake("w-w", "5", RECEIVER)
        ms, mr = s.start(), r.start()
        self.assertNotEqual(s.finish(mr).key, r.finish(ms).key)

    def test_two_senders_told_clearly(self):
        a, b = Pake("w", "4", SENDER), Pake("w", "4", SENDER)
        mb = b.start()
        a.start()
        e = self.assertRaises(SecurityError, a.finish, mb)
        self.assertIn("also a sender", str(e))

    def test_garbage_message(self):
        from spake2 import SPAKE2_A

        # A tampered message that spake2 itself rejects (it raises its own
        # exception types, e.g. NotOnCurve): about half of all encodings are
        # valid points, so search instead of assuming.
        r = Pake("w", "4", RECEIVER).start()
        for i in range(256):
            candidate = r[:-1] + bytes([i])
            raw = SPAKE2_A(b"w", idA=b"x", idB=b"y")
            raw.start()
            try:
                raw.finish(candidate[1:])
            except Exception:
                not_on_curve = candidate
                break
        else:
            self.fail("no invalid encoding found")
        for junk in (b"", b"R", b"R" + b"\x00" * 5, b"Xabc", b"R" + b"\xff" * 33, not_on_curve):
            q = Pake("w", "4", SENDER)
            q.start()
            self.assertRaises(SecurityError, q.finish, junk)

    def test_keys_differ_by_purpose_and_direction(self):
        ks, kr = agree()
        self.assertNotEqual(ks._record_key(True, BINDING), ks._record_key(False, BINDING))
        self.assertEqual(ks._record_key(True, BINDING), kr._record_key(False, BINDING))
        self.assertNotEqual(ks._record_key(True, BINDING), ks._record_key(True, b"m" * 32))
        self.assertNotEqual(ks.handshake_key(), ks._record_key(True, BINDING))
        self.assertNotEqual(ks._directional("rendezvous", True), ks._directional("rendezvous", False))
        self.assertNotIn(ks.key.hex(), repr(ks))


class BoxTests(SynchronousTestCase):
    def setUp(self):
        ks, kr = agree()
        self.s, self.r = ks.box(), kr.box()

    def test_roundtrip_in_order(self):
        a, b = self.s.seal(b"one"), self.s.seal(b"two")
        self.assertEqual(self.r.open(a), b"one")
        self.assertEqual(self.r.open(b), b"two")

    def test_reorder_replay_tamper_drop_detected(self):
        a, b = self.s.seal(b"one"), self.s.seal(b"two")
        self.assertRaises(SecurityError, self.r.open, b)  # reordered / dropped
        self.assertEqual(self.r.open(a), b"one")
        self.assertRaises(SecurityError, self.r.open, a)  # replayed
        bad = bytearray(b)
        bad[0] ^= 1
        self.assertRaises(SecurityError, self.r.open, bytes(bad))

    def test_reflection_fails(self):
        a = self.s.seal(b"one")
        self.assertRaises(SecurityError, self.s.open, a)


def run_handshake(hs_a: Handshake, hs_b: Handshake):
    """Exchange hello and proofs between two machines; return their events."""
    ev_a = hs_a.receive(hs_b.hello())
    ev_b = hs_b.receive(hs_a.hello())
    out_a = [e[1] for e in ev_a if e[0] == "send"]
    out_b = [e[1] for e in ev_b if e[0] == "send"]
    ev_a += hs_a.receive(b"".join(out_b))
    ev_b += hs_b.receive(b"".join(out_a))
    return ev_a, ev_b


class HandshakeTests(SynchronousTestCase):
    def setUp(self):
        self.ks, self.kr = agree()

    def test_both_authenticate_then_select(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        ev_s, ev_r = run_handshake(s, r)
        self.assertIn(("authenticated",), ev_s)
        self.assertIn(("authenticated",), ev_r)
        select = s.select()
        self.assertEqual(r.receive(select + b"records"), [("selected", b"records")])
        self.assertEqual(r.state, "selected")
        self.assertEqual(s.binding, r.binding)
        self.assertEqual(s.binding, s.nonce + r.nonce)

    def test_byte_at_a_time(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        events = []
        for i in range(HELLO_SIZE):
            events += r.receive(s.hello()[i:i + 1])
        self.assertEqual(len(events), 1)
        proof = events[0][1]
        s.receive(r.hello())
        got = []
        for i in range(len(proof)):
            got += s.receive(proof[i:i + 1])
        self.assertEqual(got, [("authenticated",)])

    def test_wrong_key_rejected(self):
        ks2, _ = agree(sender_pw="other-words")
        s = Handshake(ks2.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        self.assertRaises(SecurityError, run_handshake, s, r)

    def test_stray_client_rejected_early(self):
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        self.assertRaises(SecurityError, r.receive, b"GET / HTTP/1.1\r\n")
        r2 = Handshake(self.kr.handshake_key(), RECEIVER)
        self.assertRaises(SecurityError, r2.receive, b"p2pft\x00\x01")  # a v1 peer

    def test_reflected_proof_rejected(self):
        """A proof echoed back (or two same-role peers) must not authenticate."""
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        r2 = Handshake(self.kr.handshake_key(), RECEIVER)
        self.assertRaises(SecurityError, run_handshake, r, r2)

    def test_self_connection_rejected(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        self.assertRaises(SecurityError, s.receive, s.hello())

    def test_proof_replayed_on_another_connection_rejected(self):
        s1 = Handshake(self.ks.handshake_key(), SENDER)
        r1 = Handshake(self.kr.handshake_key(), RECEIVER)
        ev = r1.receive(s1.hello())
        proof_from_r1 = ev[0][1]
        # An attacker replays r1's proof to the sender on a new connection.
        s2 = Handshake(self.ks.handshake_key(), SENDER)
        s2.receive(r1.hello())
        self.assertNotEqual(s2.nonce, s1.nonce)
        self.assertRaises(SecurityError, s2.receive, proof_from_r1)

    def test_forged_select_rejected(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        run_handshake(s, r)
        self.assertRaises(SecurityError, r.receive, b"\x00" * 32)

    def test_only_leader_selects_once(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        self.assertRaises(SecurityError, s.select)  # not authenticated yet
        run_handshake(s, r)
        self.assertRaises(SecurityError, r.select)
        s.select()
        self.assertRaises(SecurityError, s.select)

    def test_follower_speaking_before_select_rejected(self):
        s = Handshake(self.ks.handshake_key(), SENDER)
        r = Handshake(self.kr.handshake_key(), RECEIVER)
        run_handshake(s, r)
        self.assertRaises(SecurityError, s.receive, b"x")


class RecordTests(SynchronousTestCase):
    def setUp(self):
        ks, kr = agree()
        self.sealer, self.opener = ks.sealer(BINDING), kr.opener(BINDING)

    def frames(self, *payloads):
        return [b"".join(self.sealer.seal(4, p)) for p in payloads]

    def test_roundtrip_any_split(self):
        ks, kr = agree()
        sealer = ks.sealer(BINDING)
        payloads = [b"a" * 1000, b"", b"z" * 70000]
        data = b"".join(b"".join(sealer.seal(4, p)) for p in payloads)
        for step in (1, 997, len(data)):
            opener = kr.opener(BINDING)
            got = []
            for i in range(0, len(data), step):
                got += opener.feed(data[i:i + step])
            self.assertEqual(got, [(4, 0, p) for p in payloads])
            self.assertEqual(opener.pending, 0)

    def test_roundtrip_random_cuts(self):
        import random

        rng = random.Random(7)
        ks, kr = agree()
        sealer = ks.sealer(BINDING)
        payloads = [rng.randbytes(rng.choice((0, 1, 5, 300, 70000, 262144))) for _ in range(60)]
        data = b"".join(b"".join(sealer.seal(4, p)) for p in payloads)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(data)), 40)) + [len(data)]
            opener, got, start = kr.opener(BINDING), [], 0
            for cut in cuts:
                got += opener.feed(data[start:cut])
                start = cut
            self.assertEqual(got, [(4, 0, p) for p in payloads])
            self.assertEqual(opener.pending, 0)

    def test_tampered_ciphertext(self):
        f = bytearray(self.frames(b"hello world")[0])
        f[-1] ^= 0x80
        self.assertRaises(SecurityError, self.opener.feed, bytes(f))

    def test_tampered_type_byte(self):
        f = bytearray(self.frames(b"hello world")[0])
        f[4] = 5
        self.assertRaises(SecurityError, self.opener.feed, bytes(f))

    def test_replayed_record(self):
        f = self.frames(b"one")[0]
        self.opener.feed(f)
        self.assertRaises(SecurityError, self.opener.feed, f)

    def test_reordered_records(self):
        a, b = self.frames(b"one", b"two")
        self.assertRaises(SecurityError, self.opener.feed, b + a)

    def test_dropped_record(self):
        a, b, c = self.frames(b"one", b"two", b"three")
        self.opener.feed(a)
        self.assertRaises(SecurityError, self.opener.feed, c)

    def test_truncated_stream_leaves_pending(self):
        f = self.frames(b"x" * 100)[0]
        self.assertEqual(self.opener.feed(f[:-1]), [])
        self.assertEqual(self.opener.pending, len(f) - 1)

    def test_oversized_length_refused_before_buffering(self):
        header = (MAX_RECORD + 17).to_bytes(4, "big") + b"\x04" + bytes(8)
        self.assertRaises(SecurityError, self.opener.feed, header)
        self.assertRaises(SecurityError, agree()[1].opener(BINDING).feed, b"\x00\x00\x00\x03\x04" + bytes(8))

    def test_sealer_refuses_oversized(self):
        self.assertRaises(ValueError, self.sealer.seal, 4, b"x" * (MAX_RECORD + 1))

    def test_wrong_direction_key(self):
        ks, kr = agree()
        f = b"".join(ks.sealer(BINDING).seal(4, b"hi"))
        self.assertRaises(SecurityError, ks.opener(BINDING).feed, f)
        self.assertEqual(kr.opener(BINDING).feed(f), [(4, 0, b"hi")])

    def test_records_bound_to_their_connection(self):
        ks, kr = agree()
        f = b"".join(ks.sealer(BINDING).seal(4, b"hi"))
        self.assertRaises(SecurityError, kr.opener(b"m" * 32).feed, f)

    def test_ciphertext_hides_plaintext(self):
        secret = b"TOP-SECRET-PLAINTEXT" * 10
        f = b"".join(RecordSealer(b"k" * 32).seal(4, secret))
        self.assertNotIn(b"TOP-SECRET", f)
        self.assertEqual(RecordOpener(b"k" * 32).feed(f), [(4, 0, secret)])


class NonceTests(SynchronousTestCase):
    def test_counter_is_64_bit(self):
        from p2pft.secure import _nonce

        self.assertEqual(len(_nonce(0)), 12)
        self.assertNotEqual(_nonce(1 << 32), _nonce(0))
        self.assertEqual(_nonce((1 << 64) - 1)[-8:], b"\xff" * 8)
        self.assertRaises(OverflowError, _nonce, 1 << 64)
