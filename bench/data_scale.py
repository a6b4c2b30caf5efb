"""The data stages at scale: clean, tokenizer and tokenize on synthetic corpora of 1x, 10x and 100x a base size.

Each corpus is deterministic (``--seed``): ``base_files * scale`` distinct documents of about ``--file-kb`` KB,
each random words drawn from the vocabulary of a real corpus (``--vocab-from``, default ``data/corpus``: run
``llm data fetch`` first), in lines of 8 to 16 words. Into it are planted:

- near-duplicate pairs at known word-shingle Jaccard similarities (``PLANTED_JACCARD``): document B shares a
  run of words with document A and each has words of its own, so J ~ shared / (shared + 2 * own); the exact
  value of each pair is measured with ``llm.data.clean.shingle_jaccard`` and reported;
- exact duplicates: copies of documents under other names.

``--shape logs`` writes a low-entropy corpus instead, as logs, code, tables or templated text are: groups of
``LOG_GROUP`` documents (interleaved in name order, as the logs of one service among others' would be: document d
is in group d mod groups), each group written from 24 line templates of 24 words of its own with two numbers
in each line (drawn per document from 0 to between 100 and 5,000), so documents of a group are
near-duplicate candidates of each other (Jaccard about 0.01 to 0.2, around the 0.05 threshold) and of no
other group's. Nothing is planted; it measures how the near-duplicate check scales with the candidates.

``--format parquet`` stores the corpus as Parquet shards (one row per document, a ``text`` column, shards of
``--shard-mb`` MB of text in row groups of ``PARQUET_ROW_GROUP_DOCS`` rows) that clean reads directly.

Each stage runs as its own process (``python -m llm.cli clean|tokenizer|tokenize``, tracking off), its
process tree's resident memory summed and sampled every 50 ms for the peak. MB/s is the stage's input:
the raw corpus for clean, ``train.txt`` for tokenizer (it reads at most ``max_train_chars``), both splits
for tokenize. Near-duplicate recall is the share of planted pairs at or above the threshold that clean
dropped; precision the share of the pairs it dropped that are planted ones at or above it.

``--code DIR`` (repeatable) runs the stages with another checkout's ``llm`` first on ``PYTHONPATH``, so
the code before and after a change is measured on the same corpora in one run.

Usage:
    python bench/data_scale.py                                   # 1x and 10x of 100 files of 450 KB
    python bench/data_scale.py --scales 1 10 100                 # 100x is 4.5 GB: check `df -h /tmp`
    python bench/data_scale.py --scales 100 --stages clean       # memory of clean at 100x, without tokenizing
    python bench/data_scale.py --base-files 10 --scales 1 --code /tmp/old --code .   # before and after
    python bench/data_scale.py --shape logs --base-files 1000 --file-kb 359 --scales 1 --stages clean   # 368 MB
    python bench/data_scale.py --format txt parquet --base-files 4100 --scales 1  # 1.9 GB of text, 1 GB as Parquet
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm.data.clean import shingle_jaccard  # noqa: E402

# target Jaccard of the planted near-duplicate pairs: above the default threshold (0.05), and below it
PLANTED_JACCARD = (0.8, 0.4, 0.15, 0.08, 0.02)
SHINGLE_SIZE = 5
# --shape logs: documents per group sharing a vocabulary and templates
LOG_GROUP = 10
LOG_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
# --format parquet: documents per row group (about 7 MB of text at the default --file-kb, as llm data fetch
# writes them)
PARQUET_ROW_GROUP_DOCS = 16


def read_vocabulary(folder: Path) -> list[str]:
    """The distinct words (runs of letters) of every .txt under ``folder``, sorted."""
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise SystemExit(f"{folder}: no .txt files to take a vocabulary from; run `llm data fetch` first")
    words: set[str] = set()
    for path in files:
        words.update(re.findall(r"[A-Za-z]+", path.read_text(encoding="utf-8", errors="replace")))
    return sorted(words)


def random_words(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n)]


def as_text(words: list[str], rng: np.random.Generator) -> str:
    lines, i = [], 0
    lengths = rng.integers(8, 17, size=len(words) // 8 + 1)
    for length in lengths:
        if i >= len(words):
            break
        lines.append(" ".join(words[i : i + int(length)]))
        i += int(length)
    return "\n".join(lines) + "\n"


def make_corpus(folder: Path, vocab: list[str], n_files: int, file_kb: int, seed: int) -> dict:
    """Write the corpus; returns what was planted (pairs with their measured Jaccard, exact duplicates)."""
    folder.mkdir(parents=True)
    avg_word = np.mean([len(w) + 1 for w in vocab[:: max(1, len(vocab) // 2000)]])
    words_per_doc = int(file_kb * 1024 / avg_word)
    n_pairs = max(len(PLANTED_JACCARD), n_files // 50)
    n_exact = max(2, n_files // 100)
    n_distinct = n_files - 2 * n_pairs - n_exact
    if n_distinct < n_exact:
        raise SystemExit(f"{n_files} files cannot hold {n_pairs} planted pairs and {n_exact} copies; use more")
    width = len(str(n_files))
    planted: dict = {"pairs": [], "exact": []}
    for i in range(n_distinct):
        rng = np.random.default_rng([seed, i])
        (folder / f"doc{i:0{width}d}.txt").write_text(as_text(random_words(rng, vocab, words_per_doc), rng))
    for p in range(n_pairs):
        target = PLANTED_JACCARD[p % len(PLANTED_JACCARD)]
        rng = np.random.default_rng([seed, n_files + p])
        # J = shared / (shared + 2 * own) with shared + own = words_per_doc
        own = int(words_per_doc * (1 - target) / (1 + target))
        shared = random_words(rng, vocab, words_per_doc - own)
        a = as_text(shared + random_words(rng, vocab, own), rng)
        b = as_text(shared + random_words(rng, vocab, own), rng)
        name_a, name_b = f"pair{p:0{width}d}a.txt", f"pair{p:0{width}d}b.txt"
        (folder / name_a).write_text(a)
        (folder / name_b).write_text(b)
        planted["pairs"].append({"a": name_a, "b": name_b, "target": target,
                                 "jaccard": round(shingle_jaccard(a, b, SHINGLE_SIZE), 4)})
    for e in range(n_exact):
        source = f"doc{e:0{width}d}.txt"
        shutil.copyfile(folder / source, folder / f"zcopy{e:0{width}d}.txt")
        planted["exact"].append({"kept": source, "dropped": f"zcopy{e:0{width}d}.txt"})
    return planted


def log_templates(seed: int, group: int) -> list[str]:
    """The 24 line templates of a group of --shape logs: 6 to 9 of the group's 24 words and two number slots."""
    vocab = sorted({a + b for a in LOG_SYLLABLES for b in LOG_SYLLABLES})
    rng = np.random.default_rng([seed, 1 << 20, group])
    words = [vocab[i] for i in rng.choice(len(vocab), size=24, replace=False)]
    templates = []
    for _ in range(24):
        tokens = [words[i] for i in rng.integers(0, len(words), size=int(rng.integers(6, 10)))]
        for pos in sorted(rng.choice(len(tokens), size=2, replace=False).tolist(), reverse=True):
            tokens.insert(pos, "{}")
        templates.append(" ".join(tokens))
    return templates


def make_log_corpus(folder: Path, n_files: int, file_kb: int, seed: int) -> dict:
    """Write the --shape logs corpus (see the module docstring); nothing is planted."""
    folder.mkdir(parents=True)
    width = len(str(n_files))
    groups = max(1, n_files // LOG_GROUP)
    for d in range(n_files):
        templates = log_templates(seed, d % groups)
        rng = np.random.default_rng([seed, d])
        values = int(np.exp(rng.uniform(np.log(100), np.log(5000))))
        lines = int(file_kb * 1024 / np.mean([len(t) for t in templates]) * 1.2) + 1  # more than enough
        ids = rng.integers(0, len(templates), size=lines)
        slots = rng.integers(0, values, size=(lines, 2))
        # each line's bytes: the template less its two "{}", the two numbers, the newline
        digits = (np.floor(np.log10(np.maximum(slots, 1))) + 1).sum(axis=1)
        sizes = np.array([len(t) - 4 for t in templates])[ids] + digits + 1
        lines = int(np.searchsorted(np.cumsum(sizes), file_kb * 1024)) + 1
        text = "\n".join(templates[t].format(a, b) for t, (a, b) in zip(ids[:lines].tolist(), slots[:lines].tolist()))
        text += "\n"
        (folder / f"log{d:0{width}d}.txt").write_text(text)
    return {"pairs": [], "exact": []}


def to_parquet(folder: Path, out: Path, shard_mb: int) -> dict[str, str]:
    """Write the .txt documents of ``folder`` as Parquet shards in ``out`` (see the module docstring); returns
    each row's document name in the clean stage (``shard#row``) -> its file name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    names: dict[str, str] = {}
    files = sorted(folder.glob("*.txt"))
    shard, rows, size, writer = 0, 0, 0, None
    schema = pa.schema([("text", pa.string())])
    for start in range(0, len(files), PARQUET_ROW_GROUP_DOCS):
        if writer is None:
            writer = pq.ParquetWriter(out / f"shard-{shard:05d}.parquet", schema, compression="zstd",
                                      use_dictionary=False)
        group = files[start : start + PARQUET_ROW_GROUP_DOCS]
        texts = [p.read_text() for p in group]
        writer.write_table(pa.table({"text": texts}, schema=schema), row_group_size=len(texts))
        for path in group:
            names[f"shard-{shard:05d}.parquet#{rows}"] = path.name
            rows += 1
        size += sum(map(len, texts))
        if size >= shard_mb << 20:
            writer.close()
            writer, shard, rows, size = None, shard + 1, 0, 0
    if writer is not None:
        writer.close()
    return names


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) of ``proc`` and its descendants, summed. RSS counts the pages of a shared library once per
    process that maps it (pyarrow's are ~35 MB); PSS shares them out, so its sum is the tree's real footprint."""
    try:
        processes = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # it has just exited
        return 0, 0
    rss = pss = 0
    for p in processes:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
    return rss, pss


def run_stage(args: list[str], code: Path) -> tuple[float, int, float, int]:
    """Run ``python -m llm.cli ARGS`` with ``code`` first on PYTHONPATH: (wall seconds, peak tree RSS bytes, CPU
    seconds of the process tree: user and system, its worker processes included, less sensitive to a busy
    machine than the wall time; peak tree PSS bytes)."""
    env = {**os.environ, "PYTHONPATH": str(code), "LLM_TRACKING": "0"}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llm.cli", *args], env=env, cwd=code,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    watched = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_pss
        while not done.is_set():
            rss, pss = tree_memory(watched)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"llm {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, peak, (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime), peak_pss


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def near_dup_scores(stats: dict, planted: dict, threshold: float) -> dict:
    expected = {(p["a"], p["b"]) for p in planted["pairs"] if p["jaccard"] >= threshold}
    file_of = planted.get("names", {})  # a Parquet row's document name -> the file it was made from
    found = {(file_of.get(d["kept"], d["kept"]), file_of.get(d["dropped"], d["dropped"]))
             for d in stats["near_duplicates"]}
    hit = len(expected & found)
    exact_found = {(file_of.get(d["kept"], d["kept"]), file_of.get(d["dropped"], d["dropped"]))
                   for d in stats["exact_duplicates"]}
    exact_expected = {(d["kept"], d["dropped"]) for d in planted["exact"]}
    return {
        "near_recall": hit / len(expected) if expected else 1.0,
        "near_precision": hit / len(found) if found else 1.0,
        "near_expected": len(expected),
        "near_found": len(found),
        "exact_found": f"{len(exact_found & exact_expected)}/{len(exact_expected)}",
    }


def bench_code(code: Path, corpus: Path, work: Path, planted: dict, stages: list[str]) -> dict:
    params = ROOT / "params"
    clean, tok, tokens = work / "clean", work / "tokenizer", work / "tokens"
    raw = folder_bytes(sorted(p for p in corpus.iterdir() if p.is_file()))
    row: dict = {"code": str(code), "corpus_mb": raw / 1e6}
    wall, rss, cpu, pss = run_stage(["clean", "--corpus", str(corpus), "--out", str(clean),
                                "--params", str(params / "data.yaml")], code)
    row["clean"] = {"s": wall, "cpu_s": cpu, "rss_mb": rss / 1e6, "pss_mb": pss / 1e6, "mb_s": raw / 1e6 / wall}
    stats = json.loads((clean / "stats.json").read_text())
    row.update(near_dup_scores(stats, planted, stats["near_duplicate_search"]["threshold"]))
    row["near_method"] = stats["near_duplicate_search"]["method"]
    row["near_checked"] = stats["near_duplicate_search"].get("checked_pairs",
                                                             stats["near_duplicate_search"].get("candidate_pairs"))
    if stages == ["clean"]:
        empty = {key: float("nan") for key in ("s", "cpu_s", "rss_mb", "pss_mb", "mb_s")}
        return {**row, "tokenizer": empty, "tokenize": empty, "outputs_sha": {
            str(p.relative_to(work)): _digest(p) for p in (clean / "train.txt", clean / "val.txt")}}
    train = folder_bytes([clean / "train.txt"])
    wall, rss, cpu, pss = run_stage(["tokenizer", "--clean", str(clean), "--out", str(tok),
                                "--params", str(params / "tokenizer.yaml")], code)
    row["tokenizer"] = {"s": wall, "cpu_s": cpu, "rss_mb": rss / 1e6, "pss_mb": pss / 1e6, "mb_s": train / 1e6 / wall}
    splits = folder_bytes([clean / "train.txt", clean / "val.txt"])
    wall, rss, cpu, pss = run_stage(["tokenize", "--clean", str(clean), "--tokenizer", str(tok), "--out", str(tokens)],
                               code)
    row["tokenize"] = {"s": wall, "cpu_s": cpu, "rss_mb": rss / 1e6, "pss_mb": pss / 1e6, "mb_s": splits / 1e6 / wall}
    row["outputs_sha"] = {str(p.relative_to(work)): _digest(p) for p in
                          (clean / "train.txt", clean / "val.txt", tokens / "train.bin", tokens / "val.bin")}
    return row


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def bench_format(args: argparse.Namespace, fmt: str, scale: int, code: Path, corpus: Path, work: Path,
                 planted: dict) -> dict:
    """One row: the stages of ``code`` on ``corpus`` stored as ``fmt`` (Parquet written beside it once)."""
    if fmt == "parquet":
        parquet = corpus.parent / f"parquet_x{scale}"
        if not parquet.exists():
            planted["names"] = to_parquet(corpus, parquet, args.shard_mb)
        corpus = parquet
    else:
        planted = {**planted, "names": {}}
    stages = ["clean"] if args.stages == "clean" else ["clean", "tokenizer", "tokenize"]
    row = {"scale": scale, "format": fmt, **bench_code(code, corpus, work, planted, stages),
           "planted": [(p["target"], p["jaccard"]) for p in planted["pairs"][: len(PLANTED_JACCARD)]]}
    cell = "{s:.1f} s (CPU {cpu_s:.0f} s), {rss_mb:.0f} MB (PSS {pss_mb:.0f} MB), {mb_s:.1f} MB/s"
    print(f"| {code.name} | {scale}x | {args.base_files * scale} docs, {row['corpus_mb']:.0f} MB {args.shape}/{fmt} "
          f"| {cell.format(**row['clean'])} | {cell.format(**row['tokenizer'])} "
          f"| {cell.format(**row['tokenize'])} | {row['near_recall']:.2f} / {row['near_precision']:.2f} "
          f"({row['near_found']} found, {row['near_expected']} planted >= threshold, "
          f"{row['near_method']}, {row['near_checked']} pairs checked) | {row['exact_found']} | "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(work)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-files", type=int, default=100, help="documents at scale 1 (default 100)")
    parser.add_argument("--file-kb", type=int, default=450, help="size of each document in KB (default 450)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-from", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--code", type=Path, action="append", help="checkout whose llm runs the stages "
                        "(repeatable; default this one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora go (default: a temp folder, "
                        "deleted at the end)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--stages", choices=["all", "clean"], default="all", help="clean alone (e.g. for 100x)")
    parser.add_argument("--shape", choices=["words", "logs"], default="words",
                        help="random words with planted duplicates, or low-entropy templated logs")
    parser.add_argument("--format", choices=["txt", "parquet"], nargs="+", default=["txt"],
                        help="how the corpus is stored; both: the same documents as .txt, then as Parquet")
    parser.add_argument("--shard-mb", type=int, default=256, help="MB of text per Parquet shard (default 256)")
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    vocab = read_vocabulary(args.vocab_from) if args.shape == "words" else []
    root = Path(tempfile.mkdtemp(prefix="data_scale_", dir=args.workdir))
    rows = []
    print(f"load before: {os.getloadavg()}")
    print("| code | scale | corpus | clean | tokenizer | tokenize | near-dup recall / precision | exact dups |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for scale in args.scales:
            corpus = root / f"corpus_x{scale}"
            if args.shape == "logs":
                planted = make_log_corpus(corpus, args.base_files * scale, args.file_kb, args.seed)
            else:
                planted = make_corpus(corpus, vocab, args.base_files * scale, args.file_kb, args.seed)
            for fmt in args.format:
                for i, code in enumerate(codes):
                    rows.append(bench_format(args, fmt, scale, code, corpus, root / f"out_x{scale}_{i}", planted))
            shutil.rmtree(corpus)
            shutil.rmtree(root / f"parquet_x{scale}", ignore_errors=True)
        print("planted pairs (target, measured Jaccard):", rows[0]["planted"] if rows else [])
        if len(codes) > 1:
            for scale in args.scales:
                shas = {json.dumps(r["outputs_sha"]) for r in rows if r["scale"] == scale and r["format"] == "txt"}
                print(f"{scale}x: outputs identical across --code: {len(shas) == 1}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
