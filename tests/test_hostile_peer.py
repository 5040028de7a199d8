"""
A hostile peer, or someone who can create entries in the output folder
(security review, issue 12):

- a hard link found in the output folder -- at a partial name or at a
  destination -- is never read, hashed or written through;
- the peer's candidate addresses are checked for type and range, loopback
  ones are dropped unless the server is on loopback, and attempts at
  non-public addresses are capped and paced;
- relays the server advertises by name are resolved first and what the
  name resolves to is filtered like a literal address.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pft.blocks import BLOCK
from p2pft.errors import Declined, TransferFailed
from p2pft.manifest import PARTIAL_SUFFIX
from p2pft.store import OutputDir
from p2pft.transfer import HAVE

from .files import write
from .memlink import start_pair


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class HardLinkTests(SynchronousTestCase):
    """OUT and OUTSIDE are sibling folders of one temporary folder (one
    file system): a hard link in OUT can name a file in OUTSIDE."""

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.src, self.out, self.outside = (os.path.join(root, d) for d in ("src", "out", "outside"))
        for d in (self.src, self.out, self.outside):
            os.makedirs(d)

    def outside_file(self, data: bytes) -> str:
        return write(os.path.join(self.outside, "secret"), data)

    def transfer(self, data: bytes, overwrite=False):
        """Send src/r.bin (C{data}) into OUT: (link, sender's, receiver's outcome)."""
        path = write(os.path.join(self.src, "r.bin"), data)
        link, _, _, sd, rd = start_pair([path], self.out, overwrite=overwrite, clock=Clock())
        link.pump()
        return link, sd, rd

    def test_partial_hard_link_is_not_hashed_nor_written(self):
        secret = os.urandom(BLOCK + 10)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX))
        link, sd, rd = self.transfer(os.urandom(BLOCK * 2))
        f = self.failureResultOf(rd, Declined)
        self.assertIn(f"r.bin{PARTIAL_SUFFIX} has 2 hard links", str(f.value))
        self.assertIn("delete or move it, then try again", str(f.value))
        self.failureResultOf(sd, TransferFailed)
        self.assertEqual(link.sent(HAVE), [], "no hash of the outside file went to the sender")
        self.assertEqual(content(outside), secret, "the outside file is untouched")
        self.assertFalse(os.path.exists(os.path.join(self.out, "r.bin")))

    def test_small_partial_hard_link_is_not_written_through(self):
        # Smaller than a block: nothing to hash, but the old code cut it and
        # wrote the sender's bytes into it (and then linked it into place).
        outside = self.outside_file(b"do not touch")
        os.link(outside, os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX))
        link, sd, rd = self.transfer(b"sender's bytes")
        self.failureResultOf(rd, Declined)
        self.assertEqual(content(outside), b"do not touch")
        self.assertEqual(os.stat(outside).st_nlink, 2, "no third name for it in OUT")

    def test_hard_linked_destination_is_not_hashed(self):
        secret = os.urandom(BLOCK * 2)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin"))
        link, sd, rd = self.transfer(secret)  # identical: the old code hashed it and skipped
        f = self.failureResultOf(rd, Declined)
        self.assertIn("r.bin already exists (use --overwrite", str(f.value))
        self.assertEqual(link.sent(HAVE), [])
        self.assertEqual(content(outside), secret)

    def test_overwrite_replaces_the_name_not_the_linked_file(self):
        secret = os.urandom(BLOCK + 3)
        outside = self.outside_file(secret)
        os.link(outside, os.path.join(self.out, "r.bin"))
        new = os.urandom(BLOCK + 3)  # same size: the old code hashed it
        link, sd, rd = self.transfer(new, overwrite=True)
        self.successResultOf(rd)
        self.assertEqual(link.sent(HAVE), [], "a linked destination is not proven to the sender")
        self.assertEqual(content(os.path.join(self.out, "r.bin")), new)
        self.assertEqual(content(outside), secret, "nothing written through the other link")
        self.assertEqual(os.stat(outside).st_nlink, 1)

    # -- place(): the partial name swapped for a link while receiving

    def swapped(self, existing: bytes | None = None, keep: bool = True):
        """A partial file being received, whose name then becomes a hard
        link to the outside file; with C{keep}, the file being received
        keeps another name in OUT (so it still has one link)."""
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        if existing is not None:
            write(os.path.join(self.out, "r.bin"), existing)
        f = out.open_partial("r.bin", 0)
        f.write(b"received")
        outside = self.outside_file(b"outside")
        partial = os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX)
        if keep:
            os.link(partial, os.path.join(self.out, "kept"))
        os.link(outside, os.path.join(self.out, "planted"))
        os.rename(os.path.join(self.out, "planted"), partial)
        return out, f, outside

    def test_place_moves_the_file_written_not_what_the_name_became(self):
        out, f, outside = self.swapped()
        out.place("r.bin", f, 0o644, None, overwrite=False)
        dest = os.path.join(self.out, "r.bin")
        self.assertEqual(content(dest), b"received")
        self.assertFalse(os.path.samefile(dest, outside), "the outside file did not become r.bin")
        self.assertEqual(content(outside), b"outside")
        self.assertTrue(os.path.samefile(os.path.join(self.out, "r.bin" + PARTIAL_SUFFIX), outside),
                        "a partial name that is not ours is left alone")

    def test_place_refuses_a_partial_whose_file_lost_its_name(self):
        out, f, outside = self.swapped(keep=False)
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=False)
        self.assertIn(f"r.bin{PARTIAL_SUFFIX} was deleted or replaced while receiving", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(self.out, "r.bin")))

    def test_place_with_overwrite_refuses_a_swapped_partial(self):
        out, f, outside = self.swapped(existing=b"old")
        with self.assertRaises(Declined) as e:
            out.place("r.bin", f, 0o644, None, overwrite=True)
        self.assertIn("was replaced by another file while receiving", str(e.exception))
        self.assertEqual(content(os.path.join(self.out, "r.bin")), b"old")
        self.assertEqual(content(outside), b"outside")

    def test_open_read_refuses_a_link_on_the_descriptor(self):
        outside = self.outside_file(b"x" * 10)
        os.link(outside, os.path.join(self.out, "r.bin"))
        out = OutputDir(self.out)
        self.addCleanup(out.close)
        self.assertRaises(Declined, out.open_read, "r.bin")
