"""Recipes in params/presets/ (``preset`` in params/base.yaml): the GPT-2 124M recipe is GPT-2 small's shape (the
parameter count of Transformers' GPT2LMHeadModel of that config), about 0.5M tokens per step, bf16, compile and
Muon; its values sit between the params files and any --set; a wrong preset is an error naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.params import read_params
from llm.config import ParamsError, read_preset
from llm.model.gpt import GPT
from llm.stages import Layout

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = Layout(ROOT)


def test_the_gpt2_preset_is_gpt2_small_with_half_a_million_tokens_per_step_in_bf16_compiled():
    from transformers import GPT2Config, GPT2LMHeadModel

    params = read_params("pretrain", None, LAYOUT, preset="gpt2")
    model = read_params("model", None, LAYOUT, preset="gpt2")
    assert read_params("base", None, LAYOUT).preset is None  # the demo keeps its small CPU model
    assert (model.n_layer, model.n_head, model.d_model, model.context_length) == (12, 12, 768, 1024)
    assert params.batch_size * params.grad_accum_steps * model.context_length == 524_288
    assert (params.dtype, params.compile, params.optimizer) == ("bfloat16", True, "muon")
    with torch.device("meta"):
        ours = GPT(model)
        theirs = GPT2LMHeadModel(GPT2Config(vocab_size=model.vocab_size, n_positions=1024, n_embd=768, n_layer=12,
                                            n_head=12, tie_word_embeddings=True))
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 124_475_904


def test_overrides_win_over_the_preset_which_wins_over_the_file():
    file = read_params("pretrain", None, LAYOUT)
    params = read_params("pretrain", {"max_steps": 7}, LAYOUT, preset="gpt2")
    assert params.max_steps == 7 and params.grad_accum_steps == 32 and file.grad_accum_steps != 32
    assert params.seed == file.seed  # a key the preset leaves alone


def test_a_wrong_preset_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ParamsError, match=r"presets/gpt3\.yaml: no such preset .*known: \['gpt2'\]"):
        read_params("model", None, LAYOUT, preset="gpt3")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "x.yaml").write_text("model: {n_layer: 2}\ntrainer: {}\n")
    with pytest.raises(ParamsError, match=r"x\.yaml: unknown section\(s\) \['trainer'\]"):
        read_preset(tmp_path, "x", "model")
    with pytest.raises(ParamsError, match="preset"):
        read_params("base", {"preset": "../etc/passwd"}, LAYOUT)
