"""Specification of the set-up without make (README, "Windows (PowerShell)"): its commands are real (the pins and
extras exist in pyproject.toml, every ``llm`` line parses with the CLI), ``make demo`` is ``llm demo``, and
``llm demo`` runs its steps with this interpreter first on PATH. ``tests/test_dvc_pipeline.py`` runs ``llm demo``
itself in a reproduced tiny project."""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from llm.cli import _step_env, app
from tests.test_docker import parse_llm_command

REPO = Path(__file__).resolve().parents[1]


def windows_commands() -> list[str]:
    """The command lines of the README's PowerShell block, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### Windows \(PowerShell\)\n.*?```powershell\n(.*?)```", text, re.DOTALL)
    assert block, "README.md has no '### Windows (PowerShell)' section with a powershell block"
    lines = [line.split(" #")[0].strip() for line in block.group(1).splitlines()]
    return [part.strip() for line in lines if line for part in line.split(";")]


def test_the_windows_commands_create_a_venv_install_the_cpu_torch_pin_and_run_llm_demo():
    commands = windows_commands()
    pin = next(r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
               if r.startswith("torch"))
    assert commands[0] == "py -3.11 -m venv .venv"
    assert r".venv\Scripts\Activate.ps1" in commands
    assert f"python -m pip install {pin} --index-url https://download.pytorch.org/whl/cpu" in commands
    assert f"TORCH_VERSION := {pin.split('==')[1]}" in (REPO / "Makefile").read_text()  # one pin for both paths
    demo = commands.index("llm demo")
    assert 'python -m pip install -e ".[pipeline,onnx,serve]"' in commands[:demo]  # the install, then llm demo


def test_the_windows_install_lines_name_extras_that_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [c for c in windows_commands() if c.startswith("python -m pip install -e")]
    assert installs
    for line in installs:
        named = Requirement("llm" + shlex.split(line)[-1].removeprefix(".")).extras
        assert named and named <= set(extras), line
    assert {"pipeline", "onnx", "serve"} <= Requirement("llm" + shlex.split(installs[0])[-1][1:]).extras


@pytest.mark.parametrize("line", [c for c in windows_commands() if c.startswith("llm ")])
def test_each_llm_line_of_the_windows_section_parses(line):
    parse_llm_command(shlex.split(line)[1:])


def test_make_demo_is_llm_demo():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    assert recipe.split() == ["$(BIN)/llm", "demo"]


def test_llm_demo_puts_this_interpreter_first_on_path_for_dvc(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(["/somewhere/else", "/usr/bin"]))
    assert _step_env()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_llm_demo_and_pipeline_outside_the_project_root_say_where_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["demo", "--no-fetch"], ["pipeline"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1
        assert "runs in the project root" in result.output and str(tmp_path) in result.output


def test_the_readme_python_snippets_import_only_what_make_demo_installs():
    """Every top-level import of a ```python block (the OpenAI client snippet) is a distribution of the base
    dependencies or of the extras `make demo` installs, or of the standard library (issue 22, item 2)."""
    makefile = (REPO / "Makefile").read_text()
    extras = re.search(r"pip install --quiet -e '\.\[([a-z,]+)\]'", makefile).group(1).split(",")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = {Requirement(r).name for r in project["dependencies"]}
    installed |= {Requirement(r).name for extra in extras for r in project["optional-dependencies"][extra]}
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    imported = {m for block in blocks for m in re.findall(r"^(?:from|import) (\w+)", block, re.MULTILINE)}
    assert "openai" in imported  # the Serve section's client
    assert imported - sys.stdlib_module_names <= installed, sorted(imported - installed)


def test_readme_installs_from_the_checkout_are_editable():
    """`pip install '.[hf]'` would replace `make demo`'s editable install with a copy (issue 22, item 7)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    plain = re.findall(r"pip install (?!-e)[\"']?\.[\[\"' ]", text)
    assert not plain, plain


def test_the_package_metadata_builds_without_setuptools_deprecation_warnings(tmp_path):
    """The license is an SPDX string (PEP 639), which the pinned setuptools floor reads: no warning on install."""
    import shutil
    import subprocess

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "llm", tmp_path / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    floor = Requirement(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"][0])
    from importlib.metadata import version

    assert version("setuptools") in floor.specifier  # the setuptools here satisfies the floor
    assert floor.specifier.contains("77.0.0") and not floor.specifier.contains("76.9")  # SPDX licenses: 77 on
    script = ("import warnings; warnings.simplefilter('error')\n"
              "from setuptools import build_meta\n"
              "print(build_meta.prepare_metadata_for_build_wheel('out'))\n")
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "License-Expression: MIT" in next((tmp_path / "out").glob("*.dist-info")).joinpath("METADATA").read_text()


@pytest.mark.pipeline
def test_the_start_from_gpt2_folder_changes_neither_git_nor_data_dvc(tmp_path):
    """The README saved GPT-2 in data/hf/gpt2, inside the DVC-tracked data/: the next `dvc add data` counted its
    files (issue 22, item 8). The README's folder is models/hf/gpt2, git-ignored, outside data/; data/hf/ is
    dvc-ignored for folders left there."""
    import subprocess

    text = (REPO / "README.md").read_text(encoding="utf-8")
    saved = set(re.findall(r"save_pretrained\('([^']+)'\)", text))
    assert saved == {"models/hf/qwen3"} and "llm import hf models/hf/qwen3" in text and "`models/hf/gpt2`" in text
    assert "hf_folder: null          # e.g. models/hf/qwen3" in (REPO / "params" / "base.yaml").read_text()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}

    def run(*args: str) -> str:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    for name in (".gitignore", ".dvcignore"):
        (tmp_path / name).write_text((REPO / name).read_text())
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "a.txt").write_text("the corpus")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "add", "-q", "data")
    before = (tmp_path / "data.dvc").read_text()
    for folder in ("models/hf/qwen3", "data/hf/gpt2"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    run("dvc", "add", "-q", "data")
    assert (tmp_path / "data.dvc").read_text() == before and "nfiles: 1" in before
    assert run("git", "check-ignore", "models/hf/gpt2/config.json").strip() == "models/hf/gpt2/config.json"


def test_the_distribution_is_not_named_after_the_other_llm_on_pypi():
    """`llm` on PyPI is another project's CLI: the distribution has a name of its own, and the command is installed
    under that name too, beside `llm` (issue 24, item 4)."""
    from importlib.metadata import distribution

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "gpt-mlops"
    assert project["scripts"] == {"llm": "llm.cli:run", "gpt-mlops": "llm.cli:run"}
    installed = distribution("gpt-mlops")
    assert {ep.name for ep in installed.entry_points if ep.group == "console_scripts"} == {"llm", "gpt-mlops"}
    assert "gpt-mlops" in (REPO / "README.md").read_text(encoding="utf-8")


def test_llm_demo_links_the_prefect_ui_to_the_flow_runs_of_the_running_server(monkeypatch):
    """The closing lines name the Prefect UI's flow-runs page, read from what `python -m flows server status`
    prints (its real output, for a server record made up here); none when the server is not running."""
    import subprocess
    from types import SimpleNamespace

    import flows.prefect_server as prefect_server
    from llm import cli

    record = prefect_server.ServerRecord(pid=4321, create_time=0.0, port=4277, prefect_version="3", python="3.11")
    monkeypatch.setattr(prefect_server, "live_record", lambda: record)
    monkeypatch.setattr(prefect_server, "is_healthy", lambda record: True)
    printed = CliRunner().invoke(prefect_server.app, ["status"]).output
    for output, link in ((printed, "http://127.0.0.1:4277/runs"), ("not running\n", None)):
        monkeypatch.setattr(subprocess, "run", lambda *a, output=output, **k: SimpleNamespace(stdout=output))
        assert cli._prefect_link() == link
