"""Specification of the training loop: schedule, exact resume of the same run only, divergence, checkpoints,
and stopping on a signal."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading

import numpy as np
import pytest
import torch

from llm.config import ModelConfig, PretrainParams
from llm.data.tokenizer import CharTokenizer
from llm.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from llm.model.gpt import GPT
from llm.training.loop import TrainingDivergedError, TrainingInterrupted, build_optimizer, lr_at
from llm.training.pretrain import pretrain, pretrain_identity

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


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(TINY.model_copy(update={"vocab_size": 50, "bias": True, "qk_norm": True}))
    opt = build_optimizer(model, PretrainParams(optimizer="muon", learning_rate=2e-3, muon_lr=0.02),
                          torch.device("cpu"))
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    hidden = {id(m.weight) for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)}
    assert in_muon == hidden
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.wte.weight) in in_adamw and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}  # every weight once
    # the schedule scales each group from its own peak
    assert [g["lr_scale"] for g in opt.param_groups] == [pytest.approx(10.0), 1.0, 1.0]


def test_the_optimizer_chain_state_round_trips_and_refuses_another_optimizers_state():
    model = GPT(TINY.model_copy(update={"vocab_size": 50}))
    params = PretrainParams(optimizer="muon")
    opt = build_optimizer(model, params, torch.device("cpu"))
    model(torch.randint(50, (2, 8)), torch.randint(50, (2, 8))).loss.backward()
    opt.step()
    state = opt.state_dict()
    again = build_optimizer(model, params, torch.device("cpu"))
    again.load_state_dict(state)
    for a, b in zip(opt.optimizers, again.optimizers):
        for p in a.state:
            for key, value in a.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.state[p][key])), key
    with pytest.raises(ValueError, match="does not match"):
        again.load_state_dict(build_optimizer(model, PretrainParams(), torch.device("cpu")).state_dict())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_reproduces_the_uninterrupted_losses(prepared, tmp_path, optimizer):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    full = pretrain(tiny_params(optimizer=optimizer), *args, tmp_path / "full")
    assert full.run_identity == pretrain_identity(tiny_params(optimizer=optimizer), *args)  # known before training
    part = pretrain(tiny_params(optimizer=optimizer), *args, tmp_path / "split", until_step=5)
    assert part.step == 5 and verify_checkpoint(tmp_path / "split")["step"] == 5
    resumed = pretrain(tiny_params(optimizer=optimizer), *args, tmp_path / "split")
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
    with pytest.raises(CheckpointError, match="model.safetensors: truncated .* It cannot be resumed: .*--no-resume"):
        pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)


def weights_of(folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[0].state_dict()


def assert_same_weights(a, b) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("change", [{"max_steps": 14}, {"learning_rate": 1e-3}])
def test_a_changed_param_starts_a_new_run_from_fresh_weights(prepared, tmp_path, caplog, change):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    pretrain(tiny_params(), *args, tmp_path / "run", until_step=6)
    with caplog.at_level(logging.WARNING, logger="llm.training.loop"):
        restarted = pretrain(tiny_params(**change), *args, tmp_path / "run", until_step=4)
    fresh = pretrain(tiny_params(**change), *args, tmp_path / "fresh", until_step=4)
    key, value = next(iter(change.items()))
    before = tiny_params().model_dump()[key]
    assert f"holds the checkpoint of another run (params.{key} {before} -> {value})" in caplog.text
    assert restarted.step == 4
    assert [h["train/loss"] for h in restarted.history] == [h["train/loss"] for h in fresh.history]
    assert_same_weights(tmp_path / "run", tmp_path / "fresh")
    config = verify_checkpoint(tmp_path / "run")
    assert config["step"] == 4 and config["run_identity"] == restarted.run_identity == fresh.run_identity
    assert config["identity"]["params"][key] == value


def test_another_runs_checkpoint_is_kept_until_the_new_run_writes_its_first(prepared, tmp_path):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    first = pretrain(tiny_params(), *args, tmp_path / "run", until_step=6)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()

    def fail_at_step_3(step, metrics):
        if step == 3:
            raise RuntimeError("the new run died before its first checkpoint (step 6)")

    with pytest.raises(RuntimeError, match="died before its first checkpoint"):
        pretrain(tiny_params(max_steps=20), *args, tmp_path / "run", callbacks=[fail_at_step_3])
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert verify_checkpoint(tmp_path / "run")["run_identity"] == first.run_identity


def test_the_same_run_resumes_whatever_the_execution_only_params(prepared, tmp_path, caplog):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    pretrain(tiny_params(), *args, tmp_path / "run", until_step=6)
    with caplog.at_level(logging.INFO, logger="llm.training.loop"):
        resumed = pretrain(tiny_params(checkpoint_interval=4, log_interval=3, num_threads=1), *args, tmp_path / "run")
    assert "resuming from" in caplog.text and "another run" not in caplog.text
    assert resumed.step == 12 and len(resumed.history) == 12


def test_a_different_model_shape_starts_over(prepared, tmp_path, caplog):
    out = tmp_path / "run"
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
    wider = TINY.model_copy(update={"d_model": 64})
    with caplog.at_level(logging.WARNING, logger="llm.training.loop"):
        result = pretrain(tiny_params(max_steps=2, eval_interval=2), wider, prepared["tokens"], prepared["tokenizer"],
                          out)
    assert "model.d_model 32 -> 64" in caplog.text
    assert result.step == 2 and verify_checkpoint(out)["model"]["d_model"] == 64


def test_other_token_data_starts_over(prepared, tmp_path, caplog):
    out = tmp_path / "run"
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
    tokens = shutil.copytree(prepared["tokens"], tmp_path / "tokens")
    meta = json.loads((tokens / "meta.json").read_text())
    train = np.memmap(tokens / "train.bin", dtype=meta["dtype"], mode="r+")
    train[:2] = train[1::-1].copy()  # swap two tokens: same size, other data
    train.flush()
    with caplog.at_level(logging.WARNING, logger="llm.training.loop"):
        result = pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, tokens, prepared["tokenizer"], out)
    assert "inputs.tokens.train.bin changed" in caplog.text
    assert result.step == 2 and len(result.history) == 2


def test_no_resume_starts_over_even_for_the_same_run(prepared, tmp_path, caplog):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    pretrain(tiny_params(), *args, tmp_path / "run", until_step=6)
    with caplog.at_level(logging.WARNING, logger="llm.training.loop"):
        result = pretrain(tiny_params(), *args, tmp_path / "run", resume=False, until_step=2)
    assert "resume is off, starting over" in caplog.text
    assert result.step == 2 and verify_checkpoint(tmp_path / "run")["step"] == 2


def test_a_reader_refuses_an_interrupted_swap_and_the_next_training_puts_it_back(prepared, tmp_path, caplog):
    out = tmp_path / "run"
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    pretrain(tiny_params(max_steps=4, eval_interval=2), *args, out, until_step=2)
    out.rename(out.with_name("run.old"))  # as if the process died between the two renames
    for read in (verify_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"interrupted between its two renames .* run the training"):
            read(out)
    assert not out.exists() and (tmp_path / "run.old").is_dir()  # readers change nothing
    with caplog.at_level(logging.INFO, logger="llm.training.loop"):
        result = pretrain(tiny_params(max_steps=4, eval_interval=2), *args, out)
    assert "put back the checkpoint" in caplog.text and "resuming from" in caplog.text
    assert result.step == 4 and verify_checkpoint(out)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_training_removes_the_temporary_folders_of_killed_checkpoint_writes(prepared, tmp_path):
    killed_write = tmp_path / ".run.0123456789ab.tmp"
    killed_write.mkdir()
    (killed_write / "model.safetensors").write_bytes(b"half")
    pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"], prepared["tokenizer"],
             tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_gradient_norm_refuses_the_step(prepared, tmp_path, monkeypatch, grad_clip):
    out = tmp_path / "run"
    params = tiny_params(grad_clip=grad_clip)
    pretrain(params, TINY, prepared["tokens"], prepared["tokenizer"], out, until_step=6)
    before = (out / "model.safetensors").read_bytes()
    real_forward = GPT.forward
    calls = {"n": 0}

    def infinite_gradient(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += self.training
        if self.training and calls["n"] == 3:
            self.lm_head.weight.register_hook(lambda grad: grad * float("inf"))  # the loss itself stays finite
        return out

    monkeypatch.setattr(GPT, "forward", infinite_gradient)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became (inf|nan) at step 9 .* not taken"):
        pretrain(params, TINY, prepared["tokens"], prepared["tokenizer"], out)
    assert (out / "model.safetensors").read_bytes() == before
    assert verify_checkpoint(out)["step"] == 6


def test_a_checkpoint_is_never_written_from_non_finite_weights(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(tiny_params(), TINY, prepared["tokens"], prepared["tokenizer"], out, until_step=6)
    before = (out / "model.safetensors").read_bytes()
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *a, **kw):
        result = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # step 12, a checkpoint step: the next forward would come too late to notice
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(TrainingDivergedError, match="weights became NaN or infinite at step 12"):
        pretrain(tiny_params(), TINY, prepared["tokens"], prepared["tokenizer"], out)
    assert (out / "model.safetensors").read_bytes() == before and verify_checkpoint(out)["step"] == 6


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    tokenizer = CharTokenizer(list("ab"))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=8, n_layer=1, n_head=1, d_model=8)
    model = GPT(config)
    with torch.no_grad():
        model.wte.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="not written: weights wte.weight hold NaN or infinite"):
        save_checkpoint(tmp_path / "ckpt", model, config, tokenizer)
    assert list(tmp_path.iterdir()) == []


def send_at_step(step_to_signal: int, *signums: int):
    """A callback that sends this process ``signums`` when step ``step_to_signal`` is done."""

    def callback(step, metrics):
        if step == step_to_signal:
            for signum in signums:
                os.kill(os.getpid(), signum)

    return callback


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_and_the_run_resumes_exactly(prepared, tmp_path,
                                                                                           signum):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as stopped:
        pretrain(tiny_params(), *args, tmp_path / "run", callbacks=[send_at_step(4, signum)])
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert (stopped.value.signum, stopped.value.step, stopped.value.checkpoint) == (signum, 4, tmp_path / "run")
    assert stopped.value.exit_code == 128 + signum
    assert verify_checkpoint(tmp_path / "run")["step"] == 4
    assert {s: signal.getsignal(s) for s in previous} == previous  # handlers restored

    resumed = pretrain(tiny_params(), *args, tmp_path / "run")
    full = pretrain(tiny_params(), *args, tmp_path / "full")
    assert resumed.step == 12 and [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in full.history]
    assert_same_weights(tmp_path / "run", tmp_path / "full")


def test_a_signal_on_a_checkpoint_step_writes_no_second_checkpoint(prepared, tmp_path, monkeypatch):
    import llm.training.loop as loop

    writes = []
    real_write = loop._write_checkpoint
    monkeypatch.setattr(loop, "_write_checkpoint",
                        lambda run, metrics: writes.append(run.step) or real_write(run, metrics))
    with pytest.raises(TrainingInterrupted, match="SIGINT stopped training at step 6"):
        pretrain(tiny_params(), TINY, prepared["tokens"], prepared["tokenizer"], tmp_path / "run",
                 callbacks=[send_at_step(6, signal.SIGINT)])  # step 6 is a checkpoint step
    assert writes == [6]


def test_a_second_sigint_stops_at_once_without_a_new_checkpoint(prepared, tmp_path):
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    with pytest.raises(KeyboardInterrupt) as stopped:
        pretrain(tiny_params(), *args, tmp_path / "run", callbacks=[send_at_step(8, signal.SIGINT, signal.SIGINT)])
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert verify_checkpoint(tmp_path / "run")["step"] == 6  # the last periodic checkpoint, intact
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_training_outside_the_main_thread_leaves_signal_handlers_alone(prepared, tmp_path):
    results, errors = [], []

    def train_in_thread():
        try:
            results.append(pretrain(tiny_params(max_steps=2, eval_interval=2), TINY, prepared["tokens"],
                                    prepared["tokenizer"], tmp_path / "run"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=train_in_thread)
    thread.start()
    thread.join()
    assert errors == [] and results[0].step == 2


def test_the_code_that_computes_a_run_is_part_of_its_identity_but_its_comments_are_not(prepared):
    from llm.training.loop import _code_digest
    from llm.training.pretrain import pretrain_inputs

    plain = _code_digest("def step(x):\n    return x + 1\n")
    assert _code_digest('"""Module."""\ndef step(x):\n    """Add one."""\n    return x + 1  # why\n') == plain
    assert _code_digest("def step(x):\n    return x + 2\n") != plain
    code = pretrain_inputs(prepared["tokens"], prepared["tokenizer"])["code"]
    assert set(code) == {"llm.model.gpt", "llm.training.loop", "llm.training.pretrain", "llm.data.tokens"}
    assert all(len(digest) == 64 for digest in code.values())


def test_the_summary_train_loss_is_the_last_steps_and_until_step_says_it_stopped_early(prepared, tmp_path, caplog):
    """Issue 22, item 12: metrics.json's train/loss (a mean of the last log_interval steps) disagreed with the
    log line and MLflow's last value (the last step's); `--until-step 4` ended on 4/4 without a word."""
    args = (TINY, prepared["tokens"], prepared["tokenizer"])
    with caplog.at_level(logging.INFO, logger="llm"):
        part = pretrain(tiny_params(), *args, tmp_path / "out", until_step=4)
    losses = [h["train/loss"] for h in part.history]
    assert part.metrics["train/loss"] == losses[-1]
    assert part.metrics["train/loss_avg"] == pytest.approx(sum(losses[-2:]) / 2)  # log_interval 2
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["train/loss"] == losses[-1]
    assert f"step 4: train {losses[-1]:.4f}" in caplog.text  # the log line shows the same value
    assert "stopped early at step 4 of 12 (until_step)" in caplog.text


def test_a_second_training_run_on_a_folder_being_written_fails_at_once_naming_the_first(prepared, tmp_path):
    import time

    from llm.io import FolderLocked

    from helpers import hold_folder_lock

    out = tmp_path / "run"
    first = hold_folder_lock(out)  # the first run, training
    try:
        killed_write = tmp_path / ".run.0123456789ab.tmp"  # the first run's checkpoint being written
        killed_write.mkdir()
        start = time.monotonic()
        with pytest.raises(FolderLocked, match=rf"pid {first.pid}"):
            pretrain(tiny_params(max_steps=2), TINY, prepared["tokens"], prepared["tokenizer"], out)
        assert time.monotonic() - start < 5 and killed_write.is_dir() and not out.exists()  # nothing touched
    finally:
        first.kill()
        first.wait()
