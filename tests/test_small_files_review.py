"""
A hostile review of small files sent whole (FILES, L{p2pft.transfer.small}):
a sender that forges FILES records, a local user racing the receiver in
its output folder, the resume scan's folder shortcut, what is counted, and
a sender whose files change under it.  Each test is one attack; those that
found a bug say so.
"""

from __future__ import annotations

import errno
import io
import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.errors import TransferFailed
from p2pft.transfer import Receiver, Sender, resume, sink, store
from p2pft.transfer.manifest import PARTIAL_SUFFIX
from p2pft.transfer.names import NameRules
from p2pft.transfer.receiver import StdoutReceiver
from p2pft.transfer.records import ACCEPT, ACK, END, FILE, FILES, HAVE
from p2pft.transfer.scan import scan
from p2pft.transfer.small import BATCH_FILES, SMALL_FILE, pack, unpack

from .files import write
from .memlink import Link, accept, start_pair, tree


def files_sent(link) -> list[list[int]]:
    return [[index for index, _ in unpack(p)] for p in link.sent(FILES)]


class Base(SynchronousTestCase):
    def setUp(self):
        self.src = os.path.abspath(self.mktemp())
        self.out = os.path.abspath(self.mktemp())
        self.outside = os.path.abspath(self.mktemp())  # what must never be touched
        os.makedirs(self.out)
        os.makedirs(self.outside)
        self.top = os.path.basename(self.src)

    def folder(self, sizes: dict[str, int]) -> dict[str, bytes]:
        files = {name: os.urandom(size) for name, size in sizes.items()}
        for name, data in files.items():
            write(os.path.join(self.src, name), data)
        return files

    def dest(self, *parts) -> str:
        return os.path.join(self.out, self.top, *parts)

    def forging(self, link, forge):
        """Have C{forge(kind, data, send)} send in place of the sender."""
        send = link.a.send
        link.a.send = lambda kind, data=b"": forge(kind, data, send)


class ForgedRecordsTests(Base):
    """A hostile sender's FILES records: each is a clear one-line protocol
    error, and nothing is written for it."""

    def setUp(self):
        super().setUp()
        self.folder({"a": 3, "b": 4, "c": SMALL_FILE + 1})

    def forged(self, payload: bytes, written=(), when=(FILES, FILE)) -> str:
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        done = []

        def forge(kind, data, send):
            if kind in when and not done:
                done.append(kind)
                kind, data = FILES, payload
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(sorted(tree(self.dest())), sorted(written))
        self.assertNotIn("\n", error)
        return error

    def test_an_index_past_the_manifest(self):
        self.assertIn("files out of order", self.forged(pack([(0xFFFFFFFF, b"")])))

    def test_a_size_past_the_record(self):
        """u32 size 4 GiB - 1 in a short record: cut short, nothing allocated."""
        self.assertIn("FILES cut short", self.forged(b"\0\0\0\1\xff\xff\xff\xffzzz"))

    def test_a_file_offered_bigger_than_a_small_file(self):
        """The file offered as 64 KiB + 1 sent whole: refused, and the
        error says why (it said "size mismatch ... offered 65537, received
        65537 bytes", which contradicts itself)."""
        # Sent whole in place of the FILE of c (a and b went first).
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        big = os.urandom(SMALL_FILE + 1)

        def forge(kind, data, send):
            if kind == FILE and json.loads(data)["file"] == 3:
                return send(FILES, pack([(3, big)]))
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertIn("too big to be sent whole", error)
        self.assertNotIn("size mismatch", error)
        self.assertFalse(os.path.exists(self.dest("c")))

    def test_files_inside_a_file(self):
        """A FILES record between a FILE and its FILE_END."""
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())

        def forge(kind, data, send):
            send(kind, data)
            if kind == FILE:
                send(FILES, pack([(1, b"zzz")]))
        self.forging(link, forge)
        link.pump()
        self.assertIn("unexpected FILES in state receiving", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)

    def test_files_before_accept(self):
        answer = defer.Deferred()
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock(), decide=lambda o: answer)
        link.pump()
        self.assertEqual(receiver.state, Receiver.State.DECIDING)
        receiver.recordReceived(FILES, pack([(1, b"zzz")]))
        link.pump()
        self.assertIn("unexpected FILES in state deciding", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertFalse(os.path.exists(self.dest()))

    def test_files_after_end(self):
        """Once END was taken the receiver is closing: a FILES record is
        ignored, nothing more is written."""
        os.unlink(os.path.join(self.src, "c"))
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())

        def forge(kind, data, send):
            send(kind, data)
            if kind == END:
                send(FILES, pack([(1, b"zzz")]))
        self.forging(link, forge)
        link.pump()
        self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual(sorted(tree(self.dest())), ["a", "b"])

    def test_to_a_stdout_receiver(self):
        """Standard output takes no FILES: its ACCEPT says {}, and a FILES
        record anyway is a protocol error, nothing written."""
        src = write(os.path.abspath(self.mktemp()), b"abc")
        link, out = Link(), io.BytesIO()
        clock = Clock()
        receiver = StdoutReceiver(link.b, clock, out, accept)
        sender = Sender(link.a, clock, scan([src]))
        rd, sd = receiver.start(), sender.start()

        def forge(kind, data, send):
            if kind == FILES:
                raise AssertionError("FILES to a receiver that said {}")
            if kind == FILE:
                kind, data = FILES, pack([(0, b"abc")])
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        self.assertEqual(json.loads(link.sent(ACCEPT)[0]), {})
        self.assertIn("unexpected FILES", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(out.getvalue(), b"")

    def test_a_file_the_receiver_has_complete(self):
        """The receiver has an identical copy (HAVE complete) but the sender
        sends it whole anyway: refused, the copy untouched (as FILE
        {offset: 0} would be)."""
        os.unlink(os.path.join(self.src, "c"))
        start_pair([self.src], self.out, clock=Clock())[0].pump()
        before = os.stat(self.dest("a"))
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())

        def forge(kind, data, send):
            if kind == FILE and json.loads(data) == {"file": 1, "skip": True}:
                kind, data = FILES, pack([(1, b"!!!")])
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        self.assertEqual(len(link.sent(HAVE)), 2)
        self.assertIn("already exists with other content", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        with open(self.dest("a"), "rb") as f:
            self.assertEqual(f.read(), open(os.path.join(self.src, "a"), "rb").read())
        self.assertEqual(os.stat(self.dest("a")).st_ino, before.st_ino)


class LeftOutTests(Base):
    """--skip-unsafe: a left-out file sent whole is dropped, and counted as
    a left-out file sent one at a time is."""

    def run_skip_unsafe(self, whole: bool):
        files = self.folder({"ok1": 5, "bad:name": 7, "ok2": 11, "d/x:y": 13, "d/ok3": 17})
        self.out = os.path.abspath(self.mktemp())
        os.makedirs(self.out)
        link, clock = Link(), Clock()
        receiver = Receiver(link.b, clock, self.out, accept, skip_unsafe=True,
                            rules=NameRules(windows=True, fold_case=False))
        if not whole:
            receiver._dest.takes_whole = False
        sender = Sender(link.a, clock, scan([self.src]))
        rd, sd = receiver.start(), sender.start()
        link.pump()
        return files, link, self.successResultOf(rd), self.successResultOf(sd)

    def test_counted_as_one_at_a_time(self):
        files, link, got, sent = self.run_skip_unsafe(whole=True)
        self.assertEqual(sum(map(len, files_sent(link))), 5)
        _, link1, got1, sent1 = self.run_skip_unsafe(whole=False)
        self.assertEqual(link1.sent(FILES), [])
        for r, r1 in ((got, got1), (sent, sent1)):
            self.assertEqual((r.size, r.files, r.refused), (r1.size, r1.files, r1.refused))
        self.assertEqual((got.size, got.refused), (5 + 11 + 17, 2))
        self.assertEqual(sent.size, sum(map(len, files.values())))
        self.assertEqual(json.loads(link.sent(ACK)[0])["bytes"], sent.size)
        self.assertEqual(sorted(tree(self.dest())), ["d", "d/ok3", "ok1", "ok2"])


class LocalRaceTests(Base):
    """A local user who can make entries in the output folder, racing the
    receiver: nothing is written through a link, nothing lands outside."""

    def after_prepare(self, attack):
        """Run C{attack()} once the receiver made its folders (just before
        its ACCEPT goes out)."""
        from p2pft.transfer.destination import DiskDestination
        real = DiskDestination.prepare

        def prepare(dest, checker, needed):
            real(dest, checker, needed)
            attack()
        self.patch(DiskDestination, "prepare", prepare)

    def test_a_link_planted_at_the_partial_name_in_a_folder_we_made(self):
        """The receiver skips the look for a partial file in a folder it
        made: a symlink planted there at NAME.p2pft-partial is neither
        written through nor moved into place, with or without O_TMPFILE."""
        files = self.folder({"d/f": 10, "d/g": 20})
        target = write(os.path.join(self.outside, "secret"), b"secret")

        def attack():
            os.symlink(target, self.dest("d", "f" + PARTIAL_SUFFIX))
        self.after_prepare(attack)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.successResultOf(rd)
        self.assertEqual(open(self.dest("d", "f"), "rb").read(), files["d/f"])
        self.assertFalse(os.path.islink(self.dest("d", "f")))
        self.assertEqual(open(target, "rb").read(), b"secret")

    def test_the_same_without_unnamed_files(self):
        self.patch(store, "_TMPFILE", 0)
        self.folder({"d/f": 10, "d/g": 20})
        target = write(os.path.join(self.outside, "secret"), b"secret")

        def attack():
            os.symlink(target, self.dest("d", "f" + PARTIAL_SUFFIX))
        self.after_prepare(attack)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertIn("is a symbolic link", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(open(target, "rb").read(), b"secret")
        self.assertFalse(os.path.exists(self.dest("d", "f")))

    def test_a_hard_link_planted_at_the_partial_name(self):
        self.patch(store, "_TMPFILE", 0)
        self.folder({"d/f": 10})
        target = write(os.path.join(self.out, "mine"), b"mine")  # (same file system)

        def attack():
            os.link(target, self.dest("d", "f" + PARTIAL_SUFFIX))
        self.after_prepare(attack)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertIn("hard links", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(open(target, "rb").read(), b"mine")

    def test_a_folder_we_made_replaced_by_a_link(self):
        """The folder the receiver made is moved away and a symlink to a
        folder outside put in its place: files land in the folder it
        made (still inside the output folder) or are refused, never
        outside -- also once its descriptor left the small cache."""
        self.patch(store, "OPEN_DIRS", 1)
        self.folder({**{f"d{i}/f": 10 for i in range(4)}})

        def attack():
            for i in range(4):
                os.rename(self.dest(f"d{i}"), os.path.join(self.out, f"moved{i}"))
                os.symlink(self.outside, self.dest(f"d{i}"))
        self.after_prepare(attack)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertIn("not a folder (p2pft never writes through symbolic links)", error)
        self.assertEqual(os.listdir(self.outside), [])

    def test_overwrite_over_a_symlink_and_a_hard_link(self):
        """--overwrite replaces the names, never what they point to."""
        files = self.folder({"l": 5, "h": 6})
        os.makedirs(self.dest())
        target = write(os.path.join(self.outside, "t"), b"outside")
        os.symlink(target, self.dest("l"))
        other = write(os.path.join(self.out, "other"), b"hhhhhh")
        os.link(other, self.dest("h"))
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock(), overwrite=True)
        link.pump()
        self.successResultOf(rd)
        self.assertEqual(files_sent(link), [[1, 2]])
        self.assertEqual(open(target, "rb").read(), b"outside")
        self.assertEqual(open(other, "rb").read(), b"hhhhhh")
        self.assertFalse(os.path.islink(self.dest("l")))
        self.assertEqual(open(self.dest("l"), "rb").read(), files["l"])
        self.assertEqual(open(self.dest("h"), "rb").read(), files["h"])
        self.assertEqual(os.stat(self.dest("h")).st_nlink, 1)

    def test_overwrite_and_a_folder_that_appears(self):
        self.folder({"a": 5, "b": 6})

        def attack():
            os.makedirs(self.dest("b"))
        self.after_prepare(attack)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock(), overwrite=True)
        link.pump()
        self.assertIn("appeared as a folder while receiving", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertTrue(os.path.isdir(self.dest("b")))
        self.assertEqual(sorted(os.listdir(self.dest())), ["a", "b"])


class ResumeShortcutTests(Base):
    """find_existing looks once at a folder that is not there: it must
    still find every complete file in a folder that is."""

    def test_identical_files_in_nested_folders_are_skipped(self):
        self.folder({"a/b/c/f": 5, "a/g": 6, "h": 7, "x/y/z": 8})
        start_pair([self.src], self.out, clock=Clock())[0].pump()
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertEqual(self.successResultOf(rd).skipped, 26)
        self.assertEqual(link.sent(FILES), [])

    def test_some_folders_there_some_not(self):
        """Only x/ is there (with its complete file): skipped; the rest sent."""
        self.folder({"a/f": 5, "x/g": 6, "x/y/h": 7})
        os.makedirs(self.dest("x"))
        write(self.dest("x", "g"), open(os.path.join(self.src, "x", "g"), "rb").read())
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertEqual(self.successResultOf(rd).skipped, 6)
        self.assertEqual(sum(map(len, files_sent(link))), 2)

    def test_a_folder_that_is_a_file_or_a_link(self):
        """Refused before anyone is asked, as before: the shortcut changes nothing."""
        self.folder({"a/f": 5})
        os.makedirs(self.dest())
        os.symlink(self.outside, self.dest("a"))
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertIn("symbolic link", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        os.unlink(self.dest("a"))
        write(self.dest("a"), b"")
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        self.assertIn("not a folder", str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)


class ThreadedDiskTests(Base):
    """The receiver's disk work on a thread (here: run when the test says):
    FILES records that arrive while a file sent as DATA is still being
    finished are held, not refused."""

    def test_files_after_a_file_still_being_written(self):
        files = self.folder({"a": 5, "b": sink.BUFFER + 1, "c": 6, "d": 7})  # (b: a write on the thread)
        pending = []

        def later(f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d
        link, clock = Link(), Clock()
        receiver = Receiver(link.b, clock, self.out, accept, run_blocking=later)
        sender = Sender(link.a, clock, scan([self.src]))
        rd, sd = receiver.start(), sender.start()
        held = []
        for _ in range(100):
            link.pump()
            if not pending:
                break
            held.append([k for k, _ in link.a.queue] if link.b.paused else None)
            d, f, args = pending.pop(0)
            d.callback(f(*args))
        self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertIn([FILES, END], held)  # (c and d waited for b to be placed)
        self.assertEqual(files_sent(link), [[1], [3, 4]])
        self.assertEqual({name: open(self.dest(name), "rb").read() for name in files}, files)


class FailureHintTests(Base):
    """A FILES file that fails mid-record: the ones before it are placed
    and counted, the rest not written; the hint says so."""

    def test_disk_full_mid_record(self):
        self.folder({"a": 5, "b": 6, "c": 7})
        real = sink._write_all

        def write_all(fd, view, offset):
            if bytes(view) == open(os.path.join(self.src, "b"), "rb").read():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, view, offset)
        from p2pft.transfer import destination
        self.patch(destination, "_write_all", write_all)
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertIn("the disk is full while writing", error)
        self.assertIn("the data received so far is kept", error)
        self.assertEqual(sorted(os.listdir(self.dest())), ["a"])

    def test_a_bad_size_mid_record(self):
        self.folder({"a": 5, "b": 6, "c": 7})
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())

        def forge(kind, data, send):
            if kind == FILES:
                (i, a), (j, b), (k, c) = unpack(data)
                data = pack([(i, a), (j, b[:-1]), (k, c)])
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        error = str(self.failureResultOf(rd, TransferFailed).value)
        self.failureResultOf(sd, TransferFailed)
        self.assertIn("size mismatch for", error)
        self.assertEqual(sorted(os.listdir(self.dest())), ["a"])


class SenderTests(Base):
    """The sender's files change between the scan and the send."""

    def fails_on_a_fifo(self, size: int) -> None:
        """File C{f} of C{size} bytes replaced by a FIFO after the scan:
        the sender fails with a clear error instead of blocking its
        reactor in open() forever (the scan left FIFOs out; the open did
        not)."""
        self.folder({"a": 5, "f": size})
        manifest = scan([self.src])
        os.unlink(os.path.join(self.src, "f"))
        os.mkfifo(os.path.join(self.src, "f"))
        link, clock = Link(), Clock()
        receiver = Receiver(link.b, clock, self.out, accept)
        sender = Sender(link.a, clock, manifest)
        rd, sd = receiver.start(), sender.start()
        link.pump()
        self.assertIn("is not a regular file", str(self.failureResultOf(sd, TransferFailed).value))
        self.failureResultOf(rd, TransferFailed)

    def test_replaced_by_a_fifo(self):
        """A small file, sent whole."""
        self.fails_on_a_fifo(0)

    def test_a_large_file_replaced_by_a_fifo(self):
        """The same for a file sent as FILE, DATA..., FILE_END."""
        self.fails_on_a_fifo(SMALL_FILE + 1)

    def test_grows_and_shrinks(self):
        for change in (b"x" * 6, b"x" * 4):
            self.folder({"a": 5})
            manifest = scan([self.src])
            write(os.path.join(self.src, "a"), change)
            link, clock = Link(), Clock()
            rd = Receiver(link.b, clock, self.out, accept).start()
            sd = Sender(link.a, clock, manifest).start()
            link.pump()
            self.assertIn("changed after the transfer started", str(self.failureResultOf(sd, TransferFailed).value))
            self.failureResultOf(rd, TransferFailed)

    def files_per_call(self, n: int, **kw) -> list[int]:
        """The files a sender of C{n} empty files starts in each call of its
        producer."""
        for i in range(n):
            write(os.path.join(self.src, f"{i:05d}"), b"")
        link, sender, receiver, sd, rd = start_pair([self.src], self.out, clock=Clock())
        if not kw.get("whole", True):
            receiver._dest.takes_whole = False
        real_resume, calls = sender.resumeProducing, []

        def started():
            return sum(len(list(unpack(p))) if k == FILES else k == FILE for _, k, p in link.log)

        def resume_producing():
            before = started()
            real_resume()
            calls.append(started() - before)
        sender.resumeProducing = resume_producing
        link.pump()
        self.successResultOf(rd)
        self.successResultOf(sd)
        self.assertEqual(len(tree(self.dest())), n)
        self.assertEqual(sum(calls), n)
        return calls

    def test_a_folder_of_empty_files_does_not_hog_the_reactor(self):
        """Each call of the sender's producer starts a bounded number of
        files: 8 header bytes a file counted against a 1 MiB burst let one
        call read 131,072 empty files (seconds from a cold disk, with
        nothing else running meanwhile, keepalives included)."""
        self.assertLessEqual(max(self.files_per_call(4 * BATCH_FILES)), BATCH_FILES)

    def test_the_same_one_at_a_time(self):
        """(An older receiver: FILE and FILE_END records, no data; they
        counted nothing at all, and one call sent the whole folder.)"""
        self.assertLessEqual(max(self.files_per_call(4 * BATCH_FILES, whole=False)), BATCH_FILES)

    def test_a_file_the_receiver_has_replaced_by_a_fifo(self):
        """The same for a file the receiver has (HAVE): the sender's check
        of its blocks does not block in open() either."""
        self.folder({"a": 5, "f": 3})
        start_pair([self.src], self.out, clock=Clock())[0].pump()
        manifest = scan([self.src])
        os.unlink(os.path.join(self.src, "f"))
        os.mkfifo(os.path.join(self.src, "f"))
        link, clock = Link(), Clock()
        rd = Receiver(link.b, clock, self.out, accept).start()
        sd = Sender(link.a, clock, manifest).start()
        link.pump()
        self.assertIn("is not a regular file", str(self.failureResultOf(sd, TransferFailed).value))
        self.failureResultOf(rd, TransferFailed)


class SenderLinkTests(Base):
    """The scan follows no link inside a folder unless told to; a name that
    became a link (or a folder above it swapped for a link) after the scan
    is not followed when the file is sent either: someone who can write in
    the folder being sent could otherwise have the sender send any file of
    the same size it can read (a key, to the receiver)."""

    def setUp(self):
        super().setUp()
        self.secret = write(os.path.join(self.outside, "id_key"), b"SECRET-KEY")

    def sent_after(self, swap, files):
        manifest = scan([self.src])
        swap()
        link, clock = Link(), Clock()
        rd = Receiver(link.b, clock, self.out, accept).start()
        sd = Sender(link.a, clock, manifest).start()
        link.pump()
        error = str(self.failureResultOf(sd, TransferFailed).value)
        self.failureResultOf(rd, TransferFailed)
        for _, kind, payload in link.log:
            self.assertNotIn(b"SECRET-KEY", payload)
        return error

    def test_a_small_file_swapped_for_a_link(self):
        self.folder({"a": 3, "key": 10})

        def swap():
            os.unlink(os.path.join(self.src, "key"))
            os.symlink(self.secret, os.path.join(self.src, "key"))
        self.assertIn("is another file than when the transfer started", self.sent_after(swap, ()))

    def test_a_folder_swapped_for_a_link(self):
        self.folder({"d/id_key": 10})
        decoy = os.path.join(self.out, "decoy")

        def swap():
            os.rename(os.path.join(self.src, "d"), decoy)
            os.symlink(self.outside, os.path.join(self.src, "d"))
        self.assertIn("is another file than when the transfer started", self.sent_after(swap, ()))

    def test_a_large_file_swapped_for_a_link(self):
        big = write(os.path.join(self.outside, "big"), b"SECRET-KEY" * 10000)
        self.folder({"a": 3, "key": 100000})

        def swap():
            os.unlink(os.path.join(self.src, "key"))
            os.symlink(big, os.path.join(self.src, "key"))
        self.assertIn("is another file than when the transfer started", self.sent_after(swap, ()))

    def test_a_file_the_receiver_has_swapped_for_a_link(self):
        """Nor are its blocks hashed against the receiver's HAVE (which
        would tell a receiver whether its guess of the file is right)."""
        self.folder({"a": 3, "key": 10})
        start_pair([self.src], self.out, clock=Clock())[0].pump()
        hashed = []
        real = resume.match_prefix
        self.patch(resume, "match_prefix", lambda f, hashes: hashed.append(f.read()) or real(f, hashes))

        def swap():
            os.unlink(os.path.join(self.src, "key"))
            os.symlink(self.secret, os.path.join(self.src, "key"))
        self.assertIn("is another file than when the transfer started", self.sent_after(swap, ()))
        self.assertNotIn(b"SECRET-KEY", hashed)

    def test_links_the_scan_followed_are_still_sent(self):
        """A link named on the command line, and links inside a folder with
        --follow-symlinks, are the files they point to, as scanned."""
        target = write(os.path.join(self.outside, "t"), b"tt")
        os.makedirs(self.src)
        os.symlink(target, os.path.join(self.src, "l"))
        named = os.path.join(self.outside, "named")
        os.symlink(target, named)
        link, clock = Link(), Clock()
        rd = Receiver(link.b, clock, self.out, accept).start()
        sd = Sender(link.a, clock, scan([self.src, named], follow_symlinks=True)).start()
        link.pump()
        self.successResultOf(sd)
        self.assertEqual(self.successResultOf(rd).files, 2)
        self.assertEqual(open(self.dest("l"), "rb").read(), b"tt")
        self.assertEqual(open(os.path.join(self.out, os.path.basename(named)), "rb").read(), b"tt")


class StreamOfferTests(Base):
    def test_a_stream_sent_whole(self):
        """A stream of unknown length (size null) into a folder, its FILE
        forged into a FILES record: no size to match, refused, nothing
        written."""
        from p2pft.transfer.sender import StreamSender
        from p2pft.transfer.scan import stream_manifest
        from .test_transfer import FakeSource

        link, source = Link(), FakeSource()
        sd = StreamSender(link.a, Clock(), stream_manifest(), source).start()
        rd = Receiver(link.b, Clock(), self.out, accept).start()

        def forge(kind, data, send):
            if kind == FILE:
                kind, data = FILES, pack([(0, b"abc")])
            send(kind, data)
        self.forging(link, forge)
        link.pump()
        self.assertIn("size mismatch for stdin: offered None, received 3 bytes",
                      str(self.failureResultOf(rd, TransferFailed).value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(os.listdir(self.out), [])


class AccountingTests(Base):
    def test_progress_and_counts_with_files_skips_and_data(self):
        """FILES, FILE/DATA/FILE_END and skipped files mixed: both sides'
        progress only grows and ends at the total, END, ACK and both
        results agree, skipped bytes are counted once."""
        files = self.folder({"a": 5, "b": SMALL_FILE + 3, "c": 0, "d/e": 9, "d/f": 4})
        os.makedirs(self.dest("d"))
        write(self.dest("d", "e"), files["d/e"])  # (identical: skipped)
        link, clock, seen = Link(), Clock(), {"r": [], "s": []}
        receiver = Receiver(link.b, clock, self.out, accept,
                            progress=lambda done, total, name: seen["r"].append((done, total)))
        sender = Sender(link.a, clock, scan([self.src]),
                        progress=lambda done, total, name: seen["s"].append((done, total)))
        rd, sd = receiver.start(), sender.start()
        link.pump()
        got, sent = self.successResultOf(rd), self.successResultOf(sd)
        total = sum(map(len, files.values()))
        self.assertEqual((got.size, got.skipped, got.files), (total, 9, 5))
        self.assertEqual((sent.size, sent.skipped, sent.files), (total, 9, 5))
        self.assertEqual(json.loads(link.sent(END)[0]), {"files": 5, "bytes": total})
        self.assertEqual(json.loads(link.sent(ACK)[0]), {"files": 5, "bytes": total})
        for side in ("r", "s"):
            dones = [done for done, _ in seen[side]]
            self.assertEqual(dones, sorted(dones))
            self.assertEqual(dones[-1], total)
            self.assertTrue(all(t == total for _, t in seen[side]))
        self.assertEqual(files_sent(link), [[1], [3], [6]])
