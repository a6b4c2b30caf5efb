"""llm.io: atomic writes of files and folders, crash recovery of a folder swap, file hashing."""

import builtins
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
    FolderLocked,
    atomic_file,
    atomic_folder,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    folder_lock,
    give_default_mode,
    interrupted_swap,
    recover_interrupted_swap,
    recover_interrupted_swaps,
    remove_stale_temp_files,
    replace_folder,
    sha256_file,
    sha256_tree,
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


def test_a_ctrl_c_just_after_the_temp_file_is_made_removes_it(tmp_path, monkeypatch):
    # Python runs a signal's handler right after the call that made the file returns, before any block
    made = []

    def open_then_interrupted(file, *args, **kwargs):
        made.append(builtins.open(file, *args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.io.open", open_then_interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "tokens.bin", binary=True):
        pass
    made[0].close()
    assert len(made) == 1 and list(tmp_path.iterdir()) == []


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


@pytest.fixture
def disk_events(monkeypatch):
    """Every fsync (as the path synced) and rename (as ``("rename", src name, dest name)``), in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced files through /proc")
@pytest.mark.parametrize("write", [
    lambda path: atomic_write_text(path, "x"),
    lambda path: atomic_write_json(path, {}),
    lambda path: atomic_write_bytes(path, b"x"),
])
def test_every_file_write_syncs_the_bytes_before_the_rename_and_the_folder_after(tmp_path, disk_events, write):
    write(tmp_path / "out.json")
    [(_, synced_file), rename, (_, synced_folder)] = disk_events
    assert TEMP_NAME.match(synced_file.name)["name"] == "out.json" and synced_file.parent == tmp_path
    assert rename == ("rename", synced_file.name, "out.json")
    assert synced_folder == tmp_path


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced files through /proc")
def test_a_folder_swap_syncs_every_file_and_folder_of_the_new_tree_once_before_the_rename(tmp_path, disk_events):
    dest = make_folder(tmp_path / "run", {"old.txt": "old"})
    with atomic_folder(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")  # written directly, as safetensors does
        (tmp / "curve").mkdir()
        atomic_write_text(tmp / "curve" / "train.csv", "step\n")  # an atomic write inside the tree being built
        atomic_write_json(tmp / "config.json", {})
    built = tmp.name
    swaps = [event[1:] for event in disk_events if event[0] == "rename" and event[2] in ("run", "run.old")]
    assert swaps == [("run", "run.old"), (built, "run")]
    first_swap = disk_events.index(("rename", "run", "run.old"))
    before = [str(event[1].relative_to(tmp_path)) for event in disk_events[:first_swap] if event[0] == "fsync"]
    expected = [f"{built}/{rel}" for rel in ("weights.bin", "curve", "curve/train.csv", "config.json")] + [built]
    assert sorted(before) == sorted(expected)  # every file and folder of the new tree, once, and nothing else
    assert disk_events[-1] == ("fsync", tmp_path)  # after the last rename: the new name is durable
    assert tree(dest) == {"weights.bin": b"w", "curve/train.csv": b"step\n", "config.json": b"{}\n"}


def test_remove_stale_temp_files_removes_only_the_temp_files_of_that_file(tmp_path):
    names = ["train.txt", ".train.txt.0123456789ab.tmp", ".train.txt.fedcba987654.tmp", ".val.txt.0123456789ab.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(tmp_path / "train.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".val.txt.0123456789ab.tmp", "train.txt"]


def test_remove_stale_temp_files_removes_the_folders_of_killed_folder_writes(tmp_path):
    make_folder(tmp_path / ".run.0123456789ab.tmp", {"model.safetensors": "half", "sub/x": "y"})
    make_folder(tmp_path / "run", {"model.safetensors": "complete"})
    remove_stale_temp_files(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


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


CRASH_BETWEEN_THE_RENAMES = """
import os, sys
from pathlib import Path
import llm.io

real_replace = os.replace
def replace(src, dst):
    if llm.io._TEMP_NAME.match(Path(src).name):
        os._exit(9)  # killed after the old folder went aside, before the new one came in
    real_replace(src, dst)
os.replace = replace
with llm.io.atomic_folder(sys.argv[1], hidden_aside=sys.argv[2] == "hidden") as tmp:
    (tmp / "a.txt").write_text("new")
"""


def crash_between_the_renames(dest: Path, *, hidden_aside: bool = False) -> None:
    """Swap a new folder into ``dest`` in a process that dies between the two renames."""
    args = [sys.executable, "-c", CRASH_BETWEEN_THE_RENAMES, str(dest), "hidden" if hidden_aside else "visible"]
    assert subprocess.run(args, cwd=Path(__file__).resolve().parents[1]).returncode == 9


def test_a_crash_between_the_renames_leaves_the_old_folder_aside_for_the_next_writer(tmp_path):
    dest = make_folder(tmp_path / "run", {"a.txt": "previous"})
    crash_between_the_renames(dest)
    assert not dest.exists() and interrupted_swap(dest) == tmp_path / "run.old"

    assert recover_interrupted_swap(dest) is True

    assert tree(dest) == {"a.txt": b"previous"} and interrupted_swap(dest) is None
    # the killed writer's lock file stays (released by its death); the next writer removes it
    assert sorted(p.name for p in tmp_path.iterdir() if not TEMP_NAME.match(p.name)) == [".run.lock", "run"]
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir() if not TEMP_NAME.match(p.name)) == ["run"]


def test_the_next_swap_puts_the_old_folder_back_before_it_writes(tmp_path, monkeypatch):
    dest = make_folder(tmp_path / "run", {"a.txt": "previous"})
    crash_between_the_renames(dest)
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:  # a writer that then fails itself
        (tmp / "a.txt").write_text("newer")
        raise RuntimeError("the second writer failed too")
    assert tree(dest) == {"a.txt": b"previous"}
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("newest")
    assert tree(dest) == {"a.txt": b"newest"} and not (tmp_path / "run.old").exists()


def test_an_error_between_the_renames_puts_the_old_folder_back_at_once(tmp_path, monkeypatch):
    dest = make_folder(tmp_path / "run", {"model.txt": "previous"})
    real_replace = os.replace

    def interrupted(src, dst):
        if TEMP_NAME.match(Path(src).name):
            raise KeyboardInterrupt  # a second Ctrl-C between the renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("new")
    assert tree(dest) == {"model.txt": b"previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_interrupted_swap_only_reports_and_recovery_does_nothing_when_no_swap_was_interrupted(tmp_path):
    assert interrupted_swap(tmp_path / "never_written") is None
    assert recover_interrupted_swap(tmp_path / "never_written") is False
    assert list(tmp_path.iterdir()) == []
    dest = make_folder(tmp_path / "run", {"model.txt": "current"})
    make_folder(tmp_path / "run.old", {"model.txt": "stale"})
    assert interrupted_swap(dest) is None
    assert recover_interrupted_swap(dest) is False
    assert tree(dest) == {"model.txt": b"current"}


def test_a_stale_aside_folder_is_deleted_by_the_next_swap(tmp_path):
    make_folder(tmp_path / "run.old", {"model.txt": "from a crashed swap"})
    dest = make_folder(tmp_path / "run", {"model.txt": "current"})
    with atomic_folder(dest) as tmp:
        (tmp / "model.txt").write_text("new")
    assert tree(dest) == {"model.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_hidden_aside_keeps_the_old_folder_under_a_dot_name(tmp_path):
    make_folder(tmp_path / "books.old", {"a.txt": "another source, not an aside folder"})
    dest = make_folder(tmp_path / "books", {"a.txt": "previous"})
    crash_between_the_renames(dest, hidden_aside=True)
    assert tree(tmp_path / ".books.old") == {"a.txt": b"previous"}
    assert interrupted_swap(dest, hidden_aside=True) == tmp_path / ".books.old"

    with atomic_folder(dest, hidden_aside=True) as tmp:
        (tmp / "a.txt").write_text("new")

    assert tree(dest) == {"a.txt": b"new"}
    assert tree(tmp_path / "books.old") == {"a.txt": b"another source, not an aside folder"}
    assert sorted(p.name for p in tmp_path.iterdir() if not TEMP_NAME.match(p.name)) == ["books", "books.old"]


def test_recover_interrupted_swaps_puts_back_every_hidden_folder_of_a_parent(tmp_path):
    corpus = tmp_path / "corpus"
    crash_between_the_renames(make_folder(corpus / "plays", {"a.txt": "plays"}), hidden_aside=True)
    crash_between_the_renames(make_folder(corpus / "poems", {"a.txt": "poems"}), hidden_aside=True)
    make_folder(corpus / "letters", {"a.txt": "letters"})
    make_folder(corpus / "letters.old", {"a.txt": "a user's folder of that name"})

    assert recover_interrupted_swaps(corpus, hidden_aside=True) == [corpus / "plays", corpus / "poems"]

    left = {p.name for p in corpus.iterdir() if not TEMP_NAME.match(p.name) and not p.name.endswith(".lock")}
    assert left == {"letters", "letters.old", "plays", "poems"}  # (and the killed writers' lock files)
    assert tree(corpus / "plays") == {"a.txt": b"plays"} and tree(corpus / "poems") == {"a.txt": b"poems"}
    assert recover_interrupted_swaps(tmp_path / "missing", hidden_aside=True) == []


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


def test_a_ctrl_c_just_after_the_temporary_folder_is_made_removes_it(tmp_path, monkeypatch):
    # the flaky end of tests/test_interruptions.py: the second SIGINT landed right after this mkdir
    real_mkdir = os.mkdir

    def mkdir_then_interrupted(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        raise KeyboardInterrupt

    dest = tmp_path / "run"
    monkeypatch.setattr(os, "mkdir", mkdir_then_interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_folder(dest):
        pass
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path, size):
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()


def test_sha256_tree_hashes_every_visible_file_by_relative_path(tmp_path):
    folder = make_folder(tmp_path / "tokens", {"train.bin": "t", "sub/val.bin": "v", ".train.bin.0123456789ab.tmp": "x",
                                               ".hidden/file": "h"})
    assert sha256_tree(folder) == {"sub/val.bin": hashlib.sha256(b"v").hexdigest(),
                                   "train.bin": hashlib.sha256(b"t").hexdigest()}
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        sha256_tree(tmp_path / "missing")


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


def test_a_second_writer_of_a_folder_fails_at_once_naming_the_holder(tmp_path):
    from helpers import hold_folder_lock

    dest = tmp_path / "checkpoint"
    holder = hold_folder_lock(dest)
    try:
        with pytest.raises(FolderLocked, match=rf"^{re.escape(str(dest))}: another process \(pid {holder.pid}\)"):
            with atomic_folder(dest) as tmp:
                (tmp / "x").write_text("never")
        assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == [".checkpoint.lock"]
    finally:
        holder.kill()
        holder.wait()
    with atomic_folder(dest) as tmp:  # a killed holder's lock is gone with it
        (tmp / "x").write_text("written")
    with folder_lock(dest), folder_lock(dest), atomic_folder(dest) as tmp:  # re-entrant in one process
        (tmp / "x").write_text("again")
    assert (dest / "x").read_text() == "again" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_give_default_mode_is_the_mode_of_any_new_file(tmp_path):
    plain, weights = tmp_path / "plain.txt", tmp_path / "w.safetensors"
    plain.write_text("x")
    weights.write_text("y")
    weights.chmod(0o600)
    give_default_mode(weights)
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~current_umask()


def test_a_checkpoint_s_weights_get_the_mode_of_its_other_files(tmp_path):
    from helpers import write_checkpoint

    folder = write_checkpoint(tmp_path / "checkpoint")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~current_umask()}, modes
