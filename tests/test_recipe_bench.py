"""Specification of bench/recipe.py: recipes compared on the same held-out text, at equal steps or equal time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from recipe import RECIPES, recipe_configs  # noqa: E402

TINY = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context_length=16", "pretrain.batch_size=4"]


def test_default_reads_params_and_sets_change_every_recipe():
    model, pretrain = recipe_configs("default", [], ROOT / "params")
    assert (model.d_model, pretrain.optimizer) == (128, "muon")  # params/model.yaml, params/pretrain.yaml
    model, pretrain = recipe_configs("nanogpt", ["model.mlp=relu2", "pretrain.learning_rate=3e-3"], ROOT / "params")
    assert (model.position, model.bias, model.mlp, pretrain.learning_rate) == ("learned", True, "relu2", 3e-3)
    assert RECIPES["previous"][1]["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="model.KEY=VALUE"):
        recipe_configs("default", ["d_model=64"], ROOT / "params")
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_configs("mine", [], ROOT / "params")


def run_bench(prepared, tmp_path, *args: str) -> dict:
    out = tmp_path / "recipe.json"
    sets = [a for s in TINY for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/recipe.py"), "--tokens", str(prepared["tokens"]),
         "--tokenizer", str(prepared["tokenizer"]), "--threads", "1", "--evals", "2", "--json", str(out), *sets, *args],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| recipe | params | steps |" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.pipeline
def test_recipes_train_the_same_steps_and_score_the_whole_val_split(prepared, tmp_path):
    results = run_bench(prepared, tmp_path, "--steps", "4", "--recipes", "nanogpt,previous",
                        "--plot", str(tmp_path / "curve.png"))["results"]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["recipe"] for r in results] == ["nanogpt", "previous"]
    for r in results:
        assert r["steps"] == 4 and r["tokens"] == 4 * 4 * 16
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert 0 < r["curve"][0]["seconds"] <= r["curve"][1]["seconds"]  # training time only grows
        assert math.isfinite(r["val_bpb"]) and 0 < r["val_bpb"] < 10
    assert results[0]["model"]["position"] == "learned" and results[1]["model"]["position"] == "rope"


@pytest.mark.pipeline
def test_a_time_budget_sizes_each_run_from_its_measured_step_time(prepared, tmp_path):
    (r,) = run_bench(prepared, tmp_path, "--budget", "2", "--calibrate", "2", "--recipes", "default",
                     "--name", "mine")["results"]
    assert r["recipe"] == "mine" and r["calibrated_step_s"] > 0
    assert r["steps"] == max(1, int(2 / r["calibrated_step_s"]))
    assert r["pretrain"]["optimizer"] == "muon"
