"""Shared fixtures: a small synthetic corpus taken through clean, tokenizer and tokenize once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SPEAKERS = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR", "TYBALT", "BENVOLIO", "CAPULET"]
WORDS = (
    "love night day sweet death fair heart eyes heaven light soul hand lord lady good thou thee thy "
    "art hath doth speak swear gentle moon sun stars fortune grief joy blood honour name rose kiss"
).split()


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
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"play_{i:02d}.txt").write_text(make_play(i))
    return folder


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(folder, n_docs=6)`` writes deterministic play-shaped .txt files into ``folder``."""
    return write_corpus


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Paths of a corpus prepared with a char tokenizer: corpus, clean, tokenizer, tokens."""
    from llm.config import DataParams, TokenizerParams
    from llm.data.clean import clean_corpus
    from llm.data.tokenizer import train_tokenizer_on_split
    from llm.data.tokens import tokenize_corpus

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_corpus(root / "corpus")
    clean_corpus(DataParams(val_fraction=0.3, min_doc_chars=100), corpus, root / "clean")
    train_tokenizer_on_split(TokenizerParams(kind="char"), root / "clean" / "train.txt", root / "tokenizer")
    tokenize_corpus(root / "clean", root / "tokenizer", root / "tokens", workers=2)
    return {"root": root, "corpus": corpus, "clean": root / "clean", "tokenizer": root / "tokenizer", "tokens": root / "tokens"}


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables created once per session (creating them takes seconds)."""
    path = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not path.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        path.parent.mkdir(parents=True, exist_ok=True)
        SqlAlchemyStore(f"sqlite:///{path}", (path.parent / "mlruns").as_uri())
    return path
