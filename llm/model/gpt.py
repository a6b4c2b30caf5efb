"""The GPT: a decoder-only, pre-norm Transformer in one file.

Read top to bottom: norms, positions, attention, MLP, block, then the GPT that stacks them.
Shapes use B = batch, T = new tokens, P = tokens already in the KV cache, H = query heads, Hkv = key/value
heads (``n_kv_head``: H for multi-head attention, fewer for grouped-query attention), D = head_dim (``d_head``,
by default C / H), C = d_model, V = vocab_size.

The same module trains (``targets``), decodes with a KV cache (``past_key_values``/``use_cache``) and exports
to ONNX: the cache is a plain list of ``(key, value)`` tensors, one pair per layer, each ``[B, Hkv, P, D]``, so
it holds 2 * n_layer * Hkv * D values per token: grouped-query attention shrinks it by H / Hkv.
LoRA adapters for these linear layers (finetuning with ``method: lora``) are in ``llm/model/lora.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig, RopeScaling

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """Root mean square layer norm (Zhang & Sennrich, 2019): rescale without centring. Plain ops, so it exports."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed positional encoding of Vaswani et al. (2017): sin on even channels, cos on odd. Returns [length, dim]."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's angular frequencies theta^(-2i/D) for the channel pairs i < D/2, rescaled by ``scaling``
    (see ``llm.config.RopeScaling``), and the factor that cos and sin are multiplied by (1 but for yarn).
    Returns (inv_freq [D/2], attention_factor)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.rope_type == "linear":  # position interpolation: position m is seen as m / factor
        return inv_freq / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    return _yarn_frequencies(inv_freq, head_dim, theta, scaling)


def _llama3_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule: a pair whose wavelength is longer than original / low_freq_factor turns ``factor`` times
    slower, one shorter than original / high_freq_factor keeps its speed, and the ones between blend the two
    by how many times their wave fits in the original context."""
    wavelength = 2 * math.pi / inv_freq
    fits = s.original_max_position_embeddings / wavelength  # whole turns over the pretraining context
    blend = ((fits - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def _yarn_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float,
                      s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN's "NTK-by-parts" rule: pairs that turn more than ``beta_fast`` times over the original context keep
    their frequency, pairs that turn fewer than ``beta_slow`` times are divided by ``factor``, with a linear
    ramp over the pair index between; the attention factor sharpens the softmax for the longer context."""
    original = s.original_max_position_embeddings

    def pair_index(turns: float) -> float:  # the (fractional) pair that turns ``turns`` times over the context
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(s.beta_fast or 32.0), pair_index(s.beta_slow or 1.0)
    if s.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp, without dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0.0, 1.0)
    inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
    attention = s.attention_factor
    if attention is None:
        attention = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_freq, attention


def rope_tables(length: int, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE angles (Su et al., 2021) at positions 0..length-1, each [length, head_dim // 2],
    with the frequencies of ``rope_frequencies`` and both multiplied by its attention factor."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos() * attention, angles.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x [B, H, T, D] by the angles in cos/sin: [T, D/2] for every row
    alike, or [B, T, D/2] for positions that differ by row."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D/2]: the same angles for every head
    # (x1 cos - x2 sin, x2 cos + x1 sin) written as x [cos, cos] + [x2, x1] [-sin, sin] (Llama's rotate_half):
    # the same roundings, with two products and a sum over whole rows instead of four over halves and a
    # concatenation (1-3% faster training with RoPE on a CPU)
    return x * torch.cat([cos, cos], dim=-1) + torch.cat([x2, x1], dim=-1) * torch.cat([-sin, sin], dim=-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), -inf where ``mask`` is False) v for q [B, H, T, D], k and v [B, Hkv, S, D] and
    ``mask`` [B, 1, T, S]; every query must see at least one key. With Hkv < H (grouped-query attention) query
    head h reads key/value head h // (H / Hkv), as in Transformers' ``repeat_kv``.

    The same function as ``F.scaled_dot_product_attention`` with ``attn_mask`` (and ``enable_gqa``), written out
    for the decoding path with a cache: an ONNX export keeps it as one scaled MatMul with a transposed operand,
    where the exporter's SDPA decomposition transposes and scales the whole cache every step (bench/generate.py).
    The query heads of a group are stacked along a new axis, so the cache is broadcast, never copied per head.
    """
    B, H, T, D = q.shape
    Hkv = k.size(1)
    if Hkv != H:  # [B, Hkv, G, T, D] against [B, Hkv, 1, S, D]: the G query heads that share a key/value head
        q, k, v, mask = q.reshape(B, Hkv, H // Hkv, T, D), k.unsqueeze(2), v.unsqueeze(2), mask.unsqueeze(2)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # [B, H, T, S] ([B, Hkv, G, T, S])
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    y = torch.matmul(weights, v)
    return y.reshape(B, H, T, D) if Hkv != H else y


class StaticCache(NamedTuple):
    """What a decoder step over a static cache needs besides the buffers (``GPT.forward(static_last=...)``)."""

    last: torch.Tensor  # [B] int32: the slot of each row's last new token (its cached tokens + T - 1)
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [L, D/2] for every position, with RoPE


def static_cache_attention(
    qkv: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor],
    static: StaticCache,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    n_head: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention with a static cache: ``qkv`` [B, T, (H + 2*Hkv)*D] the queries (``n_head`` = H heads), keys and
    values (Hkv heads each) of T new tokens of each row side by side (before RoPE), ``past`` (k, v) each
    [B, Hkv, L, D] with row b's earlier tokens in slots 0..n_b-1, ``static.last`` [B] int32 = n_b + T - 1, and
    ``rope`` the new tokens' angles. The new keys and values go to slots n_b..n_b+T-1 and each query sees its
    row's slots up to its own. Returns (y [B, T, H*D], (k, v) the updated buffers).

    No slot is copied to make room: the buffers stay [B, Hkv, L, D], so a decoder step costs nothing per cached
    token beyond reading it. In an ONNX export this is one ``com.microsoft.GroupQueryAttention`` node, which
    rotates q and k itself (from the position tables) and which onnxruntime runs in place when the caller
    binds each present output to its past input (``llm.inference.onnx_runtime.StaticCacheDecoder``); here,
    for PyTorch, it is written out.
    """
    B, T, _ = qkv.shape
    Hkv, L, D = past[0].shape[1:]
    H = n_head
    if torch.onnx.is_in_onnx_export():
        total = (static.last.max() + 1).to(torch.int32)  # the longest row: the extent of the buffers GQA reads
        tables = list(static.rope_tables) if static.rope_tables is not None else []
        # qkv packed (key and value inputs left empty): no Split or Reshape nodes in front of it
        y, k_buf, v_buf = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [qkv, None, None, past[0], past[1], static.last, total, *tables],
            {"num_heads": H, "kv_num_heads": Hkv, "do_rotary": int(bool(tables)), "rotary_interleaved": 0},
            dtypes=[qkv.dtype, qkv.dtype, qkv.dtype],
            shapes=[[B, T, H * D], past[0].shape, past[1].shape],
            version=1,
        )
        return y, (k_buf, v_buf)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # [B, Hkv, T, D]
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    slots = static.last.long()[:, None] - (T - 1) + torch.arange(T, device=q.device)  # [B, T]
    rows = torch.arange(B, device=q.device)[:, None]
    k_buf, v_buf = past[0].clone(), past[1].clone()
    k_buf[rows, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into [B, Hkv, L, D] at (row, slot)
    v_buf[rows, :, slots] = v.transpose(1, 2)
    mask = torch.arange(L, device=q.device)[None, None, None, :] <= slots[:, None, :, None]  # [B, 1, T, L]
    y = masked_attention(q, k_buf, v_buf, mask)
    return y.transpose(1, 2).reshape(B, T, H * D), (k_buf, v_buf)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al., 2017) over the cache plus the new tokens, never the future.

    ``n_head`` query heads and ``n_kv_head`` key/value heads of ``head_dim`` channels: with fewer key/value heads
    (grouped-query attention, Ainslie et al., 2023) each serves ``n_head / n_kv_head`` query heads, and the
    KV cache shrinks by that factor.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        q_width, kv_width = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        # rows of qkv.weight: the queries', the keys', the values' (adapters and Transformers interop split by it)
        self.qkv_split = (q_width, kv_width, kv_width)
        self.qkv = nn.Linear(config.d_model, sum(self.qkv_split), bias=config.bias)
        self.proj = nn.Linear(q_width, config.d_model, bias=config.bias)
        self.qk_norm = config.qk_norm
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        static: StaticCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, T, C] -> (y [B, T, C], (k, v) each [B, Hkv, P+T, D] to cache).

        ``mask`` [B, 1, T, P+T] (True: may attend) replaces the causal rule; ``GPT.forward`` builds it.
        ``static`` makes ``past`` a static cache (see ``static_cache_attention``), returned updated.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)  # [B, T, (H + 2*Hkv) * D]: queries, keys and values side by side
        if static is not None:  # the static-cache attention takes them packed, and rotates q and k itself
            if self.qk_norm:  # QK-norm over each head's channels first
                q, k, v = qkv.split(self.qkv_split, dim=2)
                q = self.q_norm(q.view(B, T, H, D)).view(B, T, H * D)
                k = self.k_norm(k.view(B, T, Hkv, D)).view(B, T, Hkv * D)
                qkv = torch.cat([q, k, v], dim=2)
            y, present = static_cache_attention(qkv, past, static, rope, H)
            return self.resid_dropout(self.proj(y)), present
        q, k, v = qkv.split(self.qkv_split, dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # [B, Hkv, T, D]
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm (Dehghani et al., 2023) before the rotation
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, Hkv, P+T, D]
        dropout_p = self.dropout if self.training else 0.0
        gqa = {"enable_gqa": True} if Hkv != H else {}  # each key/value head serves H / Hkv query heads
        if mask is not None:
            y = masked_attention(q, k, v, mask, dropout_p)
        elif past is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        else:  # is_causal would align the triangle top-left; query i sits at P+i and sees keys 0..P+i
            P = k.size(2) - T
            key_pos = torch.arange(P + T, device=x.device)
            mask = key_pos[None, :] <= key_pos[P:, None]  # [T, P+T]; all True for a single new token
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (exact, or GPT-2's tanh form), SwiGLU (Shazeer, 2020) or squared ReLU
    (So et al., 2021)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.ff_dim
        self.fc = nn.Linear(config.d_model, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config, config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config, config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, past=None, mask=None, static=None):
        """x [B, T, C] -> (x [B, T, C], this layer's (k, v) for the cache)."""
        a, present = self.attn(self.norm1(x), rope, past, mask, static)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


def language_model_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T], computed in fp32.

    Targets equal to -100 never count; with ``loss_mask`` [B, T] (0/1 or bool) only positions where it is 1
    count. When nothing counts the loss is 0 (not NaN), so an all-masked batch is harmless.
    """
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")  # [B*T]
    weight = loss_mask.reshape(-1).to(ce.dtype) * (flat_targets != -100).to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def attention_mask(past_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, 1, T, P+T] bool for T new tokens after a cache whose real slots ``past_mask`` [B, P] marks:
    each new token sees its row's real cache slots, and the new tokens up to itself."""
    B = past_mask.size(0)
    new = torch.arange(T, device=past_mask.device)
    causal = (new[None, :] <= new[:, None])[None, None].expand(B, 1, T, T)  # [B, 1, T, T]
    cached = past_mask.bool()[:, None, None, :].expand(-1, 1, T, -1)  # [B, 1, T, P]
    return torch.cat([cached, causal], dim=-1)


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # scalar, when targets were given
    present_key_values: KVCache | None  # per layer (k, v), each [B, Hkv, P+T, D], when use_cache


class GPT(nn.Module):
    """Token embedding, optional positions, ``n_layer`` blocks, final norm, and the language-model head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is None; set it from the tokenizer before building the GPT")
        self.config = config
        C, L = config.d_model, config.context_length
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(L, C) if config.position == "learned" else None
        if config.position == "sinusoidal":  # non-persistent: derived, so checkpoints hold only trained weights
            self.register_buffer("pos_table", sinusoidal_table(L, C), persistent=False)
        if config.position == "rope":
            cos, sin = rope_tables(L, config.head_dim, config.rope_theta, config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config, C)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:  # Press & Wolf (2017): one matrix embeds and unembeds
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual projections shrink with depth so the stream's variance stays put
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_mask: torch.Tensor | None = None,
        static_last: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Logits for ``idx`` [B, T] placed after the ``past_key_values`` (positions P..P+T-1).

        ``loss`` is the mean cross-entropy over ``targets`` [B, T], skipping targets equal to -100 and,
        when ``loss_mask`` [B, T] (0/1 or bool) is given, positions where it is 0.
        ``present_key_values`` (only when ``use_cache``) is the cache to pass back for the next tokens.

        For a batch of sequences of different lengths sharing one cache (``llm.inference.batching``):
        ``past_mask`` [B, P] (bool, or 0/1) marks the cache slots that hold a token (False: padding, never
        attended to), and ``position_ids`` [B, T] gives each new token's position, which then need not be
        P..P+T-1. The new tokens themselves are never padding: each attends to its row's unmasked cache and
        causally to the new tokens before it.

        A static cache (the ONNX serving graph, ``llm.inference.export``): ``past_key_values`` holds buffers
        [B, Hkv, L, D] of fixed length L, row b's cached tokens in slots 0..n_b-1, ``static_last`` [B] int32 is
        n_b + T - 1, and ``position_ids`` (required) the new tokens' positions; the present key/values are the
        buffers with the new tokens written in (``static_cache_attention``).
        Raises ValueError when P + T exceeds ``config.context_length``.
        """
        T = idx.size(1)
        if static_last is not None and (past_key_values is None or position_ids is None):
            raise ValueError("a static cache needs its buffers (past_key_values) and position_ids")
        P = past_key_values[0][0].size(2) if past_key_values and static_last is None else 0
        if P + T > self.config.context_length:
            raise ValueError(
                f"sequence of {P + T} tokens ({P} cached + {T} new) exceeds context_length="
                f"{self.config.context_length}; truncate or slide the window (see llm.inference.generate)"
            )
        x = self.wte(idx)  # [B, T, C]
        # [T] positions shared by every row (a slice, the fast path), or [B, T] gathered per row
        pos = slice(P, P + T) if position_ids is None else position_ids
        if self.wpe is not None:
            x = x + (self.wpe(torch.arange(P, P + T, device=idx.device)) if position_ids is None else self.wpe(pos))
        elif self.config.position == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.config.position == "rope" else None
        mask = None if past_mask is None else attention_mask(past_mask, T)
        static = None
        if static_last is not None:
            static = StaticCache(static_last, (self.rope_cos, self.rope_sin) if rope is not None else None)
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, rope, past_key_values[i] if past_key_values else None, mask, static)
            presents.append(present)
        logits = self.lm_head(self.norm_f(x))  # [B, T, V]
        loss = None if targets is None else language_model_loss(logits, targets, loss_mask)
        return GPTOutput(logits, loss, presents if use_cache else None)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of trainable values; a tied matrix counts once.

        ``exclude_embeddings`` drops the token and learned position tables (Kaplan et al.'s non-embedding
        count). With tied weights the token table is also the LM head, so it is dropped as well.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, from the PaLM paper's appendix B.

        6 * N + 12 * n_layer * n_head * head_dim * context_length, where N is every parameter except the
        lookup-only tables: ``num_parameters()`` minus the learned position table, minus the token table
        when it is untied. A lookup costs no FLOPs; a tied token table is also the LM head, a real matmul.
        (nanoGPT subtracts only the position table too.) The second term is attention's scores and
        weighted sum over a full context window: every query head (``n_head``) scores its own D channels, so
        grouped-query attention, which shares key/value heads, lowers N (smaller ``qkv``) but not this term.

        Model FLOPs utilisation: MFU = flops_per_token * tokens_per_second / peak_flops (of the hardware).
        """
        c = self.config
        n = self.num_parameters() - (self.wpe.weight.numel() if self.wpe is not None else 0)
        if not c.tie_weights:
            n -= self.wte.weight.numel()
        return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_dim * c.context_length

    def summary(self) -> str:
        """One line for logs: parameter counts and the shape of the model."""
        c = self.config
        kv = f" ({c.kv_heads} key/value)" if c.kv_heads != c.n_head else ""
        head = f", head_dim {c.head_dim}" if c.d_head is not None else ""
        scaling = f" ({c.rope_scaling.rope_type} x{c.rope_scaling.factor:g})" if c.rope_scaling else ""
        return (
            f"GPT with {self.num_parameters() / 1e6:.2f}M parameters "
            f"({self.num_parameters(exclude_embeddings=True) / 1e6:.2f}M non-embedding): "
            f"{c.n_layer} layers, {c.n_head} heads{kv}, d_model {c.d_model}{head}, ff {c.ff_dim}, "
            f"context {c.context_length}, vocab {c.vocab_size}, position {c.position}{scaling}, mlp {c.mlp}, "
            f"norm {c.norm}{', qk_norm' if c.qk_norm else ''}{', tied' if c.tie_weights else ''}"
        )

    def extra_repr(self) -> str:
        return f"parameters={self.num_parameters():,}"
