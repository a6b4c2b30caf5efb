"""The token files of the tokenize stage (``llm.data.tokenize`` writes them) read back as memmaps, and
batches drawn from them.

``{split}.bin`` holds every document's ids back to back, each document preceded by ``<|bos|>`` (an imported model: its
source's start, ``llm.data.chat_template.document_start_ids``), as
uint16 when the vocabulary fits, else uint32. ``meta.json`` records the dtype, token counts and the
UTF-8 byte count of the text, so a loss in nats per token converts to bits per byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llm.data.chat_template import document_start_ids
from llm.data.clean import iter_documents
from llm.data.tokenize import META_FILE, SPLITS, TokenDataError, token_dtype, tokenize_corpus
from llm.data.tokenizer import Tokenizer

__all__ = ["META_FILE", "SPLITS", "TokenDataError", "TokenFile", "bits_per_byte", "encode_documents", "read_meta",
           "token_dtype", "tokenize_corpus"]


def read_meta(tokens_dir: str | Path) -> dict:
    """The ``meta.json`` of a tokens folder. Raises TokenDataError if it is missing or unreadable."""
    path = Path(tokens_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenDataError(f"{path}: missing; run the tokenize stage first") from None
    except json.JSONDecodeError as err:
        raise TokenDataError(f"{path}: not valid JSON: {err}") from None


class TokenFile:
    """A read-only memmap over one split, with the counts needed for bits per byte."""

    def __init__(self, tokens_dir: str | Path, split: str):
        tokens_dir = Path(tokens_dir)
        meta = read_meta(tokens_dir)
        if split not in meta["splits"]:
            raise TokenDataError(f"{tokens_dir / META_FILE}: no split {split!r} (has {sorted(meta['splits'])})")
        self.path = tokens_dir / f"{split}.bin"
        self.dtype = np.dtype(meta["dtype"])
        info = meta["splits"][split]
        expected = info["tokens"] * self.dtype.itemsize
        if not self.path.exists() or self.path.stat().st_size != expected:
            size = self.path.stat().st_size if self.path.exists() else "no"
            raise TokenDataError(f"{self.path}: has {size} bytes, meta.json says {expected}; re-run tokenize")
        self.data = np.memmap(self.path, dtype=self.dtype, mode="r")
        self.vocab_size: int = meta["vocab_size"]
        self.n_tokens: int = info["tokens"]
        self.n_bytes: int = info["bytes"]

    @classmethod
    def from_array(cls, ids: np.ndarray, n_bytes: int, vocab_size: int, name: str = "<memory>") -> TokenFile:
        """A TokenFile over ids already in memory (e.g. text encoded by another model's tokenizer)."""
        self = cls.__new__(cls)
        self.path = Path(name)
        self.data = np.asarray(ids)
        self.dtype = self.data.dtype
        self.vocab_size, self.n_tokens, self.n_bytes = vocab_size, len(self.data), n_bytes
        return self

    @property
    def tokens_per_byte(self) -> float:
        return self.n_tokens / max(1, self.n_bytes)

    def window(self, offset: int, length: int) -> torch.Tensor:
        return torch.from_numpy(self.data[offset : offset + length].astype(np.int64))

    def check_fits(self, block_size: int) -> None:
        if self.n_tokens < block_size + 1:
            raise TokenDataError(
                f"{self.path}: {self.n_tokens} tokens is fewer than one training window of {block_size + 1}; "
                "lower context_length or add text"
            )

    def random_batch(
        self, batch_size: int, block_size: int, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows at offsets drawn from ``rng``: inputs and next-token targets."""
        self.check_fits(block_size)
        offsets = torch.randint(self.n_tokens - block_size, (batch_size,), generator=rng).tolist()
        rows = torch.stack([self.window(o, block_size + 1) for o in offsets])
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(
        self, batch_size: int, block_size: int, max_batches: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic batches: non-overlapping windows over the whole file, or, with ``max_batches``,
        that many batches of windows spread evenly across it (so a quick estimate still sees all of it)."""
        self.check_fits(block_size)
        n_windows = (self.n_tokens - 1) // block_size
        if max_batches and max_batches * batch_size < n_windows:
            last = self.n_tokens - block_size - 1
            count = max_batches * batch_size
            offsets = [round(i * last / max(1, count - 1)) for i in range(count)]
        else:
            offsets = [i * block_size for i in range(n_windows)]
        for i in range(0, len(offsets), batch_size):
            rows = torch.stack([self.window(o, block_size + 1) for o in offsets[i : i + batch_size]])
            yield rows[:, :-1], rows[:, 1:]


def encode_documents(tokenizer: Tokenizer, split_file: str | Path) -> TokenFile:
    """Encode a cleaned split file in memory, as ``tokenize_corpus`` would (``document_start_ids`` before each
    document).

    For evaluation files of modest size: lets models with different tokenizers be scored on the same text.
    """
    ids: list[int] = []
    n_bytes = 0
    start = document_start_ids(tokenizer)
    for doc in iter_documents(Path(split_file)):
        ids.extend(start)
        ids.extend(tokenizer.encode(doc))
        n_bytes += len(doc.encode("utf-8"))
    if not ids:
        raise TokenDataError(f"{split_file}: no documents")
    return TokenFile.from_array(np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size)), n_bytes,
                                tokenizer.vocab_size, str(split_file))


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Convert a mean loss in nats per token into bits per UTF-8 byte of text."""
    return loss_nats * tokens_per_byte / math.log(2)
