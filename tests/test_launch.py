"""Several processes from the pipeline itself (``launch`` in params/pretrain.yaml; llm/training/launch.py) and
sharded training (``strategy: fsdp``), on CPU with gloo.

The stage runs itself under ``torch.distributed.run``: 2 processes give the weights of 1 process accumulating
twice as many micro-batches (every process draws the same micro-batches and keeps its block), under ``dvc
repro`` as from the CLI; ``kill -9`` of one rank ends the job with nothing left running, and the next run
resumes; FSDP2 checkpoints (torch.distributed.checkpoint) resume on 2 processes and on 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm.config import LaunchParams, ParamsError, PretrainParams, load_params, validate_params
from llm.training.distributed import Distributed, own_micro_batches
from llm.training.launch import _worker, launcher_command, processes_per_node, run_launched
from llm.training.loop import run_identity

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.0}
PRETRAIN = {"max_steps": 8, "batch_size": 4, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2,
            "checkpoint_interval": 4, "log_interval": 1, "device": "cpu", "progress": False, "seed": 3,
            "optimizer": "adamw", "num_threads": 1}
ENV = {**os.environ, "LLM_TRACKING": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_launch_params_name_the_bad_key():
    for bad, says in [({"nproc_per_node": 0}, "launch.nproc_per_node"), ({"nproc_per_node": True}, "nproc_per_node"),
                      ({"nproc_per_node": "all"}, "nproc_per_node"), ({"nnodes": 2}, "rdzv_endpoint")]:
        with pytest.raises(ParamsError, match=says):
            validate_params(PretrainParams, {"launch": bad}, "params/pretrain.yaml")
    assert load_params(PretrainParams, ROOT / "params" / "pretrain.yaml").launch.nproc_per_node == "auto"


def test_auto_is_one_process_without_a_gpu_and_one_process_launches_nothing():
    if torch.cuda.is_available():
        pytest.skip("counts GPUs here")
    assert processes_per_node(LaunchParams(), "auto") == 1
    assert processes_per_node(LaunchParams(nproc_per_node=3), "cpu") == 3
    assert run_launched(print, LaunchParams(), "auto", {}) is None  # the caller runs itself


def test_launcher_command_is_torchrun_standalone_or_a_rendezvous(tmp_path):
    one = launcher_command(LaunchParams(nproc_per_node=2), 2, tmp_path / "call.json")
    assert one[1:4] == ["-m", "llm.training.launch", "launcher"] and "--standalone" in one
    assert "--nproc-per-node=2" in one and one[-2:] == ["worker", str(tmp_path / "call.json")]
    nodes = launcher_command(LaunchParams(nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job"), 8, tmp_path / "c")
    assert "--standalone" not in nodes
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job"} <= set(nodes)


def test_a_step_sees_the_same_micro_batches_however_they_are_split_over_processes():
    def steps(world: int, accum: int) -> list[list[int]]:
        """The micro-batches (numbered in the order drawn) that 3 steps train on, over every process."""
        taken: list[list[int]] = [[], [], []]
        for rank in range(world):
            draws = iter(range(100))  # every process draws the same sequence
            for step in taken:
                step += own_micro_batches(draws, Distributed(rank=rank, world_size=world), accum)
        return [sorted(step) for step in taken]

    assert steps(2, 1) == steps(1, 2) == [[0, 1], [2, 3], [4, 5]]
    assert steps(2, 2) == steps(1, 4) == steps(4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert steps(1, 1) == [[0], [1], [2]]
    params = PretrainParams(grad_accum_steps=1)
    assert run_identity(params, MODEL_CONFIG(), {}, 2) == run_identity(
        params.model_copy(update={"grad_accum_steps": 2}), MODEL_CONFIG(), {}, 1)
    assert run_identity(params, MODEL_CONFIG(), {}, 2) != run_identity(params, MODEL_CONFIG(), {}, 1)


def MODEL_CONFIG():  # noqa: N802
    from llm.config import ModelConfig

    return ModelConfig(**MODEL)


def scaled(params: PretrainParams, factor: int, out: Path) -> dict:
    """A stand-in stage for the worker: its arguments come back typed."""
    if factor < 0:
        raise ParamsError(f"{out}: factor must not be negative")
    return {"steps": params.max_steps * factor, "out": out.name}


def test_a_worker_calls_the_function_with_typed_arguments_and_records_its_result_or_error(tmp_path):
    call = {"function": f"{__name__}:scaled", "result": str(tmp_path / "result.json"),
            "arguments": {"params": {"max_steps": 3}, "factor": 2, "out": str(tmp_path / "x")}}
    (tmp_path / "call.json").write_text(json.dumps(call))
    assert _worker(tmp_path / "call.json") == 0
    assert json.loads((tmp_path / "result.json").read_text()) == {"result": {"steps": 6, "out": "x"}}
    call["arguments"]["factor"] = -1
    (tmp_path / "call.json").write_text(json.dumps(call))
    with pytest.raises(ParamsError):
        _worker(tmp_path / "call.json")
    error = json.loads((tmp_path / "result.json").read_text())["error"]
    assert error == {"type": "llm.config.ParamsError", "message": f"{tmp_path / 'x'}: factor must not be negative"}


# --- several processes, for real (slow) ---

def write_params(folder: Path, name: str, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (folder / name).write_text(yaml.safe_dump({**PRETRAIN, **changes}))
    return folder / name


def pretrain_command(prepared: dict, params: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llm", "pretrain", "--tokens", str(prepared["tokens"]), "--tokenizer",
            str(prepared["tokenizer"]), "--out", str(out), "--params", str(params),
            "--model-params", str(params.parent / "model.yaml"), *extra]


def pretrain(prepared: dict, params: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(pretrain_command(prepared, params, out, *extra), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoints_resume_exactly_on_two_processes_and_on_one(prepared, tmp_path):
    one = pretrain(prepared, write_params(tmp_path / "p", "one.yaml", grad_accum_steps=2), tmp_path / "one")
    fsdp2 = write_params(tmp_path / "p", "fsdp2.yaml", strategy="fsdp", launch={"nproc_per_node": 2})
    fsdp1 = write_params(tmp_path / "p", "fsdp1.yaml", strategy="fsdp", grad_accum_steps=2)
    first = pretrain(prepared, fsdp2, tmp_path / "on2", "--until-step", "4")
    assert "under torch.distributed.run" in first.stderr
    assert (tmp_path / "on2" / "train_state" / "sharded" / ".metadata").is_file()
    assert len(list((tmp_path / "on2" / "train_state" / "sharded").glob("*.distcp"))) == 2  # one file per process
    subprocess.run(["cp", "-r", str(tmp_path / "on2"), str(tmp_path / "on1")], check=True)
    on2 = pretrain(prepared, fsdp2, tmp_path / "on2")
    on1 = pretrain(prepared, fsdp1, tmp_path / "on1")  # the 2-process checkpoint, resharded for 1 process
    for done in (on2, on1):
        assert "at step 4" in done.stderr and json.loads(done.stdout)["step"] == 8
    # one model.safetensors, gathered whole, as every other stage reads it: the single-process run's weights
    assert_same_weights(weights(tmp_path / "on2"), weights(tmp_path / "one"))
    assert_same_weights(weights(tmp_path / "on1"), weights(tmp_path / "one"))
    assert json.loads(on1.stdout)["train/loss"] == pytest.approx(json.loads(one.stdout)["train/loss"], abs=1e-6)


def descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def rank_process(stage_pid: int, rank: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in descendants(stage_pid):
            try:
                if child.environ().get("RANK") == str(rank) and "worker" in child.cmdline():
                    return child
            except Exception:  # noqa: BLE001 - it may exit or be unreadable meanwhile
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} after {timeout}s")


def start_stage_and_wait_for_a_checkpoint(prepared: dict, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    params = write_params(tmp_path / "p", "two.yaml", max_steps=100000, checkpoint_interval=20, eval_interval=100000,
                          launch={"nproc_per_node": 2})
    out, log = tmp_path / "out", tmp_path / "log.txt"
    with log.open("w") as f:
        stage = subprocess.Popen(pretrain_command(prepared, params, out), cwd=ROOT, env=ENV, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    rank_process(stage.pid, 1)
    deadline = time.monotonic() + 240
    while not (out / "config.json").exists():
        assert stage.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return stage, out, log


@pytest.mark.slow
def test_kill_9_of_one_rank_stops_the_job_leaves_no_process_and_the_rerun_resumes(prepared, tmp_path):
    import psutil

    stage, out, log = start_stage_and_wait_for_a_checkpoint(prepared, tmp_path)
    try:
        rank1 = rank_process(stage.pid, 1)
        job = descendants(stage.pid)
        rank1.kill()  # SIGKILL
        assert stage.wait(timeout=120) != 0
        gone, alive = psutil.wait_procs(job, timeout=60)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    assert "training job (torch.distributed.run) failed" in log.read_text()
    saved = json.loads((out / "config.json").read_text())["step"]
    rest = pretrain(prepared, tmp_path / "p" / "two.yaml", out, "--until-step", str(saved + 2))
    assert f"resuming from {out} at step {saved}" in rest.stderr
    assert json.loads(rest.stdout)["step"] == saved + 2


@pytest.mark.slow
def test_dvc_repro_on_two_processes_gives_the_weights_of_one_process_accumulating_twice(tmp_path):
    from llm.config import ModelConfig
    from llm.stages import pretrain_stage
    from tests.test_dvc_pipeline import init_repo, run
    from tests.test_flows import make_tiny_project
    from tests.test_prefect_server import prefect_env, prefect_server

    root = make_tiny_project(tmp_path / "project", with_code=True)
    home = tmp_path / "prefect-home"
    params_file = root / "params" / "pretrain.yaml"
    tiny = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump({**tiny, "launch": {"nproc_per_node": 2}}))
    with prefect_server(home) as api_url:
        env = {**{k: v for k, v in prefect_env(home, api_url).items() if not k.startswith("DVC_")},
               "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
        init_repo(root, env)
        output = run(root, env, "dvc", "repro", "pretrain")
    assert "under torch.distributed.run" in output
    artifacts = root / "artifacts"
    single = PretrainParams(**{**tiny, "grad_accum_steps": 2 * tiny.get("grad_accum_steps", 1)})
    model = ModelConfig(**yaml.safe_load((root / "params" / "model.yaml").read_text()))
    result = pretrain_stage(single, model, artifacts / "tokens", artifacts / "tokenizer", tmp_path / "one",
                            track=False)
    assert_same_weights(weights(artifacts / "pretrain"), weights(tmp_path / "one"))
    assert json.loads((artifacts / "pretrain" / "metrics.json").read_text())["step"] == result["step"]


@pytest.mark.slow
def test_sigterm_to_the_stage_stops_every_process_with_a_checkpoint_and_sigkill_leaves_no_process(prepared,
                                                                                                   tmp_path):
    import psutil

    stage, out, log = start_stage_and_wait_for_a_checkpoint(prepared, tmp_path / "term")
    try:
        stage.send_signal(signal.SIGTERM)  # forwarded to the launcher, which passes it to the workers
        assert stage.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    step = json.loads((out / "config.json").read_text())["step"]
    assert f"interrupted: SIGTERM stopped training at step {step}" in log.read_text()

    stage, out, log = start_stage_and_wait_for_a_checkpoint(prepared, tmp_path / "kill")
    job = descendants(stage.pid)
    stage.kill()  # the launcher dies with it (SIGTERM), and its workers with the launcher
    stage.wait()
    gone, alive = psutil.wait_procs(job, timeout=90)
    for process in alive:
        process.kill()
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
