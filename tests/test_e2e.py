"""
End to end on loopback, no root needed: real server, sender and receiver
processes; the twistd plugins; the CLI's exit codes and one-line errors.
"""

from __future__ import annotations

import os
import pty
import signal

from twisted.trial.unittest import SkipTest, TestCase

from tests.files import make_file, sha256_of
from tests.procs import Workspace, p2pft_argv, spawn, start_server, twistd_argv


class LoopbackEndToEndTests(TestCase):
    timeout = 120

    async def test_send_receive_json(self):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "movie.bin"), 3 * 1024 * 1024 + 17)
        server, addr = await start_server(self)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", addr, src))
        m = await sender.wait_for(r'"event": "code", "code": "([^"]+)"', "out")
        code = m.group(1)
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--json", "-o", ws.out, addr, code))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        dest = os.path.join(ws.out, "movie.bin")
        self.assertEqual(sha256_of(dest), sha256_of(src))
        for proc in (sender, receiver):
            events = proc.events()
            kinds = [e["event"] for e in events]
            self.assertEqual(kinds[0], "code")
            connected = [e for e in events if e["event"] == "connected"]
            self.assertEqual(len(connected), 1)
            self.assertEqual(connected[0]["path"], "direct")
            self.assertRegex(connected[0]["peer"], r"^127\.0\.0\.1:\d+$")
            done = events[-1]
            self.assertEqual(done["event"], "done", proc.text())
            self.assertEqual(done["bytes"], os.path.getsize(src))
            self.assertIn(f"Connected to {connected[0]['peer']} successfully!", proc.err.decode())
        self.assertEqual(sorted(os.listdir(ws.out)), ["movie.bin"])

    async def test_server_killed_after_connection(self):
        """
        The receiver (on a terminal, no --yes) is asked about the offer only
        after the direct connection is up; the server dies before we answer
        and the transfer still completes.
        """
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "data.bin"), 2 * 1024 * 1024)
        server, addr = await start_server(self)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        sender = spawn(self, "sender", p2pft_argv("send", "--code", "12-alpha-beta", addr, src))
        receiver = spawn(self, "receiver", p2pft_argv("rcv", "-o", ws.out, addr),
                         childFDs={0: slave, 1: "r", 2: "r"}, P2PFT_CODE="12-alpha-beta")
        os.close(slave)
        await receiver.wait_for(r"Receive data\.bin \(2\.1 MB\)\? \[y/N\]", "err")
        await sender.wait_for(r"Connected to 127\.0\.0\.1:\d+ successfully!", "err")
        server.kill(signal.SIGKILL)
        await server.wait_exit()
        os.write(master, b"y\n")
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(sha256_of(os.path.join(ws.out, "data.bin")), sha256_of(src))

    async def test_receiver_says_no(self):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "no.bin"), 1000)
        server, addr = await start_server(self)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        sender = spawn(self, "sender", p2pft_argv("send", "--code", "3-x-y", addr, src))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "-o", ws.out, addr, "3-x-y"),
                         childFDs={0: slave, 1: "r", 2: "r"})
        os.close(slave)
        await receiver.wait_for(r"\[y/N\]", "err")
        os.write(master, b"n\n")
        self.assertNotEqual(await receiver.wait_exit(), 0)
        self.assertEqual(await sender.wait_exit(), 1)
        self.assertIn("the receiver declined", sender.err.decode())
        self.assertEqual(os.listdir(ws.out), [])

    async def test_wrong_code_fails_both_sides(self):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "secret.bin"), 1000)
        server, addr = await start_server(self)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "7-right-words", addr, src))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--json", "-o", ws.out, addr, "7-wrong-words"))
        self.assertEqual(await sender.wait_exit(timeout=20), 1)
        self.assertEqual(await receiver.wait_exit(timeout=20), 1)
        for proc in (sender, receiver):
            self.assertIn("wrong code", proc.err.decode())
            self.assertEqual(proc.events()[-1]["event"], "error")
            self.assertEqual(len(proc.err.decode().strip().splitlines()[-1:]), 1)
        self.assertEqual(os.listdir(ws.out), [])

    async def test_twistd_plugins_serve_and_send(self):
        """twistd -n p2pft-server serves real clients; twistd -n p2pft send works."""
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "t.bin"), 100000)
        server = spawn(self, "twistd-server", twistd_argv(
            "-n", "--pidfile=", "--logfile=-", "p2pft-server", "--port", "tcp:0:interface=127.0.0.1"), cwd=ws.root)
        m = await server.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        addr = f"127.0.0.1:{m.group(1)}"
        sender = spawn(self, "twistd-sender", twistd_argv(
            "-n", "--pidfile=", "--logfile=-", "p2pft", "send", "--code", "9-twist-d", addr, src), cwd=ws.root)
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "-o", ws.out, addr, "9-twist-d"))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text() + server.text())
        await sender.wait_exit()
        self.assertIn("Sent t.bin", sender.err.decode() + sender.out.decode())
        self.assertEqual(sha256_of(os.path.join(ws.out, "t.bin")), sha256_of(src))


class CommandLineErrorTests(TestCase):
    """Bad input: one clear line on stderr and a non-zero exit."""

    timeout = 60

    async def run_cli(self, *args, expect=None, **env):
        proc = spawn(self, "p2pft", p2pft_argv(*args), **env)
        code = await proc.wait_exit(timeout=30)
        err = proc.err.decode().strip().splitlines()
        self.assertEqual(len(err), 1, proc.text())
        if expect:
            self.assertIn(expect, err[0])
        return code, err[0]

    async def test_usage_errors_exit_2(self):
        cases = [
            (("send",), "send needs SERVER:PORT and at least one PATH"),
            (("send", "nohostport", "x"), "server must be HOST:PORT"),
            (("receive", "h:1", "not-a-code"), "code must start with a number"),
            (("frobnicate",), "Unknown command"),
            ((), "choose a command"),
            (("send", "--code", "x", "h:1", "f"), "code must start with a number"),
            (("send", "--code-length", "0", "h:1", "f"), "--code-length"),
        ]
        for args, expect in cases:
            code, line = await self.run_cli(*args, expect=expect)
            self.assertEqual(code, 2, (args, line))

    async def test_missing_file(self):
        code, line = await self.run_cli("send", "127.0.0.1:9", "/nonexistent/file", expect="no such file")
        self.assertEqual(code, 1)

    async def test_unreachable_server(self):
        src = make_file(self.mktemp(), 10)
        code, line = await self.run_cli("send", "--code", "5-a-b", "127.0.0.1:1", src, expect="cannot reach the rendezvous server")
        self.assertEqual(code, 1)

    async def test_receive_without_code_or_terminal(self):
        code, line = await self.run_cli("receive", "127.0.0.1:9", expect="no code given")
        self.assertEqual(code, 2)

    async def test_server_port_in_use(self):
        server, addr = await start_server(self)
        port = addr.rsplit(":", 1)[1]
        code, line = await self.run_cli("server", "--port", f"tcp:{port}:interface=127.0.0.1", expect="cannot listen")
        self.assertEqual(code, 1)


class InterruptTests(TestCase):
    """Ctrl-C on either side: exit 130 at once, the other side is told why,
    and nothing is left behind."""

    timeout = 90

    async def prompt_session(self):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "f.bin"), 50_000)
        server, addr = await start_server(self)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "21-ctrl-c", addr, src))
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--json", "-o", ws.out, addr, "21-ctrl-c"),
                         childFDs={0: slave, 1: "r", 2: "r"})
        os.close(slave)
        await receiver.wait_for(r"\[y/N\]", "err")
        return ws, sender, receiver

    async def test_sender_interrupted_while_receiver_is_asked(self):
        ws, sender, receiver = await self.prompt_session()
        sender.kill(signal.SIGINT)
        self.assertEqual(await sender.wait_exit(timeout=10), 130, sender.text())
        # The receiver stops without anyone answering its prompt.
        self.assertEqual(await receiver.wait_exit(timeout=10), 1, receiver.text())
        self.assertIn("p2pft: error: interrupted", sender.err.decode())
        self.assertIn("the other side stopped: interrupted", receiver.err.decode())
        self.assertEqual(os.listdir(ws.out), [])

    async def test_receiver_interrupted_at_its_prompt(self):
        ws, sender, receiver = await self.prompt_session()
        receiver.kill(signal.SIGINT)
        self.assertEqual(await receiver.wait_exit(timeout=10), 130, receiver.text())
        self.assertEqual(await sender.wait_exit(timeout=10), 1, sender.text())
        self.assertIn("the other side stopped: interrupted", sender.err.decode())
        self.assertEqual(os.listdir(ws.out), [])

    async def test_twistd_server_on_busy_port_logs_and_exits(self):
        server, addr = await start_server(self)
        port = addr.rsplit(":", 1)[1]
        cwd = self.mktemp()
        os.makedirs(cwd)
        twistd = spawn(self, "twistd", twistd_argv(
            "-n", "--pidfile=", "--logfile=-", "p2pft-server", "--port", f"tcp:{port}:interface=127.0.0.1"),
            cwd=cwd)
        await twistd.wait_exit(timeout=20)
        self.assertIn("cannot listen", twistd.out.decode() + twistd.err.decode())


class IPv6Tests(TestCase):
    """Dual-stack: IPv6 rendezvous and punching, and IPv4 and IPv6 peers
    meeting on one server (all on loopback)."""

    timeout = 60

    async def start(self, endpoint: str):
        server = spawn(self, "server", p2pft_argv("server", "--port", endpoint))
        m = await server.wait_for(r"listening on (\S+):(\d+)")
        return server, int(m.group(2))

    async def exchange(self, sender_addr: str, receiver_addr: str):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "six.bin"), 300_000)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "66-six-four", sender_addr, src))
        receiver = spawn(self, "receiver", p2pft_argv(
            "receive", "--json", "--yes", "-o", ws.out, receiver_addr, "66-six-four"))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text() + sender.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(sha256_of(os.path.join(ws.out, "six.bin")), sha256_of(src))
        return [[e for e in p.events() if e["event"] == "connected"][0] for p in (sender, receiver)]

    async def test_ipv6_only(self):
        server, port = await self.start("tcp6:0:interface=\\:\\:1")
        s, r = await self.exchange(f"[::1]:{port}", f"[::1]:{port}")
        self.assertRegex(s["peer"], r"^\[::1\]:\d+$")
        self.assertRegex(r["peer"], r"^\[::1\]:\d+$")
        self.assertEqual((s["path"], r["path"]), ("direct", "direct"))

    async def test_ipv4_and_ipv6_peers_on_one_dual_stack_server(self):
        server, port = await self.start("tcp6:0:interface=\\:\\:")
        s, r = await self.exchange(f"127.0.0.1:{port}", f"[::1]:{port}")
        # Each dialled the other in its own family; both listen on both.
        self.assertRegex(s["peer"], r"^\[::1\]:\d+$|^127\.0\.0\.1:\d+$")
        self.assertEqual((s["path"], r["path"]), ("direct", "direct"))

    async def test_server_by_name_is_reached_over_ipv4(self):
        """A name with IPv4 and IPv6 addresses: the rendezvous goes over IPv4,
        the family NATs translate, so the public candidate is the one a peer
        behind a NAT needs (IPv6 addresses are offered on top)."""
        import socket

        families = {ai[0] for ai in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)}
        if socket.AF_INET not in families:
            raise SkipTest("localhost has no IPv4 address here")
        server, port = await self.start("tcp6:0:interface=\\:\\:")
        s, r = await self.exchange(f"localhost:{port}", f"localhost:{port}")
        self.assertRegex(s["peer"], r"^127\.0\.0\.1:\d+$")
        self.assertRegex(r["peer"], r"^127\.0\.0\.1:\d+$")


class PipeTests(TestCase):
    """p2pft send SERVER -  /  p2pft receive --output -"""

    timeout = 60

    async def test_pipe_to_pipe(self):
        server, addr = await start_server(self)
        data = os.urandom(6 * 1024 * 1024 + 321)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "81-pipe-pipe", addr, "-"),
                       childFDs={0: "w", 1: "r", 2: "r"})
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--output", "-", addr, "81-pipe-pipe"))
        await sender.wait_for(r'"event": "connected"', "out")
        for i in range(0, len(data), 1 << 20):  # arrives in pieces, like a real pipe
            sender.transport.writeToChild(0, data[i:i + (1 << 20)])
        sender.transport.closeChildFD(0)
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text()[-2000:])
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(len(receiver.out), len(data))
        self.assertEqual(receiver.out, data)  # stdout holds the data and nothing else
        self.assertIn("Received stdin", receiver.err.decode())
        [offer] = [e for e in sender.events() if e["event"] == "offer"]
        self.assertEqual(offer, {"event": "offer", "name": "stdin", "files": 1, "folders": 0, "size": None,
                                 "top": ["stdin"], "top_count": 1})

    async def test_limit_rate_holds_a_pipe_back(self):
        server, addr = await start_server(self)
        data = os.urandom(3_000_000)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--limit-rate", "2M", "--code", "83-pipe-rate",
                                                  addr, "-"), childFDs={0: "w", 1: "r", 2: "r"})
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "--output", "-", addr, "83-pipe-rate"))
        await sender.wait_for(r'"event": "connected"', "out")
        sender.transport.writeToChild(0, data)
        sender.transport.closeChildFD(0)
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text()[-2000:])
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(receiver.out, data)
        done = sender.events()[-1]
        # At 2 MB/s, all but the first read (at most 1 MiB) waits for the limit.
        self.assertGreaterEqual(done["seconds"], (len(data) - (1 << 20)) / 2_000_000 * 0.95, done)

    async def test_stdin_redirected_from_a_file_has_its_size(self):
        ws = Workspace(self)
        src = make_file(os.path.join(ws.src, "r.bin"), 100_000)
        server, addr = await start_server(self)
        fd = os.open(src, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        sender = spawn(self, "sender", p2pft_argv("send", "--json", "--code", "82-redir-ect", addr, "-"),
                       childFDs={0: fd, 1: "r", 2: "r"})
        receiver = spawn(self, "receiver", p2pft_argv("receive", "--yes", "-o", ws.out, addr, "82-redir-ect"))
        self.assertEqual(await receiver.wait_exit(), 0, receiver.text())
        self.assertEqual(await sender.wait_exit(), 0, sender.text())
        self.assertEqual(sha256_of(os.path.join(ws.out, "stdin")), sha256_of(src))
        [offer] = [e for e in sender.events() if e["event"] == "offer"]
        self.assertEqual(offer["size"], 100_000)
