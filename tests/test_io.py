"""llm.io: atomic writes of files and folders, crash recovery of a folder swap, file hashing."""

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from llm.io import (
    atomic_file,
    atomic_folder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    recover_interrupted_swap,
    remove_stale_temp_files,
    replace_folder,
    sha256_file,
    temporary_folder_beside,
)

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- files


def test_atomic_write_text_writes_utf8_with_unix_newlines(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "Café\nnaïve\n")
    assert path.read_bytes() == "Café\nnaïve\n".encode()


def test_atomic_write_text_writes_chunks_in_order(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_text(path, (f"{i}\n" for i in range(3)))
    assert path.read_bytes() == b"0\n1\n2\n"


def test_atomic_write_text_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old contents, longer than the new")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize(
    "options",
    [{}, {"sort_keys": True}, {"indent": 1, "ensure_ascii": False}, {"indent": 2, "ensure_ascii": False}],
)
def test_atomic_write_json_is_json_dumps_plus_a_final_newline(tmp_path, options):
    data = {"b": [1, 2.5, None], "a": {"name": "Ophélie", "ok": True}}
    path = tmp_path / "data.json"
    atomic_write_json(path, data, **options)
    expected = json.dumps(data, **{"indent": 2, **options}) + "\n"
    assert path.read_bytes() == expected.encode("utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == data


def test_atomic_write_json_refuses_unserialisable_data_and_writes_nothing(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}\n")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"path": Path("x")})
    assert path.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_atomic_write_bytes_writes_the_exact_bytes(tmp_path):
    data = bytes(range(256)) * 3
    atomic_write_bytes(tmp_path / "blob.bin", data)
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("previous")

    def chunks():
        yield "partial "
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        atomic_write_text(path, chunks())
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_file_writes_a_hidden_temp_file_that_becomes_the_file_when_the_block_ends(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(b"old")
    with atomic_file(path, binary=True) as f:
        f.write(b"new bytes")
        f.flush()
        temps = [p for p in tmp_path.iterdir() if p != path]
        assert len(temps) == 1 and TEMP_NAME.match(temps[0].name)["name"] == "tokens.bin"
        assert temps[0].read_bytes() == b"new bytes"
        assert path.read_bytes() == b"old"  # readers still see the old file
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.bin"]


def test_atomic_file_removes_its_temp_file_when_the_block_raises(tmp_path):
    path = tmp_path / "tokens.bin"
    with pytest.raises(KeyboardInterrupt), atomic_file(path, binary=True) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_two_writers_of_one_file_use_different_temp_names(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_file(path) as first, atomic_file(path) as second:
        assert first.name != second.name
        first.write("first")
        second.write("second")
    assert path.read_text() == "first"  # the outer block ends last, so its rename wins


def test_atomic_writes_need_the_parent_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "out.txt", "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_permissions(tmp_path, mask, expected):
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {})
        atomic_write_bytes(tmp_path / "c.bin", b"x")
    assert [mode(tmp_path / name) for name in ["a.txt", "b.json", "c.bin"]] == [expected] * 3


def test_fsync_is_called_only_when_asked(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write_text(tmp_path / "plain.txt", "x")
    assert synced == []
    atomic_write_text(tmp_path / "durable.txt", "x", fsync=True)
    atomic_write_json(tmp_path / "durable.json", {}, fsync=True)
    atomic_write_bytes(tmp_path / "durable.bin", b"x", fsync=True)
    assert len(synced) == 3


def test_remove_stale_temp_files_removes_only_the_temp_files_of_that_file(tmp_path):
    names = ["train.txt", ".train.txt.0123456789ab.tmp", ".train.txt.fedcba987654.tmp", ".val.txt.0123456789ab.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(tmp_path / "train.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".val.txt.0123456789ab.tmp", "train.txt"]


def test_remove_stale_temp_files_removes_what_a_killed_writer_left(tmp_path):
    path = tmp_path / "meta.json"
    killed = "import os, sys, llm.io\nwith llm.io.atomic_file(sys.argv[1]) as f:\n    f.write('{')\n    os._exit(9)\n"
    assert subprocess.run([sys.executable, "-c", killed, str(path)]).returncode == 9
    [leftover] = tmp_path.iterdir()
    assert TEMP_NAME.match(leftover.name)["name"] == "meta.json"
    remove_stale_temp_files(path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- folders


def test_atomic_folder_yields_an_empty_hidden_sibling_with_the_umask_permissions(tmp_path):
    dest = tmp_path / "run"
    with umask(0o027), atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and TEMP_NAME.match(tmp.name)["name"] == "run"
        assert list(tmp.iterdir()) == []
        assert mode(tmp) == 0o750  # not mkdtemp's 0700
        (tmp / "weights").write_text("w")
    assert mode(dest) == 0o750


def test_atomic_folder_creates_the_missing_parent_folders(tmp_path):
    dest = tmp_path / "artifacts" / "deep" / "run"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    assert tree(dest) == {"a.txt": b"a"}


def test_atomic_folder_replaces_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    dest = make_folder(tmp_path / "run", {"stale.txt": "old", "sub/old.txt": "old"})
    with atomic_folder(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert tree(dest) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_folder_keeps_the_old_folder_when_the_body_raises(tmp_path):
    dest = make_folder(tmp_path / "run", {"model.txt": "previous"})
    with pytest.raises(RuntimeError, match="export failed"), atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("half written")
        raise RuntimeError("export failed")
    assert tree(dest) == {"model.txt": b"previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_folder_that_fails_on_a_new_destination_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_folder(tmp_path / "run"):
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_keeps_the_old_folder_aside_until_the_new_one_is_in(tmp_path, monkeypatch):
    dest = make_folder(tmp_path / "run", {"model.txt": "previous"})
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name, tree(tmp_path / "run.old") if Path(dst) == dest else None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    with atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("new")
    assert seen[0][:2] == ("run", "run.old")
    assert TEMP_NAME.match(seen[1][0]) and seen[1][1] == "run"
    assert seen[1][2] == {"model.txt": b"previous"}  # the old folder still exists when the new one moves in
    assert tree(dest) == {"model.txt": b"new"} and not (tmp_path / "run.old").exists()


def crash_on_the_second_rename(monkeypatch):
    """Make the rename of the finished temporary folder fail, as if the process died just before it."""
    real_replace = os.replace

    def replace(src, dst):
        if TEMP_NAME.match(Path(src).name):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_recover_interrupted_swap_restores_the_old_folder(tmp_path, monkeypatch):
    dest = make_folder(tmp_path / "run", {"model.txt": "previous"})
    crash_on_the_second_rename(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"), atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("new")
    monkeypatch.undo()
    assert not dest.exists() and tree(tmp_path / "run.old") == {"model.txt": b"previous"}

    recover_interrupted_swap(dest)

    assert tree(dest) == {"model.txt": b"previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_recover_interrupted_swap_does_nothing_when_no_swap_was_interrupted(tmp_path):
    recover_interrupted_swap(tmp_path / "never_written")
    assert list(tmp_path.iterdir()) == []
    dest = make_folder(tmp_path / "run", {"model.txt": "current"})
    make_folder(tmp_path / "run.old", {"model.txt": "stale"})
    recover_interrupted_swap(dest)
    assert tree(dest) == {"model.txt": b"current"}


def test_a_stale_aside_folder_is_deleted_by_the_next_swap(tmp_path):
    make_folder(tmp_path / "run.old", {"model.txt": "from a crashed swap"})
    dest = make_folder(tmp_path / "run", {"model.txt": "current"})
    with atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("new")
    assert tree(dest) == {"model.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_hidden_aside_keeps_the_old_folder_under_a_dot_name(tmp_path, monkeypatch):
    make_folder(tmp_path / "books.old", {"a.txt": "another source, not an aside folder"})
    dest = make_folder(tmp_path / "books", {"a.txt": "previous"})
    crash_on_the_second_rename(monkeypatch)
    with pytest.raises(OSError), atomic_folder(dest, hidden_aside=True) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert tree(tmp_path / ".books.old") == {"a.txt": b"previous"}

    recover_interrupted_swap(dest, hidden_aside=True)
    with atomic_folder(dest, hidden_aside=True) as tmp:
        (tmp / "a.txt").write_text("new")

    assert tree(dest) == {"a.txt": b"new"}
    assert tree(tmp_path / "books.old") == {"a.txt": b"another source, not an aside folder"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books", "books.old"]


def test_replace_folder_moves_a_finished_folder_into_place(tmp_path):
    dest = make_folder(tmp_path / "cache" / "gpt-1", {"old.txt": "old"})
    with temporary_folder_beside(dest) as tmp:
        downloaded = make_folder(tmp / "checkpoint", {"manifest.json": "{}"})
        replace_folder(downloaded, dest)
        assert tmp.exists()  # only the download inside it was moved
    assert tree(dest) == {"manifest.json": b"{}"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["gpt-1"]


def test_temporary_folder_beside_is_removed_with_its_contents(tmp_path):
    dest = tmp_path / "parent" / "target"
    with temporary_folder_beside(dest) as tmp:
        assert tmp.parent == dest.parent and TEMP_NAME.match(tmp.name)["name"] == "target"
        make_folder(tmp / "sub", {"f.txt": "x"})
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path, size):
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()


def test_sha256_file_of_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- layering


def test_io_is_a_base_module_without_heavy_imports():
    code = (
        "import sys, llm.io; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llm', 'torch', 'numpy', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['llm', 'llm.io']"
