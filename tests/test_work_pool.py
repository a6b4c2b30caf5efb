"""Specification of the scale-out path: flows deployed to a process work pool (``python -m flows.work_pool``) run on a
``prefect worker``; a worker killed in the middle of pretraining (SIGKILL of the worker and its flow run, as a
machine crash would) leaves a flow run that Prefect marks CRASHED, and running the deployment again resumes from
the stage's checkpoint.

Everything is real and local: ``prefect server start`` on a free port of 127.0.0.1, ``prefect work-pool create``,
``prefect worker start --type process`` in a tiny project, ``prefect deployment run``. Every process is stopped
whatever happens.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_flows import make_tiny_project
from tests.test_prefect_server import BIN, deployment_run, prefect_env, prefect_server, started, wait_for_flow_run

pytestmark = pytest.mark.slow

POOL = "test-pool"
CRASH_AFTER_S = 60  # two heartbeats (Prefect sends one every 30 s at most)
# long enough to be killed in the middle, short enough to finish quickly when resumed
PRETRAIN = ("--param", 'overrides={"max_steps": 60, "checkpoint_interval": 10, "eval_interval": 1000}')


def run_ok(args: list[str], project: Path, env: dict) -> str:
    import subprocess

    proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint in ``folder``, or None while there is none (or it is being replaced)."""
    try:
        return json.loads((folder / "config.json").read_text())["step"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def kill_like_a_crash(worker: psutil.Process) -> None:
    """SIGKILL the worker and everything it started at once: nothing gets to report anything."""
    processes = [worker, *worker.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=30)


def test_a_worker_killed_in_pretraining_leaves_a_crashed_run_and_the_rerun_resumes_from_the_checkpoint(tmp_path):
    project = make_tiny_project(tmp_path / "project", with_code=True)
    home = tmp_path / "prefect-home"
    with prefect_server(home) as api_url:
        env = {**prefect_env(home, api_url), "PYTHONPATH": str(project)}
        run_ok([sys.executable, "-m", "flows", "prepare"], project, env)
        run_ok([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], project, env)
        deployed = run_ok([sys.executable, "-m", "flows.work_pool", "--pool", POOL,
                           "--crash-after", str(CRASH_AFTER_S)], project, env)
        assert f"pretrain/{POOL}" in deployed
        worker_args = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"]
        out = project / "artifacts" / "pretrain"

        with started(worker_args, project, env, tmp_path / "worker1.log") as worker:
            first = deployment_run(project, env, f"pretrain/{POOL}", *PRETRAIN)
            deadline = time.monotonic() + 300
            while (checkpoint_step(out) or 0) < 10:  # the first checkpoint: training is under way
                assert time.monotonic() < deadline, (tmp_path / "worker1.log").read_text()[-4000:]
                time.sleep(0.1)
            kill_like_a_crash(psutil.Process(worker.pid))
        last_checkpoint = checkpoint_step(out)
        assert last_checkpoint is not None and 10 <= last_checkpoint < 60

        crashed = wait_for_flow_run(api_url, first, tmp_path / "worker1.log", timeout=CRASH_AFTER_S + 180)
        assert crashed.is_crashed(), f"{crashed.name}: {crashed.message}"
        assert "no heartbeat" in crashed.message

        with started(worker_args, project, env, tmp_path / "worker2.log"):
            second = deployment_run(project, env, f"pretrain/{POOL}", *PRETRAIN)
            state = wait_for_flow_run(api_url, second, tmp_path / "worker2.log", timeout=300)
            assert state.is_completed(), f"{state.name}: {state.message}\n{(tmp_path / 'worker2.log').read_text()}"

        # the flow run's output, as the worker printed it (the API copy of the logs can lag behind the run's end)
        worker_log = (tmp_path / "worker2.log").read_text()
        resumed = re.search(r"resuming from \S+ at step (\d+)", worker_log)
        assert resumed, worker_log[-4000:]
        assert int(resumed.group(1)) == last_checkpoint  # its first step is the one after the last checkpoint
        assert json.loads((out / "metrics.json").read_text())["step"] == 60
