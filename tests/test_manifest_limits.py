"""
What a big or awkward manifest costs and how its names are judged (issue 12,
items 3-5): the receiver's memory per entry and its entry cap, name rules
that depend on where the files land, all refused names at once and
--skip-unsafe, and the messages and counts a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import tracemalloc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import fsprobe
from p2pft.errors import Declined, TransferFailed, UnsafeName
from p2pft.transfer.manifest import MAX_ENTRIES, PARTIAL_SUFFIX, ManifestChecker
from p2pft.transfer.scan import scan
from p2pft.transfer.names import PORTABLE, POSIX, NameRules, component_problem, safe_path
from p2pft.transfer import Receiver, Sender
from p2pft.transfer.records import DATA, ENTRIES, FILE, FILE_END, OFFER

from .files import write
from .memlink import Link, accept, tree


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def entries_records(entries):
    return [(OFFER, dumps({"entries": len(entries), "files": 0, "bytes": 0})),
            (ENTRIES, dumps({"entries": entries}))]


def file_entry(path, size=1):
    return [path, "file", size, 0o644, None]


WINDOWS = NameRules.where("win32", fold_case=True)
MACOS = NameRules.where("darwin", fold_case=True)
LINUX = NameRules.where("linux", fold_case=False)


class NameRuleTests(SynchronousTestCase):
    """The rules as pure functions, for each platform flavour."""

    LEGAL_ON_LINUX = ("aux.c", "con.h", "nul.txt", "name.", "x:y", "x.txt:stream", "a<b>", 'say"hi"',
                      "pipe|", "what?", "star*", "trailing ", "COM1.log", "C:evil", "lpt9")

    def test_flavours(self):
        self.assertEqual((LINUX.windows, LINUX.fold_case), (False, False))
        self.assertEqual((MACOS.windows, MACOS.fold_case), (False, True))
        self.assertEqual((WINDOWS.windows, WINDOWS.fold_case), (True, True))
        # Unknown folding (the probe could not tell): assume it folds.
        self.assertTrue(NameRules.where("linux", None).fold_case)

    def test_legal_on_linux_accepted_there_refused_on_windows(self):
        for name in self.LEGAL_ON_LINUX:
            self.assertEqual(safe_path(f"d/{name}", LINUX), f"d/{name}")
            self.assertEqual(safe_path(name, MACOS), name)
            e = self.assertRaises(UnsafeName, safe_path, f"d/{name}", WINDOWS)
            self.assertIn("(Windows)", str(e))

    def test_windows_reasons(self):
        self.assertIn("drive letter", component_problem("c:", WINDOWS))
        self.assertIn(":", component_problem("x.txt:stream", WINDOWS))
        for ch in '<>"|?*':
            self.assertIsNotNone(component_problem(f"a{ch}b", WINDOWS), ch)
        self.assertIn("device name", component_problem("AUX.tar.gz", WINDOWS))
        self.assertIn("dot or space", component_problem("name.", WINDOWS))

    def test_universal_rules_everywhere(self):
        for rules in (LINUX, MACOS, WINDOWS):
            for bad in ("..", "a/../b", "a\\b", "x\x1by", "bidi\u202etxt", "a" * 256, "~", "d/~",
                        "x" + PARTIAL_SUFFIX, "surrogate\udc80", "/".join(["d"] * 200), ""):
                self.assertRaises(UnsafeName, safe_path, bad, rules)
            for good in ("~user", "a~", ".bashrc", "r\u00e9sum\u00e9.pdf", "-rf"):
                self.assertEqual(safe_path(good, rules), good)

    def test_case_clashes_only_where_the_folder_folds_case(self):
        kernel = ["net", "net/xt_TCPMSS.c", "net/xt_tcpmss.c"]
        checker = ManifestChecker(rules=LINUX)
        for path in kernel:
            checker.offer(file_entry(path) if "." in path else [path, "dir", None, 0o755, None])
        self.assertEqual((checker.refused, checker.files), (0, 2))
        for rules in (MACOS, WINDOWS):
            checker = ManifestChecker(rules=rules)
            for path in kernel:
                checker.offer(file_entry(path) if "." in path else [path, "dir", None, 0o755, None])
            self.assertEqual(checker.refused, 1)
            self.assertIn("'net/xt_tcpmss.c' is offered twice", checker.refused_names[0])

    def test_unicode_forms_clash_everywhere(self):
        checker = ManifestChecker(rules=LINUX)
        checker.offer(file_entry("caf\u00e9"))
        checker.offer(file_entry("cafe\u0301"))
        self.assertEqual(checker.refused, 1)


class ProbeTests(SynchronousTestCase):
    def test_probe_leaves_nothing_behind(self):
        out = self.mktemp()
        os.mkdir(out)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        folding = fsprobe.probe(fd)
        self.assertIn(folding.case, (True, False))
        self.assertEqual(os.listdir(out), [])

    def test_probe_of_a_read_only_folder_is_unknown(self):
        out = self.mktemp()
        os.mkdir(out)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.patch(fsprobe.os, "mkdir", lambda *a, **kw: (_ for _ in ()).throw(PermissionError(13, "no")))
        self.assertEqual(fsprobe.probe(fd), fsprobe.Folding(None))


class CaseFoldingMountTests(SynchronousTestCase):
    """A real case-insensitive folder: a vfat or ext4 -O casefold image on a
    loop device (root only)."""

    def mount(self):
        if os.geteuid() != 0:
            raise self.skipTest("needs root to mount a loop device")
        work = tempfile.mkdtemp(prefix="p2pft-fold-")
        self.addCleanup(shutil.rmtree, work, True)
        image, point = os.path.join(work, "fs.img"), os.path.join(work, "mnt")
        os.mkdir(point)
        tried = []
        for mkfs, casefold_dir in ((["mkfs.vfat", image], False),
                                   (["mkfs.ext4", "-q", "-O", "casefold", image], True)):
            if shutil.which(mkfs[0]) is None:
                tried.append(f"{mkfs[0]} missing")
                continue
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            made = subprocess.run(mkfs, capture_output=True)
            mounted = made.returncode == 0 and subprocess.run(
                ["mount", "-o", "loop", image, point], capture_output=True).returncode == 0
            if not mounted:
                tried.append(f"{mkfs[0]}: this kernel cannot make or mount it")
                continue
            self.addCleanup(subprocess.run, ["umount", point], capture_output=True)
            if casefold_dir:
                os.mkdir(os.path.join(point, "ci"))
                subprocess.run(["chattr", "+F", os.path.join(point, "ci")], check=True)
                return os.path.join(point, "ci")
            return point
        raise self.skipTest("no case-insensitive file system to mount: " + "; ".join(tried))

    def test_probe_and_receiver_on_a_folding_mount(self):
        out = self.mount()
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.assertTrue(fsprobe.probe(fd).case)
        link = Link()
        receiver = Receiver(link.b, Clock(), out, accept)
        d = receiver.start()
        for kind, payload in entries_records([file_entry("Case.txt"), file_entry("case.txt")]):
            receiver.recordReceived(kind, payload)
        self.assertIn("offered twice", str(self.failureResultOf(d, UnsafeName).value))


class ReceiverNameTests(SynchronousTestCase):
    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        os.mkdir(self.src)
        os.mkdir(self.out)

    def receiver(self, rules, **kw):
        self.link = Link()
        receiver = Receiver(self.link.b, Clock(), self.out, accept, rules=rules, **kw)
        return receiver, receiver.start()

    def test_linux_receiver_takes_names_legal_on_linux(self):
        names = ["aux.c", "con.h", "nul.txt", "name.", "x:y", "Case.txt", "case.txt"]
        for name in names:
            write(os.path.join(self.src, "t", name), name.encode())
        notices = []
        manifest = scan([os.path.join(self.src, "t")], notice=notices.append)
        self.assertEqual(len(notices), 1)  # the sender's one warning, before connecting
        self.assertIn("6 names would be refused by a receiver on Windows", notices[0])
        link = Link()
        sender = Sender(link.a, Clock(), manifest)
        receiver = Receiver(link.b, Clock(), self.out, accept, rules=LINUX)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        self.successResultOf(sd)
        self.assertEqual(self.successResultOf(rd).files, 7)
        self.assertEqual(sorted(os.listdir(os.path.join(self.out, "t"))), sorted(names))

    def test_all_refused_names_listed_at_once(self):
        receiver, d = self.receiver(WINDOWS)
        bad = [file_entry(f"d/aux{i}.c".replace("aux0", "aux")) for i in range(1)] + \
            [file_entry(f"d/x{i}:y") for i in range(29)] + [file_entry("d/fine.txt")]
        for kind, payload in entries_records(bad):
            receiver.recordReceived(kind, payload)
        message = str(self.failureResultOf(d, UnsafeName).value)
        self.assertIn("30 offered names cannot be written on Windows", message)
        self.assertIn("'d/aux.c' is a reserved device name", message)
        self.assertIn("'d/x18:y'", message)
        self.assertNotIn("'d/x19:y'", message)
        self.assertIn("and 10 more", message)
        self.assertIn("--skip-unsafe", message)
        self.assertEqual(os.listdir(self.out), [])

    def test_skip_unsafe_receives_the_rest_and_reports_the_rest(self):
        for name, data in (("t/good.txt", b"good"), ("t/aux.c", b"device" * 1000), ("t/x:y", b"stream"),
                           ("t/aux/inside.txt", b"under a refused folder"), ("t/sub/ok", b"ok"),
                           ("t/Sub/clash", b"clash")):
            write(os.path.join(self.src, name), data)
        link = Link()
        sender = Sender(link.a, Clock(), scan([os.path.join(self.src, "t")]))
        receiver = Receiver(link.b, Clock(), self.out, accept, rules=WINDOWS, skip_unsafe=True)
        offers = []
        receiver._decide = lambda offer: offers.append(offer) or True
        rd, sd = receiver.start(), sender.start()
        link.pump()
        sent = self.successResultOf(sd)  # the ACK matched the END exactly
        got = self.successResultOf(rd)
        self.assertEqual(tree(self.out), {"t": None, "t/good.txt": b"good", "t/Sub": None, "t/Sub/clash": b"clash"})
        # Left out: aux.c, x:y, aux/ and what is inside it, sub/ (it clashes with Sub/, which
        # comes first in name order) and what is inside it.
        self.assertEqual((offers[0].refused, got.refused, got.files, got.size), (6, 6, 2, 9))
        self.assertEqual(len(offers[0].refused_names), 6)
        self.assertEqual((sent.files, sent.size), (6, 4 + 6000 + 6 + 22 + 2 + 5))

    def test_skip_unsafe_never_touches_a_refused_name(self):
        os.symlink("/nonexistent", os.path.join(self.out, "x:y"))
        receiver, d = self.receiver(WINDOWS, skip_unsafe=True)
        for kind, payload in entries_records([file_entry("x:y", 3), file_entry("ok", 0)]) + [
                (FILE, dumps({"file": 0, "offset": 0})), (DATA, b"abc"), (FILE_END, dumps({"size": 3}))]:
            receiver.recordReceived(kind, payload)
        self.assertNoResult(d)
        self.assertEqual(sorted(os.listdir(self.out)), ["x:y"])
        self.assertTrue(os.path.islink(os.path.join(self.out, "x:y")))


class ManifestMemoryTests(SynchronousTestCase):
    def test_receiver_memory_per_entry_is_small(self):
        """A realistic tree: folders of 100 files, names of about 20
        characters, 4 deep.  The old receiver kept about 450 bytes per
        entry; the bound here is 120."""
        n = 20_000
        entries = []
        for f in range(n // 100):
            folder = f"project_root/module_{f // 20:04d}/component_{f:05d}"
            entries.append([folder, "dir", None, 0o755, 1_700_000_000])
            entries += [[f"{folder}/source_file_{i:04d}.c", "file", 1000 + i, 0o644, 1_700_000_000]
                        for i in range(99)]
        payloads = [dumps({"entries": entries[i:i + 300]}) for i in range(0, len(entries), 300)]
        out = self.mktemp()
        os.mkdir(out)
        asked = []
        receiver = Receiver(Link().b, Clock(), out, lambda offer: asked.append(offer) or False, rules=LINUX)
        done = receiver.start()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        receiver.recordReceived(OFFER, dumps({"entries": len(entries), "files": 0, "bytes": 0}))
        for payload in payloads:
            receiver.recordReceived(ENTRIES, payload)
        held = tracemalloc.get_traced_memory()[0] - before
        self.assertEqual(asked[0].files, n - n // 100)
        self.assertLess(held / n, 120)
        self.failureResultOf(done, Declined)

    def test_more_entries_than_a_receiver_holds_is_refused_up_front(self):
        self.assertLessEqual(MAX_ENTRIES, 2_000_000)
        out = self.mktemp()
        os.mkdir(out)
        receiver = Receiver(Link().b, Clock(), out, accept)
        d = receiver.start()
        receiver.recordReceived(OFFER, dumps({"entries": 5_000_000, "files": 5_000_000, "bytes": 0}))
        message = str(self.failureResultOf(d, Declined).value)
        self.assertIn("5,000,000 entries", message)
        self.assertIn(f"at most {MAX_ENTRIES:,}", message)


class MessageTests(SynchronousTestCase):
    def test_backslash_escaped_once(self):
        e = self.assertRaises(UnsafeName, safe_path, "C:\\x", PORTABLE)
        self.assertIn("'C:\\\\x'", str(e))  # shown as C:\\x: one escape, not two
        self.assertNotIn("\\\\\\\\", str(e))

    def test_size_mismatch_does_not_claim_the_data_is_kept(self):
        out = self.mktemp()
        os.mkdir(out)
        link = Link()
        receiver = Receiver(link.b, Clock(), out, accept, rules=POSIX)
        d = receiver.start()
        for kind, payload in entries_records([file_entry("a", 2), file_entry("b", 5)]) + [
                (FILE, dumps({"file": 0, "offset": 0})), (DATA, b"ok"), (FILE_END, dumps({"size": 2})),
                (FILE, dumps({"file": 1, "offset": 0})), (DATA, b"abc"), (FILE_END, dumps({"size": 3}))]:
            receiver.recordReceived(kind, payload)
        message = str(self.failureResultOf(d, TransferFailed).value)
        self.assertIn("size mismatch for b", message)
        self.assertNotIn("the data received so far is kept", message)
        self.assertIn("its partial data was deleted; the files received before it are kept", message)
        self.assertEqual(sorted(os.listdir(out)), ["a"])

    def test_identical_file_counts_as_skipped_not_resumed(self):
        src = os.path.abspath(self.mktemp())
        out = os.path.abspath(self.mktemp())
        os.mkdir(out)
        write(src, b"same")
        write(os.path.join(out, os.path.basename(src)), b"same")
        link = Link()
        sender = Sender(link.a, Clock(), scan([src]))
        receiver = Receiver(link.b, Clock(), out, accept, rules=POSIX)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        for result in (self.successResultOf(rd), self.successResultOf(sd)):
            self.assertEqual((result.size, result.skipped, result.resumed), (4, 4, 0))
