"""Look inside a GPT: the attention weights that ``F.scaled_dot_product_attention`` computes but never returns.

For the architecture guide's figures and the notebooks. The model is run once as usual; a forward hook on each
block's attention records its input, and the weights are recomputed from it with the same projections, QK-norm
and RoPE rotation as ``CausalSelfAttention.forward``: softmax(q k^T / sqrt(D)) under the causal mask.
"""

from __future__ import annotations

import math

import torch

from llm.model.gpt import GPT, apply_rope


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The attention weights of every layer for the token ids ``idx`` [B, T] (no cache): a list of ``n_layer``
    tensors [B, H, T, T], row i the distribution of query i over keys 0..i (each row sums to 1, the future is 0).

    Raises ValueError when T exceeds the model's context (as ``GPT.forward`` does).
    """
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    T = idx.size(1)
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if model.config.position == "rope" else None
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    maps = []
    for block, x in zip(model.blocks, inputs):
        attn = block.attn
        B = x.size(0)
        q, k, _ = attn.qkv(x).split(attn.qkv_split, dim=2)
        q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = attn.q_norm(q), attn.k_norm(k)
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # query head h reads key head h // group
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)  # [B, H, T, T]
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1))
    return maps
