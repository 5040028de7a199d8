"""
Resume hashing of sparse files (L{p2pft.transfer.resume}): a block wholly
in a hole is known to be zeros without reading it, and its hash is the
same as if it had been read.
"""

import hashlib
import os

from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import resume
from p2pft.transfer.resume import BLOCK, hash_prefix, match_prefix


class SparseHashingTests(SynchronousTestCase):
    def sparse(self):
        """Two hole blocks, a block with data in it, a hole block, a short data tail."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(4 * BLOCK)
            f.seek(2 * BLOCK + 100)
            f.write(b"data")
            f.seek(4 * BLOCK)
            f.write(b"tail")
        with open(path, "rb") as f:
            data = f.read()
        return path, [hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]

    def test_holes_hash_as_zeros_without_reading(self):
        path, expected = self.sparse()
        reads = []
        real = os.pread
        self.patch(resume.os, "pread", lambda fd, n, pos: reads.append(pos) or real(fd, n, pos))
        with open(path, "rb") as f:
            prefix = hash_prefix(f, 5 * BLOCK)
        self.assertEqual((prefix.hashes, prefix.length), (expected, 4 * BLOCK + 4))
        with open(path, "rb") as f:
            if not hasattr(os, "SEEK_DATA") or os.lseek(f.fileno(), 0, os.SEEK_DATA) == 0:
                raise self.skipTest("this file system does not report holes")
        self.assertEqual(reads, [2 * BLOCK, 4 * BLOCK])  # only the blocks with data
        with open(path, "rb") as f:
            self.assertEqual(match_prefix(f, expected).length, 4 * BLOCK + 4)
