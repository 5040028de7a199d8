"""
p2pft 0.2 (protocol v2, before FILES records) against this one, on
loopback, the real CLI both ways: a folder of small and large files
arrives whole and identical, one file at a time, as 0.2 sends and takes
it (the receiver's ACCEPT says whether it takes FILES; 0.2's says nothing).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.files import make_file
from tests.procs import Workspace, older_checkout, p2pft_argv, spawn, start_server

#: p2pft 0.2.0, the last commit before FILES records.
OLDER_COMMIT = "dc0af8c"


class OlderPeerTests(TestCase):
    timeout = 90

    def setUp(self):
        self.older = older_checkout(self, OLDER_COMMIT, "p2pft 0.2.0", ("__init__.py", '__version__ = "0.2.0"'))

    async def _both_ways(self, older_role: str):
        ws = Workspace(self)
        top = os.path.join(ws.src, "tree")
        files = {}
        for i in range(40):
            folder = os.path.join(top, f"d{i % 3}")
            os.makedirs(folder, exist_ok=True)
            files[os.path.relpath(make_file(os.path.join(folder, f"f{i}"), i * 97), ws.src)] = None
        files[os.path.relpath(make_file(os.path.join(top, "big.bin"), 3 << 20), ws.src)] = None
        server, addr = await start_server(self)
        code = "72-older-peer"
        argv = {"send": ["send", "--json", "--code", code, addr, top],
                "receive": ["receive", "--json", "--yes", "-o", ws.out, addr, code]}
        newer_role = "receive" if older_role == "send" else "send"
        older = spawn(self, f"0.2 {older_role}", p2pft_argv(*argv[older_role]), cwd=self.older,
                      PYTHONPATH=self.older)
        if older_role == "send":
            await older.wait_for(r'"event": "code"')
        newer = spawn(self, f"0.3 {newer_role}", p2pft_argv(*argv[newer_role]))
        diagnostics = lambda: older.text() + newer.text() + server.text()
        self.assertEqual(await older.wait_exit(60), 0, diagnostics())
        self.assertEqual(await newer.wait_exit(60), 0, diagnostics())
        for name in files:
            with open(os.path.join(ws.src, name), "rb") as a, open(os.path.join(ws.out, name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        self.assertEqual(sorted(os.listdir(ws.out)), ["tree"])

    async def test_older_sender(self):
        await self._both_ways("send")

    async def test_older_receiver(self):
        await self._both_ways("receive")
