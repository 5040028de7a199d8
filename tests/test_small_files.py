"""
Small files sent whole, many to a FILES record (L{p2pft.transfer.small}):
what is batched and what is not, the receiver's checks of each file, and
peers that do not take them.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.errors import TransferFailed
from p2pft.transfer import resume, store
from p2pft.transfer.destination import DiskDestination
from p2pft.transfer.manifest import PARTIAL_SUFFIX
from p2pft.transfer import Receiver, Sender, receiver as receiver_module
from p2pft.transfer.endpoint import run_now
from p2pft.transfer.receiver import FILES_PER_TURN
from p2pft.transfer.records import ACCEPT, ACK, DATA, FILE, FILE_END, FILES
from p2pft.transfer.scan import scan
from p2pft.transfer.small import BATCH_BYTES, BATCH_FILES, SMALL_FILE, pack, unpack

from .files import write
from .memlink import Link, accept, start_pair, tree


def files_sent(link) -> list[list[int]]:
    """The file indices of each FILES record sent."""
    return [[index for index, _ in unpack(p)] for p in link.sent(FILES)]


class SmallFileTests(SynchronousTestCase):
    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.out)

    def folder(self, sizes: dict[str, int]) -> dict[str, bytes]:
        files = {name: os.urandom(size) for name, size in sizes.items()}
        for name, data in files.items():
            write(os.path.join(self.src, name), data)
        return files

    def expected(self, files):
        top = os.path.basename(self.src)
        folders = {os.path.join(top, *name.split("/")[:i]): None
                   for name in files for i in range(len(name.split("/")))}
        return {**folders, **{os.path.join(top, name): data for name, data in files.items()}}

    def transfer(self, **kw):
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock(), **kw)
        link.pump()
        return link, sd, rd

    def test_small_files_travel_whole_and_large_ones_as_data(self):
        files = self.folder({"a/1": 10, "a/2": 0, "a/3": SMALL_FILE, "b/big": SMALL_FILE + 1, "b/4": 7})
        link, sd, rd = self.transfer()
        self.assertEqual(self.successResultOf(rd).files, 5)
        self.successResultOf(sd)
        self.assertEqual(tree(self.out), self.expected(files))
        self.assertEqual(sum(len(b) for b in files_sent(link)), 4)
        # Only the large one is a FILE, DATA, FILE_END.
        self.assertEqual(len(link.sent(FILE)), 1)
        self.assertEqual(len(link.sent(FILE_END)), 1)
        self.assertEqual(sum(map(len, link.sent(DATA))), SMALL_FILE + 1)
        self.assertEqual(link.content_sent(), sum(map(len, files.values())))
        # Times and modes as for any file.
        for name in files:
            ours, theirs = os.stat(os.path.join(self.src, name)), os.stat(
                os.path.join(self.out, os.path.basename(self.src), name))
            self.assertEqual((int(ours.st_mtime), ours.st_mode), (int(theirs.st_mtime), theirs.st_mode))

    def test_records_are_bounded(self):
        files = self.folder({**{f"e/{i:04d}": 0 for i in range(BATCH_FILES + 3)},
                             **{f"f/{i:02d}": SMALL_FILE for i in range(BATCH_BYTES // SMALL_FILE + 1)}})
        link, sd, rd = self.transfer()
        self.successResultOf(rd)
        self.assertEqual(tree(self.out), self.expected(files))
        batches = link.sent(FILES)
        self.assertTrue(all(len(files_) <= BATCH_FILES for files_ in files_sent(link)))
        self.assertTrue(all(sum(len(d) for _, d in unpack(p)) <= BATCH_BYTES for p in batches))
        self.assertEqual(sum(map(len, files_sent(link))), len(files))

    def test_not_to_a_receiver_that_does_not_take_them(self):
        """An older receiver's ACCEPT is C{{}}: every file goes as FILE,
        DATA, FILE_END, as before."""
        self.patch(DiskDestination, "takes_whole", False)
        files = self.folder({"a": 5, "b": 0, "c": 100})
        link, sd, rd = self.transfer()
        self.successResultOf(rd)
        self.assertEqual(tree(self.out), self.expected(files))
        self.assertEqual(link.sent(FILES), [])
        self.assertEqual(json.loads(link.sent(ACCEPT)[0]), {})
        self.assertEqual(len(link.sent(FILE)), 3)

    def test_a_partial_file_of_an_earlier_run_is_replaced(self):
        """A partial file too short to resume from (shorter than a
        L{resume.BLOCK}, as every small file is): the file is sent whole,
        and the partial name is gone once it is placed."""
        files = {"a": os.urandom(SMALL_FILE), "b": b"xy"}
        for name, content in files.items():
            write(os.path.join(self.src, name), content)
        top = os.path.basename(self.src)
        write(os.path.join(self.out, top, "a" + PARTIAL_SUFFIX), files["a"][:1000])
        self.assertGreater(resume.BLOCK, SMALL_FILE)
        link, sd, rd = self.transfer()
        self.assertEqual(self.successResultOf(rd).resumed, 0)
        self.assertEqual(tree(self.out), self.expected(files))
        self.assertEqual(files_sent(link), [[1, 2]])

    def test_an_identical_file_is_skipped(self):
        self.folder({"a": 50, "b": 60})
        self.transfer()
        link, sd, rd = self.transfer()
        self.assertEqual(self.successResultOf(rd).skipped, 110)
        self.assertEqual(link.sent(FILES), [])

    def test_a_different_file_there_is_refused_unless_overwrite(self):
        files = self.folder({"a": 50})
        write(os.path.join(self.out, os.path.basename(self.src), "a"), b"x" * 50)
        link, sd, rd = self.transfer()
        self.assertIn("already exists", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        link, sd, rd = self.transfer(overwrite=True)
        self.successResultOf(rd)
        self.assertEqual(tree(self.out), self.expected(files))

    def test_a_file_that_changed_since_the_scan_fails_the_sender(self):
        self.folder({"a": 50})
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        write(os.path.join(self.src, "a"), b"x" * 49)
        link.pump()
        self.assertIn("changed after the transfer started", str(self.failureResultOf(sd, TransferFailed).value))
        self.failureResultOf(rd, TransferFailed)

    def test_a_folder_at_the_name_is_reported_as_such(self):
        self.folder({"a": 5})
        answer = defer.Deferred()
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock(), decide=lambda o: answer)
        link.pump()
        answer.callback(True)
        os.makedirs(os.path.join(self.out, os.path.basename(self.src), "a"))
        link.pump()
        self.assertIn("appeared as a folder while receiving", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)


    def test_the_receiver_lets_the_reactor_run(self):
        """One socket read can hold hundreds of FILES records of empty
        files: after L{FILES_PER_TURN} files the receiver holds the next
        records until the reactor's next turn."""
        self.folder({f"e/{i:05d}": 0 for i in range(3 * FILES_PER_TURN)})
        clock, per_turn = Clock(), [0]
        advance = clock.advance

        def next_turn(amount):
            per_turn.append(0)
            advance(amount)
        clock.advance = next_turn
        write_whole = DiskDestination.write_whole

        def counted(self, *args):
            per_turn[-1] += 1
            write_whole(self, *args)
        self.patch(DiskDestination, "write_whole", counted)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=clock)
        link.pump()
        self.assertEqual(self.successResultOf(rd).files, 3 * FILES_PER_TURN)
        self.assertGreaterEqual(len(per_turn), 3)
        self.assertLessEqual(max(per_turn), FILES_PER_TURN + BATCH_FILES - 1)


class SyncAheadTests(SynchronousTestCase):
    """Small files are written back while more arrive (L{Receiver._sync_ahead}),
    one early sync at a time, and the final sync still comes before the ACK."""

    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.out)
        for i in range(100):
            write(os.path.join(self.src, f"{i:03d}"), os.urandom(8192))
        self.patch(receiver_module, "SYNC_AHEAD", 100 * 1024)
        self.events = []
        self.patch(DiskDestination, "sync_ahead", lambda d: self.early)
        sync = DiskDestination.sync
        self.patch(DiskDestination, "sync", lambda d: self.events.append("sync") or sync(d))

    def early(self):
        self.events.append("early")

    def transfer(self, run_blocking):
        clock = Clock()
        link = Link()
        link.clock = clock
        sender = Sender(link.a, clock, scan([self.src]))
        receiver = Receiver(link.b, clock, self.out, accept, run_blocking=run_blocking)
        send = link.b.send

        def seen(kind, data=b""):
            if kind == ACK:
                self.events.append("ack")
            send(kind, data)
        link.b.send = seen
        rd, sd = receiver.start(), sender.start()
        link.pump()
        self.assertEqual(self.successResultOf(rd).files, 100)
        self.successResultOf(sd)
        self.assertEqual(len(os.listdir(os.path.join(self.out, os.path.basename(self.src)))), 100)

    def test_several_early_syncs_then_the_final_one_before_the_ack(self):
        self.transfer(run_now)
        self.assertGreaterEqual(self.events.count("early"), 3, self.events)
        self.assertEqual(self.events[-2:], ["sync", "ack"])

    def test_one_at_a_time(self):
        held = []

        def run_blocking(f, *args):
            if f == self.early:
                held.append(defer.Deferred())
                f()
                return held[-1]
            return run_now(f, *args)
        self.transfer(run_blocking)
        self.assertEqual(self.events, ["early", "sync", "ack"], "no second early sync while one runs")
        self.assertEqual(len(held), 1)
        held[0].errback(OSError("late"))  # left to the final sync to report: no unhandled error


class ReceiverChecksTests(SynchronousTestCase):
    """A FILES record is checked like FILE ... FILE_END: a hostile or buggy
    sender's record fails the transfer, and nothing is written for it."""

    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.out)
        for name, size in (("a", 3), ("b", 4)):
            write(os.path.join(self.src, name), b"z" * size)

    def forged(self, payload: bytes, written=()) -> str:
        """The transfer with the sender's first FILES (or FILE) record
        replaced by a FILES record of C{payload}: the receiver's error.
        Nothing but C{written} is written."""
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        send, forged = link.a.send, []

        def forge(kind, data=b""):
            if kind in (FILES, FILE) and not forged:
                forged.append(kind)
                kind, data = FILES, payload
            send(kind, data)
        link.a.send = forge
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(sorted(tree(os.path.join(self.out, os.path.basename(self.src)))), sorted(written))
        return error

    def test_files_out_of_order(self):
        self.assertIn("files out of order", self.forged(pack([(2, b"zzzz"), (1, b"zzz")])))

    def test_a_file_offered_twice(self):
        self.assertIn("files out of order", self.forged(pack([(1, b"zzz"), (1, b"zzz")]), written=["a"]))

    def test_a_folder_as_a_file(self):
        self.assertIn("files out of order", self.forged(pack([(0, b"")])))

    def test_size_mismatch(self):
        self.assertIn("size mismatch for", self.forged(pack([(1, b"zz")])))

    def test_cut_short(self):
        self.assertIn("FILES cut short", self.forged(pack([(1, b"zzz")])[:-1]))
        self.assertIn("FILES cut short", self.forged(b"\0\0\0"))

    def test_empty(self):
        self.assertIn("empty FILES", self.forged(b""))

    def test_to_a_destination_that_does_not_take_them(self):
        self.patch(DiskDestination, "takes_whole", False)
        self.assertIn("unexpected FILES", self.forged(pack([(1, b"zzz")])))


class FewerLooksTests(SynchronousTestCase):
    """What small files cost the file system: no look for partial files
    where there can be none (a folder the receiver made; nothing below a
    folder that is not there)."""

    def test_no_looks_in_folders_we_made(self):
        src = os.path.abspath(self.mktemp())
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        files = {f"d{i}/f{j}": os.urandom(j) for i in range(3) for j in range(20)}
        for name, data in files.items():
            write(os.path.join(src, name), data)
        looks = []
        real_lstat = store.ConfinedDir.lstat

        def lstat(self, path, partial=False):
            looks.append(path)
            return real_lstat(self, path, partial)
        self.patch(store.ConfinedDir, "lstat", lstat)
        link, _, _, sd, rd = start_pair([src], out, clock=Clock())
        link.pump()
        self.successResultOf(rd)
        # The offer's names are looked at once each (conflicts), the top
        # folder by the resume scan; nothing per file after that.
        self.assertLessEqual(len(looks), len(files) + 3 + 2)
        self.assertEqual(len(tree(out)), len(files) + 4)

    def test_partial_files_in_folders_that_were_there_are_still_found(self):
        """(The old path: a partial file too small to resume from is cut
        and reused, not left behind.)"""
        src = os.path.abspath(self.mktemp())
        out = os.path.abspath(self.mktemp())
        top = os.path.basename(src)
        write(os.path.join(src, "d", "f"), b"new")
        write(os.path.join(out, top, "d", "f" + PARTIAL_SUFFIX), b"old partial")
        link, _, _, sd, rd = start_pair([src], out, clock=Clock())
        link.pump()
        self.successResultOf(rd)
        self.assertEqual(tree(out), {top: None, os.path.join(top, "d"): None, os.path.join(top, "d", "f"): b"new"})


class ReadWholeTests(SynchronousTestCase):
    def test_grew_and_shrank(self):
        from p2pft.transfer.manifest import FILE as FILE_KIND, Entry
        from p2pft.transfer.small import read_whole

        path = write(os.path.abspath(self.mktemp()), b"abc")
        self.assertEqual(read_whole(Entry("f", FILE_KIND, 3), path), b"abc")
        self.assertIn("changed after the transfer started",
                      str(self.assertRaises(TransferFailed, read_whole, Entry("f", FILE_KIND, 2), path)))
        self.assertIn("cannot read", str(self.assertRaises(TransferFailed, read_whole, Entry("f", FILE_KIND, 2),
                                                            path + ".missing")))

        real_read = os.read
        self.patch(os, "read", lambda fd, n: real_read(fd, n) + b"more")  # (only read_whole runs meanwhile)
        self.assertIn("grew", str(self.assertRaises(TransferFailed, read_whole, Entry("f", FILE_KIND, 3), path)))
        reads = iter([b"ab", b""])
        self.patch(os, "read", lambda fd, n: next(reads))
        self.assertIn("shrank", str(self.assertRaises(TransferFailed, read_whole, Entry("f", FILE_KIND, 3), path)))

