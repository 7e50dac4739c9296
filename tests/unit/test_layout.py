"""The shape of the installed code: every module listed in the README, no import
cycle anywhere, and the runtime never importing the benchmarks' extras."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import ROOT

PACKAGES = {"cluster": "fanroute", "gateway": "fanroute.gateway", "router": "fanroute.router", "ops/bench": "fanroute.bench"}
BENCH_ONLY = {"rich", "hdrh"}


def modules() -> dict[str, Path]:
    """Every installed module by its import name."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every module ``name`` imports, at any depth of the file (functions included)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(path, name) if m in mods and m != name} for name, path in mods.items()}


def test_every_module_is_listed_in_the_readme_and_every_listed_module_exists():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it is built") :]
    listed = set(re.findall(r"^- `((?:cluster|gateway|router|ops/bench)/[\w]+\.py)` — ", section, re.M))
    present = {p.relative_to(ROOT).as_posix() for p in modules().values()}
    assert present - listed == set(), "modules the README does not list"
    assert listed - present == set(), "modules the README lists that do not exist"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_gateways_and_routers_import_nothing_from_the_benchmarks():
    mods = modules()
    runtime = {n: p for n, p in mods.items() if not n.startswith("fanroute.bench")}
    for name, path in runtime.items():
        bad = {m for m in imports_of(path, name) if m.split(".")[0] in BENCH_ONLY or m.startswith("fanroute.bench")}
        if name == "fanroute.cli":
            # The command line registers `fanroute bench`; the bench package itself
            # imports none of its extras until a benchmark runs.
            bad -= {"fanroute.bench", "fanroute.bench.add_bench_commands", "fanroute.bench.run"}
        assert not bad, f"{name} imports {sorted(bad)}"
