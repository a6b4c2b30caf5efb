"""Specification of llm/inference/generate.py: sampling rules, KV-cache decoding, stopping and the sliding window."""

import math
from functools import partial

import pytest
import torch
from pydantic import ValidationError

from llm.inference.decoding import SamplingParams
from llm.inference.generate import generate, sample_next_token, stream_generate
from llm.model.gpt import GPT

import helpers

PROMPT = [1, 7, 3, 9, 4]


# a small fp32 model, weights widened (std 0.3) so greedy decoding does not repeat one token forever
tiny_model = partial(helpers.tiny_model, std=0.3)


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


def sliding_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The documented policy written out plainly: full recompute of a window that, when it would pass
    context_length, keeps its last context_length // 2 tokens."""
    context = model.config.context_length
    window, new = list(prompt[-context:]), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([window])).logits[0, -1].argmax())
            new.append(token)
            window.append(token)
            if len(window) > context:
                window = window[-(context // 2) :]
    return new


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
def test_greedy_cached_and_uncached_generation_agree(position):
    model = tiny_model(position=position)
    cached = generate(model, PROMPT, greedy(40))
    uncached = generate(model, PROMPT, greedy(40), use_cache=False)
    assert cached == uncached
    assert len(cached) == 40 and len(set(cached)) >= 4  # a real sequence, not one token repeated


def test_same_seed_gives_same_sample():
    model = tiny_model()
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=123)
    first = generate(model, PROMPT, params)
    assert generate(model, PROMPT, params) == first
    assert generate(model, PROMPT, params.model_copy(update={"seed": 124})) != first
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, PROMPT, SamplingParams(max_new_tokens=3, seed=None))  # a fresh seed of its own...
    assert torch.equal(torch.rand(3), expected)  # ...that leaves the global RNG where it was


def test_top_k_1_equals_greedy():
    model = tiny_model()
    sampled = generate(model, PROMPT, SamplingParams(max_new_tokens=30, temperature=1.5, top_k=1, seed=7))
    assert sampled == generate(model, PROMPT, greedy(30))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next_token(logits, temperature=0.0).tolist() == [1, 0]


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3])).repeat(4000, 1)  # 4000 independent rows
    g = torch.Generator().manual_seed(0)
    drawn = sample_next_token(logits, temperature=1.0, top_k=2, rng=g)
    assert set(drawn.tolist()) == {1, 3}
    assert (drawn == 1).float().mean().item() == pytest.approx(0.4 / 0.7, abs=0.03)


def test_top_p_filters_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    # smallest set reaching 0.7 is {0, 1} (0.5 + 0.3); its tail {2, 3} is never drawn
    drawn = sample_next_token(logits, temperature=1.0, top_p=0.7, rng=g)
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    # 0.5 alone already reaches top_p=0.5, and the most likely token always survives a tiny top_p
    assert set(sample_next_token(logits, 1.0, top_p=0.5, rng=g).tolist()) == {0}
    assert set(sample_next_token(logits, 1.0, top_p=1e-6, rng=g).tolist()) == {0}
    # top_p=1.0 keeps everything
    assert set(sample_next_token(logits, 1.0, top_p=1.0, rng=g).tolist()) == {0, 1, 2, 3}


def test_top_k_applies_before_top_p():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    # after top_k=3 the renormalised mass is 4/9, 3/9, 2/9: top_p=0.7 then keeps {0, 1}
    drawn = sample_next_token(logits, 1.0, top_k=3, top_p=0.7, rng=g)
    assert set(drawn.tolist()) == {0, 1}


def test_stop_id_ends_generation():
    model = tiny_model()
    free = generate(model, PROMPT, greedy(40))
    stop = free[10]
    first = free.index(stop)
    stopped = generate(model, PROMPT, greedy(40, stop_ids=(stop, 999)))
    assert stopped == free[: first + 1]  # the stop id is yielded, then nothing more
    assert generate(model, PROMPT, greedy(0)) == []


@pytest.mark.parametrize("position", ["learned", "rope", "sinusoidal", "none"])
def test_generation_past_context_length_slides_window(position):
    model = tiny_model(position=position, context_length=16)
    n = 50  # more than three context lengths
    cached = generate(model, PROMPT, greedy(n))
    assert len(cached) == n
    assert cached == generate(model, PROMPT, greedy(n), use_cache=False)
    assert cached == sliding_reference(model, PROMPT, n)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_prompt_longer_than_context_keeps_its_last_tokens(position):
    model = tiny_model(position=position, context_length=16)
    long_prompt = [(7 * i) % 50 for i in range(40)]
    out = generate(model, long_prompt, greedy(20))
    assert out == sliding_reference(model, long_prompt, 20)
    assert out == generate(model, long_prompt[-16:], greedy(20))


def test_stream_generate_yields_tokens_one_at_a_time():
    model = tiny_model()
    seen_shapes = []  # shape of idx in every forward pass

    def record(module, args, output):
        seen_shapes.append(tuple(args[0].shape))

    model.register_forward_hook(record)
    stream = stream_generate(model, PROMPT, greedy(5))
    assert seen_shapes == []  # nothing runs until the first token is asked for
    first = next(stream)
    assert isinstance(first, int)
    assert seen_shapes == [(1, len(PROMPT))]  # the prompt is prefilled once
    second = next(stream)
    assert seen_shapes == [(1, len(PROMPT)), (1, 1)]  # then one new token per step, through the cache
    rest = list(stream)
    assert len(seen_shapes) == 5  # no forward pass after the last token is yielded
    assert [first, second, *rest] == generate(model, PROMPT, greedy(5))


def test_generation_restores_training_mode():
    model = tiny_model(dropout=0.1).train()
    generate(model, PROMPT, greedy(3))
    assert model.training
    model.eval()
    generate(model, PROMPT, greedy(3))
    assert not model.training


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="bos"):
        generate(tiny_model(), [], greedy(3))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        generate(tiny_model(), [1, 50], greedy(3))


def test_sampling_params_are_validated():
    with pytest.raises(ValidationError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValidationError):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValidationError):
        SamplingParams(top_k=0)
    assert SamplingParams(stop_ids=[3, 4]).stop_ids == (3, 4)
    assert math.isclose(SamplingParams().temperature, 1.0)


def test_a_vanishing_temperature_and_the_largest_seed_generate_greedily_without_overflow():
    model = tiny_model()
    logits = torch.tensor([[0.5, 3.0, -2.0, 2.9]])
    assert sample_next_token(logits, temperature=1e-40).tolist() == [1]  # 3.0 / 1e-40 overflows float32
    tiny = SamplingParams(max_new_tokens=8, temperature=1e-40, seed=2**64 - 1)
    assert generate(model, PROMPT, tiny) == generate(model, PROMPT, greedy(8))
