"""Corpora as Parquet or JSON Lines shards: ``llm data fetch`` streams each shard's text field into a Parquet file
of one ``text`` column (deterministic, within the caps and the deadline), the clean stage reads it a row group at
a time, each row a document, and bad input is an error naming the file and the row group or line."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_clean import make_play, old_spelling
from test_corpus import _no_backoff, http_root  # noqa: F401  (fixtures)

import llm.data.clean as clean_module
import llm.data.corpus as corpus
from llm.config import DataParams, FetchLimits
from llm.data.clean import clean_corpus, iter_documents
from llm.data.corpus import CorpusError, CorpusLimitError, fetch_corpus, iter_corpus_files, read_shard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [make_play(i, n_lines=12) for i in range(7)]


def write_parquet(path: Path, columns: dict[str, list], row_group_rows: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_rows)
    return path


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def shard_texts(path: Path) -> list[str]:
    table = pq.read_table(path)
    assert table.column_names == ["text"]
    return table.column("text").to_pylist()


def test_fetch_writes_each_shard_as_parquet_of_its_text_field_and_copies_txt(tmp_path):
    source = tmp_path / "fineweb"
    write_parquet(source / "a.parquet", {"id": list(range(4)), "text": TEXTS[:4], "url": ["u"] * 4})
    write_jsonl(source / "sub" / "b.jsonl", [{"text": t, "score": 1} for t in TEXTS[4:6]])
    (source / "sub" / "blank-lines.jsonl").write_text(f'{json.dumps({"text": TEXTS[6]})}\n\n')
    write_jsonl(source / "c.jsonl.gz", [{"text": "gz one"}, {"text": "gz two"}], gz=True)
    (source / "notes.txt").write_bytes(b"plain\r\ntext\n")

    written = fetch_corpus(source, tmp_path / "corpus")

    root = tmp_path / "corpus" / "fineweb"
    assert [p.relative_to(root).as_posix() for p in written] == [
        "a.parquet", "c.parquet", "notes.txt", "sub/b.parquet", "sub/blank-lines.parquet"]
    assert shard_texts(root / "a.parquet") == TEXTS[:4]
    assert shard_texts(root / "sub" / "b.parquet") == TEXTS[4:6]
    assert shard_texts(root / "sub" / "blank-lines.parquet") == [TEXTS[6]]
    assert shard_texts(root / "c.parquet") == ["gz one", "gz two"]
    assert (root / "notes.txt").read_bytes() == b"plain\r\ntext\n"
    assert iter_corpus_files(tmp_path / "corpus") == written
    # the same source gives the same bytes (what data.dvc records)
    again = fetch_corpus(source, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_text_field_names_the_sources_field(tmp_path):
    source = tmp_path / "stories"
    write_jsonl(source / "s.jsonl", [{"story": "Once upon a time."}, {"story": "The end."}])
    with pytest.raises(CorpusError, match=re.escape(f"{source / 's.jsonl'}: line 1 has no field 'text' "
                                                    "(its fields: story); name the one holding the text with "
                                                    "`llm data fetch --text-field NAME`")):
        fetch_corpus(source, tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()
    written = fetch_corpus(source, tmp_path / "corpus", text_field="story")
    assert shard_texts(written[0]) == ["Once upon a time.", "The end."]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: write_parquet(p / "x.parquet", {"text": ["a", "b", "c", None]}),
     r"x\.parquet: row group 1, row 3: field 'text' is null, not a string"),
    (lambda p: write_parquet(p / "x.parquet", {"text": [1, 2]}), r"x\.parquet: field 'text' holds int64, not text"),
    (lambda p: write_parquet(p / "x.parquet", {"body": ["a"]}), r"x\.parquet: no field 'text' \(its fields: body\)"),
    (lambda p: (p / "x.parquet").write_bytes(b"PAR1 not really"), r"x\.parquet: not a readable Parquet file"),
    (lambda p: write_jsonl(p / "x.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 5}]),
     r"x\.jsonl: line 3: field 'text' is int, not a string"),
    (lambda p: write_jsonl(p / "x.jsonl", [{"text": "a"}, {"text": None}]),
     r"x\.jsonl: line 2: field 'text' is null, not a string"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a"}\n{"text": "b\n'), r"x\.jsonl: line 2 is not valid JSON"),
    (lambda p: (p / "x.jsonl").write_text('["a"]\n'), r"x\.jsonl: line 1 is a JSON list, not an object"),
    (lambda p: (p / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-30]),
     r"x\.jsonl\.gz: cannot be read after line \d+"),
])
def test_bad_shards_are_errors_naming_the_file_and_row_group_or_line(tmp_path, make, message):
    source = tmp_path / "src"
    source.mkdir()
    make(source)
    with pytest.raises(CorpusError, match=message):
        fetch_corpus(source, tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()  # nothing written


def test_a_truncated_parquet_row_group_is_an_error_naming_it(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"text": [f"row {i} " * 200 for i in range(6)]})
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data[meta.data_page_offset + 20 : meta.data_page_offset + 60] = b"\xff" * 40  # inside row group 1's page
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"x\.parquet: row group 1 cannot be read"):
        list(read_shard(path))


def test_shards_count_against_max_bytes_and_a_url_shard_is_fetched(tmp_path, http_root):  # noqa: F811
    source = tmp_path / "big"
    write_parquet(source / "a.parquet", {"text": TEXTS})
    with pytest.raises(CorpusLimitError, match=r"max_bytes=1\.0KB.*--max-bytes SIZE"):
        fetch_corpus(source, tmp_path / "corpus", limits=FetchLimits(max_bytes=1000))
    assert not (tmp_path / "corpus").exists()

    root, base, _ = http_root
    write_jsonl(root / "stories.jsonl.gz", [{"text": t} for t in TEXTS[:3]], gz=True)
    written = fetch_corpus(f"{base}/stories.jsonl.gz", tmp_path / "corpus")
    assert written == [tmp_path / "corpus" / "stories" / "stories.parquet"]
    assert shard_texts(written[0]) == TEXTS[:3]


def test_a_url_shard_past_the_deadline_is_refused(tmp_path, http_root, monkeypatch):  # noqa: F811
    root, base, _ = http_root
    write_jsonl(root / "s.jsonl", [{"text": t} for t in TEXTS])
    monkeypatch.setattr(corpus, "SHARD_ROW_GROUP_CHARS", 1)  # a row group, and a deadline check, per row
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(corpus.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(CorpusLimitError, match=r"did not finish in time \(converting s\.jsonl\).*timeout_s"):
        fetch_corpus(f"{base}/s.jsonl", tmp_path / "corpus", limits=FetchLimits(timeout_s=45))
    assert not (tmp_path / "corpus").exists()


def test_clean_reads_parquet_rows_as_documents_in_any_sharding(tmp_path, monkeypatch):
    texts = [make_play(100 + i, n_lines=10) for i in range(9)]
    texts += [texts[2], old_spelling(texts[5], seed=1)]  # an exact and a near duplicate
    corpus_dir = tmp_path / "corpus"
    write_parquet(corpus_dir / "s" / "a.parquet", {"text": texts[:6]}, row_group_rows=2)
    write_parquet(corpus_dir / "s" / "b.parquet", {"text": texts[6:]}, row_group_rows=3)
    params = DataParams(min_doc_chars=100)

    monkeypatch.setattr(clean_module, "SHARD_BYTES_MIN", 1)  # runs of row groups in several processes
    jobs = clean_module.plan_clean(params, corpus_dir, tmp_path / "plan", shards=4)
    assert [p.row_groups for job in jobs for p in job.parts if p.name == "s/a.parquet"] == [(0, 1), (1, 2), (2, 3)]
    stats = clean_corpus(params, corpus_dir, tmp_path / "pool", workers=2)

    assert stats["files_read"] == 11
    assert stats["exact_duplicates"] == [{"kept": "s/a.parquet#2", "dropped": "s/b.parquet#3"}]
    assert [(d["kept"], d["dropped"]) for d in stats["near_duplicates"]] == [("s/a.parquet#5", "s/b.parquet#4")]
    kept = [*iter_documents(tmp_path / "pool" / "train.txt"), *iter_documents(tmp_path / "pool" / "val.txt")]
    assert sorted(kept) == sorted(clean_module.clean_text(t) for t in texts[:9])

    monkeypatch.setattr(clean_module, "SHARD_BYTES_MIN", 16 << 20)
    clean_corpus(params, corpus_dir, tmp_path / "inline", mapper=lambda fn, items: [fn(i) for i in items])
    for name in ("train.txt", "val.txt", "stats.json"):
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


def test_clean_names_the_shard_and_row_group_of_a_bad_row(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_parquet(corpus_dir / "a.parquet", {"text": [TEXTS[0], TEXTS[1], None]})
    with pytest.raises(CorpusError, match=r"a\.parquet: row group 1, row 2: field 'text' is null"):
        clean_corpus(DataParams(min_doc_chars=10), corpus_dir, tmp_path / "clean", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no spool folder left


@pytest.mark.parametrize("options", [
    {"compression": "zstd", "use_dictionary": False},
    {"compression": "snappy", "use_dictionary": True, "write_statistics": True},
    {"compression": "none", "data_page_size": 64, "write_page_index": True},
], ids=["zstd", "snappy-dictionary", "small-pages-page-index"])
def test_the_footer_reader_gives_pyarrows_row_groups_without_loading_pyarrow(tmp_path, options):
    """The clean stage plans from the footers in its parent (llm.data.parquet_footer), which never loads pyarrow:
    rows and uncompressed bytes of each row group as pyarrow reads them, for files written with other options,
    other columns (nested, nullable, key-value metadata) and thousands of row groups."""
    table = pa.table({"id": list(range(3000)), "text": [f"row {i} " * (i % 7 + 1) for i in range(3000)],
                      "tags": [[f"t{i}"] * (i % 3) for i in range(3000)], "score": [i / 7 for i in range(3000)],
                      "flag": [None if i % 5 else i % 2 == 0 for i in range(3000)]})
    path = tmp_path / "a.parquet"
    pq.write_table(table.replace_schema_metadata({"source": "test" * 100}), path, row_group_size=1, **options)
    meta = pq.ParquetFile(path).metadata
    expected = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    assert len(expected) == 3000
    assert corpus.parquet_row_group_sizes(path) == expected

    program = ("import sys; from pathlib import Path; from llm.data.corpus import parquet_row_group_sizes; "
               f"n = len(parquet_row_group_sizes(Path({str(path)!r}))); print(n, 'pyarrow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.split() == ["3000", "False"], proc.stderr[-2000:]


def cut_footer(data: bytes) -> bytes:
    """The file with its footer's second half gone, the length before the magic saying so."""
    length = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - length
    return data[: start + length // 2] + (length // 2).to_bytes(4, "little") + b"PAR1"


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:-1], "no Parquet magic at its end"),
    (lambda data: data[:4] + b"\xff\xff\xff\x7fPAR1", r"footer length \(2147483647 bytes\) is past its start"),
    (lambda data: b"PAR1PAR1", "too short for Parquet"),
    (lambda data: cut_footer(data), "ends in the middle of a value"),
])
def test_a_damaged_footer_is_an_error_naming_the_file(tmp_path, damage, why):
    path = write_parquet(tmp_path / "x.parquet", {"text": TEXTS})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorpusError, match=rf"x\.parquet: not a readable Parquet file: .*{why}"):
        corpus.parquet_row_group_sizes(path)


def test_clean_names_a_shard_without_its_text_column_from_the_worker_that_reads_it(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_parquet(corpus_dir / "a.parquet", {"body": TEXTS})
    with pytest.raises(CorpusError, match=r"a\.parquet: no field 'text' \(its fields: body\)"):
        clean_corpus(DataParams(min_doc_chars=10), corpus_dir, tmp_path / "clean", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no spool folder left
