"""
The transfer layer over an in-memory channel: offers, decisions, data,
verification, placement, and every way it must fail safely.
"""

import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft import transfer
from p2pft.transfer import (
    ABORT,
    ACCEPT,
    DATA,
    END,
    OFFER,
    Declined,
    FileReceiver,
    FileSender,
    TransferFailed,
    UnsafeName,
    printable,
    safe_name,
)


class FakeChannel:
    """One end of an in-memory channel; records go to the peer on pump()."""

    def __init__(self, log):
        self.handler = None
        self.peer = None
        self.queue = []
        self.producer = None
        self.closed = False
        self.lost = False
        self.log = log

    def attach(self, handler):
        self.handler = handler

    def send(self, kind, payload=b""):
        assert not self.closed, "send after close"
        self.log.append((self, kind, payload))
        self.queue.append((kind, bytes(payload)))

    def registerProducer(self, producer, streaming):
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self):
        self.producer = None

    def close(self):
        # Like a transport: a registered producer would block the close.
        assert self.producer is None, "close() with a producer still registered"
        self.closed = True
        # Like loseConnection: lost once what we sent has been flushed (to a
        # peer that reads, or to nobody at all).
        if not self.queue or self.peer.handler is None:
            self.notify_lost()

    def abort(self):
        self.producer = None
        self.close()

    def notify_lost(self):
        if not self.lost and self.handler is not None:
            self.lost = True
            self.handler.channelLost("closed")


class Link:
    def __init__(self):
        self.log = []
        self.a, self.b = FakeChannel(self.log), FakeChannel(self.log)
        self.a.peer, self.b.peer = self.b, self.a

    def pump(self, limit=100000):
        for _ in range(limit):
            progressed = False
            for ch in (self.a, self.b):
                while ch.queue and ch.peer.handler is not None:
                    kind, payload = ch.queue.pop(0)
                    ch.peer.handler.recordReceived(kind, payload)
                    progressed = True
                if ch.producer is not None and not ch.streaming and not ch.queue:
                    ch.producer.resumeProducing()  # a pull producer asks for more
                    progressed = True
            if (self.a.closed or self.b.closed) and not self.a.queue and not self.b.queue:
                for ch in (self.a, self.b):
                    if not ch.lost:
                        ch.notify_lost()
                        progressed = True
            if not progressed:
                return
        raise AssertionError("pump did not settle")


def accept(offer):
    return True


class TransferTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.src = self.mktemp()
        os.mkdir(self.src)
        self.out = self.mktemp()
        os.mkdir(self.out)

    def source(self, data: bytes, name="file.bin"):
        path = os.path.join(self.src, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def run_pair(self, data=b"hello" * 100000, decide=accept, overwrite=False, name="file.bin"):
        link = Link()
        sender = FileSender(link.a, self.clock, self.source(data, name))
        receiver = FileReceiver(link.b, self.clock, self.out, decide, overwrite=overwrite)
        rd = receiver.start()
        sd = sender.start()
        link.pump()
        return link, sender, receiver, sd, rd

    def test_transfer_roundtrip(self):
        data = os.urandom(3 * transfer.CHUNK + 123)
        link, sender, receiver, sd, rd = self.run_pair(data)
        sres, rres = self.successResultOf(sd), self.successResultOf(rd)
        self.assertEqual(sres.sha256, rres.sha256)
        self.assertEqual(rres.size, len(data))
        with open(os.path.join(self.out, "file.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.listdir(self.out), ["file.bin"])
        self.assertTrue(link.a.closed and link.b.closed)

    def test_empty_file(self):
        link, _, _, sd, rd = self.run_pair(b"")
        self.successResultOf(sd)
        self.assertEqual(os.path.getsize(os.path.join(self.out, "file.bin")), 0)

    def test_received_file_is_not_executable_and_follows_umask(self):
        self.run_pair(b"x")
        mode = os.stat(os.path.join(self.out, "file.bin")).st_mode & 0o777
        self.assertEqual(mode & 0o111, 0)
        self.assertTrue(mode & 0o600 == 0o600)

    def test_data_is_chunked_within_record_limit(self):
        link, *_ = self.run_pair(os.urandom(transfer.CHUNK * 2 + 1))
        sizes = [len(p) for ch, k, p in link.log if k == DATA]
        self.assertEqual(sizes, [transfer.CHUNK, transfer.CHUNK, 1])

    def test_declined(self):
        link, _, _, sd, rd = self.run_pair(decide=lambda offer: False)
        self.failureResultOf(sd, Declined)
        self.failureResultOf(rd, Declined)
        self.assertEqual(os.listdir(self.out), [])

    def test_decision_waits(self):
        answer = defer.Deferred()
        link, _, receiver, sd, rd = self.run_pair(decide=lambda offer: answer)
        self.assertNoResult(sd)
        self.assertEqual(receiver.offer.name, "file.bin")
        answer.callback(True)
        link.pump()
        self.successResultOf(sd)
        self.successResultOf(rd)

    def test_existing_file_is_kept(self):
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"precious")
        _, _, _, sd, rd = self.run_pair(b"new data")
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("already exists", str(f.value))
        self.failureResultOf(rd, Declined)
        with open(os.path.join(self.out, "file.bin"), "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.assertEqual(os.listdir(self.out), ["file.bin"])

    def test_overwrite_replaces(self):
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"old")
        _, _, _, sd, rd = self.run_pair(b"new data", overwrite=True)
        self.successResultOf(rd)
        with open(os.path.join(self.out, "file.bin"), "rb") as f:
            self.assertEqual(f.read(), b"new data")

    def test_file_appearing_during_transfer_is_not_clobbered(self):
        answer = defer.Deferred()
        link, _, _, sd, rd = self.run_pair(b"new", decide=lambda o: answer)
        answer.callback(True)
        # Someone creates the file after we accepted, before END.
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"theirs")
        link.pump()
        self.failureResultOf(rd, TransferFailed)
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("appeared while receiving", str(f.value))
        with open(os.path.join(self.out, "file.bin"), "rb") as f:
            self.assertEqual(f.read(), b"theirs")
        self.assertEqual(os.listdir(self.out), ["file.bin"])

    def test_connection_lost_midway_removes_partial(self):
        link = Link()
        sender = FileSender(link.a, self.clock, self.source(os.urandom(transfer.CHUNK * 8)))
        receiver = FileReceiver(link.b, self.clock, self.out, accept)
        rd = receiver.start()
        sd = sender.start()
        # Deliver offer/accept and a little data by hand, then cut.
        for _ in range(3):
            for ch in (link.a, link.b):
                while ch.queue:
                    ch.peer.handler.recordReceived(*ch.queue.pop(0))
            if link.a.producer:
                link.a.producer.resumeProducing()
        self.assertTrue(any(n.endswith(".part") for n in os.listdir(self.out)))
        receiver.channelLost("reset")
        sender.channelLost("reset")
        self.failureResultOf(rd, TransferFailed)
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])


class HostileSenderTests(SynchronousTestCase):
    """A receiver driven by records a hostile sender chose."""

    def setUp(self):
        self.out = self.mktemp()
        os.mkdir(self.out)
        self.link = Link()
        self.receiver = FileReceiver(self.link.b, Clock(), self.out, accept)
        self.done = self.receiver.start()

    def feed(self, *records):
        for kind, payload in records:
            self.receiver.recordReceived(kind, payload)

    def offer(self, name="f", size=5):
        return (OFFER, json.dumps({"name": name, "size": size}).encode())

    def assertFailedCleanly(self, fragment=""):
        f = self.failureResultOf(self.done, TransferFailed)
        self.assertIn(fragment, str(f.value))
        self.assertEqual([n for n in os.listdir(self.out)], [])
        self.assertTrue(self.link.b.closed)
        return f

    def test_more_data_than_offered(self):
        self.feed(self.offer(size=3), (DATA, b"abcd"))
        self.assertFailedCleanly("more data than it offered")

    def test_less_data_than_offered(self):
        self.feed(self.offer(size=10), (DATA, b"abc"), (END, json.dumps({"size": 3, "sha256": "00"}).encode()))
        self.assertFailedCleanly("size mismatch")

    def test_wrong_checksum(self):
        self.feed(self.offer(size=3), (DATA, b"abc"), (END, json.dumps({"size": 3, "sha256": "00" * 32}).encode()))
        self.assertFailedCleanly("checksum mismatch")

    def test_data_before_accept(self):
        self.feed((DATA, b"abc"))
        self.assertFailedCleanly("unexpected DATA")

    def test_malformed_offers(self):
        for payload in (b"not json", b"[1]", json.dumps({"name": "x", "size": -1}).encode(),
                        json.dumps({"name": "x", "size": True}).encode(),
                        json.dumps({"name": 5, "size": 1}).encode(), b"{" * 70000, b"[" * 60000):
            out = self.mktemp()
            os.mkdir(out)
            link = Link()
            r = FileReceiver(link.b, Clock(), out, accept)
            d = r.start()
            r.recordReceived(OFFER, payload)
            self.failureResultOf(d, TransferFailed)
            self.assertEqual(os.listdir(out), [])
            self.assertEqual(link.b.queue[-1][0], ABORT)

    def test_hostile_names_refused(self):
        for bad in ("../../etc/passwd", "/etc/shadow", "C:\\Windows\\evil.dll", "..\\..\\x",
                    "dir/sub/name.txt", "C:evil", "c:", "\\\\server\\share", "", ".", "..",
                    "a/..", "/", "x\x00y", "bell\x07", "esc\x1b[31m", "new\nline",
                    "bidi\u202etxt.exe", "zero\u200bwidth", "a" * 256, "\u00e9" * 128,
                    "CON", "con.txt", "Nul", "COM1.log", "lpt9", "COM\u00b9", "trailing.", "trailing ",
                    None, 5, ["x"]):
            self.assertRaises(UnsafeName, safe_name, bad)

    def test_ordinary_names_accepted(self):
        for good in ("movie.mkv", "12:30 notes.txt", ".bashrc", "r\u00e9sum\u00e9.pdf", "\u65e5\u672c.txt",
                     "a" * 255, "console.log", "COM10", "-rf", "~user", " leading space"):
            self.assertEqual(safe_name(good), good)

    def test_names_are_nfc_normalised(self):
        self.assertEqual(safe_name("re\u0301sume\u0301"), "r\u00e9sum\u00e9")

    def test_unsafe_offer_refused_nothing_written(self):
        self.feed(self.offer(name="../../etc/passwd", size=1))
        self.assertFailedCleanly("path separator")

    def test_offer_larger_than_disk(self):
        self.feed(self.offer(size=1 << 62))
        self.assertFailedCleanly("not enough free space")

    def test_printable_escapes_terminal_sequences(self):
        self.assertEqual(printable("a\x1b[2Jb"), "a\\x1b[2Jb")
        self.assertEqual(printable("x\u202ey"), "x\\u202ey")
        self.assertEqual(printable("ok ünïcode"), "ok ünïcode")

    def test_remote_abort_message_is_escaped(self):
        self.feed((ABORT, json.dumps({"message": "boom\x1b[31m"}).encode()))
        f = self.failureResultOf(self.done, TransferFailed)
        self.assertIn("boom\\x1b[31m", str(f.value))


def offered_sender(testcase, data: bytes):
    """A FileSender for a fresh file holding C{data}, its OFFER sent."""
    src = testcase.mktemp()
    with open(src, "wb") as f:
        f.write(data)
    link = Link()
    sender = FileSender(link.a, Clock(), src)
    return src, link, sender, sender.start()


class SenderTests(SynchronousTestCase):
    def test_receiver_wrong_ack_fails(self):
        src, link, sender, d = offered_sender(self, b"data")
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        self.assertEqual(sender.state, "ending")
        sender.recordReceived(transfer.ACK, json.dumps({"sha256": "00"}).encode())
        self.failureResultOf(d, TransferFailed)

    def test_file_that_grows_is_detected(self):
        src, link, sender, d = offered_sender(self, b"data")
        with open(src, "ab") as f:
            f.write(b"more")
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("grew", str(f.value))

    def test_connection_lost_before_ack_is_failure(self):
        src, link, sender, d = offered_sender(self, b"data")
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        sender.channelLost("closed")
        self.failureResultOf(d, TransferFailed)


class LargeFileTests(SynchronousTestCase):
    """Sizes beyond 32 bits survive offer and accounting (sparse file, no data read)."""

    def test_offer_of_sparse_file_over_4_gib(self):
        src = self.mktemp()
        size = (1 << 32) + 12345
        with open(src, "wb") as f:
            f.truncate(size)
        link = Link()
        sender = FileSender(link.a, Clock(), src)
        sender.start()
        kind, payload = link.a.queue[0]
        self.assertEqual((kind, json.loads(payload)["size"]), (OFFER, size))
        sender.channelLost("test over")
        self.failureResultOf(sender.done, TransferFailed)
        self.assertEqual(transfer._offer_from({"name": "x", "size": size}).size, size)


class SenderAbortTests(SynchronousTestCase):
    def test_abort_while_streaming_unregisters_and_reports_reason(self):
        src, link, sender, d = offered_sender(self, os.urandom(transfer.CHUNK * 10))
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        self.assertIsNotNone(link.a.producer)
        sender.recordReceived(ABORT, json.dumps({"message": "disk full"}).encode())
        self.assertIsNone(link.a.producer)
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("disk full", str(f.value))

    def test_stop_producing_does_not_hide_the_reason(self):
        src, link, sender, d = offered_sender(self, b"x" * 10)
        sender.recordReceived(ACCEPT, b"{}")
        sender.stopProducing()
        self.assertNoResult(d)
        sender.channelLost("Connection reset by peer")
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("reset by peer", str(f.value))


class SymlinkTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.out = self.mktemp()
        os.mkdir(self.out)
        self.outside = os.path.abspath(self.mktemp())
        with open(self.outside, "wb") as f:
            f.write(b"outside the output directory")
        os.symlink(self.outside, os.path.join(self.out, "file.bin"))

    def run_pair(self, overwrite):
        src = self.mktemp()
        with open(src, "wb") as f:
            f.write(b"payload")
        link = Link()
        sender = FileSender(link.a, self.clock, src, name="file.bin")
        receiver = FileReceiver(link.b, self.clock, self.out, accept, overwrite=overwrite)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        return sd, rd

    def test_symlink_at_destination_is_an_existing_file(self):
        sd, rd = self.run_pair(overwrite=False)
        self.failureResultOf(rd, Declined)
        self.failureResultOf(sd, TransferFailed)
        self.assertTrue(os.path.islink(os.path.join(self.out, "file.bin")))

    def test_overwrite_replaces_the_link_not_its_target(self):
        sd, rd = self.run_pair(overwrite=True)
        self.successResultOf(rd)
        dest = os.path.join(self.out, "file.bin")
        self.assertFalse(os.path.islink(dest))
        with open(dest, "rb") as f:
            self.assertEqual(f.read(), b"payload")
        with open(self.outside, "rb") as f:
            self.assertEqual(f.read(), b"outside the output directory")


class FakeSource:
    """Stands in for FDReader: the test pushes data and the end."""

    def __init__(self):
        self.on_data = self.on_end = None
        self.stopped = False

    def start(self, on_data, on_end):
        self.on_data, self.on_end = on_data, on_end

    def stop(self):
        self.stopped = True

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class StreamTests(SynchronousTestCase):
    """Streams of unknown length (pipes): size null in the offer, the real
    size in END."""

    def setUp(self):
        self.out = self.mktemp()
        os.mkdir(self.out)

    def test_stream_roundtrip(self):
        from p2pft.transfer import StreamSender

        link, source = Link(), FakeSource()
        sender = StreamSender(link.a, Clock(), source)
        receiver = FileReceiver(link.b, Clock(), self.out, accept)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        self.assertEqual(json.loads(link.log[0][2]), {"name": "stdin", "size": None})
        self.assertIs(link.a.producer, source)
        chunks = [os.urandom(100), os.urandom(transfer.CHUNK * 2 + 5), b"tail"]
        for c in chunks:
            source.on_data(c)
        source.on_end(None)
        link.pump()
        result = self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual(result.size, sum(map(len, chunks)))
        with open(os.path.join(self.out, "stdin"), "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))
        self.assertTrue(source.stopped)
        self.assertTrue(all(len(p) <= transfer.CHUNK for ch, k, p in link.log if k == DATA))

    def test_read_error_fails_cleanly(self):
        from p2pft.transfer import StreamSender

        link, source = Link(), FakeSource()
        sender = StreamSender(link.a, Clock(), source)
        receiver = FileReceiver(link.b, Clock(), self.out, accept)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        source.on_data(b"some")
        source.on_end("Input/output error")
        link.pump()
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("cannot read standard input", str(f.value))
        self.failureResultOf(rd, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])

    def test_stream_end_must_match_what_arrived(self):
        link = Link()
        receiver = FileReceiver(link.b, Clock(), self.out, accept)
        d = receiver.start()
        receiver.recordReceived(OFFER, json.dumps({"name": "s", "size": None}).encode())
        receiver.recordReceived(DATA, b"abc")
        receiver.recordReceived(END, json.dumps({"size": 4, "sha256": "00"}).encode())
        self.failureResultOf(d, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])

    def test_stdout_receiver(self):
        import io

        from p2pft.transfer import StdoutReceiver

        src = self.mktemp()
        data = os.urandom(transfer.CHUNK + 3)
        with open(src, "wb") as f:
            f.write(data)
        out = io.BytesIO()
        link = Link()
        sender = FileSender(link.a, Clock(), src)
        receiver = StdoutReceiver(link.b, Clock(), out, accept)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        self.assertEqual(self.successResultOf(rd).path, "-")
        self.successResultOf(sd)
        self.assertEqual(out.getvalue(), data)
