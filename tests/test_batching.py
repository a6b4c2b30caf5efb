"""Specification of llm/inference/batching.py: concurrent requests decode together, each as if it ran alone."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llm.inference.batching import BatchEngine, EngineFull, EngineStopped, Event
from llm.inference.decoding import SamplingParams
from llm.inference.export import export_onnx
from llm.inference.onnx_runtime import OnnxGenerator

from helpers import write_checkpoint

CONTEXT = 32


@pytest.fixture(scope="module")
def generator(tiny_export) -> OnnxGenerator:
    _, export_dir = tiny_export  # a rope model of context CONTEXT, shared with test_onnx_runtime
    return OnnxGenerator(export_dir, intra_op_num_threads=1)


@pytest.fixture(params=[True, False], ids=["static-cache", "portable"])
def static(request, generator) -> bool:
    """Both decoders the engine can batch with: the export's static-cache graph (format 3), and the portable
    graph whose rows are padded into one growing cache (format 2, and every export without the static graph)."""
    return request.param


class Collector:
    """The events of several requests, by request name; ``wait`` until all have their final event."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, Event] = {}
        self.expected: set[str] = set()
        self._done = threading.Condition()

    def callback(self, name: str):
        self.tokens[name] = []
        self.expected.add(name)

        def on_event(event: Event) -> None:
            if event.finish_reason is None:
                self.tokens[name].append(event.token_id)
                return
            with self._done:
                self.finish[name] = event
                self._done.notify_all()

        return on_event

    def wait(self, timeout: float = 60) -> None:
        with self._done:
            assert self._done.wait_for(lambda: set(self.finish) >= self.expected, timeout), "requests never ended"


def ragged_requests(vocab: int, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1 to 40 tokens (some past the context), 1 to 70 new tokens (so windows slide), greedy and
    seeded sampling with top-k / top-p."""
    rng = random.Random(0)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, CONTEXT + 8))]
        sampling = {"temperature": 0.0} if i % 2 else {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": i}
        requests.append((prompt, SamplingParams(max_new_tokens=rng.randint(1, 70), **sampling)))
    return requests


def test_concurrent_requests_decode_together_and_each_gets_what_it_would_get_alone(generator, static):
    requests = ragged_requests(generator.vocab_size, 12)
    alone = [generator.generate(prompt, params) for prompt, params in requests]
    events = Collector()
    with BatchEngine(generator, max_batch=5, max_queue=16, static_cache=static) as engine:
        assert (engine.static is not None) == static
        for i, (prompt, params) in enumerate(requests):
            engine.submit(prompt, params, on_event=events.callback(str(i)))
        events.wait()
    assert [events.tokens[str(i)] for i in range(len(requests))] == alone
    assert {e.finish_reason for e in events.finish.values()} == {"length"}
    assert max(engine.batch_sizes) == 5  # rows of different lengths shared decoder calls
    assert sum(n for size, n in engine.batch_sizes.items() if size > 1) > sum(engine.batch_sizes.values()) // 2


@pytest.mark.parametrize("mixed", [False, True], ids=["alike", "mixed settings"])
def test_a_batch_is_sampled_as_each_row_would_be_sampled_alone(mixed):
    """The whole batch is sampled at once (stop ids blanked in one assignment for the rows still short of
    ``min_new_tokens``, one draw from each row's own generator), and each row gets the token ``decode`` would
    give it alone: its logits with its stop ids blanked while held, sampled by ``numpy_sampler``."""
    from llm.inference.batching import Job, _Row, _sample
    from llm.inference.decoding import DecodeState, numpy_sampler, suppress_ids

    settings = [{"temperature": 0.8}] * 6
    if mixed:
        settings[1:4] = [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 5}, {"temperature": 0.7, "top_p": 0.9}]
    stops = [(1, 2), (1, 2), (3,), (), (1, 2), (4, 5, 6)]
    params = [SamplingParams(max_new_tokens=100, seed=i, stop_ids=stops[i], min_new_tokens=(0, 10, 25)[i % 3], **s)
              for i, s in enumerate(settings)]
    rows = [_Row(Job(i, [1], p, None, lambda e: None), np.random.default_rng(p.seed), DecodeState([1], p, CONTEXT))
            for i, p in enumerate(params)]
    alone = [numpy_sampler(p) for p in params]
    logits_rng = np.random.default_rng(123)
    for step in range(40):
        logits = logits_rng.standard_normal((len(rows), 16)).astype(np.float32) * 2
        logits[:, 1:7] += 3  # the stop ids are likely picks, so holding them off shows
        expected = [sample(suppress_ids(logits[i], p.stop_ids) if step < p.min_new_tokens else logits[i])
                    for i, (p, sample) in enumerate(zip(params, alone, strict=True))]
        assert _sample(rows, logits) == expected
        for row in rows:
            row.state.produced += 1


def test_a_stop_id_ends_only_its_own_row(generator, static):
    prompt = [5, 6, 7]
    greedy = generator.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.0))
    stop = greedy[3]
    events = Collector()
    with BatchEngine(generator, max_batch=4, static_cache=static) as engine:
        engine.submit(prompt, SamplingParams(max_new_tokens=20, temperature=0.0, stop_ids=(stop,)),
                      on_event=events.callback("stops"))
        engine.submit(prompt, SamplingParams(max_new_tokens=20, temperature=0.0), on_event=events.callback("runs"))
        engine.submit(prompt, SamplingParams(max_new_tokens=0), on_event=events.callback("nothing"))
        events.wait()
    assert events.tokens["stops"] == greedy[: greedy.index(stop) + 1]  # the stop id itself is delivered
    assert events.finish["stops"].finish_reason == "stop"
    assert events.tokens["runs"] == greedy and events.finish["runs"].finish_reason == "length"
    assert events.tokens["nothing"] == [] and events.finish["nothing"].finish_reason == "length"
    at_least = SamplingParams(max_new_tokens=20, temperature=0.0, stop_ids=(stop,), min_new_tokens=8)
    alone = generator.generate(prompt, at_least)
    events = Collector()
    with BatchEngine(generator, max_batch=4) as engine:
        engine.submit(prompt, at_least, on_event=events.callback("at least"))
        events.wait()
    assert events.tokens["at least"] == alone and stop not in alone[:8]


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, export) of a model whose 4 query heads share 2 key/value heads of 16 channels."""
    root = tmp_path_factory.mktemp("gqa")
    checkpoint = write_checkpoint(root / "checkpoint", seed=2, context_length=CONTEXT, position="rope", n_head=4,
                                  n_kv_head=2, d_head=16, d_model=48, mlp="swiglu", norm="rmsnorm")
    export_onnx(checkpoint, root / "onnx", verify=False)
    return checkpoint, root / "onnx"


def test_grouped_query_attention_batches_on_a_smaller_cache_as_full_recompute_decodes(gqa_export, static):
    """Greedy requests through the engine (rows of different lengths in one batch, with the static cache or
    the padded portable one) give, token for token, what PyTorch gives recomputing the whole sequence every
    step; the cache holds n_kv_head heads."""
    import torch

    from llm.model.checkpoint import load_checkpoint

    checkpoint, export_dir = gqa_export
    model = load_checkpoint(checkpoint)[0].eval()
    generator = OnnxGenerator(export_dir, intra_op_num_threads=1)
    rng = random.Random(3)
    requests = [[rng.randrange(8, generator.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    expected = []
    with torch.inference_mode():
        for prompt in requests:
            ids = list(prompt)
            while len(ids) < CONTEXT:  # no window slides: every step sees the whole sequence
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    events = Collector()
    with BatchEngine(generator, max_batch=4, max_queue=8, static_cache=static) as engine:
        cache = engine.static.buffers[0] if static else generator.empty_cache(1)[0]
        assert cache.shape[1] == generator.n_kv_head == 2 < generator.n_head
        for i, prompt in enumerate(requests):
            params = SamplingParams(max_new_tokens=CONTEXT - len(prompt), temperature=0.0)
            engine.submit(prompt, params, on_event=events.callback(str(i)))
        events.wait()
    assert [events.tokens[str(i)] for i in range(len(requests))] == expected
    assert max(engine.batch_sizes) > 1 and len({t for row in expected for t in row}) > 5  # varied, shared calls


def test_requests_that_arrive_together_are_prefilled_together_and_each_gets_what_it_would_get_alone(generator,
                                                                                                   monkeypatch):
    """Queued requests are prefilled in one decoder call (windows of different lengths padded on the right);
    a row that ends at its first token leaves its slot to the next row, whose cache moves down into it."""
    engine = BatchEngine(generator, max_batch=6, max_queue=16)
    calls = []
    real = engine.static.prefill_rows
    monkeypatch.setattr(engine.static, "prefill_rows", lambda first, windows: calls.append(
        [len(w) for w in windows]) or real(first, windows))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20], [21, 22, 23], [24, 25, 26, 27]]
    lengths = [12, 1, 9, 20, 1, 15]  # the rows asking for 1 token end at their prefill and free their slots
    requests = [(p, SamplingParams(max_new_tokens=n, temperature=0.0 if i % 2 else 0.9, seed=i))
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    alone = [generator.generate(prompt, params) for prompt, params in requests]
    gate, get = threading.Event(), engine._queue.get
    monkeypatch.setattr(engine._queue, "get", lambda *a, **k: gate.wait(10) and get(*a, **k))  # holds the worker
    events = Collector()
    with engine:
        for i, (prompt, params) in enumerate(requests):
            engine.submit(prompt, params, on_event=events.callback(str(i)))
        gate.set()  # the worker finds all six queued
        events.wait()
    assert [events.tokens[str(i)] for i in range(6)] == alone
    assert sorted(calls[0]) == [3, 3, 4, 4, 4, 5]  # one call for all six


def test_cancelled_and_expired_requests_end_and_the_rest_go_on(generator):
    events = Collector()
    long = SamplingParams(max_new_tokens=10**7, temperature=0.0)  # runs until cancelled or out of time
    with BatchEngine(generator, max_batch=2, max_queue=4) as engine:
        cancelled = engine.submit([1, 2], long, on_event=events.callback("cancelled"))
        engine.submit([1, 2], long, deadline=time.monotonic() + 0.3, on_event=events.callback("deadline"))
        engine.submit([3], long, deadline=time.monotonic() - 1, on_event=events.callback("late"))  # waits, expired
        engine.submit([4], SamplingParams(max_new_tokens=10, temperature=0.0), on_event=events.callback("short"))
        time.sleep(0.2)
        cancelled.cancel()
        events.wait()
        idle = time.monotonic() + 5  # the final events come just before the rows leave the batch
        while engine.stats()["active"] and time.monotonic() < idle:
            time.sleep(0.01)
        assert engine.stats()["active"] == 0 and engine.stats()["queued"] == 0
    reasons = {name: e.finish_reason for name, e in events.finish.items()}
    assert reasons == {"cancelled": "cancelled", "deadline": "timeout", "late": "timeout", "short": "length"}
    assert len(events.tokens["cancelled"]) > 0 and events.tokens["late"] == []
    assert len(events.tokens["short"]) == 10


def test_the_queue_is_bounded_and_a_stopped_engine_refuses_work(generator):
    engine = BatchEngine(generator, max_batch=1, max_queue=2)
    with pytest.raises(EngineStopped):
        engine.submit([1], SamplingParams(), on_event=lambda e: None)
    events = Collector()
    long = SamplingParams(max_new_tokens=5000, temperature=0.0)
    with engine:
        engine.submit([1], long, on_event=events.callback("running"))
        deadline = time.monotonic() + 10
        while engine.stats()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit([1], long, on_event=events.callback("queued 1"))
        engine.submit([1], long, on_event=events.callback("queued 2"))
        with pytest.raises(EngineFull, match="2 requests are waiting"):
            engine.submit([1], long, on_event=lambda e: None)
        with pytest.raises(ValueError, match="prompt_ids"):
            engine.submit([generator.vocab_size], long, on_event=lambda e: None)
    events.wait(10)  # stopping the engine ends what was running or waiting
    assert {e.finish_reason for e in events.finish.values()} == {"cancelled"}


def test_a_failing_decoder_call_fails_its_requests_and_the_engine_goes_on(generator, static, monkeypatch):
    engine = BatchEngine(generator, max_batch=2, static_cache=static)
    decoder, method = (engine.static, "step") if static else (generator, "forward")
    real = getattr(decoder, method)
    failures = iter([True])

    def flaky(*args, **kwargs):  # the first decode step (not a prefill) fails
        if (static or kwargs.get("past_mask") is not None) and next(failures, False):
            raise RuntimeError("the decoder broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, method, flaky)
    events = Collector()
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    with engine:
        engine.submit([1, 2, 3], params, on_event=events.callback("first"))
        events.wait()
        engine.submit([1, 2, 3], params, on_event=events.callback("second"))
        events.wait()
    assert events.finish["first"].finish_reason == "error"
    assert events.finish["first"].error == "RuntimeError: the decoder broke"
    assert events.finish["second"].finish_reason == "length" and len(events.tokens["second"]) == 5


def test_the_batch_cache_shrinks_back_when_rows_leave(generator):
    """Memory stays flat: a long row's cache columns are cut off once only short rows remain."""
    from llm.inference.batching import _Batch, _Row
    from llm.inference.decoding import DecodeState

    batch = _Batch(generator)
    for length in (20, 3):
        window = list(range(1, length + 2))
        _, cache = generator.forward(np.array([window[:-1]]))
        batch.joiners.append((_Row(None, None, DecodeState(window, SamplingParams(), CONTEXT)), cache))
    batch.join()
    assert batch.mask.shape == (2, 20) and batch.mask.sum(axis=1).tolist() == [20, 3]
    batch.step()
    assert batch.cache[0].shape[2] == 21
    batch.keep([False, True])
    assert batch.mask.shape == (1, 4) and batch.mask.all() and batch.cache[0].shape == (1, 2, 4, 16)


def test_the_static_cache_is_allocated_once_and_rows_that_leave_are_replaced_by_the_last(generator):
    """Memory stays flat with the static-cache graph: its buffers are made once, [slots, H, L, D], and a step
    writes into them in place; a row that leaves gets the last row's cache copied into its slot."""
    from llm.inference.batching import _Row, _StaticBatch
    from llm.inference.decoding import DecodeState

    engine = BatchEngine(generator, max_batch=3)
    decoder = engine.static
    buffers = [b.__array_interface__["data"][0] for b in decoder.buffers]
    assert decoder.buffers[0].shape == (3, generator.n_kv_head, CONTEXT, generator.head_dim)
    batch = _StaticBatch(decoder)
    windows = [list(range(1, n + 2)) for n in (5, 12, 3)]
    logits, slots = batch.prefill([window[:-1] for window in windows])  # all three in one call
    for window, slot in zip(windows, slots, strict=True):
        batch.add(_Row(None, None, DecodeState(window, SamplingParams(), CONTEXT)), slot)
    batch.join()
    alone = [generator.forward(np.array([w]))[0][0, -1] for w in windows]
    first = batch.step()
    np.testing.assert_allclose(first, np.stack(alone), atol=1e-4)
    last_row = decoder.buffers[0][2, :, :3].copy()
    batch.keep([False, True, True])  # slot 0 leaves; the row in slot 2 moves there
    assert [len(r.window) for r in batch.rows] == [4, 13]
    np.testing.assert_array_equal(decoder.buffers[0][0, :, :3], last_row)
    for row, token in zip(batch.rows, (7, 8), strict=True):
        row.window.append(token)
    moved = [generator.forward(np.array([r.window]))[0][0, -1] for r in batch.rows]
    np.testing.assert_allclose(batch.step(), np.stack(moved), atol=1e-4)
    np.testing.assert_allclose(first, np.stack(alone), atol=1e-4)  # a step's logits stay the caller's
    assert [b.__array_interface__["data"][0] for b in decoder.buffers] == buffers  # never re-allocated


@pytest.mark.pipeline
def test_the_engine_benchmark_reports_its_cpu_time_per_token(generator):
    """``bench/serve_engine.py`` (the engine alone, in thread CPU time) runs on an export folder."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "serve_engine.py"
    out = subprocess.run([sys.executable, str(bench), "--model", str(generator.export_dir), "--batches", "1,3",
                          "--max-tokens", "8", "--tokens", "48", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "3"] and all(float(row[1]) > float(row[4]) > 0 for row in rows)


def test_the_engine_and_its_callers_need_no_torch():
    import subprocess
    import sys

    code = ("import sys; import llm.inference.batching; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=60)


def test_a_crashed_worker_stops_the_engine_instead_of_queueing_work_nobody_decodes(generator, monkeypatch):
    from llm.inference import batching

    def broken(self):
        raise RuntimeError("a bug in the batch")

    monkeypatch.setattr(batching._Batch, "join", broken)
    monkeypatch.setattr(batching._StaticBatch, "join", broken)
    events = Collector()
    engine = BatchEngine(generator).start()
    engine.submit([1, 2], SamplingParams(max_new_tokens=5), on_event=events.callback("first"))
    events.wait(10)
    assert events.finish["first"].finish_reason == "cancelled"
    with pytest.raises(EngineStopped):
        engine.submit([1, 2], SamplingParams(max_new_tokens=5), on_event=lambda e: None)
    engine.stop()


# ---------------------------------------------------------------------------------------------- the engine process


class _Pipe:
    def __init__(self):
        self.sent: list[list[tuple]] = []

    def send(self, batch: list[tuple]) -> None:
        self.sent.append(batch)


def test_the_engine_process_sends_a_first_token_and_an_end_at_once_and_holds_the_rest_for_flush_s():
    from llm.inference.engine_process import _Outbox

    pipe = _Pipe()
    outbox = _Outbox(pipe, flush_s=60.0)
    first, second = outbox.sink(7), outbox.sink(8)
    first(Event(token_id=1))
    outbox.flush()  # a first token: sent after its step, for the time to first token
    first(Event(token_id=2))
    second(Event(token_id=5))  # the other request's first token: it takes the one held along
    outbox.flush()
    first(Event(token_id=3))
    outbox.flush()  # neither first nor last, within flush_s: held
    first(Event(finish_reason="length"))
    outbox.flush()  # an end: sent at once, with what was held
    assert pipe.sent == [[(7, 1, None, None)], [(7, 2, None, None), (8, 5, None, None)],
                         [(7, 3, None, None), (7, None, "length", None)]]

    every_step = _Pipe()
    outbox = _Outbox(every_step, flush_s=0.0)  # llm serve --stream-interval 0: each token alone
    on_event = outbox.sink(1)
    for token in (4, 5, 6):
        on_event(Event(token_id=token))
        outbox.flush()
    assert every_step.sent == [[(1, 4, None, None)], [(1, 5, None, None)], [(1, 6, None, None)]]


def test_every_engine_kind_is_an_engine_with_the_one_lifecycle(generator):
    """``BatchEngine``, ``EngineProcess`` and ``EnginePool`` offer every member of the ``Engine`` interface the
    server and the pyfunc are typed against, and take the lifecycle (``start``, the context manager, ``health``,
    ``generate``) from ``EngineBase`` instead of each writing its own."""
    from llm.inference.engine import Engine, EngineBase
    from llm.inference.engine_process import EnginePool, EngineProcess

    members = [name for name in vars(Engine) if not name.startswith("_") or name in ("__enter__", "__exit__")]
    members += list(Engine.__annotations__)
    assert {"start", "stop", "health", "stats", "submit", "generate", "running", "tokenizer"} <= set(members)
    engine = BatchEngine(generator, max_batch=2)
    assert [name for name in members if not hasattr(engine, name)] == []
    for kind in (BatchEngine, EngineProcess, EnginePool):
        assert issubclass(kind, EngineBase)
        assert [name for name in ("start", "__enter__", "__exit__", "health", "generate") if name in vars(kind)] == []
    assert engine.health() == (False, [])  # not started
    with engine:
        assert engine.health() == (True, [])
        [(tokens, final)] = engine.generate([([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0))])
    assert engine.health() == (False, [])
    assert tokens == generator.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert final.finish_reason == "length"
