"""The layout's bound on function length: every function in ``llm/`` and ``flows/`` stays within 80 lines, its
decorators and docstring included, so each reads as its phases on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def function_lengths(folder: Path) -> dict[str, int]:
    """``{"path:line name": lines}`` of every function and method under ``folder``, decorators included."""
    lengths = {}
    for file in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lengths[f"{file.relative_to(folder.parent)}:{node.lineno} {node.name}"] = node.end_lineno - first + 1
    return lengths


def test_function_lengths_are_measured_from_the_decorator_to_the_last_line(tmp_path):
    (tmp_path / "m.py").write_text('@property\ndef f():\n    """Doc."""\n    return 1\n\n\ndef g(): pass\n')
    lengths = function_lengths(tmp_path)
    assert sorted(lengths.values()) == [1, 4]


def test_no_function_in_llm_or_flows_is_over_80_lines():
    lengths = {**function_lengths(ROOT / "llm"), **function_lengths(ROOT / "flows")}
    assert len(lengths) > 500  # the walk found the code
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert too_long == {}
