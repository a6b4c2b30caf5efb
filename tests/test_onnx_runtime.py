"""Specification of llm/inference/onnx_runtime.py: generation from an ONNX export with onnxruntime and numpy,
without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from llm.inference.decoding import SamplingParams, complete
from llm.inference.decoding import sample_next_token as sample_next_token_np
from llm.inference.generate import TorchGenerator, generate
from llm.inference.onnx_runtime import OnnxGenerator
from llm.model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def export(tiny_export) -> tuple[Path, Path]:
    """(checkpoint, export folder) of a tiny rope model of context CONTEXT, weights widened so samples vary."""
    return tiny_export


# --- sampling rules -------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert sample_next_token_np(logits, temperature=0.0).tolist() == [1, 0]
    assert int(sample_next_token_np(logits[0], temperature=0.0)) == 1  # a single row works too


def test_top_k_and_top_p_limit_the_candidates():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    top_k = {int(sample_next_token_np(logits, 1.0, top_k=2, rng=rng)[0]) for _ in range(300)}
    assert top_k == {0, 1}
    # top_p 0.6: 0.5 alone is short of 0.6, so the 0.3 token joins; the rest are cut
    top_p = {int(sample_next_token_np(logits, 1.0, top_p=0.6, rng=rng)[0]) for _ in range(300)}
    assert top_p == {0, 1}
    assert {int(sample_next_token_np(logits, 1.0, top_p=0.01, rng=rng)[0]) for _ in range(50)} == {0}
    assert {int(sample_next_token_np(logits, 1.0, top_k=1, rng=rng)[0]) for _ in range(50)} == {0}


def test_samples_follow_the_softmax_distribution():
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    rng = np.random.default_rng(1)
    draws = sample_next_token_np(np.tile(np.log(probs), (20000, 1)), 1.0, rng=rng)
    assert np.abs(np.bincount(draws, minlength=4) / len(draws) - probs).max() < 0.015
    hot = sample_next_token_np(np.tile(np.log(probs), (20000, 1)), 2.0, rng=rng)  # flatter at temperature 2
    assert np.bincount(hot, minlength=4)[3] / len(hot) > 0.08


@pytest.mark.parametrize("vocab", [2048, 1000, 50304])  # the blocked draw; 1000 pads its last block
def test_a_batch_draws_by_blocks_what_one_cumulative_sum_draws_and_never_a_token_of_weight_zero(vocab):
    from llm.inference.decoding import DRAW_DIRECT_MAX

    rng = np.random.default_rng(3)
    rows = DRAW_DIRECT_MAX // vocab + 2  # past DRAW_DIRECT_MAX weights: the blocked inverse CDF
    logits = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
    logits[:, rng.integers(0, vocab, size=50)] = -np.inf  # weight 0 (stop ids held off, top-k and top-p cuts)
    logits[:, -1] = -np.inf  # the vocabulary's last token too: where a draw at u -> 1 would end
    for _ in range(20):
        u = rng.random(rows)
        u[0] = np.nextafter(1.0, 0.0)  # the edge: rounding puts the target at the very end of the row
        picks = sample_next_token_np(logits, 0.8, uniforms=u)
        assert np.isfinite(logits[np.arange(rows), picks]).all()
        weights = np.exp((logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)) / 0.8)
        cdf = np.cumsum(weights, axis=-1)
        direct = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1)  # one cumulative sum over the vocabulary
        assert (picks[1:] == direct[1:]).all()
    # and the draws follow the softmax: a row (of 300 tokens, 4 of them possible) repeated, a uniform each
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05, *[0.0] * 296]))
    counts = np.bincount(sample_next_token_np(np.tile(row, (20000, 1)), 1.0, uniforms=rng.random(20000)), minlength=300)
    assert np.abs(counts[:4] / 20000 - [0.5, 0.3, 0.15, 0.05]).max() < 0.015 and counts[4:].sum() == 0


def test_same_seed_gives_same_sample(export):
    _, export_dir = export
    generator = OnnxGenerator(export_dir)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.95, seed=123)
    first = generator.generate([1, 10, 11, 12], params)
    assert generator.generate([1, 10, 11, 12], params) == first
    assert OnnxGenerator(export_dir).generate([1, 10, 11, 12], params) == first  # a fresh session too
    others = {tuple(generator.generate([1, 10, 11, 12], SamplingParams(max_new_tokens=40, seed=s))) for s in range(4)}
    assert len(others) > 1


# --- the generation loop --------------------------------------------------------------------------------


def test_greedy_matches_torch_through_the_sliding_window(export):
    checkpoint, export_dir = export
    model = load_checkpoint(checkpoint)[0]
    params = SamplingParams(max_new_tokens=3 * CONTEXT, temperature=0.0)  # slides several times
    for prompt in ([1], [1, 12, 13, 14, 15], list(range(8, 8 + CONTEXT + 3))):
        assert OnnxGenerator(export_dir).generate(prompt, params) == generate(model, prompt, params)


def test_a_vanishing_temperature_with_the_largest_seed_is_greedy(export):
    _, export_dir = export
    generator = OnnxGenerator(export_dir)
    tiny = {"max_new_tokens": 10, "temperature": 1e-40, "seed": 2**64 - 1}
    assert generator.generate([1, 20], tiny) == generator.generate([1, 20], {"max_new_tokens": 10, "temperature": 0})
    with pytest.raises(ValueError, match="seed"):
        generator.generate([1, 20], {"seed": 2**70})


def test_accepts_sampling_params_and_stops_after_a_stop_id(export):
    _, export_dir = export
    generator = OnnxGenerator(export_dir)
    free = generator.generate([1, 20], SamplingParams(max_new_tokens=30, temperature=0.0))
    assert len(free) == 30
    stop = free[5]
    stopped = generator.generate([1, 20], SamplingParams(max_new_tokens=30, temperature=0.0, stop_ids=(stop,)))
    assert stopped == free[: free.index(stop) + 1]  # the stop id is yielded, then nothing
    assert generator.generate([1, 20], SamplingParams(max_new_tokens=0)) == []
    as_dict = generator.generate([1, 20], {"max_new_tokens": 30, "temperature": 0.0})
    assert as_dict == free


def test_stream_text_matches_torch(export):
    checkpoint, export_dir = export
    model, tokenizer, _ = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_ids=(3,))
    text = "".join(OnnxGenerator(export_dir).stream_text("once upon", params))
    assert text == "".join(complete(TorchGenerator(model, tokenizer), "once upon", params))
    assert isinstance(text, str) and text


def test_default_params_come_from_the_generation_config(export):
    _, export_dir = export
    generator = OnnxGenerator(export_dir)
    defaults = generator.default_params()
    assert defaults.temperature == generator.config["sampling"]["temperature"]
    assert defaults.stop_ids == tuple(generator.config["sampling"]["stop_ids"])
    assert generator.default_params(max_new_tokens=3).max_new_tokens == 3
    assert len(generator.generate([1, 5], generator.default_params(max_new_tokens=3, seed=0))) <= 3


def test_bad_prompts_and_overlong_inputs_are_errors(export):
    _, export_dir = export
    generator = OnnxGenerator(export_dir)
    with pytest.raises(ValueError, match="empty"):
        generator.generate([], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="must lie in"):
        generator.generate([1, 10_000], SamplingParams(max_new_tokens=3))
    _, cache = generator.forward(np.ones((1, CONTEXT - 1), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds context_length=32"):
        generator.forward(np.ones((1, 2), dtype=np.int64), cache)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        OnnxGenerator(export_dir / "tokenizer")


def test_session_uses_all_graph_optimisations_and_the_thread_count(export):
    _, export_dir = export
    options = OnnxGenerator(export_dir, intra_op_num_threads=1).session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1


def test_runtime_never_imports_torch(export):
    _, export_dir = export
    code = (
        "import sys\n"
        "from llm.inference.decoding import SamplingParams\nfrom llm.inference.onnx_runtime import OnnxGenerator\n"
        f"g = OnnxGenerator({str(export_dir)!r})\n"
        "ids = g.generate([1, 10, 11], SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, seed=0))\n"
        "text = ''.join(g.stream_text('abc', SamplingParams(max_new_tokens=8, seed=0)))\n"
        "assert len(ids) == 8, ids\n"
        "leaked = [m for m in ('torch', 'llm.model.gpt', 'llm.inference.generate', 'llm.inference.export')\n"
        "          if m in sys.modules]\n"
        "assert not leaked, leaked\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
