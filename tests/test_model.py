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
]


def variant_id(v: dict) -> str:
    flags = {("qk_norm", True): "qk_norm", ("tie_weights", False): "untied", ("bias", True): "bias"}
    return "-".join(flags.get((k, x), str(x)) for k, x in v.items())


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
    for k, v in past:
        assert k.shape == v.shape == (2, 4, 40, 8)  # [B, n_head, past+T, head_dim]


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


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_tiny_model_memorises_short_text(position):
    text = (
        "The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun. "
        "A model that can memorise this sentence has learned to attend to earlier characters, step by step."
    )
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=len(chars), context_length=len(text) - 1, n_layer=2, n_head=4, d_model=64, position=position
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
