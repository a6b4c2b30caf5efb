"""Specification of llm.mlops.tracking: stage runs in MLflow with exact metric keys, lineage tags and statuses."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient

from llm.mlops.tracking import (
    StageRun,
    flatten_params,
    lineage_tags,
    params_hash,
    stage_run,
    tracking_uri,
)


@pytest.fixture
def tracking_db(tmp_path, monkeypatch, empty_mlflow_db) -> Path:
    """A fresh tracking database in tmp_path, named by MLFLOW_TRACKING_URI; tmp_path is the working dir."""
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return db


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def test_tracking_uri_is_the_env_var_else_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri() == "http://tracking:5000"


def test_flatten_params_nests_keys_encodes_lists_and_truncates():
    flat = flatten_params({
        "model": {"n_layer": 2, "norm": {"kind": "rms"}},
        "prompts": ["a", "b"],
        "lr": 0.001,
        "device": None,
        "long": "x" * 10_000,
    })
    assert flat["model.n_layer"] == "2"
    assert flat["model.norm.kind"] == "rms"
    assert json.loads(flat["prompts"]) == ["a", "b"]
    assert flat["lr"] == "0.001"
    assert flat["device"] == "None"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_params_hash_is_canonical_json_sha256():
    assert params_hash({"b": 1, "a": [1, 2]}) == params_hash({"a": [1, 2], "b": 1})
    assert params_hash({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
    assert params_hash({"a": 1}) != params_hash({"a": 2})


def test_lineage_tags_read_git_commit_and_the_dvc_data_hash(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  size: 10\n  path: data\n")
    subprocess.run([*git, "add", "data.dvc"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()

    tags = lineage_tags("pretrain", {"lr": 1}, root=tmp_path)
    assert tags["git.commit"] == head
    assert tags["git.dirty"] == "false"
    assert tags["dvc.data_hash"] == "0123456789abcdef.dir"
    assert tags["params.hash"] == params_hash({"lr": 1})
    assert tags["stage"] == "pretrain"

    (tmp_path / "data.dvc").write_text("outs:\n- md5: changed.dir\n  path: data\n")
    assert lineage_tags("pretrain", {}, root=tmp_path)["git.dirty"] == "true"


def test_lineage_tags_outside_git_hash_the_data_folder_or_say_none(tmp_path):
    assert lineage_tags("clean", {}, root=tmp_path)["git.commit"] == "unknown"
    assert lineage_tags("clean", {}, root=tmp_path)["dvc.data_hash"] == "none"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("hello")
    first = lineage_tags("clean", {}, root=tmp_path)["dvc.data_hash"]
    assert len(first) == 64
    (tmp_path / "data" / "a.txt").write_text("hello!")
    assert lineage_tags("clean", {}, root=tmp_path)["dvc.data_hash"] != first


def test_stage_run_logs_params_lineage_tags_and_metrics_under_their_exact_keys(tracking_db, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    history = []
    with stage_run("pretrain", {"model": {"n_layer": 2}, "pretrain": {"learning_rate": 0.001}}) as run:
        for step in range(1, 31):
            row = {"train/loss": 5.0 - step / 10, "lr": 1e-3}
            if step % 10 == 0:
                row.update({"val/loss": 4.5 - step / 20, "val/bpb": 2.0, "val/ppl": 90.0})
            run.callback(step, row)
            history.append({"step": step, **row})
        run.log_metrics({"perf/tokens_per_s": 1234.5, "perf/mfu": 0.01}, step=30)
        run.set_tags({"llm.note": "spec"})
        run.log_text("some text", "notes/a.txt")
        run.log_artifact(tmp_path / "notes.txt")
        run.log_loss_curve(history)
        run_id = run.run_id

    client = _client()
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "pretrain"
    assert logged.data.params["model.n_layer"] == "2"
    assert logged.data.params["pretrain.learning_rate"] == "0.001"
    tags = logged.data.tags
    assert tags["stage"] == "pretrain" and tags["llm.note"] == "spec"
    assert tags["git.commit"] == "unknown" and tags["dvc.data_hash"] == "none"
    assert tags["params.hash"] == params_hash({"model": {"n_layer": 2}, "pretrain": {"learning_rate": 0.001}})
    expected = {"train/loss", "lr", "val/loss", "val/bpb", "val/ppl", "perf/tokens_per_s", "perf/mfu"}
    assert expected <= set(logged.data.metrics)
    train = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(train, key=lambda m: m.step)] == list(range(1, 31))
    assert [m.step for m in client.get_metric_history(run_id, "val/bpb")] == [10, 20, 30]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"loss_curve.png", "notes.txt", "notes"} <= artifacts
    png = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="loss_curve.png",
                                                   dst_path=str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # artifacts live beside the database, in a folder named after the experiment
    assert logged.info.artifact_uri == (tmp_path / "mlruns" / "llm" / run_id / "artifacts").as_uri()


def test_stage_run_ends_failed_with_the_error_when_the_body_raises(tracking_db):
    with pytest.raises(RuntimeError, match="boom"), stage_run("clean", {"a": 1}) as run:
        run.callback(1, {"train/loss": 1.0})
        run_id = run.run_id
        raise RuntimeError("boom")
    logged = _client().get_run(run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.tags["error"] == "RuntimeError: boom"
    assert logged.data.metrics["train/loss"] == 1.0  # buffered metrics are flushed on failure too
    assert mlflow.active_run() is None


def test_stage_run_nests_under_a_parent_run(tracking_db):
    with stage_run("pipeline", {}) as parent, stage_run("clean", {}) as child:
        pass
    with stage_run("evaluate", {}, parent_run_id=None, run_name="eval-1") as other:
        pass
    client = _client()
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in client.get_run(other.run_id).data.tags
    assert client.get_run(other.run_id).info.run_name == "eval-1"


def test_experiment_name_comes_from_the_environment(tracking_db, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ablation/rope")
    with stage_run("pretrain", {}) as run:
        pass
    client = _client()
    experiment = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert experiment.name == "ablation/rope"
    assert experiment.artifact_location.endswith("/mlruns/ablation_rope")


def test_callback_batches_metrics_instead_of_one_request_per_step(tracking_db, monkeypatch):
    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    with stage_run("pretrain", {}) as run:
        for step in range(1, 1001):
            run.callback(step, {"train/loss": 1.0 / step, "lr": 0.1})
    metric_calls = [n for n in calls if n]
    assert sum(metric_calls) == 2000
    assert len(metric_calls) <= 5
    assert len(_client().get_metric_history(run.run_id, "train/loss")) == 1000


def test_disabled_stage_run_does_nothing_and_needs_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with stage_run("pretrain", {"a": 1}, enabled=False) as run:
        assert isinstance(run, StageRun) and run.run_id is None
        run.callback(1, {"train/loss": 1.0})
        run.log_metrics({"val/loss": 1.0})
        run.log_artifact(tmp_path / "missing.txt")
        run.log_artifacts(tmp_path / "missing")
        run.log_text("x", "x.txt")
        run.set_tags({"a": "b"})
        run.log_loss_curve([{"step": 1, "train/loss": 1.0}])
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_core_modules_do_not_import_mlflow():
    code = (
        "import sys, llm.config, llm.model.gpt, llm.data.tokenizer, llm.model.checkpoint, llm.training.loop, "
        "llm.training.pretrain, llm.inference.generate, llm.training.evaluate, llm.stages; "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_mlflow_run_without_an_experiment_name_records_the_stages_in_llm(tracking_db, monkeypatch, caplog):
    """`mlflow run . -e pretrain` puts its own run in MLflow's Default experiment and hands it over in
    MLFLOW_RUN_ID/MLFLOW_EXPERIMENT_ID: the stage runs went there too, as its children, so `llm runs` never
    listed them and a resume "belonged to another experiment" (issue 22, item 5)."""
    from llm.mlops.tracking import PROJECT_RUN_TAG

    client = _client()
    first = client.create_run("0")  # what `mlflow run` does before it starts the entry point
    monkeypatch.setenv("MLFLOW_RUN_ID", first.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    with stage_run("pretrain", {"a": 1}) as run:
        pass
    stage = client.get_run(run.run_id)
    llm_experiment = client.get_experiment_by_name("llm").experiment_id
    assert stage.info.experiment_id == llm_experiment
    assert stage.data.tags[PROJECT_RUN_TAG] == first.info.run_id and "mlflow.parentRunId" not in stage.data.tags
    second = client.create_run("0")  # the same command again: the stage resumes its run, in llm
    monkeypatch.setenv("MLFLOW_RUN_ID", second.info.run_id)
    with caplog.at_level("INFO", logger="llm"), stage_run("pretrain", {"a": 1}, resume_run_id=run.run_id) as again:
        pass
    assert again.run_id == run.run_id and "belongs to another experiment" not in caplog.text

    # `mlflow run --experiment-name llm`: its run is in llm, and the stage's run is its child
    project = client.create_run(llm_experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", project.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", llm_experiment)
    with stage_run("evaluate", {}) as child:
        pass
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == project.info.run_id
