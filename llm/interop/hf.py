"""Hugging Face Transformers interop: a ``save_pretrained`` folder in, a checkpoint folder out, and back.

Which shapes of ``ModelConfig`` are which Transformers architecture (``hf_architecture``):

| ModelConfig | Transformers |
| --- | --- |
| ``position: learned``, ``norm: layernorm``, ``mlp: gelu`` or ``gelu_tanh``, no ``qk_norm`` | ``GPT2LMHeadModel`` |
| ``position: rope``, ``norm: rmsnorm``, ``mlp: swiglu``, no ``qk_norm`` | ``LlamaForCausalLM`` |
| the same with ``qk_norm`` and ``bias: false`` | ``Qwen3ForCausalLM`` (RMSNorm per head on q and k, before RoPE) |

Both use RoPE on channel pairs (i, i + head_dim/2), Llama's ``rotate_half``, as ``llm.model.gpt.apply_rope``
does, so q and k need no permutation. GPT-2's ``Conv1D`` stores weights as [in, out]: they are transposed.
Our fused ``qkv`` and SwiGLU ``fc`` are Llama's q/k/v and gate/up projections stacked. GPT-2 always has
biases: a model with ``bias: false`` exports them as zeros. Other shapes are refused with the option to
change.

How the Llama/Qwen3 attention and RoPE keys of ``config.json`` map (both ways):

| Transformers | ModelConfig |
| --- | --- |
| ``num_key_value_heads`` (grouped-query attention) | ``n_kv_head`` (None when equal to ``n_head``) |
| ``head_dim`` (Qwen3's default: 128) | ``d_head`` (None when it is ``d_model / n_head``) |
| ``rope_theta``, ``rope_scaling`` (4.x) or ``rope_parameters`` (5.x) | ``rope_theta``, ``rope_scaling`` |

``rope_scaling`` is ``llm.config.RopeScaling`` (types ``linear``, ``llama3``, ``yarn``, Transformers' key names).
The q/k/v rows of ``qkv`` are [n_head, n_kv_head, n_kv_head] heads of ``head_dim`` (``CausalSelfAttention.qkv_split``).
What the GPT cannot compute is refused on import naming the key: sliding-window attention (``use_sliding_window``
with ``sliding_window``, ``layer_types`` with sliding layers), mixtures of experts (``num_experts``,
``num_local_experts``, ...), ``partial_rotary_factor`` below 1, other ``rope_type``s (``dynamic``, ``longrope``,
...) and yarn's ``mscale``/``mscale_all_dim``. A Llama export needs ``d_model`` divisible by ``n_head``
(Transformers checks it; Qwen3 does not).

Token ids: our control tokens take ids ``0..N_SPECIAL-1`` in every vocabulary, so importing shifts every
Transformers id up by ``N_SPECIAL`` (embedding rows for the new control tokens start as the mean of the
others) and the tokenizer with it (``llm.data.hf_tokenizer``); an export keeps our ids, and its
``tokenizer.json`` says so. Weights are read and written as safetensors only; pickle checkpoints
(``pytorch_model.bin``) are refused.

Tokenizers export as ``tokenizer.json`` with the same ids: byte-level BPE as imported, ``byte`` as a
byte-level BPE without merges, the sentencepiece ``bpe``/``unigram`` models rebuilt piece for piece
(``_sentencepiece_tokenizer_json``, checked on a probe text); ``char`` has no Transformers form here.

``transformers`` is imported by ``export_hf`` only (to write the folder and load it back for the parity
check); ``import_hf`` needs ``safetensors`` and ``tokenizers``.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from llm.config import ModelConfig, format_validation_error
from llm.data.chat_template import generation_stop_ids
from llm.data.tokenizer import N_SPECIAL, SPECIAL_IDS, SPECIAL_TOKENS, Tokenizer
from llm.io import atomic_folder, atomic_write_json, atomic_write_text, give_default_mode
from llm.model.checkpoint import load_checkpoint, save_checkpoint
from llm.model.gpt import GPT

log = logging.getLogger(__name__)

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PARITY_FILE = "hf_parity.json"
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class InteropError(ValueError):
    """A folder or a model shape cannot be converted; the message names the file or the option to change."""


# ------------------------------------------------------------------------------------------- shapes


def hf_architecture(config: ModelConfig) -> str:
    """``gpt2``, ``llama`` or ``qwen3``: the Transformers architecture computing the same function as a GPT of
    ``config``. Raises InteropError naming the ``params/model.yaml`` option to change for any other shape."""
    c = config
    if c.position == "learned":
        wrong = [f"norm: {c.norm} (GPT-2 needs layernorm)"] if c.norm != "layernorm" else []
        if c.mlp not in ("gelu", "gelu_tanh"):
            wrong.append(f"mlp: {c.mlp} (GPT-2 needs gelu or gelu_tanh)")
        if c.qk_norm:
            wrong.append("qk_norm: true (GPT-2 has none)")
        if c.kv_heads != c.n_head:
            wrong.append(f"n_kv_head: {c.n_kv_head} (GPT-2 has as many key/value heads as query heads)")
        if c.head_dim * c.n_head != c.d_model:
            wrong.append(f"d_head: {c.d_head} (GPT-2's heads are d_model / n_head wide)")
        if not wrong:
            return "gpt2"
        raise InteropError("no Transformers architecture matches this model: with position: learned it exports as "
                           f"GPT-2, but {'; '.join(wrong)}: change these in params/model.yaml")
    if c.position == "rope":
        wrong = [f"norm: {c.norm} (Llama and Qwen3 need rmsnorm)"] if c.norm != "rmsnorm" else []
        if c.mlp != "swiglu":
            wrong.append(f"mlp: {c.mlp} (Llama and Qwen3 need swiglu)")
        if c.qk_norm and c.bias:
            wrong.append("bias: true with qk_norm (Qwen3's MLP has no bias)")
        if not c.qk_norm and c.d_model % c.n_head:
            wrong.append(f"d_head: {c.d_head} with d_model {c.d_model} not divisible by n_head {c.n_head} "
                         "(Llama needs it divisible; Qwen3, with qk_norm, does not)")
        if not wrong:
            return "qwen3" if c.qk_norm else "llama"
        raise InteropError("no Transformers architecture matches this model: with position: rope it exports as "
                           f"Llama (Qwen3 with qk_norm), but {'; '.join(wrong)}: change these in params/model.yaml")
    raise InteropError(f"no Transformers architecture matches position: {c.position}: set position to learned "
                       "(GPT-2) or rope (Llama, Qwen3) in params/model.yaml")


def _parameter_map(arch: str, c: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, Transformers names, how): ``copy``, ``t`` (Conv1D: transposed) or ``cat`` (stacked rows)."""
    rows: list[tuple[str, list[str], str]] = []
    if arch == "gpt2":
        rows += [("wte.weight", ["transformer.wte.weight"], "copy"), ("wpe.weight", ["transformer.wpe.weight"], "copy")]
        pieces = [("norm1", "ln_1", "copy"), ("attn.qkv", "attn.c_attn", "t"), ("attn.proj", "attn.c_proj", "t"),
                  ("norm2", "ln_2", "copy"), ("mlp.fc", "mlp.c_fc", "t"), ("mlp.proj", "mlp.c_proj", "t")]
        for i in range(c.n_layer):
            for ours, theirs, how in pieces:
                rows.append((f"blocks.{i}.{ours}.weight", [f"transformer.h.{i}.{theirs}.weight"], how))
                if c.bias:
                    rows.append((f"blocks.{i}.{ours}.bias", [f"transformer.h.{i}.{theirs}.bias"], "copy"))
        rows.append(("norm_f.weight", ["transformer.ln_f.weight"], "copy"))
        if c.bias:
            rows.append(("norm_f.bias", ["transformer.ln_f.bias"], "copy"))
    else:
        rows.append(("wte.weight", ["model.embed_tokens.weight"], "copy"))
        for i in range(c.n_layer):
            p, o = f"model.layers.{i}.", f"blocks.{i}."
            qkv = [f"{p}self_attn.{x}_proj" for x in "qkv"]
            linear = [("attn.qkv", qkv), ("attn.proj", [f"{p}self_attn.o_proj"]),
                      ("mlp.fc", [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]), ("mlp.proj", [f"{p}mlp.down_proj"])]
            for ours, theirs in linear:
                how = "cat" if len(theirs) > 1 else "copy"
                rows.append((f"{o}{ours}.weight", [f"{t}.weight" for t in theirs], how))
                if c.bias:
                    rows.append((f"{o}{ours}.bias", [f"{t}.bias" for t in theirs], how))
            rows += [(f"{o}norm1.weight", [f"{p}input_layernorm.weight"], "copy"),
                     (f"{o}norm2.weight", [f"{p}post_attention_layernorm.weight"], "copy")]
            if c.qk_norm:
                rows += [(f"{o}attn.q_norm.weight", [f"{p}self_attn.q_norm.weight"], "copy"),
                         (f"{o}attn.k_norm.weight", [f"{p}self_attn.k_norm.weight"], "copy")]
        rows.append(("norm_f.weight", ["model.norm.weight"], "copy"))
    if not c.tie_weights:
        rows.append(("lm_head.weight", ["lm_head.weight"], "copy"))
    return rows


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT's ``state_dict`` renamed and reshaped for the Transformers architecture of ``config``."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _parameter_map(hf_architecture(config), config):
        t = state[ours]
        if how == "t":
            out[theirs[0]] = t.t().contiguous()
        elif how == "cat":
            out.update(zip(theirs, (part.contiguous() for part in t.split(_cat_rows(ours, config), dim=0)),
                           strict=True))
        else:
            out[theirs[0]] = t.contiguous()
    return out


def _cat_rows(ours: str, c: ModelConfig) -> list[int]:
    """The row counts of the Transformers tensors stacked in our ``ours`` (a ``cat`` row of ``_parameter_map``):
    q, k and v of ``attn.qkv`` (fewer k and v rows with grouped-query attention), gate and up of ``mlp.fc``."""
    if ".attn.qkv." in ours:
        return [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    return [c.ff_dim, c.ff_dim]


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """A Transformers state dict (or safetensors contents) as our GPT's ``state_dict`` for ``config`` (same ids),
    in float32. Raises InteropError naming ``source`` and the tensors that are missing or left over."""
    arch = hf_architecture(config)
    tensors = dict(tensors)
    if arch == "gpt2" and "wte.weight" in tensors:  # saved from GPT2Model (the Hub's gpt2): no "transformer."
        tensors = {f"transformer.{k}": v for k, v in tensors.items()}
    rows = _parameter_map(arch, config)
    wanted = {name for _, theirs, _ in rows for name in theirs}
    missing = sorted(wanted - set(tensors))
    if missing == ["lm_head.weight"] and "lm_head.weight" not in tensors:
        raise InteropError(f"{source}: no lm_head.weight, yet tie_word_embeddings is false")
    if missing:
        raise InteropError(f"{source}: tensors missing for a {ARCHITECTURES[arch]}: {', '.join(missing[:6])}")
    ignored = {"lm_head.weight"} if config.tie_weights else set()
    # GPT-2's causal-mask buffers (h.N.attn.bias / masked_bias) in older checkpoints are not weights
    leftover = sorted(k for k in set(tensors) - wanted - ignored
                      if not (arch == "gpt2" and k.endswith((".attn.bias", ".attn.masked_bias"))))
    if leftover:
        raise InteropError(f"{source}: tensors this {ARCHITECTURES[arch]} shape does not use: "
                           f"{', '.join(leftover[:6])}")
    state: dict[str, torch.Tensor] = {}
    for ours, theirs, how in rows:
        parts = [tensors[name].to(torch.float32) for name in theirs]
        if how == "cat" and [len(part) for part in parts] != _cat_rows(ours, config):
            raise InteropError(f"{source}: {', '.join(theirs)} have {[len(part) for part in parts]} rows, "
                               f"config.json's heads and widths give {_cat_rows(ours, config)}")
        state[ours] = parts[0].t().contiguous() if how == "t" else torch.cat(parts, dim=0)
    if config.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    return state


# ------------------------------------------------------------------------------------------- configs


_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_settings(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` (a dict for ``llm.config.RopeScaling``, or None) of a Llama/Qwen3
    ``config.json``: Transformers 5 writes ``rope_parameters`` (theta inside), 4.x ``rope_theta`` and
    ``rope_scaling``. Raises InteropError naming the key for a RoPE this GPT does not compute."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in _ROPE_TYPES:
        raise InteropError(f"{source}: rope_type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise InteropError(f"{source}: partial_rotary_factor {partial} is not supported (RoPE on every channel only)")
    theta = float(cfg.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0)
    rope.pop("rope_theta", None)
    for key in ("mscale", "mscale_all_dim"):
        if rope.pop(key, None):
            raise InteropError(f"{source}: rope scaling key {key} (DeepSeek's yarn variant) is not supported")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind == "yarn" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
        # Transformers' rule when yarn names no factor: the context grows from the original to the maximum
        rope["factor"] = cfg["max_position_embeddings"] / rope["original_max_position_embeddings"]
    return {"rope_theta": theta, "rope_scaling": {"rope_type": kind, **rope}}


def _refuse_unrepresentable(cfg: dict[str, Any], model_type: str, source: str) -> None:
    """Raise InteropError naming the key when a Llama/Qwen3 ``config.json`` asks for what this GPT cannot compute:
    a mixture of experts, sliding-window attention, a non-SiLU MLP."""
    for key in _MOE_KEYS:
        if cfg.get(key):
            raise InteropError(f"{source}: {key}={cfg[key]}: mixture-of-experts layers are not supported "
                               "(this GPT has one dense MLP per block)")
    layer_types = cfg.get("layer_types")
    if layer_types is None and model_type == "qwen3" and cfg.get("use_sliding_window") \
            and cfg.get("sliding_window") is not None:  # Qwen3's rule: layers from max_window_layers on slide
        start = cfg.get("max_window_layers", 28)
        if start < cfg["num_hidden_layers"]:
            raise InteropError(f"{source}: use_sliding_window=true with sliding_window={cfg['sliding_window']} "
                               f"(layers {start} on): sliding-window attention is not supported")
    sliding = sorted({t for t in layer_types or [] if t != "full_attention"})
    if sliding:
        raise InteropError(f"{source}: layer_types holds {', '.join(sliding)}: only full_attention layers are "
                           "supported (no sliding-window attention)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InteropError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (expected silu)")


def model_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Transformers ``config.json`` (parsed) of GPT-2, Llama or Qwen3, with the same
    vocabulary (no control tokens added). Raises InteropError naming ``source`` and the key that is missing
    or has no counterpart here."""
    try:
        return _model_config_from_hf(cfg, source)
    except KeyError as err:
        raise InteropError(f"{source}: key {err} is missing") from None
    except ValidationError as err:
        raise InteropError(format_validation_error(err, source)) from None


def _model_config_from_hf(cfg: dict[str, Any], source: str) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise InteropError(f"{source}: activation_function {act!r} is not supported "
                               f"(expected one of {', '.join(_GPT2_ACTIVATIONS)})")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                        ("scale_attn_weights", True)):
            if cfg.get(key, ok) != ok:
                raise InteropError(f"{source}: {key}={cfg[key]} is not supported (expected {ok})")
        return ModelConfig(vocab_size=cfg["vocab_size"], context_length=cfg.get("n_positions", 1024),
                           n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=cfg["n_embd"],
                           d_ff=cfg.get("n_inner") or 4 * cfg["n_embd"], dropout=0.0, position="learned",
                           mlp=_GPT2_ACTIVATIONS[act], norm="layernorm",
                           norm_eps=cfg.get("layer_norm_epsilon", 1e-5), qk_norm=False,
                           tie_weights=cfg.get("tie_word_embeddings", True), bias=True)
    if model_type in ("llama", "qwen3"):
        _refuse_unrepresentable(cfg, model_type, source)
        heads, d = cfg["num_attention_heads"], cfg["hidden_size"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise InteropError(f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads="
                               f"{heads}: each key/value head must serve the same number of query heads")
        head_dim = cfg.get("head_dim") or (128 if model_type == "qwen3" else d // heads)  # the classes' defaults
        bias = bool(cfg.get("attention_bias", False))
        if model_type == "llama" and bool(cfg.get("mlp_bias", False)) != bias:
            raise InteropError(f"{source}: attention_bias={bias} but mlp_bias={cfg.get('mlp_bias')}: this GPT "
                               "has one bias switch for both")
        if model_type == "qwen3" and bias:
            raise InteropError(f"{source}: attention_bias=true is not supported for qwen3 (its MLP has no bias)")
        return ModelConfig(vocab_size=cfg["vocab_size"], context_length=cfg.get("max_position_embeddings", 2048),
                           n_layer=cfg["num_hidden_layers"], n_head=heads,
                           n_kv_head=kv_heads if kv_heads != heads else None, d_model=d,
                           d_head=head_dim if head_dim * heads != d else None, d_ff=cfg["intermediate_size"],
                           dropout=0.0, position="rope", mlp="swiglu", norm="rmsnorm",
                           norm_eps=cfg.get("rms_norm_eps", 1e-6), qk_norm=model_type == "qwen3",
                           tie_weights=cfg.get("tie_word_embeddings", False), bias=bias, **_rope_settings(cfg, source))
    raise InteropError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")


def hf_config(config: ModelConfig):
    """The Transformers config object (GPT2Config, LlamaConfig or Qwen3Config) for a GPT of ``config``."""
    import transformers

    c, arch = config, hf_architecture(config)
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_weights, "architectures": [ARCHITECTURES[arch]],
              "bos_token_id": SPECIAL_IDS["<|bos|>"], "eos_token_id": SPECIAL_IDS["<|end|>"],
              "pad_token_id": SPECIAL_IDS["<|pad|>"]}
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.context_length, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.ff_dim,
            activation_function="gelu_new" if c.mlp == "gelu_tanh" else "gelu", layer_norm_epsilon=c.norm_eps,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, **common)
    scaling = c.rope_scaling.model_dump(exclude_none=True) if c.rope_scaling else None
    llama = {"hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layer,
             "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
             "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
             "rope_scaling": scaling, "attention_bias": c.bias, "attention_dropout": c.dropout, "hidden_act": "silu",
             **common}
    if arch == "qwen3":
        return transformers.Qwen3Config(use_sliding_window=False, **llama)
    return transformers.LlamaConfig(mlp_bias=c.bias, **llama)


# ------------------------------------------------------------------------------------------- import


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` folder: ``model.safetensors`` or the shards that
    ``model.safetensors.index.json`` lists. Raises InteropError for a folder holding only pickle weights
    (never loaded) or no weights, and for an unreadable file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            raise InteropError(f"{index}: unreadable shard index: {err}") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise InteropError(f"{folder}: weights only as pickle ({', '.join(pickles)}), which this project never "
                               "loads (unpickling runs code); convert them to safetensors where you trust them, e.g. "
                               "model.save_pretrained(folder, safe_serialization=True)")
        raise InteropError(f"{folder}: no model.safetensors (nor model.safetensors.index.json) here")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as err:
            raise InteropError(f"{folder / name}: cannot read weights: {err}") from None
    return tensors


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a ``save_pretrained`` folder. Raises InteropError naming the file."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(f"{path}: not found: is {folder} a Transformers save_pretrained folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InteropError(f"{path}: unreadable: {err}") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return cfg


def _with_control_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [V, C] with N_SPECIAL rows in front, each the mean of the others: new tokens start average."""
    return torch.cat([weight.mean(dim=0, keepdim=True).expand(N_SPECIAL, -1), weight], dim=0)


def base_model_config(folder: str | Path, context_length: int | None = None) -> ModelConfig:
    """The ModelConfig that ``load_hf_model`` gives the model of ``folder`` (control tokens counted), read from
    its ``config.json`` alone. Raises InteropError as ``import_hf`` does."""
    folder = Path(folder)
    config = model_config_from_hf(read_hf_config(folder), str(folder / "config.json"))
    config = config.model_copy(update={"vocab_size": config.vocab_size + N_SPECIAL})
    if context_length is None or context_length == config.context_length:
        return config
    if config.position == "learned" and context_length > config.context_length:
        raise InteropError(f"{folder}: context_length {context_length} exceeds the {config.context_length} "
                           "learned positions")
    return config.model_copy(update={"context_length": context_length})


def load_hf_tokenizer(folder: str | Path, context_length: int | None = None):
    """The BPE tokenizer of ``folder`` (byte-level, or sentencepiece-style with byte fallback) in our id space,
    sized for its model (``import_hf``)."""
    from llm.data.hf_tokenizer import ByteLevelBPETokenizer

    config = base_model_config(folder, context_length)
    tokenizer = ByteLevelBPETokenizer.from_hf_folder(folder, vocab_size=config.vocab_size)
    if tokenizer.vocab_size != config.vocab_size:
        raise InteropError(f"{folder}: the tokenizer has {tokenizer.vocab_size - N_SPECIAL} ids but the model's "
                           f"embedding only {config.vocab_size - N_SPECIAL} rows")
    return tokenizer


def import_hf_tokenizer(folder: str | Path, out_dir: str | Path, context_length: int | None = None):
    """Write the tokenizer of the model in ``folder`` (``load_hf_tokenizer``) as the tokenizer folder ``out_dir``
    (the tokenizer stage's output), atomically; returns it."""
    tokenizer = load_hf_tokenizer(folder, context_length)
    with atomic_folder(out_dir) as tmp:
        tokenizer.save(tmp)
    return tokenizer


def hf_source(folder: str | Path) -> dict[str, Any]:
    """What identifies the model of ``folder``: its path, model type and the sha256 of its weight files."""
    from llm.io import sha256_file

    folder = Path(folder)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    return {"path": str(folder.resolve()), "model_type": read_hf_config(folder).get("model_type"),
            "safetensors_sha256": {name: sha256_file(folder / name) for name in weights}}


def load_hf_model(folder: str | Path, context_length: int | None = None) -> GPT:
    """Our GPT (eval mode, float32) computing the function of the Transformers model in ``folder``, every id
    shifted up by N_SPECIAL (the control tokens' rows in front). ``context_length`` shortens the context
    (GPT-2 keeps its first position rows; nothing else changes for shorter inputs). Raises InteropError for an
    unsupported folder or a context longer than learned positions allow."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InteropError(f"{folder}: no such folder (expected a Transformers save_pretrained folder)")
    tensors = read_hf_weights(folder)
    config = base_model_config(folder, context_length)
    hf_shape = config.model_copy(update={"vocab_size": config.vocab_size - N_SPECIAL})
    state = from_hf_state_dict(tensors, hf_shape, str(folder))
    if config.position == "learned":
        state["wpe.weight"] = state["wpe.weight"][: config.context_length].clone()
    state["wte.weight"] = _with_control_rows(state["wte.weight"])
    state["lm_head.weight"] = state["wte.weight"] if config.tie_weights else _with_control_rows(state["lm_head.weight"])
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval()


def import_hf(folder: str | Path, out_dir: str | Path, *, context_length: int | None = None) -> dict[str, Any]:
    """Convert the Transformers ``save_pretrained`` folder ``folder`` (GPT-2, Llama or Qwen3 with a byte-level
    BPE tokenizer) into a checkpoint folder ``out_dir`` with its tokenizer, control tokens added at ids
    ``0..N_SPECIAL-1`` (every original id shifted up by N_SPECIAL); ``context_length`` as in
    ``load_hf_model``. Returns a summary (architecture, shape, parameters). Raises InteropError for an
    unsupported folder, TokenizerError for its tokenizer."""
    folder = Path(folder)
    model = load_hf_model(folder, context_length)
    tokenizer = load_hf_tokenizer(folder, context_length)
    config = model.config
    save_checkpoint(out_dir, model, config, tokenizer,
                    metadata={"stage": "import", "step": 0, "source": hf_source(folder)})
    log.info("imported %s into %s: %s", folder, out_dir, model.summary())
    source = tokenizer.source
    return {"path": str(out_dir), "architecture": ARCHITECTURES[hf_architecture(config)],
            "parameters": model.num_parameters(), "vocab_size": config.vocab_size,
            "context_length": config.context_length, "tokenizer": tokenizer.kind,
            "prompt_prefix": tokenizer.decode(list(source.prefix_ids)),
            "stop_tokens": [tokenizer.decode([i]) for i in source.eos_ids],
            "chat_template": "the model's own" if source.chat_template else "the project's (the model has none)"}


# ------------------------------------------------------------------------------------------- export


def _byte_tokenizer_spec() -> dict[str, Any]:
    """Our ``byte`` kind as a Transformers byte-level BPE without merges: byte b is piece b, id N_SPECIAL + b."""
    from llm.data.hf_tokenizer import byte_to_unicode, control_added_tokens

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": control_added_tokens(),
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**{t: i for i, t in enumerate(SPECIAL_TOKENS)},
                                **{c: N_SPECIAL + b for b, c in byte_to_unicode().items()}}, "merges": []}}


def _sentencepiece_tokenizer_json(tokenizer) -> str:
    """Our sentencepiece ``bpe``/``unigram`` model as a ``tokenizers`` file: the same pieces and ids, spaces as
    "▁" (identity normalization otherwise, no dummy prefix), a word starting at each run of "▁",
    byte fallback, "\n" as its own piece, and the BPE merges ranked by the id (score order) of the piece they
    make. Text holding a literal "▁" is the one known difference (ours encodes it as bytes)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    sp = tokenizer._sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    plain = {p: i for i, p in enumerate(pieces)
             if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or p == "\n")}
    if tokenizer.kind == "bpe":
        merges = sorted(((p[:k], p[k:], i, k) for p, i in plain.items() for k in range(1, len(p))
                         if p[:k] in plain and p[k:] in plain), key=lambda m: (m[2], m[3]))
        model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[(a, b) for a, b, _, _ in merges],
                           byte_fallback=True, unk_token="<|unk|>", fuse_unk=True)
    else:
        model = models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=SPECIAL_IDS["<|unk|>"],
                               byte_fallback=True)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf.add_tokens([AddedToken("\n", normalized=False)])
    return hf.to_str()


_TOKENIZER_PROBE = ("ROMEO.\nWherefore art thou,  Romeo?\n\n\tTwo  spaces, 1234 digits, café 日本 🙂 "
                    "--- end  ")


def hf_tokenizer_json(tokenizer: Tokenizer) -> str | None:
    """A Transformers ``tokenizer.json`` that encodes text to the same ids as ``tokenizer`` (control tokens at
    ids 0..N_SPECIAL-1, as special tokens), or None for the ``char`` kind, which has none here, or when the
    converted sentencepiece model does not encode a probe text to the same ids (logged)."""
    if tokenizer.kind in ("bytelevel_bpe", "sentencepiece_bpe"):
        return tokenizer.hf_json()
    if tokenizer.kind == "byte":
        return json.dumps(_byte_tokenizer_spec(), ensure_ascii=False)
    if tokenizer.kind in ("bpe", "unigram"):
        from tokenizers import Tokenizer as HFTokenizer

        text = _sentencepiece_tokenizer_json(tokenizer)
        theirs = HFTokenizer.from_str(text).encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
        if theirs == tokenizer.encode(_TOKENIZER_PROBE):
            return text
        log.warning("the %s tokenizer converted for Transformers encodes differently: not exported", tokenizer.kind)
    return None


CHAT_TEMPLATE = ("{{ '<|bos|>' }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                 "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _write_tokenizer(tokenizer: Tokenizer, folder: Path, context_length: int) -> bool:
    """``tokenizer.json`` and ``tokenizer_config.json`` with the chat template the model uses: an imported model's
    own (and its token names), else the project's. False when the tokenizer has no Transformers form."""
    text = hf_tokenizer_json(tokenizer)
    if text is None:
        return False
    atomic_write_text(folder / "tokenizer.json", text)
    ours = {"bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    source = tokenizer.source
    tokens = source.template_tokens if source is not None and source.chat_template is not None else ours
    template = source.chat_template if source is not None and source.chat_template is not None else CHAT_TEMPLATE
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **tokens,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in tokens.values()],
        "clean_up_tokenization_spaces": False, "chat_template": template}, indent=1)
    return True


def _generation_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """bos, eos and pad ids for ``generation_config.json``: an imported model's source's, else the project's."""
    source = tokenizer.source
    if source is None:
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(generation_stop_ids(tokenizer)),
                "pad_token_id": tokenizer.pad_id}
    bos = source.special_tokens.get(source.template_tokens.get("bos_token", ""))
    return {"bos_token_id": bos, "eos_token_id": list(generation_stop_ids(tokenizer)), "pad_token_id": source.pad_id}


def _parity_ids(vocab_size: int, context_length: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, min(context_length, 24)), generator=rng)


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, *, verify: bool = True, atol: float = 1e-4) -> dict:
    """Write the checkpoint ``checkpoint_dir`` as a Transformers folder ``out_dir``: ``config.json``,
    ``model.safetensors``, ``generation_config.json``, and ``tokenizer.json`` + ``tokenizer_config.json`` (with
    the chat template) when the tokenizer has a Transformers form (every kind but ``char``).

    With ``verify`` the folder is loaded back with ``AutoModelForCausalLM`` and its logits compared with ours
    (``hf_parity.json``); a difference above ``atol`` fails the export and leaves no folder. Returns a summary.
    Raises InteropError for a shape without a Transformers architecture (naming the option) or a mismatch, and
    when transformers is not installed.
    """
    try:
        import transformers
    except ImportError:
        raise InteropError("llm export hf needs transformers: pip install -e '.[hf]' in the project folder") from None

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model, tokenizer, _ = load_checkpoint(checkpoint_dir)
    c = model.config
    arch = hf_architecture(c)
    hf_model = getattr(transformers, ARCHITECTURES[arch])(hf_config(c)).eval()
    hf_state = to_hf_state_dict(model.state_dict(), c)
    expected = hf_model.state_dict()
    for name, tensor in expected.items():  # GPT-2 always has biases: ours without them are zeros
        if name not in hf_state and name.endswith(".bias") and arch == "gpt2" and not c.bias:
            hf_state[name] = torch.zeros_like(tensor)
    if c.tie_weights:
        hf_state.setdefault("lm_head.weight", hf_state.get("transformer.wte.weight", hf_state.get(
            "model.embed_tokens.weight")))
    result = hf_model.load_state_dict(hf_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InteropError(f"{checkpoint_dir}: conversion to {ARCHITECTURES[arch]} left tensors unmatched "
                           f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    # a length limit of the model's context: without one, pipeline() asks for 256 new tokens past any context
    hf_model.generation_config = transformers.GenerationConfig(max_length=c.context_length,
                                                               **_generation_ids(tokenizer))
    summary: dict[str, Any] = {"path": str(out_dir), "architecture": ARCHITECTURES[arch],
                               "transformers": transformers.__version__}
    with atomic_folder(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):
            give_default_mode(weights)  # safetensors writes 0600; every other file is 0644
        summary["tokenizer"] = _write_tokenizer(tokenizer, tmp, c.context_length)
        if not summary["tokenizer"]:
            log.warning("the %s tokenizer has no Transformers form: %s holds the model without tokenizer files",
                        tokenizer.kind, out_dir)
        if verify:
            summary["parity"] = _check_parity(model, tmp, atol)
            atomic_write_json(tmp / PARITY_FILE, summary["parity"], indent=2, sort_keys=True)
        summary["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return summary


def hf_cached_forward(hf_model, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, Any]:
    """``(logits, cache)`` of a Transformers causal LM for ``ids`` after ``cache`` (None: the first call): the
    cache argument is ``cache`` from Transformers 5.x on, ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    out = hf_model(ids, use_cache=True, **{name: cache})
    return out.logits, out[name]


def _check_parity(model: GPT, folder: Path, atol: float) -> dict[str, Any]:
    """Load ``folder`` with Transformers and compare its logits (full forward, then one token on its KV cache)
    with ``model``'s. Raises InteropError above ``atol``."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _parity_ids(model.config.vocab_size, model.config.context_length)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(ids).logits
        prefix = model(ids[:, :-1], use_cache=True)
        ours_step = model(ids[:, -1:], past_key_values=prefix.present_key_values).logits
        _, hf_cache = hf_cached_forward(hf_model, ids[:, :-1])
        theirs_step, _ = hf_cached_forward(hf_model, ids[:, -1:], hf_cache)
    full = (ours - theirs).abs().max().item()
    cached = (ours_step - theirs_step).abs().max().item()
    parity = {"max_abs_logit_diff": full, "max_abs_logit_diff_kv_cache": cached, "atol": atol,
              "tokens": list(ids.shape), "ok": max(full, cached) <= atol}
    if not parity["ok"]:
        raise InteropError(f"Transformers does not reproduce the model: max abs logit difference {full:.3g} "
                           f"(with the KV cache {cached:.3g}) > atol {atol:g}")
    return parity


# ------------------------------------------------------------------------------------------- LoRA adapters

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# our single LoRA targets (llm.model.lora) -> the Transformers module each adapts, under a layer's prefix
_PEFT_MODULES = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "fc": "mlp.c_fc",
             "down": "mlp.c_proj"},
}
_PEFT_LAYER_PREFIX = {"llama": "base_model.model.model.layers.{}.", "gpt2": "base_model.model.transformer.h.{}."}


def to_peft_adapter(adapters: dict[str, torch.Tensor], config: ModelConfig, lora: dict[str, Any],
                    qkv_split: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our adapter tensors (``llm.model.lora.adapter_state``) as peft's ``adapter_model.safetensors`` tensors for
    the Transformers architecture of ``config``, and the matching ``adapter_config.json`` contents.

    Llama and Qwen3 have a module per slice (q_proj, ..., gate_proj, up_proj): each gets our pair as it is.
    GPT-2's ``c_attn`` is fused like ours, and peft gives it one pair: q, k and v adapters of rank r stack into
    one of rank n*r (A rows stacked, B block-diagonal, zero rows where a slice has no adapter), with alpha n*alpha
    so the scale alpha/r is unchanged (``rank_pattern``, ``alpha_pattern``): the same function exactly.
    """
    from llm.model.lora import adapted_slices

    arch = hf_architecture(config)
    family = "gpt2" if arch == "gpt2" else "llama"
    rank, alpha = lora["rank"], lora["alpha"]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for i in range(config.n_layer):
        prefix = _PEFT_LAYER_PREFIX[family].format(i)
        for layer, slices in adapted_slices(config, qkv_split, lora["targets"]).items():
            by_module: dict[str, list[str]] = {}
            for name in slices:
                by_module.setdefault(_PEFT_MODULES[family][name], []).append(name)
            for module, names in by_module.items():
                a = torch.cat([adapters[f"blocks.{i}.{layer}.lora_A.{n}"] for n in names], dim=0)
                if len(names) == 1 and family == "llama":
                    b = adapters[f"blocks.{i}.{layer}.lora_B.{names[0]}"]
                else:  # one peft module over the whole fused layer: B block-diagonal over our slices' rows
                    out_rows = sum(qkv_split) if layer == "attn.qkv" else max(stop for _, stop in slices.values())
                    b = torch.zeros(out_rows, len(names) * rank)
                    for j, n in enumerate(names):
                        start, stop = slices[n]
                        b[start:stop, j * rank:(j + 1) * rank] = adapters[f"blocks.{i}.{layer}.lora_B.{n}"]
                if len(names) > 1:
                    rank_pattern[module], alpha_pattern[module] = len(names) * rank, len(names) * alpha
                tensors[f"{prefix}{module}.lora_A.weight"] = a.contiguous()
                tensors[f"{prefix}{module}.lora_B.weight"] = b.contiguous()
    modules = sorted({m for n, m in _PEFT_MODULES[family].items() if n in _single_targets(config, lora)})
    if family == "llama":  # unambiguous short names, as Transformers users write them
        modules = sorted(m.split(".")[-1] for m in modules)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": rank,
        "lora_alpha": alpha, "lora_dropout": lora["dropout"], "target_modules": modules, "bias": "none",
        "fan_in_fan_out": family == "gpt2", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, peft_config


def _single_targets(config: ModelConfig, lora: dict[str, Any]) -> list[str]:
    from llm.model.lora import expand_targets

    return expand_targets(lora["targets"], config)


def export_peft_adapter(checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the adapters of the LoRA checkpoint ``checkpoint_dir`` in peft's format into ``out_dir``
    (``adapter_config.json``, ``adapter_model.safetensors``), for the Transformers export of its base
    (``llm export hf --model BASE``): ``peft.PeftModel.from_pretrained(base_model, out_dir)`` then computes what
    the merged checkpoint computes. Returns a summary. Raises InteropError for a checkpoint without adapters
    or a shape with no Transformers architecture."""
    from safetensors.torch import save_file

    from llm.model.checkpoint import ADAPTER_FILE, read_adapter_config, verify_checkpoint
    from llm.model.gpt import CausalSelfAttention

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = ModelConfig.model_validate(verify_checkpoint(checkpoint_dir)["model"])
    adapter = read_adapter_config(checkpoint_dir)
    if adapter is None:
        raise InteropError(f"{checkpoint_dir}: no adapters here (not a LoRA finetune): --adapter-only needs one")
    with torch.device("meta"):  # only the row split of qkv is wanted, not weights
        qkv_split = CausalSelfAttention(config).qkv_split
    tensors, peft_config = to_peft_adapter(load_file(str(checkpoint_dir / ADAPTER_FILE)), config, adapter["lora"],
                                           qkv_split)
    peft_config["base_model_name_or_path"] = adapter["base"]["path"]
    with atomic_folder(out_dir) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        give_default_mode(tmp / PEFT_WEIGHTS_FILE)  # safetensors writes 0600
        atomic_write_json(tmp / PEFT_CONFIG_FILE, peft_config, indent=2, sort_keys=True)
    return {"path": str(out_dir), "architecture": ARCHITECTURES[hf_architecture(config)],
            "target_modules": peft_config["target_modules"], "base": adapter["base"],
            "files": {name: (out_dir / name).stat().st_size for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)}}
