"""
The transfer layer's review after the restructure: what a hostile manifest
may make a receiver store (nodes and name bytes, not only entries), a
resume scan that one linked file does not stop, placing a file without
ever renaming a name we did not check, an interrupted placement, the
messages about a left-out file, and a probe that makes one file.
"""

from __future__ import annotations

import json
import os
import stat
import threading

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from p2pft.errors import Declined, TransferFailed, UnsafeName
from p2pft.transfer import Receiver, fsprobe, manifest, placing
from p2pft.transfer.manifest import DIR, FILE, PARTIAL_SUFFIX, Entry, ManifestChecker
from p2pft.transfer.names import POSIX, NameRules
from p2pft.transfer.records import DATA, ENTRIES, FILE as FILE_RECORD, FILE_END, HAVE, OFFER
from p2pft.transfer.resume import BLOCK, find_existing
from p2pft.transfer.store import OutputDir

from .files import without_proc_links, write
from .memlink import Link, accept, start_pair

WINDOWS = NameRules.where("win32", fold_case=True)


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class StoredManifestCapTests(SynchronousTestCase):
    """Issue 12 item 3: what a receiver stores is bounded per entry, not
    per byte the sender sends."""

    def receive(self, entries, rules=POSIX, **kw):
        out = self.mktemp()
        os.mkdir(out)
        asked = []
        receiver = Receiver(Link().b, Clock(), out, lambda offer: asked.append(offer) or False,
                            rules=rules, **kw)
        d = receiver.start()
        receiver.recordReceived(OFFER, dumps({"entries": len(entries), "files": 0, "bytes": 0}))
        for i in range(0, len(entries), 100):
            receiver.recordReceived(ENTRIES, dumps({"entries": entries[i:i + 100]}))
        return asked, d

    def test_folders_only_implied_count_against_the_node_cap(self):
        self.patch(manifest, "MAX_NODES", 1000)
        below = "/".join(f"c{j}" for j in range(99))
        # 9 entries of 101 new names each (100 implied folders): 909 names.
        entries = [[f"h{i}/{below}/f", "file", 1, 0o644, None] for i in range(9)]
        asked, d = self.receive(entries)
        self.assertEqual(len(asked), 1, "under the cap: the user is asked")
        self.failureResultOf(d, Declined)  # who said no
        asked, d = self.receive(entries + [[f"h9/{below}/f", "file", 1, 0o644, None]])
        message = str(self.failureResultOf(d, UnsafeName).value)
        self.assertEqual(asked, [], "refused before anyone is asked")
        self.assertIn("more than 1,000 files and folders, counting the folders its paths only imply", message)
        self.assertNotIn("\n", message)

    def test_a_sender_that_names_every_folder_stores_one_name_per_entry(self):
        self.patch(manifest, "MAX_NODES", 4)
        checker = ManifestChecker()
        for path, kind in (("a", DIR), ("a/b", DIR), ("a/b/c", FILE), ("a/d", FILE)):
            checker.add(Entry(path, kind, None if kind == DIR else 1))
        e = self.assertRaises(UnsafeName, checker.add, Entry("e", FILE, 1))
        self.assertIn("more than 4 files and folders", str(e))

    def test_long_names_count_against_the_name_byte_cap(self):
        self.patch(manifest, "MAX_STORED_NAME_BYTES", 10_000)
        entries = [["long", "dir", None, 0o755, None]] + [
            [f"long/{i:012d}" + "x" * 240, "file", 1, 0o644, None] for i in range(50)]
        asked, d = self.receive(entries)
        message = str(self.failureResultOf(d, UnsafeName).value)
        self.assertEqual(asked, [])
        self.assertIn("the offer's names take more than 10,000 bytes", message)

    def test_refused_paths_count_against_the_name_byte_cap(self):
        # Left out (--skip-unsafe), a refused entry keeps its offered path
        # for messages: that is stored too.
        self.patch(manifest, "MAX_STORED_NAME_BYTES", 10_000)
        entries = [[f"{i:04d}:" + "y" * 200, "file", 1, 0o644, None] for i in range(60)]
        entries.append(["fine", "file", 1, 0o644, None])
        asked, d = self.receive(entries, rules=WINDOWS, skip_unsafe=True)
        self.failureResultOf(d, UnsafeName)
        self.assertEqual(asked, [])


class ResumeScanTests(SynchronousTestCase):
    def test_a_linked_destination_does_not_stop_the_scan_of_later_files(self):
        root = os.path.abspath(self.mktemp())
        out, outside = os.path.join(root, "out"), os.path.join(root, "outside")
        os.makedirs(out)
        os.makedirs(outside)
        os.link(write(os.path.join(outside, "secret"), b"s" * 100), os.path.join(out, "a.txt"))
        write(os.path.join(out, "b.bin" + PARTIAL_SUFFIX), os.urandom(2 * BLOCK))
        checker = ManifestChecker()
        checker.add(Entry("a.txt", FILE, 100))
        checker.add(Entry("b.bin", FILE, 3 * BLOCK))
        found = find_existing(OutputDir(out), checker.entries, threading.Event())
        self.assertEqual(list(found), [1])
        self.assertEqual((found[1].complete, found[1].prefix.length), (False, 2 * BLOCK))


class PlaceTests(SynchronousTestCase):
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.src, self.out, self.outside = (os.path.join(root, d) for d in ("src", "out", "outside"))
        for d in (self.src, self.out, self.outside):
            os.makedirs(d)

    def test_overwrite_without_proc_never_renames_a_name_it_did_not_check(self):
        without_proc_links(self)
        write(os.path.join(self.out, "r.bin"), b"old")
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        f = out.open_partial("r.bin", 0)
        f.write(b"received")
        outside = write(os.path.join(self.outside, "secret"), b"outside")
        partial = os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX)
        checks = []
        real_check = placing.check_ours

        def check_then_swap(parent, name, ours, shown):
            real_check(parent, name, ours, shown)
            if not checks:  # right after the partial name was found to be ours
                os.link(partial, os.path.join(self.out, "kept"))  # ours keeps one link
                os.link(outside, os.path.join(self.out, "planted"))
                os.rename(os.path.join(self.out, "planted"), partial)
            checks.append(name)

        self.patch(placing, "check_ours", check_then_swap)
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=True)
        self.assertIn("was replaced by another file while receiving", str(e.exception))
        self.assertEqual(content(os.path.join(self.out, "r.bin")), b"old", "r.bin is untouched")
        self.assertEqual(os.stat(outside).st_nlink, 2, "only the planted name links the outside file")
        self.assertEqual(sorted(os.listdir(self.out)), ["kept", "r.bin", "r.bin" + PARTIAL_SUFFIX],
                         "no temporary name left behind")

    def test_a_placement_interrupted_before_the_partial_name_was_removed(self):
        data = os.urandom(BLOCK + 5)
        path = write(os.path.join(self.src, "r.bin"), data)
        dest = write(os.path.join(self.out, "r.bin"), data)
        os.link(dest, os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX))  # died before the unlink
        link, _, _, sd, rd = start_pair([path], self.out, clock=Clock())
        link.pump()
        result = self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual(result.skipped, len(data), "the complete file is recognised, not sent again")
        self.assertEqual(len(link.sent(HAVE)), 1)
        self.assertEqual(os.listdir(self.out), ["r.bin"])
        self.assertEqual(content(dest), data)
        self.assertEqual(os.stat(dest).st_nlink, 1)


    def test_an_unnamed_file_linked_meanwhile_is_not_placed(self):
        """Only a process of ours can give an unnamed file a name (through
        /proc/PID/fd); one that did is not moved into place."""
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        f = out.open_unnamed("r.bin", 0o644)
        if f is None:
            raise SkipTest("no O_TMPFILE here")
        os.pwrite(f.fileno(), b"received", 0)
        folder = os.open(self.outside, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, folder)
        # (linkat with AT_SYMLINK_FOLLOW: plain link() would link /proc's link itself.)
        os.link(f"/proc/self/fd/{f.fileno()}", "named", dst_dir_fd=folder, follow_symlinks=True)
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=False)
        self.assertIn("got another hard link while receiving", str(e.exception))
        self.assertEqual(os.listdir(self.out), [])

    def test_an_unnamed_file_made_with_its_final_mode_is_not_chmodded(self):
        """A small file is made with the mode it will have, so placing it
        changes no mode; where the umask takes bits the received file must
        keep (the owner's read and write), the mode is still set."""
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        probe = out.open_unnamed("probe")
        if probe is None:
            raise SkipTest("no O_TMPFILE here")
        probe.close()
        chmods = []
        real = os.fchmod
        self.patch(os, "fchmod", lambda fd, mode: chmods.append(mode) or real(fd, mode))
        for name, umask, mode in [("plain", 0o022, 0o644), ("tight", 0o277, 0o600)]:
            out.umask = umask
            f = out.open_unnamed(name, mode)
            os.pwrite(f.fileno(), name.encode(), 0)
            out.place(name, f, mode, None, overwrite=False)
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.out, name)).st_mode), mode)
            self.assertEqual(content(os.path.join(self.out, name)), name.encode())
        self.assertEqual(chmods, [0o600], "only the file whose umask took its owner's write bit")
        # Replacing a file still checks, by inode, that what lands is ours.
        f = out.open_unnamed("plain", 0o600)
        os.pwrite(f.fileno(), b"new", 0)
        out.place("plain", f, 0o600, None, overwrite=True)
        self.assertEqual(content(os.path.join(self.out, "plain")), b"new")
        self.assertEqual(sorted(os.listdir(self.out)), ["plain", "tight"])

class LeftOutEntryTests(SynchronousTestCase):
    def test_messages_name_a_left_out_file_by_its_offered_path(self):
        out = self.mktemp()
        os.mkdir(out)
        names = []
        receiver = Receiver(Link().b, Clock(), out, accept, rules=WINDOWS, skip_unsafe=True,
                            progress=lambda done, total, name: names.append(name))
        d = receiver.start()
        for kind, payload in [
                (OFFER, dumps({"entries": 2, "files": 2, "bytes": 4})),
                (ENTRIES, dumps({"entries": [["x:y", "file", 3, 0o644, None], ["ok", "file", 1, 0o644, None]]})),
                (FILE_RECORD, dumps({"file": 0, "offset": 0})), (DATA, b"ab"), (FILE_END, dumps({"size": 2}))]:
            receiver.recordReceived(kind, payload)
        message = str(self.failureResultOf(d, TransferFailed).value)
        self.assertIn("size mismatch for x:y: offered 3, received 2", message)
        self.assertEqual(names, ["x:y"])
        self.assertEqual(os.listdir(out), [])


class ProbeTests(SynchronousTestCase):
    def test_the_probe_makes_one_file_only(self):
        made = []
        real = fsprobe._collide
        self.patch(fsprobe, "_collide", lambda fd, name, other: made.append(name) or real(fd, name, other))
        out = self.mktemp()
        os.mkdir(out)
        d = OutputDir(out)
        self.addCleanup(d.close)
        self.assertIn(d.fold_case(), (True, False))
        self.assertEqual(made, ["p2pft-case"])
        self.assertEqual(os.listdir(out), [])
