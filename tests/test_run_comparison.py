"""Runs and models compare at a glance: the experiment opens on its runs in the MLflow UI, training runs are named
by what differs and log the same keys, versions are described, `llm runs` tables them, the Prefect flows publish
their results, and `dvc plots show` needs no internet."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from llm.config import FinetuneParams, ModelConfig, PretrainParams
from llm.mlops.registry import version_description
from llm.mlops.stage_tracking import summary_metrics, training_params, training_run_name
from llm.mlops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, flatten_params, stage_run

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(n_layer=4, n_head=4, d_model=256).model_dump()
BPE = {"kind": "bpe", "vocab_size": 2048}


@pytest.fixture
def store(tmp_path, monkeypatch, empty_mlflow_db) -> Path:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                 "MLFLOW_RUN_ID", "LLM_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_experiment_is_tagged_for_model_training_and_a_kind_set_by_hand_stays(store, monkeypatch):
    with stage_run("clean", {}):
        pass
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.get_experiment_by_name("llm").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert EXPERIMENT_KIND == "custom_model_development"  # the value MLflow 3's UI reads (ExperimentKind enum)

    client.create_experiment("older")  # made before the tag existed: tagged on its next run
    client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older", "mine"):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
        with stage_run("clean", {}):
            pass
    assert client.get_experiment_by_name("older").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment_by_name("mine").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_training_run_names_say_shape_tokenizer_and_steps_and_differ_when_params_do():
    logged = training_params(PretrainParams(max_steps=500), MODEL, BPE)
    name = training_run_name("pretrain", logged)
    assert re.fullmatch(r"pretrain 4x256 bpe2048 500 steps \([0-9a-f]{6}\)", name), name
    assert name == training_run_name("pretrain", training_params(PretrainParams(max_steps=500), MODEL, BPE))
    other_lr = training_run_name("pretrain", training_params(PretrainParams(max_steps=500, learning_rate=5e-4),
                                                            MODEL, BPE))
    assert other_lr != name and other_lr.startswith("pretrain 4x256 bpe2048 500 steps (")

    tuned = training_params(FinetuneParams(max_steps=300), MODEL, BPE)
    assert re.fullmatch(r"finetune 4x256 bpe2048 300 steps from v3 \([0-9a-f]{6}\)",
                        training_run_name("finetune", tuned, base_version="3"))
    # the same param names for both stages: the compare view lines them up
    pretrain_keys, finetune_keys = set(flatten_params(logged)), set(flatten_params(tuned))
    assert pretrain_keys <= finetune_keys
    assert {k for k in finetune_keys - pretrain_keys} == {"train.dropout", "train.method"} | {
        k for k in finetune_keys if k.startswith(("train.chat_data.", "train.lora."))}
    assert {"model.n_layer", "model.d_model", "model.n_head", "train.learning_rate", "train.batch_size",
            "train.max_steps", "train.weight_decay", "train.beta1", "train.beta2", "tokenizer.kind",
            "tokenizer.vocab_size"} <= pretrain_keys


def test_version_description_says_origin_data_and_validation_scores():
    metrics = {"step": 500, "params": 3672320, "wall_time_s": 297.7, "val/bpb": 2.153868, "val/loss": 3.923921,
               "val/ppl": 50.598}
    tags = {"dvc.data_hash": "0123456789abcdef0123", "dvc.data_source": "data.dvc", "git.commit": "a" * 40,
            "git.dirty": "false", "llm.parent_version": "1", "llm.parent_run_id": "r1"}
    text = version_description("pretrain", training_params(PretrainParams(), MODEL, BPE), metrics, tags,
                               run_name="pretrain 4x256 bpe2048 500 steps (abcdef)")
    assert text.startswith("Base model pretrained from scratch on the corpus: 4 layers x 256 wide, 4 heads")
    assert "bpe tokenizer of 2048 tokens; 3.67M parameters." in text
    assert "- Trained: 500 steps" in text and "in 298 s (run `pretrain 4x256 bpe2048 500 steps (abcdef)`)" in text
    assert "- Data: version `0123456789ab` (data.dvc), code at git `aaaaaaaaaaaa`" in text
    assert "- Validation: val/bpb 2.1539, val/loss 3.9239, val/ppl 50.5980" in text
    tuned = version_description("finetune", training_params(FinetuneParams(), MODEL, BPE), metrics, tags)
    assert tuned.startswith("Chat model finetuned from **gpt version 1** (run `r1`) on chat conversations")
    assert summary_metrics(metrics) == {"model/parameters": 3672320.0, "perf/wall_time_s": 297.7,
                                        "train/steps": 500.0}


def _two_runs() -> tuple[str, str]:
    ids = []
    for lr, bpb in ((2e-3, 2.15), (1e-3, 2.31)):
        logged = training_params(PretrainParams(max_steps=500, learning_rate=lr), MODEL, BPE)
        with stage_run("pretrain", logged, run_name=training_run_name("pretrain", logged)) as run:
            run.log_metrics({"val/bpb": bpb, "val/loss": 3.92, "perf/tokens_per_s": 6472.0,
                             "model/parameters": 3672320.0, "perf/wall_time_s": 297.7}, step=500)
        ids.append(run.run_id)
    return ids[0], ids[1]


def test_llm_runs_tables_the_runs_and_highlights_what_differs_between_two(store):
    from llm.cli import app
    from llm.mlops.runs import DIFFERENT, SAME, diff_rows, diff_table, find_run

    first, second = _two_runs()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    names = [client.get_run(i).info.run_name for i in (first, second)]
    runner = CliRunner()
    listed = runner.invoke(app, ["runs"], env={"COLUMNS": "220"})
    assert listed.exit_code == 0, listed.output
    for name in names:
        assert name in listed.output
    rows = [line for line in listed.output.splitlines() if names[1] in line]
    assert re.search(r"pretrain\s.*FINISHED.*2\.3100\s.*3\.9200\s.*6,472\s.*3,672,320\s.*298", rows[0]), rows

    a, b = find_run(first[:8]), find_run(names[1])  # an id's start and a name both name a run
    assert (a.info.run_id, b.info.run_id) == (first, second)
    by_key = {(r.kind, r.key): r for r in diff_rows(a, b)}
    assert by_key[("param", "train.learning_rate")].differs
    assert (by_key[("param", "train.learning_rate")].a, by_key[("param", "train.learning_rate")].b) == (
        "0.002", "0.001")
    assert by_key[("metric", "val/bpb")].differs and not by_key[("param", "model.n_layer")].differs
    assert {r.key for r in diff_rows(a, b, only_different=True)} == {"train.learning_rate", "val/bpb", "params.hash"}
    table = diff_table(a, b, diff_rows(a, b))
    styles = {key: row.style for (_, key), row in zip(by_key, table.rows)}
    assert styles["train.learning_rate"] == DIFFERENT and styles["model.n_layer"] == SAME

    shown = runner.invoke(app, ["runs", "--diff", first, second, "--only-different"], env={"COLUMNS": "220"})
    assert shown.exit_code == 0, shown.output
    assert "3 of 3 values differ" in shown.output and "train.learning_rate" in shown.output
    console = Console(record=True, width=220, color_system="truecolor", force_terminal=True)
    console.print(table)
    learning_rate_line = next(line for line in console.export_text(styles=True).splitlines()
                              if "train.learning_rate" in line)
    assert "\x1b[1;33m" in learning_rate_line  # bold yellow in a terminal

    missing = runner.invoke(app, ["runs", "--diff", "no-such-run", first])
    assert missing.exit_code != 0 and "no run 'no-such-run'" in str(missing.exception)


def test_evaluation_and_parity_reports_show_both_scores_and_the_decision():
    from flows.reports import evaluation_markdown, parity_markdown

    result = {"val/bpb": 2.2323, "val/loss": 4.0668, "chat/assistant_loss": 3.9939, "chat/base_assistant_loss": 4.31,
              "promotion": {"promoted": False, "candidate": "3", "production": "2", "metric": "chat/assistant_loss",
                            "candidate_score": 3.9939, "production_score": 3.95,
                            "reason": "chat/assistant_loss 3.9939 does not beat Production version 2 (3.9500)"}}
    text = evaluation_markdown(result, "artifacts/finetune")
    assert text.startswith("# Evaluation of `artifacts/finetune` (gpt version 3)")
    assert "| chat/assistant_loss | 3.9939 |" in text and "## Promotion: not promoted" in text
    assert "| candidate | 3 | 3.9939 |" in text and "| Production before | 2 | 3.9500 |" in text
    scored = {**result["promotion"], "metric": "chat/assistant_bpb", "text": "the final assistant answers of 8 "
              "conversations of artifacts/chat/val.jsonl (1,234 bytes)"}
    assert "Both scored on the final assistant answers of 8 conversations" in evaluation_markdown(
        {**result, "promotion": scored}, "artifacts/finetune")
    summary = {"opset": 18, "model_version": "3", "files": {"model.onnx": 14_000_000},
               "parity": {"passed": True, "atol": 1e-4, "max_abs_diff": 6.7e-06, "ragged": {"max_abs_logits": 6.2e-06},
                          "static_cache": {"max_abs_logits": 7.2e-06},
                          "greedy": {"prompts": 20, "new_tokens": 64, "graphs": ["portable", "static_cache"],
                                     "identical": 20, "mismatches": []}}}
    parity = parity_markdown(summary)
    assert parity.startswith("# ONNX export: parity passed")
    assert "| static-cache graph, max abs logit difference | 7.2e-06 |" in parity
    assert ("| greedy continuations identical to PyTorch (portable and static_cache) | 20 of 20 (64 tokens each) |"
            in parity)
    skipped = parity_markdown({**summary, "parity": {}, "static_cache": "skipped: head_dim 8 is not a multiple of 16"})
    assert "| static-cache graph | skipped: head_dim 8 is not a multiple of 16 |" in skipped
    assert "| model.onnx | 14,000,000 |" in parity and "| registered version | 3 |" in parity


def test_the_dvc_plots_template_loads_nothing_from_the_network():
    import configobj

    config = configobj.ConfigObj(str(ROOT / ".dvc" / "config"))
    template = ROOT / ".dvc" / config["plots"]["html_template"]
    html = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in html  # where DVC puts the plots
    assert "{scripts}" not in html  # where DVC would put its CDN <script> tags
    assert not re.findall(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html, re.I)
    assert not re.findall(r"@import|url\(\s*[\"']?(?:https?:)?//", html, re.I)
    for library in ("vega 5.20.2", "vega-lite 5.2.0", "vega-embed 6.18.2"):  # what dvc-render loads from its CDN
        assert f"<!-- {library}, BSD-3-Clause" in html
    assert "Copyright (c)" in (template.parent / "LICENSE-vega.txt").read_text()


def test_llm_runs_is_readable_at_80_columns_and_run_prefixes_are_unique_or_an_error(store):
    """Issue 22, item 11: at 80 columns every cell was `…`; `--diff d80` (3 characters) said "no run" with no
    word on the minimum; a name shared by a rerun silently picked the latest."""
    from llm.cli import app
    from llm.mlops.runs import MIN_PREFIX, RunsError, VersionRow, find_run, versions_table

    first, second = _two_runs()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    name = client.get_run(second).info.run_name
    with stage_run("pretrain", {}, run_name=name) as rerun:  # the same name again
        rerun.log_metrics({"val/bpb": 2.2, "chat/assistant_bpb": 3.7716}, step=1)
    listed = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if not line.startswith("In the MLflow UI")]  # a URL
    assert max(len(line) for line in lines) <= 80 and "…" not in listed.output
    for run_id, bpb in ((first, "2.1500"), (second, "2.3100"), (rerun.run_id, "2.2000")):
        row = next(line for line in lines if run_id[:8] in line)
        assert bpb in row, row
    assert "3.7716" in listed.output
    console = Console(record=True, width=80)
    rows = [VersionRow("12", "Production (@production)", "finetune", "finetune 4x128 bpe2048 150 steps from v11 "
                       "(3f2a1c)", "eval/bpb", "2.0612", "2.0700 (v11)", "promoted")]
    console.print(versions_table(rows, console.width))
    text = console.export_text()
    assert "…" not in text and "2.0612" in text and "2.0700 (v11)" in text and "not" not in text
    assert "eval/bpb" in text and "promoted" in text

    assert find_run(first[:MIN_PREFIX]).info.run_id == first  # any unique start of 4 characters or more
    with pytest.raises(RunsError, match=rf"too short: give at least {MIN_PREFIX} characters.*{first[:8]}"):
        find_run(first[:3])
    with pytest.raises(RunsError, match=rf"names 2 runs: {rerun.run_id[:8]} .*{second[:8]} "):
        find_run(name)
    ambiguous = CliRunner().invoke(app, ["runs", "--diff", name, first])
    assert ambiguous.exit_code != 0 and "names 2 runs" in str(ambiguous.exception)
    helped = CliRunner().invoke(app, ["runs", "--help"], env={"COLUMNS": "200"})
    assert "first 4 characters or more" in helped.output


def test_make_demo_links_the_mlflow_ui_to_the_training_runs_of_the_pipelines_experiment(store, monkeypatch):
    """`llm demo`'s closing lines open MLflow on the experiment's runs (not the GenAI overview): the id is the one
    MLflow gives the experiment, and without a database the link is the experiments list on the same view (and no
    database is made to find out)."""
    from llm.cli import _mlflow_link, _next_steps
    from llm.mlops.runs import training_runs_url

    elsewhere = store / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _mlflow_link() == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert list(elsewhere.iterdir()) == []

    monkeypatch.chdir(store)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    client.create_experiment("other")  # the pipeline's experiment is not the first one made
    with stage_run("clean", {}):
        pass
    experiment_id = client.get_experiment_by_name("llm").experiment_id
    link = f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert experiment_id not in ("0", client.get_experiment_by_name("other").experiment_id)
    assert _mlflow_link() == training_runs_url() == link
    lines = [line.strip() for line in _next_steps("models:/gpt/Production", link, "http://127.0.0.1:4321/runs")
             .splitlines()]
    assert f"then open {link}" in lines
    assert "Chat in the browser:             with llm serve running, open http://127.0.0.1:8000/" in lines
    assert "Training curves in TensorBoard:  tensorboard --logdir logs/tensorboard" in lines
    assert "The flow runs in the Prefect UI: open http://127.0.0.1:4321/runs" in lines

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")  # a tracking server: its own UI
    assert _mlflow_link() == "http://mlflow.example:5000/#/experiments?workflowType=machine_learning"
