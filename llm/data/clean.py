"""The clean stage: normalise raw text documents, drop boilerplate and duplicates, split train from val.

Each ``.txt`` file of the corpus is one document, and so is each row of a Parquet or JSON Lines shard (its
``text`` column, read a row group or a line at a time by ``llm.data.corpus.read_shard``; named
``<path>#<row>``). ``clean_corpus`` cleans every document, drops the
ones that are too short, exact duplicates or near duplicates, splits the rest into train and val, and
writes ``train.txt``, ``val.txt`` and ``stats.json``.

The split. By default whole documents go to train or val by a seeded hash of their path
(``split_documents``: ``round(val_fraction * n)`` documents, at least one, to val). A corpus has too few
documents for that when the split by document cannot give val at least one document holding roughly
``val_fraction`` of the bytes: when there is a single document (one big ``.txt``, as for nanoGPT or
char-rnn), or when the documents drawn for val hold more than half of the bytes (``VAL_SHARE_MAX``) or
less than a tenth of ``val_fraction`` of them (``VAL_SHARE_MIN_RATIO``), as with one large book beside a
README. Such a corpus is cut into two contiguous sections instead (``split_into_sections``): the documents
in path order are read as one text, and its last ``val_fraction`` of the bytes, moved to the nearest line
start, is val; the document holding the cut is split there, so val never overlaps train. ``stats.json``
records the method under ``split``, with the reason and, for sections, each section's document and
character range in the cleaned document. A corpus that cannot give both splits some text (a single
document of one character) is an error that says what to add. Multi-document corpora such as the default
Shakespeare are split by document, exactly as before.

Split file format (``write_documents`` / ``iter_documents``): UTF-8, ``\\n`` line endings, documents in
sorted-path order joined by a separator line holding only U+001E (RECORD SEPARATOR), and one final
``\\n``: ``doc1 \\n \\x1e \\n doc2 \\n ... docN \\n``. An empty split is an empty file. Cleaning removes
control characters, so U+001E never occurs inside a document.

Near duplicates: two documents are near duplicates when the Jaccard similarity of their sets of word
k-shingles (k = ``shingle_size``; words are runs of letters/digits, lower-cased, punctuation dropped) is
at least ``near_dup_threshold``. Candidate pairs are every pair for small corpora, else the pairs that
MinHash + LSH banding puts in a common bucket; every candidate is then checked with the exact Jaccard,
so MinHash only decides which pairs get checked, never the outcome. Each document's shingle set is computed
once, when it is cleaned: kept in memory for a small corpus, else spooled beside its text (8 bytes a shingle),
and the candidates are checked from the spooled sets by ``verify_pairs`` jobs on every core. Low-entropy text
(logs, code, tables, templated text) gives many candidates; the check then scales with them.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import multiprocessing as mp
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.config import DataParams
from llm.data.corpus import (
    TEXT_FIELD,
    CorpusError,
    iter_corpus_files,
    parquet_row_group_sizes,
    read_shard,
    shard_suffix,
)
from llm.io import atomic_file, atomic_write_json, remove_stale_temp_files

log = logging.getLogger(__name__)

DOC_SEPARATOR = "\x1e"
_SEPARATOR_LINE = DOC_SEPARATOR + "\n"
SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}
STATS_FILE = "stats.json"

# a split by document is kept only if val's documents hold between VAL_SHARE_MIN_RATIO * val_fraction and
# VAL_SHARE_MAX of the bytes: more, and train would be smaller than val; less, and val would be noise
VAL_SHARE_MAX = 0.5
VAL_SHARE_MIN_RATIO = 0.1

# below this many documents every pair is checked exactly; above it MinHash + LSH picks the candidates
EXACT_ALL_PAIRS_MAX_DOCS = 100
# LSH uses the most rows per band whose chance of catching a pair at exactly the threshold is this high
LSH_TARGET_RECALL = 0.999
MINHASH_SEED = 0x5EED_0F_5EA


# ---------------------------------------------------------------------------------------------------
# Cleaning

# C0 and C1 controls except \n and \t, DEL, the byte-order mark and zero-width space
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\u200b]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_EXCESS_BLANK_LINES = re.compile(r"\n{4,}")


def normalize_text(text: str) -> str:
    """Unicode NFC, ``\\n`` line endings, tabs as spaces, no control characters, no trailing spaces,
    at most two blank lines in a row, no blank lines at either end.

    Leading spaces on the first line are kept (they are indentation, as in the First Folio texts).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL_CHARS.sub("", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = text.expandtabs(4)
    # the regexes only where they can match (in ASCII, only " " and "\n" are whitespace by now)
    if not text.isascii() or " \n" in text or text.endswith(" "):
        text = _TRAILING_SPACE.sub("", text)
    if "\n\n\n\n" in text:
        text = _EXCESS_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


# the line after which the text starts (modern "*** START OF ..." marker; the end of the 1990s small print)
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THIS|THE) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|\*END\*[ \t]*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
# the line from which the rest is trailer (end markers, or a small print block placed after the text)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THIS|THE) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the |this )?Project Gutenberg"
    r"|\*+[ \t]*START\*+[ \t]*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
# the World Library notice repeated through the 1990s Gutenberg Shakespeare: <<THIS ELECTRONIC VERSION ...>>
_WORLD_LIBRARY_NOTICE = re.compile(r"\s*<<THIS ELECTRONIC VERSION OF.*?>>[^\S\n]*", re.IGNORECASE | re.DOTALL)
_BOILERPLATE_PARAGRAPH = re.compile(r"project gutenberg|gutenberg-tm|gutenberg\.org|world library, inc", re.IGNORECASE)
_CREDIT_PARAGRAPH = re.compile(
    r"^\s*(?:produced by|e-?text prepared by|this e-?(?:text|book) was (?:prepared|produced) by|transcribed from)",
    re.IGNORECASE,
)
_PARAGRAPH_BREAK = re.compile(r"(\n(?:[^\S\n]*\n)+)")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, licences and notices, keeping the work itself.

    Cuts everything up to the first start marker (``*** START OF THIS PROJECT GUTENBERG EBOOK ...`` or,
    in 1990s texts, ``*END*THE SMALL PRINT!...``) and from the first end marker after it (``*** END OF
    ...``, ``End of the Project Gutenberg EBook ...``, a small-print block placed after the text). Then
    removes ``<<THIS ELECTRONIC VERSION ...>>`` notices, every paragraph that names Project Gutenberg,
    and "Produced by ..." credits among the first paragraphs. Text without boilerplate is returned as is.
    """
    # each search only where a substring it needs occurs (in ASCII text, where lower() is what IGNORECASE does)
    low = text.lower() if text.isascii() else None
    if low is None or "***" in low or "*end*" in low:
        start = _GUTENBERG_START.search(text)
        if start:
            text = text[start.end() :]
    if low is None or "*" in low or "project gutenberg" in low:
        end = _GUTENBERG_END.search(text)
        if end:
            text = text[: end.start()]
    if low is None or "<<" in low:
        text = _WORLD_LIBRARY_NOTICE.sub("", text)
    # one search of the whole text: no match spans a paragraph break (the patterns hold no newline)
    hits = []
    if low is None or "gutenberg" in low or "world library, inc" in low:
        hits = [m.start() for m in _BOILERPLATE_PARAGRAPH.finditer(text)]
    # paragraphs at even indices, the breaks between them at odd ones; without hits only the first five
    # paragraphs (the credits) can be dropped, and the rest stays one piece
    pieces = _PARAGRAPH_BREAK.split(text, maxsplit=0 if hits else 5)
    kept: list[str] = []
    start = 0
    for i in range(0, len(pieces), 2):
        paragraph = pieces[i]
        end = start + len(paragraph)
        first_hit = bisect.bisect_left(hits, start)
        drop = (first_hit < len(hits) and hits[first_hit] < end) or (
            i < 10 and bool(_CREDIT_PARAGRAPH.match(paragraph)))
        start = end + (len(pieces[i + 1]) if i + 1 < len(pieces) else 0)
        if not drop:
            if kept:
                kept.append(pieces[i - 1])
            kept.append(paragraph)
    return "".join(kept)


def clean_text(text: str, strip_gutenberg: bool = True) -> str:
    """The whole cleaning of one document: normalise, then (optionally) strip Gutenberg boilerplate."""
    text = normalize_text(text)
    if strip_gutenberg:
        stripped = strip_gutenberg_boilerplate(text)
        if stripped != text:  # normalize_text is idempotent: text without boilerplate is already normal
            text = normalize_text(stripped)
    return text


# ---------------------------------------------------------------------------------------------------
# Shingles, Jaccard and MinHash

_WORD = re.compile(r"\w+")
_U64 = np.uint64
_word_hash_cache: dict[str, int] = {}


def _word_hashes(words: list[str]) -> np.ndarray:
    """blake2b-64 of each word (cached per process: a corpus has far fewer distinct words than words)."""
    cache = _word_hash_cache
    for word in set(words).difference(cache):
        cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over every output bit (uint64 wraps on purpose)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def word_shingles(text: str, k: int = 5) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's word k-shingles (lower-cased words, punctuation dropped).

    A text with fewer than k words has its whole word sequence as its one shingle; a text without words
    has none. Hashes are stable across runs and machines (blake2b of each word, combined positionally).
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        wh = _word_hashes(words)
        n = max(1, len(words) - k + 1)
        h = np.zeros(n, dtype=np.uint64)
        for j in range(min(k, len(words))):
            h = h * _U64(0x100000001B3) + wh[j : j + n]
        return _sorted_unique(_mix64(h))


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D array (sort, then drop repeats): far faster than numpy 2's hash-based unique."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def _intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    """Size of the intersection of two sorted unique arrays."""
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 0
    if len(a) * 16 < len(b):  # far smaller: a binary search of each of its values
        idx = np.minimum(np.searchsorted(b, a), len(b) - 1)
        return int(np.count_nonzero(b[idx] == a))
    # similar sizes: a stable sort (timsort) of two sorted runs is one merge, half the time of the searches
    merged = np.concatenate((a, b))
    merged.sort(kind="stable")
    return int(np.count_nonzero(merged[1:] == merged[:-1]))


def _pairwise_intersections(shingle_sets: Sequence[np.ndarray], buckets: int = 16) -> np.ndarray:
    """[n, n] int64: entry (i, j), i < j, is the size of the intersection of sorted unique sets i and j.

    The sets' values are sorted together, one range of values (``buckets`` of them) at a time to bound the
    temporaries; each run of equal values, the sets holding that value in index order, adds one to every
    pair of its sets.
    """
    n = len(shingle_sets)
    counts = np.zeros((n, n), dtype=np.int64)
    if n < 2:
        return counts
    owner_type = np.min_scalar_type(n)
    edges = [np.uint64(b * (2**64 // buckets)) for b in range(1, buckets)]
    bounds = [np.searchsorted(s, edges) if len(s) else np.zeros(len(edges), dtype=np.int64) for s in shingle_sets]
    for b in range(buckets):
        parts = [s[(bounds[i][b - 1] if b else 0) : (bounds[i][b] if b < len(edges) else len(s))]
                 for i, s in enumerate(shingle_sets)]
        values = np.concatenate(parts)
        if len(values) < 2:
            continue
        owners = np.repeat(np.arange(n, dtype=owner_type), [len(p) for p in parts])
        order = np.argsort(values, kind="stable")  # stable: a run lists its sets in index order
        values, owners = values[order], owners[order]
        del order
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        del values
        lengths = np.diff(np.append(starts, len(owners)))
        for length in np.unique(lengths[lengths > 1]).tolist():
            runs = owners[starts[lengths == length][:, None] + np.arange(length)]  # [runs, length] set indices
            for p in range(length - 1):
                for q in range(p + 1, length):
                    np.add.at(counts, (runs[:, p], runs[:, q]), 1)
    return counts


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique shingle arrays; 0.0 when both are empty."""
    inter = _intersection_size(a, b)
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of the word k-shingle sets of two texts (see ``word_shingles``)."""
    return jaccard(word_shingles(a, k), word_shingles(b, k))


def minhash_signatures(shingle_sets: Sequence[np.ndarray], num_perm: int, seed: int = MINHASH_SEED) -> np.ndarray:
    """MinHash signatures, shape [docs, num_perm] uint64: per permutation, the minimum over a document's
    shingles of ``a*x + b mod 2**64`` (a odd, so each is a permutation of 64-bit values).

    The fraction of equal columns of two rows estimates their Jaccard (std ~ sqrt(J(1-J)/num_perm)).
    A document without shingles gets all-max values.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * _U64(2) + _U64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    sig = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    chunk = max(1, (1 << 18) // num_perm)  # one [chunk, num_perm] buffer of 2 MiB, reused (stays in cache)
    buf = np.empty((chunk, num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, shingles in enumerate(shingle_sets):
            mixed = _mix64(np.asarray(shingles, dtype=np.uint64))  # a*x+b is only as random as x
            for s in range(0, len(mixed), chunk):
                x = mixed[s : s + chunk, None]
                out = buf[: len(x)]
                np.multiply(x, a, out=out)
                out += b
                np.minimum(sig[i], out.min(axis=0), out=sig[i])
    return sig


def lsh_rows_per_band(threshold: float, num_perm: int, target_recall: float = LSH_TARGET_RECALL) -> int:
    """Rows per LSH band: the most rows r such that a pair at exactly ``threshold`` shares at least one of
    the ``num_perm // r`` bands with probability ``target_recall`` (1 when even r = 1 falls short)."""
    for r in range(num_perm, 0, -1):
        if 1.0 - (1.0 - threshold**r) ** (num_perm // r) >= target_recall:
            return r
    return 1


def lsh_candidate_pairs(signatures: np.ndarray, rows: int) -> set[tuple[int, int]]:
    """Pairs (i < j) of documents whose signatures agree on every row of at least one band."""
    num_perm = signatures.shape[1]
    # a document without shingles has an all-max signature: it would share every band with the others
    has_shingles = ~(signatures == np.iinfo(np.uint64).max).all(axis=1)
    pairs: set[tuple[int, int]] = set()
    for start in range(0, num_perm - rows + 1, rows):
        buckets: dict[bytes, list[int]] = {}
        for i in np.flatnonzero(has_shingles).tolist():
            buckets.setdefault(signatures[i, start : start + rows].tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    return pairs


@dataclass(frozen=True)
class NearDuplicate:
    """Document ``dropped`` is a near duplicate of the earlier, kept document ``kept`` (indices)."""

    kept: int
    dropped: int
    jaccard: float


PairJaccards = Callable[[Sequence[tuple[int, int]]], Sequence[float]]
"""``jaccards(pairs)``: the exact Jaccard similarity of each pair (i, j) of documents, in order."""


def find_near_duplicates(
    sizes: Sequence[int],
    threshold: float,
    jaccards: PairJaccards,
    signatures: np.ndarray | None = None,
    num_perm: int = 128,
) -> tuple[list[NearDuplicate], dict]:
    """Which documents to drop as near duplicates, given each one's shingle count in keep-preference order.

    Candidate pairs are every pair when ``signatures`` is None, else the pairs that MinHash + LSH banding
    (rows per band from ``lsh_rows_per_band``) puts in a common bucket; a pair whose sizes alone bound its
    Jaccard below ``threshold`` is never checked. ``jaccards`` gives the exact Jaccard of the candidates
    left (``jaccards_in_memory`` for shingle sets in memory). Going through the documents in order, a
    document is dropped when its Jaccard with an earlier kept document is at least ``threshold``; so the
    first document of each cluster is kept.

    Returns the drops (each with the kept document it matched best) and a dict describing the search.
    """
    n = len(sizes)
    info: dict = {"documents": n}
    if signatures is None:
        candidates: Iterable[tuple[int, int]] = ((i, j) for i in range(n) for j in range(i + 1, n))
        info.update(method="exact_all_pairs", candidate_pairs=n * (n - 1) // 2)
    else:
        rows = lsh_rows_per_band(threshold, num_perm)
        bands = num_perm // rows
        candidates = sorted(lsh_candidate_pairs(signatures, rows))
        info.update(method="minhash_lsh", num_perm=num_perm, bands=bands, rows_per_band=rows,
                    recall_at_threshold=round(1.0 - (1.0 - threshold**rows) ** bands, 6),
                    candidate_pairs=len(candidates))

    def may_reach_threshold(pair: tuple[int, int]) -> bool:
        small, large = sorted((sizes[pair[0]], sizes[pair[1]]))
        return large > 0 and small >= threshold * large  # Jaccard <= |small| / |large|

    checked = [pair for pair in candidates if may_reach_threshold(pair)]
    info["checked_pairs"] = len(checked)
    similar: dict[int, list[tuple[int, float]]] = {}
    for (i, j), sim in zip(checked, jaccards(checked), strict=True):
        if sim >= threshold:
            similar.setdefault(j, []).append((i, sim))
    keep = [True] * n
    drops: list[NearDuplicate] = []
    for j in range(n):
        matches = [(sim, -i) for i, sim in similar.get(j, []) if keep[i]]
        if matches:
            sim, neg_i = max(matches)
            keep[j] = False
            drops.append(NearDuplicate(kept=-neg_i, dropped=j, jaccard=sim))
    return drops, info


def jaccards_in_memory(shingle_sets: Sequence[np.ndarray]) -> PairJaccards:
    """``PairJaccards`` of sorted unique shingle sets held in memory: one sort of all the sets when most
    pairs are asked for (``_pairwise_intersections``), else one search per pair."""

    def jaccards(pairs: Sequence[tuple[int, int]]) -> list[float]:
        n = len(shingle_sets)
        if len(pairs) < n:
            return [jaccard(shingle_sets[i], shingle_sets[j]) for i, j in pairs]
        shared = _pairwise_intersections(shingle_sets)
        sims = []
        for i, j in pairs:
            inter = int(shared[i, j])
            union = len(shingle_sets[i]) + len(shingle_sets[j]) - inter
            sims.append(inter / union if union else 0.0)
        return sims

    return jaccards


# ---------------------------------------------------------------------------------------------------
# Split and split files


def split_documents(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Send whole documents to train or val by a seeded sha256 of their name (relative path).

    The ``round(val_fraction * n)`` documents with the smallest hashes go to val, with at least one
    document in each split when there are two or more. Returns (train, val), each in the order given.
    """
    n = len(names)
    n_val = math.floor(val_fraction * n + 0.5)
    n_val = min(max(n_val, 1), n - 1) if n >= 2 else 0
    ranked = sorted(names, key=lambda name: hashlib.sha256(f"{seed}\x00{name}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [x for x in names if x not in val], [x for x in names if x in val]


_NON_SPACE = re.compile(r"\S")


@dataclass(frozen=True)
class Section:
    """The characters ``[start, end)`` of the cleaned document ``document``: one piece of a split."""

    document: str
    start: int
    end: int

    def of(self, text: str) -> str:
        """This section of ``text``, the cleaned document it names."""
        return text[self.start : self.end]


def split_into_sections(
    names: Sequence[str], chars: Sequence[int], sizes: Sequence[int], text_of: Callable[[int], str],
    val_fraction: float,
) -> tuple[list[Section], list[Section]]:
    """Cut the documents ``names``, read in that order as one text, into a train section and the val section
    after it, which holds about the last ``val_fraction`` of the bytes. ``chars`` and ``sizes`` are each
    document's length in characters and UTF-8 bytes; ``text_of(i)`` reads document i (only the one that
    holds the cut is read).

    The cut is moved to the nearest line start (or document boundary), or to the nearest word start in
    a text without line breaks; the whitespace at the cut belongs to neither side. Returns (train, val)
    as lists of sections in text order; both are non-empty and never overlap.

    Raises ValueError when the text is too short to give both sides a character.
    """
    total = sum(sizes)
    val_bytes = min(max(1, math.floor(val_fraction * total + 0.5)), total - 1)
    cut = total - val_bytes  # byte offset of the cut in the whole text
    i, doc_start = 0, 0
    while i < len(sizes) - 1 and doc_start + sizes[i] <= cut:
        doc_start += sizes[i]
        i += 1
    text = text_of(i)
    target = len(text.encode("utf-8")[: max(0, cut - doc_start)].decode("utf-8", errors="ignore"))
    start = _nearest_cut(text, target, may_start=i > 0, may_end=i < len(sizes) - 1)
    if start is None:
        raise ValueError(f"{sum(chars)} character(s) cannot be cut into a train and a val section")
    head_end = len(text[:start].rstrip())
    train = [Section(n, 0, c) for n, c in zip(names[:i], chars[:i])]
    val = [Section(n, 0, c) for n, c in zip(names[i + 1 :], chars[i + 1 :])]
    if head_end > 0:
        train.append(Section(names[i], 0, head_end))
    if start < len(text):
        val.insert(0, Section(names[i], start, len(text)))
    return train, val


def _nearest_cut(text: str, target: int, *, may_start: bool, may_end: bool) -> int | None:
    """Where to cut ``text`` near character ``target``: the nearest line start, the document's start or end
    where allowed (a neighbouring document keeps the other side non-empty), else the nearest word start,
    else ``target`` itself. None when no position leaves text on both sides."""

    def usable(pos: int) -> bool:
        if pos == 0:
            return may_start
        if pos == len(text):
            return may_end
        return 0 < pos < len(text) and bool(_NON_SPACE.search(text, 0, pos)) and bool(_NON_SPACE.search(text, pos))

    for separator in ("\n", " "):
        before, after = text.rfind(separator, 0, target), text.find(separator, target)
        candidates = [0, len(text)] if separator == "\n" else []
        candidates += [pos + 1 for pos in (before, after) if pos >= 0]
        usable_candidates = [pos for pos in candidates if usable(pos)]
        if usable_candidates:
            return min(usable_candidates, key=lambda pos: (abs(pos - target), pos))
    clamped = min(max(target, 1), len(text) - 1)
    return clamped if usable(clamped) else None


def write_documents(path: Path, docs: Iterable[str | bytes]) -> None:
    """Write documents (text, or UTF-8 bytes) to ``path`` in the split file format (see the module
    docstring), atomically, taking one document at a time from ``docs``.

    Raises ValueError for a document containing DOC_SEPARATOR; ``path`` is then left untouched.
    """
    separator = DOC_SEPARATOR.encode()
    with atomic_file(path, binary=True) as f:
        for i, doc in enumerate(docs):
            data = doc.encode("utf-8") if isinstance(doc, str) else doc
            if separator in data:
                raise ValueError(f"document {i} contains the separator character U+001E; clean it first")
            if i:
                f.write(_SEPARATOR_LINE.encode())
            f.write(data)
            f.write(b"\n")


def iter_documents(path: Path) -> Iterator[str]:
    """Stream the documents of a split file back, one at a time, reading it line by line."""
    lines: list[str] = []
    any_line = False
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            any_line = True
            if line == _SEPARATOR_LINE:
                yield _without_final_newline("".join(lines))
                lines = []
            else:
                lines.append(line)
    if any_line:
        yield _without_final_newline("".join(lines))


def _without_final_newline(text: str) -> str:
    return text.removesuffix("\n")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# The stage
#
# In two passes, so that memory holds per-document fingerprints, never the corpus. ``clean_shard`` cleans a
# shard of files (any process, any machine that sees the files), writes each cleaned text to a spool folder
# beside ``out_dir`` and returns its sizes, sha256 and shingle fingerprint; ``finish_clean`` then drops
# duplicates (reading back the two texts of each near-duplicate candidate), splits, and streams the spooled
# texts into the split files. ``clean_corpus`` runs both with a local process pool; flows/data.py maps the
# shards as Prefect tasks instead.

# a shard of files holds at most this many bytes (several shards per worker balance the load), and at least
# this many unless the corpus is smaller: below it, starting worker processes costs more than it saves
SHARD_BYTES_MAX = 64 << 20
SHARD_BYTES_MIN = 16 << 20
# a verify_pairs job keeps the shingle sets it read up to this many bytes
SHINGLE_CACHE_BYTES = 16 << 20
# near-duplicate candidates per verify_pairs job, at least: fewer are checked without starting processes
VERIFY_PAIRS_MIN = 256

ShardMapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]
"""``mapper(fn, items)``: ``fn(item)`` for every item, results in the order of ``items``."""


@dataclass(frozen=True)
class CorpusPart:
    """A file of the corpus (relative path) or, for a Parquet shard, a run of its row groups."""

    name: str
    row_groups: tuple[int, int] | None = None  # [start, end) of a Parquet shard; None: the whole file


@dataclass(frozen=True)
class CleanJob:
    """One shard of the clean stage: the files (or runs of row groups) to clean, and where their texts go."""

    params: DataParams
    corpus_dir: Path
    spool_dir: Path
    parts: tuple[CorpusPart, ...]
    keep_shingles: bool  # a corpus small enough to check every pair keeps shingle sets, else MinHash signatures


@dataclass(frozen=True)
class CleanedDocument:
    """One document after cleaning: sizes and fingerprints; its text waits in the spool folder (``spool_path``).
    A ``.txt`` file is one document, named by its path; a shard's row is one, named ``<path>#<row>``."""

    name: str
    chars: int
    bytes: int
    words: int
    digest: bytes
    n_shingles: int = 0
    shingles: np.ndarray | None = None
    signature: np.ndarray | None = None


def _read_document(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte {err.start} ({data[err.start : err.start + 4]!r}); "
            f"convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def spool_path(spool_dir: Path, name: str) -> Path:
    """Where the cleaned text of document ``name`` is spooled."""
    return Path(spool_dir) / (hashlib.sha256(name.encode("utf-8")).hexdigest()[:32] + ".txt")


def shingle_spool_path(spool_dir: Path, name: str) -> Path:
    """Where the shingle set of document ``name`` is spooled (raw little-endian uint64, sorted)."""
    return spool_path(spool_dir, name).with_suffix(".shingles")


def _part_documents(corpus_dir: Path, part: CorpusPart) -> Iterator[tuple[str, str]]:
    """(name, raw text) of each document of a part: the file itself, or each row of a shard's row groups."""
    path = corpus_dir / part.name
    if shard_suffix(path) is None:
        yield part.name, _read_document(path)
        return
    groups = None if part.row_groups is None else range(*part.row_groups)
    for row, text in read_shard(path, TEXT_FIELD, groups):
        yield f"{part.name}#{row}", text


def clean_shard(job: CleanJob) -> list[CleanedDocument]:
    """Clean the documents of one shard: spool each text long enough to keep (and, for a large corpus, its
    shingle set) and return what ``finish_clean`` needs of it. Raises CorpusError for a file that is not
    valid UTF-8 or a shard that cannot be read (``llm.data.corpus.read_shard``)."""
    params = job.params
    docs = []
    for part in job.parts:
        for name, raw in _part_documents(job.corpus_dir, part):
            text = clean_text(raw, params.strip_gutenberg)
            if not text or len(text) < params.min_doc_chars:
                docs.append(CleanedDocument(name, len(text), 0, 0, b""))
                continue
            data = text.encode("utf-8")
            spool_path(job.spool_dir, name).write_bytes(data)
            shingles = signature = None
            n_shingles = 0
            if params.dedup_near:
                shingles = word_shingles(text, params.shingle_size)
                n_shingles = len(shingles)
                if not job.keep_shingles:  # computed once: candidates are checked on the spooled set
                    signature = minhash_signatures([shingles], params.num_perm)[0]
                    shingles.astype("<u8", copy=False).tofile(shingle_spool_path(job.spool_dir, name))
                    shingles = None
            docs.append(CleanedDocument(name, len(text), len(data), len(text.split()),
                                        hashlib.sha256(data).digest(), n_shingles, shingles, signature))
    return docs


def _corpus_parts(
    corpus_dir: Path, files: list[Path], target: int | None = None
) -> list[tuple[CorpusPart, int, int | None]]:
    """(part, bytes, documents or None when unknown) of the corpus ``files`` in order: a ``.txt`` or JSON
    Lines file whole, a Parquet shard cut into runs of row groups of about ``target`` uncompressed bytes."""
    parts: list[tuple[CorpusPart, int, int | None]] = []
    for path in files:
        name = path.relative_to(corpus_dir).as_posix()
        suffix = shard_suffix(path)
        if suffix is None:
            parts.append((CorpusPart(name), path.stat().st_size, 1))
        elif suffix != ".parquet":
            parts.append((CorpusPart(name), path.stat().st_size, None))
        else:
            groups = parquet_row_group_sizes(path)
            start = rows = size = 0
            for g, (n_rows, n_bytes) in enumerate(groups):
                rows, size = rows + n_rows, size + n_bytes
                if g == len(groups) - 1 or (target is not None and size + groups[g + 1][1] > target):
                    parts.append((CorpusPart(name, (start, g + 1)), size, rows))
                    start, rows, size = g + 1, 0, 0
    return parts


def plan_clean(params: DataParams, corpus_dir: Path, out_dir: Path, shards: int) -> list[CleanJob]:
    """The shards of the clean stage: the corpus's files in sorted-path order (a Parquet shard's row groups
    in order), cut into about ``shards`` runs of similar byte size (each between SHARD_BYTES_MIN and
    SHARD_BYTES_MAX; a text file or a row group is never cut). Creates the spool folder beside ``out_dir``
    (``finish_clean`` removes it). Raises CorpusError when the folder holds no .txt file or shard, or a
    ``.parquet`` file that is not Parquet. Only footers are read here, without pyarrow; a shard's text column
    is checked by the worker that reads it (``clean_shard``)."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    files = iter_corpus_files(corpus_dir)
    total = sum(size for _, size, _ in _corpus_parts(corpus_dir, files))
    target = max(SHARD_BYTES_MIN, min(SHARD_BYTES_MAX, math.ceil(total / max(1, shards))))
    parts = _corpus_parts(corpus_dir, files, target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)  # spool folders of crashed runs
    spool_dir = out_dir.parent / f".{out_dir.name}.spool-{secrets.token_hex(6)}.tmp"
    spool_dir.mkdir()
    counts = [n for _, _, n in parts]
    # every pair is checked in memory only when the documents are known to be few (JSON Lines are not counted)
    keep_shingles = None not in counts and sum(counts) <= EXACT_ALL_PAIRS_MAX_DOCS  # type: ignore[arg-type]
    jobs, run, size = [], [], 0
    for part, n, _ in parts:
        if run and size + n > target:
            jobs.append(CleanJob(params, corpus_dir, spool_dir, tuple(run), keep_shingles))
            run, size = [], 0
        run.append(part)
        size += n
    jobs.append(CleanJob(params, corpus_dir, spool_dir, tuple(run), keep_shingles))
    return jobs


def map_in_processes(workers: int | None = None) -> ShardMapper:
    """A ShardMapper on a pool of ``workers`` processes (default: every core); inline for one item or worker."""

    def mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterable[Any]:
        n = min(len(items), workers or os.cpu_count() or 1)
        if n <= 1:
            return [fn(item) for item in items]
        # spawn: fork would copy the parent's threads (torch's, a server's) into the workers
        with mp.get_context("spawn").Pool(n) as pool:
            return pool.map(fn, items, chunksize=1)

    return mapper


def _read_spooled(spool_dir: Path, name: str) -> str:
    return spool_path(spool_dir, name).read_bytes().decode("utf-8")


def _drop_exact_duplicates(docs: list[CleanedDocument]) -> tuple[list[CleanedDocument], list[dict]]:
    """Keep the first document of each identical text: the documents kept and the dropped pairs."""
    first_with: dict[bytes, str] = {}
    unique, dups = [], []
    for doc in docs:
        if doc.digest in first_with:
            dups.append({"kept": first_with[doc.digest], "dropped": doc.name})
            continue
        first_with[doc.digest] = doc.name
        unique.append(doc)
    return unique, dups


def _drop_near_duplicates(
    docs: list[CleanedDocument], params: DataParams, spool_dir: Path, mapper: ShardMapper | None, workers: int
) -> tuple[list[CleanedDocument], list[dict], dict]:
    """Drop near duplicates (see the module docstring): the documents kept, the dropped pairs with their
    Jaccard similarity, and how the candidates were found. A small corpus's shingle sets are in memory;
    a large one's candidates are checked by ``verify_pairs`` jobs, on ``mapper``, from the shingle sets
    that ``clean_shard`` spooled."""
    sizes = [d.n_shingles for d in docs]
    if all(d.shingles is not None for d in docs):
        jaccards = jaccards_in_memory([d.shingles for d in docs])  # type: ignore[misc]
    else:
        jaccards = _spooled_jaccards(docs, spool_dir, mapper, workers)
    signatures = None  # few documents (even if a large corpus had many before dropping some): every pair
    if len(docs) > EXACT_ALL_PAIRS_MAX_DOCS:
        signatures = np.stack([d.signature for d in docs])
    drops, info = find_near_duplicates(sizes, params.near_dup_threshold, jaccards, signatures, params.num_perm)
    dups = [{"kept": docs[d.kept].name, "dropped": docs[d.dropped].name, "jaccard": round(d.jaccard, 6)}
            for d in drops]
    dropped = {d.dropped for d in drops}
    return [d for i, d in enumerate(docs) if i not in dropped], dups, info


@dataclass(frozen=True)
class VerifyJob:
    """Near-duplicate candidates to check: pairs of indices into ``names``, whose shingle sets are spooled."""

    spool_dir: Path
    names: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]


def verify_pairs(job: VerifyJob) -> list[float]:
    """The exact Jaccard of each pair of ``job``, from the spooled shingle sets; each set is read once while
    it stays among the SHINGLE_CACHE_BYTES most recently used (pairs come sorted, so the first of a pair
    repeats)."""
    cache: OrderedDict[int, np.ndarray] = OrderedDict()
    cached_bytes = 0

    def shingles_of(i: int) -> np.ndarray:
        nonlocal cached_bytes
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        shingles = np.fromfile(shingle_spool_path(job.spool_dir, job.names[i]), dtype=np.uint64)
        cache[i] = shingles
        cached_bytes += shingles.nbytes
        while cached_bytes > SHINGLE_CACHE_BYTES and len(cache) > 2:  # the two of the pair being checked stay
            cached_bytes -= cache.popitem(last=False)[1].nbytes
        return shingles

    return [jaccard(shingles_of(i), shingles_of(j)) for i, j in job.pairs]


def _spooled_jaccards(
    docs: list[CleanedDocument], spool_dir: Path, mapper: ShardMapper | None, workers: int
) -> PairJaccards:
    """``PairJaccards`` of spooled shingle sets: the pairs, in order, cut into about 4 runs per worker, each a
    ``verify_pairs`` job on ``mapper`` (here, for a few pairs or without a mapper)."""

    def jaccards(pairs: Sequence[tuple[int, int]]) -> list[float]:
        size = max(VERIFY_PAIRS_MIN, math.ceil(len(pairs) / (4 * workers)))
        jobs = []
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            ids = sorted({i for pair in chunk for i in pair})
            local = {doc: k for k, doc in enumerate(ids)}
            jobs.append(VerifyJob(spool_dir, tuple(docs[i].name for i in ids),
                                  tuple((local[i], local[j]) for i, j in chunk)))
        run = mapper if mapper is not None and len(jobs) > 1 else _map_inline
        return [sim for sims in run(verify_pairs, jobs) for sim in sims]

    return jaccards


def _map_inline(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(item) for item in items]


def _split(
    docs: list[CleanedDocument], params: DataParams, corpus_dir: Path, spool_dir: Path
) -> tuple[dict[str, list[Section]], dict]:
    """The sections of each split (whole documents when split by document) and the ``split`` record of
    ``stats.json``: by document when the corpus has enough documents for it, else by sections (see the
    module docstring). Raises CorpusError, saying what to do, when a split would be empty."""
    by_name = {d.name: d for d in docs}
    names = [d.name for d in docs]
    total = sum(d.bytes for d in docs)
    reason = None
    if len(names) < 2:
        reason = "a single document: a split by document would leave val empty"
    else:
        train_names, val_names = split_documents(names, params.val_fraction, params.split_seed)
        share = sum(by_name[x].bytes for x in val_names) / total
        if share > VAL_SHARE_MAX:
            reason = (f"the {len(val_names)} document(s) drawn for val hold {share:.1%} of the bytes, more than "
                      f"{VAL_SHARE_MAX:.0%}")
        elif share < VAL_SHARE_MIN_RATIO * params.val_fraction:
            reason = (f"the {len(val_names)} document(s) drawn for val hold {share:.2%} of the bytes, less than "
                      f"{VAL_SHARE_MIN_RATIO:g} x val_fraction={params.val_fraction:g}")
        if reason is None:
            by_document = {"train": [Section(x, 0, by_name[x].chars) for x in train_names],
                           "val": [Section(x, 0, by_name[x].chars) for x in val_names]}
            return by_document, {"method": "documents", "val_bytes_share": round(share, 6)}
    try:
        train, val = split_into_sections(names, [d.chars for d in docs], [d.bytes for d in docs],
                                         lambda i: _read_spooled(spool_dir, names[i]), params.val_fraction)
    except ValueError as err:
        raise CorpusError(
            f"cannot split {corpus_dir} into train and val: {err}; add text to the corpus (at least a few "
            f"thousand characters, in one or more .txt files)"
        ) from None
    val_bytes = sum(_section_stats(s, by_name[s.document], spool_dir)["bytes"] for s in val)
    log.warning("%s: %s; split into contiguous sections instead: the last %.1f%% of the text is val",
                corpus_dir, reason, 100 * val_bytes / total)
    record = {
        "method": "sections",
        "reason": reason,
        "val_bytes_share": round(val_bytes / total, 6),
        "sections": {split: [{"document": s.document, "start": s.start, "end": s.end} for s in secs]
                     for split, secs in (("train", train), ("val", val))},
    }
    return {"train": train, "val": val}, record


def _section_stats(section: Section, doc: CleanedDocument, spool_dir: Path, text: str | None = None) -> dict:
    """chars, bytes and words of a section: the document's own counts when it is the whole document."""
    if section.start == 0 and section.end == doc.chars:
        return {"chars": doc.chars, "bytes": doc.bytes, "words": doc.words}
    piece = section.of(text if text is not None else _read_spooled(spool_dir, doc.name))
    return {"chars": len(piece), "bytes": len(piece.encode("utf-8")), "words": len(piece.split())}


def _write_split(path: Path, sections: list[Section], by_name: dict[str, CleanedDocument], spool_dir: Path) -> dict:
    """Stream the sections' spooled texts into ``path`` (``write_documents``); returns the split's
    docs/chars/bytes/words."""
    stats = {"docs": len(sections), "chars": 0, "bytes": 0, "words": 0}

    def texts() -> Iterator[bytes]:
        for section in sections:
            doc = by_name[section.document]
            data = spool_path(spool_dir, doc.name).read_bytes()
            if section.start == 0 and section.end == doc.chars:
                counts = _section_stats(section, doc, spool_dir)
            else:
                text = data.decode("utf-8")
                counts = _section_stats(section, doc, spool_dir, text)
                data = section.of(text).encode("utf-8")
            for key, value in counts.items():
                stats[key] += value
            yield data

    write_documents(path, texts())
    return stats


def finish_clean(
    params: DataParams, corpus_dir: Path, out_dir: Path, jobs: Sequence[CleanJob],
    shards: Iterable[list[CleanedDocument]], started: float | None = None, mapper: ShardMapper | None = None,
    workers: int | None = None,
) -> dict:
    """Deduplicate, split and write what ``clean_shard`` made of each job (``shards``, in job order); see
    ``clean_corpus``. Near-duplicate candidates are checked in ``verify_pairs`` jobs on ``mapper`` (default:
    here), about 4 per worker. Removes the spool folder, also on error."""
    t0 = time.perf_counter() if started is None else started
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    spool_dir = jobs[0].spool_dir
    verify = (mapper, workers or os.cpu_count() or 1)
    try:
        return _finish(params, corpus_dir, out_dir, spool_dir, [d for shard in shards for d in shard], t0, verify)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def _finish(
    params: DataParams, corpus_dir: Path, out_dir: Path, spool_dir: Path, all_docs: list[CleanedDocument], t0: float,
    verify: tuple[ShardMapper | None, int],
) -> dict:
    too_short = [{"path": d.name, "chars": d.chars} for d in all_docs if not d.bytes]
    docs = [d for d in all_docs if d.bytes]
    exact_dups: list[dict] = []
    if params.dedup_exact:
        docs, exact_dups = _drop_exact_duplicates(docs)
    near_dups: list[dict] = []
    near_info: dict = {"method": "disabled"}
    if params.dedup_near and len(docs) > 1:
        docs, near_dups, near_info = _drop_near_duplicates(docs, params, spool_dir, *verify)
    if not docs:
        raise CorpusError(
            f"no document of {corpus_dir} is left after cleaning: {len(all_docs)} files read, {len(too_short)} "
            f"shorter than min_doc_chars={params.min_doc_chars}, {len(exact_dups)} exact duplicates"
        )
    sections, split_record = _split(docs, params, corpus_dir, spool_dir)
    by_name = {d.name: d for d in docs}
    train_names, val_names = ([s.document for s in sections[split]] for split in ("train", "val"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*SPLIT_FILES.values(), STATS_FILE]:
        remove_stale_temp_files(out_dir / name)
    split_stats = {split: _write_split(out_dir / SPLIT_FILES[split], secs, by_name, spool_dir)
                   for split, secs in sections.items()}

    stats: dict = {
        "files_read": len(all_docs),
        "docs_kept": len(docs),
        "dropped_too_short": len(too_short),
        "dropped_exact_duplicate": len(exact_dups),
        "dropped_near_duplicate": len(near_dups),
    }
    for split, counts in split_stats.items():
        stats.update({f"{split}_{key}": value for key, value in counts.items()})
    stats.update(
        near_duplicate_search={
            **near_info,
            "threshold": params.near_dup_threshold,
            "shingle_size": params.shingle_size,
        },
        too_short=too_short,
        exact_duplicates=exact_dups,
        near_duplicates=near_dups,
        splits={"train": train_names, "val": val_names},
        split=split_record,
        params=params.model_dump(),
    )
    _write_json(out_dir / STATS_FILE, stats)
    log.info(
        "cleaned %d files in %.1fs: kept %d (train %d, val %d), dropped %d short, %d exact and %d near duplicates",
        len(all_docs),
        time.perf_counter() - t0,
        len(docs),
        len(train_names),
        len(val_names),
        len(too_short),
        len(exact_dups),
        len(near_dups),
    )
    return stats


def clean_corpus(
    params: DataParams, corpus_dir: Path, out_dir: Path, workers: int | None = None, mapper: ShardMapper | None = None
) -> dict:
    """Clean, deduplicate and split the documents under ``corpus_dir`` (each ``.txt`` file, each row of a
    Parquet or JSON Lines shard) into ``out_dir``.

    Writes ``train.txt`` and ``val.txt`` (split file format, see the module docstring) and ``stats.json``,
    each atomically. Documents are taken in sorted relative-path order (a shard's rows in order), which
    decides which copy of a duplicate is kept. The split is by document, or by contiguous sections for a
    corpus with too few documents (see the module docstring). Returns the stats dict: top-level counts
    (``files_read``: documents read, a shard's row counting as one; documents kept and dropped per reason;
    docs/chars/bytes/words per split, a section counting as a document), the dropped documents and
    near-duplicate pairs, the documents of each split, and how it was split.

    Files are cleaned in shards by ``mapper`` (default: a pool of ``workers`` processes, every core), and so
    are the near-duplicate candidates checked; memory holds per-document fingerprints (about 1.1 KB each with
    the default 128 permutations), not the corpus: see ``clean_shard`` and ``finish_clean``.

    Raises CorpusError when the folder holds no .txt file or shard, a file is not valid UTF-8, a shard cannot
    be read or has a row without a string ``text``, no document is left after cleaning, or the text left is too
    short to give both splits some of it.
    """
    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    jobs = plan_clean(params, corpus_dir, out_dir, shards=4 * workers)
    mapper = mapper or map_in_processes(workers)
    try:
        shards = list(mapper(clean_shard, jobs))
    except BaseException:
        shutil.rmtree(jobs[0].spool_dir, ignore_errors=True)
        raise
    return finish_clean(params, corpus_dir, out_dir, jobs, shards, t0, mapper, workers)
