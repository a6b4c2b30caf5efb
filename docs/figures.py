"""Draw the figures of docs/architecture.md from the project's own code: ``python docs/figures.py``.

Every figure calls the function the guide describes (``sinusoidal_table``, ``apply_rope``, ``attention_mask``,
``lr_at``, ``attention_maps``, the training curves a checkpoint writes), so a change to the code shows in the
figures the next time they are drawn. The attention maps and loss curves come from the demo's checkpoint when
``artifacts/pretrain`` exists (after ``make demo``), else from the tiny model of ``notebooks/demo_or_tiny.py``.

    python docs/figures.py                  # all figures into docs/figures/
    python docs/figures.py --out /tmp/figs  # elsewhere
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import demo_or_tiny  # noqa: E402

from llm.config import FinetuneParams, PretrainParams, load_params  # noqa: E402
from llm.model.gpt import apply_rope, attention_mask, rope_tables, sinusoidal_table  # noqa: E402
from llm.training.loop import lr_at  # noqa: E402

DPI = 90


def positions(out: Path) -> Path:
    """Left: the sinusoidal table. Right: RoPE's score of one (q, k) pair depends only on their offset."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    table = sinusoidal_table(128, 64)  # [positions, channels]
    image = left.imshow(table.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    left.set(title="sinusoidal_table(128, 64)", xlabel="position", ylabel="channel")
    fig.colorbar(image, ax=left)

    torch.manual_seed(0)
    head_dim, length = 32, 128
    cos, sin = rope_tables(length, head_dim, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    q_at = apply_rope(q.expand(1, 1, length, head_dim), cos, sin)[0, 0]  # q placed at every position m
    k_at = apply_rope(k.expand(1, 1, length, head_dim), cos, sin)[0, 0]
    for m in (40, 80, 120):
        offsets = torch.arange(0, 40)
        right.plot(offsets, [(q_at[m] @ k_at[m - d]).item() for d in offsets], label=f"query at m={m}",
                   linestyle="-" if m == 40 else "--")
    right.set(title="RoPE: q(m)·k(m−Δ) is a function of Δ only", xlabel="offset Δ = m − n", ylabel="score")
    right.legend()
    fig.tight_layout()
    return _save(fig, out / "positions.png")


def causal_mask(out: Path) -> Path:
    """Left: the causal mask of a prefill. Right: ``attention_mask`` for 3 new tokens after a 5-slot cache whose
    first 2 slots are padding (a shorter row of a batch)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    T = 8
    left.imshow(torch.ones(T, T).tril(), cmap="Greys", vmin=0, vmax=1.3)
    left.set(title="prefill: query i sees keys 0..i", xlabel="key position", ylabel="query position")
    past_mask = torch.tensor([[False, False, True, True, True]])
    mask = attention_mask(past_mask, 3)[0, 0].float()  # [T, P+T]
    right.imshow(mask, cmap="Greys", vmin=0, vmax=1.3)
    right.axvline(4.5, color="tab:red")
    right.set(title="attention_mask(past_mask, T=3)", xlabel="cache slots 0-4 | new tokens 5-7",
              ylabel="new token", yticks=range(3))
    fig.tight_layout()
    return _save(fig, out / "causal_mask.png")


def lr_schedule(out: Path) -> Path:
    """``lr_at`` for the pretraining and finetuning params of ``params/``."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, model in (("pretrain", PretrainParams), ("finetune", FinetuneParams)):
        params = load_params(model, ROOT / "params" / f"{name}.yaml")
        steps = range(params.max_steps)
        ax.plot(steps, [lr_at(s, params) for s in steps],
                label=f"params/{name}.yaml: warmup {params.warmup_steps}, peak {params.learning_rate:g}")
        if params.optimizer == "muon":  # the Muon matrices follow the same shape from their own peak
            scale = params.muon_lr / params.learning_rate
            ax.plot(steps, [lr_at(s, params) * scale for s in steps], linestyle="--",
                    label=f"params/{name}.yaml, Muon matrices: peak muon_lr {params.muon_lr:g}")
    ax.set(title="lr_at(step): linear warmup, then cosine to min_lr_ratio × peak", xlabel="optimizer step",
           ylabel="learning rate", yscale="log")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "lr_schedule.png")


def attention(out: Path) -> Path:
    """Attention maps of every head of every layer for one line of text."""
    from llm.model.checkpoint import load_checkpoint
    from llm.model.probe import attention_maps

    checkpoint = demo_or_tiny.pretrained()
    model, tokenizer, _ = load_checkpoint(checkpoint)
    text = "ROMEO.\nWhat light through yonder window breaks?" if demo_or_tiny.have_demo() else "The model reads"
    ids = [tokenizer.bos_id, *tokenizer.encode(text)][: model.config.context_length]
    maps = attention_maps(model.eval(), torch.tensor([ids]))
    labels = [repr(tokenizer.decode([i]))[1:-1] for i in ids]
    L, H = len(maps), maps[0].size(1)
    fig, axes = plt.subplots(L, H, figsize=(2.6 * H, 2.6 * L), squeeze=False)
    for layer, row in enumerate(axes):
        for head, ax in enumerate(row):
            ax.imshow(maps[layer][0, head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ticks = range(len(ids))
            ax.set_xticks(ticks, labels, fontsize=5, rotation=90)
            ax.set_yticks(ticks, labels, fontsize=5)
    fig.suptitle(f"attention_maps of {_checkpoint_name(checkpoint)} (rows: queries, columns: keys)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "attention.png")


def loss_curves(out: Path) -> Path:
    """The train and val loss a checkpoint records (``curve/train.csv``, ``curve/val.csv``)."""
    checkpoint = demo_or_tiny.pretrained()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for split, key in (("train", "train/loss"), ("val", "val/loss")):
        rows = list(csv.DictReader((checkpoint / "curve" / f"{split}.csv").open()))
        column = next(c for c in rows[0] if c in (key, key.replace("/", "_")))
        ax.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], marker="." if split == "val" else "",
                label=f"{split} loss")
    ax.set(title=f"loss curves of {_checkpoint_name(checkpoint)}", xlabel="step", ylabel="nats per token")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "loss_curves.png")


FIGURES: dict[str, Callable[[Path], Path]] = {f.__name__: f for f in
                                              (positions, causal_mask, lr_schedule, attention, loss_curves)}


def _checkpoint_name(checkpoint: Path) -> str:
    return "the demo's artifacts/pretrain" if demo_or_tiny.have_demo() else "the tiny model (notebooks/demo_or_tiny.py)"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="folder for the PNG files")
    parser.add_argument("--only", choices=sorted(FIGURES), action="append", help="draw only this figure")
    args = parser.parse_args(argv)
    written = [FIGURES[name](args.out) for name in (args.only or FIGURES)]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
