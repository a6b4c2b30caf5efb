"""The tokenize stage: encode the cleaned splits into flat token files, shard by shard.

``{split}.bin`` holds every document's ids back to back, each document preceded by ``<|bos|>`` (an imported model: its
source's start, ``llm.data.chat_template.document_start_ids``), as
uint16 when the vocabulary fits, else uint32. ``meta.json`` records the dtype, token counts and the
UTF-8 byte count of the text, so a loss in nats per token converts to bits per byte. Reading them back
(``TokenFile``) is ``llm.data.tokens``; this module needs no PyTorch, so its worker processes start fast.

``plan_tokenize`` cuts each split file at document boundaries into shards; ``tokenize_shard`` encodes one
(reading its byte range of the split file itself, writing its ids to a part file); ``finish_tokenize``
joins the parts in order into ``{split}.bin``. A document longer than PIECE_CHARS is encoded in pieces
cut after a newline, wherever its shard falls, so the ids never depend on how the work was sharded.
``tokenize_corpus`` runs the three with a local process pool; flows/data.py maps the shards as Prefect tasks.
"""

from __future__ import annotations

import functools
import mmap
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.data.chat_template import document_start_ids
from llm.data.clean import DOC_SEPARATOR, ShardMapper, map_in_processes
from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.io import atomic_file, atomic_write_json, remove_stale_temp_files

SPLITS = ("train", "val")
META_FILE = "meta.json"
# documents longer than this are cut at line boundaries into pieces encoded separately
PIECE_CHARS = 1 << 20
# each piece is encoded in runs of lines of about this many characters: sentencepiece encodes short inputs
# several times faster, and where the tokenizer has "\n" as a token of its own (``Tokenizer.newline_splits``:
# char, byte, and sentencepiece, where it is a user-defined symbol), no token spans a line break and the ids
# are those of the whole piece; a byte-level BPE piece is encoded whole
LINES_CHARS = 1 << 14
# a shard of a split file holds at most this many bytes (several shards per worker balance the load)
SHARD_BYTES_MAX = 16 << 20
# and at least this many, unless the split is smaller: fewer, larger shards cost less to schedule
SHARD_BYTES_MIN = 2 << 20
# between two documents of a split file (see llm.data.clean): the first one's final newline, then U+001E
_BETWEEN_DOCS = ("\n" + DOC_SEPARATOR + "\n").encode()


class TokenDataError(ValueError):
    """A token file or its meta is missing or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenizeJob:
    """One shard of the tokenize stage: whole documents, bytes ``[start, end)`` of a split file."""

    split: str
    source: Path
    start: int
    end: int
    tokenizer_dir: Path
    part: Path  # where its ids go
    dtype: str


def _pieces(doc: str) -> Iterator[tuple[bool, str]]:
    """``(starts_document, text)`` pieces of at most about PIECE_CHARS, cut after a newline."""
    start = 0
    first = True
    while start < len(doc) or first:
        end = min(len(doc), start + PIECE_CHARS)
        if end < len(doc):
            cut = doc.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield first, doc[start:end]
        first = False
        start = end


def _line_runs(piece: str) -> Iterator[str]:
    """``piece`` in runs of whole lines of about LINES_CHARS (a longer line is a run of its own)."""
    start = 0
    while start < len(piece):
        end = min(len(piece), start + LINES_CHARS)
        if end < len(piece):
            cut = piece.rfind("\n", start, end)
            if cut < 0:
                cut = piece.find("\n", end)
            end = len(piece) if cut < 0 else cut + 1
        yield piece[start:end]
        start = end


@functools.lru_cache(maxsize=2)
def _load_tokenizer(directory: Path) -> Tokenizer:
    return load_tokenizer(directory)


def _shard_documents(job: TokenizeJob) -> list[str]:
    """The documents in the job's byte range, as ``llm.data.clean.iter_documents`` reads them."""
    with open(job.source, "rb") as f:
        f.seek(job.start)
        data = f.read(job.end - job.start)
    if not data:
        return []
    data = data.removesuffix(_BETWEEN_DOCS[1:])  # a shard that is not the last ends with a separator line
    docs = data.decode("utf-8").split(_BETWEEN_DOCS.decode())
    docs[-1] = docs[-1].removesuffix("\n")
    return docs


def tokenize_shard(job: TokenizeJob) -> dict:
    """Encode one shard into its part file; returns its ``tokens``, ``bytes`` and ``documents``."""
    tokenizer = _load_tokenizer(job.tokenizer_dir)
    n_tokens = n_bytes = 0
    docs = _shard_documents(job)
    with open(job.part, "wb") as f:
        for doc in docs:
            for starts_doc, piece in _pieces(doc):
                ids = document_start_ids(tokenizer) if starts_doc else []
                for run in _line_runs(piece) if tokenizer.newline_splits else [piece]:
                    ids.extend(tokenizer.encode(run))
                f.write(np.asarray(ids, dtype=job.dtype).tobytes())
                n_tokens += len(ids)
            n_bytes += len(doc.encode("utf-8"))
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": len(docs)}


def _document_boundaries(path: Path, shards: int) -> list[int]:
    """Byte offsets that cut ``path`` into about ``shards`` runs of whole documents: [0, ..., size]."""
    size = path.stat().st_size
    cuts = [0]
    if size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            step = max(1, -(-size // max(1, shards)))
            while True:
                found = data.find(_BETWEEN_DOCS, cuts[-1] + step - 1)
                if found < 0:
                    break
                cuts.append(found + len(_BETWEEN_DOCS))
    if cuts[-1] != size:
        cuts.append(size)
    return cuts if len(cuts) > 1 else [0, 0]


def plan_tokenize(clean_dir: Path, tokenizer_dir: Path, out_dir: Path, shards: int) -> tuple[list[TokenizeJob], dict]:
    """The shards of both splits, train's first, each split in about ``shards`` pieces of whole documents
    (each between SHARD_BYTES_MIN and SHARD_BYTES_MAX), and the meta dict without the splits. Creates the
    folder for the parts beside ``out_dir`` (``finish_tokenize`` removes it). Raises TokenDataError when a
    split file is missing."""
    clean_dir, tokenizer_dir, out_dir = Path(clean_dir), Path(tokenizer_dir), Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    sources = {split: clean_dir / f"{split}.txt" for split in SPLITS}
    for src in sources.values():
        if not src.exists():
            raise TokenDataError(f"{src}: missing; run the clean stage first")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*(f"{split}.bin" for split in SPLITS), META_FILE]:
        remove_stale_temp_files(out_dir / name)  # left by a run that died mid-write
    remove_stale_temp_files(out_dir)  # part folders of crashed runs
    parts = out_dir.parent / f".{out_dir.name}.parts-{secrets.token_hex(6)}.tmp"
    parts.mkdir()
    jobs = []
    for split, src in sources.items():
        size = src.stat().st_size
        target = max(SHARD_BYTES_MIN, min(SHARD_BYTES_MAX, -(-size // max(1, shards))))
        n = max(1, -(-size // target))
        cuts = _document_boundaries(src, n)
        for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
            jobs.append(TokenizeJob(split, src, start, end, tokenizer_dir, parts / f"{split}.{i:06d}.bin", dtype.name))
    meta: dict = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_kind": tokenizer.kind,
        "bos_id": tokenizer.bos_id,
        "splits": {},
    }
    return jobs, meta


def finish_tokenize(out_dir: Path, jobs: Sequence[TokenizeJob], results: Iterable[dict], meta: dict) -> dict:
    """Join the parts of each split in order into ``out_dir/{split}.bin`` and write ``meta.json``, each
    atomically; removes the parts, also on error. Returns the meta dict. Raises TokenDataError if a split
    is empty."""
    out_dir = Path(out_dir)
    try:
        results = list(results)
        for split in SPLITS:
            mine = [(job, result) for job, result in zip(jobs, results) if job.split == split]
            totals = {key: sum(r[key] for _, r in mine) for key in ("tokens", "bytes", "documents")}
            if totals["tokens"] == 0:
                raise TokenDataError(f"{mine[0][0].source}: no documents to tokenize")
            with atomic_file(out_dir / f"{split}.bin", binary=True) as f:
                for job, _ in mine:
                    with open(job.part, "rb") as part:
                        shutil.copyfileobj(part, f, 1 << 22)
                    job.part.unlink()
            meta["splits"][split] = {**totals, "tokens_per_byte": totals["tokens"] / max(1, totals["bytes"])}
        atomic_write_json(out_dir / META_FILE, meta)
    finally:
        if jobs:
            shutil.rmtree(jobs[0].part.parent, ignore_errors=True)
    return meta


def tokenize_corpus(
    clean_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, workers: int | None = None,
    mapper: ShardMapper | None = None,
) -> dict:
    """Encode ``clean_dir/{train,val}.txt`` into ``out_dir/{train,val}.bin`` and write ``meta.json``.

    The splits are encoded in shards of whole documents by ``mapper`` (default: a pool of ``workers``
    processes, every core), each worker reading its shard from the file and writing its ids to a part
    file, so memory stays bounded whatever the corpus size. Returns the meta dict. Raises TokenDataError
    if a split file is missing or empty.
    """
    workers = workers or os.cpu_count() or 1
    jobs, meta = plan_tokenize(Path(clean_dir), Path(tokenizer_dir), Path(out_dir), shards=4 * workers)
    try:
        results = list((mapper or map_in_processes(workers))(tokenize_shard, jobs))
    except BaseException:
        shutil.rmtree(jobs[0].part.parent, ignore_errors=True)
        raise
    return finish_tokenize(Path(out_dir), jobs, results, meta)
