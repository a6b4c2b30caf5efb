"""Resume is decided once, where the training loop loads the checkpoint: each input folder is hashed once per
start of a stage, and the tracking run that the loop reports resuming is the one the stage continues."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_stages import tracked  # noqa: F401  (fixture: an empty MLflow store in the working folder)

from llm.config import ModelConfig, PretrainParams

mlflow = pytest.importorskip("mlflow")

MODEL = ModelConfig(context_length=32, n_layer=1, n_head=2, d_model=16)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(max_steps: int) -> PretrainParams:
    return PretrainParams(max_steps=max_steps, batch_size=2, learning_rate=3e-3, warmup_steps=1, eval_interval=2,
                          eval_batches=1, checkpoint_interval=100, log_interval=1, device="cpu", progress=False)


def count_calls(monkeypatch, module, name: str) -> Counter:
    """Replace ``module.name`` (a hash function of a path) with a wrapper that counts each path's name."""
    counts: Counter = Counter()
    original = getattr(module, name)

    def counted(path):
        counts[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(module, name, counted)
    return counts


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """How many times each folder is hashed (``llm.io.sha256_tree``, as the pretraining inputs call it)."""
    from llm.training import pretrain

    return count_calls(monkeypatch, pretrain, "sha256_tree")


def test_a_tracked_pretraining_hashes_each_input_folder_once_per_start(tracked, prepared, hashed):  # noqa: F811
    from llm.stages import pretrain_stage

    out = tracked / "pretrain"
    paused = pretrain_stage(tiny(4), MODEL, prepared["tokens"], prepared["tokenizer"], out, until_step=2,
                            register=False)
    assert hashed == {prepared["tokens"].name: 1, prepared["tokenizer"].name: 1}
    hashed.clear()
    resumed = pretrain_stage(tiny(4), MODEL, prepared["tokens"], prepared["tokenizer"], out, register=False)
    assert hashed == {prepared["tokens"].name: 1, prepared["tokenizer"].name: 1}  # and the resume is decided once
    assert resumed["run_id"] == paused["run_id"] and resumed["step"] == 4


def test_a_tracked_finetuning_hashes_its_chat_files_once_per_start(tracked, prepared, monkeypatch):  # noqa: F811
    from llm.config import FinetuneParams
    from llm.stages import finetune_stage, pretrain_stage
    from llm.training import finetune

    pretrain_stage(tiny(2), MODEL.model_copy(update={"context_length": 128}), prepared["tokens"],
                   prepared["tokenizer"], tracked / "pretrain", track=False)
    counts = count_calls(monkeypatch, finetune, "sha256_file")
    params = FinetuneParams(max_steps=4, batch_size=2, warmup_steps=1, eval_interval=2, eval_batches=1,
                            checkpoint_interval=100, log_interval=1, device="cpu", progress=False)
    args = (tracked / "pretrain", prepared["clean"], None, tracked / "chat", tracked / "finetune")
    paused = finetune_stage(params, *args, until_step=2, register=False)
    assert counts == {"train.jsonl": 1, "val.jsonl": 1}
    counts.clear()
    resumed = finetune_stage(params, *args, register=False)
    assert counts == {"train.jsonl": 1, "val.jsonl": 1}
    assert resumed["run_id"] == paused["run_id"] and resumed["step"] == 4
