"""The clean stage: normalisation, Gutenberg boilerplate, deduplication, the split and the split files."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from llm.config import DataParams
from llm.data.clean import (
    DOC_SEPARATOR,
    Section,
    clean_corpus,
    clean_text,
    find_near_duplicates,
    iter_documents,
    jaccards_in_memory,
    lsh_rows_per_band,
    minhash_signatures,
    normalize_text,
    shingle_jaccard,
    split_documents,
    split_into_sections,
    strip_gutenberg_boilerplate,
    word_shingles,
    write_documents,
)
from llm.data.corpus import CorpusError

# ----------------------------------------------------------------------------------------------------
# Synthetic texts

SYLLABLES = [c + v for c in "bdfklmn" for v in "aeiou"][:32]
VOCAB = sorted({a + b + c for a in SYLLABLES[:12] for b in SYLLABLES[12:24] for c in SYLLABLES[24:]})


def make_play(seed: int, n_lines: int = 400) -> str:
    """A play-shaped document of random words from a large vocabulary: different seeds share ~no 5-shingle."""
    rng = random.Random(seed)
    lines = [f"THE TRAGEDY OF {rng.choice(VOCAB).upper()}", ""]
    for i in range(n_lines):
        if i % 4 == 0:
            lines += ["", f"{rng.choice(VOCAB).upper()}."]
        lines.append(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(6, 10))).capitalize() + ",")
    return "\n".join(lines)


def old_spelling(text: str, seed: int, p: float = 0.2) -> str:
    """Another edition: each word re-spelled (u->v, final -e, doubled consonant) with probability p."""
    rng = random.Random(seed)
    spellings = [lambda w: w.replace("u", "v") if "u" in w else w + "e", lambda w: w + "e", lambda w: w[0] + w]
    return "\n".join(
        " ".join(rng.choice(spellings)(w) if w and rng.random() < p else w for w in line.split(" "))
        for line in text.split("\n")
    )


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    return folder


def run_clean(tmp_path: Path, files: dict[str, str], **params) -> tuple[dict, Path]:
    corpus = write_files(tmp_path / "corpus", files)
    out = tmp_path / "clean"
    stats = clean_corpus(DataParams(**params), corpus, out)
    return stats, out


def all_documents(out: Path) -> list[str]:
    return list(iter_documents(out / "train.txt")) + list(iter_documents(out / "val.txt"))


# ----------------------------------------------------------------------------------------------------
# Cleaning functions


def test_nfc_and_control_characters():
    raw = "Cafe\u0301\x00 bar\x07\x1e\x1b[0m\ufeff and\u200b \x85co\x7fde"
    assert normalize_text(raw) == "Caf\u00e9 bar[0m and code"
    assert normalize_text("a\tb\n\tc\x00\td") == "a   b\n    c   d"  # tab stops every 4 columns
    assert normalize_text("\u212b") == "\u00c5"  # NFC maps the Angstrom sign to A-ring


def test_line_endings_trailing_spaces_and_blank_lines():
    raw = "\n\n  Enter Hamlet.  \r\nTo be, \t\r\rOr not\r\n\n\n\n\n\nExit.\n \n\n"
    assert normalize_text(raw) == "  Enter Hamlet.\nTo be,\n\nOr not\n\n\nExit."


MODERN_GUTENBERG = """\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

Title: Hamlet

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




Produced by A. Volunteer and the Online Distributed Proofreading Team

HAMLET, PRINCE OF DENMARK

  Ber. Who's there?
  Fran. Nay, answer me: stand, and unfold yourself.

End of the Project Gutenberg EBook of Hamlet, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt or 1524.zip *****

Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm
electronic works
"""

OLD_GUTENBERG = """The Project Gutenberg Etext of Macbeth, by Shakespeare

This Etext file is presented by Project Gutenberg, in
cooperation with World Library, Inc., from their Library of the
Future and Shakespeare CDROMS.

**Welcome To The World of Free Plain Vanilla Electronic Texts**

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.

LIMITED WARRANTY; DISCLAIMER OF DAMAGES
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

MACBETH

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.>>

ACT I. SCENE I.
Thunder and lightning. Enter three Witches.

FIRST WITCH. When shall we three meet again?

End of Project Gutenberg's Macbeth
"""


def test_gutenberg_header_and_licence_are_removed():
    cleaned = clean_text(MODERN_GUTENBERG)
    assert cleaned == (
        "HAMLET, PRINCE OF DENMARK\n\n  Ber. Who's there?\n  Fran. Nay, answer me: stand, and unfold yourself."
    )


def test_gutenberg_small_print_and_world_library_notices_are_removed():
    cleaned = clean_text(OLD_GUTENBERG)
    assert cleaned == (
        "MACBETH\n\n"
        "ACT I. SCENE I.\nThunder and lightning. Enter three Witches.\n\n"
        "FIRST WITCH. When shall we three meet again?"
    )


def test_gutenberg_stripping_is_optional_and_leaves_plain_text_alone():
    play = "THE TEMPEST\n\n  Prospero. And my pretext to strike at him admits\nA good construction.\n\n\nExit."
    assert strip_gutenberg_boilerplate(play) == play
    assert clean_text(play) == play
    assert "Project Gutenberg" in clean_text(MODERN_GUTENBERG, strip_gutenberg=False)


# ----------------------------------------------------------------------------------------------------
# Shingles, Jaccard, MinHash


def test_shingle_jaccard_ignores_case_and_punctuation():
    assert shingle_jaccard("a b c d e f", "a b c d e g", k=5) == pytest.approx(1 / 3)  # {abcde} of 3 shingles
    assert shingle_jaccard("To be, or not to be!", "to BE or not -- to be") == 1.0
    assert shingle_jaccard("one two three four five", "six seven eight nine ten") == 0.0
    assert shingle_jaccard("short text", "short text") == 1.0  # fewer than k words: one whole-text shingle
    assert shingle_jaccard("", "") == 0.0
    assert len(word_shingles("a b c d e f g", k=5)) == 3


def test_minhash_signatures_estimate_jaccard():
    a = np.arange(0, 3000, dtype=np.uint64) * np.uint64(7919)
    b = np.arange(1000, 4000, dtype=np.uint64) * np.uint64(7919)  # |a & b| = 2000, |a | b| = 4000
    sig = minhash_signatures([np.unique(a), np.unique(b)], num_perm=512, seed=1)
    assert sig.shape == (2, 512)
    assert np.mean(sig[0] == sig[1]) == pytest.approx(0.5, abs=0.08)
    assert np.array_equal(sig, minhash_signatures([np.unique(a), np.unique(b)], num_perm=512, seed=1))


def test_lsh_bands_are_chosen_for_recall_at_the_threshold():
    assert lsh_rows_per_band(0.05, 128) == 1  # a low threshold needs single-row bands
    rows = lsh_rows_per_band(0.8, 128)
    assert rows > 1
    assert 1 - (1 - 0.8**rows) ** (128 // rows) >= 0.999


def test_lsh_candidates_find_the_same_near_duplicates_as_all_pairs():
    texts = []
    for seed in range(6):
        play = make_play(seed, n_lines=120)
        texts += [play, old_spelling(play, seed=100 + seed)]
    shingles = [word_shingles(t) for t in texts]
    sizes, jaccards = [len(s) for s in shingles], jaccards_in_memory(shingles)
    exact, exact_info = find_near_duplicates(sizes, 0.05, jaccards)
    lsh, lsh_info = find_near_duplicates(sizes, 0.05, jaccards, minhash_signatures(shingles, 128), num_perm=128)
    assert exact_info["method"] == "exact_all_pairs" and exact_info["candidate_pairs"] == 66
    assert lsh_info["method"] == "minhash_lsh" and lsh_info["rows_per_band"] == 1
    assert [(d.kept, d.dropped) for d in exact] == [(2 * i, 2 * i + 1) for i in range(6)]
    assert lsh == exact  # LSH only proposes pairs; the exact Jaccard decides


# ----------------------------------------------------------------------------------------------------
# The stage


def test_exact_duplicates_are_removed(tmp_path):
    play = make_play(1)
    stats, _ = run_clean(
        tmp_path, {"a.txt": play, "b/copy.txt": play + "\r\n\r\n", "c.txt": make_play(2)}, dedup_near=False
    )
    assert stats["dropped_exact_duplicate"] == 1
    assert stats["exact_duplicates"] == [{"kept": "a.txt", "dropped": "b/copy.txt"}]
    assert stats["docs_kept"] == 2
    assert sorted(stats["splits"]["train"] + stats["splits"]["val"]) == ["a.txt", "c.txt"]


def test_near_duplicate_editions_are_flagged_and_one_kept(tmp_path):
    hamlet, lear = make_play(10), make_play(11)
    files = {
        "hamlet_gut.txt": hamlet,
        "hamlet_gut_f.txt": old_spelling(hamlet, seed=1),
        "lear_gut.txt": lear,
        "lear_gut_f.txt": old_spelling(lear, seed=2),
        "sonnets_gut.txt": make_play(12),
        "tempest_gut.txt": make_play(13),
    }
    stats, out = run_clean(tmp_path, files)

    pairs = [(d["kept"], d["dropped"]) for d in stats["near_duplicates"]]
    assert pairs == [("hamlet_gut.txt", "hamlet_gut_f.txt"), ("lear_gut.txt", "lear_gut_f.txt")]
    for d in stats["near_duplicates"]:
        assert 0.15 < d["jaccard"] < 0.3
        assert d["jaccard"] == pytest.approx(shingle_jaccard(files[d["kept"]], files[d["dropped"]]), abs=1e-6)
    assert shingle_jaccard(hamlet, lear) < 0.01
    assert stats["dropped_near_duplicate"] == 2 and stats["docs_kept"] == 4
    assert sorted(all_documents(out)) == sorted(
        files[n] for n in ["hamlet_gut.txt", "lear_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"]
    )


def test_threshold_is_configurable(tmp_path):
    play = make_play(20)
    files = {"a.txt": play, "b.txt": old_spelling(play, seed=3), "c.txt": make_play(21)}
    jac = shingle_jaccard(files["a.txt"], files["b.txt"])

    strict, _ = run_clean(tmp_path / "strict", files, near_dup_threshold=jac + 0.01)
    loose, _ = run_clean(tmp_path / "loose", files, near_dup_threshold=jac - 0.01)
    off, _ = run_clean(tmp_path / "off", files, near_dup_threshold=jac - 0.01, dedup_near=False)

    assert strict["dropped_near_duplicate"] == 0 and strict["docs_kept"] == 3
    assert loose["near_duplicates"] == [{"kept": "a.txt", "dropped": "b.txt", "jaccard": round(jac, 6)}]
    assert off["docs_kept"] == 3 and off["near_duplicate_search"]["method"] == "disabled"


def test_short_documents_are_dropped(tmp_path):
    files = {"long.txt": make_play(30), "short.txt": "A short poem.\n" * 10, "blank.txt": " \n\t\n\x00\n"}
    stats, out = run_clean(tmp_path, files, min_doc_chars=200)
    assert stats["too_short"] == [{"path": "blank.txt", "chars": 0}, {"path": "short.txt", "chars": 139}]
    assert stats["dropped_too_short"] == 2 and stats["docs_kept"] == 1
    # the one document left is cut into a train and a val section (see the single-document tests below)
    (train,), (val,) = (list(iter_documents(out / name)) for name in ("train.txt", "val.txt"))
    long = files["long.txt"]
    assert long.startswith(train) and long.endswith(val) and not long[len(train) : len(long) - len(val)].strip()

    stats, _ = run_clean(tmp_path / "zero", files, min_doc_chars=0)  # an empty document is never kept
    assert [d["path"] for d in stats["too_short"]] == ["blank.txt"]


def test_split_is_deterministic_and_by_whole_document(tmp_path):
    files = {f"play_{i:02d}.txt": make_play(40 + i, n_lines=40) for i in range(20)}
    first, out1 = run_clean(tmp_path / "one", files, val_fraction=0.2, split_seed=7)
    _, out2 = run_clean(tmp_path / "two", files, val_fraction=0.2, split_seed=7)
    other, _ = run_clean(tmp_path / "three", files, val_fraction=0.2, split_seed=8)

    for name in ["train.txt", "val.txt", "stats.json"]:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    val = first["splits"]["val"]
    assert len(val) == 4 and first["val_docs"] == 4 and first["train_docs"] == 16
    assert val != other["splits"]["val"]
    assert list(iter_documents(out1 / "val.txt")) == [files[name] for name in val]  # whole documents, path order
    assert list(iter_documents(out1 / "train.txt")) == [files[name] for name in first["splits"]["train"]]


def test_split_keeps_at_least_one_document_on_each_side():
    assert split_documents(["a", "b"], val_fraction=0.01, seed=0)[1] != []
    assert len(split_documents(["a", "b", "c"], val_fraction=0.99, seed=0)[0]) == 1
    assert split_documents(["only"], val_fraction=0.5, seed=0) == (["only"], [])
    names = [f"doc{i:03d}" for i in range(100)]
    train, val = split_documents(names, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == names
    assert split_documents(names[::-1], val_fraction=0.1, seed=3)[1] == val[::-1]  # membership ignores order


def test_documents_round_trip_through_split_files(tmp_path):
    docs = ["  Indented first line\n\nsecond paragraph", "caf\u00e9 \u00e6 \U0001f600\n\n\n", "x", "", "last\r"]
    write_documents(tmp_path / "split.txt", docs)
    assert list(iter_documents(tmp_path / "split.txt")) == docs

    write_documents(tmp_path / "two.txt", ["one\ntwo", "three"])
    assert (tmp_path / "two.txt").read_bytes() == b"one\ntwo\n\x1e\nthree\n"
    write_documents(tmp_path / "none.txt", [])
    assert (tmp_path / "none.txt").read_bytes() == b""
    assert list(iter_documents(tmp_path / "none.txt")) == []


def test_a_document_holding_the_separator_is_refused(tmp_path):
    (tmp_path / "split.txt").write_text("previous content")
    with pytest.raises(ValueError, match="U\\+001E"):
        write_documents(tmp_path / "split.txt", ["fine", f"bad {DOC_SEPARATOR} doc"])
    assert (tmp_path / "split.txt").read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.txt"]  # no temp file left


def test_stats_json_records_counts_sizes_and_lists(tmp_path):
    files = {f"p{i}.txt": make_play(60 + i, n_lines=40) for i in range(5)}
    files["p0_copy.txt"] = files["p0.txt"]
    stats, out = run_clean(tmp_path, files, val_fraction=0.25)

    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["files_read"] == 6 and stats["docs_kept"] == 5 and stats["dropped_exact_duplicate"] == 1
    for split in ["train", "val"]:
        text = (out / f"{split}.txt").read_text(encoding="utf-8")
        docs = list(iter_documents(out / f"{split}.txt"))
        assert stats[f"{split}_docs"] == len(docs) == len(stats["splits"][split])
        assert stats[f"{split}_chars"] == sum(map(len, docs)) == len(text) - 3 * len(docs) + 2
        assert stats[f"{split}_bytes"] == len("".join(docs).encode())
        assert stats[f"{split}_words"] == sum(len(d.split()) for d in docs)
    assert stats["params"]["near_dup_threshold"] == DataParams().near_dup_threshold
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.txt", "val.txt"]  # no temp files


def test_outputs_replace_old_ones_with_ordinary_permissions(tmp_path):
    out = tmp_path / "clean"
    out.mkdir()
    (out / "train.txt").write_text("old")
    (out / ".train.txt.0123456789ab.tmp").write_text("left by a crashed run")
    old_umask = os.umask(0o022)
    try:
        run_clean(tmp_path, {"a.txt": make_play(1), "b.txt": make_play(2)})
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.txt", "val.txt"]
    assert all(stat.S_IMODE((out / name).stat().st_mode) == 0o644 for name in ["stats.json", "train.txt", "val.txt"])


def test_invalid_utf8_is_a_clear_error(tmp_path):
    corpus = write_files(tmp_path / "corpus", {"good.txt": make_play(1)})
    (corpus / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not valid UTF-8 at byte 3"):
        clean_corpus(DataParams(), corpus, tmp_path / "clean")


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(CorpusError, match="no .txt files under corpus folder"):
        clean_corpus(DataParams(), tmp_path / "corpus", tmp_path / "clean")
    write_files(tmp_path / "corpus", {"tiny.txt": "too short"})
    with pytest.raises(CorpusError, match="no document .* is left after cleaning: 1 files read, 1 shorter"):
        clean_corpus(DataParams(), tmp_path / "corpus", tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


# ----------------------------------------------------------------------------------------------------
# Corpora with too few documents for a split by document: contiguous sections


def sections_of(stats: dict, split: str) -> list[tuple[str, int, int]]:
    return [(s["document"], s["start"], s["end"]) for s in stats["split"]["sections"][split]]


def test_a_multi_document_corpus_is_split_by_document_and_says_so(tmp_path):
    files = {f"p{i}.txt": make_play(70 + i, n_lines=40) for i in range(10)}
    stats, _ = run_clean(tmp_path, files, val_fraction=0.2)
    val_bytes = sum(len(files[name].encode()) for name in stats["splits"]["val"])
    assert stats["split"] == {"method": "documents",
                              "val_bytes_share": round(val_bytes / (val_bytes + stats["train_bytes"]), 6)}
    assert stats["val_docs"] == 2


def test_a_single_document_is_cut_into_a_train_section_and_the_val_section_after_it(tmp_path):
    text = make_play(5, n_lines=2000)
    stats, out = run_clean(tmp_path, {"book.txt": text}, val_fraction=0.1)

    assert stats["split"]["method"] == "sections" and "single document" in stats["split"]["reason"]
    [(_, train_start, train_end)], [(_, val_start, val_end)] = sections_of(stats, "train"), sections_of(stats, "val")
    assert (train_start, val_end) == (0, len(text))
    assert train_end < val_start and text[val_start - 1] == "\n"  # cut at a line start; no overlap
    assert not text[train_end:val_start].strip()  # only the line break between them belongs to neither
    assert list(iter_documents(out / "train.txt")) == [text[:train_end]]
    assert list(iter_documents(out / "val.txt")) == [text[val_start:]]
    assert stats["split"]["val_bytes_share"] == pytest.approx(0.1, abs=0.005)
    assert stats["val_bytes"] == len(text[val_start:].encode()) and stats["val_docs"] == 1
    assert stats["splits"] == {"train": ["book.txt"], "val": ["book.txt"]}

    _, again = run_clean(tmp_path / "again", {"book.txt": text}, val_fraction=0.1)
    for name in ["train.txt", "val.txt", "stats.json"]:
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_one_large_document_beside_a_small_one_is_split_into_sections(tmp_path):
    files = {"book.txt": make_play(6, n_lines=3000), "readme.txt": make_play(7, n_lines=20)}
    stats, out = run_clean(tmp_path, files, val_fraction=0.1, dedup_near=False)

    # a split by document would make one of them val: over half the bytes, or well under a tenth of them
    assert stats["split"]["method"] == "sections"
    assert stats["split"]["val_bytes_share"] == pytest.approx(0.1, abs=0.005)
    train, val = sections_of(stats, "train"), sections_of(stats, "val")
    assert train[0][:2] == ("book.txt", 0) and val[-1] == ("readme.txt", 0, len(files["readme.txt"]))
    for name in files:  # no character of any document is on both sides
        train_chars = {c for doc, start, end in train if doc == name for c in range(start, end)}
        assert not train_chars & {c for doc, start, end in val if doc == name for c in range(start, end)}
    assert list(iter_documents(out / "val.txt")) == [files[doc][start:end] for doc, start, end in val]


def sections_in_memory(names: list[str], texts: list[str], val_fraction: float) -> tuple[list[Section], list[Section]]:
    """``split_into_sections`` of texts held in memory."""
    return split_into_sections(names, [len(t) for t in texts], [len(t.encode()) for t in texts], texts.__getitem__,
                               val_fraction)


def test_sections_cut_at_a_word_start_in_text_without_line_breaks_and_measure_bytes():
    text = " ".join(["caf\u00e9"] * 1000)  # 5 bytes and 4 characters a word, plus a space
    train, val = sections_in_memory(["a.txt"], [text], val_fraction=0.25)
    (doc, start, end), = [(s.document, s.start, s.end) for s in val]
    assert text[start - 1] == " " and text[start:start + 4] == "caf\u00e9" and end == len(text)
    assert len(text[start:].encode()) / len(text.encode()) == pytest.approx(0.25, abs=0.002)
    assert train == [Section("a.txt", 0, start - 1)]


def test_sections_prefer_a_document_boundary_near_the_cut():
    names, texts = ["a.txt", "b.txt"], ["x\n" * 899 + "x" * 50, "y\n" * 99 + "y"]  # the cut falls 6 chars before b
    train, val = sections_in_memory(names, texts, val_fraction=0.1)
    assert train == [Section("a.txt", 0, len(texts[0]))] and val == [Section("b.txt", 0, len(texts[1]))]


def test_a_corpus_too_short_for_two_sections_is_an_error_that_says_what_to_do(tmp_path):
    corpus = write_files(tmp_path / "corpus", {"tiny.txt": "x"})
    with pytest.raises(CorpusError, match=r"cannot split .*corpus into train and val: .*add text to the corpus"):
        clean_corpus(DataParams(min_doc_chars=0), corpus, tmp_path / "clean")
    assert not (tmp_path / "clean").exists()
    with pytest.raises(ValueError, match="cannot be cut"):
        sections_in_memory(["a.txt"], ["x"], val_fraction=0.5)
    assert sections_in_memory(["a.txt"], ["xy"], val_fraction=0.5) == ([Section("a.txt", 0, 1)],
                                                                        [Section("a.txt", 1, 2)])
