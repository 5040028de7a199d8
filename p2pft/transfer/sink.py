"""
Writing a received file without stalling the reactor or the page cache.

A L{FileSink} copies arriving data into page-aligned buffers of L{BUFFER}
bytes that start on L{p2pft.transfer.resume.BLOCK} boundaries of the file.  Each full
buffer is written by C{run_blocking} (a thread in real use) with C{pwrite}
and, where the file system allows it, C{O_DIRECT}: the data goes from our
buffer to the disk without a page-cache copy.  That matters for big files:
a buffered write makes the kernel find (and on many virtual machines,
fault in from the host) a fresh page-cache page for every 4 KiB, which cost
the receiver more CPU than decrypting; and a 100 GB transfer does not evict
everything else from the cache.  The buffers are reused, so no fresh memory
is touched per write either.

At most L{IN_FLIGHT} buffers are being written at once; L{FileSink.ready}
says when the caller should stop reading the network until
L{FileSink.when_ready} fires, so a slow disk slows the sender down (TCP flow
control) instead of filling memory.  The rest of a file (less than one
buffer) is written with an ordinary write when it ends, or when the
transfer stops, so an interrupted transfer keeps everything that arrived.

C{O_DIRECT} goes through a second descriptor of the same file, so the flag
never changes under a write in flight.  A file system that refuses it
(tmpfs, some network or FUSE file systems) gets ordinary writes, still from
the thread.  Two writes in flight may land out of order: a receiver killed
at that moment can leave a later buffer on disk and an earlier one not, and
the resume then continues from the first block that does not match
(L{p2pft.transfer.resume}), so nothing but that block is sent again.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

#: Bytes per buffer: a multiple of the page size and a divisor of BLOCK, so
#: every full buffer is aligned for O_DIRECT and a resume offset (a
#: multiple of BLOCK) starts a buffer.
BUFFER = 2 << 20
#: Full buffers being written at once.
IN_FLIGHT = 2
#: O_DIRECT wants buffer addresses, sizes and file offsets aligned to the
#: device's logical block size: 4096 covers every common device.
ALIGN = 4096


class BufferPool:
    """Page-aligned buffers (anonymous maps) reused from file to file."""

    def __init__(self):
        self._free: list[mmap.mmap] = []
        #: Buffers made so far (for tests: memory stays bounded).
        self.size = 0
        self._closed = False

    def take(self) -> mmap.mmap:
        if self._free:
            return self._free.pop()
        self.size += 1
        return mmap.mmap(-1, BUFFER)

    def give(self, buf: mmap.mmap) -> None:
        if not self._closed:
            self._free.append(buf)

    def close(self) -> None:
        """Let the buffers go (they are unmapped once nothing, say a write
        still running, holds them)."""
        self._closed = True
        self._free.clear()


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_direct(fd: int) -> int | None:
    """A second descriptor of fd's file, for writing with O_DIRECT (its own
    open file description: the flag never changes under another write); None
    if the file system refuses O_DIRECT or /proc is missing.  /proc/self/fd
    names the very file fd has open, whatever has become of its path."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


class _Output:
    """
    Positional writes to C{file}: a full buffer with C{O_DIRECT} through a
    second descriptor where the file system takes it (C{direct}), the rest
    -- and everything, where it does not -- with ordinary writes.
    """

    def __init__(self, file, direct: bool):
        self.file = file
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._direct_fd: int | None = None
        #: Whether L{open_direct} is due, before the first full buffer is written.
        self.unopened = self._direct

    def open_direct(self) -> None:
        """(On the reactor thread, so the flag never changes under a write.)"""
        self.unopened = False
        self._direct_fd = _open_direct(self.file.fileno())
        self._direct = self._direct_fd is not None

    def write(self, view: memoryview, base: int) -> None:
        """Write C{view} at file offset C{base}: with O_DIRECT if this is
        a full buffer and the file system takes it."""
        if self._direct and len(view) == BUFFER:
            try:
                return _write_all(self._direct_fd, view, base)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Accepted at open, refused at write (some FUSE and network
                # file systems): ordinary writes from now on.
                self._direct = False
        _write_all(self.file.fileno(), view, base)

    def close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None


class FileSink:
    """
    Writes one file from byte C{offset} on (a multiple of L{BUFFER}).

    C{write} and C{finish} are called on the reactor thread; the writes of
    full buffers run through C{run_blocking(f, *args) -> Deferred}.  An error
    from a background write is raised by the next C{write} or C{finish}.
    C{close} never closes the descriptor under a write still running.
    """

    def __init__(self, file, offset: int, pool: BufferPool,
                 run_blocking: Callable[..., defer.Deferred], direct: bool = True, keeps: bool = True):
        assert offset % BUFFER == 0, offset
        #: Whether what it wrote stays for a resume if the transfer stops
        #: (not for a file with no name yet: L{OutputDir.open_unnamed}).
        self.keeps = keeps
        self._out = _Output(file, direct)
        self._pool = pool
        self._run = run_blocking
        self._base = offset  # file offset of the buffer being filled
        self._buf: mmap.mmap | None = None
        self._fill = 0
        self._reserved: memoryview | None = None
        self._in_flight = 0
        self._error: BaseException | None = None
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []
        self._closing = False
        self.closed = False

    # -- reactor thread

    def reserve(self, size: int) -> memoryview | None:
        """Where the next C{size} bytes would be copied to (part of the
        buffer being filled), for the caller to write them there itself:
        then L{write} is given that very view and copies nothing.  None if
        they do not fit in the buffer (or the sink failed or is closing).
        Any other L{write} cancels it."""
        if self._error is not None or self._closing:
            return None
        if self._buf is None:
            self._buf = self._pool.take()
        if self._fill + size > BUFFER:
            return None
        self._reserved = memoryview(self._buf)[self._fill:self._fill + size]
        return self._reserved

    def write(self, data: bytes) -> None:
        self._check()
        if data is self._reserved:
            # Already in place (L{reserve}).
            self._reserved = None
            self._fill += len(data)
            if self._fill == BUFFER:
                self._submit()
            return
        self._reserved = None
        view = memoryview(data)
        while view:
            if self._buf is None:
                self._buf = self._pool.take()
            n = min(len(view), BUFFER - self._fill)
            self._buf[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == BUFFER:
                self._submit()

    def ready(self) -> bool:
        """Whether more data may come now (else wait for L{when_ready})."""
        return self._in_flight < IN_FLIGHT

    def when_ready(self) -> defer.Deferred:
        return self._wait(lambda: self.ready())

    def finish(self) -> defer.Deferred:
        """Fires once every byte is written (the rest with an ordinary
        write on this thread); fails with the first write error."""
        d = self._wait(lambda: self._in_flight == 0)
        d.addCallback(lambda _: self._write_rest())
        return d

    def release(self):
        """After L{finish}: hand the file over to the caller."""
        assert self._in_flight == 0 and self._buf is None
        self._closing = self.closed = True
        self._out.close_direct()
        return self._out.file

    def close(self) -> None:
        """Write what is buffered (best effort: a transfer that stopped
        keeps what arrived) and close the file once no write is running."""
        if self._closing:
            return
        self._closing = True
        if self._in_flight == 0:
            self._close_now()

    # -- internals

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self) -> None:
        if self._out.unopened:
            self._out.open_direct()
        buf, base = self._buf, self._base
        self._buf, self._fill = None, 0
        self._base += BUFFER
        self._in_flight += 1
        d = self._run(self._write_buffer, buf, base)
        d.addBoth(self._written, buf)

    def _write_buffer(self, buf: mmap.mmap, base: int) -> None:
        """(On the thread.)"""
        with memoryview(buf) as view:
            self._out.write(view, base)

    def _written(self, result, buf: mmap.mmap) -> None:
        self._in_flight -= 1
        self._pool.give(buf)
        if isinstance(result, Failure) and self._error is None:
            self._error = result.value
        if self._closing and self._in_flight == 0:
            self._close_now()
        self._wake()

    def _wait(self, condition: Callable[[], bool]) -> defer.Deferred:
        d = defer.Deferred()
        self._waiters.append((condition, d))
        self._wake()
        return d

    def _wake(self) -> None:
        waiting, self._waiters = self._waiters, []
        for condition, d in waiting:
            if self._error is not None:
                d.errback(self._error)
            elif condition():
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    def _write_rest(self) -> None:
        self._check()
        if self._buf is not None:
            buf, fill = self._buf, self._fill
            self._buf, self._fill = None, 0
            try:
                with memoryview(buf) as view:
                    self._out.write(view[:fill], self._base)
                self._base += fill
            finally:
                self._pool.give(buf)

    def _close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._error is None:
                self._write_rest()
        except (OSError, ValueError):
            pass  # we are stopping anyway; a resume re-checks what is there
        finally:
            self._release_file()

    def _release_file(self) -> None:
        self._out.close_direct()
        try:
            self._out.file.close()
        except OSError as e:  # a network file system may report a late write error here
            if self._error is None:
                self._error = e


class StreamSink:
    """
    The same interface over a binary stream (standard output: a pipe, a
    terminal or a file): plain blocking writes on the reactor thread, in
    order; flushed at the end, never closed.  (A writer thread here was
    measured: on a 2-core machine it only added CPU, the pipe is the limit.)
    """

    def __init__(self, stream):
        self.file = stream
        self._buffer: bytearray | None = None
        self._reserved: memoryview | None = None

    def reserve(self, size: int) -> memoryview | None:
        """A reused buffer for the next C{size} bytes (the wire opens the
        record into it; L{write} of that view writes it out, and the
        buffer is free again once it returns: writes here are blocking)."""
        if size > (1 << 20):
            return None
        if self._buffer is None:
            self._buffer = bytearray(1 << 20)
        self._reserved = memoryview(self._buffer)[:size]
        return self._reserved

    def write(self, data: bytes) -> None:
        self._reserved = None
        view = memoryview(data)
        while view:
            view = view[self.file.write(view):]

    def ready(self) -> bool:
        return True

    def when_ready(self) -> defer.Deferred:
        return defer.succeed(None)

    def finish(self) -> defer.Deferred:
        self.file.flush()
        return defer.succeed(None)

    def close(self) -> None:
        pass
