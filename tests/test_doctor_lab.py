"""
C{p2pft doctor} in the NAT lab: behind a symmetric NAT whose router runs a
real miniupnpd it says symmetric, that the router speaks all three
protocols and maps, and that direct connections are likely; behind a NAT
that keeps ports and maps nothing, it says so.

Needs root, miniupnpd and nft (scripts/setup.sh installs them): skipped
with a reason elsewhere, a failure when P2PFT_NATLAB_REQUIRED is set.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests import natlab_upnp
from tests.natlab import Nat, start_lab
from tests.procs import p2pft_argv, spawn
from tests.test_portmap_lab import _require_upnp_lab

PORT = 9000


class DoctorLabTests(TestCase):
    timeout = 90

    async def test_symmetric_nat_with_miniupnpd_and_a_plain_one(self):
        _require_upnp_lab(self)
        lab = start_lab(self, a=Nat("symmetric", upnp=True), b=Nat("masquerade"))
        server = spawn(self, "server", lab.exec_argv("server", p2pft_argv(
            "server", "--port", f"tcp:{PORT}:interface={lab.server_ip}")))
        await server.wait_for(r"listening on ")
        addr = f"{lab.server_ip}:{PORT}"
        found = {}
        for host in ("a", "b"):
            proc = spawn(self, f"doctor-{host}", lab.exec_argv(host, p2pft_argv("doctor", "--json", addr)))
            self.assertEqual(await proc.wait_exit(), 0, proc.err.decode())
            found[host] = json.loads(proc.out)
        a, b = found["a"], found["b"]
        self.assertEqual(a["nat"], "random-ports", a)
        self.assertEqual({p: bool(v) for p, v in a["router"]["answers"].items()},
                         {"pcp": True, "nat-pmp": True, "upnp": True}, a)
        self.assertEqual(a["router"]["mapping"]["protocol"], "pcp", a)
        self.assertEqual(a["router"]["mapping"]["external"].rsplit(":", 1)[0], lab.public_ip("a"))
        self.assertEqual(a["direct"], "likely")
        self.assertEqual(natlab_upnp.mappings(lab, "natA"), [])
        self.assertEqual(b["nat"], "keeps-ports", b)
        self.assertEqual(b["router"]["answers"], {"pcp": None, "nat-pmp": None, "upnp": None}, b)
        self.assertIsNone(b["router"]["mapping"])
        self.assertEqual(b["direct"], "likely")
        # And in plain lines.
        proc = spawn(self, "doctor-a", lab.exec_argv("a", p2pft_argv("doctor", addr)))
        self.assertEqual(await proc.wait_exit(), 0, proc.err.decode())
        text = proc.out.decode()
        self.assertIn("NAT: symmetric", text)
        self.assertIn("PCP yes, NAT-PMP yes, UPnP-IGD yes; a test mapping with PCP worked", text)
        print("\n    " + text.replace("\n", "\n    "), end=" ")
