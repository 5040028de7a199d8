"""
The transfer layer over an in-memory channel: offers, decisions, data,
verification, placement, and every way it must fail safely.  Folders are in
test_folders, resuming in test_resume.
"""

import errno
import io
import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import destination, sink
from p2pft.transfer.destination import UNNAMED_MAX
from p2pft.errors import Declined, TransferFailed, UnsafeName
from p2pft.secure import MAX_RECORD
from p2pft.transfer.manifest import PARTIAL_SUFFIX, printable, safe_path
from p2pft.transfer.scan import ScanError, scan, stream_manifest
from p2pft.transfer import Receiver, Sender, StdoutReceiver, StreamSender
from p2pft.transfer.records import ABORT, ACCEPT, ACK, DATA, END, ENTRIES, FILE, FILE_END, OFFER
from p2pft.transfer.sender import BURST, CHUNK, RATED_CHUNK

from .memlink import Link, accept, start_pair


def filling_disk(room: int):
    """A stand-in for L{sink._write_all} on a disk with C{room} bytes left."""
    left = [room]

    def write_all(fd, view, offset):
        n = min(len(view), left[0])
        sink._write_all_real(fd, view[:n], offset)
        left[0] -= n
        if n < len(view):
            raise OSError(errno.ENOSPC, "No space left on device")
    return write_all


sink._write_all_real = sink._write_all


def dumps(value) -> bytes:
    return json.dumps(value).encode()


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
        link, sender, receiver, sd, rd = start_pair([self.source(data, name)], self.out, decide, overwrite,
                                                    self.clock)
        link.pump()
        return link, sender, receiver, sd, rd

    def read(self, name="file.bin"):
        with open(os.path.join(self.out, name), "rb") as f:
            return f.read()

    def test_transfer_roundtrip(self):
        data = os.urandom(3 * CHUNK + 123)
        link, sender, receiver, sd, rd = self.run_pair(data)
        sres, rres = self.successResultOf(sd), self.successResultOf(rd)
        self.assertEqual((sres.size, sres.files, sres.resumed), (len(data), 1, 0))
        self.assertEqual((rres.size, rres.files, rres.resumed), (len(data), 1, 0))
        self.assertEqual(rres.path, os.path.join(os.path.abspath(self.out), "file.bin"))
        self.assertEqual(self.read(), data)
        self.assertEqual(os.listdir(self.out), ["file.bin"])
        self.assertTrue(link.a.closed and link.b.closed)

    def test_empty_file(self):
        link, _, _, sd, rd = self.run_pair(b"")
        self.successResultOf(sd)
        self.assertEqual(self.read(), b"")

    def test_received_file_is_not_executable_and_follows_umask(self):
        self.run_pair(b"x")
        mode = os.stat(os.path.join(self.out, "file.bin")).st_mode & 0o7777
        self.assertEqual(mode & 0o111, 0)
        self.assertEqual(mode & 0o600, 0o600)

    def test_executable_stays_executable_but_never_setuid_or_world_writable(self):
        path = self.source(b"#!/bin/sh\n", "run.sh")
        os.chmod(path, 0o4777)
        link, _, _, sd, rd = start_pair([path], self.out, clock=self.clock)
        link.pump()
        self.successResultOf(rd)
        mode = os.stat(os.path.join(self.out, "run.sh")).st_mode & 0o7777
        self.assertEqual(mode & 0o100, 0o100)
        self.assertEqual(mode & 0o7022, 0)

    def test_data_is_chunked_within_record_limit(self):
        link, *_ = self.run_pair(os.urandom(CHUNK * 2 + 1))
        self.assertEqual([len(p) for p in link.sent(DATA)], [CHUNK, CHUNK, 1])
        # The largest record the protocol allows: Python's cost per record
        # is spread over as many bytes as it can be.
        self.assertEqual(CHUNK, MAX_RECORD)

    def test_declined(self):
        link, _, _, sd, rd = self.run_pair(decide=lambda offer: False)
        self.failureResultOf(sd, Declined)
        self.failureResultOf(rd, Declined)
        self.assertEqual(os.listdir(self.out), [])

    def test_decision_waits(self):
        answer = defer.Deferred()
        link, _, receiver, sd, rd = self.run_pair(decide=lambda offer: answer)
        self.assertNoResult(sd)
        self.assertEqual((receiver.offer.name, receiver.offer.files, receiver.offer.size), ("file.bin", 1, 500000))
        answer.callback(True)
        link.pump()
        self.successResultOf(sd)
        self.successResultOf(rd)

    def test_existing_file_of_other_size_is_kept_without_asking(self):
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"precious")
        asked = []
        _, _, _, sd, rd = self.run_pair(b"new data!", decide=asked.append)
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("already exists (use --overwrite", str(f.value))
        self.failureResultOf(rd, Declined)
        self.assertEqual(asked, [])
        self.assertEqual(self.read(), b"precious")
        self.assertEqual(os.listdir(self.out), ["file.bin"])

    def test_existing_file_of_same_size_and_other_content_is_kept(self):
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"precious")
        _, _, _, sd, rd = self.run_pair(b"new data")
        f = self.failureResultOf(rd, Declined)
        self.assertIn("already exists with other content", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(self.read(), b"precious")
        self.assertEqual(os.listdir(self.out), ["file.bin"])

    def test_identical_existing_file_is_checked_and_skipped(self):
        data = os.urandom(100_000)
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(data)
        link, _, _, sd, rd = self.run_pair(data)
        result = self.successResultOf(rd)
        self.assertEqual((result.size, result.skipped, result.resumed), (len(data), len(data), 0))
        self.assertEqual(link.content_sent(), 0)
        self.successResultOf(sd)

    def test_overwrite_replaces(self):
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"old")
        _, _, _, sd, rd = self.run_pair(b"new data", overwrite=True)
        self.successResultOf(rd)
        self.assertEqual(self.read(), b"new data")

    def test_file_appearing_during_transfer_is_not_clobbered(self):
        answer = defer.Deferred()
        link, _, _, sd, rd = self.run_pair(b"new", decide=lambda o: answer)
        answer.callback(True)
        # Someone creates the file after we accepted, before it is placed.
        with open(os.path.join(self.out, "file.bin"), "wb") as f:
            f.write(b"theirs")
        link.pump()
        self.failureResultOf(rd, TransferFailed)
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("appeared while receiving", str(f.value))
        self.assertEqual(self.read(), b"theirs")

    def test_connection_lost_midway_keeps_partial_data(self):
        data = os.urandom(CHUNK * 8)
        link, _, _, sd, rd = start_pair([self.source(data)], self.out, clock=self.clock)
        link.pump(data_limit=CHUNK * 3)
        link.cut()
        f = self.failureResultOf(rd, TransferFailed)
        self.assertIn("run the same send and receive again to resume", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(self.out), ["file.bin" + PARTIAL_SUFFIX])
        with open(os.path.join(self.out, "file.bin" + PARTIAL_SUFFIX), "rb") as f:
            self.assertEqual(f.read(), data[:CHUNK * 3])

    def test_lost_before_any_data_leaves_nothing(self):
        link, _, _, sd, rd = start_pair([self.source(b"abc")], self.out, clock=self.clock)
        for ch in (link.a, link.b):  # the offer arrives, nothing more
            while ch.queue:
                ch.peer.handler.recordReceived(*ch.queue.pop(0))
        link.cut()
        f = self.failureResultOf(rd, TransferFailed)
        self.assertNotIn("resume", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])

    def test_full_disk_stops_with_a_clear_error_and_keeps_the_data(self):
        for size, room in ((UNNAMED_MAX + 5000, 1000), (sink.BUFFER * 2 + 5000, sink.BUFFER + 1000)):
            # The rest of a file, written when it ends; and a full buffer,
            # written by the writer.
            for name in os.listdir(self.out):
                os.unlink(os.path.join(self.out, name))
            self.patch(sink, "_write_all", filling_disk(room))
            data = os.urandom(size)
            _, _, _, sd, rd = self.run_pair(data)
            f = self.failureResultOf(rd, TransferFailed)
            self.assertIn("the disk is full while writing file.bin", str(f.value))
            self.assertIn("resume", str(f.value))
            f = self.failureResultOf(sd, TransferFailed)
            self.assertIn("the disk is full", str(f.value))
            with open(os.path.join(self.out, "file.bin" + PARTIAL_SUFFIX), "rb") as f:
                self.assertEqual(f.read(), data[:room])

    def test_small_file_on_a_full_disk_leaves_nothing(self):
        """A file small enough to be written unnamed (L{UNNAMED_MAX}) leaves
        nothing behind when the transfer stops, and nobody is told to
        resume: sending it again is all a resume would do."""
        self.patch(sink, "_write_all", filling_disk(1000))
        self.patch(destination, "_write_all", filling_disk(1000))  # (sent whole: L{p2pft.transfer.small})
        _, _, _, sd, rd = self.run_pair(os.urandom(5000))
        f = self.failureResultOf(rd, TransferFailed)
        self.assertIn("the disk is full while writing file.bin", str(f.value))
        self.assertNotIn("resume", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])

    def test_interrupted_receiver_tells_the_sender(self):
        data = os.urandom(CHUNK * 8)
        link, _, _, sd, rd = start_pair([self.source(data)], self.out, clock=self.clock)
        link.pump(data_limit=CHUNK)
        rd.cancel()
        link.pump()
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("the other side stopped: interrupted", str(f.value))
        self.assertIn("resume", str(f.value))
        self.failureResultOf(rd, defer.CancelledError)

    def test_rate_limit_paces_the_data(self):
        data = os.urandom(CHUNK * 20)
        link, _, _, sd, rd = start_pair([self.source(data)], self.out, clock=self.clock, rate=CHUNK * 4)
        link.pump()
        self.assertLessEqual(link.delivered, CHUNK * 2)
        for _ in range(60):
            self.clock.advance(0.1)
            link.pump()
        self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertGreaterEqual(self.clock.seconds(), 4.5)

    def test_rate_limited_records_are_smaller(self):
        """Under a rate, 256 KiB records: the rate is kept to within one
        record, a short burst on a slow link rather than a 1 MiB one."""
        data = os.urandom(CHUNK + 5)
        link, _, _, sd, rd = start_pair([self.source(data)], self.out, clock=self.clock, rate=CHUNK * 4)
        for _ in range(30):
            link.pump()
            self.clock.advance(0.1)
        self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual([len(p) for p in link.sent(DATA)], [RATED_CHUNK] * (CHUNK // RATED_CHUNK) + [5])


def offer_records(entries):
    files = [e for e in entries if isinstance(e, list) and e[1:2] == ["file"]]
    return [(OFFER, dumps({"entries": len(entries), "files": len(files),
                           "bytes": sum(e[2] if isinstance(e[2], int) else 0 for e in files)})),
            (ENTRIES, dumps({"entries": entries}))]


def file_entry(name="f", size=5):
    return [name, "file", size, 0o644, None]


class HostileSenderTests(SynchronousTestCase):
    """A receiver driven by records a hostile sender chose."""

    def setUp(self):
        self.out = self.mktemp()
        os.mkdir(self.out)
        self.link = Link()
        self.receiver = Receiver(self.link.b, Clock(), self.out, accept)
        self.done = self.receiver.start()

    def feed(self, *records):
        for kind, payload in records:
            self.receiver.recordReceived(kind, payload)

    def offer(self, name="f", size=5):
        return offer_records([file_entry(name, size)])

    def start_file(self, size):
        return self.offer(size=size) + [(FILE, dumps({"file": 0, "offset": 0}))]

    def assertFailedCleanly(self, fragment=""):
        f = self.failureResultOf(self.done, TransferFailed)
        self.assertIn(fragment, str(f.value))
        self.assertEqual([n for n in os.listdir(self.out)], [])
        self.assertTrue(self.link.b.closed)
        self.assertEqual(self.link.b.queue[-1][0], ABORT)
        return f

    def test_more_data_than_offered(self):
        self.feed(*self.start_file(3), (DATA, b"abcd"))
        self.assertFailedCleanly("more data than it offered")

    def test_less_data_than_offered(self):
        self.feed(*self.start_file(10), (DATA, b"abc"), (FILE_END, dumps({"size": 3})))
        self.assertFailedCleanly("size mismatch")

    def test_end_before_all_files(self):
        self.feed(*self.offer(size=0), (END, dumps({"files": 1, "bytes": 0})))
        self.assertFailedCleanly("ended early")

    def test_data_before_accept(self):
        self.feed((DATA, b"abc"))
        self.assertFailedCleanly("unexpected DATA")

    def test_data_outside_a_file(self):
        self.feed(*self.offer(size=3), (DATA, b"abc"))
        self.assertFailedCleanly("unexpected DATA")

    def test_files_out_of_order_or_unknown(self):
        for message in ({"file": 1, "offset": 0}, {"file": "0", "offset": 0}, {"offset": 0}):
            self.setUp()
            self.feed(*offer_records([file_entry("a"), file_entry("b")]), (FILE, dumps(message)))
            self.assertFailedCleanly("out of order")

    def test_skip_or_resume_of_what_we_do_not_have(self):
        for message, fragment in (({"file": 0, "skip": True}, "skipped a file we do not have"),
                                  ({"file": 0, "offset": 3}, "resumed from data we do not have"),
                                  ({"file": 0, "offset": 6}, "invalid offset"),
                                  ({"file": 0, "offset": -1}, "invalid offset")):
            self.setUp()
            self.feed(*self.offer(size=5), (FILE, dumps(message)))
            self.assertFailedCleanly(fragment)

    def test_malformed_offers(self):
        for payload in (b"not json", b"[1]", dumps({"entries": 0}), dumps({"entries": -1}),
                        dumps({"entries": True}), dumps({"entries": 10**12}), b"{" * 70000, b"[" * 60000):
            self.setUp()
            self.feed((OFFER, payload))
            self.assertFailedCleanly()

    def test_malformed_entries(self):
        for entry in ([1, "file", 5, 0, None], ["x", "link", 5, 0, None], ["x", "file", -1, 0, None],
                      ["x", "file", True, 0, None], ["x", "file", 1.5, 0, None], ["x", "dir", 5, 0, None],
                      ["x", "file", 5, 0o10000, None], ["x", "file", 5, 0, "yesterday"], ["x", "file", 5, 0],
                      ["lone\ud800", "file", 5, 0, None],
                      "x", None):
            self.setUp()
            self.feed(*offer_records([entry]))
            self.assertFailedCleanly()

    def test_more_entries_than_announced(self):
        self.feed((OFFER, dumps({"entries": 1})), (ENTRIES, dumps({"entries": [file_entry("a"), file_entry("b")]})))
        self.assertFailedCleanly("invalid ENTRIES")

    def test_a_stream_only_alone(self):
        self.feed(*offer_records([file_entry("a", None), file_entry("b", 1)]))
        self.assertFailedCleanly("stream of unknown size")

    def test_hostile_names_refused(self):
        for bad in ("../../etc/passwd", "/etc/shadow", "C:\\Windows\\evil.dll", "..\\..\\x",
                    "C:evil", "c:", "\\\\server\\share", "", ".", "..", "a/..", "a//b", "a/./b", "/",
                    "x\x00y", "bell\x07", "esc\x1b[31m", "new\nline", "bidi\u202etxt.exe", "zero\u200bwidth",
                    "a" * 256, "\u00e9" * 128, "CON", "con.txt", "Nul", "COM1.log", "lpt9", "COM\u00b9",
                    "trailing.", "trailing ", "dir/trailing.", "x" + PARTIAL_SUFFIX, "X.P2PFT-PARTIAL",
                    "surrogate\udc80", "lone\ud800", "low\udfff", "/".join(["d"] * 200),
                    "/".join(["d" * 200] * 30), None, 5, ["x"]):
            self.assertRaises(UnsafeName, safe_path, bad)

    def test_ordinary_names_accepted(self):
        for good in ("movie.mkv", ".bashrc", "r\u00e9sum\u00e9.pdf", "\u65e5\u672c.txt",
                     "a" * 255, "console.log", "COM10", "-rf", "~user", " leading space", "dir/sub/name.txt",
                     "notes.p2pft-partial.txt"):
            self.assertEqual(safe_path(good), good)

    def test_names_are_nfc_normalised(self):
        self.assertEqual(safe_path("re\u0301sume\u0301/x"), "r\u00e9sum\u00e9/x")

    def test_unsafe_offer_refused_nothing_written(self):
        self.feed(*self.offer(name="../../etc/passwd", size=1))
        self.assertFailedCleanly("'.' or '..'")

    def test_offer_larger_than_disk(self):
        self.feed(*self.offer(size=1 << 62))
        self.assertFailedCleanly("not enough free space")

    def test_printable_escapes_terminal_sequences(self):
        self.assertEqual(printable("a\x1b[2Jb"), "a\\x1b[2Jb")
        self.assertEqual(printable("x\u202ey"), "x\\u202ey")
        self.assertEqual(printable("ok ünïcode"), "ok ünïcode")

    def test_remote_abort_message_is_escaped(self):
        self.feed((ABORT, dumps({"message": "boom\x1b[31m"})))
        f = self.failureResultOf(self.done, TransferFailed)
        self.assertIn("boom\\x1b[31m", str(f.value))


def offered_sender(testcase, data: bytes, **kw):
    """A Sender for a fresh file holding C{data}, its offer sent."""
    src = testcase.mktemp()
    with open(src, "wb") as f:
        f.write(data)
    link = Link()
    sender = Sender(link.a, Clock(), scan([src]), **kw)
    d = sender.start()
    sender.resumeProducing()  # the manifest
    return src, link, sender, d


def accepted_sender(testcase, data: bytes, **kw):
    src, link, sender, d = offered_sender(testcase, data, **kw)
    sender.recordReceived(ACCEPT, b"{}")
    return src, link, sender, d


class SenderTests(SynchronousTestCase):
    def test_a_decomposed_name_is_offered_in_nfc_and_read_from_its_own_name(self):
        """The scan offers names in NFC (checked once, by the manifest's
        checker) but reads each file under the name it has on disk."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "re\u0301sume\u0301"))
        with open(os.path.join(root, "re\u0301sume\u0301", "cafe\u0301.txt"), "wb") as f:
            f.write(b"ok")
        manifest = scan([root])
        top = os.path.basename(root)
        self.assertEqual([e.path for e in manifest.entries],
                         [top, f"{top}/r\u00e9sum\u00e9", f"{top}/r\u00e9sum\u00e9/caf\u00e9.txt"])
        with open(manifest.sources[2], "rb") as f:
            self.assertEqual(f.read(), b"ok")
        os.makedirs(os.path.join(root, "bad"))
        with open(os.path.join(root, "bad", "x.p2pft-partial"), "wb"):
            pass
        with self.assertRaises(ScanError) as e:
            scan([root])
        self.assertIn(f"offered name '{top}/bad/x.p2pft-partial' ends with .p2pft-partial", str(e.exception))

    def test_receiver_wrong_ack_fails(self):
        src, link, sender, d = accepted_sender(self, b"data")
        sender.resumeProducing()
        self.assertEqual(sender.state, "ending")
        sender.recordReceived(ACK, dumps({"files": 1, "bytes": 3}))
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("does not match", str(f.value))

    def test_file_that_grows_is_detected(self):
        src, link, sender, d = offered_sender(self, b"data")
        with open(src, "ab") as f:
            f.write(b"more")
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("changed after the transfer started (4 bytes then, 8 now)", str(f.value))

    def test_file_that_grows_while_read_is_detected(self):
        src, link, sender, d = accepted_sender(self, b"x" * (BURST * 2))
        sender.resumeProducing()
        with open(src, "ab") as f:
            f.write(b"more")
        sender.resumeProducing()
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("grew while it was being sent", str(f.value))

    def test_file_that_shrinks_while_read_is_detected(self):
        src, link, sender, d = accepted_sender(self, b"x" * (BURST * 2))
        sender.resumeProducing()
        os.truncate(src, 10)
        sender.resumeProducing()
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("shrank", str(f.value))

    def test_file_that_vanished_is_reported(self):
        src, link, sender, d = offered_sender(self, b"data")
        os.unlink(src)
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("cannot read", str(f.value))

    def test_accept_before_the_manifest_is_out(self):
        link = Link()
        src = self.mktemp()
        os.mkdir(src)
        for i in range(3000):
            open(os.path.join(src, f"f{i}"), "w").close()
        sender = Sender(link.a, Clock(), scan([src]))
        d = sender.start()
        sender.recordReceived(ACCEPT, b"{}")
        self.failureResultOf(d, TransferFailed)

    def test_connection_lost_before_ack_is_failure(self):
        src, link, sender, d = accepted_sender(self, b"data")
        sender.resumeProducing()
        sender.channelLost("closed")
        self.failureResultOf(d, TransferFailed)

    def test_abort_while_streaming_unregisters_and_reports_reason(self):
        src, link, sender, d = accepted_sender(self, os.urandom(BURST * 3))
        sender.resumeProducing()
        self.assertIsNotNone(link.a.producer)
        sender.recordReceived(ABORT, dumps({"message": "disk full"}))
        self.assertIsNone(link.a.producer)
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("disk full", str(f.value))

    def test_stop_producing_does_not_hide_the_reason(self):
        src, link, sender, d = accepted_sender(self, b"x" * 10)
        sender.stopProducing()
        self.assertNoResult(d)
        sender.channelLost("Connection reset by peer")
        f = self.failureResultOf(d, TransferFailed)
        self.assertIn("reset by peer", str(f.value))


class LargeFileTests(SynchronousTestCase):
    """Sizes beyond 32 bits survive the manifest (sparse file, no data read);
    test_resume moves real data past 4 GiB."""

    def test_offer_of_sparse_file_over_4_gib(self):
        size = (1 << 32) + 12345
        src, link, sender, d = offered_sender(self, b"")
        os.truncate(src, size)
        link = Link()
        sender = Sender(link.a, Clock(), scan([src]))
        sender.start()
        sender.resumeProducing()
        (_, offer), (_, entries) = link.a.queue[:2]
        self.assertEqual(json.loads(offer)["bytes"], size)
        self.assertEqual(json.loads(entries)["entries"][0][2], size)
        sender.channelLost("test over")
        self.failureResultOf(sender.done, TransferFailed)


class SymlinkAtDestinationTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.out = self.mktemp()
        os.mkdir(self.out)
        self.outside = os.path.abspath(self.mktemp())
        with open(self.outside, "wb") as f:
            f.write(b"outside the output directory")
        os.symlink(self.outside, os.path.join(self.out, "file.bin"))

    def run_pair(self, overwrite):
        src = os.path.join(self.mktemp())
        os.mkdir(src)
        with open(os.path.join(src, "file.bin"), "wb") as f:
            f.write(b"payload")
        link, _, _, sd, rd = start_pair([os.path.join(src, "file.bin")], self.out, overwrite=overwrite,
                                        clock=self.clock)
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
        self.paused = False

    def start(self, on_data, on_end):
        self.on_data, self.on_end = on_data, on_end

    def stop(self):
        self.stopped = True

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


class StreamTests(SynchronousTestCase):
    """Streams of unknown length (pipes): size null in the manifest, the
    real size in FILE_END."""

    def setUp(self):
        self.out = self.mktemp()
        os.mkdir(self.out)

    def stream_pair(self, receiver_class=Receiver, target=None, clock=None, rate=None):
        link, source = Link(), FakeSource()
        sender = StreamSender(link.a, clock or Clock(), stream_manifest(), source, rate=rate)
        receiver = receiver_class(link.b, Clock(), target or self.out, accept)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        return link, source, sd, rd

    def test_pipes_are_widened(self):
        import fcntl

        from p2pft.transfer.pipes import widen_pipe

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        with open("/proc/sys/fs/pipe-max-size") as f:
            if int(f.read()) < 1 << 20:
                raise self.skipTest("pipe-max-size below 1 MiB here")
        self.assertEqual(fcntl.fcntl(r, fcntl.F_GETPIPE_SZ), 65536)
        widen_pipe(r)
        self.assertEqual(fcntl.fcntl(r, fcntl.F_GETPIPE_SZ), 1 << 20)
        path = self.mktemp()
        with open(path, "wb") as f:
            widen_pipe(f.fileno())  # not a pipe: left alone, no error

    def test_stream_roundtrip(self):
        link, source, sd, rd = self.stream_pair()
        self.assertEqual(json.loads(link.sent(ENTRIES)[0]), {"entries": [["stdin", "file", None, 0o644, None]]})
        self.assertIs(link.a.producer.source, source)
        chunks = [os.urandom(100), os.urandom(CHUNK * 2 + 5), b"tail"]
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
        self.assertTrue(all(len(p) <= CHUNK for p in link.sent(DATA)))

    def test_rate_limit_holds_the_stream_back(self):
        clock = Clock()
        link, source, sd, rd = self.stream_pair(clock=clock, rate=1_000_000)
        producer = link.a.producer
        source.on_data(os.urandom(500_000))
        self.assertTrue(source.paused, "500 kB at once is ahead of 1 MB/s")
        producer.resumeProducing()  # the transport has room: still held by the rate
        self.assertTrue(source.paused)
        clock.advance(0.4)
        self.assertTrue(source.paused)
        clock.advance(0.2)
        self.assertFalse(source.paused)
        producer.pauseProducing()  # the transport is full: paused whatever the rate
        self.assertTrue(source.paused)
        producer.resumeProducing()
        self.assertFalse(source.paused)
        source.on_end(None)
        link.pump()
        self.assertEqual(self.successResultOf(rd).size, 500_000)
        self.successResultOf(sd)

    def test_read_error_fails_cleanly_and_keeps_nothing(self):
        link, source, sd, rd = self.stream_pair()
        source.on_data(b"some")
        source.on_end("Input/output error")
        link.pump()
        f = self.failureResultOf(sd, TransferFailed)
        self.assertIn("cannot read standard input", str(f.value))
        f = self.failureResultOf(rd, TransferFailed)
        self.assertNotIn("resume", str(f.value))  # a stream cannot be resumed
        self.assertEqual(os.listdir(self.out), [])

    def test_stream_end_must_match_what_arrived(self):
        link = Link()
        receiver = Receiver(link.b, Clock(), self.out, accept)
        d = receiver.start()
        for kind, payload in offer_records([file_entry("s", None)]) + [
                (FILE, dumps({"file": 0, "offset": 0})), (DATA, b"abc"),
                (FILE_END, dumps({"size": 4}))]:
            receiver.recordReceived(kind, payload)
        self.failureResultOf(d, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])

    def test_stdout_receiver(self):
        src = self.mktemp()
        data = os.urandom(CHUNK + 3)
        with open(src, "wb") as f:
            f.write(data)
        out = io.BytesIO()
        link, _, _, sd, rd = start_pair([src], self.out)
        link.b.handler = None
        receiver = StdoutReceiver(link.b, Clock(), out, accept)
        rd = receiver.start()
        link.pump()
        result = self.successResultOf(rd)
        self.assertEqual((result.path, result.size), ("-", len(data)))
        self.successResultOf(sd)
        self.assertEqual(out.getvalue(), data)

    def test_stdout_takes_one_file_only(self):
        src = self.mktemp()
        os.mkdir(src)
        out = io.BytesIO()
        link = Link()
        sender = Sender(link.a, Clock(), scan([src]))
        receiver = StdoutReceiver(link.b, Clock(), out, accept)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        f = self.failureResultOf(rd, Declined)
        self.assertIn("--output - takes a single file", str(f.value))
        self.failureResultOf(sd, TransferFailed)
