"""The text and the model that the notebooks and ``docs/figures.py`` look at: the demo's, or a tiny one built here.

After ``make demo`` (or ``llm demo``) the demo's artifacts are used: the cleaned corpus in ``artifacts/clean``,
its tokenizer, the pretrained and finetuned checkpoints. Without them, a tiny character-level GPT is trained
here in seconds by the project's own functions (clean, tokenizer, tokenize, pretrain), on the project's own
documentation (its ``*.md`` files, or ``data/corpus`` when it has been fetched), and cached under
``.cache/notebooks/``. ``LLM_NOTEBOOKS_SMALL=1`` (set by the tests) always builds the tiny one, with the
smallest sizes, so the notebooks run in CI in seconds; ``LLM_NOTEBOOKS_CACHE`` moves the cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = os.environ.get("LLM_NOTEBOOKS_SMALL", "") == "1"
CACHE = Path(os.environ.get("LLM_NOTEBOOKS_CACHE") or ROOT / ".cache" / "notebooks")
ARTIFACTS = ROOT / "artifacts"

# the tiny model: small enough to train in seconds on one CPU core, big enough to show attention patterns
TINY_MODEL = ({"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "position": "rope"} if SMALL
              else {"context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 64, "position": "rope"})
TINY_STEPS = 20 if SMALL else 300


def have_demo() -> bool:
    """True when the demo's artifacts are here (and the small CI configuration is not asked for)."""
    return not SMALL and (ARTIFACTS / "pretrain" / "model.safetensors").is_file() and (ARTIFACTS / "clean").is_dir()


def corpus_documents() -> list[Path]:
    """Raw text documents: ``data/corpus/**/*.txt`` when fetched, else the project's Markdown files."""
    fetched = sorted((ROOT / "data" / "corpus").rglob("*.txt")) if not SMALL else []
    if fetched:
        return fetched
    return sorted(p for p in ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("*.md"))


def clean_dir() -> Path:
    """The cleaned corpus (``train.txt``, ``val.txt``): the demo's, or the tiny run's."""
    if have_demo():
        return ARTIFACTS / "clean"
    return _tiny_run()["clean"]


def pretrained() -> Path:
    """A pretrained checkpoint folder: the demo's ``artifacts/pretrain``, or the tiny run's."""
    if have_demo():
        return ARTIFACTS / "pretrain"
    return _tiny_run()["pretrain"]


def tokenizer_dir() -> Path:
    """The tokenizer folder of ``tokens_dir()``'s token files."""
    if have_demo():
        return ARTIFACTS / "tokenizer"
    return _tiny_run()["tokenizer"]


def tokens_dir() -> Path:
    """Token files of the cleaned corpus for the pretrained checkpoint's tokenizer."""
    if have_demo():
        return ARTIFACTS / "tokens"
    return _tiny_run()["tokens"]


def scratch_dir(name: str) -> Path:
    """An empty folder ``name`` under the cache, for what a notebook writes (MLflow runs, an ONNX export)."""
    folder = CACHE / "scratch" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _tiny_run() -> dict[str, Path]:
    """Clean, tokenize (char) and pretrain the tiny model once; later calls reuse the cached folders."""
    from llm.config import DataParams, ModelConfig, PretrainParams, TokenizerParams
    from llm.data.clean import clean_corpus
    from llm.data.tokenizer import train_tokenizer_on_split
    from llm.data.tokens import tokenize_corpus
    from llm.training.pretrain import pretrain

    root = CACHE / ("tiny-small" if SMALL else "tiny")
    paths = {name: root / name for name in ("corpus", "clean", "tokenizer", "tokens", "pretrain")}
    if (paths["pretrain"] / "model.safetensors").is_file():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    paths["corpus"].mkdir(parents=True)
    for i, doc in enumerate(corpus_documents()):
        shutil.copyfile(doc, paths["corpus"] / f"{i:03d}_{doc.stem}.txt")
    clean_corpus(DataParams(val_fraction=0.2, min_doc_chars=200, dedup_near=False), paths["corpus"], paths["clean"])
    train_tokenizer_on_split(TokenizerParams(kind="char"), paths["clean"] / "train.txt", paths["tokenizer"])
    tokenize_corpus(paths["clean"], paths["tokenizer"], paths["tokens"], workers=1)
    params = PretrainParams(max_steps=TINY_STEPS, batch_size=8 if SMALL else 16, learning_rate=3e-3, warmup_steps=10,
                            eval_interval=max(10, TINY_STEPS // 6), eval_batches=4, checkpoint_interval=TINY_STEPS,
                            log_interval=10, device="cpu", progress=False)
    pretrain(params, ModelConfig(**TINY_MODEL), paths["tokens"], paths["tokenizer"], paths["pretrain"])
    return paths
