"""The data stages at scale: clean, tokenizer and tokenize on synthetic corpora of 1x, 10x and 100x a base size.

Each corpus is deterministic (``--seed``): ``base_files * scale`` distinct documents of about ``--file-kb`` KB,
each random words drawn from the vocabulary of a real corpus (``--vocab-from``, default ``data/corpus``: run
``llm data fetch`` first), in lines of 8 to 16 words. Into it are planted:

- near-duplicate pairs at known word-shingle Jaccard similarities (``PLANTED_JACCARD``): document B shares a
  run of words with document A and each has words of its own, so J ~ shared / (shared + 2 * own); the exact
  value of each pair is measured with ``llm.data.clean.shingle_jaccard`` and reported;
- exact duplicates: copies of documents under other names.

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
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def tree_rss(proc: psutil.Process) -> int:
    try:
        processes = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # it has just exited
        return 0
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(args: list[str], code: Path) -> tuple[float, int]:
    """Run ``python -m llm.cli ARGS`` with ``code`` first on PYTHONPATH: (wall seconds, peak tree RSS bytes)."""
    env = {**os.environ, "PYTHONPATH": str(code), "LLM_TRACKING": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llm.cli", *args], env=env, cwd=code,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    watched = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(watched))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"llm {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, peak


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def near_dup_scores(stats: dict, planted: dict, threshold: float) -> dict:
    expected = {(p["a"], p["b"]) for p in planted["pairs"] if p["jaccard"] >= threshold}
    found = {(d["kept"], d["dropped"]) for d in stats["near_duplicates"]}
    hit = len(expected & found)
    exact_found = {(d["kept"], d["dropped"]) for d in stats["exact_duplicates"]}
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
    raw = folder_bytes(sorted(corpus.glob("*.txt")))
    row: dict = {"code": str(code), "corpus_mb": raw / 1e6}
    wall, rss = run_stage(["clean", "--corpus", str(corpus), "--out", str(clean),
                           "--params", str(params / "data.yaml")], code)
    row["clean"] = {"s": wall, "rss_mb": rss / 1e6, "mb_s": raw / 1e6 / wall}
    stats = json.loads((clean / "stats.json").read_text())
    row.update(near_dup_scores(stats, planted, stats["near_duplicate_search"]["threshold"]))
    row["near_method"] = stats["near_duplicate_search"]["method"]
    if stages == ["clean"]:
        empty = {"s": float("nan"), "rss_mb": float("nan"), "mb_s": float("nan")}
        return {**row, "tokenizer": empty, "tokenize": empty, "outputs_sha": {
            str(p.relative_to(work)): _digest(p) for p in (clean / "train.txt", clean / "val.txt")}}
    train = folder_bytes([clean / "train.txt"])
    wall, rss = run_stage(["tokenizer", "--clean", str(clean), "--out", str(tok),
                           "--params", str(params / "tokenizer.yaml")], code)
    row["tokenizer"] = {"s": wall, "rss_mb": rss / 1e6, "mb_s": train / 1e6 / wall}
    splits = folder_bytes([clean / "train.txt", clean / "val.txt"])
    wall, rss = run_stage(["tokenize", "--clean", str(clean), "--tokenizer", str(tok), "--out", str(tokens)], code)
    row["tokenize"] = {"s": wall, "rss_mb": rss / 1e6, "mb_s": splits / 1e6 / wall}
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
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    vocab = read_vocabulary(args.vocab_from)
    root = Path(tempfile.mkdtemp(prefix="data_scale_", dir=args.workdir))
    rows = []
    print("| code | scale | corpus | clean | tokenizer | tokenize | near-dup recall / precision | exact dups |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for scale in args.scales:
            corpus = root / f"corpus_x{scale}"
            planted = make_corpus(corpus, vocab, args.base_files * scale, args.file_kb, args.seed)
            for i, code in enumerate(codes):
                work = root / f"out_x{scale}_{i}"
                stages = ["clean"] if args.stages == "clean" else ["clean", "tokenizer", "tokenize"]
                row = {"scale": scale, **bench_code(code, corpus, work, planted, stages),
                       "planted": [(p["target"], p["jaccard"]) for p in planted["pairs"][: len(PLANTED_JACCARD)]]}
                rows.append(row)
                cell = "{s:.1f} s, {rss_mb:.0f} MB, {mb_s:.1f} MB/s"
                print(f"| {code.name} | {scale}x | {args.base_files * scale} files, {row['corpus_mb']:.0f} MB "
                      f"| {cell.format(**row['clean'])} | {cell.format(**row['tokenizer'])} "
                      f"| {cell.format(**row['tokenize'])} | {row['near_recall']:.2f} / {row['near_precision']:.2f} "
                      f"({row['near_found']} found, {row['near_expected']} planted >= threshold, "
                      f"{row['near_method']}) | {row['exact_found']} |", flush=True)
                shutil.rmtree(work)
            shutil.rmtree(corpus)
        print("planted pairs (target, measured Jaccard):", rows[0]["planted"] if rows else [])
        if len(codes) > 1:
            for scale in args.scales:
                shas = {json.dumps(r["outputs_sha"]) for r in rows if r["scale"] == scale}
                print(f"{scale}x: outputs identical across --code: {len(shas) == 1}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
