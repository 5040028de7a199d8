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

import fcntl
import os
from typing import Callable

from twisted.internet import main

#: Bytes asked of one splice(): the pipe's size.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def available(*transports) -> bool:
    """Whether the kernel can splice between these transports (real TCP
    ones; P2PFT_ZEROCOPY=0 turns it off, to compare)."""
    from twisted.internet import tcp
    if not hasattr(os, "splice") or os.environ.get("P2PFT_ZEROCOPY", "1") == "0":
        return False
    return all(isinstance(t, tcp.Connection) for t in transports)


class ZeroCopy:
    """
    Bytes from C{src} to C{dst} (Twisted TCP transports) through a pipe.
    C{carry(n)}: the session's count of C{n} bytes read (False: its byte
    cap is reached, and the splice is being cut: nothing more moves).
    C{paused()}: whether the source must not be read now (the session's
    rate limit); L{update} is called when that changes.
    """

    def __init__(self, src, dst, carry: Callable[[int], bool], paused: Callable[[], bool]):
        self._src, self._dst = src, dst
        self._carry = carry
        self._paused = paused
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self._w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe (64 KiB) still works
        self.in_pipe = 0
        self._stopped = False  # the byte cap: nothing more is moved
        self._read_ended = False  # the source's end was passed on
        self._closed = False

    def install(self) -> None:
        """Take over the source's reads and the destination's writes."""
        src, dst = self._src, self._dst
        self._dst_doWrite = type(dst).doWrite.__get__(dst)
        src.doRead = self.doRead
        dst.doWrite = self.doWrite
        for t in (src, dst):
            lost = t.connectionLost

            def connectionLost(reason, lost=lost):
                self.close()
                return lost(reason)
            t.connectionLost = connectionLost

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
            return main.CONNECTION_LOST
        try:
            n = os.splice(self._src.fileno(), self._w, PIPE_SIZE - self.in_pipe, flags=_FLAGS)
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
            return None
        result = self._drain()
        self.update()
        return result

    def doWrite(self):
        """The destination is writable: Twisted's own bytes first, then the pipe's."""
        dst = self._dst
        if len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
            result = self._dst_doWrite()
            if result is not None or len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
                return result
        result = self._drain()
        if result is not None:
            return result
        if self.in_pipe:
            return None
        self.update()
        return self._dst_doWrite()

    def _drain(self):
        """As much of the pipe into the destination as it takes now."""
        dst = self._dst
        if len(dst.dataBuffer) - dst.offset or dst._tempDataLen:
            dst.startWriting()
            return None
        while self.in_pipe and not self._stopped:
            try:
                n = os.splice(self._r, dst.fileno(), self.in_pipe, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                dst.startWriting()
                return None
            except OSError:
                return main.CONNECTION_LOST
            if n == 0:
                break
            self.in_pipe -= n
        if self.in_pipe and not self._stopped:
            dst.startWriting()
        return None

    def close(self) -> None:
        """Let the pipe go (a connection of the direction is gone)."""
        if not self._closed:
            self._closed = True
            os.close(self._r)
            os.close(self._w)
