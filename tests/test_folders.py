"""
Folders and many files: how a sender builds its manifest, how a receiver
checks one, and whole trees over an in-memory channel.
"""

import json
import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import manifest
from p2pft.errors import Declined, ScanError, TransferFailed, UnsafeName
from p2pft.transfer.manifest import DIR, FILE, Entry, ManifestChecker
from p2pft.transfer.scan import scan
from p2pft.transfer import Receiver
from p2pft.transfer.records import ENTRIES, MAX_CONTROL

from .files import write
from .memlink import Link, accept, start_pair, tree


class ScanTests(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.mkdir(self.root)
        self.notices = []

    def scan(self, *names, **kw):
        return scan([os.path.join(self.root, n) for n in names], notice=self.notices.append, **kw)

    def test_folders_recursively_in_name_order_with_empty_folders(self):
        write(os.path.join(self.root, "photos", "b.jpg"), b"bb")
        write(os.path.join(self.root, "photos", "a.jpg"), b"a")
        os.makedirs(os.path.join(self.root, "photos", "empty"))
        write(os.path.join(self.root, "notes.txt"), b"n")
        m = self.scan("photos", "notes.txt")
        self.assertEqual([(e.path, e.kind, e.size) for e in m.entries], [
            ("photos", DIR, None), ("photos/a.jpg", FILE, 1), ("photos/b.jpg", FILE, 2),
            ("photos/empty", DIR, None), ("notes.txt", FILE, 1)])
        self.assertEqual(m.sources[1], os.path.join(self.root, "photos", "a.jpg"))
        self.assertEqual((m.checker.files, m.checker.dirs, m.checker.bytes), (3, 2, 4))
        self.assertEqual(m.checker.top, ["photos/", "notes.txt"])

    def test_trailing_slash_and_dot(self):
        os.makedirs(os.path.join(self.root, "photos"))
        self.assertEqual(self.scan("photos/").entries[0].path, "photos")

    def test_symlinks_inside_skipped_unless_asked(self):
        write(os.path.join(self.root, "target.txt"), b"t")
        os.makedirs(os.path.join(self.root, "d"))
        os.symlink(os.path.join(self.root, "target.txt"), os.path.join(self.root, "d", "link"))
        os.symlink("/nonexistent/nowhere", os.path.join(self.root, "d", "broken"))
        self.assertEqual([e.path for e in self.scan("d").entries], ["d"])
        self.assertEqual(len(self.notices), 2)
        self.assertIn("skipping symbolic link", self.notices[1])
        followed = self.scan("d", follow_symlinks=True)
        self.assertEqual([(e.path, e.size) for e in followed.entries], [("d", None), ("d/link", 1)])
        self.assertIn("points nowhere", self.notices[-1])

    def test_symlink_loop_is_not_followed_forever(self):
        os.makedirs(os.path.join(self.root, "d", "sub"))
        os.symlink(os.path.join(self.root, "d"), os.path.join(self.root, "d", "sub", "up"))
        m = self.scan("d", follow_symlinks=True)
        self.assertEqual([e.path for e in m.entries], ["d", "d/sub"])
        self.assertIn("links back to a folder above it", self.notices[-1])

    def test_named_symlink_is_followed(self):
        write(os.path.join(self.root, "real.txt"), b"abc")
        os.symlink(os.path.join(self.root, "real.txt"), os.path.join(self.root, "alias.txt"))
        self.assertEqual([(e.path, e.size) for e in self.scan("alias.txt").entries], [("alias.txt", 3)])

    def test_special_files_skipped(self):
        os.makedirs(os.path.join(self.root, "d"))
        os.mkfifo(os.path.join(self.root, "d", "fifo"))
        self.assertEqual([e.path for e in self.scan("d").entries], ["d"])
        self.assertIn("not a regular file or folder", self.notices[0])
        self.assertRaises(ScanError, self.scan, "d/fifo")

    def test_problems_reported_before_anything_is_sent(self):
        write(os.path.join(self.root, "a", "x"))
        write(os.path.join(self.root, "b", "x"))
        write(os.path.join(self.root, "d", "X"))
        write(os.path.join(self.root, "d", "x"))
        write(os.path.join(self.root, "bad", "new\nline"))
        cases = [(("missing",), "no such file or folder"),
                 (("a/x", "b/x"), "offered twice"),
                 (("bad",), "control or formatting"),
                 (("a", "a"), "offered twice")]
        for names, fragment in cases:
            e = self.assertRaises(ScanError, self.scan, *names)
            self.assertIn(fragment, str(e))
        e = self.assertRaises(ScanError, scan, ["/"])
        self.assertIn("cannot send the root folder", str(e))
        # Legal here, refused only where case is ignored: one notice, not an error.
        self.assertEqual(len(self.scan("d").entries), 3)
        self.assertIn("1 name would be refused by a receiver on Windows", self.notices[-1])

    def test_unreadable_file_reported_before_anything_is_sent(self):
        path = write(os.path.join(self.root, "d", "secret"), b"s")
        self.patch(manifest.os, "access", lambda p, mode: p != path)  # root can read anything
        e = self.assertRaises(ScanError, self.scan, "d")
        self.assertIn("secret: permission denied", str(e))

    def test_undecodable_name(self):
        os.makedirs(os.path.join(self.root, "d"))
        open(os.path.join(os.fsencode(self.root), b"d", b"caf\xe9"), "w").close()
        e = self.assertRaises(ScanError, self.scan, "d")
        self.assertIn("not valid UTF-8", str(e))


class CheckerTests(SynchronousTestCase):
    def check(self, *entries):
        checker = ManifestChecker()
        for path, kind in entries:
            checker.add(Entry(path, kind, 1 if kind == FILE else None))
        return checker

    def test_clashes_refused(self):
        for entries in ([("a", FILE), ("A", FILE)],
                        [("r\u00e9", FILE), ("re\u0301".lower().upper(), FILE)],
                        [("d", DIR), ("d", DIR)],
                        [("f", FILE), ("f/x", FILE)],
                        [("d/x", FILE), ("d", FILE)],
                        [("Stra\u00dfe", FILE), ("STRASSE", FILE)]):
            self.assertRaises(UnsafeName, self.check, *entries)

    def test_implied_folders_and_summary(self):
        checker = self.check(("d/x", FILE), ("d", DIR), ("e", FILE))
        self.assertEqual((checker.top, checker.top_count, checker.files, checker.dirs), (["d/", "e"], 2, 2, 1))

    def test_entry_limit(self):
        checker = ManifestChecker(max_entries=2)
        checker.add(Entry("a", FILE, 1))
        checker.add(Entry("b", FILE, 1))
        self.assertRaises(UnsafeName, checker.add, Entry("c", FILE, 1))


class FolderTransferTests(SynchronousTestCase):
    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.mkdir(self.src)
        os.mkdir(self.out)

    def make_tree(self):
        write(os.path.join(self.src, "photos", "2024", "\u65e5\u672c.jpg"), os.urandom(5000))
        write(os.path.join(self.src, "photos", "caf\u00e9 \U0001f600.png"), os.urandom(300_000))
        write(os.path.join(self.src, "photos", "empty.txt"))
        os.makedirs(os.path.join(self.src, "photos", "nothing", "deeper"))
        script = write(os.path.join(self.src, "photos", "run.sh"), b"#!/bin/sh\n")
        os.chmod(script, 0o755)
        write(os.path.join(self.src, "a.iso"), os.urandom(1_000_000))
        return [os.path.join(self.src, "a.iso"), os.path.join(self.src, "photos")]

    def send(self, paths, **kw):
        link, sender, receiver, sd, rd = start_pair(paths, self.out, **kw)
        link.pump()
        return link, receiver, sd, rd

    def test_nested_tree_with_empty_folders_unicode_and_modes(self):
        link, receiver, sd, rd = self.send(self.make_tree())
        result = self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual(tree(self.out), tree(self.src))
        self.assertEqual((result.files, result.size, result.path), (5, 1_305_010, self.out))
        self.assertEqual(receiver.offer.top, ["a.iso", "photos/"])
        self.assertTrue(os.stat(os.path.join(self.out, "photos", "run.sh")).st_mode & stat.S_IXUSR)
        self.assertFalse(os.stat(os.path.join(self.out, "a.iso")).st_mode & stat.S_IXUSR)
        self.assertEqual(int(os.stat(os.path.join(self.out, "a.iso")).st_mtime),
                         int(os.stat(os.path.join(self.src, "a.iso")).st_mtime))
        self.assertFalse([n for n in tree(self.out) if n.endswith(manifest.PARTIAL_SUFFIX)])

    def test_ten_thousand_files(self):
        root = os.path.join(self.src, "many")
        for d in range(100):
            os.makedirs(os.path.join(root, f"d{d:03}"))
            for f in range(100):
                with open(os.path.join(root, f"d{d:03}", f"file-{f:03}.txt"), "wb") as fh:
                    fh.write(b"%d/%d\n" % (d, f) * (f % 7))
        link, receiver, sd, rd = self.send([root])
        result = self.successResultOf(rd)
        self.assertEqual(result.files, 10_000)
        self.assertEqual(tree(os.path.join(self.out, "many")), tree(root))
        # The manifest went out in many small messages, not one huge one.
        entries = link.sent(ENTRIES)
        self.assertGreater(len(entries), 10)
        self.assertLessEqual(max(map(len, entries)), MAX_CONTROL)
        self.assertEqual(sum(len(json.loads(p)["entries"]) for p in entries), 10_101)

    def test_existing_folder_is_merged_into(self):
        write(os.path.join(self.out, "photos", "mine.txt"), b"keep me")
        self.successResultOf(self.send(self.make_tree())[3])
        with open(os.path.join(self.out, "photos", "mine.txt"), "rb") as f:
            self.assertEqual(f.read(), b"keep me")

    def test_file_where_a_folder_goes_is_refused_before_asking(self):
        write(os.path.join(self.out, "photos"), b"a file")
        asked = []
        link, receiver, sd, rd = self.send(self.make_tree(), decide=asked.append)
        f = self.failureResultOf(rd, Declined)
        self.assertIn("photos already exists and is not a folder", str(f.value))
        self.assertEqual(asked, [])
        self.failureResultOf(sd, TransferFailed)

    def test_symlinked_folder_in_the_output_is_never_written_through(self):
        outside = os.path.abspath(self.mktemp())
        os.mkdir(outside)
        os.symlink(outside, os.path.join(self.out, "photos"))
        link, receiver, sd, rd = self.send(self.make_tree())
        f = self.failureResultOf(rd, Declined)
        self.assertIn("never writes through symbolic links", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(outside), [])

    def test_symlink_planted_while_receiving_is_not_followed(self):
        # The receiver checked the folder, then someone swaps it for a link.
        outside = os.path.abspath(self.mktemp())
        os.mkdir(outside)
        link, sender, receiver, sd, rd = start_pair(self.make_tree(), self.out, clock=Clock())
        link.pump(data_limit=1)
        os.rename(os.path.join(self.out, "photos"), os.path.join(self.out, "moved"))
        os.symlink(outside, os.path.join(self.out, "photos"))
        link.pump()
        for d in (sd, rd):  # failing is fine; writing through the link is not
            d.addErrback(lambda f: f.trap(TransferFailed))
        self.assertEqual(os.listdir(outside), [])

    def test_hostile_sender_cannot_escape_via_entries(self):
        link = Link()
        receiver = Receiver(link.b, Clock(), self.out, accept)
        d = receiver.start()
        for entry in (["d", "dir", None, 0o755, None], ["d/../../x", "file", 1, 0o644, None]):
            receiver.recordReceived(1, json.dumps({"entries": 2}).encode()) if entry[0] == "d" else None
            receiver.recordReceived(ENTRIES, json.dumps({"entries": [entry]}).encode())
        self.failureResultOf(d, UnsafeName)
        self.assertEqual(os.listdir(self.out), [])
