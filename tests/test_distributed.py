"""Data-parallel pretraining under torchrun (two CPU processes, gloo): it trains, checkpoints once, and a
run stopped and resumed with the same number of processes reproduces the uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.1}
PRETRAIN = {"max_steps": 8, "batch_size": 4, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2,
            "checkpoint_interval": 4, "log_interval": 1, "device": "cpu", "progress": False, "seed": 3}

pytestmark = pytest.mark.slow


def torchrun(prepared: dict, params_dir: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_TRACKING": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llm", "pretrain", "--tokens", str(prepared["tokens"]), "--tokenizer", str(prepared["tokenizer"]),
           "--out", str(out), "--params", str(params_dir / "pretrain.yaml"),
           "--model-params", str(params_dir / "model.yaml"), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


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

    # each process's sampler state is in the checkpoint, so a job of another size cannot resume it exactly
    single = torchrun(prepared, params_dir, tmp_path / "split", "--until-step", "8", nproc=1)
    assert single.returncode != 0
    assert "written by 2 process(es), this job has 1" in single.stderr
