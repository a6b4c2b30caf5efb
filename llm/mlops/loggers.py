"""Loggers beside MLflow: TensorBoard, Weights & Biases and csv files, sent the same metrics at the same steps.

The ``tracking`` setting of the training and evaluation params (``[mlflow]`` by default) names where a stage run
goes. MLflow stays in ``llm.mlops.tracking``; this module holds the others and the run handle that fans out to
them (``logged_run``), each under ``logs/`` in the project root (``DVC_ROOT`` under DVC, else the working
directory):

- ``tensorboard``: event files in ``logs/tensorboard/<run>/`` (``torch.utils.tensorboard``, which needs the
  ``tensorboard`` package): every metric a scalar at its step, the params as the run's session in the HParams tab
  and as a text table, the tags as a text table;
- ``wandb``: a W&B run under ``logs/wandb/``, offline unless W&B finds credentials (``WANDB_MODE`` wins when
  set; ``WANDB_PROJECT``, default ``llm``): the params as its config, the tags in its config under ``tags``, the
  stage as its job type; ``wandb sync`` uploads an offline run later;
- ``csv``: ``logs/csv/<run>/metrics.csv`` (rows ``step,key,value,timestamp``), ``params.json`` and ``tags.json``.

``<run>`` is the run's name (MLflow's when MLflow tracks too), with a number added when a new run would land in an
existing folder. A logger whose package is missing is an error before the run starts (``LoggerUnavailable``).

Nothing here stops or slows training, as with MLflow's sender: each logger has a daemon thread and a bounded queue
(``_QueuedLogger``) and the loop only appends to it. A logger that raises (disk full, W&B's service gone) is tried
again with backoff while its points wait in memory (past ``MAX_PENDING`` the oldest are dropped); its first failure
is one warning, and the points it never took are counted in one warning at the end. The end of a stage waits at
most ``CLOSE_TIMEOUT_S`` for them.

Resume: a training checkpoint records ``{"name": <run folder>, "wandb_id": ...}`` under ``CHECKPOINT_KEY`` in its
config.json. The attempt that resumes it writes into the same TensorBoard folder (``purge_step``: TensorBoard hides
what the killed attempt logged after the checkpoint), drops those rows from the csv file before appending, and
continues the same W&B run id (W&B itself ignores steps it already has).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol, get_args

from llm.config import LoggerName
from llm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

LOGGERS: tuple[str, ...] = get_args(LoggerName)  # mlflow, tensorboard, wandb, csv
CHECKPOINT_KEY = "loggers"  # in a training checkpoint's config.json: where its run's logs go, for a resume
MAX_PENDING = 200_000  # metric points a logger keeps in memory while it fails (as MLflow's sender)
MAX_BACKOFF_S = 5.0  # a failing logger is tried again at least this often
CLOSE_TIMEOUT_S = 60.0  # the end of a stage waits at most this long for the loggers' last points
FLUSH_S = 5.0  # what a logger buffers reaches its files at least this often
WANDB_PROJECT = "llm"  # as MLflow's experiment
# the package each logger imports, and what to install for it
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


class LoggerUnavailable(RuntimeError):
    """A logger named in ``tracking`` needs a package that is not installed."""


class Logger(Protocol):
    """What a backend does with a run's params, tags and metrics; called from one thread (its sender's)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, walltime: float) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str) -> None: ...


def logs_root() -> Path:
    """``logs/`` in the project root: ``DVC_ROOT`` when DVC runs the stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve() / "logs"


def check_available(loggers: Sequence[str], setting: str = "tracking") -> None:
    """Raise LoggerUnavailable naming ``setting`` and the pip command when a chosen logger's package is missing,
    and ValueError for a name that is no logger."""
    for name in loggers:
        if name not in LOGGERS:
            raise ValueError(f"{setting}: unknown logger {name!r} (choose from {', '.join(LOGGERS)})")
        module, command = PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise LoggerUnavailable(f"{setting} names {name}, which needs the {module} package: {command} (in the "
                                    f"checkout: pip install -e '.[loggers]'), or remove {name} from {setting}")


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested params as one level of dotted names (``model.n_layer``); lists as JSON, None and others as text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, ensure_ascii=False, default=str)
        else:
            out[name] = str(value)
    return out


def _markdown_table(values: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {str(value).replace('|', '/')} |" for key, value in sorted(values.items()))
    return "| name | value |\n| --- | --- |\n" + rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------- backends


class TensorBoardLogger:
    """A run's event files in ``folder``; ``purge_step`` (a resumed run) hides the steps from it on that an earlier
    attempt logged."""

    def __init__(self, folder: Path, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=int(FLUSH_S))
        self._tags: dict[str, str] = {}
        self._hparams: dict[str, Any] = {}
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._hparams.update(flat_params(params))
        _, session_start, _ = hparams(self._hparams, {})  # the HParams tab computes its table from the runs' sessions
        self._writer.file_writer.add_summary(session_start)
        self._writer.add_text("params", _markdown_table(self._hparams))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        first = not self._tags
        self._tags.update(tags)
        if first:  # the lineage when the run starts; every tag again when it ends
            self._writer.add_text("tags", _markdown_table(self._tags))

    def log_metrics(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step, walltime=walltime)
        self._last_step = max(self._last_step, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._writer.add_text("tags", _markdown_table({**self._tags, "status": status}), global_step=self._last_step)
        if status == "FINISHED" and self._hparams:
            self._writer.file_writer.add_summary(hparams(self._hparams, {})[2])  # the session ended well
        self._writer.close()


class WandbLogger:
    """A W&B run of id ``run_id`` (continued when it exists), its files under ``root/wandb/``."""

    def __init__(self, root: Path, *, name: str, run_id: str, stage: str):
        import wandb

        # WANDB_MODE read now, not when W&B first set up in this process; its older names mapped to the current ones
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(verify=False, prompt=False) else "offline")
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(root_dir=str(root.parent), console="off", silent=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, dir=str(root), name=name,
                              id=run_id, resume="allow", job_type=stage, mode=mode, settings=settings)
        self._first_step = self.run.step  # online, a continued run starts after the steps the server has
        log.info("W&B run %s (%s) in %s%s", run_id, name, self.run.dir,
                 f": upload it with `wandb sync {Path(self.run.dir).parent}`" if self.run.offline else "")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.run.config.update({"tags": dict(tags)}, allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        if step >= self._first_step:
            self.run.log(dict(metrics), step=step)

    def flush(self) -> None:
        pass  # W&B's own service process writes and uploads

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class CsvLogger:
    """``metrics.csv`` (``step,key,value,timestamp``), ``params.json`` and ``tags.json`` in ``folder``; with
    ``keep_through`` (a resumed run), rows of later steps that an earlier attempt wrote are dropped first."""

    HEADER = ("step", "key", "value", "timestamp")

    def __init__(self, folder: Path, *, keep_through: int | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.csv"
        if keep_through is not None and path.exists():
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_through]
            atomic_write_text(path, _csv_text(self.HEADER, rows))
        fresh = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(self.HEADER)
        self._params: dict[str, Any] = {}
        self._tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update(params)
        atomic_write_json(self.folder / "params.json", self._params, sort_keys=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tags.update(tags)
        atomic_write_json(self.folder / "tags.json", self._tags, sort_keys=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, walltime: float) -> None:
        self._writer.writerows((step, key, repr(value), f"{walltime:.3f}") for key, value in metrics.items())

    def flush(self) -> None:
        self._file.flush()

    def close(self, status: str) -> None:
        self.set_tags({"status": status})
        self._file.close()


def _csv_text(header: Sequence[str], rows: list[dict[str, str]]) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(header), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- the sender

Op = tuple[str, Any, int, float]  # (what: params | tags | metrics, payload, step, walltime)


class _QueuedLogger:
    """Feeds one logger from a daemon thread: the training thread only appends to a bounded queue (``put``).

    The logger is made (``open_logger``) by the thread on its first delivery, so a slow start (W&B's service)
    never holds up the stage either. A delivery that raises goes back to the front of the queue and is tried again
    after a backoff (at most ``MAX_BACKOFF_S``); past ``max_pending`` waiting metric points the oldest are dropped
    and counted (``overflowed``). ``close`` delivers the rest within its timeout and closes the logger.
    """

    def __init__(self, kind: str, open_logger: Callable[[], Logger], run_name: str, *,
                 max_pending: int = MAX_PENDING):
        self.kind, self.run_name, self.max_pending = kind, run_name, max_pending
        self._open = open_logger
        self._logger: Logger | None = None
        self._ops: deque[Op] = deque()
        self._cond = threading.Condition()
        self._waiting = 0  # metric points in the queue
        self._closing = self._abandoned = False
        self._status = "FINISHED"
        self.overflowed = 0
        self.failing_since: float | None = None
        self._flushed_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"llm-{kind}-logger", daemon=True)
        self._thread.start()

    def put(self, what: str, payload: Any, step: int = 0) -> None:
        with self._cond:
            self._ops.append((what, payload, step, time.time()))
            self._waiting += len(payload) if what == "metrics" else 0
            self._drop_oldest_beyond_bound()
            self._cond.notify()

    def request_close(self, status: str) -> None:
        with self._cond:
            self._closing, self._status = True, status
            self._cond.notify()

    def join(self, timeout: float) -> int:
        """Wait at most ``timeout`` s for the thread to deliver and close; returns the metric points it never
        delivered (given up: the thread ends after its current try)."""
        self._thread.join(timeout)
        with self._cond:
            undelivered = self._waiting
            self._ops.clear()
            self._waiting, self._abandoned = 0, True
            self._cond.notify()
        return undelivered

    def _drop_oldest_beyond_bound(self) -> None:
        while self._waiting > self.max_pending:
            index = next(i for i, op in enumerate(self._ops) if op[0] == "metrics")
            dropped = self._ops[index]
            del self._ops[index]
            self._waiting -= len(dropped[1])
            self.overflowed += len(dropped[1])

    def _next(self, backoff: float) -> Op | None:
        """The next op to deliver, waiting for one; None when the thread should stop (closed, or given up)."""
        with self._cond:
            if backoff:
                self._cond.wait_for(lambda: self._abandoned, timeout=backoff)
            else:
                self._cond.wait_for(lambda: self._abandoned or self._ops or self._closing, timeout=FLUSH_S)
            if self._abandoned or (self._closing and not self._ops):
                return None
            return self._ops.popleft() if self._ops else ("flush", None, 0, 0.0)

    def _run(self) -> None:
        backoff = 0.0
        while (op := self._next(backoff)) is not None:
            try:
                self._deliver(op)
            except Exception as err:
                with self._cond:
                    if op[0] != "flush":  # back to the front, in order
                        self._ops.appendleft(op)
                backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                self._note_failure(err)
                continue
            with self._cond:
                self._waiting -= len(op[1]) if op[0] == "metrics" else 0
            backoff = 0.0
            self._note_success()
        if not self._abandoned and self._logger is not None:
            try:
                self._logger.close(self._status)
            except Exception as err:
                log.warning("%s logger of run %s did not close (%s): its last points may be missing", self.kind,
                            self.run_name, _first_line(err))

    def _deliver(self, op: Op) -> None:
        if self._logger is None:
            self._logger = self._open()
        what, payload, step, walltime = op
        if what == "flush" or time.monotonic() - self._flushed_at > FLUSH_S:
            self._logger.flush()
            self._flushed_at = time.monotonic()
        if what == "metrics":
            self._logger.log_metrics(payload, step, walltime)
        elif what == "params":
            self._logger.log_params(payload)
        elif what == "tags":
            self._logger.set_tags(payload)

    def _note_failure(self, err: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("%s logger failed (%s): training goes on; metrics of run %s wait in memory (%d now, at most "
                        "%d) and are sent when it works again", self.kind, _first_line(err), self.run_name,
                        self._waiting, self.max_pending)

    def _note_success(self) -> None:
        if self.failing_since is not None:
            log.warning("%s logger works again after %.0f s; sending the %d waiting metric points", self.kind,
                        time.monotonic() - self.failing_since, self._waiting)
            self.failing_since = None


# ---------------------------------------------------------------------------------------------- the run


class LoggedRun:
    """The run handle of a stage that logs beyond MLflow: the MLflow run (``llm.mlops.tracking.StageRun``, or the
    stages' do-nothing stand-in) with every metric, param and tag also queued for each chosen logger. Everything
    else (artifacts, ``run_id``, ``enabled``) is the MLflow run's. ``logger_state`` is what a training checkpoint
    records (under ``CHECKPOINT_KEY``) for a resume to write into the same runs."""

    def __init__(self, inner: Any, loggers: list[_QueuedLogger], logger_state: dict[str, Any]):
        self._inner = inner
        self._loggers = loggers
        self.logger_state = logger_state

    @property
    def checkpoint_metadata(self) -> dict[str, Any]:
        """What a training checkpoint records for a resume to write into the same runs (``TrainingRun.start``)."""
        return {CHECKPOINT_KEY: self.logger_state}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _put(self, what: str, payload: Mapping[str, Any], step: int = 0) -> None:
        for queued in self._loggers:
            queued.put(what, payload, step)

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        """Training callback ``(step, metrics)``: to MLflow as before, and to each logger at the same step."""
        self._inner.callback(step, metrics)
        self._put("metrics", _numbers(metrics), step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._inner.log_metrics(metrics, step)
        self._put("metrics", _numbers(metrics), int(step or 0))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._inner.log_params(params)
        self._put("params", dict(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._inner.set_tags(tags)
        self._put("tags", {str(k): str(v) for k, v in tags.items()})


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are numbers, as floats (text is not a metric, as for MLflow)."""
    return {str(k): float(v) for k, v in metrics.items()
            if not isinstance(v, (str, bytes)) and hasattr(v, "__float__")}


def _folder_name(name: str) -> str:
    """``name`` as one folder name on any system: path separators and characters Windows refuses replaced."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", name).strip(" .") or "run"


def _new_run_folder(root: Path, name: str, kinds: Sequence[str]) -> str:
    """``name``, or ``name (2)``, ``(3)``...: the first whose folder is free for every chosen file logger."""
    base, number = _folder_name(name), 1
    candidate = base
    while any((root / kind / candidate).exists() for kind in kinds if kind in ("tensorboard", "csv")):
        number += 1
        candidate = f"{base} ({number})"
    return candidate


def _opener(kind: str, root: Path, state: Mapping[str, Any], stage: str, resume_step: int | None
            ) -> Callable[[], Logger]:
    folder = root / kind / state["name"]
    if kind == "tensorboard":
        return lambda: TensorBoardLogger(folder, purge_step=None if resume_step is None else resume_step + 1)
    if kind == "csv":
        return lambda: CsvLogger(folder, keep_through=resume_step)
    return lambda: WandbLogger(root, name=state["name"], run_id=state["wandb_id"], stage=stage)


def _lineage(stage: str, params: Mapping[str, Any]) -> dict[str, str]:
    """The lineage tags MLflow's run gets (``llm.mlops.tracking.lineage_tags``), or the stage alone without MLflow."""
    try:
        from llm.mlops.tracking import lineage_tags
    except ImportError:
        return {"stage": stage}
    return lineage_tags(stage, params)


@contextmanager
def logged_run(inner: AbstractContextManager, loggers: Sequence[str], stage: str, params: Mapping[str, Any], *,
               run_name: str, resumed: Mapping[str, Any] | None = None) -> Iterator[LoggedRun]:
    """Enter ``inner`` (the MLflow run of the stage, or a stand-in) and yield a ``LoggedRun`` that also sends to
    ``loggers`` (``tensorboard``, ``wandb``, ``csv``), after they get ``params``, the lineage tags and the run
    name. ``resumed`` (what a checkpoint recorded under ``CHECKPOINT_KEY``, plus its ``step``) continues those
    runs. On the way out each logger gets what is waiting within ``CLOSE_TIMEOUT_S`` and the run's status
    (FINISHED, FAILED, or KILLED on KeyboardInterrupt), with one warning for the points it never took.

    Raises LoggerUnavailable before ``inner`` starts when a logger's package is missing."""
    check_available(loggers)
    root, resumed = logs_root(), dict(resumed or {})
    with inner as run:
        name = resumed.get("name") or _new_run_folder(root, run.run_name or run_name, loggers)
        state = {"name": name}
        if "wandb" in loggers:
            state["wandb_id"] = resumed.get("wandb_id") or run.run_id or uuid.uuid4().hex
        resume_step = resumed.get("step") if resumed.get("name") else None
        queued = [_QueuedLogger(kind, _opener(kind, root, state, stage, resume_step), name) for kind in loggers]
        handle = LoggedRun(run, queued, state)
        handle._put("params", dict(params))
        handle._put("tags", {**_lineage(stage, params), "llm.run_name": run.run_name or run_name,
                             **({"mlflow.run_id": run.run_id} if run.run_id else {})})
        status = "FINISHED"
        try:
            yield handle
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            handle._put("tags", {"error": f"{type(err).__name__}: {err}"[:5000]})
            raise
        finally:
            _close_all(queued, status)


def _close_all(queued: list[_QueuedLogger], status: str, timeout: float | None = None) -> None:
    """Close every logger within ``timeout`` s in all (``CLOSE_TIMEOUT_S``), warning once per logger that lost
    points."""
    for logger in queued:
        logger.request_close(status)
    deadline = time.monotonic() + (CLOSE_TIMEOUT_S if timeout is None else timeout)
    for logger in queued:
        undelivered = logger.join(max(0.0, deadline - time.monotonic()))
        parts = []
        if logger.overflowed:
            parts.append(f"{logger.overflowed} oldest ones dropped while more than {logger.max_pending} waited")
        if undelivered:
            parts.append(f"{undelivered} still undelivered when the stage ended")
        if parts:
            log.warning("%d metric points of run %s never reached the %s logger: %s", logger.overflowed + undelivered,
                        logger.run_name, logger.kind, "; ".join(parts))


# ---------------------------------------------------------------------------------------------- the tracker


class LoggingTracker:
    """The stages' ``Tracker`` (``llm.mlops.stage_tracking``) for a ``tracking`` setting with loggers beside MLflow:
    ``inner`` (MLflow's tracker, or the untracked one without ``mlflow``) does the runs, registration and
    promotion, and every run it opens also sends to ``loggers`` (``logged_run``). A training run's loggers open
    when the loop starts it: a resumed checkpoint's ``CHECKPOINT_KEY`` continues their runs, and the runs they
    write go into the checkpoints (``TrainingRun.start``). Raises LoggerUnavailable for a missing package."""

    def __init__(self, inner: Any, loggers: Sequence[str]):
        check_available(loggers)
        self.inner, self.loggers = inner, list(loggers)
        self.enabled = inner.enabled

    def run(self, stage: str, params: Mapping[str, Any], *, run_name: str | None = None) -> AbstractContextManager:
        return logged_run(self.inner.run(stage, params, run_name=run_name), self.loggers, stage, params,
                          run_name=run_name or stage)

    @contextmanager
    def training_run(self, stage: str, logged: Mapping[str, Any], **options: Any) -> Iterator[Any]:
        from llm.mlops.stage_tracking import TrainingRun

        with self.inner.training_run(stage, logged, **options) as inner, ExitStack() as stack:
            def open_run(resumed: Mapping[str, Any] | None) -> LoggedRun:
                inner.start(resumed)  # the inner tracker's run (MLflow's, or none), then the loggers around it
                saved = (resumed or {}).get(CHECKPOINT_KEY)
                state = {**saved, "step": (resumed or {}).get("step")} if isinstance(saved, dict) else None
                return stack.enter_context(logged_run(nullcontext(inner.run), self.loggers, stage, logged,
                                                      run_name=inner.run.run_name or stage, resumed=state))

            yield TrainingRun(stage, logged, open_run)

    def __getattr__(self, name: str) -> Any:
        """``finish_training``, ``promote``, ``log_on_training_run``, ``attach_export``: the inner tracker's (the
        runs they are handed already send to the loggers)."""
        return getattr(self.inner, name)
