"""The clean stage: normalise raw text documents, drop boilerplate and duplicates, split train from val.

Each ``.txt`` file of the corpus is one document. ``clean_corpus`` cleans every document, drops the
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
so MinHash only decides which pairs get checked, never the outcome.
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
from llm.data.corpus import CorpusError, iter_corpus_files
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
    idx = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return int(np.count_nonzero(b[idx] == a))


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


def find_near_duplicates(
    shingle_sets: Sequence[np.ndarray],
    threshold: float,
    num_perm: int = 128,
    seed: int = MINHASH_SEED,
    exact_max_docs: int = EXACT_ALL_PAIRS_MAX_DOCS,
) -> tuple[list[NearDuplicate], dict]:
    """Which documents to drop as near duplicates, given their shingle sets in keep-preference order.

    Going through the documents in order, a document is dropped when its exact Jaccard with an earlier
    kept document is at least ``threshold``; so the first document of each cluster is kept. Pairs are
    checked exactly: all of them when there are at most ``exact_max_docs`` documents, else the
    candidates of MinHash + LSH banding (rows per band from ``lsh_rows_per_band``).

    Returns the drops (each with the kept document it matched best) and a dict describing the search.
    """
    signatures = None if len(shingle_sets) <= exact_max_docs else minhash_signatures(shingle_sets, num_perm, seed)
    return _near_duplicates([len(s) for s in shingle_sets], shingle_sets.__getitem__, threshold, num_perm,
                            signatures)


def _near_duplicates(
    sizes: Sequence[int],
    shingles_of: Callable[[int], np.ndarray],
    threshold: float,
    num_perm: int,
    signatures: np.ndarray | None,
) -> tuple[list[NearDuplicate], dict]:
    """``find_near_duplicates`` given each document's shingle count, a way to get its shingle set, and
    either MinHash signatures (candidates from LSH) or None (every pair is a candidate)."""
    n = len(sizes)
    info: dict = {"documents": n}
    if signatures is None:
        candidates: Iterable[tuple[int, int]] = ((i, j) for i in range(n) for j in range(i + 1, n))
        info.update(method="exact_all_pairs", candidate_pairs=n * (n - 1) // 2)
    else:
        rows = lsh_rows_per_band(threshold, num_perm)
        bands = num_perm // rows
        candidates = sorted(lsh_candidate_pairs(signatures, rows))
        recall = 1.0 - (1.0 - threshold**rows) ** bands
        info.update(
            method="minhash_lsh",
            num_perm=num_perm,
            bands=bands,
            rows_per_band=rows,
            recall_at_threshold=round(recall, 6),
            candidate_pairs=len(candidates),
        )
    # every pair: the intersections of all sets at once (one sort) instead of one search per pair
    shared = _pairwise_intersections([shingles_of(i) for i in range(n)]) if signatures is None else None
    similar: dict[int, list[tuple[int, float]]] = {}
    for i, j in candidates:
        small, large = sorted((sizes[i], sizes[j]))
        if large == 0 or small < threshold * large:  # Jaccard <= |small| / |large|
            continue
        if shared is None:
            sim = jaccard(shingles_of(i), shingles_of(j))
        else:
            inter = int(shared[i, j])
            sim = inter / (sizes[i] + sizes[j] - inter)
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
    names: Sequence[str], texts: Sequence[str], val_fraction: float
) -> tuple[list[Section], list[Section]]:
    """Cut the documents, read in the given order as one text, into a train section and the val section
    after it, which holds about the last ``val_fraction`` of the bytes.

    The cut is moved to the nearest line start (or document boundary), or to the nearest word start in
    a text without line breaks; the whitespace at the cut belongs to neither side. Returns (train, val)
    as lists of sections in text order; both are non-empty and never overlap.

    Raises ValueError when the text is too short to give both sides a character.
    """
    return _sections([len(t) for t in texts], [len(t.encode("utf-8")) for t in texts], names, texts.__getitem__,
                     val_fraction)


def _sections(
    chars: Sequence[int], sizes: Sequence[int], names: Sequence[str], text_of: Callable[[int], str],
    val_fraction: float,
) -> tuple[list[Section], list[Section]]:
    """``split_into_sections`` given each document's length in characters and bytes, and a way to read the
    one document that holds the cut."""
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


def write_documents(path: Path, docs: Iterable[str]) -> None:
    """Write documents to ``path`` in the split file format (see the module docstring), atomically.

    Raises ValueError for a document containing DOC_SEPARATOR; ``path`` is then left untouched.
    """
    with atomic_file(path) as f:
        for i, doc in enumerate(docs):
            if DOC_SEPARATOR in doc:
                raise ValueError(f"document {i} contains the separator character U+001E; clean it first")
            if i:
                f.write(_SEPARATOR_LINE)
            f.write(doc)
            f.write("\n")


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
# shingle sets of this many documents are kept while near-duplicate candidates are checked
SHINGLE_CACHE_DOCS = 32

ShardMapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]
"""``mapper(fn, items)``: ``fn(item)`` for every item, results in the order of ``items``."""


@dataclass(frozen=True)
class CleanJob:
    """One shard of the clean stage: the files (relative paths) to clean, and where their texts go."""

    params: DataParams
    corpus_dir: Path
    spool_dir: Path
    names: tuple[str, ...]
    keep_shingles: bool  # a corpus small enough to check every pair keeps shingle sets, else MinHash signatures


@dataclass(frozen=True)
class CleanedDocument:
    """One file after cleaning: sizes and fingerprints; its text waits in the spool folder (``spool_path``)."""

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


def clean_shard(job: CleanJob) -> list[CleanedDocument]:
    """Clean the files of one shard: spool each text long enough to keep and return what ``finish_clean``
    needs of it. Raises CorpusError for a file that is not valid UTF-8."""
    params = job.params
    docs = []
    for name in job.names:
        text = clean_text(_read_document(job.corpus_dir / name), params.strip_gutenberg)
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
            if not job.keep_shingles:
                signature = minhash_signatures([shingles], params.num_perm)[0]
                shingles = None
        docs.append(CleanedDocument(name, len(text), len(data), len(text.split()), hashlib.sha256(data).digest(),
                                    n_shingles, shingles, signature))
    return docs


def plan_clean(params: DataParams, corpus_dir: Path, out_dir: Path, shards: int) -> list[CleanJob]:
    """The shards of the clean stage: the corpus's files in sorted-path order, cut into about ``shards``
    runs of similar byte size (each between SHARD_BYTES_MIN and SHARD_BYTES_MAX; a file is never cut).
    Creates the spool folder beside ``out_dir`` (``finish_clean`` removes it). Raises CorpusError when the
    folder holds no .txt file."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    files = iter_corpus_files(corpus_dir)
    sizes = [p.stat().st_size for p in files]
    target = max(SHARD_BYTES_MIN, min(SHARD_BYTES_MAX, math.ceil(sum(sizes) / max(1, shards))))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)  # spool folders of crashed runs
    spool_dir = out_dir.parent / f".{out_dir.name}.spool-{secrets.token_hex(6)}.tmp"
    spool_dir.mkdir()
    keep_shingles = len(files) <= EXACT_ALL_PAIRS_MAX_DOCS
    jobs, names, size = [], [], 0
    for path, n in zip(files, sizes):
        if names and size + n > target:
            jobs.append(CleanJob(params, corpus_dir, spool_dir, tuple(names), keep_shingles))
            names, size = [], 0
        names.append(path.relative_to(corpus_dir).as_posix())
        size += n
    jobs.append(CleanJob(params, corpus_dir, spool_dir, tuple(names), keep_shingles))
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
    docs: list[CleanedDocument], params: DataParams, spool_dir: Path
) -> tuple[list[CleanedDocument], list[dict], dict]:
    """Drop near duplicates (see the module docstring): the documents kept, the dropped pairs with their
    Jaccard similarity, and how the candidates were found. Shingle sets not kept in memory are computed
    again from the spooled texts, for the candidates only."""
    signatures = None
    if len(docs) > EXACT_ALL_PAIRS_MAX_DOCS:
        signatures = np.stack([d.signature for d in docs])
    cache: OrderedDict[int, np.ndarray] = OrderedDict()
    cache_size = max(SHINGLE_CACHE_DOCS, len(docs) if signatures is None else 0)

    def shingles_of(i: int) -> np.ndarray:
        if docs[i].shingles is not None:
            return docs[i].shingles
        if i not in cache:
            cache[i] = word_shingles(_read_spooled(spool_dir, docs[i].name), params.shingle_size)
            if len(cache) > cache_size:
                cache.popitem(last=False)
        cache.move_to_end(i)
        return cache[i]

    drops, info = _near_duplicates([d.n_shingles for d in docs], shingles_of, params.near_dup_threshold,
                                   params.num_perm, signatures)
    dups = [{"kept": docs[d.kept].name, "dropped": docs[d.dropped].name, "jaccard": round(d.jaccard, 6)}
            for d in drops]
    dropped = {d.dropped for d in drops}
    return [d for i, d in enumerate(docs) if i not in dropped], dups, info


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
        train, val = _sections([d.chars for d in docs], [d.bytes for d in docs], names,
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
    """Stream the sections' spooled texts into ``path`` (split file format), atomically; returns the
    split's docs/chars/bytes/words."""
    stats = {"docs": len(sections), "chars": 0, "bytes": 0, "words": 0}
    with atomic_file(path, binary=True) as f:
        for i, section in enumerate(sections):
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
            if i:
                f.write(_SEPARATOR_LINE.encode())
            f.write(data)
            f.write(b"\n")
    return stats


def finish_clean(
    params: DataParams, corpus_dir: Path, out_dir: Path, jobs: Sequence[CleanJob],
    shards: Iterable[list[CleanedDocument]], started: float | None = None,
) -> dict:
    """Deduplicate, split and write what ``clean_shard`` made of each job (``shards``, in job order); see
    ``clean_corpus``. Removes the spool folder, also on error."""
    t0 = time.perf_counter() if started is None else started
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    spool_dir = jobs[0].spool_dir
    try:
        return _finish(params, corpus_dir, out_dir, spool_dir, [d for shard in shards for d in shard], t0)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def _finish(
    params: DataParams, corpus_dir: Path, out_dir: Path, spool_dir: Path, all_docs: list[CleanedDocument], t0: float
) -> dict:
    too_short = [{"path": d.name, "chars": d.chars} for d in all_docs if not d.bytes]
    docs = [d for d in all_docs if d.bytes]
    exact_dups: list[dict] = []
    if params.dedup_exact:
        docs, exact_dups = _drop_exact_duplicates(docs)
    near_dups: list[dict] = []
    near_info: dict = {"method": "disabled"}
    if params.dedup_near and len(docs) > 1:
        docs, near_dups, near_info = _drop_near_duplicates(docs, params, spool_dir)
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
    """Clean, deduplicate and split the ``.txt`` documents under ``corpus_dir`` into ``out_dir``.

    Writes ``train.txt`` and ``val.txt`` (split file format, see the module docstring) and ``stats.json``,
    each atomically. Documents are taken in sorted relative-path order, which decides which copy of a
    duplicate is kept. The split is by document, or by contiguous sections for a corpus with too few
    documents (see the module docstring). Returns the stats dict: top-level counts (files read, documents
    kept and dropped per reason, docs/chars/bytes/words per split, a section counting as a document), the
    dropped documents and near-duplicate pairs, the documents of each split, and how it was split.

    Files are cleaned in shards by ``mapper`` (default: a pool of ``workers`` processes, every core), and
    memory holds per-document fingerprints, not the corpus: see ``clean_shard`` and ``finish_clean``.

    Raises CorpusError when the folder holds no .txt file, a file is not valid UTF-8, no document is left
    after cleaning, or the text left is too short to give both splits some of it.
    """
    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    jobs = plan_clean(params, corpus_dir, out_dir, shards=4 * workers)
    try:
        shards = list((mapper or map_in_processes(workers))(clean_shard, jobs))
    except BaseException:
        shutil.rmtree(jobs[0].spool_dir, ignore_errors=True)
        raise
    return finish_clean(params, corpus_dir, out_dir, jobs, shards, t0)
