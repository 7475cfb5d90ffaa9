"""The layering rules of docs/architecture.md, checked on the source: calls go down, the core is
pure, and only the tiers and the config name a medium."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kvstore": "kvstore", "tiers": "kvstore.tiers", "server": "kvstore.server", "client": "kvstore.client",
            "proto": "kvstore.proto"}
MEDIA = {"hbm", "dram", "nvme", "s3"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path) -> set[str]:
    """Every kvstore module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvstore"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kvstore"))
    return found


def test_there_are_no_import_cycles_in_the_core_the_tiers_or_the_server():
    mods = modules()
    graph = {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}
    # Package __init__ files re-export their modules; importing a package is not a dependency cycle.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_the_core_imports_no_io_library():
    banned = {"grpc", "asyncio", "cupy", "kvikio", "aiobotocore", "botocore", "lmdb", "prometheus_client", "torch"}
    for path in (ROOT / "kvstore").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


@pytest.mark.parametrize("folder", ["server", "kvstore"])
def test_only_the_tiers_and_the_config_name_a_medium(folder):
    allowed = {"config.py", "tier_kind.py", "__init__.py", "cli.py"}  # cli.py: flags are named after tiers
    for path in sorted((ROOT / folder).glob("*.py")):
        if path.name in allowed:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "TierKind":
                raise AssertionError(f"{folder}/{path.name}:{node.lineno} names TierKind.{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in MEDIA:
                raise AssertionError(f"{folder}/{path.name}:{node.lineno} names the medium {node.value!r}")
            if isinstance(node, (ast.Attribute, ast.Name)):
                ident = node.attr if isinstance(node, ast.Attribute) else node.id
                if ident.lower() in MEDIA or ident.lower().split("_")[0] in MEDIA - {"s3"}:
                    raise AssertionError(f"{folder}/{path.name}:{node.lineno} names the medium in {ident!r}")
