"""Atomic writes and file hashing: every file and folder the package produces is put on disk through here.

A file is written under a fresh hidden temporary name beside its destination, ``.<name>.<12 hex>.tmp``,
and renamed over it, so a reader sees the old file or the new one, never part of one. A folder is built
in a fresh hidden sibling, ``.<name>.<12 hex>.tmp``, and swapped in by two renames: the previous folder
is moved aside to ``<name>.old`` first and deleted only once the new one is in place, and
``recover_interrupted_swap`` puts it back after a crash between the two renames.

Temporary files and folders get the umask's permissions (``mkstemp`` would make a file 0600 and
``mkdtemp`` a folder 0700), so outputs end up as readable as any file the user creates.

Durability: ``fsync=True`` syncs a file's bytes before its rename (as the clean and chat-data stages
ask); nothing else is synced yet. Every rename goes through ``_rename``, the one place where syncing
the data before it and the parent folder after it belongs.

Imports nothing from ``llm`` (and no torch, numpy or MLflow): it is the base layer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

HASH_CHUNK_BYTES = 1 << 20


def _temp_path(dest: str | Path) -> Path:
    """A fresh hidden sibling name for ``dest``: ``.<name>.<12 hex digits>.tmp`` (not created)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")


def _aside_path(dest: str | Path, *, hidden: bool = False) -> Path:
    """Where ``replace_folder`` keeps the previous folder during a swap: ``<name>.old``, or
    ``.<name>.old`` with ``hidden``."""
    dest = Path(dest)
    return dest.with_name(f"{'.' if hidden else ''}{dest.name}.old")


def _rename(src: Path, dest: Path) -> None:
    """Every rename in this module: the step that makes a write visible. Durable writes will sync ``src``
    (a file's bytes, a folder's tree) before it and the parent folder after it, here."""
    os.replace(src, dest)


# ---------------------------------------------------------------------------------------------- files


@contextmanager
def atomic_file(path: str | Path, *, binary: bool = False, fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a new temporary file beside ``path`` for writing; rename it to ``path`` when the block ends.

    Text mode writes UTF-8 with ``\\n`` line endings. With ``fsync`` the bytes are synced to disk before
    the rename. If the block raises, the temporary file is removed, ``path`` is left as it was and the
    error propagates. The parent folder must exist (FileNotFoundError otherwise).
    """
    path = Path(path)
    tmp = _temp_path(path)
    f = open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8", newline="\n")
    try:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        _rename(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str | Iterable[str], *, fsync: bool = False) -> None:
    """Write ``text`` (a string, or an iterable of string chunks written in order) to ``path`` atomically,
    as UTF-8 with ``\\n`` line endings (see ``atomic_file``)."""
    with atomic_file(path, fsync=fsync) as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)


def atomic_write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    ensure_ascii: bool = True,
    fsync: bool = False,
) -> None:
    """Write ``json.dumps(data, ...)`` plus a final newline to ``path`` atomically (see ``atomic_file``).

    Raises TypeError (before anything is written) when ``data`` is not JSON-serialisable.
    """
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    atomic_write_text(path, text, fsync=fsync)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, binary=True, fsync=fsync) as f:
        f.write(data)


def remove_stale_temp_files(path: str | Path) -> None:
    """Delete the temporary files that ``atomic_file`` left beside ``path`` when a process died mid-write."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink()


# ---------------------------------------------------------------------------------------------- folders


@contextmanager
def temporary_folder_beside(dest: str | Path) -> Iterator[Path]:
    """Create a new empty hidden folder next to ``dest`` (and ``dest``'s parent if missing); yield it and
    remove it, with whatever is still inside, when the block ends."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: str | Path, dest: str | Path, *, hidden_aside: bool = False) -> None:
    """Put the complete folder ``new`` at ``dest``, on the same file system.

    An existing ``dest`` is moved aside first, to ``<name>.old`` (``.<name>.old`` with ``hidden_aside``,
    for folders whose siblings are named by users), and deleted only after ``new`` is in place; a crash
    between the two renames leaves it there for ``recover_interrupted_swap``. A stale aside folder from
    such a crash is deleted first. Errors (OSError) propagate.
    """
    new, dest = Path(new), Path(dest)
    old = _aside_path(dest, hidden=hidden_aside)
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        _rename(dest, old)
    _rename(new, dest)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_folder(dest: str | Path, *, hidden_aside: bool = False) -> Iterator[Path]:
    """Yield a new empty hidden folder beside ``dest`` to fill; when the block ends without an error it
    replaces ``dest`` (``replace_folder``). If the block raises, the folder is removed, ``dest`` is left
    as it was and the error propagates. ``dest``'s parent is created if missing.
    """
    dest = Path(dest)
    with temporary_folder_beside(dest) as tmp:
        yield tmp
        replace_folder(tmp, dest, hidden_aside=hidden_aside)


def recover_interrupted_swap(dest: str | Path, *, hidden_aside: bool = False) -> None:
    """If a crash hit between the two renames of ``replace_folder`` (``dest`` missing, its aside folder
    present), move the previous folder back to ``dest``; otherwise do nothing."""
    dest = Path(dest)
    old = _aside_path(dest, hidden=hidden_aside)
    if not dest.exists() and old.exists():
        _rename(old, dest)


# ---------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
