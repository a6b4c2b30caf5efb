"""The pipeline's Prefect server: one ``prefect server start`` on 127.0.0.1, started by the first stage that needs
it and reused by every later one.

Every flow run is recorded by a Prefect API. Without ``PREFECT_API_URL``, Prefect 3 starts a temporary server
subprocess for each process that runs a flow (5-10 s per ``dvc repro`` stage) and stops it from an ``atexit``
handler, which a SIGKILL of the stage never runs: each killed stage left a ~200 MB server behind. Prefect 3 has
no in-process API to use instead. So ``python -m flows <stage>`` (and ``flows.deployments``,
``flows.work_pool``) use one long-lived local server, as Prefect recommends for more than a single run:

- it is started in its own session, detached from the stage: Ctrl-C or a kill of ``dvc repro`` or ``make demo``
  leaves it alone, and it records its own pid before it does anything else, so it is known from its first
  instant (``python -m flows server status``) and never an unknown orphan;
- it listens on a free port of 127.0.0.1 and uses the database of ``PREFECT_HOME``, the one the temporary servers
  used, so the run history is where it always was;
- it runs until ``python -m flows server stop``.

Its files are in ``$PREFECT_HOME/pipeline-server/`` (outside the project, like the database, so every checkout and
``dvc exp run --temp`` workspace of the same user shares it): ``server.json`` (pid, process start time, port,
Prefect version), ``server.log`` (the server's output: none of it reaches the stage's output) and ``server.lock``
(held while a server starts, so two stages starting at once start one server). A ``server.json`` whose pid is gone
or belongs to another process (same pid, other start time) is stale and ignored. With ``PREFECT_API_URL`` set, in
the environment or the Prefect profile, nothing here starts anything.

    python -m flows server start     # start it (or find it running); prints its API URL
    python -m flows server status    # URL, pid, log; exit code 1 when it is not running
    python -m flows server stop      # stop it (SIGTERM, then SIGKILL after 30 s)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import psutil
import typer

from llm.io import atomic_write_json

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0  # a first start migrates the database; a busy machine is slow
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3  # another program may take the free port between our choice and the server's bind
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The pipeline's Prefect server could not be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServerRecord:
    """What ``server.json`` records about the running server."""

    pid: int
    create_time: float  # the process's start time: a reused pid has another one
    port: int
    prefect_version: str
    python: str

    @property
    def url(self) -> str:
        """The UI's address (when the UI is enabled)."""
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """The value for ``PREFECT_API_URL``."""
        return f"{self.url}/api"


def state_dir() -> Path:
    """``$PREFECT_HOME/pipeline-server``, where the server's record, log and lock live."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser() / "pipeline-server"


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, profile, ``prefect.toml``), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _read_record(folder: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads((folder / "server.json").read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # unreadable: whatever wrote it is not a server we can know
        return None


def _is_alive(record: ServerRecord) -> bool:
    """Whether ``record.pid`` is still the process that wrote the record (not a reused pid, not a zombie)."""
    try:
        process = psutil.Process(record.pid)
        return abs(process.create_time() - record.create_time) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def live_record(folder: Path | None = None) -> ServerRecord | None:
    """The record of the server when its process is running; a stale ``server.json`` is removed."""
    folder = folder or state_dir()
    record = _read_record(folder)
    if record is not None and _is_alive(record):
        return record
    (folder / "server.json").unlink(missing_ok=True)
    return None


def is_healthy(record: ServerRecord, timeout: float = 2.0) -> bool:
    """Whether the server's ``/api/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{record.api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def _locked(folder: Path, timeout: float) -> Iterator[int]:
    """Hold ``server.lock`` (an flock, released by the kernel if the holder dies); yields its descriptor."""
    import fcntl  # POSIX only: on Windows, pipeline_api_url() leaves Prefect to its temporary servers

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(f"{folder / 'server.lock'}: still held after {timeout:.0f} s by another "
                                      "process starting or stopping the pipeline's Prefect server") from None
                time.sleep(0.1)
        yield fd
    finally:
        os.close(fd)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _log_tail(folder: Path, chars: int = 3000, since: int = 0) -> str:
    """The end of ``server.log`` (from byte ``since`` on: what this start-up wrote)."""
    try:
        with (folder / "server.log").open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _wait_until_healthy(record: ServerRecord, folder: Path, deadline: float) -> None:
    while not is_healthy(record):
        if not _is_alive(record):
            raise ServerError(f"the pipeline's Prefect server (pid {record.pid}) exited during start-up; "
                              f"its log {folder / 'server.log'} ends with:\n{_log_tail(folder)}")
        if time.monotonic() > deadline:
            raise ServerError(f"the pipeline's Prefect server (pid {record.pid}) does not answer at "
                              f"{record.api_url}; see {folder / 'server.log'}, and stop it with "
                              "`python -m flows server stop`")
        time.sleep(0.2)


def _spawn(folder: Path, lock_fd: int, deadline: float) -> ServerRecord:
    """Start ``prefect server start`` in its own session; returns its record once it answers."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_PROJECT_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        with (folder / "server.log").open("ab") as log:
            log_start = log.tell()
            # The child inherits the lock and holds it until it has recorded itself: whatever happens to this
            # process from now on, no second server can start before this one is known.
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.prefect_server", "_run", "--port", str(port), "--lock-fd", str(lock_fd),
                 "--state-dir", str(folder)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lock_fd,),
                start_new_session=True)
        while (record := _read_record(folder)) is None or record.pid != process.pid:
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if record is None or record.pid != process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise ServerError(f"the pipeline's Prefect server did not start (exit code {process.returncode}); "
                              f"its log {folder / 'server.log'} ends with:\n{_log_tail(folder, since=log_start)}")
        while not is_healthy(record):
            if process.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"the pipeline's Prefect server (pid {record.pid}) did not answer at "
                                  f"{record.api_url} within {STARTUP_TIMEOUT_S:.0f} s; see "
                                  f"{folder / 'server.log'}, and stop it with `python -m flows server stop`")
            time.sleep(0.2)
        else:
            return record
        (folder / "server.json").unlink(missing_ok=True)
        if "already in use" not in _log_tail(folder, since=log_start) or attempt == _PORT_ATTEMPTS:
            raise ServerError(f"the pipeline's Prefect server exited with code {process.returncode} during "
                              f"start-up; its log {folder / 'server.log'} ends with:\n"
                              f"{_log_tail(folder, since=log_start)}")
    raise AssertionError("unreachable")


def ensure_server(timeout: float = STARTUP_TIMEOUT_S) -> tuple[ServerRecord, bool]:
    """The running pipeline server, started if there is none; returns its record and whether it was started now.

    Raises ServerError when it cannot start or does not answer in ``timeout`` seconds, or when the running one
    is another Prefect version than this environment's (the message says how to stop it).
    """
    folder = state_dir()
    deadline = time.monotonic() + timeout
    with _locked(folder, timeout) as lock_fd:
        record = live_record(folder)
        if record is None:
            return _spawn(folder, lock_fd, deadline), True
        if record.prefect_version != version("prefect"):
            raise ServerError(f"the pipeline's Prefect server at {record.api_url} (pid {record.pid}) runs Prefect "
                              f"{record.prefect_version} from {record.python}; this is Prefect {version('prefect')}. "
                              "Stop it with `python -m flows server stop` (the next stage starts a new one), or "
                              "set PREFECT_API_URL")
        _wait_until_healthy(record, folder, deadline)  # a stage killed while starting it may have left it starting
        return record, False


def stop_server(timeout: float = STOP_TIMEOUT_S) -> ServerRecord | None:
    """Stop the pipeline server (SIGTERM, then SIGKILL after ``timeout`` seconds); returns what was stopped, or
    None when none was running. A stale record is removed without signalling anything."""
    folder = state_dir()
    with _locked(folder, STARTUP_TIMEOUT_S):
        record = live_record(folder)
        if record is None:
            return None
        server = psutil.Process(record.pid)
        processes = [server, *server.children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, still_running = psutil.wait_procs(processes, timeout=timeout)
        for process in still_running:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(still_running, timeout=timeout)
        (folder / "server.json").unlink(missing_ok=True)
        return record


def pipeline_api_url() -> str | None:
    """None when ``PREFECT_API_URL`` is configured (then that server is used); else the pipeline server's API URL,
    starting the server if it is not running (one line on stderr says so).

    Raises ServerError as ``ensure_server`` does.
    """
    if configured_api_url() or sys.platform == "win32":  # Windows has no sessions or flock to run it safely
        return None
    record, started = ensure_server()
    if started:
        typer.echo(f"Started the pipeline's Prefect server at {record.url} (pid {record.pid}); it serves the next "
                   "stages too. `python -m flows server stop` stops it.", err=True)
    return record.api_url


@contextlib.contextmanager
def pipeline_api() -> Iterator[str | None]:
    """Within this context Prefect talks to ``pipeline_api_url()`` (unless PREFECT_API_URL is configured);
    yields that URL, or None."""
    api_url = pipeline_api_url()
    if api_url is None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield api_url


app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  help="The pipeline's shared local Prefect server (see flows/prefect_server.py).")


@app.command()
def start() -> None:
    """Start the server unless it is running; print its API URL (for PREFECT_API_URL) on stdout."""
    try:
        record, started = ensure_server()
    except ServerError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{'started' if started else 'running'}: {record.url} (pid {record.pid}, log "
               f"{state_dir() / 'server.log'})", err=True)
    typer.echo(record.api_url)


@app.command()
def status() -> None:
    """Say whether the server runs, where, and its pid and log; exit code 1 when it does not run."""
    record = live_record()
    if record is None:
        typer.echo("not running")
        raise typer.Exit(1)
    health = "answering" if is_healthy(record) else "not answering (starting, or stuck: see the log)"
    typer.echo(f"running: {record.url}, {health}\n  PREFECT_API_URL={record.api_url}\n  pid {record.pid}, "
               f"Prefect {record.prefect_version}\n  log {state_dir() / 'server.log'}")


@app.command()
def stop() -> None:
    """Stop the server."""
    try:
        record = stop_server()
    except ServerError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo("not running" if record is None else f"stopped the server at {record.url} (pid {record.pid})")


@app.command(name="_run", hidden=True)
def run_recorded(
    port: Annotated[int, typer.Option()],
    lock_fd: Annotated[int, typer.Option()],
    state_dir: Annotated[Path, typer.Option()],
) -> None:
    """Record this process as the server, release the lock, then become ``prefect server start`` (same pid)."""
    record = ServerRecord(pid=os.getpid(), create_time=psutil.Process().create_time(), port=port,
                          prefect_version=version("prefect"), python=sys.executable)
    atomic_write_json(state_dir / "server.json", asdict(record))
    os.close(lock_fd)
    os.chdir(state_dir)  # not the project: a `dvc exp run --temp` workspace that started it is deleted later
    # the UI's pages call the API at this address; left unset, Prefect points them at port 4200, not --port
    os.environ.setdefault("PREFECT_SERVER_UI_API_URL", f"http://{HOST}:{port}/api")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)])


if __name__ == "__main__":
    app(prog_name="python -m flows server")
