"""Full finetuning against LoRA, side by side: trainable parameters, peak memory, seconds per step, bytes stored
per version, and (on the demo model) held-out assistant loss at equal wall time.

Two models:
- ``demo``: the demo's pretrained model (``artifacts/pretrain``) finetuned on the demo's chat data
  (``artifacts/chat``). Where the demo has not been run, a model of ``params/model.yaml``'s shape is pretrained
  here for ``--pretrain-steps`` on the tests' synthetic plays (byte tokenizer), and conversations are derived
  from those plays as the finetune stage does.
- ``gpt2-124m``: GPT-2 124M's shape (12 x 768, vocabulary 50257 + our control tokens, tied, biases) with random
  weights, at a short context (``--context``) and small batch, on random tokens: speed, memory and bytes only.

How each figure is measured:
- trainable parameters: those the optimizer receives (``llm.training.loop.build_optimizer``).
- peak memory: each configuration runs in a fresh process (spawned, so no memory is shared or reused); the
  figure is that process's peak resident set size (``ru_maxrss``) during model build + two training steps,
  and, after a slash, the peak above its RSS once the model was built (what training adds: gradients,
  optimizer moments, activations). Both include the interpreter, PyTorch and its allocator's caching, as a
  user would see them.
- seconds per step: the fastest of ``--steps`` optimizer steps (forward, backward, AdamW) after a warm-up step,
  all configurations built in one process and timed in rounds, one step of each per round. On a CPU shared with
  other jobs, bursts of their load slow several consecutive steps by 5-20x (seen while writing this), which moves
  a median by whichever configuration they hit; the fastest step is the cost of the step itself.
- bytes per version: the files a registered version stores (the checkpoint folder without ``train_state/``).
- held-out assistant loss (demo only): ``llm.training.finetune.assistant_loss`` on the val conversations. Full
  finetuning runs ``--demo-steps`` steps (``params/finetune.yaml`` otherwise); each LoRA setting then runs as
  many steps as take the same time by the seconds per step measured above (one run's wall time moves too much
  on a shared CPU), so the comparison is at equal training time. The wall time each run took is printed beside
  it.

The CPU may be shared with other jobs: timings move with their load (the load average is printed).

Usage:
    python bench/finetune.py                     # both models, a few minutes on 2 CPU cores
    python bench/finetune.py --models gpt2-124m --steps 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.config import FinetuneParams, LoRAParams, ModelConfig, load_params  # noqa: E402
from llm.model.checkpoint import TRAIN_STATE_DIR, load_checkpoint, save_checkpoint  # noqa: E402

LORA_SETTINGS = {  # name -> (lora params, learning rate): LoRA usually wants a higher rate than full finetuning
    "lora r8 attention": (LoRAParams(rank=8, alpha=16, targets=["attention"]), 3e-3),
    "lora r16 all": (LoRAParams(rank=16, alpha=32, targets=["all"]), 3e-3),
    "lora r8 all, lr 1e-2": (LoRAParams(rank=8, alpha=16, targets=["all"]), 1e-2),
    "lora r32 all": (LoRAParams(rank=32, alpha=64, targets=["all"]), 3e-3),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and TRAIN_STATE_DIR not in p.parts)


def build(job: dict):
    """The model of ``job`` (``checkpoint``, or a random one of ``config``) with adapters when ``job["lora"]``, in
    training mode, its optimizer (over what trains), and its tokenizer."""
    from llm.data.tokenizer import ByteTokenizer
    from llm.model.gpt import GPT
    from llm.model.lora import apply_lora
    from llm.training.loop import build_optimizer

    torch.manual_seed(0)
    if job.get("checkpoint"):
        model, tokenizer, _ = load_checkpoint(job["checkpoint"])
    else:
        model, tokenizer = GPT(ModelConfig(**job["config"])), ByteTokenizer()
    if job["lora"] is not None:
        apply_lora(model, job["lora"])
    optimizer = build_optimizer(model.train(), FinetuneParams(device="cpu", weight_decay=0.0), torch.device("cpu"))
    return model, optimizer, tokenizer


def train_step(model, optimizer, batch: int, context: int) -> float:
    """One step on random tokens (forward, backward, AdamW); returns its seconds."""
    x = torch.randint(0, model.config.vocab_size, (batch, context))
    start = time.perf_counter()
    model(x, x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_memory(job: dict) -> dict:
    """In a fresh process: build the model of ``job``, train two steps; return trainable parameters, peak RSS
    (and the part above the RSS once built) and the bytes of the checkpoint a version stores."""
    torch.set_num_threads(job["threads"])
    model, optimizer, tokenizer = build(job)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    built = rss_bytes()
    for _ in range(2):
        train_step(model, optimizer, job["batch"], job["context"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    with tempfile.TemporaryDirectory() as tmp:
        metadata = {}
        if job["lora"] is not None:
            metadata["adapter"] = {"lora": job["lora"].model_dump(), "base": {"path": "-", "weights_sha256": "-"}}
        stored = folder_bytes(save_checkpoint(Path(tmp) / "ckpt", model, model.config, tokenizer, metadata=metadata))
    return {"trainable": trainable, "total": model.num_parameters(), "peak": peak, "peak_training": peak - built,
            "stored": stored}


def seconds_per_step(jobs: dict[str, dict], steps: int) -> dict[str, float]:
    """The fastest step's seconds of each job, timed in rounds (one step of each per round, after a warm-up
    round) so that every configuration meets the same load on a shared machine."""
    built = {name: build(job)[:2] for name, job in jobs.items()}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(steps + 1):
        for name, (model, optimizer) in built.items():
            times[name].append(train_step(model, optimizer, jobs[name]["batch"], jobs[name]["context"]))
    return {name: min(t[1:]) for name, t in times.items()}


def table_rows(jobs: dict[str, dict], steps: int) -> dict[str, dict]:
    rows = {name: run_isolated(job) for name, job in jobs.items()}
    for name, s in seconds_per_step(jobs, steps).items():
        rows[name]["s_per_step"] = s
    return rows


def run_isolated(job: dict) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_memory, (job,))


def demo_inputs(work: Path, pretrain_steps: int) -> tuple[Path, Path]:
    """The demo's pretrained checkpoint and chat data; made here in miniature when the demo has not been run."""
    if (ROOT / "artifacts/pretrain/manifest.json").exists() and (ROOT / "artifacts/chat/val.jsonl").exists():
        return ROOT / "artifacts/pretrain", ROOT / "artifacts/chat"
    from llm.config import ChatDataParams, DataParams, PretrainParams, TokenizerParams
    from llm.data.chat_data import prepare_chat_data
    from llm.data.clean import clean_corpus
    from llm.data.tokenize import tokenize_corpus
    from llm.data.tokenizer import train_tokenizer_on_split
    from llm.training.pretrain import pretrain

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_corpus

    print(f"no demo run here (artifacts/pretrain, artifacts/chat): pretraining params/model.yaml's shape for "
          f"{pretrain_steps} steps on synthetic plays")
    write_corpus(work / "corpus", n_docs=24)
    clean_corpus(DataParams(val_fraction=0.2, min_doc_chars=100), work / "corpus", work / "clean")
    train_tokenizer_on_split(TokenizerParams(kind="byte"), work / "clean/train.txt", work / "tokenizer")
    tokenize_corpus(work / "clean", work / "tokenizer", work / "tokens", workers=1)
    model_config = load_params(ModelConfig, ROOT / "params/model.yaml")
    pretrain(PretrainParams(max_steps=pretrain_steps, batch_size=16, warmup_steps=20, eval_interval=pretrain_steps,
                            eval_batches=2, checkpoint_interval=pretrain_steps, progress=False, device="cpu"),
             model_config, work / "tokens", work / "tokenizer", work / "pretrain")
    prepare_chat_data(None, work / "clean", work / "chat", ChatDataParams())
    return work / "pretrain", work / "chat"


def demo_losses(base: Path, chat: Path, work: Path, steps: int, s_per_step: dict[str, float]) -> dict[str, dict]:
    """Held-out assistant loss of full finetuning for ``steps`` steps and of each LoRA setting for as many steps as
    take the same time by the measured seconds per step (``s_per_step``: steadier than one run's wall time on a
    shared CPU)."""
    from llm.training.finetune import assistant_loss, finetune

    defaults = load_params(FinetuneParams, ROOT / "params/finetune.yaml")
    common = {"progress": False, "device": "cpu", "checkpoint_interval": 10**6, "eval_interval": 10**6}
    settings = {"full": (defaults.model_copy(update={**common, "max_steps": steps}), steps)}
    for name, (lora, lr) in LORA_SETTINGS.items():
        equal = max(2, round(steps * s_per_step["full"] / s_per_step[name]))
        settings[name] = (defaults.model_copy(update={**common, "max_steps": equal, "method": "lora", "lora": lora,
                                                      "learning_rate": lr}), equal)
    out = {}
    for name, (params, n) in settings.items():
        result = finetune(params, base, chat, work / f"ft-{name}", resume=False)
        out[name] = {"steps": n, "wall_s": result.metrics["wall_time_s"], "lr": params.learning_rate,
                     "loss": assistant_loss(work / f"ft-{name}", None, chat / "val.jsonl", device="cpu")}
    return out


def print_table(title: str, rows: dict[str, dict], losses: dict[str, dict] | None) -> None:
    print(f"\n### {title}\n")
    head = "| method | trainable params | peak RSS / added by training | s/step | bytes per version |"
    print(head + (" held-out assistant loss (steps, wall s) |" if losses else ""))
    print("|" + " --- |" * (head.count("|") - 1 + bool(losses)))
    full = rows["full"]
    for name, r in rows.items():
        line = (f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                f"{r['peak'] / 2**20:,.0f} MiB ({100 * r['peak'] / full['peak']:.0f}%) / "
                f"{r['peak_training'] / 2**20:,.0f} MiB | {r['s_per_step']:.3f} | "
                f"{r['stored']:,} ({100 * r['stored'] / full['stored']:.2f}%) |")
        if losses:
            d = losses[name]
            line += f" {d['loss']:.4f} ({d['steps']}, {d['wall_s']:.1f}; lr {d['lr']:g}) |"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "gpt2-124m"], choices=["demo", "gpt2-124m"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--context", type=int, default=256, help="tokens per row for gpt2-124m")
    parser.add_argument("--batch", type=int, default=2, help="rows per step for gpt2-124m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--demo-steps", type=int, default=100, help="full finetuning steps on the demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        if "demo" in args.models:
            base, chat = demo_inputs(work, args.pretrain_steps)
            config = load_checkpoint(base).model.config
            jobs = {"full": None, **{name: lora for name, (lora, _) in LORA_SETTINGS.items()}}
            rows = table_rows({name: {"checkpoint": str(base), "lora": lora, "batch": 16,
                                      "context": config.context_length, "threads": args.threads}
                               for name, lora in jobs.items()}, args.steps)
            print_table(f"demo model ({base}), batch 16 x {config.context_length} tokens for the timings",
                        rows, demo_losses(base, chat, work, args.demo_steps,
                                          {name: r["s_per_step"] for name, r in rows.items()}))
        if "gpt2-124m" in args.models:
            from llm.data.tokenizer import N_SPECIAL

            shape = dict(vocab_size=50257 + N_SPECIAL, context_length=args.context, n_layer=12, n_head=12, d_model=768,
                         position="learned", mlp="gelu_tanh", norm="layernorm", tie_weights=True, bias=True)
            jobs = {"full": None, "lora r8 attention": LORA_SETTINGS["lora r8 attention"][0]}
            rows = table_rows({name: {"config": shape, "lora": lora, "batch": args.batch, "context": args.context,
                                      "threads": args.threads} for name, lora in jobs.items()}, args.steps)
            print_table(f"GPT-2 124M shape, random weights, batch {args.batch} x {args.context} tokens", rows, None)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
