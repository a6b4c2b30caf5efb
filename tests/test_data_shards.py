"""The clean and tokenize stages in shards: the outputs never depend on how the work was cut or where it ran,
near-duplicate candidates are checked on texts read back, and no spooled text is left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_clean import make_play, old_spelling, write_files

import llm.data.clean as clean_module
import llm.data.tokenize as tokenize_module
from llm.config import DataParams, TokenizerParams
from llm.data.clean import (
    clean_corpus,
    find_near_duplicates,
    iter_documents,
    jaccards_in_memory,
    lsh_candidate_pairs,
    lsh_rows_per_band,
    minhash_signatures,
    word_shingles,
    write_documents,
)
from llm.data.corpus import CorpusError
from llm.data.tokenize import PIECE_CHARS, tokenize_corpus
from llm.data.tokenizer import load_tokenizer, train_tokenizer


def inline(fn, items):
    return [fn(item) for item in items]


def outputs(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def test_a_large_corpus_checks_lsh_candidates_on_spooled_texts_and_any_sharding_gives_the_same_result(
    tmp_path, monkeypatch
):
    # over EXACT_ALL_PAIRS_MAX_DOCS documents, so MinHash signatures travel instead of shingle sets
    files = {f"d{i:03d}.txt": make_play(1000 + i, n_lines=12) for i in range(104)}
    for i in (3, 50, 90):  # another edition of three of them
        files[f"e{i:03d}.txt"] = old_spelling(files[f"d{i:03d}.txt"], seed=i)
    corpus = write_files(tmp_path / "corpus", files)
    params = DataParams(min_doc_chars=100)

    monkeypatch.setattr(clean_module, "SHARD_BYTES_MIN", 1)  # several shards of a small corpus
    stats = clean_corpus(params, corpus, tmp_path / "pool", workers=2)
    assert stats["near_duplicate_search"]["method"] == "minhash_lsh"
    assert [(d["kept"], d["dropped"]) for d in stats["near_duplicates"]] == [
        ("d003.txt", "e003.txt"), ("d050.txt", "e050.txt"), ("d090.txt", "e090.txt")]
    # what the whole corpus in memory gives (the stage before it was sharded)
    names = sorted(files)
    shingles = [word_shingles(files[n]) for n in names]
    drops, _ = find_near_duplicates([len(s) for s in shingles], params.near_dup_threshold,
                                    jaccards_in_memory(shingles), minhash_signatures(shingles, params.num_perm),
                                    params.num_perm)
    assert [(names[d.kept], names[d.dropped]) for d in drops] == [
        (d["kept"], d["dropped"]) for d in stats["near_duplicates"]]

    monkeypatch.setattr(clean_module, "SHARD_BYTES_MIN", 16 << 20)
    clean_corpus(params, corpus, tmp_path / "inline", mapper=inline)
    split_files = ("train.txt", "val.txt", "stats.json")
    assert outputs(tmp_path / "inline", split_files) == outputs(tmp_path / "pool", split_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "inline", "pool"]  # no spool folder left


def test_a_failed_shard_leaves_no_spooled_text(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_module, "SHARD_BYTES_MIN", 1)
    corpus = write_files(tmp_path / "corpus", {f"p{i}.txt": make_play(i, n_lines=20) for i in range(6)})
    (corpus / "p3.txt").write_bytes("Caf\u00e9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"p3\.txt: not valid UTF-8"):
        clean_corpus(DataParams(min_doc_chars=10), corpus, tmp_path / "clean", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def reference_ids(tokenizer, split_file: Path) -> np.ndarray:
    """The ids of a split file as one process encodes them: <|bos|>, then each piece of the document."""
    ids: list[int] = []
    for doc in iter_documents(split_file):
        ids.append(tokenizer.bos_id)
        start = 0
        while start < len(doc):
            end = min(len(doc), start + PIECE_CHARS)
            if end < len(doc):
                cut = doc.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            ids.extend(tokenizer.encode(doc[start:end]))
            start = end
    return np.asarray(ids)


def test_token_files_do_not_depend_on_the_shards_and_match_one_pass_over_the_documents(tmp_path, monkeypatch):
    long_doc = "\n".join(f"line {i} of a long document" for i in range(PIECE_CHARS // 20))  # over one piece
    docs = [make_play(i, n_lines=30) for i in range(9)] + ["", "ends with a newline\n", long_doc]
    clean = tmp_path / "clean"
    clean.mkdir()
    write_documents(clean / "train.txt", docs)
    write_documents(clean / "val.txt", docs[:2])
    tok_dir = tmp_path / "tokenizer"
    train_tokenizer(TokenizerParams(kind="bpe", vocab_size=400), docs[:3]).save(tok_dir)

    monkeypatch.setattr(tokenize_module, "SHARD_BYTES_MIN", 1)  # several shards of small splits
    one = tokenize_corpus(clean, tok_dir, tmp_path / "one", workers=1)
    many = tokenize_corpus(clean, tok_dir, tmp_path / "many", workers=5, mapper=inline)  # 20 shards a split
    pool = tokenize_corpus(clean, tok_dir, tmp_path / "pool", workers=2)
    bins = ("train.bin", "val.bin", "meta.json")
    assert outputs(tmp_path / "many", bins) == outputs(tmp_path / "one", bins) == outputs(tmp_path / "pool", bins)
    assert one == many == pool
    assert one["splits"]["train"]["documents"] == len(docs)
    tokenizer = load_tokenizer(tok_dir)
    train = np.fromfile(tmp_path / "one" / "train.bin", dtype=one["dtype"])
    assert np.array_equal(train, reference_ids(tokenizer, clean / "train.txt"))
    assert one["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "many", "one", "pool", "tokenizer"]


def low_entropy_corpus(n_docs: int, lines: int, seed: int = 0) -> dict[str, str]:
    """Log-like documents in groups of 8, each group written from 6 line templates of its own with a number
    ending each line: the documents of a group are near-duplicate candidates of each other, around the 0.05
    threshold, and of no other group's."""
    files = {}
    for d in range(n_docs):
        group = np.random.default_rng([seed, 1 << 20, d // 8])
        templates = [" ".join(f"w{group.integers(10**6)}" for _ in range(5)) for _ in range(6)]
        rng = np.random.default_rng([seed, d])
        values = int(rng.integers(5, 80))
        rows = [f"{templates[rng.integers(6)]} {rng.integers(values)}" for _ in range(lines)]
        files[f"log{d:03d}.txt"] = "\n".join(rows) + "\n"
    return files


def reference_near_duplicates(texts: list[str], params: DataParams) -> list[tuple[int, int, float]]:
    """The check as it was before it ran in parallel, written plainly: MinHash + LSH candidates, each one's
    shingle sets computed again (as Python sets) and compared exactly, then the first of each cluster kept."""
    shingles = [word_shingles(t, params.shingle_size) for t in texts]
    rows = lsh_rows_per_band(params.near_dup_threshold, params.num_perm)
    similar: dict[int, list[tuple[float, int]]] = {}
    for i, j in sorted(lsh_candidate_pairs(minhash_signatures(shingles, params.num_perm), rows)):
        a, b = set(word_shingles(texts[i]).tolist()), set(word_shingles(texts[j]).tolist())
        sim = len(a & b) / len(a | b)
        if sim >= params.near_dup_threshold:
            similar.setdefault(j, []).append((sim, -i))
    dropped: dict[int, tuple[int, float]] = {}
    for j in range(len(texts)):
        matches = [(sim, neg_i) for sim, neg_i in similar.get(j, []) if -neg_i not in dropped]
        if matches:
            sim, neg_i = max(matches)
            dropped[j] = (-neg_i, sim)
    return [(kept, j, round(sim, 6)) for j, (kept, sim) in dropped.items()]


def test_parallel_verification_of_many_candidates_drops_what_the_plain_check_drops(tmp_path, monkeypatch):
    files = low_entropy_corpus(120, lines=80)
    corpus = write_files(tmp_path / "corpus", files)
    params = DataParams(min_doc_chars=100)
    monkeypatch.setattr(clean_module, "VERIFY_PAIRS_MIN", 16)  # several verify_pairs jobs in the pool

    stats = clean_corpus(params, corpus, tmp_path / "clean", workers=2)

    names = sorted(files)
    expected = reference_near_duplicates([clean_module.clean_text(files[n]) for n in names], params)
    search = stats["near_duplicate_search"]
    assert search["method"] == "minhash_lsh" and search["checked_pairs"] >= 300  # many candidates
    assert 10 <= len(expected) <= 100  # some of each group dropped, not all
    assert [(d["kept"], d["dropped"], d["jaccard"]) for d in stats["near_duplicates"]] == [
        (names[i], names[j], sim) for i, j, sim in expected]


def test_each_documents_shingles_are_computed_once_however_many_candidates_it_is_in(tmp_path, monkeypatch):
    files = low_entropy_corpus(112, lines=40)
    corpus = write_files(tmp_path / "corpus", files)
    calls: list[int] = []
    shingles = clean_module.word_shingles
    monkeypatch.setattr(clean_module, "word_shingles", lambda text, k=5: calls.append(1) or shingles(text, k))
    monkeypatch.setattr(clean_module, "VERIFY_PAIRS_MIN", 16)
    mapped: list[tuple[str, int]] = []

    def recording(fn, items):  # what a Prefect or Dask runner is handed
        mapped.append((fn.__name__, len(items)))
        return inline(fn, items)

    stats = clean_corpus(DataParams(min_doc_chars=100), corpus, tmp_path / "clean", mapper=recording, workers=2)
    assert stats["near_duplicate_search"]["checked_pairs"] > len(files)  # each document is in several pairs
    assert len(calls) == len(files)
    assert mapped[0][0] == "clean_shard" and mapped[1] == ("verify_pairs", 8)  # 4 jobs a worker, on the mapper
