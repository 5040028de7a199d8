"""
The receiver's disk writer (L{p2pft.transfer.sink}): aligned buffers written in the
background, bounded memory, back-pressure, errors, and O_DIRECT fallbacks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import sink
from p2pft.transfer.resume import BLOCK
from p2pft.transfer.sink import BUFFER, IN_FLIGHT, BufferPool, FileSink


from .files import write
from .memlink import start_pair, tree


class ManualExecutor:
    """run_blocking that runs nothing until told to."""

    def __init__(self):
        self.jobs: list[tuple] = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_one(self):
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def run_all(self):
        while self.jobs:
            self.run_one()


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


class FileSinkTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def open(self, offset=0):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, offset)
        return os.fdopen(fd, "r+b", buffering=0)

    def skip_without_o_direct(self, f):
        fd = sink._open_direct(f.fileno())
        if fd is None:
            raise self.skipTest("this file system refuses O_DIRECT")
        os.close(fd)

    def content(self):
        with open(self.path, "rb") as f:
            return f.read()

    def test_background_writes_are_bounded_and_in_place(self):
        run = ManualExecutor()
        pool = BufferPool()
        s = FileSink(self.open(), 0, pool, run)
        data = os.urandom(BUFFER * (IN_FLIGHT + 1) + 12345)
        piece = 256 * 1024 + 7  # not a divisor of BUFFER: buffers fill across writes
        readiness = []
        for i in range(0, len(data), piece):
            s.write(data[i:i + piece])
            readiness.append(s.ready())
        self.assertEqual(len(run.jobs), IN_FLIGHT + 1)
        self.assertFalse(s.ready())
        self.assertIn(False, readiness)
        ready = s.when_ready()
        self.assertNoResult(ready)
        run.run_one()
        run.run_one()
        self.successResultOf(ready)
        done = s.finish()
        self.assertNoResult(done)  # a write is still running
        run.run_all()
        self.successResultOf(done)
        self.assertEqual(self.content(), data)
        self.assertLessEqual(pool.size, IN_FLIGHT + 2)
        s.release().close()

    def test_starts_at_the_resume_offset(self):
        head = os.urandom(BLOCK)
        write(self.path, head + b"stale tail that is cut")
        s = FileSink(self.open(BLOCK), BLOCK, BufferPool(), run_now)
        tail = os.urandom(BUFFER + 10)
        s.write(tail)
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(self.content(), head + tail)

    def test_reserved_places_are_written_in_place(self):
        """Data written into a reserved view (as the wire opens a record
        there) is committed by writing that very view: nothing is copied,
        the file gets exactly the stream; a record that does not fit the
        buffer is not offered a place; an ordinary write in between cancels
        a reservation (its place is then written over, never kept)."""
        s = FileSink(self.open(), 0, BufferPool(), run_now)
        data = os.urandom(BUFFER * 2 + 5000)
        pos = 0
        placed = copied = 0
        piece = 300 * 1024  # buffers fill across records
        while pos < len(data):
            chunk = data[pos:pos + piece]
            view = s.reserve(len(chunk))
            if view is None:
                copied += 1
                s.write(chunk)
            else:
                placed += 1
                view[:] = chunk
                s.write(view)
            pos += len(chunk)
        self.assertGreater(placed, 0)
        self.assertGreater(copied, 0)
        # A reservation left unused: its bytes are garbage, then written over.
        view = s.reserve(100)
        view[:] = b"x" * 100
        s.write(b"real data")
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(self.content(), data + b"real data")

    def test_offset_must_start_a_buffer(self):
        self.assertRaises(AssertionError, FileSink, self.open(), 4096, BufferPool(), run_now)

    def test_o_direct_used_for_full_buffers_only(self):
        flags = []
        real = sink._write_all

        def spy(fd, view, offset):
            flags.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), len(view), offset))
            real(fd, view, offset)
        self.patch(sink, "_write_all", spy)
        f = self.open()
        self.skip_without_o_direct(f)
        fds = len(os.listdir("/proc/self/fd"))
        s = FileSink(f, 0, BufferPool(), run_now)
        data = os.urandom(BUFFER + 100)
        s.write(data)
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds - 1, "both descriptors closed")
        self.assertEqual(flags, [(True, BUFFER, 0), (False, 100, BUFFER)])
        self.assertEqual(self.content(), data)

    def test_file_system_refusing_o_direct_gets_ordinary_writes(self):
        self.patch(sink, "_open_direct", lambda fd: None)  # refused at open
        s = FileSink(self.open(), 0, BufferPool(), run_now)
        data = os.urandom(BUFFER * 2 + 1)
        s.write(data)
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(self.content(), data)

    def test_o_direct_refused_at_write_time_falls_back(self):
        real = sink._write_all
        calls = []

        def einval_when_direct(fd, view, offset):
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            calls.append(direct)
            if direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            real(fd, view, offset)
        self.patch(sink, "_write_all", einval_when_direct)
        f = self.open()
        self.skip_without_o_direct(f)
        s = FileSink(f, 0, BufferPool(), run_now)
        data = os.urandom(BUFFER * 3)
        s.write(data)
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(calls, [True, False, False, False])  # tried once, then never again
        self.assertEqual(self.content(), data)

    def test_tmpfs_whatever_it_does_with_o_direct(self):
        # tmpfs refused O_DIRECT before Linux 6.6 and takes it since: the
        # bytes must come out right either way.
        if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
            raise self.skipTest("no writable /dev/shm")
        fd, self.path = tempfile.mkstemp(dir="/dev/shm")
        os.close(fd)
        self.addCleanup(os.unlink, self.path)
        s = FileSink(self.open(), 0, BufferPool(), run_now)
        data = os.urandom(BUFFER * 2 + 77)
        s.write(data)
        self.successResultOf(s.finish())
        s.release().close()
        self.assertEqual(self.content(), data)

    def test_background_error_surfaces_on_the_next_call(self):
        run = ManualExecutor()

        def full(fd, view, offset):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(sink, "_write_all", full)
        s = FileSink(self.open(), 0, BufferPool(), run)
        s.write(os.urandom(BUFFER * IN_FLIGHT))
        waiting = s.when_ready()
        self.assertNoResult(waiting)
        run.run_one()
        self.assertEqual(self.failureResultOf(waiting, OSError).value.errno, errno.ENOSPC)
        self.assertRaises(OSError, s.write, b"more")
        self.failureResultOf(s.finish(), OSError)
        run.run_all()
        s.close()
        self.assertTrue(s.closed)

    def test_close_waits_for_running_writes_then_keeps_the_rest(self):
        run = ManualExecutor()
        f = self.open()
        s = FileSink(f, 0, BufferPool(), run)
        data = os.urandom(BUFFER + 999)
        s.write(data)
        s.close()
        self.assertFalse(f.closed, "closed under a running write")
        run.run_all()
        self.assertTrue(f.closed)
        self.assertEqual(self.content(), data)  # an interrupted transfer keeps what arrived


class SlowDiskReceiverTests(SynchronousTestCase):
    """A disk slower than the network pauses reading instead of filling
    memory, and nothing is lost or reordered meanwhile."""

    def test_receiver_pauses_while_the_disk_is_behind(self):
        src = os.path.abspath(self.mktemp())
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        files = {"a.bin": os.urandom(BUFFER * 5 + 3), "b.bin": os.urandom(100), "c.bin": os.urandom(BUFFER * 3)}
        for name, data in files.items():
            write(os.path.join(src, name), data)
        run = ManualExecutor()
        link, _, receiver, sd, rd = start_pair([src], out)
        receiver._run_blocking = run
        paused = peak = 0
        for _ in range(1000):
            link.pump()
            if rd.called:
                break
            # Not run_blocking's first job: the resume scan.
            self.assertLessEqual(sum(1 for j in run.jobs if j[0].__name__ == "_write_buffer"), IN_FLIGHT + 1)
            paused += link.b.paused
            peak = max(peak, receiver._pool.size)
            run.run_one()
        self.assertEqual(self.successResultOf(rd).size, sum(map(len, files.values())))
        self.successResultOf(sd)
        self.assertGreater(paused, 0)
        self.assertLessEqual(peak, IN_FLIGHT + 1)
        self.assertEqual(tree(out), {os.path.basename(src): None,
                                     **{os.path.join(os.path.basename(src), k): v for k, v in files.items()}})
        self.assertEqual(link.content_sent(), sum(map(len, files.values())))
