"""Specification of the GPT in llm/model/gpt.py: caching, causality, shapes, init, parameter counts, loss."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from llm.config import ModelConfig
from llm.model.gpt import GPT, apply_rope, rope_tables

import helpers

POSITIONS = ["learned", "sinusoidal", "rope", "none"]


# a small fp32 model in eval mode, weights widened (std 0.1) so logits differ clearly between tokens
tiny_model = partial(helpers.tiny_model, std=0.1)


VARIANTS = [{"position": p} for p in POSITIONS] + [
    {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True},
    {"position": "learned", "mlp": "relu2", "qk_norm": True, "tie_weights": False, "bias": True},
    {"position": "sinusoidal", "norm": "rmsnorm", "mlp": "swiglu", "bias": True},
    # grouped-query attention: 4 query heads share 2 (then 1) key/value heads, of 16 channels where C/H is 8
    {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "n_kv_head": 2, "d_head": 16},
    {"position": "rope", "qk_norm": True, "bias": True, "n_kv_head": 1,
     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
]


def variant_id(v: dict) -> str:
    flags = {("qk_norm", True): "qk_norm", ("tie_weights", False): "untied", ("bias", True): "bias"}
    named = {"n_kv_head", "d_head"}
    return "-".join(f"{k}={x}" if k in named else x["rope_type"] if k == "rope_scaling" else flags.get((k, x), str(x))
                    for k, x in v.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_kv_cache_matches_full_recompute(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        full = model(idx).logits  # [2, 40, 50]

        past, step_logits = None, []
        for t in range(idx.size(1)):  # one token at a time
            out = model(idx[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.present_key_values
            step_logits.append(out.logits)
        token_by_token = torch.cat(step_logits, dim=1)

        past, chunk_logits = None, []
        for start, stop in [(0, 7), (7, 12), (12, 13), (13, 25), (25, 40)]:  # chunked prefill, then mixed steps
            out = model(idx[:, start:stop], past_key_values=past, use_cache=True)
            past = out.present_key_values
            chunk_logits.append(out.logits)
        chunked = torch.cat(chunk_logits, dim=1)

    assert (token_by_token - full).abs().max().item() < 1e-5
    assert (chunked - full).abs().max().item() < 1e-5
    assert len(past) == model.config.n_layer
    c = model.config
    for k, v in past:
        assert k.shape == v.shape == (2, c.kv_heads, 40, c.head_dim)  # [B, n_kv_head, past+T, head_dim]
    assert (c.kv_heads, c.head_dim) == (variant.get("n_kv_head", 4), variant.get("d_head", 8))


def test_empty_cache_behaves_like_no_cache():
    # an exported decoder is always fed cache tensors: the first call passes ones of length 0
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 9))
    empty = [(torch.zeros(2, 4, 0, 8), torch.zeros(2, 4, 0, 8)) for _ in range(2)]
    with torch.no_grad():
        out = model(idx, past_key_values=empty, use_cache=True)
        assert (out.logits - model(idx).logits).abs().max().item() < 1e-5
    assert out.present_key_values[0][0].shape == (2, 4, 9, 8)


def test_present_key_values_only_when_asked():
    model = tiny_model()
    idx = torch.randint(0, 50, (1, 5))
    assert model(idx).present_key_values is None
    assert len(model(idx, use_cache=True).present_key_values) == 2


@pytest.mark.parametrize("position", POSITIONS)
def test_future_tokens_never_change_earlier_logits(position):
    model = tiny_model(position=position)
    idx = torch.randint(0, 50, (2, 32))
    changed = idx.clone()
    t = 13
    changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 48, changed[:, t:].shape)) % 50
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-6
    assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-3  # the change did reach the later positions


def test_rope_rotates_each_channel_pair_bit_for_bit_as_the_pairwise_formula():
    """apply_rope's rotate-half form gives exactly (x1 cos - x2 sin, x1 sin + x2 cos), the formulation it
    replaced, and so do its gradients: for angles shared by every row and for angles per row."""

    def pairwise(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(16, 8, 10000.0)
    per_row = torch.tensor([[3, 4, 5], [0, 9, 15]])
    for angles in [(cos[:3], sin[:3]), (cos[per_row], sin[per_row])]:
        x = torch.randn(2, 4, 3, 8, generator=g)
        upstream = torch.randn(2, 4, 3, 8, generator=g)
        outputs, grads = [], []
        for rotate in (apply_rope, pairwise):
            leaf = x.clone().requires_grad_()
            y = rotate(leaf, *angles)
            y.backward(upstream)
            outputs.append(y.detach())
            grads.append(leaf.grad)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_position_kinds_make_order_matter(position):
    model = tiny_model(position=position)
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    swapped = torch.tensor([[2, 1, 3, 4, 5, 6]])
    with torch.no_grad():
        assert (model(idx).logits[0, -1] - model(swapped).logits[0, -1]).abs().max().item() > 1e-4


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValidationError, match=r"d_model=30 is not divisible by n_head=4"):
        ModelConfig(vocab_size=10, d_model=30, n_head=4)
    with pytest.raises(ValidationError, match=r"rope needs an even head_dim.*= 3"):
        ModelConfig(vocab_size=10, d_model=12, n_head=4, position="rope")
    ModelConfig(vocab_size=10, d_model=12, n_head=4, position="learned")  # odd head_dim is fine without rope


@pytest.mark.parametrize(("fields", "named"), [
    ({"n_head": 4, "n_kv_head": 3}, r"n_kv_head=3 does not divide n_head=4"),
    ({"n_head": 4, "n_kv_head": 0}, r"n_kv_head\n.*greater than 0"),
    ({"n_head": 4, "d_head": 7, "position": "rope"}, r"rope needs an even head_dim, but d_head = 7"),
    ({"position": "learned", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"rope_scaling applies to position: rope only"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                       "high_freq_factor": 4.0}}, r"rope_scaling\.low_freq_factor is required for rope_type llama3"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 8.0}},
     r"rope_scaling\.beta_fast does not apply to rope_type linear"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                       "low_freq_factor": 4.0, "high_freq_factor": 1.0}}, r"high_freq_factor=1.0 must exceed"),
    ({"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}, r"rope_scaling\.rope_type"),
])
def test_config_names_the_field_of_an_impossible_attention_shape(fields, named):
    with pytest.raises(ValidationError, match=named):
        ModelConfig(vocab_size=10, d_model=32, **{"n_head": 4, **fields})


def test_an_explicit_head_size_frees_d_model_from_being_a_multiple_of_n_head():
    """Qwen3-0.6B: d_model 1024, 16 heads of 128 channels (2048 wide), projected back to 1024."""
    model = GPT(ModelConfig(vocab_size=10, context_length=8, n_layer=1, n_head=16, n_kv_head=8, d_model=1024,
                            d_head=128))
    attn = model.blocks[0].attn
    assert attn.qkv_split == (2048, 1024, 1024) and attn.qkv.weight.shape == (4096, 1024)
    assert attn.proj.weight.shape == (1024, 2048)


def test_a_config_written_before_grouped_query_attention_gives_the_same_model():
    """An old config.json (no n_kv_head, d_head, rope_scaling) validates, and builds weight for weight and
    logit for logit the model that spelling the defaults out builds."""
    old = {"vocab_size": 50, "context_length": 16, "n_layer": 2, "n_head": 4, "d_model": 32, "position": "rope"}
    implicit = ModelConfig.model_validate(old)
    explicit = ModelConfig(**old, n_kv_head=4, d_head=8)
    assert (implicit.n_kv_head, implicit.d_head, implicit.rope_scaling) == (None, None, None)
    assert (implicit.kv_heads, implicit.head_dim) == (explicit.kv_heads, explicit.head_dim) == (4, 8)
    torch.manual_seed(0)
    a = GPT(implicit).eval()
    torch.manual_seed(0)
    b = GPT(explicit).eval()
    assert a.blocks[0].attn.qkv.weight.shape == (96, 32) and a.blocks[0].attn.qkv_split == (32, 32, 32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(idx).logits, b(idx).logits)


def repeated_key_value_heads(gqa: GPT) -> GPT:
    """The multi-head model that computes what ``gqa`` computes: the same weights, but each key/value head's
    rows of ``qkv`` copied for every query head of its group (Transformers' ``repeat_kv``, done on weights)."""
    c = gqa.config
    mha = GPT(c.model_copy(update={"n_kv_head": None})).train(gqa.training)
    state = gqa.state_dict()
    group, D = c.n_head // c.kv_heads, c.head_dim
    for i in range(c.n_layer):
        for name in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"):
            if name in state:
                q, k, v = state[name].split(gqa.blocks[i].attn.qkv_split)
                k, v = (t.unflatten(0, (c.kv_heads, D)).repeat_interleave(group, dim=0).flatten(0, 1) for t in (k, v))
                state[name] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    return mha


def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads():
    """Forward (the training path through SDPA, the cached path, the masked batching path) and backward: the
    GQA model against the multi-head model whose key/value heads are copies. Each shared head's gradient is the
    sum of its copies' gradients, so a training step moves the GQA model as the tied copies would move."""
    gqa = helpers.tiny_model(0.1, n_head=4, n_kv_head=2, d_head=16, bias=True, mlp="swiglu", norm="rmsnorm").train()
    mha = repeated_key_value_heads(gqa)
    idx, targets = torch.randint(0, 50, (2, 24)), torch.randint(0, 50, (2, 24))
    out_gqa, out_mha = gqa(idx, targets), mha(idx, targets)
    assert (out_gqa.logits - out_mha.logits).abs().max().item() < 1e-5
    out_gqa.loss.backward()
    out_mha.loss.backward()
    for i in range(gqa.config.n_layer):
        ga, gm = gqa.blocks[i].attn.qkv.weight.grad, mha.blocks[i].attn.qkv.weight.grad
        q_a, k_a, v_a = ga.split(gqa.blocks[i].attn.qkv_split)
        q_m, k_m, v_m = gm.split(mha.blocks[i].attn.qkv_split)
        assert (q_a - q_m).abs().max().item() < 1e-5
        for shared, copies in ((k_a, k_m), (v_a, v_m)):
            summed = copies.unflatten(0, (2, 2, 16)).sum(dim=1).flatten(0, 1)  # [kv heads, group, D] -> [kv heads, D]
            assert (shared - summed).abs().max().item() < 1e-5
    gqa.eval(), mha.eval()
    with torch.no_grad():
        prefix = gqa(idx[:, :20], use_cache=True).present_key_values
        assert prefix[0][0].shape == (2, 2, 20, 16)  # half the heads of the multi-head model's cache
        past_mask = torch.ones(2, 20, dtype=torch.bool)
        past_mask[0, :5] = False  # row 0's first 5 slots are padding: neither model may attend to them
        mha_prefix = mha(idx[:, :20], use_cache=True).present_key_values
        positions = torch.arange(20, 24).expand(2, -1)
        masked_gqa = gqa(idx[:, 20:], past_key_values=prefix, past_mask=past_mask, position_ids=positions).logits
        masked_mha = mha(idx[:, 20:], past_key_values=mha_prefix, past_mask=past_mask, position_ids=positions).logits
    assert (masked_gqa - masked_mha).abs().max().item() < 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_static_cache_path_matches_full_recompute_with_shared_key_value_heads(kv_heads):
    """``static_last``: buffers [B, n_kv_head, L, D] of fixed length, rows of different lengths prefilled then
    stepped in place (the PyTorch side of the ONNX serving graph), each row against its whole sequence."""
    model = tiny_model(n_head=4, n_kv_head=kv_heads, d_head=16, position="rope", qk_norm=True)
    c, lengths = model.config, [9, 3]
    rows = [torch.randint(0, 50, (n + 2,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    buffers = [(torch.zeros(2, kv_heads, c.context_length, 16), torch.zeros(2, kv_heads, c.context_length, 16))
               for _ in range(c.n_layer)]
    with torch.no_grad():
        # right-padded to 9: the padding's slots are overwritten by each row's next tokens before anyone reads them
        prefill = torch.stack([torch.cat([r[:n], r[n - 1:n].expand(9 - n)]) for r, n in zip(rows, lengths)])
        out = model(prefill, past_key_values=buffers, use_cache=True, position_ids=torch.arange(9).expand(2, -1),
                    static_last=torch.tensor([8, 8], dtype=torch.int32))
        cache = out.present_key_values
        for step in range(2):  # each row's next token at its own slot n, then n + 1
            ids = torch.stack([r[n + step:n + step + 1] for r, n in zip(rows, lengths)])
            at = torch.tensor([[n + step] for n in lengths])
            out = model(ids, past_key_values=cache, use_cache=True, position_ids=at,
                        static_last=at[:, 0].to(torch.int32))
            cache = out.present_key_values
            for b, (r, n) in enumerate(zip(rows, lengths)):
                full = model(r[None, :n + step + 1]).logits[0, -1]
                assert (out.logits[b, -1] - full).abs().max().item() < 1e-5
    assert cache[0][0].shape == (2, kv_heads, c.context_length, 16)


def test_flops_and_summary_count_query_heads_and_shared_key_value_heads():
    c = ModelConfig(vocab_size=50, context_length=64, n_layer=2, n_head=8, n_kv_head=2, d_model=64, d_head=16)
    model = GPT(c)
    mha = GPT(c.model_copy(update={"n_kv_head": None}))
    # qkv loses 2 * (8 - 2) heads of 16 rows of 64 per layer; attention still scores 8 query heads of 16 channels
    assert mha.num_parameters() - model.num_parameters() == 2 * 2 * 6 * 16 * 64
    assert model.flops_per_token() == 6.0 * (model.num_parameters()) + 12.0 * 2 * 8 * 16 * 64
    assert "8 heads (2 key/value), d_model 64, head_dim 16" in model.summary()
    scaled = ModelConfig(**{**c.model_dump(), "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert "position rope (linear x4)" in GPT(scaled).summary()


def test_model_needs_a_vocab_size():
    with pytest.raises(ValueError, match="vocab_size is None"):
        GPT(ModelConfig(context_length=8, n_layer=1, n_head=2, d_model=8))


def test_context_overflow_in_forward_is_a_clear_error():
    model = tiny_model(context_length=16, position="learned")
    with pytest.raises(ValueError, match=r"17 tokens.*context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    past = model(torch.zeros(1, 12, dtype=torch.long), use_cache=True).present_key_values
    with pytest.raises(ValueError, match=r"18 tokens \(12 cached \+ 6 new\).*context_length=16"):
        model(torch.zeros(1, 6, dtype=torch.long), past_key_values=past)
    model(torch.zeros(1, 4, dtype=torch.long), past_key_values=past)  # exactly 16 fits


def test_weight_tying_shares_storage():
    tied, untied = tiny_model(tie_weights=True), tiny_model(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    with torch.no_grad():
        tied.wte.weight[3, 0] = 7.0
    assert tied.lm_head.weight[3, 0].item() == 7.0
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_parameter_count_counts_tied_weights_once():
    # V=10, context 8, 1 layer, 2 heads, d=4, MLP 16, no biases, LayerNorm weights only
    config = {"vocab_size": 10, "context_length": 8, "n_layer": 1, "n_head": 2, "d_model": 4, "position": "learned"}
    wte, wpe = 10 * 4, 8 * 4
    block = 4 + 3 * 4 * 4 + 4 * 4 + 4 + 4 * 16 + 16 * 4  # norm1, qkv, proj, norm2, fc, proj = 200
    norm_f, head = 4, 10 * 4
    tied = GPT(ModelConfig(**config, tie_weights=True))
    untied = GPT(ModelConfig(**config, tie_weights=False))
    assert tied.num_parameters() == wte + wpe + block + norm_f == 276
    assert sum(t.numel() for t in tied.state_dict().values()) == 276 + head  # the state dict lists it twice
    assert untied.num_parameters() == wte + wpe + block + norm_f + head == 316
    assert tied.num_parameters(exclude_embeddings=True) == block + norm_f
    assert untied.num_parameters(exclude_embeddings=True) == block + norm_f + head
    # PaLM: 6N + 12 * L * H * head_dim * T, N = every parameter that is not a lookup-only table
    attention = 12 * 1 * 2 * 2 * 8
    assert tied.flops_per_token() == 6 * (block + norm_f + head) + attention
    assert untied.flops_per_token() == 6 * (block + norm_f + head) + attention
    assert "276" in repr(tied) and "0.00M parameters" in tied.summary()


def test_state_dict_holds_only_parameters():
    for position in POSITIONS:
        model = tiny_model(position=position)
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        assert set(model.state_dict()) == params, position  # rope/sinusoidal tables are not persisted


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(ModelConfig(vocab_size=100, context_length=16, n_layer=n_layer, n_head=4, d_model=128, bias=True))
    expected = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert proj.weight.std().item() == pytest.approx(expected, rel=0.05)
            assert proj.bias.abs().max().item() == 0.0
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_loss_mask_counts_only_selected_positions():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 10))
    targets = torch.randint(0, 50, (3, 10))
    targets[0, 0] = -100  # ignored even where the mask says 1
    mask = torch.rand(3, 10) > 0.5
    mask[0, 0] = True
    with torch.no_grad():
        out = model(idx, targets, loss_mask=mask)
        selected = mask & (targets != -100)
        manual = F.cross_entropy(out.logits[selected], targets[selected])
        assert out.loss.item() == pytest.approx(manual.item(), abs=1e-6)
        assert model(idx, targets, loss_mask=mask.float()).loss.item() == pytest.approx(manual.item(), abs=1e-6)
        unmasked = F.cross_entropy(out.logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
        assert model(idx, targets).loss.item() == pytest.approx(unmasked.item(), abs=1e-6)
        assert model(idx, targets, loss_mask=torch.zeros(3, 10)).loss.item() == 0.0  # nothing counted: 0, not NaN


def test_dropout_is_active_only_in_training():
    model = tiny_model(dropout=0.5)
    idx = torch.randint(0, 50, (1, 8))
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)
    model.eval()
    assert torch.equal(model(idx).logits, model(idx).logits)


@pytest.mark.parametrize(("position", "kv_heads"), [("rope", None), ("learned", None), ("rope", 1)],
                         ids=["rope", "learned", "rope-one-key-value-head"])
def test_tiny_model_memorises_short_text(position, kv_heads):
    text = (
        "The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun. "
        "A model that can memorise this sentence has learned to attend to earlier characters, step by step."
    )
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=len(chars), context_length=len(text) - 1, n_layer=2, n_head=4, d_model=64, position=position,
        n_kv_head=kv_heads,
    )
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x, y = ids[None, :-1], ids[None, 1:]
    for _ in range(300):
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05
    model.eval()
    with torch.no_grad():
        predicted = model(x).logits.argmax(-1)[0]
    assert (predicted == y[0]).float().mean().item() > 0.99
