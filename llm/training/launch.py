"""Run a training stage under PyTorch's elastic launcher (``torch.distributed.run``) when ``launch`` asks for it.

A training stage (``llm.stages.pretrain_stage``, ``finetune_stage``) calls ``run_launched`` first. With one
process on one node, or inside a job the launcher already started, it returns None and the stage runs as it
is. Otherwise it writes the call (the stage function's module and name, its arguments as JSON) to a file and
runs, waiting for it::

    python -m llm.training.launch launcher --nproc-per-node N ... -m llm.training.launch worker CALL.json

``launcher`` is ``torch.distributed.run`` itself. Each ``worker`` validates the arguments back into their
types (pydantic) and calls the stage function, which now finds itself inside the job: every process trains,
rank 0 alone tracks, registers and writes outputs (``llm.mlops.stage_tracking.main_process``), and writes the function's
return value (or its error) beside the call file, which ``run_launched`` returns (or raises). So ``dvc repro``,
``python -m flows``, ``llm pipeline`` and a Prefect deployment run several processes the same way.

Stopping: SIGINT and SIGTERM sent to the stage's process are forwarded to the launcher, which passes SIGTERM
to its workers: they stop at the same step with a checkpoint, and ``run_launched`` raises TrainingInterrupted.
A worker that dies (``kill -9``) makes the launcher stop the others (``max_restarts: 0``) or restart them all
from the last checkpoint. On Linux the launcher dies with the stage's process and each worker with the
launcher (``PR_SET_PDEATHSIG``), so no process outlives the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from llm.config import LaunchParams

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


class LaunchError(RuntimeError):
    """The job that the launcher ran failed; the message says how (the workers' own output is above it)."""


def processes_per_node(launch: LaunchParams, device: str) -> int:
    """How many processes ``launch`` asks for on this node: its number, or with ``auto`` every visible GPU when
    ``device`` may be CUDA (``auto``, ``cuda``), else 1."""
    if launch.nproc_per_node != "auto":
        return launch.nproc_per_node
    if device not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def inside_launched_job() -> bool:
    """True in a process that ``torch.distributed.run`` started (it sets ``TORCHELASTIC_RUN_ID`` and ``LOCAL_RANK``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launcher_command(launch: LaunchParams, nproc: int, call_file: Path) -> list[str]:
    """The command that runs the call in ``call_file`` on ``nproc`` processes per node under the launcher:
    ``--standalone`` on one node (a free local port), else a c10d rendezvous at ``launch.rdzv_endpoint``."""
    if launch.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                      f"--rdzv-id={launch.rdzv_id}"]
    return [sys.executable, "-m", __name__, "launcher", f"--nproc-per-node={nproc}", *rendezvous,
            f"--max-restarts={launch.max_restarts}", "-m", __name__, "worker", str(call_file)]


def run_launched(function: Callable[..., Any], launch: LaunchParams, device: str,
                 arguments: Mapping[str, Any]) -> Any | None:
    """Run ``function(**arguments)`` on the processes that ``launch`` asks for and return what its rank 0
    returned; None, running nothing, when that is this one process (the caller then runs it itself).

    ``function`` must be importable by its module and name, its arguments JSON-able through pydantic (params
    models, paths, numbers). Raises TrainingInterrupted when a forwarded SIGINT/SIGTERM stopped the workers,
    the error of rank 0 (its type when it is one of ``llm``'s, else LaunchError) when it failed, and LaunchError
    when the job failed otherwise (a worker killed, a rendezvous that timed out).
    """
    nproc = processes_per_node(launch, device)
    if inside_launched_job() or (nproc == 1 and launch.nnodes == 1):
        return None
    from pydantic_core import to_jsonable_python

    folder = Path(tempfile.mkdtemp(prefix="llm-launch-"))
    try:
        call = {"function": f"{function.__module__}:{function.__qualname__}",
                "arguments": to_jsonable_python(dict(arguments)), "result": str(folder / RESULT_FILE)}
        (folder / "call.json").write_text(json.dumps(call))
        log.info("running %s on %d process(es) per node, %d node(s), under torch.distributed.run",
                 call["function"], nproc, launch.nnodes)
        returncode, signum = _wait_forwarding_signals(launcher_command(launch, nproc, folder / "call.json"))
        record = _read_record(folder / RESULT_FILE)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if returncode == 0:
        if "result" not in record:
            log.info("rank 0 of this job runs on another node: it tracks, registers and writes the outputs")
        return record.get("result", {})
    raise _job_error(record, returncode, signum, nproc * launch.nnodes)


def _wait_forwarding_signals(command: list[str]) -> tuple[int, int | None]:
    """Run ``command`` in a session of its own, passing on SIGINT and SIGTERM (main thread only); returns its exit
    code and the last signal passed on (None if none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "LLM_LAUNCH_PARENT": str(os.getpid())}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        process.send_signal(signum)

    with _handlers(forward):
        while True:
            try:
                return process.wait(), (forwarded[-1] if forwarded else None)
            except KeyboardInterrupt:  # a handler set outside Python: pass it on and keep waiting
                forward(signal.SIGINT, None)


@contextlib.contextmanager
def _handlers(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` while open (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _job_error(record: Mapping[str, Any], returncode: int, signum: int | None, processes: int) -> BaseException:
    """The exception that stands for a failed job: what rank 0 recorded, else a LaunchError saying what is known."""
    from llm.training.loop import TrainingInterrupted

    if "interrupted" in record:
        stop = record["interrupted"]
        checkpoint = Path(stop["checkpoint"]) if stop["checkpoint"] else None
        return TrainingInterrupted(stop["signum"], stop["step"], checkpoint)
    error = record.get("error")
    if error and error["type"].split(".")[0] == "llm" and (rebuilt := _rebuilt_error(error)) is not None:
        return rebuilt
    cause = f" after {signal.Signals(signum).name}" if signum else ""
    seen = f"; rank 0 saw {error['type']}: {error['message'].splitlines()[0][:300]}" if error else ""
    return LaunchError(f"the {processes}-process training job (torch.distributed.run) failed{cause} with exit code "
                       f"{returncode}: a worker failed or was stopped (its error, if it had time to print one, is "
                       f"above){seen}. Once the cause is gone, the stage resumes from the last checkpoint")


def _rebuilt_error(error: Mapping[str, str]) -> BaseException | None:
    """The error of rank 0 as its own type (one of ``llm``'s, built from its message), or None."""
    module, _, name = error["type"].rpartition(".")
    with contextlib.suppress(Exception):
        rebuilt = getattr(importlib.import_module(module), name)(error["message"])
        if isinstance(rebuilt, Exception):
            return rebuilt
    return None


def _die_with_parent(signum: int, parent_variable: str) -> None:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux; elsewhere nothing), and send it
    now if the parent, whose pid the environment variable ``parent_variable`` holds, is already gone."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError, ValueError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != int(os.environ[parent_variable]):  # reparented before the call
            os.kill(os.getpid(), signum)


def _worker(call_file: Path) -> int:
    """One process of the job: run the call; rank 0 records its result or error. Returns the exit code."""
    from pydantic import validate_call

    from llm.training.loop import TrainingInterrupted

    call = json.loads(call_file.read_text())
    module, _, name = call["function"].partition(":")
    function = validate_call(getattr(importlib.import_module(module), name))
    record: dict[str, Any]
    try:
        record = {"result": function(**call["arguments"])}
        code = 0
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        record = {"interrupted": {"signum": stop.signum, "step": stop.step,
                                  "checkpoint": str(stop.checkpoint) if stop.checkpoint else None}}
        code = stop.exit_code
    except Exception as err:
        record = {"error": {"type": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)}}
        _write_record(call["result"], record)
        raise
    _write_record(call["result"], record)
    return code


def _write_record(path: str, record: Mapping[str, Any]) -> None:
    if os.environ.get("RANK", "0") == "0":
        from pydantic_core import to_jsonable_python

        Path(path).write_text(json.dumps(to_jsonable_python(record)))


def main(argv: list[str]) -> int:
    """``launcher ARGS...``: torch.distributed.run with ARGS (dies with the stage's process); ``worker CALL``: one
    process of the job. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    role, rest = argv[0], argv[1:]
    if role == "worker":
        _die_with_parent(signal.SIGKILL, "LLM_LAUNCHER")
        return _worker(Path(rest[0]))
    _die_with_parent(signal.SIGTERM, "LLM_LAUNCH_PARENT")  # its SIGTERM handler stops the workers
    os.environ["LLM_LAUNCHER"] = str(os.getpid())  # the workers' parent
    from torch.distributed.run import main as torchrun

    torchrun(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
