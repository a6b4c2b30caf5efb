"""Atomic, durable writes and file hashing: every file and folder the package produces is put on disk through here.

A file is written under a fresh hidden temporary name beside its destination, ``.<name>.<12 hex>.tmp``,
and renamed over it, so a reader sees the old file or the new one, never part of one. A folder is built
in a fresh hidden sibling, ``.<name>.<12 hex>.tmp``, and swapped in by two renames: the previous folder
is moved aside to ``<name>.old`` first and deleted only once the new one is in place. An error (or
Ctrl-C) between the two renames moves the previous folder back at once; after a crash there, the next
writer puts it back (``recover_interrupted_swap``) before it writes, while readers only detect it
(``interrupted_swap``) and say what to run.

Durability: every write is on disk before it becomes visible. ``_rename`` is the one place a write is
published; before it the file is synced (for a folder, every file and folder of the new tree) and after
it the parent folder, so the new name survives a power cut as well. One fsync per file: a file written
inside a folder that is being built is synced with that folder's tree, not on its own.

Temporary files and folders get the umask's permissions (``mkstemp`` would make a file 0600 and
``mkdtemp`` a folder 0700), so outputs end up as readable as any file the user creates.

Imports nothing from ``llm`` (and no torch, numpy or MLflow): it is the base layer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; writers are not excluded there (see ``folder_lock``)
    fcntl = None  # type: ignore[assignment]

HASH_CHUNK_BYTES = 1 << 20
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_TEMP_OF = re.compile(r"^\.(.+)\.[0-9a-f]{12}\.tmp$")  # the name of what a temporary was to become


def _temp_path(dest: str | Path) -> Path:
    """A fresh hidden sibling name for ``dest``: ``.<name>.<12 hex digits>.tmp`` (not created)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")


def _aside_path(dest: str | Path, *, hidden: bool = False) -> Path:
    """Where ``replace_folder`` keeps the previous folder during a swap: ``<name>.old``, or
    ``.<name>.old`` with ``hidden``."""
    dest = Path(dest)
    return dest.with_name(f"{'.' if hidden else ''}{dest.name}.old")


# ---------------------------------------------------------------------------------------------- syncing


def _fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder_entries(folder: Path) -> None:
    # Windows cannot open a folder for syncing; its renames are journaled by NTFS
    if os.name != "nt":
        _fsync_path(folder)


def _sync_tree(root: Path) -> None:
    """Sync every file and folder under ``root`` (``root`` included), each once."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _fsync_path(path)
        _sync_folder_entries(Path(dirpath))


def _inside_folder_being_built(path: Path) -> bool:
    """True when ``path`` lies in a temporary folder of this module, whose tree is synced when it is swapped in."""
    return any(_TEMP_NAME.match(parent.name) for parent in path.absolute().parents)


def _rename(src: Path, dest: Path, *, sync_parent: bool = True) -> None:
    """Every rename in this module: the step that makes a write visible. The caller has synced ``src``;
    afterwards the parent folder (both parents, when they differ) is synced, so the new name is durable."""
    os.replace(src, dest)
    if sync_parent:
        _sync_folder_entries(dest.parent)
        if src.parent.absolute() != dest.parent.absolute():
            _sync_folder_entries(src.parent)


# ---------------------------------------------------------------------------------------------- files


@contextmanager
def atomic_file(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a new temporary file beside ``path`` for writing; rename it to ``path`` when the block ends.

    Text mode writes UTF-8 with ``\\n`` line endings. The bytes are synced to disk before the rename and
    the folder after it. If the block raises, the temporary file is removed, ``path`` is left as it was
    and the error propagates. The parent folder must exist (FileNotFoundError otherwise).
    """
    path = Path(path)
    tmp = _temp_path(path)
    durable = not _inside_folder_being_built(path)
    f = None
    try:  # the open too: a Ctrl-C that lands just after it made the file must remove it
        f = open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8", newline="\n")
        yield f
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        _rename(tmp, path, sync_parent=durable)
    except BaseException:
        if f is not None:
            f.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> None:
    """Write ``text`` (a string, or an iterable of string chunks written in order) to ``path`` atomically,
    as UTF-8 with ``\\n`` line endings (see ``atomic_file``)."""
    with atomic_file(path) as f:
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
) -> None:
    """Write ``json.dumps(data, ...)`` plus a final newline to ``path`` atomically (see ``atomic_file``).

    Raises TypeError (before anything is written) when ``data`` is not JSON-serialisable.
    """
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    atomic_write_text(path, text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, binary=True) as f:
        f.write(data)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """Give the file ``path`` the mode of any file the user creates (0666 less the umask: 0644 usually).
    For files written by libraries that make them 0600 (safetensors' ``save_file``)."""
    os.chmod(path, 0o666 & ~current_umask())


def remove_stale_temp_files(path: str | Path) -> None:
    """Delete the temporary files, and folders being built, that a process killed mid-write left beside
    ``path``. For writers only: it would also delete the temporary of a write still in progress."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()


# ---------------------------------------------------------------------------------------------- folders


class FolderLocked(RuntimeError):
    """Another process is writing the folder; the message names it (its pid) and the lock file."""


_held: dict[str, list[int]] = {}  # lock files this process holds: [file descriptor, holders in this process]
_held_guard = threading.Lock()


def lock_path(dest: str | Path) -> Path:
    """The lock file of the folder ``dest``: ``.<name>.lock`` beside it while a writer holds it (hidden, and
    ignored by DVC)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.lock")


@contextmanager
def folder_lock(dest: str | Path) -> Iterator[None]:
    """Hold the exclusive right to write the folder ``dest`` for the block: ``flock`` on ``lock_path(dest)``,
    which the system releases when the process dies however it dies (so a killed writer never leaves it
    held). Re-entrant within a process (a training run holds it, and each checkpoint write takes it again).
    Raises FolderLocked at once, naming the holder's pid, when another process holds it. Where there is
    no ``fcntl`` (Windows) it excludes nothing."""
    lock = lock_path(dest)
    key = str(lock.absolute())
    if fcntl is None:
        yield
        return
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(lock, Path(dest)), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                lock.unlink(missing_ok=True)  # while still locked: a writer that opened it retries (``_acquire``)
                os.close(fd)


def _acquire(lock: Path, dest: Path) -> int:
    """Open and flock ``lock``, write this pid into it; returns its descriptor. Raises FolderLocked."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderLocked(f"{dest}: another process (pid {holder}) is writing it (lock {lock}); wait for it "
                               "to finish, or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the one there now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_killed_writes(parent: str | Path) -> list[str]:
    """Delete the temporary files and folders that killed writers left in ``parent`` (``.<name>.<hex>.tmp``),
    each only while holding ``folder_lock`` of its ``<name>``: a write still in progress keeps its own.
    Returns the names of the folders and files whose leftovers were removed, sorted."""
    parent = Path(parent)
    names = sorted({m.group(1) for p in parent.glob(".*.tmp") if (m := _TEMP_OF.match(p.name))}) \
        if parent.is_dir() else []
    removed = []
    for name in names:
        try:
            with folder_lock(parent / name):
                remove_stale_temp_files(parent / name)
        except FolderLocked:
            continue
        removed.append(name)
    return removed


@contextmanager
def temporary_folder_beside(dest: str | Path) -> Iterator[Path]:
    """Create a new empty hidden folder next to ``dest`` (and ``dest``'s parent if missing); yield it and
    remove it, with whatever is still inside, when the block ends."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest)
    try:  # the mkdir too: a Ctrl-C that lands just after it made the folder must remove it
        tmp.mkdir()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: str | Path, dest: str | Path, *, hidden_aside: bool = False) -> None:
    """Put the complete folder ``new`` at ``dest``, on the same file system, durably.

    Every file and folder of ``new`` is synced first. An existing ``dest`` is moved aside, to
    ``<name>.old`` (``.<name>.old`` with ``hidden_aside``, for folders whose siblings are named by users),
    and deleted only after ``new`` is in place. If the second rename fails (an error, Ctrl-C), the previous
    folder is moved back before the error propagates; a crash there leaves it aside, and this function
    (any later writer of ``dest``) puts it back first. A stale aside folder next to a complete ``dest`` is
    deleted. Errors (OSError) propagate.
    """
    new, dest = Path(new), Path(dest)
    old = _aside_path(dest, hidden=hidden_aside)
    recover_interrupted_swap(dest, hidden_aside=hidden_aside)
    if old.exists():
        shutil.rmtree(old)
    _sync_tree(new)
    if dest.exists():
        _rename(dest, old)
    try:
        _rename(new, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)  # undo the first rename: readers keep the previous folder
        raise
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_folder(dest: str | Path, *, hidden_aside: bool = False) -> Iterator[Path]:
    """Yield a new empty hidden folder beside ``dest`` to fill; when the block ends without an error it
    replaces ``dest`` (``replace_folder``: synced, then swapped in). A previous folder that a crash left
    aside is put back first. If the block raises, the folder is removed, ``dest`` is left as it was and
    the error propagates. ``dest``'s parent is created if missing. The block holds ``folder_lock(dest)``:
    raises FolderLocked at once when another process is writing ``dest``.
    """
    dest = Path(dest)
    with folder_lock(dest):
        recover_interrupted_swap(dest, hidden_aside=hidden_aside)  # a failing writer must leave the previous folder
        with temporary_folder_beside(dest) as tmp:
            yield tmp
            replace_folder(tmp, dest, hidden_aside=hidden_aside)


def interrupted_swap(dest: str | Path, *, hidden_aside: bool = False) -> Path | None:
    """The previous folder that a crash between the two renames of ``replace_folder`` left aside (``dest``
    missing, ``<name>.old`` present), or None when there is none. Reads only: for readers, which must not
    move it back while a writer may be between its renames."""
    dest = Path(dest)
    old = _aside_path(dest, hidden=hidden_aside)
    if not dest.exists() and old.is_dir():
        return old
    return None


def recover_interrupted_swap(dest: str | Path, *, hidden_aside: bool = False) -> bool:
    """For writers of ``dest``: if a crash hit between the two renames of ``replace_folder``, move the
    previous folder back to ``dest``. Returns True when it did, False when there was nothing to recover."""
    dest = Path(dest)
    old = interrupted_swap(dest, hidden_aside=hidden_aside)
    if old is None:
        return False
    _rename(old, dest)
    return True


def recover_interrupted_swaps(parent: str | Path, *, hidden_aside: bool = False) -> list[Path]:
    """``recover_interrupted_swap`` for every folder in ``parent`` (a folder of separately swapped folders,
    such as ``data/corpus/<source>``). Returns the folders put back, sorted."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    restored = []
    for aside in sorted(parent.iterdir()):
        name = aside.name
        if not name.endswith(".old") or name.startswith(".") != hidden_aside:
            continue
        dest = parent / name.removesuffix(".old").removeprefix("." if hidden_aside else "")
        if dest.name and recover_interrupted_swap(dest, hidden_aside=hidden_aside):
            restored.append(dest)
    return restored


# ---------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: str | Path) -> dict[str, str]:
    """Hex sha256 of every file under ``folder`` by relative POSIX path, sorted, leaving out hidden files and
    folders (the temporaries of writes). Raises FileNotFoundError naming ``folder`` when it is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    hashes = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            hashes[rel.as_posix()] = sha256_file(path)
    return dict(sorted(hashes.items()))
