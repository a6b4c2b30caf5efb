"""Shared fixtures: a small synthetic corpus taken through clean, tokenizer and tokenize once per session.

Plain builder functions (corpora, tiny models, tiny checkpoints) are in ``helpers.py``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from helpers import write_corpus

# Tests send SIGINT (Ctrl-C) to the processes they start and expect the default disposition. A test run launched
# in the background of a non-interactive shell (`make test &`) inherits SIGINT ignored, and so would every process
# it starts (an ignored signal stays ignored across exec): give this process Python's own handler, which exec
# resets to the default in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    return {"root": root, "corpus": corpus, "clean": root / "clean", "tokenizer": root / "tokenizer",
            "tokens": root / "tokens"}


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny models decode fastest so, and a busy machine makes more threads
    far slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables created once per session (creating them takes seconds)."""
    path = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not path.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        path.parent.mkdir(parents=True, exist_ok=True)
        SqlAlchemyStore(f"sqlite:///{path}", (path.parent / "mlruns").as_uri())
    return path
