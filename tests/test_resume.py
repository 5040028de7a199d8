"""
Resuming: a receiver proves what it kept with block hashes, the sender sends
only the rest; anything changed starts over; the result is always the
sender's file, byte for byte.
"""

import hashlib
import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer.resume import BLOCK, hash_prefix, match_prefix
from p2pft.errors import TransferFailed
from p2pft.transfer.manifest import PARTIAL_SUFFIX
from p2pft.transfer import Receiver
from p2pft.transfer.records import ACCEPT, FILE, HAVE

from .memlink import Link, accept, start_pair, tree
from .files import write
from .test_transfer import dumps, file_entry, offer_records, offered_sender


class BlockTests(SynchronousTestCase):
    def test_prefix_and_match(self):
        path = write(self.mktemp() + "/f", os.urandom(BLOCK * 2 + 10))
        with open(path, "rb") as f:
            whole = hash_prefix(f, BLOCK * 3)
        self.assertEqual((len(whole.hashes), whole.length), (3, BLOCK * 2 + 10))
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(whole.hashes, [hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)])
        with open(path, "rb") as f:
            self.assertEqual(hash_prefix(f, BLOCK).length, BLOCK)
        with open(path, "rb") as f:
            matched = match_prefix(f, [whole.hashes[0], b"x" * 32, whole.hashes[2]])
        self.assertEqual((matched.length, matched.hashes), (BLOCK, whole.hashes[:1]))


class ResumeTests(SynchronousTestCase):
    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.src)
        os.makedirs(self.out)

    def interrupted(self, paths, after):
        """A transfer of paths cut after C{after} bytes of data."""
        link, _, _, sd, rd = start_pair(paths, self.out, clock=Clock())
        link.pump(data_limit=after)
        link.cut()
        self.failureResultOf(sd, TransferFailed)
        f = self.failureResultOf(rd, TransferFailed)
        self.assertIn("run the same send and receive again to resume", str(f.value))

    def again(self, paths, **kw):
        """The same transfer once more, to the end: (result, DATA bytes sent)."""
        link, _, _, sd, rd = start_pair(paths, self.out, clock=Clock(), **kw)
        link.pump()
        result = self.successResultOf(rd)
        self.assertEqual(self.successResultOf(sd).resumed, result.resumed)
        return result, link.content_sent()

    def test_resume_at_several_points(self):
        data = os.urandom(BLOCK * 3 + 1000)
        path = write(os.path.join(self.src, "big.bin"), data)
        for cut in (BLOCK // 2, BLOCK + 5, BLOCK * 3, BLOCK * 3 + 999):
            for name in os.listdir(self.out):
                os.unlink(os.path.join(self.out, name))
            self.interrupted([path], cut)
            result, sent = self.again([path])
            kept = cut // BLOCK * BLOCK  # whole blocks count
            self.assertEqual((result.resumed, sent), (kept, len(data) - kept), cut)
            self.assertEqual(tree(self.out), {"big.bin": data})

    def test_interrupted_twice(self):
        data = os.urandom(BLOCK * 4)
        path = write(os.path.join(self.src, "big.bin"), data)
        self.interrupted([path], BLOCK + 1)
        link, _, _, sd, rd = start_pair([path], self.out, clock=Clock())
        link.pump(data_limit=BLOCK * 2)
        link.cut()
        self.failureResultOf(rd, TransferFailed)
        self.failureResultOf(sd, TransferFailed)
        result, sent = self.again([path])
        self.assertEqual((result.resumed, sent), (BLOCK * 3, BLOCK))
        self.assertEqual(tree(self.out), {"big.bin": data})

    def test_folder_resumes_where_it_stopped(self):
        files = {f"d/{i}.bin": os.urandom(BLOCK + 100 * i) for i in range(4)}
        for name, data in files.items():
            write(os.path.join(self.src, name), data)
        first_two = sum(len(files[f"d/{i}.bin"]) for i in range(2))
        self.interrupted([os.path.join(self.src, "d")], first_two + BLOCK + 7)
        result, sent = self.again([os.path.join(self.src, "d")])
        self.assertEqual((result.skipped, result.resumed), (first_two, BLOCK))  # two files checked and skipped, one resumed
        self.assertEqual(sent, sum(map(len, files.values())) - result.resumed - result.skipped)
        self.assertEqual(tree(self.out), {"d": None, **files})

    def test_changed_source_starts_over(self):
        path = write(os.path.join(self.src, "f.bin"), os.urandom(BLOCK * 3))
        self.interrupted([path], BLOCK * 2 + 1)
        new = os.urandom(BLOCK * 3)
        write(path, new)
        result, sent = self.again([path])
        self.assertEqual((result.resumed, sent), (0, len(new)))
        self.assertEqual(tree(self.out), {"f.bin": new})

    def test_changed_middle_resumes_before_the_change(self):
        data = bytearray(os.urandom(BLOCK * 3))
        path = write(os.path.join(self.src, "f.bin"), data)
        self.interrupted([path], BLOCK * 2 + 1)
        data[BLOCK + 17] ^= 1
        write(path, data)
        result, sent = self.again([path])
        self.assertEqual((result.resumed, sent), (BLOCK, len(data) - BLOCK))
        self.assertEqual(tree(self.out), {"f.bin": bytes(data)})

    def test_grown_source_resumes_and_gets_the_new_end(self):
        data = os.urandom(BLOCK * 2)
        path = write(os.path.join(self.src, "log"), data)
        self.interrupted([path], BLOCK + 1)
        with open(path, "ab") as f:
            f.write(b"appended")
        result, sent = self.again([path])
        self.assertEqual(result.resumed, BLOCK)
        self.assertEqual(tree(self.out), {"log": data + b"appended"})

    def test_damaged_partial_data_is_not_trusted(self):
        data = os.urandom(BLOCK * 3)
        path = write(os.path.join(self.src, "f.bin"), data)
        for damage in (3, BLOCK + 3):
            self.interrupted([path], BLOCK * 2 + 1)
            with open(os.path.join(self.out, "f.bin" + PARTIAL_SUFFIX), "r+b") as f:
                f.seek(damage)
                f.write(bytes([data[damage] ^ 1]))
            result, sent = self.again([path])
            kept = damage // BLOCK * BLOCK  # the whole blocks before the damage
            self.assertEqual((result.resumed, sent), (kept, len(data) - kept))
            self.assertEqual(tree(self.out), {"f.bin": data})
            os.unlink(os.path.join(self.out, "f.bin"))

    def test_hole_left_by_an_unfinished_write_costs_only_what_follows_it(self):
        # A receiver killed while two buffers were being written can leave
        # a later one on disk and an earlier one not: a hole of zeros.
        data = os.urandom(BLOCK * 4)
        path = write(os.path.join(self.src, "f.bin"), data)
        partial = bytearray(data[:BLOCK * 3])
        partial[BLOCK:BLOCK * 2] = bytes(BLOCK)
        write(os.path.join(self.out, "f.bin" + PARTIAL_SUFFIX), bytes(partial))
        result, sent = self.again([path])
        self.assertEqual((result.resumed, sent), (BLOCK, len(data) - BLOCK))
        self.assertEqual(tree(self.out), {"f.bin": data})

    def test_completed_tree_is_checked_not_resent(self):
        files = {f"t/{i}.txt": os.urandom(i * 1000) for i in range(5)}
        for name, data in files.items():
            write(os.path.join(self.src, name), data)
        self.again([os.path.join(self.src, "t")])
        result, sent = self.again([os.path.join(self.src, "t")])
        self.assertEqual((result.skipped, result.resumed, sent, result.files), (10_000, 0, 0, 5))

    def test_overwrite_of_a_different_file_sends_it_all(self):
        write(os.path.join(self.out, "f.bin"), b"x" * 1000)
        path = write(os.path.join(self.src, "f.bin"), os.urandom(1000))
        result, sent = self.again([path], overwrite=True)
        self.assertEqual((result.resumed, sent), (0, 1000))


class LargeResumeTests(SynchronousTestCase):
    def test_resume_past_4_gib(self):
        """A sparse source over 4 GiB, a sparse partial of its first 4 GiB:
        only the last bytes travel, at offsets past 32 bits."""
        src, out = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        os.makedirs(src)
        os.makedirs(out)
        path = os.path.join(src, "huge.img")
        tail = os.urandom(12345)
        with open(path, "wb") as f:
            f.truncate(1 << 32)
            f.seek(1 << 32)
            f.write(tail)
        with open(os.path.join(out, "huge.img" + PARTIAL_SUFFIX), "wb") as f:
            f.truncate(1 << 32)
        link, _, _, sd, rd = start_pair([path], out, clock=Clock())
        link.pump()
        result = self.successResultOf(rd)
        self.assertEqual((result.size, result.resumed), ((1 << 32) + 12345, 1 << 32))
        self.assertEqual(link.content_sent(), 12345)
        with open(os.path.join(out, "huge.img"), "rb") as f:
            f.seek(1 << 32)
            self.assertEqual(f.read(), tail)
        self.assertEqual(os.path.getsize(os.path.join(out, "huge.img")), (1 << 32) + 12345)
        self.successResultOf(sd)


class HostileReceiverTests(SynchronousTestCase):
    """A sender driven by HAVE messages a hostile receiver chose."""

    def test_bad_have(self):
        for have in ({"file": 0, "from": 0, "hashes": "00" * 32 * 3},  # more blocks than the file has
                     {"file": 0, "from": 0, "hashes": "zz" * 32},
                     {"file": 0, "from": 1, "hashes": "00" * 32},
                     {"file": 0, "from": 0, "hashes": "00" * 31},
                     {"file": 1, "from": 0, "hashes": ""},
                     {"file": "0", "from": 0, "hashes": ""}):
            src, link, sender, d = offered_sender(self, os.urandom(BLOCK + 1))
            sender.recordReceived(HAVE, json.dumps(have).encode())
            self.failureResultOf(d, TransferFailed)

    def test_wrong_hashes_mean_starting_over(self):
        src, link, sender, d = offered_sender(self, os.urandom(BLOCK * 2))
        sender.recordReceived(HAVE, json.dumps({"file": 0, "from": 0, "complete": False,
                                                "hashes": "ab" * 32}).encode())
        sender.recordReceived(ACCEPT, b"{}")
        sender.resumeProducing()
        self.assertEqual(json.loads(link.sent(9 + 1)[0]), {"file": 0, "offset": 0})


class HostileResumeTests(SynchronousTestCase):
    """A receiver with partial data, driven by FILE offsets a hostile sender chose."""

    def test_offset_must_be_a_whole_block_within_what_we_have(self):
        for offset, ok in ((BLOCK, True), (2 * BLOCK, True), (BLOCK + 4096, False), (3 * BLOCK, False)):
            out = os.path.abspath(self.mktemp())
            data = os.urandom(2 * BLOCK + 10)
            write(os.path.join(out, "f" + PARTIAL_SUFFIX), data)
            link = Link()
            receiver = Receiver(link.b, Clock(), out, accept)
            d = receiver.start()
            for kind, payload in offer_records([file_entry("f", 4 * BLOCK)]):
                receiver.recordReceived(kind, payload)
            self.assertEqual([k for k, _ in link.b.queue][-1], ACCEPT)
            receiver.recordReceived(FILE, dumps({"file": 0, "offset": offset}))
            if ok:
                self.assertNoResult(d)
                with open(os.path.join(out, "f" + PARTIAL_SUFFIX), "rb") as f:
                    self.assertEqual(f.read(), data[:offset])  # cut where the sender resumes
                receiver._cleanup()
            else:
                self.assertIn("resumed from data we do not have", str(self.failureResultOf(d, TransferFailed).value))

