"""Specification of the served deployments: with ``prefect server start`` and ``python -m flows.deployments``
running, ``prefect deployment run <flow>/<flow> --param ...`` runs that stage with the given overrides.

Everything is real and local: a Prefect server on a free port of 127.0.0.1 (its database under a temporary
PREFECT_HOME), the serve process in a tiny project, and the ``prefect`` CLI of the virtualenv. Both
processes are stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_flows import make_tiny_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """This environment without any PREFECT_/MLFLOW_ settings, pointed at ``home`` (and ``api_url``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                "LLM_TRACKING": "0"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def started(args: list[str], cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A background process (its own process group, output to ``log``), stopped on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@contextmanager
def prefect_server(home: Path, timeout: float = 120) -> Iterator[str]:
    """``prefect server start`` on a free local port; yields its API URL once /api/health answers."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with started(args, home, prefect_env(home), log) as proc:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield api_url


def wait_for_deployments(api_url: str, names: list[str], serve: subprocess.Popen, log: Path, timeout: float = 90):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            found = {f"{d.name}" for d in client.read_deployments()}
            if set(names) <= found:
                return
            if serve.poll() is not None:
                raise RuntimeError(f"flows.deployments exited with {serve.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployments {names} not served after {timeout}s (found {found})")
            time.sleep(1)


def wait_for_flow_run(api_url: str, flow_run_id: str, log: Path, timeout: float = 150):
    """The final state of a flow run, polled through the Python client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {state and state.name} after {timeout}s:\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(1)


def deployment_run(project: Path, env: dict, name: str, *options: str) -> str:
    """``prefect deployment run NAME OPTIONS...``; returns the id of the flow run it created."""
    proc = subprocess.run([str(BIN / "prefect"), "deployment", "run", name, *options], check=False, cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def test_deployment_runs_prepare_then_pretrain_with_overrides(tmp_path):
    project = make_tiny_project(tmp_path / "project", with_code=True)
    with prefect_server(tmp_path / "prefect-home") as api_url:
        env = prefect_env(tmp_path / "prefect-home", api_url)
        serve_log = tmp_path / "serve.log"
        with started([sys.executable, "-m", "flows.deployments"], project, env, serve_log) as serve:
            wait_for_deployments(api_url, ["prepare", "pretrain", "evaluate", "pipeline"], serve, serve_log)

            prepared = deployment_run(project, env, "prepare/prepare")
            state = wait_for_flow_run(api_url, prepared, serve_log)
            assert state.is_completed(), f"{state.name}: {state.message}\n{serve_log.read_text()[-4000:]}"
            assert (project / "artifacts" / "tokens" / "train.bin").exists()

            trained = deployment_run(project, env, "pretrain/pretrain", "--param", 'overrides={"max_steps": 3}',
                                     "--param", 'model_overrides={"n_layer": 2}')
            state = wait_for_flow_run(api_url, trained, serve_log)
            assert state.is_completed(), f"{state.name}: {state.message}\n{serve_log.read_text()[-4000:]}"

            out = project / "artifacts" / "pretrain"
            assert (out / "model.safetensors").exists()
            assert json.loads((out / "metrics.json").read_text())["step"] == 3
            assert json.loads((out / "config.json").read_text())["model"]["n_layer"] == 2

            refused = deployment_run(project, env, "pretrain/pretrain", "--params",
                                     '{"overrides": {"max_stepz": 3}, "resume": false}')
            state = wait_for_flow_run(api_url, refused, serve_log)
            assert state.is_failed()
            assert "params/pretrain.yaml: max_stepz: unknown key" in state.message
