"""
L{p2pft.addresses.relay_host_problem}: the one policy for what a relay's
host may look like (the review found two validators that disagreed: the
rendezvous client let C{127.1}, C{a..b} or 64-character labels through
WELCOME, the session then dropped them, and C{x_y} failed the whole session).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from p2pft.addresses import MAX_HOST_NAME, relay_host_problem

GOOD = [
    "203.0.113.7", "127.0.0.1", "::1", "2001:db8::7", "::ffff:192.0.2.1",
    "relay.example", "relay.example.", "r", "xn--bcher-kva.example", "a-b.c-d.example",
    "1relay.example", "relay.123abc", "foo.0xg", "a" * 63 + ".example",
    ".".join(["a" * 63] * 3) + "." + "a" * 61,  # 253 characters
]

BAD = {
    "": "no host",
    "fe80::1%eth0": "an address with a scope",
    "a%b": "not a host name",
    # Legacy numeric forms: the C library reads them as 127.0.0.1.
    "127.1": "a numeric address that is not a plain IP literal",
    "2130706433": "a numeric address that is not a plain IP literal",
    "0x7f.1": "a numeric address that is not a plain IP literal",
    "0x7f000001": "a numeric address that is not a plain IP literal",
    "127.000.0.1": "a numeric address that is not a plain IP literal",
    "1.2.3.4.5": "a numeric address that is not a plain IP literal",
    "relay.0x": "a numeric address that is not a plain IP literal",
    "a..b": "a host name with an empty label",
    ".": "a host name with an empty label",
    ".relay": "a host name with an empty label",
    "relay..": "a host name with an empty label",
    "a.-b": "a host name with a label that starts or ends with '-'",
    "a-.b": "a host name with a label that starts or ends with '-'",
    "-relay": "a host name with a label that starts or ends with '-'",
    "a" * 64 + ".example": "a host name with a label longer than 63 characters",
    ("a." * 127)[:-1] + "aa": f"a host name longer than {MAX_HOST_NAME} characters",
    "x_y": "not a host name (only ASCII letters, digits, '-' and '.')",
    "relay example": "not a host name (only ASCII letters, digits, '-' and '.')",
    "relay\x1b[2J": "not a host name (only ASCII letters, digits, '-' and '.')",
    "r\u00e9lay.example": "not a host name (only ASCII letters, digits, '-' and '.')",
    "[::1]": "not a host name (only ASCII letters, digits, '-' and '.')",
}


class RelayHostProblemTests(SynchronousTestCase):
    def test_ip_literals_and_host_names_pass(self):
        for host in GOOD:
            self.assertIsNone(relay_host_problem(host), host)

    def test_everything_else_has_a_reason(self):
        for host, reason in BAD.items():
            self.assertEqual(relay_host_problem(host), reason, host)

    def test_the_reason_never_repeats_the_host(self):
        # The caller prints the host escaped; the reason is safe as it is.
        for host in BAD:
            if host:
                self.assertNotIn(host, relay_host_problem(host))

    def test_not_a_string(self):
        for host in (None, 7, b"relay.example", ["relay.example"]):
            self.assertEqual(relay_host_problem(host), "no host")
