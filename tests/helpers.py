"""Builders that several test files share: play-shaped corpora, tiny models and tiny checkpoints.

Plain functions, imported as ``from helpers import tiny_model``: pytest puts this folder on ``sys.path``
(its default ``prepend`` import mode, as ``tests/`` has no ``__init__.py``). Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from llm.config import ModelConfig
from llm.data.tokenizer import CharTokenizer
from llm.model.checkpoint import save_checkpoint
from llm.model.gpt import GPT

SPEAKERS = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR", "TYBALT", "BENVOLIO", "CAPULET"]
WORDS = (
    "love night day sweet death fair heart eyes heaven light soul hand lord lady good thou thee thy "
    "art hath doth speak swear gentle moon sun stars fortune grief joy blood honour name rose kiss"
).split()
ALPHABET = list("abcdefghijklmnopqrstuvwxyz .,\n")


def make_play(seed: int, n_speeches: int = 120) -> str:
    """A deterministic play-shaped document: speaker lines followed by verse lines."""
    rng = random.Random(seed)
    lines = [f"THE TRAGEDY OF PLAY {seed}", ""]
    for _ in range(n_speeches):
        lines.append(f"{rng.choice(SPEAKERS)}.")
        for _ in range(rng.randint(1, 3)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + ",")
        lines.append("")
    return "\n".join(lines)


def write_corpus(folder: Path, n_docs: int = 6) -> Path:
    """``n_docs`` deterministic plays as ``play_NN.txt`` in ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"play_{i:02d}.txt").write_text(make_play(i))
    return folder


def widen_weights(model: GPT, std: float) -> GPT:
    """Redraw every matrix of ``model`` from a normal distribution with standard deviation ``std``, in place.
    Under the GPT's own narrow init an untrained model's logits barely differ between tokens; wider weights
    give tests distinct, varied outputs. Returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


def tiny_model(std: float, **overrides) -> GPT:
    """A small fp32 GPT in eval mode (seed 0), weights widened to ``std``; ``overrides`` are ModelConfig fields."""
    torch.manual_seed(0)
    fields = {"vocab_size": 50, "context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 32} | overrides
    return widen_weights(GPT(ModelConfig(**fields)).eval(), std)


def write_checkpoint(folder: Path, seed: int = 0, std: float = 0.3, **overrides) -> Path:
    """A tiny checkpoint with a character tokenizer, saved in ``folder``: weights drawn with ``seed`` and widened
    to ``std`` (0.3: greedy decoding does not repeat one token forever); ``overrides`` are ModelConfig fields."""
    tokenizer = CharTokenizer(ALPHABET)
    fields = {"context_length": 32, "n_layer": 2, "n_head": 2, "d_model": 32} | overrides
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **fields)
    torch.manual_seed(seed)
    model = widen_weights(GPT(config), std)
    return save_checkpoint(folder, model, config, tokenizer)


def hold_folder_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``llm.io.folder_lock(folder)`` for up to a minute: returns once it holds it (kill
    it to let go)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from llm.io import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "held"
    return holder


class IdleEngineLifecycle:
    """What ``llm.inference.engine.Engine`` asks of an engine besides ``submit``, for the tests' stand-in engines:
    a running flag that start and stop set, health from it, and the stats of an idle engine of one slot."""

    running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def stats(self) -> dict:
        return {"active": 0, "queued": 0, "max_batch": 1, "max_queue": 1}

    def health(self) -> tuple[bool, list[str]]:
        return self.running, []
