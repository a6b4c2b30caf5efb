"""Specification of "no orphans": killing a stage, ``dvc repro`` or the pipeline at any moment leaves no process
behind except the pipeline's one Prefect server, which ``python -m flows server status`` shows and
``python -m flows server stop`` stops.

Every process a test starts carries a marker in its environment, which its children inherit (also those that
leave its session, as the server does), so ``psutil`` finds everything it started. Each test runs in a tiny
project with its own PREFECT_HOME and no PREFECT_API_URL, as a user's ``dvc repro`` would; the server is stopped
at the end whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_dvc_pipeline import init_repo
from tests.test_flows import make_tiny_project
from tests.test_prefect_server import prefect_env

BIN = Path(sys.executable).parent
MARKER = "LLM_NO_ORPHANS_TEST"


def started_by(tag: str) -> list[psutil.Process]:
    """The live processes whose environment carries ``tag``: everything a test started, however detached."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout:.0f} s: {what}")
        time.sleep(0.1)
    return result


class Project:
    """A tiny project, its environment (with the marker) and the pipeline server's state folder."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.tag = root, uuid.uuid4().hex
        # dvc runs a stage's command with $SHELL -c; /bin/sh (dash) stays as the stage's parent, unlike bash
        self.env = {**prefect_env(home), MARKER: self.tag, "PYTHONPATH": str(root), "SHELL": "/bin/sh"}
        self.state = home / "pipeline-server"

    def launch(self, *args: str, log: str) -> subprocess.Popen:
        """Start a command in its own process group (as a shell starts a job), output to ``log``."""
        with (self.root / log).open("w") as out:
            return subprocess.Popen(list(args), cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run(self, *args: str) -> str:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        return proc.stdout + proc.stderr

    def server_pid(self) -> int | None:
        try:
            return json.loads((self.state / "server.json").read_text())["pid"]
        except FileNotFoundError:
            return None

    def survivors(self, grace: float = 60) -> list[psutil.Process]:
        """What remains of the test's processes, once everything but the recorded server had ``grace`` s to end."""
        def only_the_server_left() -> bool:
            return {p.pid for p in started_by(self.tag)} <= {self.server_pid()}

        try:
            wait_for(only_the_server_left, grace, "every process but the pipeline server has exited")
        except TimeoutError:
            pass
        return started_by(self.tag)

    def assert_only_the_documented_server_remains(self) -> None:
        left = self.survivors()
        recorded = self.server_pid()
        assert [p.pid for p in left if p.pid != recorded] == [], [p.cmdline() for p in left]
        if left:  # the server is the one `python -m flows server status` shows
            assert f"pid {recorded}," in self.run(sys.executable, "-m", "flows", "server", "status")

    def stop_server_and_assert_nothing_remains(self) -> None:
        self.run(sys.executable, "-m", "flows", "server", "stop")
        assert self.survivors(grace=30) == []
        assert self.server_pid() is None


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def project(tmp_path) -> Iterator[Project]:
    project = Project(make_tiny_project(tmp_path / "project", with_code=True), tmp_path / "prefect-home")
    try:
        yield project
    finally:
        for process in started_by(project.tag):  # whatever a failed test left, the server included
            with_children = [process, *process.children(recursive=True)]
            for p in with_children:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(with_children, timeout=30)


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_the_stage_launcher_is_the_process_above_the_shell_that_runs_the_command(shell):
    """dvc runs ``$SHELL -c 'python -m flows ...'``: dash waits for the command, bash execs it; either way the
    stage watches dvc (here: this test), not the shell, which outlives a killed dvc."""
    code = "from flows.__main__ import stage_launcher; print(stage_launcher().pid)"
    out = subprocess.run([shell, "-c", f"{sys.executable} -c '{code}'; true"], capture_output=True, text=True,
                         check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert int(out.stdout) == os.getpid()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before the server is spawned", "while the server starts"])
def test_a_stage_killed_while_it_starts_the_server_leaves_only_the_recorded_server(project, moment):
    stage = project.launch(sys.executable, "-m", "flows", "clean", log="stage.log")
    if moment == "before the server is spawned":
        wait_for(lambda: (project.state / "server.lock").exists(), 120, "the stage takes the server lock")
    else:
        wait_for(project.server_pid, 120, "the server has recorded itself")
    kill_group(stage)

    project.assert_only_the_documented_server_remains()
    left_by_the_kill = project.server_pid()
    # the next stage finds the server the killed one started (or starts one): never a second server
    project.run(sys.executable, "-m", "flows", "clean")
    assert (project.root / "artifacts" / "clean" / "train.txt").exists()
    if left_by_the_kill is not None:
        assert project.server_pid() == left_by_the_kill
    assert len(started_by(project.tag)) == 1
    project.stop_server_and_assert_nothing_remains()


@pytest.mark.slow
def test_stages_starting_at_once_start_one_server(project):
    starters = [project.launch(sys.executable, "-m", "flows", "server", "start", log=f"start{i}.log")
                for i in range(3)]
    for starter in starters:
        assert starter.wait(timeout=180) == 0, (project.root / "start0.log").read_text()
    urls = {(project.root / f"start{i}.log").read_text().split()[-1] for i in range(3)}
    assert len(urls) == 1 and urls.pop().startswith("http://127.0.0.1:")
    api_url = (project.root / "start0.log").read_text().split()[-1]
    with urllib.request.urlopen(api_url.removesuffix("/api") + "/ui-settings", timeout=30) as answer:
        assert json.load(answer)["api_url"] == api_url  # the UI's pages call this server, not port 4200
    assert [p.pid for p in started_by(project.tag)] == [project.server_pid()]
    project.stop_server_and_assert_nothing_remains()


@pytest.mark.slow
def test_killing_dvc_repro_or_its_pretrain_stage_during_training_leaves_only_the_server(project):
    """Four ways to stop it while it trains: Ctrl-C (SIGINT to the process group), SIGKILL of the whole process
    group (``kill -9 -PGID``), of the pretrain stage's process alone (the issue's ``kill -9``), and of dvc alone
    (its stage then stops itself)."""
    root = project.root
    # pretraining that only ends when it is killed, with a checkpoint every 2 steps to show it is under way
    params = root / "params" / "pretrain.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "max_steps": 1000000,
                                      "checkpoint_interval": 2, "eval_interval": 100000}))
    project.env = {**{k: v for k, v in project.env.items() if not k.startswith("DVC_")}, "DVC_NO_ANALYTICS": "1",
                   "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                   "GIT_COMMITTER_EMAIL": "t@example.com"}
    init_repo(root, project.env)
    checkpoint = root / "artifacts" / "pretrain" / "config.json"

    def pretrain_stage() -> psutil.Process | None:
        for process in started_by(project.tag):
            try:
                if process.cmdline()[-2:] == ["flows", "pretrain"]:
                    return process
            except psutil.NoSuchProcess:
                continue
        return None

    for way in ("ctrl-c", "process group", "pretrain stage", "dvc alone"):
        shutil.rmtree(checkpoint.parent, ignore_errors=True)  # so the next checkpoint is this run's
        repro = project.launch(str(BIN / "dvc"), "repro", "pretrain", log=f"repro-{way}.log")
        wait_for(checkpoint.exists, 300, f"pretraining under `dvc repro` has written a checkpoint ({way})")
        if way == "ctrl-c":
            os.killpg(repro.pid, signal.SIGINT)
            assert repro.wait(timeout=120) != 0
        elif way == "process group":
            kill_group(repro)
        elif way == "pretrain stage":
            stage = pretrain_stage()
            assert stage is not None
            stage.kill()
            assert repro.wait(timeout=120) != 0  # dvc saw its stage die and failed
        else:
            repro.kill()
            repro.wait()
        project.assert_only_the_documented_server_remains()

    output = (root / "repro-ctrl-c.log").read_text()
    assert output.count("Started the pipeline's Prefect server") == 1
    assert "Traceback" not in output  # the server's start-up writes to its own log, never into dvc's output
    assert "stopping this stage" in (root / "repro-dvc alone.log").read_text()
    project.stop_server_and_assert_nothing_remains()


@pytest.fixture
def prefect_home(tmp_path) -> Iterator[Path]:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect-home")},
                            restore_defaults={PREFECT_API_URL}):
        yield tmp_path / "prefect-home"


@pytest.mark.parametrize("points_at", ["a process that has exited", "another process with the same pid"])
def test_a_stale_server_record_is_ignored_and_its_pid_never_signalled(prefect_home, points_at):
    from flows.prefect_server import live_record, stop_server

    other = subprocess.Popen(["sleep", "60"])
    try:
        if points_at == "a process that has exited":
            other.kill()
            other.wait()
            create_time = time.time()
        else:  # the pid was reused: the process has another start time than the server that wrote the record
            create_time = psutil.Process(other.pid).create_time() - 100
        state = prefect_home / "pipeline-server"
        state.mkdir(parents=True)
        (state / "server.json").write_text(json.dumps({"pid": other.pid, "create_time": create_time, "port": 9,
                                                       "prefect_version": "3", "python": sys.executable}))
        assert live_record() is None
        assert not (state / "server.json").exists()
        (state / "server.json").write_text(json.dumps({"pid": other.pid, "create_time": create_time, "port": 9,
                                                       "prefect_version": "3", "python": sys.executable}))
        assert stop_server() is None
        assert other.poll() is None or points_at == "a process that has exited"  # still running
    finally:
        other.kill()
        other.wait()


def test_an_explicit_prefect_api_url_starts_no_server(prefect_home):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.prefect_server import pipeline_api

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), pipeline_api() as api_url:
        assert api_url is None
        assert get_current_settings().api.url == "http://127.0.0.1:9/api"
    assert not (prefect_home / "pipeline-server").exists()


def test_a_running_server_of_another_prefect_version_is_refused_with_what_to_do(prefect_home):
    from flows.prefect_server import ServerError, ensure_server

    this_process = psutil.Process()  # alive, as the server of the record would be
    state = prefect_home / "pipeline-server"
    state.mkdir(parents=True)
    (state / "server.json").write_text(json.dumps({"pid": this_process.pid, "create_time": this_process.create_time(),
                                                   "port": 9, "prefect_version": "2.0.0", "python": "/old/python"}))
    with pytest.raises(ServerError, match=r"runs Prefect 2\.0\.0 .* Stop it with `python -m flows server stop`"):
        ensure_server(timeout=5)
