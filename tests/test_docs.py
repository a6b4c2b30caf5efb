"""Specification of the architecture guide (docs/architecture.md): every code reference names a file and a
function or class that exist, every link and image resolves, and docs/figures.py draws every figure it shows.
The README links the guide and the notebooks from its first screen."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "architecture.md"
# [`llm/model/gpt.py: GPT.forward, apply_rope`](../llm/model/gpt.py)
CODE_REF = re.compile(r"\[`(?P<path>[\w./]+\.py)(?::\s*(?P<names>[\w., ]+))?`\]\((?P<target>[^)]+)\)")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a Python file, and ``Class.member`` for the
    functions and assignments in each class body."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
    return names


def code_references(text: str) -> list[tuple[str, list[str], str]]:
    return [(m["path"], [n.strip() for n in (m["names"] or "").split(",") if n.strip()], m["target"])
            for m in CODE_REF.finditer(text)]


def test_the_guide_covers_the_components_the_issue_lists():
    text = GUIDE.read_text(encoding="utf-8")
    for topic in ("byte fallback", "BPE", "Unigram", "control tokens", "RoPE", "sinusoidal", "learned",
                  "Relative-position property", "causal mask", "KV cache", "Memory per token", "SwiGLU",
                  "squared ReLU", "GELU", "pre-norm", "post-norm", "LayerNorm", "RMSNorm", "QK-norm",
                  "Weight tying", "Initialisation", "Perplexity", "Bits per byte", "AdamW", "Schedule",
                  "Gradient accumulation", "Clipping", "Mixed precision", "Temperature", "Top-k", "Top-p",
                  "Loss masking", "ONNX", "int8"):
        assert topic.lower() in text.lower(), topic


def test_every_code_reference_in_the_guide_resolves():
    references = code_references(GUIDE.read_text(encoding="utf-8"))
    assert len(references) >= 40
    for path, names, target in references:
        file = (GUIDE.parent / target).resolve()
        assert file == (REPO / path).resolve(), f"[{path}] links to {target}"
        assert file.is_file(), f"{path} does not exist"
        missing = set(names) - defined_names(file)
        assert not missing, f"{path} defines no {', '.join(sorted(missing))}"


def test_a_reference_to_a_renamed_function_would_fail(tmp_path):
    """The check itself: a name that is not in the file is reported."""
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def f(self): ...\n\ndef g(): ...\nX = 1\n")
    assert {"A", "A.f", "g", "X"} <= defined_names(module)
    assert "A.h" not in defined_names(module) and "h" not in defined_names(module)
    [(path, names, target)] = code_references("see [`llm/model/gpt.py: GPT.forward, gone`](../llm/model/gpt.py)")
    assert (path, names, target) == ("llm/model/gpt.py", ["GPT.forward", "gone"], "../llm/model/gpt.py")
    assert "gone" not in defined_names(REPO / path)


def test_every_link_and_image_of_the_guide_exists():
    text = GUIDE.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    for match in LINK.finditer(text):
        target = match["target"]
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, target
            continue
        assert (GUIDE.parent / target.split("#")[0]).exists(), target


@pytest.mark.pipeline
def test_figures_py_draws_every_figure_the_guide_shows(tmp_path, tmp_path_factory):
    shown = set(re.findall(r"\]\(figures/([\w.]+\.png)\)", GUIDE.read_text(encoding="utf-8")))
    assert len(shown) >= 5
    for name in shown:  # committed, so the guide never shows a broken image
        assert (REPO / "docs" / "figures" / name).stat().st_size > 1000, name
    # the tiny model's cache is shared with tests/test_notebooks.py: it is trained once per session
    env = {**os.environ, "LLM_NOTEBOOKS_SMALL": "1",
           "LLM_NOTEBOOKS_CACHE": str(tmp_path_factory.getbasetemp() / "notebooks-cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(REPO / "docs" / "figures.py"), "--out", str(tmp_path / "figs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    drawn = {p.name for p in (tmp_path / "figs").iterdir()}
    assert shown <= drawn
    for name in drawn:
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("target", ["docs/architecture.md", "notebooks/"])
def test_the_readme_links_the_guide_and_the_notebooks_from_its_first_screen(target):
    first_screen = "\n".join((REPO / "README.md").read_text(encoding="utf-8").splitlines()[:20])
    assert f"]({target})" in first_screen
    assert (REPO / target).exists()
    assert first_screen.index("make demo") < first_screen.index(f"]({target})")  # the two commands stay on top
