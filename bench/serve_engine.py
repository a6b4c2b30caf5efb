"""What ``llm serve``'s engine costs per token, without HTTP: CPU time of the ``BatchEngine`` worker thread.

``bench/serve.py`` measures the server end to end in wall-clock time, which other work on the machine distorts
(on a shared 2-core box, by tens of percent from one run to the next). This measures the engine alone in thread
CPU time, which that work barely changes, so that a change to the engine can be compared on a busy machine.

For each batch size B (1 and 8 by default), B requests are submitted at once, as ``bench/serve.py``'s clients
send them (a chat prompt, ``--max-tokens`` new tokens (64) with ``min_new_tokens`` as many, temperature 0.8,
a seed each), and the engine decodes them together; rounds repeat until about ``--tokens`` tokens. Reported
per batch size, the best and the median of ``--repeats`` runs:

    engine us/token     the worker thread's CPU time per new token (decoder calls, sampling, bookkeeping)
    decoder us/token    of which inside the decoder's calls (prefills and steps: onnxruntime and its bindings)
    steps               decoder steps by batch size (prefills not counted)

Usage (after ``dvc repro`` or ``make demo``)::

    python bench/serve_engine.py                          # models:/gpt/Production, int8, batch 1 and 8
    python bench/serve_engine.py --model artifacts/onnx --batches 1,4,8 --fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.api_server import resolve_export  # noqa: E402
from llm.data.chat_template import encode_chat, generation_stop_ids  # noqa: E402
from llm.inference.batching import BatchEngine  # noqa: E402
from llm.inference.decoding import SamplingParams  # noqa: E402
from llm.inference.engine_process import load_generator  # noqa: E402

QUESTIONS = ["What news from Verona?", "Who comes here?", "Tell me of the king.", "Where is my lord?",
             "What say you to this?", "How fares the queen?", "Why do you weep?", "What is your name, good sir?"]


class CpuClock:
    """Thread CPU time spent inside the wrapped callables (called on the engine's thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, call: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return timed


def measure(engine: BatchEngine, batch: int, requests: Callable[[int], list], tokens: int) -> tuple[float, float]:
    """Engine and decoder CPU microseconds per new token for rounds of ``batch`` requests decoded together."""
    decoder = CpuClock()
    static = engine.static
    if static is not None:
        static.step, static.prefill_rows = decoder.wrap(static.step), decoder.wrap(static.prefill_rows)
    else:
        engine.generator.forward = decoder.wrap(engine.generator.forward)
    engine.generate(requests(batch))  # warm up: the bindings of this batch size, the caches
    clock = time.pthread_getcpuclockid(engine._worker.ident)
    decoder.seconds, start, produced = 0.0, time.clock_gettime(clock), 0
    while produced < tokens:
        produced += sum(len(ids) for ids, _ in engine.generate(requests(batch)))
    engine_s = time.clock_gettime(clock) - start
    return engine_s / produced * 1e6, decoder.seconds / produced * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--model", default="models:/gpt/Production", help="an export folder or a models:/ URI")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=3072, help="new tokens per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="the fp32 graph instead of the int8 one")
    args = parser.parse_args()
    generator = load_generator(resolve_export(args.model), fp32=args.fp32, threads=1)
    tokenizer = generator.tokenizer
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    stop_ids = tuple(generation_stop_ids(tokenizer))
    seeds = iter(range(10**9))

    def requests(n: int) -> list[tuple[list[int], SamplingParams]]:
        return [(prompts[i % len(prompts)],
                 SamplingParams(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, temperature=0.8,
                                seed=next(seeds), stop_ids=stop_ids))
                for i in range(n)]

    static = generator.static_cache_decoder(1)
    graph = (static or generator).model_path.name
    print(f"{graph}, onnxruntime 1 thread; engine thread CPU per new token (best / median of {args.repeats})")
    print(f"{'batch':>5} {'engine us/token':>17} {'decoder us/token':>17}  steps")
    for batch in (int(b) for b in args.batches.split(",")):
        runs = []
        for _ in range(args.repeats):
            engine = BatchEngine(generator, max_batch=batch).start()  # fresh: its own buffers and step counts
            try:
                runs.append(measure(engine, batch, requests, args.tokens))
            finally:
                engine.stop()
        engine_us, decoder_us = zip(*runs, strict=True)
        print(f"{batch:>5} {min(engine_us):>8.0f} / {statistics.median(engine_us):<6.0f} "
              f"{min(decoder_us):>8.0f} / {statistics.median(decoder_us):<6.0f}  {dict(engine.batch_sizes)}")


if __name__ == "__main__":
    main()
