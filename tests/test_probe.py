"""Specification of llm/model/probe.py: the attention maps are the weights the model really used."""

from functools import partial

import pytest
import torch

from llm.model.probe import attention_maps
from tests.test_model import VARIANTS, variant_id

import helpers

tiny_model = partial(helpers.tiny_model, std=0.1)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_attention_maps_times_values_give_the_attention_output(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, 50, (2, 12))
    outputs, inputs = [], []
    hooks = [h for block in model.blocks for h in (
        block.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])),
        block.attn.register_forward_hook(lambda _m, _args, out: outputs.append(out[0])))]
    maps = attention_maps(model, idx)
    for hook in hooks:
        hook.remove()
    assert len(maps) == model.config.n_layer
    for layer, (block, weights) in enumerate(zip(model.blocks, maps)):
        B, H, T, _ = weights.shape
        assert (B, H, T) == (2, model.config.n_head, 12)
        torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
        assert torch.all(weights.triu(diagonal=1) == 0)  # never the future
        x = inputs[layer]
        _, _, v = block.attn.qkv(x).split(block.attn.qkv_split, dim=2)
        v = v.view(B, T, block.attn.n_kv_head, -1).transpose(1, 2)
        v = v.repeat_interleave(H // block.attn.n_kv_head, dim=1)  # grouped-query attention: shared value heads
        y = (weights @ v).transpose(1, 2).reshape(B, T, -1)
        # the attention's output as the model computed it in that forward pass (through SDPA)
        torch.testing.assert_close(block.attn.proj(y), outputs[layer], atol=1e-5, rtol=1e-4)
