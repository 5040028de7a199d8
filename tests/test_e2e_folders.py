"""
End to end on loopback with real processes: folders and many paths, the
summary prompt, resuming after SIGKILL or Ctrl-C of either side, and the
10,000-file tree.
"""

from __future__ import annotations

import os
import pty
import signal
import time

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from p2pft.ui import human_size
from tests.files import make_file
from tests.memlink import tree
from tests.procs import p2pft_argv, spawn
from tests.procs import Workspace, start_server

MiB = 1 << 20
log = Logger()


class FolderEndToEndTests(TestCase):
    timeout = 180

    async def transfer(self, ws, addr, paths, code, send_args=(), receive_args=()):
        """Run one send and receive to the end; return both processes."""
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", code, *send_args, addr, *paths))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--json", "-o", ws.out,
                                                      *receive_args, addr, code))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        return sender, receiver

    async def test_files_and_folders_with_summary_prompt(self):
        ws = Workspace(self)
        make_file(os.path.join(ws.src, "a.iso"), 300_000)
        os.makedirs(os.path.join(ws.src, "photos", "empty"))
        make_file(os.path.join(ws.src, "photos", "\u00e9t\u00e9.jpg"), 5000)
        make_file(os.path.join(ws.src, "notes.txt"), 10)
        server, addr = await start_server(self)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        paths = [os.path.join(ws.src, n) for n in ("a.iso", "photos", "notes.txt")]
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "4-fold-ers", addr, *paths))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "-o", ws.out, addr, "4-fold-ers"),
                         childFDs={0: slave, 1: "r", 2: "r"})
        os.close(slave)
        await receiver.wait_for(
            r"Receive a\.iso, photos/, notes\.txt \(3 files in 2 folders, 305\.0 kB\)\? \[y/N\]", "err")
        os.write(master, b"y\n")
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(tree(ws.out), tree(ws.src))
        self.assertIn("Received 3 items: 3 files, 305.0 kB", receiver.err.decode())  # exact bytes: --json
        done = sender.events()[-1]
        self.assertEqual((done["event"], done["files"], done["bytes"], done["resumed"], done["name"]),
                         ("done", 3, 305010, 0, "3 items"))

    async def test_ten_thousand_small_files(self):
        ws = Workspace(self)
        root = os.path.join(ws.src, "many")
        for d in range(50):
            os.makedirs(os.path.join(root, f"dir{d:02}"))
            for f in range(200):
                with open(os.path.join(root, f"dir{d:02}", f"f{f:03}.txt"), "wb") as fh:
                    fh.write(b"x" * (d * 200 + f) if f % 2 else b"")
        server, addr = await start_server(self)
        started = time.monotonic()
        sender, receiver = await self.transfer(ws, addr, [root], "5-ten-thousand")
        first = time.monotonic() - started
        self.assertEqual(tree(os.path.join(ws.out, "many")), tree(root))
        self.assertEqual(receiver.events()[-1]["files"], 10_000)
        # Once more: every file is checked and none is sent again.
        started = time.monotonic()
        sender, receiver = await self.transfer(ws, addr, [root], "6-ten-thousand")
        done = receiver.events()[-1]
        self.assertEqual((done["skipped"], done["resumed"]), (done["bytes"], 0))
        log.info("10,000 files: {first:.2f} s, again (all checked, none sent): {again:.2f} s",
                 first=first, again=time.monotonic() - started)  # in _trial_temp/test.log

    async def interrupt_and_resume(self, victim, sig=signal.SIGKILL, at=12 * MiB):
        """Send a folder of two 24 MiB files at 16 MB/s; kill C{victim}
        once C{at} bytes arrived; run both again; check the result."""
        ws = Workspace(self)
        folder = os.path.join(ws.src, "two")
        os.makedirs(folder)
        for name in ("one.bin", "two.bin"):
            make_file(os.path.join(folder, name), 24 * MiB)
        server, addr = await start_server(self)
        # A killed peer looks like a cut network: the survivor tries to
        # reconnect (for 2 s here, 5 minutes by default) and then fails.
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--limit-rate", "16M", "--code",
                                                  "7-cut-here", "--reconnect-timeout", "2", addr, folder))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--json", "-o", ws.out, addr,
                                                      "--reconnect-timeout", "2", "7-cut-here"))
        await receiver.wait_until(lambda p: p.progress() >= at, f"{at} bytes received")
        procs = {"sender": sender, "receiver": receiver}
        procs[victim].kill(sig)
        await procs[victim].wait_exit()
        survivor = procs["receiver" if victim == "sender" else "sender"]
        self.assertEqual(await survivor.wait_exit(), 1, survivor.text())
        self.assertIn("to resume", survivor.err.decode())
        if sig == signal.SIGKILL:
            self.assertIn("reconnecting for 2 s failed", survivor.err.decode())
        sender, receiver = await self.transfer(ws, addr, [folder], "8-once-more")
        self.assertEqual(tree(ws.out), tree(ws.src))
        done = receiver.events()[-1]
        self.assertEqual(done["bytes"], 48 * MiB)
        # Whole 4 MiB blocks that arrived before the cut are not sent again.
        # (A first file that was complete is checked and skipped instead.)
        kept = done["resumed"] + done["skipped"]
        self.assertGreaterEqual(kept, at - 4 * MiB - 4 * MiB)
        self.assertLess(kept, 48 * MiB)
        if done["resumed"]:
            self.assertIn(f"{human_size(done['resumed'])} of it already there (resumed)", receiver.err.decode())
        if done["skipped"]:
            self.assertIn(f"{human_size(done['skipped'])} already there and identical", receiver.err.decode())
        return done

    async def test_receiver_killed_in_the_first_file(self):
        await self.interrupt_and_resume("receiver", at=10 * MiB)

    async def test_receiver_killed_in_the_second_file(self):
        done = await self.interrupt_and_resume("receiver", at=30 * MiB)
        # The first file is complete and identical: checked, not sent.
        self.assertGreaterEqual(done["resumed"] + done["skipped"], 24 * MiB)

    async def test_sender_killed(self):
        await self.interrupt_and_resume("sender", at=18 * MiB)

    async def test_sender_interrupted_with_ctrl_c(self):
        await self.interrupt_and_resume("sender", sig=signal.SIGINT, at=12 * MiB)

    async def test_receiver_interrupted_with_ctrl_c(self):
        await self.interrupt_and_resume("receiver", sig=signal.SIGINT, at=12 * MiB)

    async def test_missing_path_reported_before_connecting(self):
        ws = Workspace(self)
        make_file(os.path.join(ws.src, "here.txt"), 10)
        proc = spawn(self, "sender", p2pft_argv("send", "127.0.0.1:9", os.path.join(ws.src, "here.txt"),
                                                os.path.join(ws.src, "gone.txt")))
        self.assertEqual(await proc.wait_exit(), 1)
        self.assertRegex(proc.err.decode(), r"p2pft: error: .*gone\.txt: no such file or folder\n$")
