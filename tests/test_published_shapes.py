"""The shapes published models have, against Transformers built here from random weights (nothing is downloaded):
grouped-query attention, a head size other than d_model / n_head, and the RoPE scalings of Llama 3.x and Qwen3.

Each published shape (SmolLM2-135M, TinyLlama-1.1B, Qwen3-0.6B, Llama-3.2-1B, and Qwen3 with yarn) is built with
Transformers' own config class at its real widths and heads (fewer layers, a small vocabulary), saved with
``save_pretrained`` and brought in by ``llm import hf``'s library function; its logits must equal Transformers'
within 1e-5 (fp32), on a full forward, with the KV cache, and at positions far past the pretraining context where
the RoPE scalings change the angles. What the GPT still cannot compute is refused naming the key.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the dev extra; skipped only on a bare install
pytest.importorskip("tokenizers")

from llm.config import ModelConfig, RopeScaling
from llm.data.tokenizer import N_SPECIAL, ByteTokenizer
from llm.interop.hf import InteropError, export_hf, hf_cached_forward, import_hf, model_config_from_hf
from llm.model.checkpoint import load_checkpoint, save_checkpoint
from llm.model.gpt import GPT, rope_tables

from helpers import widen_weights

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
# (architecture, the published config.json's shape keys); layers cut to 1 or 2, the vocabulary set by the tokenizer
PUBLISHED = {
    "SmolLM2-135M": ("llama", {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                               "intermediate_size": 1536, "tie_word_embeddings": True, "rope_theta": 100000.0,
                               "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "num_hidden_layers": 2}),
    "TinyLlama-1.1B": ("llama", {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
                                 "intermediate_size": 5632, "tie_word_embeddings": False, "rope_theta": 10000.0,
                                 "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "num_hidden_layers": 1}),
    "Qwen3-0.6B": ("qwen3", {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
                             "head_dim": 128, "intermediate_size": 3072, "tie_word_embeddings": True,
                             "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
                             "num_hidden_layers": 2}),
    "Llama-3.2-1B": ("llama", {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
                               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                               "rope_scaling": LLAMA3, "num_hidden_layers": 1}),
    "Qwen3-yarn": ("qwen3", {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
                             "head_dim": 64, "intermediate_size": 768, "tie_word_embeddings": True,
                             "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
                             "rope_scaling": YARN, "num_hidden_layers": 2}),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
TEXT = "the moon and the stars, said ROMEO. Wherefore art thou? 42 times\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_reference(arch: str, vocab_size: int, **keys):
    """A Transformers model of ``arch`` with the config ``keys``, random weights: matrices of std 0.05, norm
    weights around 1 (logits of a few units that differ between tokens), in eval mode."""
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[arch])
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=vocab_size, **copy.deepcopy(keys))).eval()  # it edits rope dicts
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() >= 2 else p.normal_(1.0, 0.2)
    return model


def small_tokenizer():
    """A GPT-2 style byte-level BPE of about 300 ids, trained here, as Transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# the real widths of the 0.6B and 1B models take seconds to build and save each: slow; the 135M and yarn shapes
# keep grouped-query attention, an explicit head size and a RoPE scaling in the fast tier
BIG = {"TinyLlama-1.1B", "Qwen3-0.6B", "Llama-3.2-1B"}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name in BIG else name
                                        for name in PUBLISHED])
def published(request, tmp_path_factory):
    """(name, the Transformers reference, our GPT imported from its save_pretrained folder by ``import_hf``)."""
    arch, keys = PUBLISHED[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = small_tokenizer()
    reference = hf_reference(arch, len(tokenizer), **keys)
    reference.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    summary = import_hf(root / "hf", root / "ours")
    assert summary["architecture"] == HF_CLASSES[arch][1]
    model = load_checkpoint(root / "ours")[0].eval()
    yield request.param, reference, model
    del reference, model


def ids_for(reference, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, reference.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_the_imported_shape_is_the_published_one(published):
    name, reference, model = published
    hf, c = reference.config, model.config
    assert (c.n_head, c.kv_heads, c.head_dim, c.d_model, c.ff_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.hidden_size, hf.intermediate_size)
    assert c.n_kv_head == hf.num_key_value_heads < hf.num_attention_heads  # every one of them shares key/value heads
    assert c.d_head == (None if hf.head_dim * hf.num_attention_heads == hf.hidden_size else hf.head_dim)
    rope = PUBLISHED[name][1].get("rope_scaling")
    assert c.rope_scaling == (RopeScaling(**rope) if rope else None)
    attn = model.blocks[0].attn
    assert attn.qkv_split == (hf.num_attention_heads * hf.head_dim,) + 2 * (hf.num_key_value_heads * hf.head_dim,)
    assert attn.qkv.weight.shape == (sum(attn.qkv_split), hf.hidden_size)
    assert attn.proj.weight.shape == (hf.hidden_size, hf.num_attention_heads * hf.head_dim)
    assert model.num_parameters() == reference.num_parameters() + N_SPECIAL * hf.hidden_size * (
        1 if hf.tie_word_embeddings else 2)  # the control tokens' rows, nothing else


@torch.no_grad()
def test_logits_equal_transformers_on_a_full_forward(published):
    _, reference, model = published
    ids = ids_for(reference, 16)
    theirs, ours = reference(ids).logits, model(ids + N_SPECIAL).logits[..., N_SPECIAL:]
    assert theirs.abs().max() > 1.0  # logits that differ between tokens, so a match means something
    assert (ours - theirs).abs().max().item() <= 1e-5


@torch.no_grad()
def test_logits_equal_transformers_with_the_kv_cache(published):
    """A prefix, then one token on the cache; then a few more, one at a time: each step against Transformers'
    own cached decoding, and the cache holds n_kv_head heads, not n_head."""
    _, reference, model = published
    ids = ids_for(reference, 14, seed=2)
    theirs, hf_cache = hf_cached_forward(reference, ids[:, :9])
    out = model(ids[:, :9] + N_SPECIAL, use_cache=True)
    assert (out.logits[..., N_SPECIAL:] - theirs).abs().max().item() <= 1e-5
    c = model.config
    assert out.present_key_values[0][0].shape == (2, c.kv_heads, 9, c.head_dim)
    cache = out.present_key_values
    for t in range(9, 14):
        theirs, hf_cache = hf_cached_forward(reference, ids[:, t:t + 1], hf_cache)
        out = model(ids[:, t:t + 1] + N_SPECIAL, past_key_values=cache, use_cache=True)
        cache = out.present_key_values
        assert (out.logits[..., N_SPECIAL:] - theirs).abs().max().item() <= 1e-5, f"step {t}"


@torch.no_grad()
def test_logits_equal_transformers_far_past_the_pretraining_context(published):
    """Positions 30000..30011 (or the end of a shorter context): where llama3 and yarn scale the low frequencies
    (and yarn the attention), a RoPE that ignored the scaling would be off by far more than the tolerance."""
    name, reference, model = published
    start = min(30000, model.config.context_length - 12)
    ids, positions = ids_for(reference, 12, seed=3), torch.arange(start, start + 12).expand(2, -1)
    theirs = reference(ids, position_ids=positions).logits
    ours = model(ids + N_SPECIAL, position_ids=positions).logits[..., N_SPECIAL:]
    assert (ours - theirs).abs().max().item() <= 1e-5
    if model.config.rope_scaling is not None:
        plain = GPT(model.config.model_copy(update={"rope_scaling": None})).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(ids + N_SPECIAL, position_ids=positions).logits[..., N_SPECIAL:] - theirs).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- RoPE tables


SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 8.0},
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-explicit": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False},
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_tables_equal_transformers_rotary_embedding(scaling):
    """cos and sin at positions up to 131071 against the rotary embedding Transformers builds from the same
    config (its ROPE_INIT_FUNCTIONS), yarn's attention factor included."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = SCALINGS[scaling]
    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_theta=500000.0,
                                  max_position_embeddings=131072, rope_scaling=dict(rope) if rope else None)
    positions = torch.tensor([[0, 1, 7, 100, 4095, 8191, 8192, 32767, 65536, 131071]])
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)  # [1, P, D]
    ours_cos, ours_sin = rope_tables(131072, 128, 500000.0, RopeScaling(**rope) if rope else None)
    ours_cos, ours_sin = ours_cos[positions[0]], ours_sin[positions[0]]  # [P, D/2]: pairs (i, i + D/2) share angles
    assert torch.equal(cos[0, :, :64], cos[0, :, 64:])
    # angles of up to 131071 radians carry float32 rounding of about 131071 * 6e-8 = 0.008
    assert (ours_cos - cos[0, :, :64]).abs().max().item() <= 1e-2
    assert (ours_sin - sin[0, :, :64]).abs().max().item() <= 1e-2
    assert (ours_cos[:5] - cos[0, :5, :64]).abs().max().item() <= 1e-6  # up to position 4095: exact to rounding
    assert (ours_sin[:5] - sin[0, :5, :64]).abs().max().item() <= 1e-6


def test_old_configs_build_the_same_rope_as_before():
    """No rope_scaling: the tables are theta^(-2i/D) angles, untouched (an old checkpoint's model is unchanged)."""
    cos, sin = rope_tables(64, 16, 10000.0)
    angles = torch.outer(torch.arange(64.0), 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())


# ------------------------------------------------------------------------------------------- export


EXPORTED = {
    "llama-gqa-llama3": {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "tie_weights": False,
                         "n_head": 4, "n_kv_head": 2, "rope_theta": 500000.0, "context_length": 64,
                         "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 16}},
    "qwen3-gqa-head_dim-yarn": {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True,
                                "n_head": 4, "n_kv_head": 1, "d_head": 12, "d_model": 40, "context_length": 64,
                                "rope_scaling": {**YARN, "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("variant", list(EXPORTED))
def test_export_hf_writes_grouped_query_attention_and_rope_scaling_that_transformers_reproduces(variant, tmp_path):
    tokenizer = ByteTokenizer()
    fields = {"context_length": 32, "n_layer": 2, "n_head": 4, "d_model": 32} | EXPORTED[variant]
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **fields)
    torch.manual_seed(0)
    model = widen_weights(GPT(config), 0.3).eval()
    save_checkpoint(tmp_path / "ckpt", model, config, tokenizer)
    summary = export_hf(tmp_path / "ckpt", tmp_path / "hf", atol=1e-5)  # fails on a mismatch
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-5 and summary["parity"]["max_abs_logit_diff_kv_cache"] <= 1e-5
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["num_key_value_heads"] == config.n_kv_head and written["head_dim"] == config.head_dim
    rope = written.get("rope_parameters") or written.get("rope_scaling")
    assert rope["rope_type"] == config.rope_scaling.rope_type and rope["factor"] == config.rope_scaling.factor
    assert model_config_from_hf(written) == config.model_copy(update={"d_ff": config.ff_dim})  # and back, unchanged


# ------------------------------------------------------------------------------------------- refused

BASE = {"model_type": "qwen3", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
        "head_dim": 8, "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 10,
        "max_position_embeddings": 4096}


@pytest.mark.parametrize(("change", "named"), [
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "use_sliding_window=true"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types holds sliding_attention"),
    ({"num_experts": 8, "num_experts_per_tok": 2}, "num_experts=8"),
    ({"num_local_experts": 8}, "num_local_experts=8"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type 'longrope'"),
    ({"rope_scaling": {**YARN, "mscale": 0.7, "mscale_all_dim": 0.7}}, "mscale"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                       "high_freq_factor": 4.0}}, r"rope_scaling\.low_freq_factor is required"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_what_the_gpt_cannot_compute_is_refused_naming_the_key(change, named):
    with pytest.raises(InteropError, match=rf"config\.json: .*{named}"):
        model_config_from_hf({**BASE, **change})


def test_sliding_window_keys_that_turn_no_layer_to_sliding_are_accepted():
    """Qwen3-0.6B's own config: use_sliding_window false (its sliding_window then means nothing), or windows
    only from layer max_window_layers on, past the last layer: every layer attends fully, as here."""
    for change in ({"use_sliding_window": False, "sliding_window": 4096},
                   {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2},
                   {"layer_types": ["full_attention"] * 2}):
        assert model_config_from_hf({**BASE, **change}).n_kv_head == 2


def test_a_qwen3_config_without_head_dim_gets_transformers_default_of_128():
    config = model_config_from_hf({k: v for k, v in BASE.items() if k != "head_dim"})
    assert config.head_dim == 128 == transformers.Qwen3Config(**{k: v for k, v in BASE.items()
                                                                 if k not in ("head_dim", "model_type")}).head_dim
