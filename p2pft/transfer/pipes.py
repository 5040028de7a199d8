"""
Standard input and output as streams: reading a pipe or terminal without
blocking the reactor (L{FDReader}), bigger pipe buffers, and telling a
stream from a regular file.
"""

from __future__ import annotations

import fcntl
import os
import stat

from twisted.internet import abstract, error, main
from twisted.python import failure

#: Bytes one read of a stream takes at most, and the pipe buffer asked for:
#: what Linux lets an unprivileged process have by default (pipe-max-size).
PIPE_BYTES = 1 << 20


class FDReader(abstract.FileDescriptor):
    """
    Reads a non-seekable file descriptor (a pipe, a terminal) without
    blocking the reactor, up to C{piece} bytes per read, each into a new
    object that C{on_data} may keep (the session keeps it until the other
    side has it: no copy), as a push producer the channel's transport can
    pause.  Restores the descriptor's blocking mode when done (it is shared
    with whatever started us).
    """

    def __init__(self, fd: int, reactor=None, piece: int = PIPE_BYTES):
        super().__init__(reactor)
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._on_data = self._on_end = None
        self._piece = piece
        widen_pipe(fd)

    def fileno(self) -> int:
        return self._fd

    def start(self, on_data, on_end) -> None:
        self._on_data, self._on_end = on_data, on_end
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
        self.connected = 1
        self.startReading()

    def stop(self) -> None:
        """Stop reading and give the descriptor back as we found it."""
        self._on_end = None
        if self.connected:
            self.stopReading()
            self.connected = 0
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)

    def doRead(self):
        try:
            data = os.read(self._fd, self._piece)
        except BlockingIOError:
            return None
        except OSError as e:
            return failure.Failure(e)
        if not data:
            return main.CONNECTION_DONE
        self._on_data(data)
        return None

    def connectionLost(self, reason) -> None:
        on_end = self._on_end
        self.stop()
        if on_end is not None:
            on_end(None if reason.check(error.ConnectionDone) else reason.getErrorMessage())


def widen_pipe(fd: int, size: int = PIPE_BYTES) -> None:
    """If fd is a pipe, ask Linux for a C{size}-byte pipe buffer (the
    default is 64 KiB; unprivileged processes may go up to
    /proc/sys/fs/pipe-max-size, 1 MiB by default): fewer, bigger reads and
    writes, and fewer context switches with the process at the other end."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError, ValueError):
        pass  # not Linux, or over the limit: the default is fine


def is_stream(fd: int) -> bool:
    """Whether fd must be read as a stream (pipe, socket, terminal) rather
    than as a regular file of known size."""
    return not stat.S_ISREG(os.fstat(fd).st_mode)
