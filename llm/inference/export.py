"""ONNX export of a checkpoint: a KV-cache decoder graph, its generation config and tokenizer, checked for parity.

The export folder is self-contained, so ``llm.inference.onnx_runtime`` can generate with onnxruntime alone::

    model.onnx               the decoder (weights in model.onnx.data when large)
    model.int8.onnx          with ``quantize=True``: int8 dynamic quantization of the MatMul weights
    model.static.onnx        the same decoder with a static cache, for onnxruntime (and .int8 with quantize)
    generation_config.json   shapes, input/output names, special ids, default sampling
    tokenizer/               copied from the checkpoint
    parity.json              ONNX Runtime against PyTorch: logits and greedy ids

Graph interface (one decoder for prefill and decode, format 2): inputs ``input_ids`` [batch, seq] int64,
``position_ids`` [batch, seq] int64, ``past_mask`` [batch, past] bool and ``past_key_values.{i}.key`` /
``.value`` [batch, n_kv_head, past, head_dim] float32; outputs ``logits`` [batch, seq, vocab] and
``present.{i}.key`` / ``.value`` [batch, n_kv_head, past + seq, head_dim] (``n_kv_head``: the key/value heads,
fewer than the query heads with grouped-query attention). The first step feeds a cache of past
length 0. For one sequence, ``position_ids`` is ``past .. past + seq - 1`` and ``past_mask`` all True
(``OnnxGenerator.forward`` fills both in). Sequences of different lengths share one batch by padding their
caches on the left: ``past_mask`` is False on the padding, which no token attends to, and ``position_ids``
gives each row's own positions (``llm.inference.batching``). Format 1 exports (no ``position_ids`` or
``past_mask``: positions implicit from the cache length) still load, one sequence at a time.

The static-cache graph (format 3) serves batches on onnxruntime (``llm.inference.batching``): its cache
inputs are buffers [batch, n_kv_head, context_length, head_dim] that hold row b's tokens in positions
0..n_b-1, ``cache_last`` [batch] int32 is n_b + seq - 1 and ``position_ids`` the new tokens' positions; each
layer's attention is one ``com.microsoft.GroupQueryAttention`` node, which writes the new keys and values
into the buffers in place when the caller binds each present output to its past input. No cache is copied
or padded from step to step, which the portable graph, whose present is past + seq, must do. The portable
``model.onnx`` stays the reference for other runtimes; both are checked against PyTorch.

The graph comes from ``torch.onnx.export(dynamo=True)`` (torch.export, then ONNX Script) with symbolic
batch, seq and past dimensions, traced at sizes of at least 2 so that no axis is specialised to 0 or 1.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm.config import EvalParams
from llm.data.chat_template import generation_stop_ids
from llm.inference.onnx_runtime import (
    CONFIG_FILE,
    INT8_FILE,
    MODEL_FILE,
    STATIC_FILE,
    STATIC_INT8_FILE,
    OnnxGenerator,
    StaticCacheDecoder,
)
from llm.io import atomic_folder, atomic_write_json
from llm.model.checkpoint import TOKENIZER_DIR, load_checkpoint
from llm.model.gpt import GPT

log = logging.getLogger(__name__)

DATA_FILE = MODEL_FILE + ".data"
PARITY_FILE = "parity.json"
FORMAT_VERSION = 3  # 2 added position_ids and past_mask; 3 adds the static-cache serving graph
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf caps a file at 2 GiB)
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4  # >= 2 and distinct, so none is specialised or unified


class ExportError(RuntimeError):
    """The ONNX export failed or does not match PyTorch; the message gives the numbers."""


class DecoderForExport(nn.Module):
    """``GPT.forward`` with the cache flattened to tensors: the signature an ONNX graph can have.

    forward(input_ids [B, T], position_ids [B, T], past_mask [B, P], k0, v0, k1, v1, ...)
    -> (logits [B, T, V], k0', v0', k1', v1', ...), each past tensor [B, Hkv, P, D] and each present
    [B, Hkv, P+T, D] (Hkv: the key/value heads).
    """

    rows_input = "past_mask"  # the GPT.forward argument the third input feeds

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor,
                *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        out = self.model(input_ids, past_key_values=past, use_cache=True, position_ids=position_ids,
                         **{self.rows_input: rows})
        return (out.logits, *(t for kv in out.present_key_values for t in kv))


class StaticDecoderForExport(DecoderForExport):
    """``GPT.forward`` with a static cache (``static_last``), flattened for the serving graph.

    forward(input_ids [B, T], position_ids [B, T], cache_last [B] int32, k0, v0, k1, v1, ...)
    -> (logits [B, T, V], k0', v0', ...), every cache tensor [B, Hkv, L, D] with L the context length.
    """

    rows_input = "static_last"


def input_names(n_layer: int) -> list[str]:
    cache = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "past_mask", *cache]


def static_input_names(n_layer: int) -> list[str]:
    return ["input_ids", "position_ids", "cache_last", *input_names(n_layer)[3:]]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def _export_graph(model: GPT, path: Path, opset: int | None, external_data: bool) -> int:
    """Write the decoder graph of ``model`` to ``path``; return the opset it uses."""
    c = model.config
    if c.context_length < _TRACE_SEQ + _TRACE_PAST:
        need = _TRACE_SEQ + _TRACE_PAST
        raise ExportError(f"context_length={c.context_length} is too short to trace (need >= {need})")
    Dim = torch.export.Dim
    batch = Dim("batch", min=1)
    seq = Dim("seq", min=1, max=c.context_length)
    past = Dim("past", min=0, max=c.context_length - 1)
    ids = torch.arange(_TRACE_BATCH * _TRACE_SEQ).reshape(_TRACE_BATCH, _TRACE_SEQ) % c.vocab_size
    positions = torch.arange(_TRACE_PAST, _TRACE_PAST + _TRACE_SEQ).expand(_TRACE_BATCH, -1)
    past_mask = torch.ones(_TRACE_BATCH, _TRACE_PAST, dtype=torch.bool)
    cache = [torch.zeros(_TRACE_BATCH, c.kv_heads, _TRACE_PAST, c.head_dim) for _ in range(2 * c.n_layer)]
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: past},
                      tuple({0: batch, 2: past} for _ in cache))
    _trace(DecoderForExport(model), (ids, positions, past_mask, *cache), dynamic_shapes, input_names(c.n_layer),
           output_names(c.n_layer), path, opset, external_data, "the decoder graph")
    return _opset_of(path)


def _trace(module: nn.Module, args: tuple, dynamic_shapes: tuple, inputs: list[str], outputs: list[str], path: Path,
           opset: int | None, external_data: bool, what: str) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` at ``args`` into ``path``; ExportError naming ``what``."""
    with _quiet("torch.onnx", "onnxscript", "onnx_ir"):  # step-by-step notes, not about this model
        try:
            program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=inputs, output_names=outputs, opset_version=opset,
                                        optimize=True, verbose=False)
        except Exception as err:  # the exporter raises many types; name the stage and keep the cause
            raise ExportError(f"torch.onnx.export of {what} failed: {type(err).__name__}: {err}") from err
        program.save(str(path), external_data=external_data)


def static_cache_unsupported(head_dim: int) -> str | None:
    """Why onnxruntime's CPU GroupQueryAttention cannot run this model's static-cache graph, or None.

    Its kernel takes head sizes that are multiples of 16 only (onnxruntime 1.32 refuses others at run time:
    "head_size shall be a multiple of 16"); such a model gets the portable graph alone.
    """
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (onnxruntime's GroupQueryAttention needs one)"
    return None


def _export_static_graph(model: GPT, path: Path, opset: int | None, external_data: bool) -> int:
    """Write the static-cache decoder of ``model`` (``StaticDecoderForExport``) to ``path``; return its opset."""
    c = model.config
    L, B, T = c.context_length, _TRACE_BATCH, _TRACE_SEQ
    Dim = torch.export.Dim
    batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=L)
    ids = torch.arange(B * T).reshape(B, T) % c.vocab_size
    positions = torch.arange(_TRACE_PAST, _TRACE_PAST + T).expand(B, -1)
    last = torch.full((B,), _TRACE_PAST + T - 1, dtype=torch.int32)
    cache = [torch.zeros(B, c.kv_heads, L, c.head_dim) for _ in range(2 * c.n_layer)]
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, tuple({0: batch} for _ in cache))
    _trace(StaticDecoderForExport(model), (ids, positions, last, *cache), dynamic_shapes,
           static_input_names(c.n_layer), output_names(c.n_layer), path, opset, external_data, "the static-cache graph")
    axes = graph_axes(path)
    batch = axes["input_ids"][0]
    for name in static_input_names(c.n_layer)[3:] + output_names(c.n_layer)[1:]:
        if axes[name] != [batch, c.kv_heads, L, c.head_dim] or not isinstance(batch, str):
            raise ExportError(f"{path}: {name} should be [batch, {c.kv_heads}, {L}, {c.head_dim}]: {axes[name]}")
    # when torch.export(strict=False) fails, the exporter retries strict, which (torch 2.13) traces the
    # written-out attention instead: a valid graph, but one that copies the cache every step
    attention = graph_op_counts(path).get("GroupQueryAttention", 0)
    if attention != c.n_layer:
        raise ExportError(f"{path}: {attention} GroupQueryAttention nodes for {c.n_layer} layers: the exporter "
                          "traced the PyTorch attention instead (see torch.onnx.export's verbose output)")
    return _opset_of(path)


def graph_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each operator type the graph at ``path`` holds."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence warnings, and the named loggers ("" for the root) below ERROR, for the duration."""
    targets = [logging.getLogger(name or None) for name in loggers]
    levels = [t.level for t in targets]
    for target in targets:
        target.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for target, level in zip(targets, levels, strict=True):
            target.setLevel(level)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def graph_axes(path: str | Path) -> dict[str, list[str | int]]:
    """Each graph input's and output's shape: a symbol name (str) for a dynamic axis, an int for a fixed one."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    axes = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        axes[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    return axes


def check_dynamic_axes(path: str | Path, n_layer: int, n_kv_head: int, head_dim: int, vocab_size: int) -> dict:
    """Verify the graph's interface: names, symbolic batch/seq/past axes, fixed key/value heads, head_dim, vocab.

    Returns the axes (see ``graph_axes``). Raises ExportError naming the first tensor that is wrong.
    """
    axes = graph_axes(path)
    expected_names = input_names(n_layer) + output_names(n_layer)
    if sorted(axes) != sorted(expected_names):
        raise ExportError(f"{path}: graph inputs/outputs {sorted(axes)} differ from {sorted(expected_names)}")

    def require(name: str, dynamic: list[int], fixed: dict[int, int]) -> None:
        shape = axes[name]
        for i in dynamic:
            if not isinstance(shape[i], str):
                raise ExportError(f"{path}: axis {i} of {name} is frozen to {shape[i]} instead of symbolic: {shape}")
        for i, size in fixed.items():
            if shape[i] != size:
                raise ExportError(f"{path}: axis {i} of {name} should be {size}: {shape}")

    require("input_ids", [0, 1], {})
    require("logits", [0, 1], {2: vocab_size})
    batch, past = axes["input_ids"][0], axes["past_key_values.0.key"][2]
    for name in ("position_ids", "past_mask"):
        require(name, [0, 1], {})
        if axes[name][0] != batch:
            raise ExportError(f"{path}: {name} has batch axis {axes[name][0]!r}, input_ids has {batch!r}")
    if axes["position_ids"][1] != axes["input_ids"][1] or axes["past_mask"][1] != past:
        raise ExportError(f"{path}: position_ids must share input_ids' seq axis and past_mask the cache's past "
                          f"axis: {axes['position_ids']}, {axes['past_mask']}")
    for name in expected_names[3:]:
        if name == "logits":
            continue
        require(name, [0, 2], {1: n_kv_head, 3: head_dim})
        if axes[name][0] != batch:
            raise ExportError(f"{path}: {name} has batch axis {axes[name][0]!r}, input_ids has {batch!r}")
        if name.startswith("present") and axes[name][2] == axes["past_key_values.0.key"][2]:
            raise ExportError(f"{path}: {name} has the past length, not past + seq: {axes[name]}")
    return axes


def _generation_config(
    model: GPT, tokenizer, checkpoint_config: dict, opset: int, external: bool, quantized: bool, static: bool
) -> dict:
    c = model.config
    defaults = EvalParams()
    specials = {name.strip("<|>"): i for name, i in tokenizer.special_ids.items()}
    return {
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE if external else None,
        "int8_model_file": INT8_FILE if quantized else None,
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_kv_head": c.kv_heads,  # the cache's heads (older exports: n_head)
        "head_dim": c.head_dim,
        "d_model": c.d_model,
        "vocab_size": c.vocab_size,
        "context_length": c.context_length,
        "position": c.position,
        "positions": "position_ids per token; past_mask marks the cache slots that hold a token",
        "window_policy": {"slide_keep": max(1, c.context_length // 2), "reencode_from": 0},
        "inputs": input_names(c.n_layer),
        "outputs": output_names(c.n_layer),
        "static_cache": {
            "model_file": STATIC_FILE,
            "int8_model_file": STATIC_INT8_FILE if quantized else None,
            "inputs": static_input_names(c.n_layer),
            "outputs": output_names(c.n_layer),
            "cache_length": c.context_length,
            "runtime": "onnxruntime (com.microsoft.GroupQueryAttention)",
        } if static else None,
        "dtype": "float32",
        "bos_token_id": tokenizer.bos_id,
        # what starts a prompt ([bos_token_id] for a model trained here; an imported model's source's rule)
        "prompt_prefix_ids": list(tokenizer.source.prefix_ids) if tokenizer.source else [tokenizer.bos_id],
        "chat_template": "source" if tokenizer.source and tokenizer.source.chat_template else "llm",
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "special_ids": specials,
        "sampling": {
            "max_new_tokens": defaults.max_new_tokens,
            "temperature": defaults.temperature,
            "top_k": defaults.top_k,
            "top_p": defaults.top_p,
            "stop_ids": list(generation_stop_ids(tokenizer)),
        },
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "dir": TOKENIZER_DIR},
        "source": {k: checkpoint_config[k] for k in ("step",) if k in checkpoint_config},
    }


def _logit_cases(context: int) -> list[tuple[int, int]]:
    """(past length, new tokens) pairs: an empty cache, one cached token, 17, and the context limit."""
    cases = [(0, min(5, context)), (1, 1), (17, 3), (context - 3, 3), (context - 1, 1)]
    return [(p, t) for p, t in dict.fromkeys(cases) if p >= 0 and t >= 1 and p + t <= context]


def _ragged_cases(context: int) -> list[tuple[list[int], int]]:
    """(cache length of each row, new tokens) for batches whose rows differ in length: one decode step,
    and a few tokens at once, with an empty row and a row at the context limit among them."""
    cases = [([3, 0, 9], 1), ([5, 1, 12], 3), ([context - 1, 2], 1), ([context - 3, 4, 0], 3)]
    return [([min(n, context - new) for n in lengths], new) for lengths, new in cases if new <= context]


def _ragged_case(model: GPT, generator: OnnxGenerator, rng: np.random.Generator, lengths: list[int],
                 new: int) -> dict[str, Any]:
    """ONNX Runtime on rows of different cache lengths, padded on the left into one batch (``past_mask`` and
    ``position_ids``), against PyTorch on each row alone. Returns the largest logits difference."""
    c = model.config
    P = max(lengths)
    rows = [torch.from_numpy(rng.integers(0, c.vocab_size, n + new)) for n in lengths]
    padded, reference = [], []
    for row, n in zip(rows, lengths, strict=True):
        cache = model(row[None, :n], use_cache=True).present_key_values if n else None
        reference.append(model(row[None, n:], past_key_values=cache, use_cache=True).logits[0].numpy())
        flat = [t.numpy() for kv in cache for t in kv] if cache else generator.empty_cache(1)
        padded.append([np.pad(t, ((0, 0), (0, 0), (P - n, 0), (0, 0))) for t in flat])
    past = [np.concatenate(layer) for layer in zip(*padded, strict=True)]
    past_mask = np.array([[j >= P - n for j in range(P)] for n in lengths])
    positions = np.array([np.arange(n, n + new) for n in lengths])
    ids = np.stack([row[n:].numpy() for row, n in zip(rows, lengths, strict=True)])
    logits, _ = generator.forward(ids, past, position_ids=positions, past_mask=past_mask)
    diff = max(float(np.abs(logits[i] - ref).max()) for i, ref in enumerate(reference))
    return {"cache_lengths": lengths, "new": new, "max_abs_logits": diff}


@torch.inference_mode()
def check_parity(
    checkpoint_dir: str | Path,
    export_dir: str | Path,
    *,
    atol: float = 1e-4,
    n_prompts: int = 20,
    new_tokens: int = 64,
    batch_size: int = 2,
    seed: int = 0,
    model: GPT | None = None,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch for the checkpoint and write ``parity.json`` into ``export_dir``.

    Logits: for random ids at past lengths 0, 1, 17 and at the context limit (batch ``batch_size``), the
    max absolute difference of the logits and of the returned cache must be <= ``atol``; so must the logits of
    ragged batches (rows of different lengths padded into one cache) against each row alone. Greedy: for
    ``n_prompts`` random prompts (lengths 1 to past the context, so the window slides), ``new_tokens`` ids
    from ``OnnxGenerator`` must equal ``llm.inference.generate.generate`` with temperature 0.
    Both runtimes use ``num_threads`` threads (1 by default: batch-1 decoding gains little from more, and a
    busy machine makes multi-threaded PyTorch many times slower). ``model`` skips loading the checkpoint.
    Returns the report, whose ``passed`` says whether both hold; raises nothing for a mismatch.
    """
    export_dir = Path(export_dir)
    if model is None:
        model = load_checkpoint(checkpoint_dir)[0]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        report = _compare(model.eval(), OnnxGenerator(export_dir, intra_op_num_threads=num_threads, static_cache=False),
                          atol, n_prompts, new_tokens, batch_size, seed)
    finally:
        torch.set_num_threads(previous_threads)
    atomic_write_json(export_dir / PARITY_FILE, report)
    return report


def _compare(model: GPT, generator: OnnxGenerator, atol: float, n_prompts: int, new_tokens: int,
             batch_size: int, seed: int) -> dict[str, Any]:
    from llm.inference.decoding import SamplingParams
    from llm.inference.generate import generate

    c = model.config
    rng = np.random.default_rng(seed)

    logit_rows = []
    for past_len, new in _logit_cases(c.context_length):
        ids = torch.from_numpy(rng.integers(0, c.vocab_size, (batch_size, past_len + new)))
        past = model(ids[:, :past_len], use_cache=True).present_key_values if past_len else None
        ref = model(ids[:, past_len:], past_key_values=past, use_cache=True)
        ort_past = [t.numpy() for kv in past for t in kv] if past else generator.empty_cache(batch_size)
        logits, present = generator.forward(ids[:, past_len:].numpy(), ort_past)
        ref_present = [t.numpy() for kv in ref.present_key_values for t in kv]
        logits_diff = float(np.abs(logits - ref.logits.numpy()).max())
        cache_diff = max(float(np.abs(a - b).max()) for a, b in zip(present, ref_present, strict=True))
        logit_rows.append({
            "past": past_len, "new": new, "batch": batch_size,
            "max_abs_logits": logits_diff, "max_abs_cache": cache_diff,
        })

    ragged_rows = [_ragged_case(model, generator, rng, lengths, new)
                   for lengths, new in _ragged_cases(c.context_length)]

    # greedy generation through each graph the export has: the portable one, and the static-cache one
    generators = {"portable": generator}
    static = None
    if (generator.config.get("static_cache") or {}).get("model_file"):
        static = _static_parity(model, StaticCacheDecoder(generator.export_dir, 4, intra_op_num_threads=1), rng)
        generators["static_cache"] = OnnxGenerator(generator.export_dir, intra_op_num_threads=1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    mismatches = []
    for i in range(n_prompts):
        length = int(rng.integers(1, c.context_length + 8))
        prompt = rng.integers(0, c.vocab_size, length).tolist()
        torch_ids = generate(model, prompt, params)
        for graph, onnx_generator in generators.items():
            ort_ids = onnx_generator.generate(prompt, params)
            if torch_ids != ort_ids:
                differ = (j for j, (a, b) in enumerate(zip(torch_ids, ort_ids, strict=False)) if a != b)
                first = next(differ, min(len(torch_ids), len(ort_ids)))  # or where the shorter one stopped
                mismatches.append({"prompt": i, "prompt_length": length, "first_difference_at": first,
                                   "graph": graph})
    worst = max(max(r["max_abs_logits"], r["max_abs_cache"]) for r in logit_rows)
    worst_ragged = max((r["max_abs_logits"] for r in ragged_rows), default=0.0)
    worst_static = static["max_abs_logits"] if static else 0.0
    return {
        "passed": max(worst, worst_ragged, worst_static) <= atol and not mismatches,
        "static_cache": static,
        "atol": atol,
        "max_abs_diff": worst,
        "logits": logit_rows,
        "ragged": {"max_abs_logits": worst_ragged, "cases": ragged_rows},
        "greedy": {
            "prompts": n_prompts,
            "new_tokens": new_tokens,
            "graphs": list(generators),
            "identical": n_prompts - len({m["prompt"] for m in mismatches}),
            "mismatches": mismatches,
        },
    }


def _static_cases(context: int) -> list[list[int]]:
    """Cache lengths of the rows of one static-cache decode step: mixed lengths, an empty row, a full one."""
    cases = [[3, 0, 9], [context - 1, 1, context // 2, 2]]
    return [[min(n, context - 1) for n in lengths] for lengths in cases]


def _static_parity(model: GPT, decoder: StaticCacheDecoder, rng: np.random.Generator) -> dict[str, Any]:
    """The static-cache graph against PyTorch: each row prefilled into its own slot (logits of the last
    prompt token), then one decode step for all rows at once (rows of different lengths), each row's logits
    against PyTorch on that row's whole sequence. Returns the largest differences."""
    c = model.config
    prefill_diff = step_diff = 0.0
    cases = []
    for lengths in _static_cases(c.context_length):
        rows = [rng.integers(0, c.vocab_size, n + 1).tolist() for n in lengths]
        for slot, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if n:
                ref = model(torch.tensor([row[:n]])).logits[0, -1].numpy()
                prefill_diff = max(prefill_diff, float(np.abs(decoder.prefill(slot, row[:n]) - ref).max()))
            else:  # an empty row: nothing cached, its one token is decoded at position 0
                for buffer in decoder.buffers:
                    buffer[slot] = 0.0
        logits = decoder.step([row[n] for row, n in zip(rows, lengths, strict=True)], lengths)
        diff = max(float(np.abs(logits[r] - model(torch.tensor([row])).logits[0, -1].numpy()).max())
                   for r, row in enumerate(rows))
        step_diff = max(step_diff, diff)
        cases.append({"cache_lengths": lengths, "max_abs_logits": diff})
    return {"max_abs_logits": max(prefill_diff, step_diff), "prefill_max_abs_logits": prefill_diff, "steps": cases}


def _parity_message(report: dict) -> str:
    worst = max(report["logits"], key=lambda r: max(r["max_abs_logits"], r["max_abs_cache"]))
    greedy = report["greedy"]
    logits = (
        f"max |ONNX - PyTorch| = {report['max_abs_diff']:.3g} (tolerance {report['atol']:.3g}; worst at past "
        f"length {worst['past']} with {worst['new']} new tokens: logits {worst['max_abs_logits']:.3g}, "
        f"cache {worst['max_abs_cache']:.3g})"
    )
    ids = f"greedy ids identical for {greedy['identical']}/{greedy['prompts']} prompts of {greedy['new_tokens']} tokens"
    parts = [logits, ids]
    for name, key in (("ragged batches", "ragged"), ("static-cache graph", "static_cache")):
        if report.get(key):
            parts.append(f"{name}: max |ONNX - PyTorch| = {report[key]['max_abs_logits']:.3g}")
    if greedy["mismatches"]:
        m = greedy["mismatches"][0]
        parts.append(f"first mismatch: prompt {m['prompt']} at new token {m['first_difference_at']} "
                     f"({m.get('graph', 'portable')} graph)")
    return "; ".join(parts)


def quantize_int8(export_dir: str | Path, external_data: bool = False) -> Path:
    """Write ``model.int8.onnx`` beside ``model.onnx`` (and ``model.static.int8.onnx`` beside the static-cache
    graph): int8 weights, activations quantized on the fly.

    onnxruntime's dynamic quantization of MatMul/Gemm weights (per-channel symmetric int8). Returns its path.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_dir = Path(export_dir)
    static = [(STATIC_FILE, STATIC_INT8_FILE)] if (export_dir / STATIC_FILE).exists() else []
    pairs = [(MODEL_FILE, INT8_FILE)] + static
    for source, target in pairs:
        with _quiet(""):  # onnxruntime logs a generic advice to pre-process on the root logger
            quantize_dynamic(
                export_dir / source,
                export_dir / target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=external_data,
            )
    return export_dir / INT8_FILE


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int | None = None,
    quantize: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    external_data: bool | None = None,
    static_cache: bool = True,
) -> dict[str, Any]:
    """Export the checkpoint at ``checkpoint_dir`` to a self-contained ONNX folder ``out_dir``.

    Writes ``model.onnx`` (opset ``opset``, None: the exporter's default), ``generation_config.json``,
    ``tokenizer/`` and, with ``verify``, ``parity.json`` (see ``check_parity``, tolerance ``atol``).
    ``static_cache`` adds ``model.static.onnx``, the serving graph (see the module docstring), checked too,
    for head sizes onnxruntime's GroupQueryAttention takes (``static_cache_unsupported``; others: skipped).
    ``quantize`` adds ``model.int8.onnx`` (and its static twin). ``external_data`` None stores weights in
    ``model.onnx.data`` only above 1 GiB. The folder is built under a temporary name and renamed at the end,
    replacing an older export, so a failure leaves no complete-looking folder.

    Returns a summary: paths, opset, graph axes, sizes, timings and the parity report.
    Raises ExportError when the exporter fails, an axis is not dynamic, or parity fails (with the numbers);
    CheckpointError for a missing or corrupt checkpoint.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    start = time.perf_counter()
    model, tokenizer, checkpoint_config = load_checkpoint(checkpoint_dir)
    c = model.config
    if external_data is None:
        external_data = 4 * model.num_parameters() > EXTERNAL_DATA_BYTES
    with atomic_folder(out_dir) as tmp:
        opset = _export_graph(model, tmp / MODEL_FILE, opset, external_data)
        axes = check_dynamic_axes(tmp / MODEL_FILE, c.n_layer, c.kv_heads, c.head_dim, c.vocab_size)
        skipped = static_cache_unsupported(c.head_dim) if static_cache else None
        if skipped:
            log.warning("no static-cache graph for %s: %s", checkpoint_dir, skipped)
            static_cache = False
        if static_cache:
            _export_static_graph(model, tmp / STATIC_FILE, opset, external_data)
        export_s = time.perf_counter() - start
        config = _generation_config(model, tokenizer, checkpoint_config, opset, external_data, quantize,
                                    static_cache)
        atomic_write_json(tmp / CONFIG_FILE, config)
        source_tokenizer = checkpoint_dir / TOKENIZER_DIR
        shutil.copytree(source_tokenizer, tmp / TOKENIZER_DIR)
        summary: dict[str, Any] = {"path": str(out_dir), "opset": opset, "axes": axes, "export_s": export_s,
                                   "static_cache": "skipped: " + skipped if skipped else static_cache}
        if verify:
            report = check_parity(checkpoint_dir, tmp, atol=atol, model=model)
            if not report["passed"]:
                raise ExportError(f"ONNX export of {checkpoint_dir} does not match PyTorch: {_parity_message(report)}")
            summary["parity"] = report
        if quantize:
            quantize_int8(tmp, external_data)
        summary["files"] = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
    summary["total_s"] = time.perf_counter() - start
    log.info("exported %s to %s (opset %d) in %.1fs", checkpoint_dir, out_dir, opset, summary["total_s"])
    return summary
