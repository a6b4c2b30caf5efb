"""Training throughput of our GPT and of Hugging Face's GPT2LMHeadModel of the same shape, side by side.

Both models run the same loop (AdamW, random token batches, forward + backward + step, optional bf16
autocast and torch.compile) so the only difference is the model code. For each we report tokens/s and
MFU (model FLOPs utilisation):

    flops_per_token = 6 * N + 12 * n_layer * n_head * head_dim * T
    MFU             = flops_per_token * tokens_per_second / peak_flops

where N counts the parameters (tied embeddings once), the first term is the matmul work of the forward
and backward passes (2 + 4 FLOPs per parameter per token) and the second the attention scores and
weighted sums (PaLM, appendix B). peak_flops is the GPU's dense bf16 data-sheet figure, or on a CPU the
measured best float32 1024x1024 matmul rate (see llm.training.device.peak_flops).

Usage:
    python bench/train_throughput.py --preset small            # CPU-sized
    python bench/train_throughput.py --preset gpt2 --compile   # GPT-2 124M shape, T=1024, on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.config import ModelConfig  # noqa: E402
from llm.model.gpt import GPT  # noqa: E402
from llm.training.device import autocast, peak_flops, select_device, select_dtype, synchronize  # noqa: E402

PRESETS = {
    "small": dict(n_layer=4, n_head=4, d_model=256, context_length=256, vocab_size=4096, batch_size=8),
    "baby": dict(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=96, batch_size=64),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context_length=1024, vocab_size=50304, batch_size=16),
}


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


def measure(
    build, cfg: ModelConfig, batch_size: int, steps: int, warmup: int, device, dtype, compile_model: bool
) -> dict:
    torch.manual_seed(0)
    model = build(cfg).to(device).train()
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run = torch.compile(model) if compile_model else model
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length), device=device)
    y = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length), device=device)
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_of(run, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median step: robust to a stray slow step
    tps = batch_size * cfg.context_length / step_s
    flops = 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.context_length
    return {"params": n_params, "step_s": step_s, "tokens_per_s": tps, "mfu": flops * tps / peak_flops(device, dtype),
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", choices=["ours", "hf"], help="run one side only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    batch_size = args.batch_size or preset.pop("batch_size")
    preset.pop("batch_size", None)
    # GPT-2's architecture: learned positions, GELU, LayerNorm with biases, tied embeddings
    cfg = ModelConfig(position="learned", mlp="gelu", norm="layernorm", bias=True, tie_weights=True, **preset)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    results = {}
    for name, build in (("ours", ours), ("hf GPT2LMHeadModel", hugging_face)):
        if args.only and not name.startswith(args.only):
            continue
        results[name] = measure(build, cfg, batch_size, args.steps, args.warmup, device, dtype, args.compile)
    header = (f"preset={args.preset} layers={cfg.n_layer} heads={cfg.n_head} d={cfg.d_model} T={cfg.context_length} "
              f"batch={batch_size} device={device} dtype={str(dtype).removeprefix('torch.')} compile={args.compile} "
              f"threads={torch.get_num_threads()} peak={peak_flops(device, dtype) / 1e12:.3f} TFLOP/s")
    print(header)
    print(f"{'model':<22}{'params':>14}{'step (ms)':>12}{'tokens/s':>12}{'MFU':>8}")
    for name, r in results.items():
        print(f"{name:<22}{r['params']:>14,}{r['step_s'] * 1e3:>12.1f}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
