"""
The layers, written down once, and a test that the code keeps to them:
every module of p2pft belongs to one layer, imports only modules of its own
layer or lower ones, and no two modules import each other, even through
others (imports inside functions count: they are how a layer reaches up
lazily, which is just as much an upward edge; imports for type hints only,
under C{if TYPE_CHECKING:}, do not).
"""

from __future__ import annotations

import ast
import os
import pkgutil

from twisted.trial.unittest import SynchronousTestCase

import p2pft

#: Lowest first.  A module is named by its dotted path below p2pft; a
#: package name stands for every module in it not listed on its own.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "util", "addresses", "codes", "logs"),
    ("rendezvous", "server.limits"),
    ("punch", "punch_schedule", "birthday", "secure", "candidates", "portmap"),
    ("channel",),
    ("session",),
    ("transfer",),
    ("peer", "connect", "doctor"),
    ("server",),
    ("ui", "config", "completion"),
    ("options",),
    ("cli",),
    ("client_tap", "server_tap", "relay_tap", "__main__"),
]
#: What the server side may import below it: nothing of the peer's layers.
SERVER_MUST_NOT_IMPORT = ("punch", "secure", "channel", "session", "transfer", "peer", "connect", "ui",
                          "options", "cli")


def _modules() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(p2pft.__path__, "p2pft."):
        found.append(info.name[len("p2pft."):])
    return found


def layer_of(module: str) -> int | None:
    """The layer index of C{module} (the most specific entry that names it)."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def _path(module: str) -> str:
    base = os.path.join(os.path.dirname(p2pft.__file__), *module.split("."))
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under C{if TYPE_CHECKING:} (imports for
    type hints only: never run, so no edge between modules)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str) -> set[str]:
    """The p2pft modules C{module} imports, anywhere in it."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    if os.path.basename(_path(module)) == "__init__.py":
        package = module
    tree = ast.parse(open(_path(module), encoding="utf-8").read())
    known = set(_modules())
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level > 1:
                    parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("p2pft"):
                base = node.module[len("p2pft."):] if node.module != "p2pft" else ""
            else:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if candidate in known:
                    out.add(candidate)
                elif base in known:
                    out.add(base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("p2pft."):
                    name = alias.name[len("p2pft."):]
                    if name in known:
                        out.add(name)
    out.discard(module)
    return out


class LayerTests(SynchronousTestCase):
    def test_every_module_has_a_layer(self):
        missing = [m for m in _modules() if layer_of(m) is None]
        self.assertEqual(missing, [], "give each module a layer in LAYERS")

    def test_no_module_imports_a_higher_layer(self):
        upward = []
        for module in _modules():
            for target in imports_of(module):
                if layer_of(target) > layer_of(module):
                    upward.append(f"{module} -> {target}")
        self.assertEqual(upward, [])

    def test_server_side_never_imports_the_peer_layers(self):
        bad = [f"{m} -> {t}" for m in _modules() if m == "server" or m.startswith("server.")
               for t in imports_of(m) if any(t == n or t.startswith(n + ".") for n in SERVER_MUST_NOT_IMPORT)]
        self.assertEqual(bad, [])

    def test_no_import_cycles(self):
        graph = {m: imports_of(m) for m in _modules()}
        # A package's __init__ importing its own modules is not a cycle with them.
        for m, targets in graph.items():
            graph[m] = {t for t in targets if not (t.startswith(m + ".") or m.startswith(t + ".")
                                                   and os.path.basename(_path(t)) == "__init__.py")}
        cycles = []
        state: dict[str, int] = {}

        def visit(node, stack):
            state[node] = 1
            stack.append(node)
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == 1:
                    cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
                elif state.get(nxt) is None:
                    visit(nxt, stack)
            stack.pop()
            state[node] = 2

        for m in sorted(graph):
            if m not in state:
                visit(m, [])
        self.assertEqual(cycles, [])

    def test_the_checker_sees_an_upward_import(self):
        # The test itself must be able to fail: cli is above peer.
        self.assertGreater(layer_of("cli"), layer_of("peer"))
        self.assertIn("peer", imports_of("cli"))
