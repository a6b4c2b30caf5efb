"""The ``llm`` command end to end on a tiny corpus, and its error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.config import DataParams, ParamsError, PretrainParams, load_params

from helpers import make_play

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32}
TINY_PRETRAIN = {"max_steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2,
                 "checkpoint_interval": 3, "log_interval": 1, "progress": False, "device": "cpu"}


def llm(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_TRACKING": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "llm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"llm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def project(tmp_path: Path, make_corpus) -> Path:
    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "params" / "model.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    (tmp_path / "params" / "pretrain.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))
    data = yaml.safe_load((tmp_path / "params" / "data.yaml").read_text())
    (tmp_path / "params" / "data.yaml").write_text(yaml.safe_dump({**data, "min_doc_chars": 100, "val_fraction": 0.3}))
    make_corpus(tmp_path / "data" / "corpus")
    return tmp_path


@pytest.mark.pipeline
def test_help_lists_every_stage(project):
    out = llm("--help", cwd=project).stdout
    for stage in ("data", "clean", "tokenizer", "tokenize", "pretrain", "evaluate", "generate"):
        assert stage in out


@pytest.mark.pipeline
def test_stages_run_end_to_end_and_generate_text(project):
    llm("clean", cwd=project)
    llm("tokenizer", "--set", "kind=byte", cwd=project)
    llm("tokenize", cwd=project)
    out = llm("pretrain", cwd=project).stdout
    metrics = json.loads(out[out.index("{"):])
    assert metrics["step"] == 6 and metrics["val/bpb"] > 0
    llm("evaluate", "--set", "max_new_tokens=20", cwd=project)
    evaluated = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())
    assert evaluated["val/loss"] == pytest.approx(metrics["val/loss"], rel=0.2)
    assert (project / "artifacts" / "eval" / "samples.md").read_text().startswith("# Samples")
    text = llm("generate", "--prompt", "ROMEO.", "--max-new-tokens", "30", "--seed", "3", cwd=project).stdout
    again = llm("generate", "--prompt", "ROMEO.", "--max-new-tokens", "30", "--seed", "3", cwd=project).stdout
    assert text.startswith("ROMEO.") and len(text) > len("ROMEO.\n") and text == again


@pytest.mark.pipeline
def test_pretrain_resumes_where_until_step_stopped(project):
    for cmd in (["clean"], ["tokenizer", "--set", "kind=byte"], ["tokenize"]):
        llm(*cmd, cwd=project)
    llm("pretrain", "--until-step", "3", cwd=project)
    assert json.loads((project / "artifacts" / "pretrain" / "config.json").read_text())["step"] == 3
    out = llm("pretrain", cwd=project).stdout
    assert json.loads(out[out.index("{"):])["step"] == 6


@pytest.mark.pipeline
def test_unknown_params_key_names_file_and_key(project):
    proc = llm("clean", "--set", "val_fractoin=0.2", cwd=project, check=False)
    assert proc.returncode == 1
    assert "params/data.yaml: val_fractoin: unknown key" in proc.stderr


def test_wrong_type_in_params_file_names_file_key_and_expectation(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text("max_steps: many\n")
    with pytest.raises(ParamsError, match=r"pretrain.yaml: max_steps: Input should be a valid integer.*'many'"):
        load_params(PretrainParams, path)


def test_params_file_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="data.yaml: expected a mapping"):
        load_params(DataParams, path)


@pytest.mark.pipeline
def test_missing_checkpoint_is_one_clear_line(project):
    proc = llm("generate", "--model", "nowhere", "--prompt", "x", cwd=project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: nowhere: no checkpoint folder here")
    assert "Traceback" not in proc.stderr


@pytest.mark.pipeline
def test_a_missing_params_file_is_one_clear_line_naming_it(project):
    (project / "params" / "data.yaml").unlink()
    proc = llm("clean", cwd=project, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: params/data.yaml: params file not found (looked for ")
    assert not (project / "artifacts").exists()  # not cleaned with the defaults in its place


@pytest.mark.pipeline
@pytest.mark.parametrize(("command", "step"), [("pretrain", "0"), ("finetune", "-3")])
def test_until_step_below_one_is_refused_before_any_work(project, command, step):
    proc = llm(command, "--until-step", step, cwd=project, check=False)
    assert proc.returncode == 2  # a usage error
    assert "Invalid value for '--until-step'" in proc.stderr and "greater than or equal to 1" in proc.stderr
    assert not (project / "artifacts").exists()


@pytest.mark.pipeline
@pytest.mark.parametrize("override", ["chat_data.max_turns=3", "chat_data={max_turns: 3}"])
def test_set_of_a_nested_key_changes_only_that_key(project, monkeypatch, override):
    from typer.testing import CliRunner

    import llm.cli

    finetune_yaml = project / "params" / "finetune.yaml"
    values = yaml.safe_load(finetune_yaml.read_text())
    values["chat_data"].update(max_speech_chars=123, system_template="Speak as {name}.")
    finetune_yaml.write_text(yaml.safe_dump(values))
    received = []
    monkeypatch.setattr(llm.cli, "finetune_stage", lambda params, *args, **kwargs: received.append(params) or {})
    monkeypatch.chdir(project)

    result = CliRunner().invoke(llm.cli.app, ["finetune", "--set", override, "--set", "max_steps=7"])

    assert result.exit_code == 0, result.output
    assert received[0].chat_data.max_turns == 3 and received[0].max_steps == 7
    assert received[0].chat_data.max_speech_chars == 123  # the file's other chat_data keys are kept
    assert received[0].chat_data.system_template == "Speak as {name}."


@pytest.mark.pipeline
def test_fetch_caps_are_named_with_the_option_that_raises_them(project):
    texts = project / "my-texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text("x" * 600)
    proc = llm("data", "fetch", "--source", str(texts), "--max-bytes", "1KB", cwd=project, check=False)
    assert proc.returncode == 1
    assert "its .txt files hold more bytes than that in all (cap max_bytes=1.0KB)" in proc.stderr
    assert "`llm data fetch --max-bytes SIZE`" in proc.stderr
    assert not (project / "data" / "corpus" / "my-texts").exists()

    proc = llm("data", "fetch", "--source", str(texts), "--max-bytes", "lots", cwd=project, check=False)
    assert proc.returncode == 1 and "error: llm data fetch: max_bytes: could not parse" in proc.stderr


@pytest.mark.pipeline
def test_one_big_text_file_goes_through_fetch_clean_tokenizer_and_tokenize(tmp_path):
    """The most common corpus: a single ~1.1 MB .txt (as for nanoGPT or char-rnn), with the default params."""
    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "my-texts").mkdir()
    text = make_play(7, n_speeches=12_600)
    (tmp_path / "my-texts" / "input.txt").write_text(text)
    assert 1_000_000 < len(text.encode()) < 1_200_000

    llm("data", "fetch", "--source", "my-texts", cwd=tmp_path)
    llm("clean", cwd=tmp_path)
    llm("tokenizer", cwd=tmp_path)
    llm("tokenize", cwd=tmp_path)

    stats = json.loads((tmp_path / "artifacts" / "clean" / "stats.json").read_text())
    assert stats["split"]["method"] == "sections" and stats["docs_kept"] == 1
    [train], [val] = stats["split"]["sections"]["train"], stats["split"]["sections"]["val"]
    assert train["document"] == val["document"] == "my-texts/input.txt"
    assert train["start"] == 0 and train["end"] < val["start"]  # val never overlaps train
    assert stats["val_bytes"] / (stats["train_bytes"] + stats["val_bytes"]) == pytest.approx(0.1, abs=0.01)
    splits = json.loads((tmp_path / "artifacts" / "tokens" / "meta.json").read_text())["splits"]
    assert splits["train"]["tokens"] > 0 and splits["val"]["tokens"] > 0
    val_share = splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"])
    assert val_share == pytest.approx(0.1, abs=0.01)


@pytest.mark.pipeline
@pytest.mark.parametrize(("command", "params_file", "model"), [
    (["clean"], "data.yaml", "DataParams"), (["tokenizer"], "tokenizer.yaml", "TokenizerParams"),
    (["pretrain"], "pretrain.yaml", "PretrainParams"), (["finetune"], "finetune.yaml", "FinetuneParams"),
    (["evaluate"], "evaluate.yaml", "EvalParams"), (["export", "onnx"], "export.yaml", "ExportParams"),
])
def test_each_stages_set_example_is_a_key_of_its_own_params_file(command, params_file, model):
    """`--set chat_data.max_turns=3` was the help example of stages that reject it (issue 22, item 12)."""
    import re

    from typer.testing import CliRunner

    import llm.config
    from llm.cli import _overrides, app

    shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"}).output
    example = re.search(r"e\.g\. --set (\S+)", shown).group(1)
    repo = Path(__file__).resolve().parents[1]
    loaded = load_params(getattr(llm.config, model), repo / "params" / params_file, _overrides([example]))
    key, value = example.split("=")
    for part in key.split("."):
        loaded = getattr(loaded, part)
    assert str(loaded).lower() == value.lower()


def test_llm_data_help_says_what_fetch_takes():
    from typer.testing import CliRunner

    from llm.cli import app

    shown = CliRunner().invoke(app, ["data", "--help"], env={"COLUMNS": "200"}).output
    assert "fetch the default corpus" not in shown and "a folder or a URL" in shown
