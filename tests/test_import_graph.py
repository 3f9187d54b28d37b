"""The import graph of the repository, read from the source (every import statement, the ones inside functions
included: a lazy import is still a dependency): no cycle among helios_train's modules, each part of the package
imports only the parts below it (README "Architecture"), the library does not import the scripts (data_prep/) or
the tests, and bench/ does not import the tests."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PARTS = ("helios_train", "data_prep", "bench", "tests")
# What each part of helios_train/ may import besides itself (README "Architecture"). The commands at the top
# (__init__, __main__, api, pipeline_check) may import anything.
BELOW = {
    "config": set(),
    "runtime": {"config"},
    "algorithms": {"config", "runtime"},
    "model": {"config", "runtime", "algorithms"},
    "data": {"config", "runtime", "algorithms", "model"},
    "backends": {"config", "runtime", "algorithms", "model"},
    "sampling": {"config", "runtime", "algorithms", "model", "data"},
    "evaluation": {"config", "runtime", "algorithms", "model", "data", "sampling"},
    "stages": {"config", "runtime", "algorithms", "model", "data"},
    "training": {"config", "runtime", "algorithms", "model", "data", "backends", "sampling", "evaluation", "stages"},
    "planning": {"config", "runtime", "algorithms", "model", "data", "backends", "sampling", "evaluation", "stages",
                 "training"},
}
TOP = {"__init__", "__main__", "api", "pipeline_check", "miniature"}
def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for part in PARTS:
        for path in (root / part).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _known(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The repository modules `name` imports: `from pkg import x` names pkg.x when that is a module, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_known(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known(base, modules))
    return {m for m in found if m and m != name}


def graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_lazy_cycle_and_resolves_from_imports(tmp_path):
    pkg = tmp_path / "helios_train"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from helios_train import b\n")
    (pkg / "b.py").write_text("def f():\n    from helios_train.c import g\n")
    (pkg / "c.py").write_text("from . import a\nimport os\n")
    (pkg / "d.py").write_text("from helios_train import a  # no edge back\n")
    edges = graph(tmp_path)
    assert edges["helios_train.a"] == {"helios_train.b"} and edges["helios_train.c"] == {"helios_train.a"}
    assert cycles(edges) == [["helios_train.a", "helios_train.b", "helios_train.c"]]


def test_no_import_cycle_in_the_library():
    edges = {k: {m for m in v if m.startswith("helios_train")} for k, v in graph().items() if k.startswith("helios_train")}
    assert len(edges) > 60
    assert cycles(edges) == []


def test_library_does_not_import_scripts_or_tests_and_benches_do_not_import_tests():
    edges = graph()
    library = {(a, b) for a, deps in edges.items() if a.startswith("helios_train") for b in deps
               if b.startswith(("data_prep", "tests"))}
    assert library == set()
    assert [(a, b) for a, deps in edges.items() if a.startswith("bench") for b in deps if b.startswith("tests")] == []


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs of helios_train/ that cross the layers the wrong way (or leave them)."""
    out = []
    for a, deps in edges.items():
        if not a.startswith("helios_train") or part_of(a) in TOP:
            continue
        for b in deps:
            if b.startswith("helios_train") and part_of(b) != part_of(a) and part_of(b) not in BELOW.get(part_of(a), ()):
                out.append((a, b))
    return sorted(out)


def test_each_part_imports_only_the_parts_below_it():
    edges = graph()
    assert {part_of(m) for m in edges if m.startswith("helios_train.")} <= set(BELOW) | TOP  # every part is placed
    assert layer_violations(edges) == []


def test_layer_check_catches_an_upward_import():
    """A stage importing a backend (the kind of coupling the layers forbid) is reported; the check is not vacuous."""
    edges = {"helios_train.stages.dmd": {"helios_train.backends.deepspeed", "helios_train.model.adapter"},
             "helios_train.algorithms.ema": {"helios_train.backends.ema_shards"},
             "helios_train.api": {"helios_train.training.trainer"}}
    assert layer_violations(edges) == [("helios_train.algorithms.ema", "helios_train.backends.ema_shards"),
                                       ("helios_train.stages.dmd", "helios_train.backends.deepspeed")]
