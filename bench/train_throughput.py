"""Training throughput of our GPT and of Hugging Face's GPT2LMHeadModel of the same shape, side by side.

Both models run the same loop (AdamW, random token batches, forward + backward + step, optional bf16
autocast) so the only difference is the model code. With ``--compile`` each model also runs under
``torch.compile`` (inductor; on a CPU it generates C++ and builds it with the system compiler), so eager
and compiled figures of both sit in one table. For each we report tokens/s and MFU (model FLOPs utilisation):

    flops_per_token = 6 * N + 12 * n_layer * n_head * head_dim * T
    MFU             = flops_per_token * tokens_per_second / peak_flops

where N counts the parameters (tied embeddings once), the first term is the matmul work of the forward
and backward passes (2 + 4 FLOPs per parameter per token) and the second the attention scores and
weighted sums (PaLM, appendix B). peak_flops is the GPU's dense bf16 data-sheet figure, or on a CPU the
measured best float32 1024x1024 matmul rate (see llm.training.device.peak_flops).

Both models have GPT-2's architecture and math: learned positions, LayerNorm with biases, tied embeddings
and GELU's tanh form (GPT-2's ``gelu_new``; ours ``mlp: gelu_tanh``). On a shared machine the timings
move with the other jobs, so the models are timed in rounds, one step of each per round, and each figure
is the median of its steps: every model sees the same load. The load average is printed. On a CPU with
``--threads 1``, ``--clock cpu`` times by this thread's CPU time instead (the peak too), which other jobs
taking the core do not inflate.

The ``gpt2`` preset is the model section of ``params/presets/gpt2.yaml`` (the GPT-2 124M recipe) with its
micro-batch of 16. The fast paths to try on a GPU: ``--sdpa`` pins one attention kernel (flash, cuDNN,
memory-efficient, math) for both models, ``--compile-mode`` picks inductor's mode (``max-autotune`` tunes
matmul kernels and captures CUDA graphs), ``--adamw foreach`` times the unfused optimizer against the fused
default; bench/gpu_session.sh runs them in one GPU session.

Usage:
    python bench/train_throughput.py --preset nanogpt small --compile   # CPU: both shapes, eager and compiled
    python bench/train_throughput.py --preset nanogpt small --compile --threads 1 --clock cpu   # a shared CPU
    python bench/train_throughput.py --preset gpt2 --compile            # GPT-2 124M shape, T=1024, on a GPU
    python bench/train_throughput.py --preset gpt2 --compile --only ours --sdpa cudnn --compile-mode max-autotune
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.config import ModelConfig  # noqa: E402
from llm.model.gpt import GPT  # noqa: E402
from llm.training.device import (  # noqa: E402
    autocast,
    matmul_flops,
    peak_flops,
    select_device,
    select_dtype,
    synchronize,
)

PRESETS = {
    # nanoGPT's README CPU run (train_shakespeare_char on a laptop): 65 characters, 4 layers, 4 heads,
    # 128 wide, block 64, batch 12
    "nanogpt": dict(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=65, batch_size=12),
    "small": dict(n_layer=4, n_head=4, d_model=256, context_length=256, vocab_size=4096, batch_size=8),
    "baby": dict(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=96, batch_size=64),
}
ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str) -> dict:
    """The shape of the recipe ``params/presets/<name>.yaml`` and its micro-batch, as a preset of this benchmark."""
    recipe = yaml.safe_load((ROOT / "params" / "presets" / f"{name}.yaml").read_text())
    keys = ("n_layer", "n_head", "d_model", "context_length", "vocab_size")
    return {**{k: recipe["model"][k] for k in keys}, "batch_size": recipe["pretrain"]["batch_size"]}


PRESETS["gpt2"] = _recipe("gpt2")  # 12 layers, 12 heads, 768 wide, T=1024, 50,304 tokens, batch 16
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def sdpa_context(name: str):
    """Pin ``F.scaled_dot_product_attention`` to one kernel (``auto``: PyTorch's own choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def ours(cfg: ModelConfig) -> torch.nn.Module:
    return GPT(cfg)


def hugging_face(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    hf._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT) or isinstance(getattr(model, "_orig_mod", None), GPT):
        return model(x, y).loss
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


class Trainer:
    """One model, its optimizer and a fixed batch: ``step()`` runs and times one training step."""

    def __init__(self, build: Callable, cfg: ModelConfig, batch_size: int, device, dtype, compile_model: bool,
                 clock: Callable[[], float], options: argparse.Namespace):
        torch.manual_seed(0)
        self.model = build(cfg).to(device).train()
        self.params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        fused = device.type == "cuda" and options.adamw == "fused"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
        self.run = torch.compile(self.model, mode=options.compile_mode) if compile_model else self.model
        self.sdpa = options.sdpa
        self.x = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length), device=device)
        self.y = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length), device=device)
        self.device, self.dtype, self.clock = device, dtype, clock
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self, record: bool = True) -> None:
        synchronize(self.device)
        t0 = self.clock()
        with autocast(self.device, self.dtype), sdpa_context(self.sdpa):
            loss = loss_of(self.run, self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(self.device)
        if record:
            self.times.append(self.clock() - t0)
        self.loss = loss.item()


def bench_preset(name: str, args, device, dtype) -> tuple[str, list[dict]]:
    """Time every model of one preset in interleaved rounds; return its header line and one row per model."""
    preset = dict(PRESETS[name])
    batch_size = args.batch_size or preset.pop("batch_size")
    preset.pop("batch_size", None)
    # GPT-2's architecture: learned positions, GELU (tanh form), LayerNorm with biases, tied embeddings
    cfg = ModelConfig(position="learned", mlp="gelu_tanh", norm="layernorm", bias=True, tie_weights=True, **preset)
    sides = [("ours", ours), ("hf GPT2LMHeadModel", hugging_face)]
    if args.only:
        sides = [(label, build) for label, build in sides if label.startswith(args.only)]
    modes = [False, True] if args.compile else [False]
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    trainers = {f"{label}{' compiled' if compiled else ''}":
                Trainer(build, cfg, batch_size, device, dtype, compiled, clock, args)
                for compiled in modes for label, build in sides}
    for trainer in trainers.values():  # first steps compile (with --compile) and warm the allocator
        for _ in range(args.warmup):
            trainer.step(record=False)
    for _ in range(args.steps):
        for trainer in trainers.values():
            trainer.step()
    peak = matmul_flops(time.thread_time) if args.clock == "cpu" else peak_flops(device, dtype)
    flops = lambda params: 6 * params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.context_length  # noqa: E731
    rows = []
    for label, t in trainers.items():
        step_s = sorted(t.times)[len(t.times) // 2]  # median step: robust to a stray slow step
        tps = batch_size * cfg.context_length / step_s
        rows.append({"preset": name, "model": label, "params": t.params, "step_s": step_s, "tokens_per_s": tps,
                     "mfu": flops(t.params) * tps / peak, "loss": t.loss})
    for row in rows:  # each model against Hugging Face in the same mode
        hf = next((r for r in rows if r["model"].startswith("hf") and r["model"].endswith("compiled")
                   == row["model"].endswith("compiled")), None)
        row["vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
    header = (f"preset={name} layers={cfg.n_layer} heads={cfg.n_head} d={cfg.d_model} T={cfg.context_length} "
              f"vocab={cfg.vocab_size} batch={batch_size} device={device} dtype={str(dtype).removeprefix('torch.')} "
              f"threads={torch.get_num_threads()} peak={peak / 1e12:.3f} TFLOP/s steps={args.steps} clock={args.clock} "
              f"sdpa={args.sdpa} adamw={args.adamw} compile_mode={args.compile_mode}")
    return header, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["small"])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time by this thread's CPU time (CPU, --threads 1 only)")
    ap.add_argument("--only", choices=["ours", "hf"], help="run one side only")
    ap.add_argument("--sdpa", choices=["auto", *SDPA_BACKENDS], default="auto", help="pin the attention kernel")
    ap.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune",
                                               "max-autotune-no-cudagraphs"], default="default")
    ap.add_argument("--adamw", choices=["fused", "foreach"], default="fused", help="AdamW's implementation on CUDA")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock cpu times one thread on a CPU: use it with --threads 1 on a CPU")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for name in args.preset:
        header, rows = bench_preset(name, args, device, dtype)
        print(header)
        print(f"{'model':<28}{'params':>12}{'step (ms)':>12}{'tokens/s':>12}{'MFU':>8}{'vs HF':>8}")
        for r in rows:
            print(f"{r['model']:<28}{r['params']:>12,}{r['step_s'] * 1e3:>12.1f}{r['tokens_per_s']:>12,.0f}"
                  f"{r['mfu']:>8.1%}{r['vs_hf']:>7.2f}x", flush=True)
        results.append({"setup": header, "rows": rows})
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
