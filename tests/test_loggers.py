"""Specification of the loggers beside MLflow (``tracking: [mlflow, tensorboard, wandb, csv]``): each gets the
metric keys at the steps MLflow gets, read back with the tool's own reader (TensorBoard's event accumulator,
``wandb leet inspect`` on the offline run's transaction log); a resumed training writes into the same TensorBoard
run, csv file and W&B id; a failing or stuck logger never stops or slows training; a missing package is a clear
error."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from llm.config import EvalParams, ModelConfig, PretrainParams, load_params
from llm.mlops import loggers
from llm.mlops.loggers import LoggerUnavailable, _QueuedLogger
from llm.stages import evaluate_stage, pretrain_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(context_length=64, n_layer=1, n_head=2, d_model=32)
EVAL = EvalParams(batch_size=4, max_batches=2, max_new_tokens=4, prompts=["ROMEO."], device="cpu",
                  tracking=["mlflow", "tensorboard", "csv"])

Points = dict[str, list[int]]  # metric key -> the steps it was logged at, sorted


def pretrain_params(max_steps: int, tracking: list[str], **overrides) -> PretrainParams:
    settings = dict(max_steps=max_steps, batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_interval=3,
                    eval_batches=2, checkpoint_interval=100, log_interval=1, device="cpu", progress=False)
    return PretrainParams(**{**settings, **overrides}, tracking=tracking)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project root of its own (logs/ lands here), W&B offline and quiet, no MLflow unless a test adds it."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                 "MLFLOW_RUN_ID", "LLM_TRACKING", "DVC_ROOT", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics process beside the test
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def with_mlflow(project, monkeypatch, empty_mlflow_db) -> Path:
    pytest.importorskip("mlflow")
    shutil.copy(empty_mlflow_db, project / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    return project


def mlflow_points(run_id: str) -> Points:
    from mlflow import MlflowClient

    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def tensorboard_points(folder: Path) -> Points:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {key: sorted(e.step for e in events.Scalars(key)) for key in events.Tags()["scalars"]}


def tensorboard_text(folder: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def csv_points(folder: Path) -> Points:
    points = defaultdict(list)
    with open(folder / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            points[row["key"]].append(int(row["step"]))
    return {key: sorted(steps) for key, steps in points.items()}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run, as W&B's own reader prints them (``wandb leet inspect --json``)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_points(records: list[dict]) -> Points:
    points = defaultdict(list)
    for record in records:
        if record["type"] == "history":
            step = int(record["history"]["step"]["num"])
            for key in record["history"]["item"]:
                if not key.startswith("_"):
                    points[key].append(step)
    return {key: sorted(steps) for key, steps in points.items()}


@pytest.mark.slow
def test_every_logger_gets_the_metric_keys_and_steps_the_mlflow_run_gets(with_mlflow, prepared):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    logs = with_mlflow / "logs"
    result = pretrain_stage(pretrain_params(4, ["mlflow", "tensorboard", "wandb", "csv"]), MODEL, prepared["tokens"],
                            prepared["tokenizer"], with_mlflow / "pretrain", register=False)
    from mlflow import MlflowClient

    run = MlflowClient().get_run(result["run_id"])
    expected = mlflow_points(result["run_id"])
    assert expected["train/loss"] == [1, 2, 3, 4] and expected["val/loss"] == [3, 4]

    tensorboard_run = logs / "tensorboard" / run.info.run_name  # the folder is the run's name
    assert tensorboard_points(tensorboard_run) == expected
    assert "| train.learning_rate | 0.003 |" in tensorboard_text(tensorboard_run, "params")
    tags = tensorboard_text(tensorboard_run, "tags")
    assert f"| params.hash | {run.data.tags['params.hash']} |" in tags and "| status | FINISHED |" in tags

    assert csv_points(logs / "csv" / run.info.run_name) == expected
    assert json.loads((logs / "csv" / run.info.run_name / "tags.json").read_text())["mlflow.run_id"] == run.info.run_id

    (wandb_run,) = (logs / "wandb").glob(f"offline-run-*-{run.info.run_id}")  # the W&B id is MLflow's run id
    records = wandb_records(wandb_run)
    assert wandb_points(records) == expected
    (start,) = [r["run"] for r in records if r["type"] == "run"]
    assert start["display_name"] == run.info.run_name and start["job_type"] == "pretrain"
    config = {key: value for r in records if r["type"] == "config" for key, value in r["config"]["update"].items()}
    assert config["train"]["learning_rate"] == 0.003
    assert config["tags"]["git.commit"] == run.data.tags["git.commit"]

    evaluated = evaluate_stage(EVAL, with_mlflow / "pretrain", prepared["tokens"], prepared["clean"],
                               with_mlflow / "eval")
    (evaluation,) = MlflowClient().search_runs([run.info.experiment_id], "tags.stage = 'evaluate'")
    expected = mlflow_points(evaluation.info.run_id)
    assert "val/bpb" in expected and evaluated["val/bpb"] == evaluation.data.metrics["val/bpb"]
    folder = loggers._folder_name(evaluation.info.run_name)  # "evaluate pretrain <its path>": no separators
    assert "/" in evaluation.info.run_name and "/" not in folder
    assert tensorboard_points(logs / "tensorboard" / folder) == expected
    assert csv_points(logs / "csv" / folder) == expected


def test_a_resumed_training_appends_to_the_same_tensorboard_run_csv_file_and_wandb_id(project, prepared, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import llm.training.pretrain as pretrain_module

    params = pretrain_params(6, ["tensorboard", "wandb", "csv"], checkpoint_interval=2)
    real = pretrain_module.pretrain

    def killed_at_step_3(*args, callbacks, **kwargs):  # after the checkpoint of step 2: step 3 is logged twice
        def stop(step, metrics):
            if step == 3:
                raise KeyboardInterrupt
        return real(*args, callbacks=[*callbacks, stop], **kwargs)

    monkeypatch.setattr(pretrain_module, "pretrain", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain_stage(params, MODEL, prepared["tokens"], prepared["tokenizer"], project / "pretrain")
    monkeypatch.setattr(pretrain_module, "pretrain", real)
    saved = json.loads((project / "pretrain" / "config.json").read_text())
    assert saved["step"] == 2
    first_csv = csv_points(project / "logs" / "csv" / saved["loggers"]["name"])
    assert first_csv["train/loss"] == [1, 2, 3]

    result = pretrain_stage(params, MODEL, prepared["tokens"], prepared["tokenizer"], project / "pretrain")
    assert result["step"] == 6 and result["run_id"] is None  # MLflow not chosen: no MLflow run
    assert not (project / "mlflow.db").exists()
    (tensorboard_run,) = (project / "logs" / "tensorboard").iterdir()
    (csv_run,) = (project / "logs" / "csv").iterdir()
    assert tensorboard_run.name == csv_run.name == saved["loggers"]["name"]
    assert tensorboard_points(tensorboard_run)["train/loss"] == [1, 2, 3, 4, 5, 6]  # step 3 once: the killed one hidden
    assert csv_points(csv_run)["train/loss"] == [1, 2, 3, 4, 5, 6]
    wandb_id = saved["loggers"]["wandb_id"]
    attempts = sorted((project / "logs" / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with -1, -2... added by W&B when two attempts start within the same second
    run_ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)(?:-\d+)?", path.name)[1] for path in attempts]
    assert run_ids == [wandb_id, wandb_id]  # one W&B run, two attempts
    logged = [wandb_points(wandb_records(path))["train/loss"] for path in attempts]
    assert logged == [[1, 2, 3], [3, 4, 5, 6]]  # `wandb sync` of both: W&B keeps the first step 3


class Refusing:
    """A logger that raises in every call, as a full disk would make the csv logger do."""

    calls = 0

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            Refusing.calls += 1
            raise OSError(28, "No space left on device")
        return fail


def test_a_logger_failing_in_every_call_never_stops_training_and_warns_once(project, prepared, monkeypatch, caplog):
    monkeypatch.setattr(loggers, "CsvLogger", lambda folder, keep_through=None: Refusing())
    monkeypatch.setattr(loggers, "CLOSE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(loggers, "MAX_BACKOFF_S", 0.1)
    with caplog.at_level(logging.WARNING, logger="llm.mlops.loggers"):
        result = pretrain_stage(pretrain_params(4, ["csv"]), MODEL, prepared["tokens"], prepared["tokenizer"],
                                project / "pretrain")
    assert result["step"] == 4 and Refusing.calls > 1  # tried again, training went on
    failed = [r.getMessage() for r in caplog.records if "csv logger failed" in r.getMessage()]
    assert len(failed) == 1 and "No space left on device" in failed[0] and "training goes on" in failed[0]
    lost = [r.getMessage() for r in caplog.records if "never reached the csv logger" in r.getMessage()]
    assert len(lost) == 1 and lost[0].startswith("26 metric points")  # 4 steps x 4 + 2 val x 3 + the summary's 4


def test_a_stuck_logger_costs_the_loop_only_an_append_and_drops_the_oldest_past_its_bound(caplog):
    released = threading.Event()

    class Stuck:
        def log_metrics(self, metrics, step, walltime):
            released.wait()

        def flush(self):
            pass

        def close(self, status):
            pass

    queued = _QueuedLogger("stuck", Stuck, "run", max_pending=100)
    start = time.perf_counter()
    for step in range(1, 10_001):
        queued.put("metrics", {"train/loss": 1.0, "lr": 0.1}, step)
    assert time.perf_counter() - start < 2.0  # 10,000 steps: appends only, the logger is stuck on the first
    assert queued.overflowed >= 20_000 - 100 - 2
    with caplog.at_level(logging.WARNING, logger="llm.mlops.loggers"):
        loggers._close_all([queued], "FINISHED", timeout=0.2)
    released.set()
    assert any("never reached the stuck logger" in r.getMessage() for r in caplog.records)


def test_a_logger_whose_package_is_missing_is_an_error_naming_the_setting_and_the_pip_command(project, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    from llm.mlops.stage_tracking import stage_tracker

    with pytest.raises(LoggerUnavailable, match=r"tracking names wandb.*pip install wandb"):
        with stage_tracker(True, ["csv", "wandb"]).run("pretrain", {}):
            pass
    assert not (project / "logs").exists()  # nothing started


def test_tracking_is_read_from_the_params_file_and_set_with_overrides(tmp_path):
    assert PretrainParams().tracking == ["mlflow"] and EvalParams().tracking == ["mlflow"]
    path = tmp_path / "pretrain.yaml"
    path.write_text("max_steps: 10\n")
    assert load_params(PretrainParams, path, {"tracking": ["mlflow", "tensorboard"]}).tracking == ["mlflow",
                                                                                                   "tensorboard"]
    with pytest.raises(ValueError, match=r"pretrain.yaml: tracking.0: Input should be 'mlflow', 'tensorboard'"):
        load_params(PretrainParams, path, {"tracking": ["tb"]})
    with pytest.raises(ValueError, match="tracking names csv more than once"):
        load_params(PretrainParams, path, {"tracking": ["csv", "csv"]})


def test_the_loggers_module_imports_no_logger_package_until_one_is_chosen():
    code = ("import sys, llm.stages, llm.mlops.loggers; "
            "print(sorted(m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True)
    assert out.stdout.strip() == "[]"


def test_choosing_other_loggers_is_the_same_run_with_the_same_name(prepared):
    from llm.mlops.stage_tracking import training_params, training_run_name
    from llm.training.pretrain import pretrain_identity

    mlflow_only = pretrain_params(6, ["mlflow"])
    all_four = pretrain_params(6, ["mlflow", "tensorboard", "wandb", "csv"])
    args = (MODEL, prepared["tokens"], prepared["tokenizer"])
    assert pretrain_identity(mlflow_only, *args) == pretrain_identity(all_four, *args)  # a checkpoint resumes across
    tokenizer = {"kind": "char", "vocab_size": 40}
    logged = training_params(all_four, MODEL.model_dump(), tokenizer)
    assert "tracking" not in logged["train"]
    assert training_run_name("pretrain", logged) == training_run_name(
        "pretrain", training_params(mlflow_only, MODEL.model_dump(), tokenizer))


def test_wandb_runs_offline_without_credentials_and_follows_wandb_mode(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: nobody logged in
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    offline = loggers.WandbLogger(tmp_path / "logs", name="run", run_id="first", stage="pretrain")
    assert offline.run.offline
    offline.close("FINISHED")
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*-first/run-first.wandb"))

    monkeypatch.setenv("WANDB_MODE", "disabled")
    disabled = loggers.WandbLogger(tmp_path / "logs", name="run", run_id="second", stage="pretrain")
    disabled.log_metrics({"train/loss": 1.0}, 1, time.time())
    disabled.close("FINISHED")
    assert not list((tmp_path / "logs" / "wandb").glob("*second*"))
