"""Data-parallel pretraining under torchrun (two CPU processes, gloo): it trains, checkpoints once, and a
run stopped and resumed with the same number of processes reproduces the uninterrupted one (a job of 1 process
accumulating twice as many micro-batches continues it); a signal to one process stops every process at the
same step."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.1}
PRETRAIN = {"max_steps": 8, "batch_size": 4, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2,
            "checkpoint_interval": 4, "log_interval": 1, "device": "cpu", "progress": False, "seed": 3}

pytestmark = pytest.mark.slow


def torchrun_command(prepared: dict, params_dir: Path, out: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llm", "pretrain", "--tokens", str(prepared["tokens"]), "--tokenizer", str(prepared["tokenizer"]),
            "--out", str(out), "--params", str(params_dir / "pretrain.yaml"),
            "--model-params", str(params_dir / "model.yaml"), *extra]


TORCHRUN_ENV = {**os.environ, "LLM_TRACKING": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(prepared: dict, params_dir: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(prepared, params_dir, out, *extra, nproc=nproc), env=TORCHRUN_ENV,
                          capture_output=True, text=True, timeout=300)


def train_losses(out: Path) -> list[str]:
    with open(out / "curve" / "train.csv") as f:
        return [row["train_loss"] for row in csv.DictReader(f)]


@pytest.fixture()
def params_dir(tmp_path: Path) -> Path:
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    return tmp_path


def test_two_processes_train_and_resume_exactly(prepared, params_dir, tmp_path):
    full = torchrun(prepared, params_dir, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["step"] == 8
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["val/loss"] < 6.0 and metrics["perf/tokens_per_s"] > 0

    first = torchrun(prepared, params_dir, tmp_path / "split", "--until-step", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = torchrun(prepared, params_dir, tmp_path / "split")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")
    assert len(train_losses(tmp_path / "full")) == 8

    # every process draws the same micro-batches, so 1 process accumulating 2 continues the same run; 1 process
    # accumulating 1 trains on half the data per step: another run, started over
    single = torchrun(prepared, params_dir, tmp_path / "split", "--until-step", "8", "--set", "grad_accum_steps=2",
                      nproc=1)
    assert single.returncode == 0 and "resuming from" in single.stderr, single.stderr[-3000:]
    other = torchrun(prepared, params_dir, tmp_path / "split", "--until-step", "1", nproc=1)
    assert other.returncode == 0 and "holds the checkpoint of another run" in other.stderr, other.stderr[-3000:]


def worker_of_rank(launcher: psutil.Process, rank: int, timeout: float = 120) -> psutil.Process:
    """The process that torchrun started for ``rank`` (its environment says RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in launcher.children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "llm" in child.cmdline():
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"torchrun started no worker of rank {rank} in {timeout}s")


def test_a_signal_to_one_process_stops_every_process_at_the_same_step_and_the_job_resumes_exactly(
    prepared, tmp_path
):
    params_dir = tmp_path / "params"
    params_dir.mkdir()
    (params_dir / "pretrain.yaml").write_text(yaml.safe_dump({**PRETRAIN, "max_steps": 24, "eval_interval": 12}))
    (params_dir / "model.yaml").write_text(yaml.safe_dump(MODEL))
    full = torchrun(prepared, params_dir, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    out, log = tmp_path / "split", tmp_path / "torchrun.txt"
    with log.open("w") as f:
        launcher = subprocess.Popen(torchrun_command(prepared, params_dir, out), env=TORCHRUN_ENV, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rank1 = worker_of_rank(psutil.Process(launcher.pid), 1)
        deadline = time.monotonic() + 240
        while not (out / "config.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        rank1.send_signal(signal.SIGSTOP)  # freeze it: its partner waits in the next collective
        rank1.send_signal(signal.SIGTERM)  # only rank 1 is told to stop
        rank1.send_signal(signal.SIGCONT)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    steps = {int(m) for m in re.findall(r"SIGTERM stopped training at step (\d+)", log.read_text())}
    assert len(steps) == 1, log.read_text()[-3000:]  # one step, whichever process reported it
    [step] = steps
    assert 4 <= step < 24 and json.loads((out / "config.json").read_text())["step"] == step

    rest = torchrun(prepared, params_dir, out)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert train_losses(out) == train_losses(tmp_path / "full")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
