"""The packages' dependency rule: each top-level package imports only the layers below it.

    ctl                          dllama-ctl: the command line, the user's edge
    daemon                       dllama-node: the service that applies the decisions
    cluster, discovery, api      the cluster's data plane, finding peers, the HTTP API
    engine                       one node's forward pass, generation and sampling
    kernels, plan, tokenizer     the compute kernels, the shard plan, text <-> token ids
    model                        the model file: GGUF and .m readers, the tensor table
    common                       errors, units, memory facts

A package may import itself and any package of a lower line, never one of its own line
or above: then no two packages import each other, directly or around a circle, and
a newcomer can read the folders bottom to top in the order the data flows. dllama-ctl is
the top: nothing else may import it (what the daemon and the commands share, such as
cluster/runners.py, lives below both). The imports are read with `ast` from the source
files, those inside functions included; a failure names the module, the line and the
package it should not import.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "dllama_node"

LAYERS: List[Tuple[str, ...]] = [
    ("common",),
    ("model",),
    ("kernels", "plan", "tokenizer"),
    ("engine",),
    ("cluster", "discovery", "api"),
    ("daemon",),
    ("ctl",),
]
RANK: Dict[str, int] = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
PACKAGES = sorted(RANK)


def _sources(package: str) -> List[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def imports_of(path: Path, root: Path = REPO_ROOT) -> Iterator[Tuple[int, str]]:
    """(line, top-level package of dllama_node) of every import in one source file under
    root; relative imports are resolved against the file's own package."""
    parts = path.relative_to(root).with_suffix("").parts   # ("daemon", "service")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = parts[:len(parts) - node.level]
            names = [".".join((NAMESPACE,) + base + ((node.module,) if node.module else ()))]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            dotted = name.split(".")
            if dotted[0] == NAMESPACE and len(dotted) > 1:
                yield node.lineno, dotted[1]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO_ROOT)}:{line}"


def package_graph() -> Dict[str, Set[str]]:
    """package -> the other packages its modules import."""
    graph: Dict[str, Set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in _sources(package):
            graph[package] |= {target for _, target in imports_of(path) if target != package}
    return graph


def test_every_package_has_a_layer():
    found = {p.name for p in REPO_ROOT.iterdir()
             if p.is_dir() and p.name not in ("tests", "bench", "demo", "scripts")
             and not p.name.startswith(".") and any(p.glob("*.py"))}
    assert found == set(PACKAGES), "give each package a line in LAYERS and the docstring"


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "ctl"])
def test_nothing_below_the_command_line_imports_ctl(package):
    offending = [f"{_where(path, line)} imports {NAMESPACE}.ctl"
                 for path in _sources(package) for line, target in imports_of(path)
                 if target == "ctl"]
    assert offending == [], "\n".join(offending)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_lower_layers(package):
    offending = [f"{_where(path, line)} imports {NAMESPACE}.{target} "
                 f"(layer {RANK[target]}, not below {package}'s {RANK[package]})"
                 for path in _sources(package) for line, target in imports_of(path)
                 if target != package and RANK.get(target, -1) >= RANK[package]]
    assert offending == [], "\n".join(offending)


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """A circle of imports, as [a, b, ..., a], or [] when there is none."""
    done: Set[str] = set()

    def visit(package: str, path: List[str]) -> List[str]:
        if package in path:
            return path[path.index(package):] + [package]
        if package in done:
            return []
        for target in sorted(graph.get(package, ())):
            cycle = visit(target, path + [package])
            if cycle:
                return cycle
        done.add(package)
        return []

    return next((c for c in (visit(p, []) for p in sorted(graph)) if c), [])


def test_no_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_should(tmp_path):
    # guards for the test itself: an import inside a function and a relative one count,
    # and a circle is found
    probe = tmp_path / "daemon" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from dllama_node.ctl.cli import cli\n\n"
                     "from ..ctl import runner\nfrom . import ops\n")
    assert sorted(imports_of(probe, tmp_path)) == [(2, "ctl"), (4, "ctl"), (5, "daemon")]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
