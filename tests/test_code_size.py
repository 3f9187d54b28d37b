"""Small files with one job each: no module of helios_train/ or data_prep/ over ~400 lines, no function over ~60
(the architecture issue's bound; a longer one is split where its parts have names of their own)."""
from __future__ import annotations

import ast

from conftest import REPO

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def sizes(root=REPO) -> tuple[dict[str, int], dict[str, int]]:
    modules, functions = {}, {}
    for part in ("helios_train", "data_prep"):
        for path in sorted((root / part).rglob("*.py")):
            source = path.read_text()
            name = str(path.relative_to(root))
            modules[name] = len(source.splitlines())
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions[f"{name}:{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def test_no_module_or_function_is_too_long():
    modules, functions = sizes()
    assert len(modules) > 80 and len(functions) > 500  # the walk saw the package
    assert {m: n for m, n in modules.items() if n > MAX_MODULE_LINES} == {}
    assert {f: n for f, n in functions.items() if n > MAX_FUNCTION_LINES} == {}


def test_the_size_walk_measures_functions_and_modules(tmp_path):
    (tmp_path / "helios_train").mkdir()
    (tmp_path / "data_prep").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "helios_train" / "long.py").write_text(f"def long():\n{body}\n\n\nclass A:\n    def f(self):\n        pass\n")
    modules, functions = sizes(tmp_path)
    assert modules == {"helios_train/long.py": 76}
    assert functions == {"helios_train/long.py:long:1": 71, "helios_train/long.py:f:75": 2}
