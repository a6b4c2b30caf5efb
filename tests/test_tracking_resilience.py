"""Specification of tracking that never stops training and of runs that survive their process: metrics wait
out a store outage in a bounded queue, the end of a stage is bounded, a resumed run continues its own curve,
runs left RUNNING by a killed process are recognised, and the default store is the project's real root.

The outage here is simulated (the sender's one network call fails on demand); ``test_tracking_server.py``
stops a real ``mlflow server`` in the middle of training.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from llm.mlops import tracking
from llm.mlops.tracking import _MetricSender, stage_run, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking_db(tmp_path, monkeypatch, empty_mlflow_db) -> Path:
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                 "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return db


class Outage:
    """Makes every delivery of the metric sender fail while ``down`` is set, and records who delivered."""

    def __init__(self, monkeypatch):
        self.down = threading.Event()
        self.senders: set[str] = set()
        original = _MetricSender._send

        def send(sender, points, tags, timeout=tracking.SEND_TIMEOUT_S):
            self.senders.add(threading.current_thread().name)
            if self.down.is_set():
                raise MlflowException("API request to http://tracking:5000/api/2.0/mlflow/runs/log-batch failed "
                                      "with exception Connection refused")
            return original(sender, points, tags, timeout)

        monkeypatch.setattr(_MetricSender, "_send", send)


def _steps(run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key))


def test_metrics_logged_during_an_outage_arrive_when_the_store_answers_again(tracking_db, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.2)
    outage = Outage(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="llm.mlops.tracking"), stage_run("pretrain", {}) as run:
        for step in range(1, 101):
            run.callback(step, {"train/loss": 1.0 / step})
        run.flush()
        outage.down.set()
        for step in range(101, 401):
            run.callback(step, {"train/loss": 1.0 / step, "lr": 0.1})
        run.flush()
        time.sleep(0.5)  # the sender tries, fails and backs off meanwhile
        outage.down.clear()
    assert threading.main_thread().name not in outage.senders  # the training thread never sent anything
    assert _steps(run.run_id) == list(range(1, 401))
    assert _steps(run.run_id, "lr") == list(range(101, 401))
    logged = MlflowClient(tracking_uri()).get_run(run.run_id)
    assert logged.info.status == "FINISHED" and tracking.DROPPED_TAG not in logged.data.tags
    assert logged.data.tags[tracking.LOGGED_THROUGH_TAG] == "400"
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m and "training goes on" in m for m in messages)
    assert any("answers again" in m for m in messages)


def test_a_full_queue_drops_the_oldest_points_with_one_warning_and_a_run_tag(tracking_db, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "MAX_PENDING", 50)
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.2)
    outage = Outage(monkeypatch)
    outage.down.set()
    with caplog.at_level(logging.WARNING, logger="llm.mlops.tracking"), stage_run("pretrain", {}) as run:
        for step in range(1, 201):
            run.callback(step, {"train/loss": float(step)})
        outage.down.clear()
    assert _steps(run.run_id) == list(range(151, 201))  # the newest 50 kept
    assert MlflowClient(tracking_uri()).get_run(run.run_id).data.tags[tracking.DROPPED_TAG] == "150"
    dropped = [r.getMessage() for r in caplog.records if "never reached" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].startswith("150 metric points") and "150 oldest" in dropped[0]


def test_the_end_of_a_stage_waits_a_bounded_time_when_the_store_never_answers(tracking_db, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "CLOSE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(tracking, "MAX_BACKOFF_S", 0.2)
    outage = Outage(monkeypatch)
    outage.down.set()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="llm.mlops.tracking"), stage_run("pretrain", {}) as run:
        for step in range(1, 31):
            run.callback(step, {"train/loss": float(step)})
    assert time.monotonic() - started < 30  # MLflow's own retries alone would take minutes
    assert any(r.getMessage().startswith("30 metric points") and "still undelivered" in r.getMessage()
               for r in caplog.records)
    assert _steps(run.run_id) == []


def test_points_the_store_refuses_are_dropped_with_a_warning_instead_of_retried_forever(tracking_db, caplog):
    with caplog.at_level(logging.WARNING, logger="llm.mlops.tracking"), stage_run("clean", {}) as run:
        run.log_metrics({"not a valid key!": 1.0})
    logged = MlflowClient(tracking_uri()).get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags[tracking.DROPPED_TAG] == "1"
    assert any("refused 1 metric points" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_continues_one_curve_at_its_real_steps(tracking_db):
    with pytest.raises(KeyboardInterrupt), stage_run("pretrain", {"lr": 0.1}) as first:
        for step in range(1, 13):  # logged through step 12; the checkpoint it resumes from is step 10
            first.callback(step, {"train/loss": 10.0 - step / 10})
        raise KeyboardInterrupt
    client = MlflowClient(tracking_uri())
    assert client.get_run(first.run_id).info.status == "KILLED"

    with stage_run("pretrain", {"lr": 0.1, "extra": 1}, resume_run_id=first.run_id) as second:
        for step in range(11, 21):  # exact resume replays steps 11 and 12 with the same values
            second.callback(step, {"train/loss": 10.0 - step / 10})
    assert second.run_id == first.run_id
    history = sorted(client.get_metric_history(first.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 21))  # one point per step: no duplicates
    assert [m.value for m in history] == pytest.approx([10.0 - s / 10 for s in range(1, 21)])
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.ATTEMPT_TAG] == "2"
    assert run.data.params == {"lr": "0.1", "extra": "1"}
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1


def test_resuming_a_run_the_store_does_not_have_starts_a_new_one(tracking_db):
    with stage_run("pretrain", {}, resume_run_id="0123456789abcdef0123456789abcdef") as run:
        run.callback(1, {"train/loss": 1.0})
    assert run.run_id != "0123456789abcdef0123456789abcdef"
    assert MlflowClient(tracking_uri()).get_run(run.run_id).data.tags[tracking.ATTEMPT_TAG] == "1"


@pytest.mark.pipeline
def test_a_run_left_running_by_a_killed_process_is_marked_killed_when_the_stage_starts_again(tracking_db):
    code = ("import sys, time\n"
            "from llm.mlops.tracking import stage_run\n"
            "with stage_run('pretrain', {}) as run:\n"
            "    print(run.run_id, flush=True)\n"
            "    time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        killed_run = proc.stdout.readline().strip()
        assert killed_run, "the subprocess did not start its run"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    client = MlflowClient(tracking_uri())
    assert client.get_run(killed_run).info.status == "RUNNING"  # what SIGKILL leaves behind

    with stage_run("clean", {}):  # another stage's start leaves it alone
        pass
    assert client.get_run(killed_run).info.status == "RUNNING"
    with stage_run("pretrain", {}) as again:
        pass
    stale = client.get_run(killed_run)
    assert stale.info.status == "KILLED"
    assert f"process {proc.pid}" in stale.data.tags[tracking.KILLED_REASON_TAG]
    assert "is gone" in stale.data.tags[tracking.KILLED_REASON_TAG]
    assert client.get_run(again.run_id).info.status == "FINISHED"


def test_a_run_from_another_host_is_stale_only_when_its_heartbeat_is_old(tracking_db):
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("llm") or client.get_experiment(client.create_experiment("llm"))
    now = int(time.time())

    def running(heartbeat: int) -> str:
        tags = {"stage": "pretrain", tracking.HOST_TAG: "gpu-box-7", tracking.PID_TAG: "4242",
                tracking.HEARTBEAT_TAG: str(heartbeat)}
        return client.create_run(experiment.experiment_id, tags=tags).info.run_id

    alive, silent = running(now - 60), running(now - int(tracking.STALE_AFTER_S) - 60)
    with stage_run("pretrain", {}):
        pass
    assert client.get_run(alive).info.status == "RUNNING"
    stale = client.get_run(silent)
    assert stale.info.status == "KILLED" and "gpu-box-7" in stale.data.tags[tracking.KILLED_REASON_TAG]
    assert stale.info.end_time == (now - int(tracking.STALE_AFTER_S) - 60) * 1000  # when it was last alive


def test_a_run_records_its_host_pid_and_heartbeat(tracking_db):
    with stage_run("tokenize", {}) as run:
        pass
    tags = MlflowClient(tracking_uri()).get_run(run.run_id).data.tags
    assert tags[tracking.PID_TAG] == str(os.getpid())
    assert tags[tracking.HOST_TAG] and abs(int(tags[tracking.HEARTBEAT_TAG]) - time.time()) < 600


def test_the_default_store_is_in_the_dvc_root_that_dvc_sets_for_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp1234"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri() == f"sqlite:///{temp_copy.resolve()}/mlflow.db"  # the llm CLI: where it runs
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking_uri() == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"


@pytest.mark.slow
def test_dvc_exp_run_temp_records_its_run_in_the_project_store(tmp_path, empty_mlflow_db):
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(ROOT),
                "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
                "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})
    (project / "params.yaml").write_text("lr: 0.1\n")
    (project / "probe.py").write_text(
        "import os, yaml\n"
        "from llm.mlops.tracking import stage_run\n"
        "with stage_run('probe', yaml.safe_load(open('params.yaml'))) as run:\n"
        "    run.log_metrics({'probe/value': 1.0})\n"
        "open('out.txt', 'w').write(os.getcwd())\n")
    (project / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: python probe.py\n    deps: [probe.py]\n    params: [lr]\n    outs: [out.txt]\n")
    (project / ".gitignore").write_text("/mlflow.db\n/mlruns/\n")

    def run(*args: str) -> str:
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "probe project")
    shutil.copy(empty_mlflow_db, project / "mlflow.db")
    run("dvc", "exp", "run", "--temp", "-S", "lr=0.5", "--name", "lr-half")

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm").experiment_id])
    assert len(runs) == 1
    probe = runs[0]
    assert probe.data.params == {"lr": "0.5"} and probe.data.metrics == {"probe/value": 1.0}
    assert probe.data.tags["dvc.experiment"] == "lr-half"
    assert probe.info.artifact_uri.startswith((project / "mlruns").as_uri())
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
