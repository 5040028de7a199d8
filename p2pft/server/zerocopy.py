"""
The relay's bytes moved by the kernel alone: each direction of a splice
is C{splice(2)} from one leg's socket into a pipe and from the pipe into
the other leg's socket, so no byte is copied into (or out of) the relay's
memory, and nothing is allocated per read.

It stays the reactor's work: the reactor still watches both sockets and
calls their transports' C{doRead}/C{doWrite}, which a L{ZeroCopy} takes
over for its direction (the source's reads, the destination's writes);
Twisted still owns connecting, closing and errors.  The rules of the
splice are unchanged: every byte read is counted by the session first
(its byte cap, its rate bucket, its idle clock: C{carry}), a pipe that
holds bytes stops the source being read until the destination took them
(so the relay holds at most one pipe's worth per direction), a source's
end is passed on once the pipe is drained, and bytes Twisted buffered for
the destination itself (the "OK" line) go first.

Used only where both legs are real TCP transports on Linux
(L{available}); elsewhere (tests' string transports) the splice moves
bytes through Twisted as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable

from twisted.internet import main

#: Bytes of each pipe, in order of preference: 1 MiB moved 1,205-1,296
#: MB/s through one session on loopback at 0.7 server CPU-s per 2 GiB,
#: 256 KiB 851-1,136 MB/s at 1.0-1.2 (same runs).  Two pipes per spliced
#: pair.  Linux refuses to grow a pipe once the user's pipes would pass its
#: allowance (fs.pipe-user-pages-soft: 64 MiB by default), and then makes
#: every new pipe of that user tiny; so the relay keeps to half of it
#: (L{_Budget}): 1 MiB pipes while half the allowance holds them, then
#: 256 KiB ones, then (the budget spent) bytes move through Twisted.
PIPE_SIZES = (1 << 20, 256 * 1024)
#: A pipe smaller than this is not used.
MIN_PIPE = 64 * 1024


class _Budget:
    """Pipe bytes the relay's pipes may hold at once: half the user's
    allowance (fs.pipe-user-pages-soft), so other processes of the same
    user keep normal pipes; unlimited when the allowance is unlimited
    (0) or the process may exceed it."""

    def __init__(self):
        self.left: int | None = None

    def _start(self) -> int:
        try:
            with open("/proc/sys/fs/pipe-user-pages-soft") as f:
                pages = int(f.read())
        except (OSError, ValueError):
            pages = 16384
        if pages == 0 or os.geteuid() == 0:
            return 1 << 62  # (root has CAP_SYS_RESOURCE: no allowance applies)
        return pages * 4096 // 2

    def take(self) -> int | None:
        """The size of the next pipe (reserved), or None: none fits."""
        if self.left is None:
            self.left = self._start()
        for size in PIPE_SIZES:
            if size <= self.left:
                self.left -= size
                return size
        return None

    def give(self, size: int) -> None:
        self.left += size


_BUDGET = _Budget()
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Errors that mean "try again" for a write (as Twisted's own writes take them).
_AGAIN = (errno.EAGAIN, errno.ENOBUFS, errno.EINTR)


def available(*transports) -> bool:
    """Whether the kernel can splice between these transports (real TCP
    ones; P2PFT_ZEROCOPY=0 turns it off, to compare)."""
    from twisted.internet import tcp
    if not hasattr(os, "splice") or os.environ.get("P2PFT_ZEROCOPY", "1") == "0":
        return False
    return all(isinstance(t, tcp.Connection) for t in transports)


class ZeroCopy:
    """
    Bytes from C{src} to C{dst} (Twisted TCP transports) through a pipe of
    its own.  C{carry(n)}: the session's count of C{n} bytes read (False:
    its byte cap is reached, and the splice is being cut: nothing more
    moves).  C{paused()}: whether the source must not be read now (the
    session's rate limit); L{update} is called when that changes.

    The pipe lives as long as the direction can use it: when the
    destination goes, its bytes are dropped and the pipe closed at once;
    when the source goes, what the pipe holds is still written to the
    destination, then the pipe is closed.  Either way the transports get
    their own C{doRead}/C{doWrite} back.  Raises C{OSError} when no usable
    pipe can be had (out of descriptors, or of pipe memory): the caller
    moves the bytes through Twisted instead.
    """

    def __init__(self, src, dst, carry: Callable[[int], bool], paused: Callable[[], bool],
                 read_max: int | None = None):
        self._src, self._dst = src, dst
        self._carry = carry
        self._paused = paused
        self._granted = _BUDGET.take()
        if self._granted is None:
            raise OSError(errno.ENOMEM, "the relay's pipe budget is spent")
        try:
            self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            _BUDGET.give(self._granted)
            raise
        try:
            try:
                fcntl.fcntl(self._w, _F_SETPIPE_SZ, self._granted)
            except OSError:
                pass
            self._size = fcntl.fcntl(self._w, _F_GETPIPE_SZ)
            if self._size < MIN_PIPE:
                raise OSError(errno.ENOMEM, "pipe too small: the user's pipe allowance is spent")
        except BaseException:
            os.close(self._r)
            os.close(self._w)
            _BUDGET.give(self._granted)
            raise
        #: The most one read moves (a rate-limited session's burst).
        self._read_max = min(self._size, read_max or self._size)
        self.in_pipe = 0
        self._stopped = False  # the byte cap: nothing more is moved
        self._read_ended = False  # the source's end was passed on
        self._src_gone = False
        self._dst_failed = False  # a write to the destination failed: its doWrite says so
        self._closed = False

    def install(self) -> None:
        """Take over the source's reads and the destination's writes."""
        src, dst = self._src, self._dst
        self._dst_doWrite = type(dst).doWrite.__get__(dst)
        src.doRead = self.doRead
        dst.doWrite = self.doWrite
        for t, gone in ((src, self._source_lost), (dst, self._destination_lost)):
            lost = t.connectionLost

            def connectionLost(reason, lost=lost, gone=gone):
                gone()
                return lost(reason)
            t.connectionLost = connectionLost

    def _source_lost(self) -> None:
        self._src_gone = True
        if self._closed:
            return
        if self.in_pipe and not self._stopped and not self._dst.disconnected:
            self._dst.startWriting()  # what it sent still goes to the other side, then the pipe closes
        else:
            self.close()

    def _destination_lost(self) -> None:
        self.close()

    def update(self) -> None:
        """Read the source, unless the pipe holds bytes or the session's rate says wait."""
        if self._closed or self._src.disconnected or self._read_ended:
            return
        if self.in_pipe or self._paused() or self._stopped:
            self._src.stopReading()
        elif not self._src.disconnecting:
            self._src.startReading()

    def doRead(self):
        """The source is readable: into the pipe, counted, then on to the destination."""
        if self._closed:
            return type(self._src).doRead(self._src)
        try:
            n = os.splice(self._src.fileno(), self._w, min(self._read_max, self._size - self.in_pipe), flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if n == 0:
            if self.in_pipe:
                # Its end is passed on once the pipe is drained: reading
                # stops until then, and the next read finds the end again.
                self._src.stopReading()
                return None
            self._read_ended = True
            return main.CONNECTION_DONE
        self.in_pipe += n
        if not self._carry(n):
            self._stopped = True
            self._src.stopReading()
            return None
        self._drain()
        self.update()
        return None

    def doWrite(self):
        """The destination is writable: Twisted's own bytes first, then the pipe's."""
        dst = self._dst
        if self._closed:
            return self._dst_doWrite()
        if self._dst_failed:
            return main.CONNECTION_LOST
        if len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
            result = self._dst_doWrite()
            if result is main.CONNECTION_DONE and self.in_pipe and not self._stopped:
                # A close that came while Twisted still had bytes of its own
                # waits for the pipe too (asked again below once it is
                # drained; for TCP nothing was done yet).
                result = None
                dst.startWriting()
            if result is not None or len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
                return result
        self._drain()
        if self._dst_failed:
            return main.CONNECTION_LOST
        if self.in_pipe and not self._stopped:
            return None
        if self._src_gone:
            self.close()  # all the source sent was passed on
        else:
            self.update()
        return self._dst_doWrite()

    def _drain(self) -> None:
        """As much of the pipe into the destination as it takes now (a
        write error is left for the destination's own doWrite to report)."""
        dst = self._dst
        if self._stopped or self._dst_failed:
            return
        if len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
            dst.startWriting()
            return
        while self.in_pipe:
            try:
                n = os.splice(self._r, dst.fileno(), self.in_pipe, flags=_FLAGS)
            except OSError as e:
                if e.errno not in _AGAIN:
                    self._dst_failed = True
                dst.startWriting()
                return
            if n == 0:
                break
            self.in_pipe -= n
        if self.in_pipe:
            dst.startWriting()

    def close(self) -> None:
        """Let the pipe go, and give both transports their own reads and
        writes back (what the pipe held is dropped)."""
        if self._closed:
            return
        self._closed = True
        self.in_pipe = 0
        os.close(self._r)
        os.close(self._w)
        _BUDGET.give(self._granted)
        for t, name, ours in ((self._src, "doRead", self.doRead), (self._dst, "doWrite", self.doWrite)):
            if t.__dict__.get(name) == ours:
                del t.__dict__[name]
