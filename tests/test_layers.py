"""The layers of docs/design.md hold in the code: every import of a cloudnbd module (at
module level, inside a function, or for type checking only) points to its own layer or
one below, and no two modules import each other, however indirectly.

LAYERS is the diagram of docs/design.md ("Layers") as data; a new module must be
placed in it, and the diagram kept in step.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cloudnbd"

#: top first; a module belongs to the layer of its longest matching prefix
LAYERS = (
    ("commands", ("cloudnbd.__main__", "cloudnbd.cli", "cloudnbd.config")),
    ("a serving process's life", ("cloudnbd.daemon",)),
    ("a running volume", ("cloudnbd.service",)),
    ("what it shows, where it runs", ("cloudnbd.metrics", "cloudnbd.control",
                                      "cloudnbd.rates", "cloudnbd.runtime")),
    ("engine", ("cloudnbd.engine",)),
    ("nbd", ("cloudnbd.nbd",)),
    ("offline commands", ("cloudnbd.transfer", "cloudnbd.convert", "cloudnbd.snapshots")),
    ("images", ("cloudnbd.offline", "cloudnbd.reader")),
    ("volumes", ("cloudnbd.volume", "cloudnbd.objects", "cloudnbd.backends.remote",
                 "cloudnbd.logs")),
    ("chunks, lease, codec", ("cloudnbd.chunks", "cloudnbd.layout", "cloudnbd.lease",
                              "cloudnbd.codec", "cloudnbd.kdf", "cloudnbd.zygote")),
    ("backends", ("cloudnbd.backends", "cloudnbd.credentials")),
    ("foundations", ("cloudnbd.errors", "cloudnbd.sizes", "cloudnbd.identity",
                     "cloudnbd.hardening", "cloudnbd.password", "cloudnbd.progress",
                     "cloudnbd.pool", "cloudnbd.freshness")),
)

#: the imports that go up, each with its reason (docs/design.md names them too)
UPWARD = {
    # the zygote's warm-up, in the forkserver alone, preloads the code its children run
    ("cloudnbd.zygote", "cloudnbd.engine.workers"),
    ("cloudnbd.zygote", "cloudnbd.engine.malloc"),
    # a type annotation: VolumeBusy names the lease holder it reports
    ("cloudnbd.errors", "cloudnbd.lease"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The cloudnbd modules path imports, wherever the import statement stands."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from cloudnbd import volume` imports a module
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
    return {t for t in targets if t in modules and t != "cloudnbd"}


def _layer(module: str) -> int:
    best, depth = -1, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = rank, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


@pytest.mark.unit
def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert [m for m in graph if m != "cloudnbd" and _layer(m) < 0] == []


@pytest.mark.unit
def test_no_module_imports_a_layer_above_its_own(graph: dict[str, set[str]]) -> None:
    upward = {(module, target) for module, targets in graph.items() for target in targets
              if _layer(target) < _layer(module)}  # rank 0 is the top
    assert upward == UPWARD


@pytest.mark.unit
def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    edges = {m: {t for t in ts if (m, t) not in UPWARD} for m, ts in graph.items()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in edges[module]:
            if target in path:
                cycles.append([*path[path.index(target):], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert cycles == []
