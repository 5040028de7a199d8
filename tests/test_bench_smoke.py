"""
The benchmark suite's smoke run, so that bench/suite.py cannot rot: tiny
transfers, one run, the p2pft rows and a small server load.  Not a
benchmark (the numbers are not checked), and no root needed: without
permission for a network namespace it runs on plain loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSuiteSmokeTests(TestCase):
    timeout = 180

    def test_smoke(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        env.pop("P2PFT_BENCH_NETNS", None)
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "suite.py"), "--smoke", "--no-write"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, encoding="utf-8", timeout=120,
        )
        output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        self.assertEqual(done.returncode, 0, output)
        lines = done.stdout.splitlines()
        header = [line for line in lines if line.startswith("tool ")]
        self.assertEqual(len(header), 1, output)
        for column in ("MB/s", "send CPU s", "recv CPU s", "CPU s/GiB", "send RSS MiB", "recv RSS MiB",
                       "first byte s"):
            self.assertIn(column, header[0])
        for label in ("p2pft file → file", "p2pft stdin → stdout", "p2pft via its relay"):
            row = [line for line in lines if line.startswith(label + " ")]
            self.assertEqual(len(row), 1, f"no row {label!r}\n{output}")
            self.assertRegex(row[0], rf"^{label}\s+\d+\s+\d+\.\d\d\s", output)
        self.assertIn("targets (this run)", done.stdout)
        self.assertRegex(done.stdout, r"\d[\d,]* pairings/s", output)
        self.assertRegex(done.stdout, r"relay, one session, one way\s+\d+ MB/s", output)
