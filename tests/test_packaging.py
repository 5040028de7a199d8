"""
What operators install: the systemd units (checked by C{systemd-analyze
verify} and for their sandboxing) and the Dockerfile, whose commands run
here as a shell script in a fresh virtualenv, since there is no Docker:

  - the RUN lines run in order under bash, with the image's paths (/src, the
    build context; /etc/p2pft) moved under a temporary root, C{pip} the fresh
    venv's, and C{useradd} a stub that records its arguments (no root here);
    the venv finds the project's dependencies through a .pth file on this
    checkout's .venv (already installed: nothing to fetch), and pip gets the
    build backend the way this machine's pip is configured to;
  - COPY lines copy from the context (this checkout's files as git sees them);
  - the CMD runs in the background, on a loopback port instead of 9000, until
    it prints that it listens; then the HEALTHCHECK command runs (while the
    server is up it must pass; once it is stopped, fail).  Where this p2pft
    has no C{ping} command yet, a Python one-liner that connects and reads
    WELCOME stands in for it.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from . import procs

ROOT = procs.ROOT
UNITS = {
    "p2pft-server.service": ("server", "/etc/p2pft/server.toml"),
    "p2pft-relay.service": ("relay", "/etc/p2pft/relay.toml"),
}
DOCKERFILE = os.path.join(ROOT, "contrib", "docker", "Dockerfile")
#: The sandboxing every unit must keep (key, value); the value None: any.
SANDBOX = [
    ("DynamicUser", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
    ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"), ("CapabilityBoundingSet", ""),
    ("Restart", "on-failure"), ("LimitNOFILE", None),
]
#: A pip install of this project from a local copy, offline, on a busy
#: 2-core machine takes about 10 s; a hung one must not hold the run.
STEP_TIMEOUT = 180


def _unit(name: str) -> dict[str, list[str]]:
    """The unit's [Service] keys, each with the values of its lines."""
    keys: dict[str, list[str]] = {}
    section = None
    with open(os.path.join(ROOT, "contrib", "systemd", name), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif line and not line.startswith(("#", ";")) and section == "[Service]":
                key, _, value = line.partition("=")
                keys.setdefault(key, []).append(value)
    return keys


class PackagesListedTests(SynchronousTestCase):
    def test_every_package_is_in_setup_cfg(self):
        """setup.cfg names its packages one by one: a package left out is
        missing from every installed p2pft (p2pft.session once was: the
        tests, run from the checkout, could not tell)."""
        import configparser
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        found = {os.path.relpath(os.path.dirname(init), ROOT).replace(os.sep, ".")
                 for init in glob.glob(os.path.join(ROOT, "p2pft", "**", "__init__.py"), recursive=True)}
        self.assertEqual(found - listed, set())


class UnitTests(SynchronousTestCase):
    def test_sandboxing_and_limits(self):
        for name, (command, config) in UNITS.items():
            keys = _unit(name)
            for key, value in SANDBOX:
                self.assertIn(key, keys, f"{name}: {key}")
                if value is not None:
                    self.assertEqual(keys[key], [value], f"{name}: {key}")
            # Above what the defaults need (a raised limit, not the usual 1024).
            self.assertGreaterEqual(int(keys["LimitNOFILE"][0]), 16384, name)
            self.assertNotIn("AmbientCapabilities", keys, name)  # only in the commented variant
            self.assertEqual(keys["ExecStart"], [f"/usr/local/bin/p2pft {command} --config {config}"])
            self.assertEqual(keys["RestartPreventExitStatus"], ["2"], name)

    def test_port_443_variant_is_there_commented(self):
        for name in UNITS:
            with open(os.path.join(ROOT, "contrib", "systemd", name), encoding="utf-8") as f:
                text = f.read()
            self.assertIn("#   AmbientCapabilities=CAP_NET_BIND_SERVICE\n", text)
            self.assertIn("#   CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n", text)

    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        # verify checks that ExecStart's program exists: point it at this
        # checkout's installed p2pft instead of /usr/local/bin's.
        p2pft = os.path.join(os.path.dirname(sys.executable), "p2pft")
        if not os.access(p2pft, os.X_OK):
            raise SkipTest(f"no console script at {p2pft} (run scripts/setup.sh)")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        paths = []
        for name in UNITS:
            with open(os.path.join(ROOT, "contrib", "systemd", name), encoding="utf-8") as f:
                text = f.read().replace("/usr/local/bin/p2pft", p2pft)
            paths.append(os.path.join(folder, name))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(text)
        done = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT)
        # verify exits 0 on unknown keys and bad values too: they are warnings.
        self.assertEqual((done.returncode, done.stdout + done.stderr), (0, ""))


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, rest), continuations joined."""
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", f.read())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _exec_form(rest: str) -> list[str]:
    import json

    argv = json.loads(rest)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = ("import socket,sys; s=socket.create_connection(('127.0.0.1',{port}),timeout=5); "
         "f=s.makefile('rb'); sys.exit(0 if f.readline().startswith(b'WELCOME ') else 1)")


class DockerfileTests(TestCase):
    def test_shape(self):
        steps = dockerfile()
        keywords = [k for k, _ in steps]
        self.assertRegex(steps[0][1], r"^python:3\.\d+-slim$")
        [user] = [rest for k, rest in steps if k == "USER"]
        self.assertNotIn(user, ("root", "0"))
        self.assertLess(keywords.index("USER"), keywords.index("CMD"))
        self.assertIn(("EXPOSE", "9000"), steps)
        [health] = [rest for k, rest in steps if k == "HEALTHCHECK"]
        self.assertIn("CMD", health)
        [cmd] = [rest for k, rest in steps if k == "CMD"]
        self.assertEqual(_exec_form(cmd), ["p2pft", "server", "--config", "/etc/p2pft/server.toml"])

    async def test_commands_build_serve_and_pass_the_healthcheck(self):
        base = os.path.abspath(self.mktemp())
        root, context, stubs = (os.path.join(base, d) for d in ("root", "context", "stubs"))
        venv = os.path.join(base, "venv")
        for d in (root, context, stubs):
            os.makedirs(d)
        self._copy_context(context)

        def here(text: str) -> str:
            text = re.sub(r"(?<![\w/])/src\b", context, text)
            return re.sub(r"(?<![\w/])/etc/p2pft\b", os.path.join(root, "etc", "p2pft"), text)

        with open(os.path.join(stubs, "useradd"), "w") as f:
            f.write(f'#!/bin/sh\necho "$@" >> {shlex.quote(os.path.join(base, "useradd.log"))}\n')
        os.chmod(os.path.join(stubs, "useradd"), 0o755)
        self._step([sys.executable, "-m", "venv", venv], {})
        [site] = glob.glob(os.path.join(venv, "lib", "python*", "site-packages"))
        with open(os.path.join(site, "checkout-deps.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "P2PFT_"))}
        env.update(PATH=os.pathsep.join([os.path.join(venv, "bin"), stubs, env.get("PATH", "")]),
                   VIRTUAL_ENV=venv)

        for keyword, rest in dockerfile():
            if keyword == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    env[key] = value
            elif keyword == "RUN":
                script = re.sub(r"^(--\S+\s+)+", "", rest)  # --mount=...: the context is here already
                self._step(["bash", "-euo", "pipefail", "-c", here(script)], env)
            elif keyword == "COPY":
                source, dest = shlex.split(rest)
                os.makedirs(os.path.dirname(here(dest)), exist_ok=True)
                shutil.copy(os.path.join(context, source), here(dest))
            elif keyword == "CMD":
                cmd = [here(a) for a in _exec_form(rest)]
            elif keyword == "HEALTHCHECK":
                health = _exec_form(rest[rest.index("CMD") + 3:].strip())
        with open(os.path.join(base, "useradd.log")) as f:
            self.assertIn("p2pft", f.read().split())
        # The installed package, not this checkout, is what runs.
        p2pft = os.path.join(venv, "bin", "p2pft")
        self.assertTrue(os.access(p2pft, os.X_OK))
        where = self._step([os.path.join(venv, "bin", "python"), "-c", "import p2pft; print(p2pft.__file__)"], env)
        self.assertTrue(where.startswith(site), where)

        # The image's config, on a loopback port instead of every interface's 9000.
        port = _free_loopback_port()
        config = os.path.join(root, "etc", "p2pft", "server.toml")
        with open(config, encoding="utf-8") as f:
            text = f.read()
        self.assertIn('\nport = "9000"\n', text)
        with open(config, "w", encoding="utf-8") as f:
            f.write(text.replace('\nport = "9000"\n', f'\nport = "tcp:{port}:interface=127.0.0.1"\n'))
        health = [a.replace("9000", str(port)) for a in health]
        has_ping = subprocess.run([p2pft, "ping", "--help"], env=env, capture_output=True,
                                  timeout=STEP_TIMEOUT).returncode == 0
        if not has_ping:  # the observability work adds it; until then:
            health = [os.path.join(venv, "bin", "python"), "-c", PROBE.format(port=port)]

        server = procs.Proc("container-cmd")
        reactor.spawnProcess(server, p2pft, cmd, env=env, path=base)
        self.addCleanup(self._reap, server)
        await server.wait_for(rf"listening on 127\.0\.0\.1:{port}\b")
        up = subprocess.run(health, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr + server.text())
        server.kill(signal.SIGTERM)
        await server.wait_exit()
        down = subprocess.run(health, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        self.assertNotEqual(down.returncode, 0, "the health check passes with the server stopped")

    def _copy_context(self, context: str) -> None:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True,
                                timeout=STEP_TIMEOUT).stdout.decode().split("\0")
        for name in filter(None, listed):
            source = os.path.join(ROOT, name)
            if os.path.isfile(source):
                os.makedirs(os.path.join(context, os.path.dirname(name)), exist_ok=True)
                shutil.copy2(source, os.path.join(context, name))

    def _step(self, argv: list[str], env: dict) -> str:
        done = subprocess.run(argv, env=env or None, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        self.assertEqual(done.returncode, 0, f"{argv}\n{done.stdout}\n{done.stderr}")
        return done.stdout.strip()

    async def _reap(self, proc: procs.Proc) -> None:
        proc.kill()
        if proc.exit_code is None:
            await proc.ended
