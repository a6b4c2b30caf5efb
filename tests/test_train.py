"""Specification of the training loop: schedule, exact resume, divergence, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm.config import ModelConfig, PretrainParams
from llm.model.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from llm.model.gpt import GPT
from llm.training.loop import TrainingDivergedError, build_optimizer, lr_at
from llm.training.pretrain import pretrain

TINY = ModelConfig(context_length=32, n_layer=2, n_head=2, d_model=32, dropout=0.1)


def tiny_params(**kw) -> PretrainParams:
    base = dict(max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=3, eval_interval=4, eval_batches=2,
                checkpoint_interval=6, log_interval=2, device="cpu", progress=False, seed=7)
    return PretrainParams(**{**base, **kw})


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    p = PretrainParams(max_steps=110, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, p) == pytest.approx(0.1)
    assert lr_at(9, p) == pytest.approx(1.0)
    assert lr_at(60, p) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(110, p) == pytest.approx(0.1)
    assert all(lr_at(s, p) >= lr_at(s + 1, p) for s in range(10, 110))


def test_weight_decay_applies_to_matrices_only():
    model = GPT(TINY.model_copy(update={"vocab_size": 50, "bias": True}))
    opt = build_optimizer(model, PretrainParams(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0


def test_resumed_run_reproduces_the_uninterrupted_losses(prepared, tmp_path):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    full = pretrain(tiny_params(), *args, tmp_path / "full")
    part = pretrain(tiny_params(), *args, tmp_path / "split", until_step=5)
    assert part.step == 5 and verify_checkpoint(tmp_path / "split")["step"] == 5
    resumed = pretrain(tiny_params(), *args, tmp_path / "split")
    assert resumed.step == 12
    full_losses = [h["train/loss"] for h in full.history]
    resumed_losses = [h["train/loss"] for h in resumed.history]
    assert len(full_losses) == 12
    assert resumed_losses == full_losses  # bit-for-bit: same batches, same dropout masks, same optimizer state
    assert [h.get("val/loss") for h in resumed.history] == [h.get("val/loss") for h in full.history]
    a, _, _ = load_checkpoint(tmp_path / "full")
    b, _, _ = load_checkpoint(tmp_path / "split")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_training_lowers_val_loss_and_reports_bits_per_byte(prepared, tmp_path):
    result = pretrain(tiny_params(max_steps=40, eval_interval=20), TINY, prepared["tokens"], prepared["tokenizer"],
                      tmp_path / "run")
    meta = json.loads((prepared["tokens"] / "meta.json").read_text())
    vals = [h["val/loss"] for h in result.history if "val/loss" in h]
    assert vals[-1] < vals[0] < math.log(meta["vocab_size"]) + 0.5  # starts near uniform, then learns
    m = result.metrics
    assert m["val/bpb"] == pytest.approx(m["val/loss"] * meta["splits"]["val"]["tokens_per_byte"] / math.log(2))
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]))
    assert m["perf/tokens_per_s"] > 0 and 0 < m["perf/mfu"] < 1
    files = {p.name for p in (tmp_path / "run").iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer", "train_state", "metrics.json", "curve",
                "manifest.json"}
    assert expected <= files
    assert (tmp_path / "run" / "curve" / "val.csv").read_text().startswith("step,val_loss,val_bpb\n")


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(tiny_params(), TINY, prepared["tokens"], prepared["tokenizer"], out, until_step=6)
    before = (out / "model.safetensors").read_bytes()
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if self.training and calls["n"] >= 3:
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 9"):
        pretrain(tiny_params(), TINY, prepared["tokens"], prepared["tokenizer"], out)
    assert (out / "model.safetensors").read_bytes() == before
    assert verify_checkpoint(out)["step"] == 6


def test_truncated_checkpoint_is_a_clear_error(prepared, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_checkpoint(out)


def test_resuming_a_different_model_shape_is_refused(prepared, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
    wider = TINY.model_copy(update={"d_model": 64})
    with pytest.raises(CheckpointError, match="different model shape"):
        pretrain(tiny_params(max_steps=4), wider, prepared["tokens"], prepared["tokenizer"], out)


def test_interrupted_swap_recovers_previous_checkpoint(prepared, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
    out.rename(out.with_name("run.old"))  # as if the process died between the two renames
    assert verify_checkpoint(out)["step"] == 2
