"""Specification of llm/inference/decoding.py: one decoding core for every backend, without torch.

The reference file holds what generation produced before the decoding core existed (the torch loop in
llm/generate.py and the numpy loop in llm/onnx_runtime.py): both backends must still produce exactly it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from llm.config import ModelConfig
from llm.data.chat_template import generation_stop_ids
from llm.data.tokenizer import N_SPECIAL, ByteTokenizer, CharTokenizer
from llm.inference.chat_session import ChatSession
from llm.inference.decoding import (
    DecodeState,
    SamplingParams,
    check_prompt,
    complete,
    decode,
    numpy_sampler,
    sample_next_token,
    stream_text,
    suppress_ids,
)
from llm.inference.generate import TorchGenerator, generate
from llm.model.checkpoint import save_checkpoint
from llm.model.gpt import GPT

from helpers import ALPHABET, widen_weights

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / "tests" / "data" / "generation_reference.json").read_text())


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory) -> tuple[GPT, Path]:
    """The model the reference was recorded with (seed 0, weights widened to std 0.3), and its checkpoint."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the reference was recorded
    tokenizer = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    model = widen_weights(GPT(ModelConfig(**REFERENCE["config"])).eval(), 0.3)
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("reference") / "ckpt", model, model.config, tokenizer)
    yield model, Path(checkpoint)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference_onnx(reference_model) -> Path:
    """The reference model exported to ONNX (fp32)."""
    pytest.importorskip("onnxruntime")
    from llm.inference.export import export_onnx

    _, checkpoint = reference_model
    export_onnx(checkpoint, checkpoint.parent / "onnx", quantize=False)
    return checkpoint.parent / "onnx"


CASES = [(prompt, case) for prompt in REFERENCE["prompts"] for case in REFERENCE["cases"]]


@pytest.mark.parametrize(("prompt", "case"), CASES, ids=[f"{p}/{c}" for p, c in CASES])
def test_torch_generation_matches_the_recorded_reference(reference_model, prompt, case):
    model, _ = reference_model
    params = SamplingParams(**REFERENCE["cases"][case])
    ids = REFERENCE["prompts"][prompt]
    assert generate(model, ids, params) == REFERENCE["torch"][f"{prompt}/{case}"]
    if case == "greedy":
        assert generate(model, ids, params, use_cache=False) == REFERENCE["torch_no_cache"][f"{prompt}/{case}"]


@pytest.mark.parametrize(("prompt", "case"), CASES, ids=[f"{p}/{c}" for p, c in CASES])
def test_onnx_generation_matches_the_recorded_reference(reference_onnx, prompt, case):
    from llm.inference.onnx_runtime import OnnxGenerator

    params = SamplingParams(**REFERENCE["cases"][case])
    generator = OnnxGenerator(reference_onnx, intra_op_num_threads=1)
    assert generator.generate(REFERENCE["prompts"][prompt], params) == REFERENCE["onnx"][f"{prompt}/{case}"]


def test_reference_covers_the_sliding_window_and_sampling():
    context = REFERENCE["config"]["context_length"]
    assert all(len(REFERENCE["prompts"]["romeo"]) + len(ids) > context for ids in REFERENCE["torch"].values()
               if len(ids) == 60)  # every full-length case slides at least once
    assert len(REFERENCE["prompts"]["long"]) > context  # and one prompt is cut to the window
    assert REFERENCE["torch"]["romeo/greedy"] == REFERENCE["onnx"]["romeo/greedy"]
    assert REFERENCE["torch"]["romeo/temperature"] != REFERENCE["torch"]["romeo/greedy"]


class CountingForward:
    """A numpy 'model' that always favours token (last id + 1) % vocab, recording every call it gets."""

    def __init__(self, vocab: int = 10):
        self.vocab, self.calls = vocab, []

    def __call__(self, ids: list[int], cache):
        past = 0 if cache is None else cache
        self.calls.append((list(ids), past))
        logits = np.zeros(self.vocab)
        logits[(ids[-1] + 1) % self.vocab] = 5.0
        return logits, past + len(ids)  # the cache is just its length here


def test_decode_prefills_once_then_feeds_one_token_with_the_cache():
    forward = CountingForward()
    ids = list(decode(forward, [1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0), context_length=16,
                      vocab_size=10))
    assert ids == [4, 5, 6, 7]
    assert forward.calls == [([1, 2, 3], 0), ([4], 3), ([5], 4), ([6], 5)]  # no call after the last token


def test_decode_slides_the_window_and_reencodes_its_last_half_from_position_zero():
    forward = CountingForward()
    ids = list(decode(forward, [0, 1, 2, 3, 4, 5], SamplingParams(max_new_tokens=5, temperature=0), context_length=8,
                      vocab_size=10))
    assert ids == [6, 7, 8, 9, 0]
    # window [0..5] + 6, 7 fills the 8-token context; appending 8 makes 9 tokens: keep the last 4, prefill again
    assert forward.calls[:3] == [([0, 1, 2, 3, 4, 5], 0), ([6], 6), ([7], 7)]
    assert forward.calls[3] == ([5, 6, 7, 8], 0)
    assert forward.calls[4] == ([9], 4)


def test_decode_without_cache_feeds_the_whole_window_every_step():
    forward = CountingForward()
    list(decode(forward, [1, 2], SamplingParams(max_new_tokens=3, temperature=0), context_length=16, vocab_size=10,
                use_cache=False))
    assert forward.calls == [([1, 2], 0), ([1, 2, 3], 0), ([1, 2, 3, 4], 0)]


def test_decode_yields_the_stop_id_then_stops_and_checks_the_prompt():
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(5,))
    assert list(decode(CountingForward(), [3], params, context_length=8, vocab_size=10)) == [4, 5]
    with pytest.raises(ValueError, match="empty"):
        list(decode(CountingForward(), [], params, context_length=8, vocab_size=10))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_prompt([1, 10], vocab_size=10)


def test_min_new_tokens_keeps_the_stop_ids_out_of_the_first_tokens():
    """With the stop id 5 the most likely next token, ``min_new_tokens`` forces the runner-up until it is met."""
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(5,), min_new_tokens=3)
    ids = list(decode(CountingForward(), [3], params, context_length=8, vocab_size=10))
    assert ids[:2] == [4, 0] and 5 not in ids[:3]  # after 4 the model wants 5; the next best (id 0) is taken
    logits = np.arange(4.0)
    assert suppress_ids(logits, (3,)).argmax() == 2 and logits[3] == 3.0  # a copy: the input is unchanged
    tensor = torch.arange(4.0)
    assert suppress_ids(tensor, (3,)).argmax() == 2 and suppress_ids(tensor, ()) is tensor


def test_decode_state_is_the_one_set_of_per_token_rules():
    """``DecodeState``, which ``decode`` and every row of the batch engine follow: the stop ids held off until
    ``min_new_tokens``, a stop id accepted (it was emitted) and ending with "stop", ``max_new_tokens`` ending with
    "length", and the window keeping its last half once it outgrows the context."""
    state = DecodeState(range(10), SamplingParams(max_new_tokens=4, stop_ids=(7, 9), min_new_tokens=2), 8)
    assert state.window == [2, 3, 4, 5, 6, 7, 8, 9] and state.finish_reason is None  # the prompt's last 8
    assert state.held_ids() == (7, 9)
    assert state.mask(np.zeros(10))[[6, 7, 8, 9]].tolist() == [0.0, -np.inf, 0.0, -np.inf]
    assert state.accept(3) is None and len(state.window) == 9
    assert state.slide() and state.window == [7, 8, 9, 3]  # 9 > 8 tokens: the last 8 // 2 stay
    assert not state.slide()
    assert state.accept(4) is None and state.held_ids() == ()
    logits = np.zeros(10)
    assert state.mask(logits) is logits  # nothing held: no copy
    assert state.accept(9) == "stop" == state.finish_reason and state.window == [7, 8, 9, 3, 4]
    short = DecodeState([1], SamplingParams(max_new_tokens=2), 8)
    assert (short.accept(5), short.accept(5), short.produced) == (None, "length", 2)
    assert DecodeState([1], SamplingParams(max_new_tokens=0), 8).finish_reason == "length"
    forward = CountingForward()
    assert list(decode(forward, [1], SamplingParams(max_new_tokens=0), context_length=8, vocab_size=10)) == []
    assert forward.calls == []  # nothing asked: no prefill either


def test_suppress_ids_blanks_the_stop_ids_of_the_rows_asked_for_only():
    logits = np.arange(12.0).reshape(3, 4)
    held = suppress_ids(logits, (3, 1), rows=[0, 2])
    assert np.isneginf(held[[0, 0, 2, 2], [3, 1, 3, 1]]).all() and (held[1] == logits[1]).all()
    assert (held[:, [0, 2]] == logits[:, [0, 2]]).all() and logits[0, 3] == 3.0  # a copy
    assert suppress_ids(logits, (3,), rows=[]) is logits and suppress_ids(logits, (), rows=[0]) is logits


def test_the_largest_draw_takes_the_last_token_that_has_probability():
    """At the very end of the cumulative distribution the pick is the last token with probability, never one
    after it that the logits, top-k or top-p left at zero; the smallest draw takes the first."""
    logits = np.array([[0.0, 1.0, -np.inf, -np.inf], [2.0, 0.5, 0.0, 1.0]])
    last = np.nextafter(1.0, 0.0)  # the largest uniform draw
    assert sample_next_token(logits, 1.0, uniforms=np.array([last, last])).tolist() == [1, 3]
    assert sample_next_token(logits, 1.0, top_k=2, uniforms=np.array([last, last])).tolist() == [1, 3]
    assert sample_next_token(logits, 1.0, uniforms=np.array([0.0, 0.0])).tolist() == [0, 0]


def test_numpy_sampler_is_reproducible_per_seed_and_respects_top_k():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    sampler = numpy_sampler(SamplingParams(seed=7, top_k=2))
    first = [sampler(logits) for _ in range(200)]
    again = numpy_sampler(SamplingParams(seed=7, top_k=2))
    assert first == [again(logits) for _ in range(200)]
    assert set(first) == {0, 1}


def test_sampling_params_are_one_validated_model():
    with pytest.raises(ValidationError):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValidationError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValidationError):
        SamplingParams(top_kk=3)  # a misspelt field is an error, not ignored
    assert SamplingParams(stop_ids=[1, 2]).stop_ids == (1, 2)


def test_seeds_outside_uint64_and_non_finite_temperatures_are_validation_errors():
    for seed in (2**70, 2**64, -1):
        with pytest.raises(ValidationError, match="seed"):
            SamplingParams(seed=seed)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    numpy_sampler(SamplingParams(seed=2**64 - 1))(np.zeros(4))  # the largest seed still seeds numpy
    for temperature in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="temperature"):
            SamplingParams(temperature=temperature)


def test_a_vanishing_temperature_is_greedy_instead_of_overflowing():
    logits = np.array([[0.5, 3.0, -2.0, 2.9], [9.0, -1.0, 0.0, 8.5]], dtype=np.float32)
    for temperature in (1e-40, 1e-320, 5e-7):
        assert sample_next_token(logits, temperature, rng=np.random.default_rng(0)).tolist() == [1, 0]
    sampler = numpy_sampler(SamplingParams(temperature=1e-40, seed=3))
    assert [sampler(logits[0]) for _ in range(20)] == [1] * 20


def test_stream_text_holds_back_split_characters_and_hides_the_stop_id():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("né") + [tokenizer.end_id] + tokenizer.encode("hidden")
    pieces = list(stream_text(ids, tokenizer, stop_ids=(tokenizer.end_id,)))
    assert "".join(pieces) == "né"
    assert all("\ufffd" not in p for p in pieces)  # the two bytes of é are never shown apart


def test_closing_the_text_stream_closes_the_token_stream():
    tokenizer, closed = ByteTokenizer(), []

    def tokens():
        try:
            yield from tokenizer.encode("abcdef")
        finally:
            closed.append(True)

    stream = stream_text(tokens(), tokenizer)
    assert next(stream) == "a"
    stream.close()
    assert closed == [True]


def test_stop_ids_are_every_control_token():
    tokenizer = ByteTokenizer()
    assert generation_stop_ids(tokenizer) == tuple(range(N_SPECIAL))
    assert tokenizer.end_id in generation_stop_ids(tokenizer)


class EchoGenerator:
    """A torch-free TextGenerator whose model answers every prompt with 'ok' and <|end|>."""

    context_length = 64

    def __init__(self):
        self.tokenizer = ByteTokenizer()
        self.prompts: list[list[int]] = []

    def stream_generate(self, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        forward_ids = [*self.tokenizer.encode("ok"), self.tokenizer.end_id, *self.tokenizer.encode("never")]
        table = {i: row for i, row in enumerate(forward_ids)}

        def forward(ids, cache):
            step = 0 if cache is None else cache
            logits = np.zeros(self.tokenizer.vocab_size)
            logits[table.get(step, 0)] = 9.0
            return logits, step + 1

        return decode(forward, prompt_ids, params, context_length=self.context_length,
                      vocab_size=self.tokenizer.vocab_size)


def test_chat_session_and_complete_run_on_any_backend_through_the_core():
    model = EchoGenerator()
    session = ChatSession(model, temperature=0, max_new_tokens=10)
    assert "".join(session.reply("hello")) == "ok"  # <|end|> ends the answer and is not shown
    assert session.history[-1] == {"role": "assistant", "content": "ok"}
    assert model.prompts[0][-1] == model.tokenizer.assistant_id  # the open assistant turn
    assert "".join(complete(model, "hi", SamplingParams(max_new_tokens=10, temperature=0,
                                                            stop_ids=generation_stop_ids(model.tokenizer)))) == "ok"


def test_torch_generator_is_a_text_generator_for_the_chat_session():
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=16))
    session = ChatSession(TorchGenerator(model, tokenizer), temperature=0, max_new_tokens=5, seed=0)
    answer = "".join(session.reply("hi"))
    assert session.history[-1] == {"role": "assistant", "content": answer}


def test_decoding_core_and_chat_session_import_no_torch():
    code = ("import sys, llm.inference.decoding, llm.inference.chat_session, llm.data.chat_template; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
