"""Specification of interrupted runs: a signal, a second Ctrl-C, a SIGKILL of a `dvc repro` stage or a crash in the
middle of a write loses at most the steps since the last checkpoint, and the next run resumes to the very weights
an uninterrupted run gets.

The processes are real: `llm pretrain`, `python -m flows pretrain` and `dvc repro` run as subprocesses of the test
on a small model (large enough that a checkpoint write takes a moment to land a signal in). To place a signal
exactly (right after a checkpoint, inside a checkpoint write) whatever the load of the machine, the test freezes the
process with SIGSTOP, checks where it is, sends the signal and lets it go on with SIGCONT.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from llm.model.checkpoint import load_checkpoint, verify_checkpoint

from helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# ~1.6M parameters: a checkpoint (weights and Adam moments, synced) takes long enough to write that a poll sees
# its temporary folder, and a step stays a few tens of milliseconds on one thread
MODEL = {"context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 256}
PRETRAIN = {"max_steps": 40, "batch_size": 4, "warmup_steps": 4, "eval_interval": 20, "eval_batches": 2,
            "checkpoint_interval": 8, "log_interval": 4, "device": "cpu", "progress": False, "seed": 5,
            "num_threads": 1}


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path | None = None,
             timeout: float = 240, interval: float = 0.002) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            output = log.read_text()[-4000:] if log else ""
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(interval)


def temporaries_of(out: Path) -> list[Path]:
    """The temporary folders of checkpoint writes to ``out`` that exist now."""
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def signal_frozen(pid: int, signum: int, *, pgid: bool = False) -> None:
    """Send ``signum`` to a process (or a process group) held still by SIGSTOP, then let it continue."""
    kill = os.killpg if pgid else os.kill
    kill(pid, signal.SIGSTOP)
    try:
        kill(pid, signum)
    finally:
        if signum != signal.SIGKILL:
            kill(pid, signal.SIGCONT)


def default_sigint() -> None:
    """In the child: SIGINT handled as usual even when the tests run in a background job, which ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------- llm pretrain


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("params")
    (folder / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN))
    (folder / "model.yaml").write_text(yaml.safe_dump(MODEL))
    return folder


def start_llm_pretrain(prepared: dict, params_dir: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LLM_TRACKING": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "llm", "pretrain", "--tokens", str(prepared["tokens"]),
           "--tokenizer", str(prepared["tokenizer"]), "--out", str(out), "--params", str(params_dir / "pretrain.yaml"),
           "--model-params", str(params_dir / "model.yaml")]
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=default_sigint)


def llm_pretrain(prepared: dict, params_dir: Path, out: Path, log: Path) -> None:
    proc = start_llm_pretrain(prepared, params_dir, out, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def uninterrupted_weights(prepared, params_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    llm_pretrain(prepared, params_dir, out, out.parent / "log.txt")
    return (out / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_llm_pretrain_with_a_checkpoint_and_the_next_run_resumes_to_the_same_weights(
    prepared, params_dir, uninterrupted_weights, tmp_path, signum
):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start_llm_pretrain(prepared, params_dir, out, log)
    wait_for(lambda: (out / "config.json").exists(), "first checkpoint", proc, log)
    signal_frozen(proc.pid, signum)

    assert proc.wait(timeout=120) == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    [line] = [line for line in log.read_text().splitlines() if line.startswith("interrupted:")]
    step = int(re.search(r"stopped training at step (\d+)", line)[1])
    assert f"the checkpoint in {out} is at step {step}" in line and "again to resume" in line
    assert PRETRAIN["checkpoint_interval"] <= step < PRETRAIN["max_steps"]
    assert verify_checkpoint(out)["step"] == step

    llm_pretrain(prepared, params_dir, out, tmp_path / "resumed.txt")
    assert f"resuming from {out} at step {step}" in (tmp_path / "resumed.txt").read_text()
    assert (out / "model.safetensors").read_bytes() == uninterrupted_weights


@pytest.mark.slow
def test_a_second_sigint_during_the_checkpoint_write_exits_at_once_and_leaves_the_previous_checkpoint(
    prepared, params_dir, tmp_path
):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start_llm_pretrain(prepared, params_dir, out, log)
    wait_for(lambda: (out / "config.json").exists(), "first checkpoint", proc, log)
    previous = verify_checkpoint(out)["step"]
    signal_frozen(proc.pid, signal.SIGINT)  # the first: the run writes a checkpoint at the next step boundary

    wait_for(lambda: temporaries_of(out), "checkpoint write after the first SIGINT", proc, log)
    os.kill(proc.pid, signal.SIGSTOP)
    assert temporaries_of(out), "the write finished before the process could be stopped: make checkpoints larger"
    os.kill(proc.pid, signal.SIGINT)  # the second, in the middle of the write
    os.kill(proc.pid, signal.SIGCONT)

    assert proc.wait(timeout=120) == 130
    assert "interrupted:" not in log.read_text()  # not the orderly stop: the write was abandoned
    assert verify_checkpoint(out)["step"] == previous
    load_checkpoint(out)
    assert temporaries_of(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "run"]


# ---------------------------------------------------------------------------------------------- data/corpus


FETCH_KILLED_BETWEEN_THE_RENAMES = """
import os, sys
from pathlib import Path
import llm.io
from llm.data.corpus import fetch_corpus

real_replace = os.replace
def replace(src, dst):
    if llm.io._TEMP_NAME.match(Path(src).name):
        os._exit(9)  # the previous folder is aside, the new one not yet in place
    real_replace(src, dst)
os.replace = replace
fetch_corpus(sys.argv[1], Path(sys.argv[2]))
"""


def test_a_corpus_fetch_killed_between_its_renames_is_put_back_by_the_next_reader(tmp_path):
    from llm.data.corpus import fetch_corpus, iter_corpus_files

    plays = write_corpus(tmp_path / "plays", n_docs=2)
    corpus = tmp_path / "data" / "corpus"
    fetch_corpus(str(plays), corpus)
    before = {p.name: p.read_bytes() for p in iter_corpus_files(corpus)}
    (plays / "play_00.txt").write_text("a new edition")
    killed = subprocess.run([sys.executable, "-c", FETCH_KILLED_BETWEEN_THE_RENAMES, str(plays), str(corpus)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == 9 and not (corpus / "plays").exists()

    assert {p.name: p.read_bytes() for p in iter_corpus_files(corpus)} == before
    # left: the killed fetch's hidden temporary and lock file (both ignored by DVC; the next fetch removes them)
    assert sorted(p.name for p in corpus.iterdir() if not p.name.endswith((".tmp", ".lock"))) == ["plays"]
    fetch_corpus(str(plays), corpus)
    assert sorted(p.name for p in corpus.iterdir()) == ["plays"]


# ---------------------------------------------------------------------------------------------- flows and DVC


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> tuple[Path, str]:
    """One Prefect server for the module's flow runs (a stage would otherwise start a temporary one)."""
    from tests.test_prefect_server import prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as api_url:
        yield home, api_url


def project_env(prefect_api: tuple[Path, str]) -> dict[str, str]:
    from tests.test_prefect_server import prefect_env

    home, api_url = prefect_api
    env = {k: v for k, v in prefect_env(home, api_url).items() if not k.startswith("DVC_")}
    return {**env, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def make_project(root: Path) -> Path:
    """The tiny project of the flow tests, with this module's model and pretraining params."""
    from tests.test_flows import make_tiny_project

    make_tiny_project(root, with_code=True)
    (root / "params" / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (root / "params" / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN))
    return root


@pytest.mark.slow
def test_a_signal_stops_the_pretrain_flow_with_exit_code_143_and_one_line(prefect_api, prepared, tmp_path):
    project = make_project(tmp_path / "project")
    for name in ("tokens", "tokenizer"):
        shutil.copytree(prepared[name], project / "artifacts" / name)
    out, log = project / "artifacts" / "pretrain", tmp_path / "flow.txt"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "pretrain"], cwd=project, env=project_env(prefect_api),
                                stdout=f, stderr=subprocess.STDOUT, preexec_fn=default_sigint)
    try:
        wait_for(lambda: (out / "config.json").exists(), "first checkpoint", proc, log)
        signal_frozen(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [line] = [line for line in log.read_text().splitlines() if line.startswith("interrupted:")]
    step = verify_checkpoint(out)["step"]
    assert f"SIGTERM stopped training at step {step}: the checkpoint in artifacts/pretrain is at step {step}" in line
    assert "run `python -m flows pretrain` again (or `dvc repro`) to resume" in line


def run_ok(cwd: Path, env: dict, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout + proc.stderr


@contextmanager
def dvc_repro_in_its_own_group(project: Path, env: dict, log: Path):
    """``dvc repro pretrain`` as the leader of a new process group: the stage's processes are in that group."""
    with log.open("w") as f:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro", "pretrain"], cwd=project, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def checkpoint_step_on_disk(out: Path) -> int:
    """The step of the checkpoint in ``out``, or of the one a kill between two renames left aside."""
    folder = out if out.is_dir() else out.with_name(f"{out.name}.old")
    return json.loads((folder / "config.json").read_text())["step"]


def saved_step(out: Path) -> int:
    """The step of the checkpoint in ``out`` now, 0 while there is none (or it is being swapped)."""
    try:
        return json.loads((out / "config.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def alive_in_group(pgid: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group of ``dvc repro`` (dvc, the stage's shell, python -m flows), reap it and
    check that nothing of it is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while alive_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_in_group(proc.pid) == []


@pytest.mark.slow
def test_dvc_repro_killed_three_times_resumes_to_the_weights_of_an_uninterrupted_repro(prefect_api, tmp_path):
    project, env = make_project(tmp_path / "project"), project_env(prefect_api)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "tiny project"]):
        run_ok(project, env, *args)
    out = project / "artifacts" / "pretrain"
    run_ok(project, env, "dvc", "repro", "pretrain")
    uninterrupted = (out / "model.safetensors").read_bytes()
    assert verify_checkpoint(out)["step"] == PRETRAIN["max_steps"]
    seconds_per_step = json.loads((out / "metrics.json").read_text())["wall_time_s"] / PRETRAIN["max_steps"]
    shutil.rmtree(out)  # the same project again, from the same data: pretraining has to run once more

    rng = random.Random()
    kills = []  # where each kill landed: (moment, step of the checkpoint left on disk)
    # 1: a random number of steps (0 to 6) after the first checkpoint
    log = tmp_path / "repro-1.txt"
    with dvc_repro_in_its_own_group(project, env, log) as proc:
        wait_for(lambda: (out / "config.json").exists(), "first checkpoint", proc, log)
        time.sleep(rng.uniform(0, 6) * seconds_per_step)
        kill_group(proc)
    kills.append(("after the first checkpoint", checkpoint_step_on_disk(out)))
    # 2: inside the checkpoint write that follows the first one of the resumed run
    log = tmp_path / "repro-2.txt"
    with dvc_repro_in_its_own_group(project, env, log) as proc:
        wait_for(lambda: saved_step(out) > kills[-1][1], "a checkpoint of the resumed run", proc, log)
        while True:
            wait_for(lambda: temporaries_of(out), "a checkpoint write", proc, log)
            os.killpg(proc.pid, signal.SIGSTOP)
            if temporaries_of(out):
                break  # frozen in the middle of the write
            os.killpg(proc.pid, signal.SIGCONT)
        kill_group(proc)
    assert temporaries_of(out) or (out.parent / "pretrain.old").is_dir()  # the write was cut short
    kills.append(("inside a checkpoint write", checkpoint_step_on_disk(out)))
    # 3: a random number of steps (0 to 6) after the first checkpoint of the resumed run
    log = tmp_path / "repro-3.txt"
    with dvc_repro_in_its_own_group(project, env, log) as proc:
        wait_for(lambda: saved_step(out) > kills[-1][1], "a checkpoint of the resumed run", proc, log)
        time.sleep(rng.uniform(0, 6) * seconds_per_step)
        kill_group(proc)
    kills.append(("after a checkpoint of the resumed run", checkpoint_step_on_disk(out)))
    steps = [step for _, step in kills]
    assert steps == sorted(set(steps)) and steps[0] >= PRETRAIN["checkpoint_interval"], kills  # three places
    assert steps[-1] < PRETRAIN["max_steps"], kills  # each kill interrupted the training

    final = run_ok(project, env, "dvc", "repro", "pretrain")
    assert f"resuming from artifacts/pretrain at step {kills[-1][1]}" in final, final[-4000:]
    assert (out / "model.safetensors").read_bytes() == uninterrupted, f"killed {kills}"
    assert verify_checkpoint(out)["step"] == PRETRAIN["max_steps"]
    assert "Data and pipelines are up to date" in run_ok(project, env, "dvc", "status", "pretrain")
    assert [p.name for p in out.parent.iterdir() if "pretrain" in p.name] == ["pretrain"]  # nothing half-written
