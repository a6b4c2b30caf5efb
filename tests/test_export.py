"""Specification of llm/inference/export.py: a KV-cache ONNX decoder that matches PyTorch for every position kind."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llm.data.tokenizer import load_tokenizer
from llm.inference.decoding import SamplingParams
from llm.inference.export import (
    INT8_FILE,
    DecoderForExport,
    ExportError,
    export_onnx,
    graph_axes,
    graph_op_counts,
    input_names,
    output_names,
)
from llm.inference.generate import generate
from llm.inference.onnx_runtime import OnnxGenerator

import helpers

CONTEXT = 32
# one model per position kind, each also trying other MLP / norm / bias / tying variants
VARIANTS = {
    "learned": {"position": "learned", "mlp": "gelu", "norm": "layernorm", "bias": True},
    "sinusoidal": {"position": "sinusoidal", "mlp": "swiglu", "norm": "rmsnorm", "tie_weights": False},
    "rope": {"position": "rope", "mlp": "relu2", "norm": "rmsnorm", "qk_norm": True},
    "none": {"position": "none", "mlp": "gelu", "norm": "layernorm"},
}


# every test here exports (tracing a graph takes seconds) and most check parity as well: the module is slow
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


write_checkpoint = partial(helpers.write_checkpoint, context_length=CONTEXT)


QUANTIZED, EXTERNAL = "learned", "none"  # variants also quantized / also quantized with external data


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A function from variant name to (checkpoint folder, export folder, export summary), each exported once."""
    done = {}

    def export_of(name: str):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            checkpoint = write_checkpoint(root / "checkpoint", **VARIANTS[name])
            summary = export_onnx(
                checkpoint, root / "onnx", quantize=name in (QUANTIZED, EXTERNAL), external_data=name == EXTERNAL
            )
            done[name] = checkpoint, root / "onnx", summary
        return done[name]

    return export_of


@pytest.fixture(params=list(VARIANTS))
def exported(request, exports):
    return exports(request.param)


def test_export_writes_a_self_contained_folder(exported):
    checkpoint, export_dir, summary = exported
    assert (export_dir / "model.onnx").exists() and (export_dir / "parity.json").exists()
    config = json.loads((export_dir / "generation_config.json").read_text())
    model_config = json.loads((checkpoint / "config.json").read_text())["model"]
    for key in ("n_layer", "n_head", "vocab_size", "context_length", "position"):
        assert config[key] == model_config[key]
    assert config["head_dim"] == model_config["d_model"] // model_config["n_head"]
    assert config["opset"] == summary["opset"] >= 18
    tokenizer = load_tokenizer(export_dir / "tokenizer")
    assert tokenizer.encode("hello, world") == load_tokenizer(checkpoint / "tokenizer").encode("hello, world")
    special = config["special_ids"]
    assert (special["bos"], special["end"], special["user"], special["assistant"]) == (
        tokenizer.bos_id, tokenizer.end_id, tokenizer.user_id, tokenizer.assistant_id
    )
    assert config["bos_token_id"] == tokenizer.bos_id and config["pad_token_id"] == tokenizer.pad_id
    assert set(config["sampling"]) >= {"temperature", "top_k", "top_p", "max_new_tokens", "stop_ids"}
    assert [p.name for p in export_dir.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_batch_seq_and_past_axes_are_symbolic(exported):
    _, export_dir, _ = exported
    axes = graph_axes(export_dir / "model.onnx")
    n_layer, heads, head_dim, vocab = 2, 2, 16, 294
    assert list(axes) == input_names(n_layer) + output_names(n_layer)
    batch, seq = axes["input_ids"]
    assert isinstance(batch, str) and isinstance(seq, str) and batch != seq
    past = axes["past_key_values.0.key"][2]
    assert isinstance(past, str) and past not in (batch, seq)
    for i in range(n_layer):
        for kv in ("key", "value"):
            assert axes[f"past_key_values.{i}.{kv}"] == [batch, heads, past, head_dim]
            present = axes[f"present.{i}.{kv}"]
            assert present[0] == batch and present[1:] == [heads, present[2], head_dim]
            assert isinstance(present[2], str) and present[2] != past  # past + seq
    assert axes["logits"] == [batch, seq, vocab]
    assert axes["position_ids"] == [batch, seq] and axes["past_mask"] == [batch, past]


def test_rows_of_different_lengths_padded_into_one_batch_match_each_row_alone(exported):
    """The ragged cases of the parity report: caches of lengths such as 3, 0 and 9 padded on the left into one
    batch (past_mask False on the padding, per-row position_ids), one or three new tokens per row."""
    _, _, summary = exported
    ragged = summary["parity"]["ragged"]
    assert {tuple(c["cache_lengths"]) for c in ragged["cases"]} >= {(3, 0, 9), (5, 1, 12), (CONTEXT - 1, 2)}
    assert {c["new"] for c in ragged["cases"]} == {1, 3}
    assert ragged["max_abs_logits"] == max(c["max_abs_logits"] for c in ragged["cases"]) <= 1e-4


def test_the_static_cache_graph_matches_pytorch_row_by_row(exported):
    """The serving graph (format 3): rows prefilled into their own slots of fixed-length buffers, then one
    decode step for rows of lengths such as 3, 0 and 9, or the context limit, each against PyTorch alone."""
    _, export_dir, summary = exported
    config = json.loads((export_dir / "generation_config.json").read_text())
    assert config["format_version"] == 3 and config["static_cache"]["model_file"] == "model.static.onnx"
    axes = graph_axes(export_dir / "model.static.onnx")
    batch = axes["input_ids"][0]
    assert axes["cache_last"] == [batch]
    assert axes["past_key_values.0.key"] == axes["present.0.key"] == [batch, 2, CONTEXT, 16]  # a fixed length
    static = summary["parity"]["static_cache"]
    assert {tuple(c["cache_lengths"]) for c in static["steps"]} == {(3, 0, 9), (CONTEXT - 1, 1, CONTEXT // 2, 2)}
    assert static["max_abs_logits"] <= 1e-4 and static["prefill_max_abs_logits"] <= 1e-4


def test_each_layer_of_the_static_cache_graph_is_one_groupqueryattention_on_packed_qkv(exported):
    """Attention is onnxruntime's in-place operator, not the written-out PyTorch path (which the exporter would
    trace if its first attempt failed), and it takes the projections packed: no Split or Reshape per layer."""
    checkpoint, export_dir, _ = exported
    proto = onnx.load(str(export_dir / "model.static.onnx"), load_external_data=False)
    attention = [node for node in proto.graph.node if node.op_type == "GroupQueryAttention"]
    assert len(attention) == 2  # one per layer
    assert all(node.input[1] == node.input[2] == "" for node in attention)  # key and value: inside the query
    counts = graph_op_counts(export_dir / "model.static.onnx")
    model = json.loads((checkpoint / "config.json").read_text())["model"]
    assert "ScatterND" not in counts
    if not model["qk_norm"]:
        assert "Reshape" not in counts
        assert counts.get("Split", 0) == (2 if model["mlp"] == "swiglu" else 0)  # only SwiGLU's gate and up


def test_logits_match_pytorch_at_past_lengths_0_1_17_and_the_limit(exported):
    _, export_dir, summary = exported
    rows = summary["parity"]["logits"]
    assert {(r["past"], r["new"]) for r in rows} >= {(0, 5), (1, 1), (17, 3), (CONTEXT - 1, 1)}
    assert all(r["max_abs_logits"] <= 1e-4 and r["max_abs_cache"] <= 1e-4 for r in rows)
    assert json.loads((export_dir / "parity.json").read_text())["passed"] is True


@torch.inference_mode()
def test_any_batch_and_an_empty_cache_run_in_onnx_runtime(exported):
    checkpoint, export_dir, _ = exported
    from llm.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)[0]
    generator = OnnxGenerator(export_dir)
    for batch, length in [(1, 1), (3, CONTEXT), (5, 7)]:  # batch and seq sizes never traced
        ids = np.random.default_rng(batch).integers(0, 294, (batch, length))
        logits, present = generator.forward(ids, generator.empty_cache(batch))
        expected = model(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(logits - expected).max() <= 1e-4
        assert present[0].shape == (batch, 2, length, 16)
    # the full-sequence logits equal a prefill of 10 then a decode of the rest
    ids = np.random.default_rng(0).integers(0, 294, (2, 12))
    _, cache = generator.forward(ids[:, :10])
    logits, _ = generator.forward(ids[:, 10:], cache)
    assert np.abs(logits - model(torch.from_numpy(ids)).logits[:, 10:].numpy()).max() <= 1e-4


def test_greedy_generation_matches_torch(exported):
    checkpoint, export_dir, summary = exported
    greedy = summary["parity"]["greedy"]
    assert greedy == {"prompts": 20, "new_tokens": 64, "graphs": ["portable", "static_cache"], "identical": 20,
                      "mismatches": []}
    from llm.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)[0]
    params = SamplingParams(max_new_tokens=50, temperature=0.0)
    prompt = [1, *range(10, 10 + CONTEXT + 5)]  # longer than the context: truncated, then the window slides
    ours = OnnxGenerator(export_dir).generate(prompt, params)
    assert ours == generate(model, prompt, params)
    assert OnnxGenerator(export_dir, static_cache=False).generate(prompt, params) == ours  # the portable graph
    assert len(set(ours)) >= 4  # a real sequence, not one token repeated


def test_quantized_model_runs_and_mostly_agrees(exports):
    _, export_dir, summary = exports(QUANTIZED)
    assert summary["files"][INT8_FILE] < summary["files"]["model.onnx"]
    fp32, int8 = OnnxGenerator(export_dir), OnnxGenerator(export_dir, int8=True)
    assert int8.model_path.name == INT8_FILE
    ids = np.random.default_rng(0).integers(0, 294, (2, 20))
    a, b = fp32.forward(ids)[0], int8.forward(ids)[0]
    assert a.shape == b.shape and np.isfinite(b).all()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.7


def test_small_models_keep_weights_inside_model_onnx(exports):
    summary = exports(QUANTIZED)[2]
    assert "model.onnx.data" not in summary["files"]
    with pytest.raises(FileNotFoundError, match="quantize=True"):
        OnnxGenerator(exports("rope")[1], int8=True)  # not quantized


def test_external_data_export_is_loadable(exports):
    _, export_dir, summary = exports(EXTERNAL)
    config = json.loads((export_dir / "generation_config.json").read_text())
    assert config["external_data"] == "model.onnx.data" and summary["files"]["model.onnx.data"] > 0
    assert ort.InferenceSession(str(export_dir / "model.onnx")).get_inputs()[0].name == "input_ids"
    assert summary["parity"]["passed"]
    assert summary["files"]["model.int8.onnx.data"] > 0
    int8 = OnnxGenerator(export_dir, model_file=INT8_FILE)
    assert len(int8.generate([1, 9, 10], SamplingParams(max_new_tokens=5, temperature=0.0))) == 5


def test_failed_parity_raises_and_leaves_no_export(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoint", position="rope")
    with pytest.raises(ExportError, match=r"does not match PyTorch: max \|ONNX - PyTorch\| = .* \(tolerance 0;"):
        export_onnx(checkpoint, tmp_path / "onnx", atol=0.0)
    assert not (tmp_path / "onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_corrupt_graph_fails_parity_and_keeps_the_previous_export(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "checkpoint", position="learned")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "marker").write_text("previous export")
    original = DecoderForExport.forward

    def corrupted(self, input_ids, position_ids, past_mask, *past):  # flipped logits: greedy picks the least likely
        logits, *present = original(self, input_ids, position_ids, past_mask, *past)
        return (-logits, *present)

    monkeypatch.setattr(DecoderForExport, "forward", corrupted)
    with pytest.raises(ExportError, match=r"greedy ids identical for 0/20 prompts"):
        export_onnx(checkpoint, out)
    assert sorted(p.name for p in out.iterdir()) == ["marker"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "onnx"]


def test_a_head_size_groupqueryattention_cannot_take_gets_the_portable_graph_alone(tmp_path):
    """onnxruntime's CPU GroupQueryAttention takes head sizes that are multiples of 16: a model with head_dim 8
    is exported without the static-cache graph, and generation (alone or batched) uses the portable one."""
    from llm.inference.batching import BatchEngine

    checkpoint = write_checkpoint(tmp_path / "checkpoint", d_model=32, n_head=4, position="rope")
    summary = export_onnx(checkpoint, tmp_path / "onnx", verify=False)
    assert summary["static_cache"].startswith("skipped: head_dim 8 is not a multiple of 16")
    config = json.loads((tmp_path / "onnx" / "generation_config.json").read_text())
    assert config["static_cache"] is None and not (tmp_path / "onnx" / "model.static.onnx").exists()
    generator = OnnxGenerator(tmp_path / "onnx")
    assert generator.static_cache is False and BatchEngine(generator).static is None
    assert len(generator.generate([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.0))) == 4


def test_grouped_query_attention_with_its_own_head_size_exports_a_smaller_cache_that_matches_pytorch(tmp_path):
    """4 query heads sharing 2 key/value heads of 16 channels (d_model 40 is no multiple of 4 x 16), QK-norm and
    yarn-scaled RoPE: both graphs pass every parity check, their caches hold 2 heads, and the static graph's
    GroupQueryAttention is told so (kv_num_heads)."""
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    checkpoint = write_checkpoint(tmp_path / "checkpoint", n_head=4, n_kv_head=2, d_head=16, d_model=40,
                                  position="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True,
                                  rope_scaling=rope_scaling)
    summary = export_onnx(checkpoint, tmp_path / "onnx")  # raises when a parity check fails
    parity = summary["parity"]
    assert parity["passed"] and parity["greedy"]["graphs"] == ["portable", "static_cache"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["static_cache"]["max_abs_logits"] <= 1e-4
    assert parity["greedy"]["identical"] == parity["greedy"]["prompts"]
    config = json.loads((tmp_path / "onnx" / "generation_config.json").read_text())
    assert (config["n_head"], config["n_kv_head"], config["head_dim"], config["d_model"]) == (4, 2, 16, 40)
    portable, static = graph_axes(tmp_path / "onnx" / "model.onnx"), graph_axes(tmp_path / "onnx" / "model.static.onnx")
    assert portable["past_key_values.0.key"][1:] == [2, portable["past_key_values.0.key"][2], 16]
    assert static["past_key_values.1.value"][1:] == [2, CONTEXT, 16]
    proto = onnx.load(str(tmp_path / "onnx" / "model.static.onnx"), load_external_data=False)
    attention = [{a.name: a.i for a in node.attribute} for node in proto.graph.node
                 if node.op_type == "GroupQueryAttention"]
    assert [(a["num_heads"], a["kv_num_heads"]) for a in attention] == [(4, 2), (4, 2)]
    generator = OnnxGenerator(tmp_path / "onnx")
    assert generator.empty_cache(3)[0].shape == (3, 2, 0, 16) and generator.n_kv_head == 2


def test_an_export_from_before_grouped_query_attention_reads_its_cache_heads_from_n_head(exports, tmp_path):
    """generation_config.json without n_kv_head (older exports): the cache has n_head heads, as it always had."""
    import shutil

    _, export_dir, _ = exports("rope")
    shutil.copytree(export_dir, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "generation_config.json").read_text())
    del config["n_kv_head"]
    (tmp_path / "old" / "generation_config.json").write_text(json.dumps(config))
    generator = OnnxGenerator(tmp_path / "old")
    assert generator.n_kv_head == config["n_head"] == 2
    assert generator.generate([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.0)) == OnnxGenerator(
        export_dir).generate([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.0))
