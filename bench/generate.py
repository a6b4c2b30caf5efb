"""Generation speed on this CPU: PyTorch (with and without KV cache), ONNX Runtime, and Hugging Face GPT-2.

For each model shape and context length, one random prompt of that many tokens is continued greedily by:

    torch (no cache)   llm.inference.generate.stream_generate(use_cache=False): the whole window recomputed per token
    torch (cache)      llm.inference.generate.stream_generate: prefill once, then one token per step with the KV cache
    onnxruntime        llm.inference.onnx_runtime.OnnxGenerator (fp32) on the export's static-cache graph
                       (model.static.onnx: cache buffers allocated once, written in place by onnxruntime)
    ort portable       the same on the portable graph model.onnx (its present cache is past + new: a new
                       array every step), what other runtimes run
    onnxruntime int8   the static-cache graph quantized (model.static.int8.onnx), with --quantize
    hf generate        transformers GPT2LMHeadModel of the same shape, generate(use_cache=True, greedy,
                       min_new_tokens=max_new_tokens so every run has the same length)
    weights read       no decoder: one thread reading every fp32 weight matrix once (a GEMV x @ W per matrix,
                       the fastest read of them we found), the bound on any fp32 decoder's tokens/s on this
                       machine; its "decode" is 1 / (time of that read)

Batch-1 decoding reads every weight, and the cache, once per token, so at the large shape (155 MB of fp32
weight matrices) it is bound by the memory bandwidth one core gets: the ``weights read`` row measures that
bandwidth in the same run, the table gives the GB/s of weights each backend's tokens/s amounts to, and the
summary the most tokens/s that bandwidth allows when a token reads the weights and the cache at that context.

All weights are random (speed does not depend on them). Our models use GPT-2's layout (learned positions,
GELU, LayerNorm, biases, tied embeddings) so the comparison with Hugging Face is like for like.
``prefill`` is the time to the first new token (the prompt's forward pass plus setup); ``decode`` is the
rate of the tokens after it. Each figure is the best of ``--repeats`` runs, the backends interleaved, so
load from other processes on a shared machine distorts it least. Every backend runs on ``--threads`` threads
(default 1). ``--clock cpu`` times by the CPU time of the one thread every backend then computes on, so other
jobs that take the core away do not count (the memory bandwidth they take still does): on a busy machine it
gives what an idle one would show; on an idle one both clocks agree.

With a trained checkpoint (``--quality-checkpoint``, default ``artifacts/pretrain``) and its token files
(``--quality-tokens``), the int8 model's cost in quality is measured too: mean loss and bits per byte of the
fp32 and int8 ONNX models on validation windows.

Usage:
    python bench/generate.py                         # the demo shape, 4x256 and a ~10x larger one, contexts 64/256/512
    python bench/generate.py --shapes demo --contexts 64 --repeats 1 --json bench.json
    python bench/generate.py --clock cpu             # on a shared machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.config import ModelConfig
from llm.data.tokenizer import ByteTokenizer
from llm.inference.decoding import SamplingParams
from llm.inference.export import INT8_FILE, check_parity, export_onnx
from llm.inference.generate import stream_generate
from llm.inference.onnx_runtime import OnnxGenerator
from llm.model.checkpoint import save_checkpoint
from llm.model.gpt import GPT

SHAPES = {
    "demo": {"n_layer": 4, "n_head": 4, "d_model": 128},  # params/model.yaml
    "d256": {"n_layer": 4, "n_head": 4, "d_model": 256},  # the demo's shape before bench/recipe.py's defaults
    "large": {"n_layer": 12, "n_head": 8, "d_model": 512},  # about 10x the parameters
}


def model_config(shape: str, vocab_size: int, context_length: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, context_length=context_length, position="learned", mlp="gelu", norm="layernorm",
        bias=True, tie_weights=True, **SHAPES[shape],
    )


def hugging_face_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    hf._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf).eval()


def time_stream(tokens: Iterable[int], clock: Callable[[], float]) -> tuple[float, float, int]:
    """(seconds to the first token, tokens/s after it, tokens) of a token stream, consumed here."""
    start = clock()
    stamps = [clock() for _ in tokens]
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return stamps[0] - start, decode, len(stamps)


def hf_token_times(model, prompt: list[int], n: int, clock: Callable[[], float]) -> list[float]:
    """Run ``generate``; return the time each new token reached the streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.stamps.append(clock())
            self.prompt_seen = True  # the first call carries the prompt

        def end(self):
            pass

    streamer = Stamps()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, use_cache=True, streamer=streamer,
        )
    assert out.shape[1] == len(prompt) + n, out.shape
    return streamer.stamps


def time_hf(model, prompt: list[int], n: int, clock: Callable[[], float]) -> tuple[float, float, int]:
    start = clock()
    stamps = hf_token_times(model, prompt, n, clock)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return stamps[0] - start, decode, len(stamps)


def weight_matrices(model: GPT) -> list[torch.Tensor]:
    """The fp32 matrices a decoder step multiplies by (a tied token table once, as the LM head), each laid out
    [in, out] so that x @ W streams it row by row; the learned position table is a lookup, not a product."""
    named = model.named_parameters()  # a tied matrix once
    return [p.detach().t().contiguous() for name, p in named if p.dim() == 2 and name != "wpe.weight"]


def time_weight_read(matrices: list[torch.Tensor], clock: Callable[[], float],
                     passes: int = 8) -> tuple[float, float, int]:
    """(0, reads/s, 0): the best of ``passes`` reads of every matrix by a GEMV, on torch's threads."""
    xs = [torch.ones(1, w.size(0)) for w in matrices]
    best = math.inf
    with torch.inference_mode():
        for _ in range(passes):
            start = clock()
            for x, w in zip(xs, matrices, strict=True):
                x @ w
            best = min(best, clock() - start)
    return 0.0, 1.0 / best, 0


def runners(model: GPT, hf, export_dir: Path, quantize: bool, threads: int, new_tokens: int, nocache_tokens: int,
            clock: Callable[[], float]):
    """Backend name -> function(prompt) -> (prefill s, decode tokens/s, tokens), timed by ``clock``."""
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    greedy_nocache = SamplingParams(max_new_tokens=nocache_tokens, temperature=0.0)
    ort_params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    fp32 = OnnxGenerator(export_dir, intra_op_num_threads=threads)
    portable = OnnxGenerator(export_dir, intra_op_num_threads=threads, static_cache=False)
    table: dict[str, Callable] = {
        "torch (no cache)": lambda p: time_stream(stream_generate(model, p, greedy_nocache, use_cache=False), clock),
        "torch (cache)": lambda p: time_stream(stream_generate(model, p, greedy), clock),
        "onnxruntime": lambda p: time_stream(fp32.stream_generate(p, ort_params), clock),
        "ort portable": lambda p: time_stream(portable.stream_generate(p, ort_params), clock),
    }
    if quantize:
        int8 = OnnxGenerator(export_dir, int8=True, intra_op_num_threads=threads)
        table["onnxruntime int8"] = lambda p: time_stream(int8.stream_generate(p, ort_params), clock)
    table["hf generate"] = lambda p: time_hf(hf, p, new_tokens, clock)
    matrices = weight_matrices(model)
    table["weights read"] = lambda p: time_weight_read(matrices, clock)
    return table


def bench_shape(shape: str, args, workdir: Path) -> tuple[list[dict], dict]:
    cfg = model_config(shape, args.vocab, args.model_context)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    checkpoint = save_checkpoint(workdir / shape / "checkpoint", model, cfg, ByteTokenizer())
    start = time.perf_counter()
    export_onnx(checkpoint, workdir / shape / "onnx", opset=args.opset, quantize=args.quantize, verify=False)
    export_s = time.perf_counter() - start
    parity = check_parity(checkpoint, workdir / shape / "onnx", model=model, n_prompts=2, new_tokens=16)
    weight_bytes = sum(4 * w.numel() for w in weight_matrices(model))
    info = {
        "shape": shape, **SHAPES[shape], "vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
        "params": model.num_parameters(), "weight_matrix_bytes": weight_bytes, "new_tokens": args.new_tokens,
        "export_s": round(export_s, 1),
        "parity_max_abs_diff": parity["max_abs_diff"], "parity_passed": parity["passed"],
    }
    print(f"{shape}: {model.summary()}; exported in {export_s:.1f}s, parity max |diff| "
          f"{parity['max_abs_diff']:.2g} ({'ok' if parity['passed'] else 'FAILED'})", flush=True)
    hf = hugging_face_model(cfg)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    table = runners(model, hf, workdir / shape / "onnx", args.quantize, args.threads, args.new_tokens,
                    args.nocache_tokens, clock)
    rng = np.random.default_rng(0)
    warm = [1, *rng.integers(3, cfg.vocab_size, 7).tolist()]
    for run in table.values():  # first calls allocate and (for onnxruntime) plan memory
        run(warm)
    rows = []
    for context in args.contexts:
        prompt = [1, *rng.integers(3, cfg.vocab_size, context - 1).tolist()]
        best: dict[str, list[float]] = {name: [math.inf, 0.0, 0] for name in table}
        for _ in range(args.repeats):
            for name, run in table.items():
                prefill, decode, n = run(prompt)
                best[name] = [min(best[name][0], prefill), max(best[name][1], decode), n]
        hf_decode = best["hf generate"][1]
        for name in table:
            prefill, decode, n = best[name]
            rows.append({
                "shape": shape, "params": model.num_parameters(), "context": context, "backend": name,
                "prefill_ms": None if name == "weights read" else prefill * 1e3, "decode_tok_s": decode, "tokens": n,
                "decode_vs_hf": decode / hf_decode,
                "weights_gb_s": None if "int8" in name else decode * weight_bytes / 1e9,
            })
            print(f"  context {context:4d}  {name:17s} prefill {prefill * 1e3:8.1f} ms   decode {decode:8.1f} tok/s"
                  f"   ({decode * weight_bytes / 1e9:.1f} GB/s of fp32 weights)", flush=True)
    return rows, info


@torch.inference_mode()
def quantization_quality(checkpoint: Path, tokens_dir: Path, workdir: Path, windows: int, threads: int) -> dict:
    """Mean next-token loss (nats) and bits per byte of fp32 and int8 ONNX models on validation windows."""
    from llm.data.tokens import TokenFile, bits_per_byte
    from llm.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)[0]
    export_dir = workdir / "quality" / "onnx"
    summary = export_onnx(checkpoint, export_dir, quantize=True)  # a trained model's parity, at full size
    val = TokenFile(tokens_dir, "val")
    L = model.config.context_length
    last = val.n_tokens - L - 1
    offsets = [round(i * last / max(1, windows - 1)) for i in range(windows)]
    rows = np.stack([val.data[o : o + L + 1].astype(np.int64) for o in offsets])
    x, y = rows[:, :-1], rows[:, 1:]

    def mean_loss(logits: np.ndarray) -> float:
        logits = logits.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
        return float((logz - picked).mean())

    result = {
        "checkpoint": str(checkpoint), "windows": windows, "window_tokens": L, "tokens_per_byte": val.tokens_per_byte,
        "parity_max_abs_diff": summary["parity"]["max_abs_diff"],
        "parity_greedy_identical": summary["parity"]["greedy"]["identical"],
    }
    batches = [slice(i, i + 8) for i in range(0, windows, 8)]
    torch_logits = np.concatenate([model(torch.from_numpy(x[b])).logits.numpy() for b in batches])
    result["torch_loss"] = mean_loss(torch_logits)
    for name, file in [("fp32", "model.onnx"), ("int8", INT8_FILE)]:
        generator = OnnxGenerator(export_dir, model_file=file, intra_op_num_threads=threads)
        logits = np.concatenate([generator.forward(x[b])[0] for b in batches])
        loss = mean_loss(logits)
        result[f"{name}_loss"] = loss
        result[f"{name}_bpb"] = bits_per_byte(loss, val.tokens_per_byte)
        result[f"{name}_bytes"] = (export_dir / file).stat().st_size
        if name == "int8":
            result["int8_top1_agreement"] = float((logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    result["bpb_cost"] = result["int8_bpb"] - result["fp32_bpb"]
    return result


def print_table(rows: list[dict], models: list[dict]) -> None:
    print()
    print("| model | params | context | backend | prefill ms | decode tok/s | decode vs HF | fp32 weights GB/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        prefill = "" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"
        gb_s = "" if r["weights_gb_s"] is None else f"{r['weights_gb_s']:.1f}"
        print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['context']} | {r['backend']} | {prefill} "
              f"| {r['decode_tok_s']:.1f} | {r['decode_vs_hf']:.2f}x | {gb_s} |")
    print()
    for info in models:  # how far each shape's fp32 ONNX decoding is from 2x HF, and from the bandwidth bound
        shape_rows = {(r["context"], r["backend"]): r for r in rows if r["shape"] == info["shape"]}
        for context in sorted({c for c, _ in shape_rows}):
            ort, hf, read = (shape_rows[(context, b)] for b in ("onnxruntime", "hf generate", "weights read"))
            weights_mb = info["weight_matrix_bytes"] / 1e6
            cache_mb = 2 * info["n_layer"] * info["d_model"] * 4 * (context + info["new_tokens"] / 2) / 1e6
            bound = read["weights_gb_s"] * 1e3 / (weights_mb + cache_mb)  # tok/s
            need = 2 * hf["decode_tok_s"] * (weights_mb + cache_mb) / 1e3  # GB/s
            print(f"{info['shape']} context {context}: onnxruntime {ort['decode_tok_s']:.1f} tok/s = "
                  f"{ort['decode_vs_hf']:.2f}x HF. A token reads {weights_mb:.1f} MB of weights + {cache_mb:.1f} MB "
                  f"of cache; at the {read['weights_gb_s']:.1f} GB/s one thread reads here that allows at most "
                  f"{bound:.1f} tok/s = {bound / hf['decode_tok_s']:.2f}x HF; 2x HF would need {need:.1f} GB/s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[64, 256, 512], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--nocache-tokens", type=int, default=8, help="tokens per run without a cache (slow)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best one is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and onnxruntime threads (1: batch-1 decoding is latency-bound, and spinning "
                             "thread pools on a shared machine make multi-threaded figures erratic)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time by this thread's CPU time, which another job taking the core does not "
                             "inflate (with --threads 1 every backend computes on this thread; the memory "
                             "bandwidth other jobs take still counts)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--model-context", type=int, default=1024, help="context_length of the models")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the int8 model")
    parser.add_argument("--quality-checkpoint", type=Path, default=Path("artifacts/pretrain"))
    parser.add_argument("--quality-tokens", type=Path, default=Path("artifacts/tokens"))
    parser.add_argument("--quality-windows", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if max(args.contexts) + args.new_tokens > args.model_context:
        parser.error("--contexts plus --new-tokens must fit in --model-context (no window sliding while timing)")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1: other threads' CPU time would not be counted")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {"threads": args.threads, "clock": args.clock, "cpus": os.cpu_count(),
                     "load_average_start": os.getloadavg()[0],
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "models": [], "rows": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for shape in args.shapes:
            rows, info = bench_shape(shape, args, Path(tmp))
            results["rows"] += rows
            results["models"].append(info)
        print_table(results["rows"], results["models"])
        if args.quantize and (args.quality_checkpoint / "config.json").exists():
            quality = quantization_quality(args.quality_checkpoint, args.quality_tokens, Path(tmp),
                                           args.quality_windows, args.threads)
            results["quantization_quality"] = quality
            print(f"\nint8 quality on {quality['windows']} validation windows of {quality['window_tokens']} tokens "
                  f"({quality['checkpoint']}):")
            print("| model | bytes | loss (nats) | bits per byte |")
            print("| --- | ---: | ---: | ---: |")
            print(f"| torch fp32 | | {quality['torch_loss']:.4f} | |")
            for name in ("fp32", "int8"):
                print(f"| onnx {name} | {quality[f'{name}_bytes']:,} | {quality[f'{name}_loss']:.4f} "
                      f"| {quality[f'{name}_bpb']:.4f} |")
            print(f"int8 costs {quality['bpb_cost']:+.4f} bits per byte; top-1 agreement with torch "
                  f"{quality['int8_top1_agreement']:.1%}. fp32 export parity: max |diff| "
                  f"{quality['parity_max_abs_diff']:.2g}, greedy identical {quality['parity_greedy_identical']}/20")
        elif args.quantize:
            print(f"\n(no checkpoint at {args.quality_checkpoint}: int8 quality not measured; "
                  "pass --quality-checkpoint)")
    results["load_average_end"] = os.getloadavg()[0]
    results["wall_s"] = time.perf_counter() - start
    print(f"\ndone in {results['wall_s']:.0f}s (load average {results['load_average_end']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
