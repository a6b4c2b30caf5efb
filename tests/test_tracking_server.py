"""Specification: a tracking server that goes away in the middle of training does not slow training down,
and every step's metrics reach it once it is back.

A real ``mlflow server`` (SQLite backend in tmp_path, 127.0.0.1, a free port) is stopped while a tracked
``pretrain_stage`` runs in a thread, left down for a while, then started again on the same port and store.
Step times come from the run's own metric timestamps in MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient

from llm.config import ModelConfig, PretrainParams
from llm.mlops import tracking
from llm.stages import pretrain_stage

pytestmark = pytest.mark.slow

MAX_STEPS = 900
AFTER_STEPS = 150  # steps trained with the server back, at the end of the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: Path, port: int, log_file: Path) -> Iterator[subprocess.Popen]:
    """``mlflow server`` on 127.0.0.1:``port`` until the block ends (also on failure): its whole process group
    is stopped then."""
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
             "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        )
    try:
        deadline = time.monotonic() + 180
        while not answers(url):
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
            time.sleep(0.3)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def waited_for_a_cpu() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux's per-thread schedstat; 0 elsewhere):
    the share of its wall time that other processes' load takes, whatever this process does."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def step_seconds(clock: dict[int, float], first: int, last: int, window: int = 10) -> float:
    """Median seconds per step over steps ``first..last``, from windows of ``window`` steps (``clock``: seconds)."""
    spans = [(clock[s + window] - clock[s]) / window for s in range(first, last - window + 1)]
    assert len(spans) >= 20, f"too few steps to compare ({first}..{last})"
    return statistics.median(spans)


def test_training_keeps_its_speed_through_a_tracking_outage_and_every_step_arrives(
    tmp_path, monkeypatch, prepared, empty_mlflow_db, caplog
):
    db, port = tmp_path / "server.db", free_port()
    shutil.copy(empty_mlflow_db, db)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                 "LLM_TRACKING", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    progress: list[int] = []  # steps trained, as the loop reports them
    server_back = threading.Event()
    original = tracking.StageRun.callback

    # when each step ended, less the time the training thread waited for a CPU: the other test processes on the
    # machine come and go between the phases compared, the time training itself takes (or waits on tracking) not
    clock: dict[int, float] = {}

    def observed(self, step, metrics):
        original(self, step, metrics)
        clock[step] = time.monotonic() - waited_for_a_cpu()
        progress.append(step)
        if step == MAX_STEPS - AFTER_STEPS:  # the test's own pause: the last steps train with the server back
            assert server_back.wait(300), "the mlflow server did not come back"

    monkeypatch.setattr(tracking.StageRun, "callback", observed)
    params = PretrainParams(max_steps=MAX_STEPS, batch_size=8, learning_rate=1e-3, warmup_steps=10,
                            eval_interval=MAX_STEPS, eval_batches=2, checkpoint_interval=MAX_STEPS, log_interval=1,
                            device="cpu", num_threads=1, progress=False)
    model = ModelConfig(context_length=64, n_layer=2, n_head=2, d_model=64)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = pretrain_stage(params, model, prepared["tokens"], prepared["tokenizer"],
                                               tmp_path / "pretrain", register=False)
        except BaseException as err:  # shown by the main thread
            outcome["error"] = err

    def wait_for_step(step: int, seconds: float = 300) -> int:
        deadline = time.monotonic() + seconds
        while (not progress or progress[-1] < step) and "error" not in outcome and trainer.is_alive():
            assert time.monotonic() < deadline, f"training did not reach step {step}"
            time.sleep(0.05)
        assert "error" not in outcome, outcome.get("error")
        return progress[-1]

    artifacts, server_log = tmp_path / "artifacts", tmp_path / "server.log"
    trainer = threading.Thread(target=train, name="trainer", daemon=True)
    pause_at = MAX_STEPS - AFTER_STEPS
    try:
        with caplog.at_level(logging.WARNING, logger="llm.mlops.tracking"):
            with mlflow_server(db, artifacts, port, server_log):
                trainer.start()
                down_at = wait_for_step(150)
            assert not answers(url)  # the server is gone, training goes on
            outage_started = time.monotonic()
            while (time.monotonic() - outage_started < 8 or progress[-1] < down_at + 300) and progress[-1] < pause_at:
                assert trainer.is_alive() and "error" not in outcome, outcome.get("error")
                time.sleep(0.1)
            restart_at = min(progress[-1], pause_at)  # from here on the restarting server also takes CPU
            with mlflow_server(db, artifacts, port, server_log):
                server_back.set()
                trainer.join(timeout=600)
                assert not trainer.is_alive(), "training did not finish"
                assert "error" not in outcome, outcome.get("error")
    finally:
        server_back.set()
        trainer.join(timeout=600)

    run_id = outcome["result"]["run_id"]
    client = MlflowClient(f"sqlite:///{db}")  # the server's own store, read after it stopped
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, MAX_STEPS + 1))  # every step, exactly once
    assert len({m.step for m in client.get_metric_history(run_id, "perf/tokens_per_s")}) == MAX_STEPS
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and tracking.DROPPED_TAG not in run.data.tags

    before = step_seconds(clock, 20, down_at)
    during = step_seconds(clock, down_at + 5, restart_at)
    print(f"median s/step, waits for a CPU left out: before the outage {before:.4f}, during {during:.4f} "
          f"({during / before:.2f}x); outage from step {down_at} to {restart_at}")
    assert during <= 1.2 * before
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages) and any("answers again" in m for m in messages)
