"""Held-out bits per byte against training time: pretraining recipes compared at the same wall-clock budget.

Recipes (each a model shape and pretraining params, trained from scratch on the tokenize stage's files):

    nanogpt    nanoGPT-style baseline: AdamW, GELU, LayerNorm with biases, learned positions, tied head,
               lr 1e-3, warmup 100, cosine to 1e-4, batch 32 x 128 tokens
    previous   this project's defaults before the recipe work: RoPE, GELU, LayerNorm, AdamW at 2e-3
    default    params/model.yaml + params/pretrain.yaml as they are now (what `make demo` trains)

Every recipe gets the same budget of training seconds (``--budget``; default 300, what the pretrain stage of
`make demo` took on a 2-core CPU before the recipe work: 500 steps at about 6,900 tokens/s). A cosine schedule
must know its length, so each recipe first times ``--calibrate`` steps of its own model and optimizer on this
machine, then trains for as many steps as fit the budget (``--steps`` fixes the count instead, for comparing
quality per step, e.g. on a GPU). Evaluation time is not training time: the clock stops while the model is
scored on the held-out data, which is the whole val split in non-overlapping windows of the model's context
(the same text for every recipe; the points along the curve score ``--curve-batches`` batches of windows
spread evenly over it, to keep evaluation short). Training time includes everything else: data, forward, backward, the
optimizer.

The table gives each recipe's steps, tokens, tokens/s and final held-out bpb; ``--json`` writes every point of
every curve and ``--plot`` draws bpb against seconds (needs matplotlib).

Usage:
    python bench/recipe.py                                   # nanogpt, previous, default; 300 s each
    python bench/recipe.py --budget 60 --recipes previous,default
    python bench/recipe.py --steps 800 --device cuda --dtype float32 --recipes default \\
        --set model.mlp=gelu --set pretrain.muon_lr=0.03 --name try1 --json try1.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.config import ModelConfig, PretrainParams, apply_overrides, load_params  # noqa: E402
from llm.data.tokenizer import load_tokenizer  # noqa: E402
from llm.data.tokens import TokenFile, bits_per_byte  # noqa: E402
from llm.model.gpt import GPT  # noqa: E402
from llm.training.device import autocast, select_device, select_dtype, synchronize  # noqa: E402
from llm.training.loop import Batch, build_optimizer, evaluate_loss, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (model overrides, pretrain overrides) on top of the class defaults; "default" reads params/ instead
RECIPES: dict[str, tuple[dict, dict]] = {
    "nanogpt": (
        dict(context_length=128, n_layer=4, n_head=4, d_model=256, position="learned", mlp="gelu", norm="layernorm",
             bias=True, tie_weights=True),
        dict(optimizer="adamw", batch_size=32, learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=100,
             weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0),
    ),
    "previous": (
        dict(context_length=128, n_layer=4, n_head=4, d_model=256, position="rope", mlp="gelu", norm="layernorm",
             qk_norm=False, tie_weights=True, bias=False),
        dict(optimizer="adamw", batch_size=32, learning_rate=2e-3, min_lr_ratio=0.1, warmup_steps=50,
             weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0),
    ),
}


class HeldOut:
    """Random windows of the train split; the whole val split for evaluation, timed so the clock can skip it."""

    def __init__(self, tokens_dir: Path, batch_size: int, context_length: int, curve_batches: int = 0):
        self.train, self.val = TokenFile(tokens_dir, "train"), TokenFile(tokens_dir, "val")
        self.batch_size, self.block, self.curve_batches = batch_size, context_length, curve_batches
        self.tokens_per_byte = self.val.tokens_per_byte
        self.eval_seconds = 0.0

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self.train.random_batch(self.batch_size, self.block, generator)

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """Batches of 64 windows: ``max_batches`` of them spread evenly over the val split (the curve's points;
        default ``curve_batches``), or with 0 all of it."""
        start = time.perf_counter()
        yield from self.val.eval_batches(64, self.block, self.curve_batches if max_batches is None else max_batches)
        self.eval_seconds += time.perf_counter() - start


def recipe_configs(name: str, sets: list[str], params_dir: Path) -> tuple[ModelConfig, PretrainParams]:
    """The model config and pretraining params of recipe ``name`` with ``sets`` (``model.KEY=VALUE`` or
    ``pretrain.KEY=VALUE``, the value read as YAML) applied. Raises ValueError for an unknown recipe or set."""
    if name == "default":
        model_data = yaml.safe_load((params_dir / "model.yaml").read_text()) or {}
        pretrain_data = yaml.safe_load((params_dir / "pretrain.yaml").read_text()) or {}
    elif name in RECIPES:
        model_data, pretrain_data = (dict(d) for d in RECIPES[name])
    else:
        raise ValueError(f"unknown recipe {name!r}; choose from default, {', '.join(RECIPES)}")
    overrides: dict[str, dict] = {"model": {}, "pretrain": {}}
    for item in sets:
        key, sep, value = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in overrides or not field:
            raise ValueError(f"--set {item!r}: write model.KEY=VALUE or pretrain.KEY=VALUE")
        overrides[section][field] = yaml.safe_load(value)
    model = load_params(ModelConfig, None, apply_overrides(model_data, overrides["model"], "model"))
    pretrain = load_params(PretrainParams, None, apply_overrides(pretrain_data, overrides["pretrain"], "pretrain"))
    return model, pretrain


def seconds_per_step(model_config: ModelConfig, params: PretrainParams, data: HeldOut, steps: int,
                     device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds of an optimizer step of this recipe on this machine, after two warm-up steps."""
    model = GPT(model_config).to(device).train()
    optimizer = build_optimizer(model, params, device)
    run = torch.compile(model) if params.compile else model
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        synchronize(device)
        start = time.perf_counter()
        x, y = (t.to(device) for t in data.train_batch(generator))
        with autocast(device, dtype):
            loss = run(x, y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_recipe(label: str, model_config: ModelConfig, params: PretrainParams, args: argparse.Namespace) -> dict:
    """Train one recipe for the budget (or ``--steps``); returns its settings and its curve of held-out bpb."""
    tokenizer = load_tokenizer(args.tokenizer)
    model_config = model_config.model_copy(update={"vocab_size": tokenizer.vocab_size})
    data = HeldOut(args.tokens, params.batch_size, model_config.context_length, args.curve_batches)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    if args.steps:
        steps, step_s = args.steps, None
    else:
        step_s = seconds_per_step(model_config, params, data, args.calibrate, device, dtype)
        steps = max(1, int(args.budget / step_s))
    params = params.model_copy(update={
        "max_steps": steps, "warmup_steps": min(params.warmup_steps, steps // 2),
        "eval_interval": max(1, steps // args.evals), "checkpoint_interval": steps, "log_interval": steps,
        "device": args.device, "dtype": args.dtype, "progress": False,
    })
    curve: list[dict] = []
    torch.manual_seed(params.seed)
    model = GPT(model_config)
    start = time.perf_counter()

    def record(step: int, metrics: dict[str, float]) -> None:
        if "val/loss" in metrics:
            seconds = time.perf_counter() - start - data.eval_seconds
            curve.append({"step": step, "seconds": round(seconds, 3), "tokens": step * params.batch_size *
                          model_config.context_length, "val_loss": metrics["val/loss"], "val_bpb": metrics["val/bpb"]})
            print(f"  {label:<12} step {step:>6}  {seconds:7.1f} s  held-out bpb {metrics['val/bpb']:.4f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="recipe-") as out_dir:
        train(model, tokenizer, data, params, out_dir, resume=False, callbacks=[record])
    last = curve[-1]
    val_loss = evaluate_loss(model, data.val_batches(0), device, dtype)  # the whole val split, for the table
    return {"recipe": label, "model": model_config.model_dump(), "pretrain": params.model_dump(),
            "parameters": model.num_parameters(), "calibrated_step_s": step_s, "steps": steps,
            "seconds": last["seconds"], "tokens": last["tokens"], "tokens_per_s": last["tokens"] / last["seconds"],
            "val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, data.tokens_per_byte), "curve": curve}


def plot(results: list[dict], path: Path, budget: float) -> None:
    """bpb against training seconds, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([p["seconds"] for p in r["curve"]], [p["val_bpb"] for p in r["curve"]], marker="o", ms=3,
                label=f"{r['recipe']} ({r['val_bpb']:.3f})")
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel="held-out bits per byte",
           title=f"Pretraining recipes at a {budget:.0f} s budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="nanogpt,previous,default", help="comma-separated: nanogpt, previous, default")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per recipe")
    ap.add_argument("--steps", type=int, help="train this many steps instead of filling the budget")
    ap.add_argument("--calibrate", type=int, default=8, help="timed steps that size the run to the budget")
    ap.add_argument("--evals", type=int, default=8, help="held-out evaluations along each run")
    ap.add_argument("--curve-batches", type=int, default=4,
                    help="batches of 64 windows, spread over the val split, that score the curve's points (0: all); "
                         "the table's final figure always scores all of it")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE",
                    help="change every chosen recipe: model.KEY=VALUE or pretrain.KEY=VALUE (repeatable)")
    ap.add_argument("--name", help="label of the (single) recipe in the output, e.g. when --set changes it")
    ap.add_argument("--tokens", type=Path, default=ROOT / "artifacts/tokens")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "artifacts/tokenizer")
    ap.add_argument("--params", type=Path, default=ROOT / "params", help="the folder of model.yaml and pretrain.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    ap.add_argument("--json", type=Path, help="write the settings and curves here")
    ap.add_argument("--plot", type=Path, help="draw held-out bpb against seconds into this PNG")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if args.name and len(names) != 1:
        ap.error("--name labels a single recipe")
    for folder in (args.tokens, args.tokenizer):
        if not folder.is_dir():
            ap.error(f"{folder} not found: run the data stages first (python -m dvc repro tokenize)")
    budget = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"budget {budget} per recipe", flush=True)
    results = []
    for name in names:
        model_config, params = recipe_configs(name, args.sets, args.params)
        results.append(run_recipe(args.name or name, model_config, params, args))
    print(f"\n| recipe | params | steps | tokens | tokens/s | training s | held-out bpb |\n|{' --- |' * 7}")
    for r in results:
        print(f"| {r['recipe']} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['tokens']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['seconds']:.0f} | {r['val_bpb']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"budget_s": args.budget, "steps": args.steps, "device": args.device,
                                         "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot, args.budget)
    if not all(math.isfinite(r["val_bpb"]) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
