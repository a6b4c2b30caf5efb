"""MLflow tracking for the pipeline stages: one run per stage with params, lineage tags and metrics.

Where runs go:

- the tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project root>/mlflow.db``. The
  project root is ``DVC_ROOT`` when DVC runs the stage (``dvc repro`` sets it to the repository; ``dvc exp
  run --temp`` and ``--queue`` run in a temporary copy under ``.dvc/tmp/exps/`` and set it to the real
  repository, so experiments land in the same database as ``dvc repro``), else the current working
  directory (where the ``llm`` CLI runs); the registry URI is ``MLFLOW_REGISTRY_URI`` when set, else the
  tracking URI;
- the experiment is ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME`` when set, else ``llm``, tagged
  ``mlflow.experimentKind=custom_model_development`` (model training) so that MLflow 3's UI opens it on its
  runs rather than on the GenAI overview (unless the tag is already there). When this module creates it in
  a SQLite database, its artifacts go in ``mlruns/<experiment name>/`` beside the database file: run
  artifacts in ``<run id>/artifacts/``, logged models (MLflow 3 keeps them apart from runs) in
  ``models/<model id>/artifacts/``. With a tracking server, the server decides.

``stage_run`` opens the run of a stage; the stages reach it through ``llm.mlops.stage_tracking.MlflowTracker``
(the ``Tracker`` interface). Metric keys are logged exactly as given (``train/loss``, ``val/bpb``, ...) so runs
line up in the MLflow UI. This module imports MLflow at the top: only code that tracks imports it, never the
model or the training loop.

``StageRun`` is where a stage's metrics (``callback``, ``log_metrics``: ``StageRun._add``), params
(``log_params``) and tags (``set_tags``) enter; metrics and tags go on to one background sender per run.

Tracking never stops training. Metrics and tags go to the store from a background thread
(``_MetricSender``): the training loop only appends to a bounded in-memory queue. While the store is
unreachable the points wait there and are delivered when it answers again; past ``MAX_PENDING`` points the
oldest are dropped, reported in one warning at the end of the stage and in the run tag
``llm.metrics_dropped``. The end of a stage waits at most ``CLOSE_TIMEOUT_S`` for the last points.

Runs that a killed process left RUNNING are recognised when the same stage starts again: each run records
``llm.host``, ``llm.pid`` (and the process start time) at start and ``llm.heartbeat`` (epoch seconds) every
``HEARTBEAT_S`` while it lives. A RUNNING run of the same stage is stale when it was started on this host by
a process that no longer exists, or, started elsewhere, when its last heartbeat is older than
``STALE_AFTER_S``; it is marked KILLED with the reason in the tag ``llm.killed_reason``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "llm"
DB_FILE = "mlflow.db"
LINEAGE_KEYS = ("git.commit", "git.dirty", "dvc.data_hash", "dvc.data_source", "params.hash", "stage")

HOST_TAG, PID_TAG, PID_STARTED_TAG = "llm.host", "llm.pid", "llm.pid_started"
HEARTBEAT_TAG = "llm.heartbeat"  # epoch seconds, refreshed by the sender while the stage lives
KILLED_REASON_TAG = "llm.killed_reason"
DROPPED_TAG = "llm.metrics_dropped"
LOGGED_THROUGH_TAG = "llm.logged_through_step"  # highest step delivered; a resumed run skips replayed steps
ATTEMPT_TAG = "llm.attempt"  # 1 for a new run, +1 each time it is resumed
# MLflow 3's UI opens an experiment on the view this tag names; without it, on the GenAI overview (traces)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

HEARTBEAT_S = 60.0
STALE_AFTER_S = 30 * 60.0  # a run from another host without a heartbeat for this long is stale
CLOSE_TIMEOUT_S = 60.0  # the end of a stage waits at most this long for undelivered metrics
SEND_TIMEOUT_S = 10.0  # one delivery attempt of the sender
MAX_BACKOFF_S = 5.0  # while the store is unreachable, the sender tries again at least this often
MAX_PENDING = 200_000  # metric points kept in memory while the store is unreachable (about 20 MB)
# one bounded try of MLflow's own HTTP client (its default retries for about four minutes); the timeout stays
# MLflow's: an upload of large weights may take long before the server answers
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def project_root() -> Path:
    """Where the default tracking database lives: ``DVC_ROOT`` under DVC (the real repository, also for
    ``dvc exp run --temp``/``--queue``), else the current working directory."""
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root).resolve() if dvc_root else Path.cwd().resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite database ``mlflow.db`` in ``project_root()``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DB_FILE}"


def registry_uri() -> str:
    """``MLFLOW_REGISTRY_URI`` if set, else the tracking URI."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other kind of store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


MLFLOW_DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default": where `mlflow run` puts its run without --experiment-name
PROJECT_RUN_TAG = "llm.mlflow_project_run"  # the `mlflow run` run of a stage run that is not its child


def _project_run_experiment(client: MlflowClient) -> str | None:
    """The experiment of the run that ``mlflow run`` created (``MLFLOW_RUN_ID``), unless that is MLflow's
    Default experiment, which only means that no experiment was named: the stages keep to ``llm`` then."""
    handed_over = os.environ.get("MLFLOW_RUN_ID")
    if not handed_over:
        return None
    try:
        experiment_id = client.get_run(handed_over).info.experiment_id
    except MlflowException:
        return None
    if experiment_id == MLFLOW_DEFAULT_EXPERIMENT_ID and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return None
    return experiment_id


def _ensure_experiment(client: MlflowClient) -> str:
    """Id of the experiment named by ``experiment_name()``, created (or restored) if needed."""
    handed_over = _project_run_experiment(client)  # `mlflow run --experiment-name X`: the stages go to X too
    if handed_over is not None:
        return handed_over
    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_path(client.tracking_uri)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
        location = (db.resolve().parent / "mlruns" / folder).as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version, or by hand: a kind the user set stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


@contextmanager
def _environment_kept(*names: str) -> Iterator[None]:
    """Undo what the block writes to these environment variables.

    MLflow 3's ``set_tracking_uri``, ``set_registry_uri`` and ``set_experiment`` also export
    ``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI`` and ``MLFLOW_EXPERIMENT_ID``. Left there, the first
    database a process used would shadow the working-directory default (and ``MLFLOW_REGISTRY_URI`` would
    pin the registry to it) for every later call, so only MLflow's in-process globals are set here.
    """
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def set_uris() -> None:
    """Point MLflow's global tracking and registry URIs at ``tracking_uri()`` and ``registry_uri()``."""
    with _environment_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_registry_uri(registry_uri())


@contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Within the block, each MLflow HTTP request gives up after a few seconds instead of minutes.

    MLflow's client retries a failed request 7 times with doubling waits (about four minutes) before it
    raises. Callers that retry on their own (registration) or must end in bounded time (the end of a stage
    during an outage) use this. Process-wide while it lasts, as MLflow reads the ``MLFLOW_HTTP_REQUEST_*``
    variables per request; a value the user set is kept.
    """
    with _environment_kept(*BOUNDED_HTTP):
        for name, value in BOUNDED_HTTP.items():
            os.environ.setdefault(name, value)
        yield


def store_unavailable(err: BaseException) -> bool:
    """True for errors that say the tracking store did not answer (connection refused, timeout, 5xx, 429,
    a locked SQLite database): worth trying again later, unlike a refused request."""
    try:
        import requests

        if isinstance(err, requests.RequestException):
            return True
    except ImportError:
        pass
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        text = str(err)
        # MLflow's HTTP client words every failure to reach the server, or a non-JSON error page, this way
        return (text.startswith("API request to") or "database is locked" in text
                or err.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"))
    return False


def retry_unavailable(fn: Callable[[], Any], *, what: str, attempts: int, first_delay_s: float) -> Any:
    """``fn()``, tried up to ``attempts`` times while the store is unavailable (``store_unavailable``),
    waiting ``first_delay_s``, then twice as long each time; each try gives up fast
    (``bounded_http_retries``). Returns what ``fn`` returns; raises its last error."""
    delay, attempts = first_delay_s, max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            with bounded_http_retries():
                return fn()
        except Exception as err:
            if attempt == attempts or not store_unavailable(err):
                raise
            log.warning("%s: tracking store unavailable (%s); try %d of %d in %.0f s", what,
                        _first_line(err), attempt + 1, attempts, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _configure() -> tuple[MlflowClient, str]:
    set_uris()
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=registry_uri())
    experiment_id = _ensure_experiment(client)
    with _environment_kept("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(experiment_id=experiment_id)
    return client, experiment_id


def configure_mlflow() -> None:
    """Point MLflow's global state at ``tracking_uri()``/``registry_uri()`` and the stage experiment."""
    _configure()


# ---------------------------------------------------------------------------------------------- lineage


def _plain(value: Any) -> Any:
    """JSON-ready copy of params: pydantic models dumped, paths and other objects as strings."""
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def params_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (sorted keys, no spaces)."""
    canonical = json.dumps(_plain(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _data_hash(root: Path) -> tuple[str, str]:
    """(hash, where it came from) of the raw data: DVC's md5 from ``data.dvc``, else a sha256 of ``data/``."""
    dvc_file = root / "data.dvc"
    if dvc_file.is_file():
        import yaml

        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            hashes = [str(o["md5"]) for o in outs if isinstance(o, dict) and o.get("md5")]
        except (OSError, yaml.YAMLError, AttributeError):
            hashes = []
        if len(hashes) == 1:
            return hashes[0], "data.dvc"
        if hashes:
            return hashlib.sha256(",".join(hashes).encode()).hexdigest(), "data.dvc"
    data = root / "data"
    if data.is_dir():
        # every file's relative path and content, in a fixed order; no DVC file to trust instead
        h = hashlib.sha256()
        for file in sorted(p for p in data.rglob("*") if p.is_file()):
            h.update(file.relative_to(data).as_posix().encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
        return h.hexdigest(), "data/"
    return "none", "none"


def lineage_tags(stage: str, params: Mapping[str, Any], *, root: str | Path | None = None) -> dict[str, str]:
    """Tags that say what a run or model came from.

    ``git.commit`` (``unknown`` outside a git repository) and ``git.dirty`` (tracked files modified),
    ``dvc.data_hash`` (the md5 DVC records in ``data.dvc``; else a sha256 over the files under ``data/``;
    else ``none``) with ``dvc.data_source`` saying which, ``params.hash`` (sha256 of the canonical JSON of
    ``params``) and ``stage``. ``root`` is the project root, by default the working directory.
    """
    root = Path(root) if root is not None else Path.cwd()
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    data_hash, data_source = _data_hash(root)
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "dvc.data_hash": data_hash,
        "dvc.data_source": data_source,
        "params.hash": params_hash(params),
        "stage": stage,
    }


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: ``{"model": {"n_layer": 2}}`` becomes ``{"model.n_layer": "2"}``.

    Lists are JSON-encoded, other values converted with ``str``, and every value is cut to MLflow's
    limit (``MAX_PARAM_VAL_LENGTH`` characters).
    """
    out: dict[str, str] = {}
    for key, value in _plain(d).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
        out[name] = _truncate(text, MAX_PARAM_VAL_LENGTH)
    return out


# ---------------------------------------------------------------------------------------------- runs


def _system_metrics_available() -> bool:
    """psutil is what MLflow samples CPU, memory and disk with; MLflow's own switch can turn it off."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("0", "false", "no")


Point = tuple[str, float, int, int]  # (key, value, timestamp in ms, step): lighter than Metric while queued


class _MetricSender:
    """Delivers one run's metric points and tags to the store from a daemon thread.

    The training loop only appends to a queue (``add``); the thread sends a batch when ``flush_every``
    points are waiting, ``flush_seconds`` after the last send, when nudged, and at ``close``. A failed send
    puts the batch back and is tried again after a backoff (at most ``MAX_BACKOFF_S``), so points wait out an
    outage and arrive in order when the store answers; past ``max_pending`` waiting points the oldest are
    dropped and counted. Against a tracking server each try is one HTTP request without MLflow's minutes of
    retries (its ``MLFLOW_HTTP_REQUEST_*`` settings are process-wide, so the sender passes its own).
    MLflow's ``synchronous=False`` logging is not used: it drops a batch that fails and never bounds its queue.
    """

    def __init__(self, run_id: str, client: MlflowClient, *, flush_every: int, flush_seconds: float,
                 max_pending: int, logged_through: int = 0):
        self.run_id = run_id
        self._client = client
        self.uri = client.tracking_uri
        self._flush_every, self._flush_seconds, self.max_pending = flush_every, flush_seconds, max_pending
        self._pending: deque[Point] = deque()
        self._tags: dict[str, str] = {}
        self._cond = threading.Condition()
        self._nudged = self._closing = self._abandoned = False
        self.overflowed = 0  # points dropped because the queue was full
        self.rejected = 0  # points the store refused (an invalid key or value)
        self.failing_since: float | None = None  # monotonic time of the first failed send of an outage
        self.logged_through = logged_through
        self._last_heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"llm-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by the training thread

    def add(self, points: list[Point]) -> None:
        with self._cond:
            self._pending.extend(points)
            self._drop_oldest_beyond_bound()
            if len(self._pending) >= self._flush_every:
                self._cond.notify()

    def add_tags(self, tags: Mapping[str, str]) -> None:
        with self._cond:
            self._tags.update(tags)
            self._nudge_locked()

    def nudge(self) -> None:
        with self._cond:
            self._nudge_locked()

    def _nudge_locked(self) -> None:
        self._nudged = True
        self._cond.notify()

    def close(self, timeout: float) -> int:
        """Deliver what is waiting, for at most ``timeout`` seconds; returns how many points were not
        delivered (they are given up, and the thread ends after its current try)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            undelivered = len(self._pending)
            self._pending.clear()
            self._abandoned = True
            self._cond.notify()
        return undelivered

    # ------------------------------------------------------------------ the sender thread

    def _drop_oldest_beyond_bound(self) -> None:
        excess = len(self._pending) - self.max_pending
        for _ in range(max(0, excess)):
            self._pending.popleft()
        self.overflowed += max(0, excess)

    def _wake(self) -> bool:
        if self._abandoned:
            return True
        if self.failing_since is not None:  # in backoff: only the timeout wakes it
            return False
        return self._nudged or self._closing or len(self._pending) >= self._flush_every

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(self._wake, timeout=backoff or self._flush_seconds)
                if self._abandoned or (self._closing and not self._pending and not self._tags):
                    return
                room = MAX_ENTITIES_PER_BATCH - MAX_PARAMS_TAGS_PER_BATCH
                points = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                tags = dict(list(self._tags.items())[:MAX_PARAMS_TAGS_PER_BATCH - 2])  # room for ours below
                self._tags = {k: v for k, v in self._tags.items() if k not in tags}
                self._nudged = False
                if time.monotonic() - self._last_heartbeat >= HEARTBEAT_S:
                    tags[HEARTBEAT_TAG] = str(int(time.time()))
            if not points and not tags:
                continue
            through = max([self.logged_through, *(p[3] for p in points)])
            if through > self.logged_through:
                tags[LOGGED_THROUGH_TAG] = str(through)
            try:
                self._send(points, tags)
            except Exception as err:
                if not store_unavailable(err):  # the store answered and refused it: sending again cannot help
                    self.rejected += len(points)
                    log.warning("tracking store %s refused %d metric points and tags %s of run %s: %s", self.uri,
                                len(points), sorted(tags), self.run_id, _first_line(err))
                    continue
                with self._cond:  # back to the front, in order; newer tag values set meanwhile win
                    self._pending.extendleft(reversed(points))
                    self._drop_oldest_beyond_bound()
                    self._tags = {**tags, **self._tags}
                backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                self._note_failure(err)
                continue
            backoff = 0.0
            self.logged_through = through
            if HEARTBEAT_TAG in tags:
                self._last_heartbeat = time.monotonic()
            self._note_success()

    def _note_failure(self, err: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("tracking store %s unreachable (%s): training goes on; metrics of run %s wait in memory "
                        "(%d now, at most %d) and are sent when it answers", self.uri, _first_line(err),
                        self.run_id, len(self._pending), self.max_pending)

    def _note_success(self) -> None:
        if self.failing_since is not None:
            log.warning("tracking store %s answers again after %.0f s; sending the %d waiting metric points",
                        self.uri, time.monotonic() - self.failing_since, len(self._pending))
            self.failing_since = None

    def _send(self, points: list[Point], tags: Mapping[str, str], timeout: float = SEND_TIMEOUT_S) -> None:
        metrics = [Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in points]
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        if not self.uri.startswith(("http://", "https://")):
            self._client.log_batch(self.run_id, metrics=metrics, tags=run_tags)
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"  # MLflow's REST API, as RestStore.log_batch posts it
        body = message_to_json(LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics],
                                        tags=[t.to_proto() for t in run_tags]))
        response = http_request(get_default_host_creds(self.uri), endpoint, "POST", max_retries=0,
                                timeout=timeout, json=json.loads(body))
        verify_rest_response(response, endpoint)

    def send_now(self, tags: Mapping[str, str]) -> bool:
        """One bounded try to set ``tags`` from the calling thread; False when the store did not take them."""
        try:
            self._send([], tags)
            return True
        except Exception as err:
            log.debug("could not set %s on run %s: %s", sorted(tags), self.run_id, _first_line(err))
            return False


class StageRun:
    """Handle on the MLflow run of one stage. With ``run_id`` None (tracking disabled) all methods do nothing.

    Metrics (``callback``, ``log_metrics``) and tags (``set_tags``) are queued and sent in batches by a
    background thread (``_MetricSender``): when ``flush_every`` points have piled up, when ``flush_seconds``
    have passed since the last send (so a slow run still shows progress), and at the end of the run. Calling
    ``callback`` on every training step is cheap and never waits on the network. Params and artifacts are
    sent at once. ``logged_through`` (a resumed run) skips callback steps up to it: the earlier attempt
    logged them and an exact resume replays them with the same values.
    """

    def __init__(
        self,
        run_id: str | None,
        client: MlflowClient | None = None,
        *,
        flush_every: int = 500,
        flush_seconds: float = 15.0,
        max_pending: int | None = None,
        logged_through: int = 0,
        run_name: str | None = None,
    ):
        self.run_id = run_id
        self.run_name = run_name
        self._client = client
        self._logged_through = logged_through
        self._sender = None
        if run_id is not None and client is not None:
            self._sender = _MetricSender(run_id, client, flush_every=flush_every, flush_seconds=flush_seconds,
                                         max_pending=MAX_PENDING if max_pending is None else max_pending,
                                         logged_through=logged_through)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _add(self, metrics: Mapping[str, Any], step: int | None) -> None:
        now = int(time.time() * 1000)
        points = [(str(key), float(value), now, int(step or 0)) for key, value in metrics.items()
                  if not isinstance(value, (str, bytes)) and hasattr(value, "__float__")]  # text is not a metric
        if points and self._sender is not None:
            self._sender.add(points)

    def flush(self) -> None:
        """Have the queued metrics and tags sent now, in the background (returns at once)."""
        if self._sender is not None:
            self._sender.nudge()

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        """Training callback ``(step, metrics)``: queues the step's metrics under their own keys."""
        if not self.enabled or step <= self._logged_through:
            return
        self._add(metrics, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step`` (0 when None): queued after any waiting ones and sent right away."""
        if not self.enabled:
            return
        self._add(metrics, step)
        self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params; a param already logged cannot change value in MLflow."""
        if not self.enabled:
            return
        flat = flatten_params(params)
        if flat:
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values cut to MLflow's limit); sent in the background like metrics."""
        if not self.enabled or not tags:
            return
        values = {str(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        if self._sender is not None:
            self._sender.add_tags(values)
        else:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts (under ``artifact_path``). Raises FileNotFoundError."""
        if not self.enabled:
            return
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file to log as an artifact")
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a folder's contents into the run's artifacts. Raises FileNotFoundError."""
        if not self.enabled:
            return
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory}: no such folder to log as artifacts")
        self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_loss_curve(self, history: list[dict[str, float]], path_name: str = "loss_curve.png") -> None:
        """Plot ``train/loss`` and ``val/loss`` against ``step`` and log the PNG as ``path_name``."""
        if not self.enabled:
            return
        figure = loss_curve_figure(history)
        if figure is None:
            log.info("no losses in the history: no loss curve to log")
            return
        self._client.log_figure(self.run_id, figure, path_name)

    def _close(self, timeout: float | None = None) -> bool:
        """Deliver the waiting metrics and tags within ``timeout`` seconds and stop the sender. Points that
        were dropped or not delivered are counted in one warning and in the tag ``llm.metrics_dropped``.
        Returns whether the store was reachable at the end."""
        sender = self._sender
        if sender is None:
            return True
        timeout = CLOSE_TIMEOUT_S if timeout is None else timeout
        undelivered = sender.close(timeout)
        reachable = sender.failing_since is None and undelivered == 0
        dropped = sender.overflowed + undelivered + sender.rejected
        if dropped:
            parts = []
            if sender.overflowed:
                parts.append(f"{sender.overflowed} oldest ones dropped while more than {sender.max_pending} "
                             "waited for the store")
            if undelivered:
                parts.append(f"{undelivered} still undelivered when the stage ended ({timeout:.0f} s limit)")
            if sender.rejected:
                parts.append(f"{sender.rejected} refused by the store")
            log.warning("%d metric points of run %s never reached the tracking store %s: %s", dropped,
                        self.run_id, sender.uri, "; ".join(parts))
            if reachable:
                sender.send_now({DROPPED_TAG: str(dropped)})
        return reachable


def log_final_metrics(run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    """Log ``metrics`` at ``step`` on the finished run ``run_id`` (evaluation adds its chat score to the
    training run of the model it scored, so that runs compare on it); warns instead of failing when that run is
    not in the store."""
    client, _ = _configure()
    now = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(err).lower():
            raise
        log.warning("run %s is not in the tracking store at %s: %s not logged on it", run_id, client.tracking_uri,
                    ", ".join(metrics))


def _process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no psutil, or no such process: the pid alone identifies it
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    """Whether process ``pid`` still runs (and is the one that started at ``started``, if known)."""
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _stale_reason(run, now: float) -> str | None:
    """Why a RUNNING run is stale (see the module docstring), or None when it may still be alive."""
    tags = run.data.tags
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    if host == socket.gethostname() and pid and pid.isdigit():
        if int(pid) == os.getpid():
            return None
        try:
            started = float(tags[PID_STARTED_TAG])
        except (KeyError, ValueError):
            started = None
        if _process_alive(int(pid), started):
            return None
        return f"its process {pid} on {host} is gone (killed, or the machine restarted)"
    heartbeat = tags.get(HEARTBEAT_TAG, "")
    last_alive = float(heartbeat) if heartbeat.isdigit() else run.info.start_time / 1000  # older runs: their start
    if now - last_alive > STALE_AFTER_S:
        where = f"process {pid} on {host}" if host else "an unknown process"
        return (f"no sign of life from {where} for {(now - last_alive) / 60:.0f} min "
                f"(more than {STALE_AFTER_S / 60:.0f})")
    return None


def _end_stale_runs(client: MlflowClient, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of ``stage`` left RUNNING by a process that is gone; returns their ids."""
    active = {r.info.run_id for r in [mlflow.active_run()] if r is not None}
    running = client.search_runs([experiment_id], max_results=1000,
                                 filter_string=f"attributes.status = 'RUNNING' and tags.stage = '{stage}'")
    now, ended = time.time(), []
    for run in running:
        reason = None if run.info.run_id in active else _stale_reason(run, now)
        if reason is None:
            continue
        heartbeat = run.data.tags.get(HEARTBEAT_TAG, "")
        last_alive_ms = int(heartbeat) * 1000 if heartbeat.isdigit() else None
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED", end_time=last_alive_ms)
        log.warning("run %s of stage %s was left RUNNING: %s; marked it KILLED", run.info.run_id, stage, reason)
        ended.append(run.info.run_id)
    return ended


def _resumable(client: MlflowClient, run_id: str | None) -> Any:
    """The run ``run_id`` when it exists in the store and is not deleted, else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            log.info("run %s is not in the tracking store at %s: starting a new run", run_id, client.tracking_uri)
            return None
        raise
    if run.info.lifecycle_stage == "deleted":
        log.info("run %s was deleted: starting a new run", run_id)
        return None
    return run


def loss_curve_figure(history: list[dict[str, float]]):
    """A matplotlib Figure of train and val loss against step, or None when the history has no loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def points(key: str) -> tuple[list[float], list[float]]:
        rows = [h for h in history if key in h and math.isfinite(float(h[key]))]
        return [float(h.get("step", i + 1)) for i, h in enumerate(rows)], [float(h[key]) for h in rows]

    series = {key: points(key) for key in ("train/loss", "val/loss")}
    if not any(xs for xs, _ in series.values()):
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)  # Agg renders the PNG; no pyplot, so no global backend or display is touched
    ax = figure.subplots()
    for key, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, label=key, marker="o" if key.startswith("val") else None, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure


def _process_tags() -> dict[str, str]:
    """Who runs the stage (host, pid, process start time) and a first heartbeat: what stale detection reads."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: str(int(time.time()))}
    started = _process_start_time(os.getpid())
    if started is not None:
        tags[PID_STARTED_TAG] = f"{started:.3f}"
    return tags


def _start_system_metrics(run_id: str, resumed: bool, uri: str):
    """MLflow's system metrics monitor (CPU, memory, disk; GPU with pynvml), started here rather than by
    ``mlflow.start_run`` so that the end of a stage can stop waiting for it (``_stop_system_metrics``)."""
    if not _system_metrics_available():
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # the stage runs without them
        log.warning("system metrics are not logged for run %s: %s", run_id, _first_line(err))
        return None


def _stop_system_metrics(monitor, timeout: float = 10.0) -> None:
    if monitor is None:
        return
    # its thread may sit in MLflow's minutes of HTTP retries during an outage: do not wait for that
    stopper = threading.Thread(target=monitor.finish, name="llm-system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)


def _end(run: StageRun, monitor, status: str) -> None:
    """Deliver the run's waiting metrics, stop its system metrics and mark it ``status``, all in bounded time.
    A store that does not answer leaves the run RUNNING there, with a warning (the next start of the stage
    marks it KILLED)."""
    reachable = run._close()
    _stop_system_metrics(monitor)
    try:
        if reachable:
            mlflow.end_run(status)
            return
        with bounded_http_retries():
            mlflow.end_run(status)
    except Exception as err:
        if not store_unavailable(err):
            raise
        try:  # end_run already left MLflow's stack of active runs; only the store is missing the status
            retry_unavailable(lambda: run._client.set_terminated(run.run_id, status), what=f"ending run {run.run_id}",
                              attempts=3, first_delay_s=2.0)
        except Exception as last:
            if not store_unavailable(last):
                raise
            log.warning("could not mark run %s %s in %s (%s): it stays RUNNING there", run.run_id, status,
                        run._client.tracking_uri, _first_line(last))


def _log_params(client: MlflowClient, run: StageRun, params: Mapping[str, Any], resumed) -> None:
    """Params of a new run; for a resumed run only the ones it lacks (MLflow params never change value)."""
    if resumed is None:
        run.log_params(params)
        return
    flat, before = flatten_params(params), resumed.data.params
    changed = sorted(k for k, v in flat.items() if k in before and before[k] != v)
    if changed:
        log.warning("run %s resumed with other values for %s; MLflow keeps the first ones", run.run_id,
                    ", ".join(changed))
    missing = [Param(k, v) for k, v in flat.items() if k not in before]
    for start in range(0, len(missing), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run.run_id, params=missing[start:start + MAX_PARAMS_TAGS_PER_BATCH])


def _project_run_parent(client: MlflowClient, handed_over: str | None, experiment_id: str,
                        tags: dict[str, str]) -> str | None:
    """The parent of a stage run under ``mlflow run`` (``handed_over``, its run): that run when it is in the
    stage's experiment; else None, and the tag ``PROJECT_RUN_TAG`` in ``tags`` links the two."""
    if handed_over is None:
        return None
    try:
        if client.get_run(handed_over).info.experiment_id == experiment_id:
            return handed_over
    except MlflowException:
        pass
    # `mlflow run` without --experiment-name: its run is in Default, the stage's in llm
    log.info("mlflow run's run %s is in another experiment: this stage's run goes to experiment %s (tag %s links "
             "them; `mlflow run --experiment-name %s` nests it)", handed_over, experiment_name(), PROJECT_RUN_TAG,
             experiment_name())
    tags[PROJECT_RUN_TAG] = handed_over
    return None


def _start_mlflow_run(client: MlflowClient, experiment_id: str, stage: str, params: Mapping[str, Any], resumed,
                      *, run_name: str | None, parent_run_id: str | None):
    """Reopen ``resumed`` (attempt counted up) or start a new run named ``run_name``, with the lineage, DVC and
    process tags; nested under ``parent_run_id``, the active run or ``mlflow run``'s run. Returns MLflow's run."""
    tags = lineage_tags(stage, params)
    if tags["git.commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["git.commit"]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    tags.update(_process_tags())
    # `mlflow run`'s run (MLFLOW_RUN_ID) is a parent or a link, never taken over (start_run would rename it)
    handed_over = os.environ.pop("MLFLOW_RUN_ID", None)
    parent = _project_run_parent(client, handed_over, experiment_id, tags)
    try:
        if resumed is not None:
            tags[ATTEMPT_TAG] = str(int(resumed.data.tags.get(ATTEMPT_TAG, "1")) + 1)
            return mlflow.start_run(run_id=resumed.info.run_id, nested=mlflow.active_run() is not None,
                                    tags=tags, log_system_metrics=False)
        tags[ATTEMPT_TAG] = "1"
        return mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name or stage,
            nested=mlflow.active_run() is not None or parent is not None,
            parent_run_id=parent_run_id or (parent if mlflow.active_run() is None else None),
            tags=tags,
            log_system_metrics=False,
        )
    finally:
        if handed_over is not None:
            os.environ["MLFLOW_RUN_ID"] = handed_over


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    enabled: bool = True,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Run the body of a pipeline stage inside an MLflow run and yield its ``StageRun``.

    The run gets ``params`` (flattened), ``lineage_tags`` plus MLflow's ``mlflow.source.git.commit``, the
    DVC experiment name (``dvc.experiment``) under ``dvc exp run``, the process tags that stale detection
    reads, and system metrics (CPU, memory, disk; GPU when pynvml is present) sampled by MLflow when psutil
    is installed. It is nested under ``parent_run_id``, or under the active run if there is one.

    A new run is named ``run_name`` (default: the stage). With ``resume_run_id`` naming a run that exists in
    the store (same experiment, not deleted), that run is reopened instead: same run id and name, its params
    kept (missing ones added), tag ``llm.attempt`` counted up, and the callback skips the steps the earlier
    attempt already delivered, so a resumed training run is one continuous curve at its real step numbers.
    Otherwise a new run starts.

    Before that, runs of ``stage`` left RUNNING by a process that is gone are marked KILLED (module
    docstring). The run ends FINISHED, or FAILED (KILLED on Ctrl-C/SIGTERM, i.e. a KeyboardInterrupt) if
    the body raises, with the error in the tag ``error``; waiting metrics are delivered either way, for at
    most ``CLOSE_TIMEOUT_S``. ``enabled=False`` yields a ``StageRun`` that does nothing.
    """
    if not enabled:
        yield StageRun(None)
        return
    client, experiment_id = _configure()
    _end_stale_runs(client, experiment_id, stage)
    resumed = _resumable(client, resume_run_id)
    if resumed is not None and resumed.info.experiment_id != experiment_id:
        log.info("run %s belongs to another experiment than %s: starting a new run", resume_run_id,
                 experiment_name())
        resumed = None
    if resumed is not None and resumed.info.status == "RUNNING":  # stale ones were ended just above
        log.warning("run %s is RUNNING in a process that is still alive (%s %s); continuing it here as well",
                    resume_run_id, resumed.data.tags.get(HOST_TAG, "?"), resumed.data.tags.get(PID_TAG, "?"))
    active = _start_mlflow_run(client, experiment_id, stage, params, resumed, run_name=run_name,
                               parent_run_id=parent_run_id)
    logged_through = resumed.data.tags.get(LOGGED_THROUGH_TAG, "0") if resumed is not None else "0"
    run = StageRun(active.info.run_id, client, logged_through=int(logged_through) if logged_through.isdigit() else 0,
                   run_name=active.info.run_name)
    monitor = _start_system_metrics(run.run_id, resumed is not None, client.tracking_uri)
    try:
        _log_params(client, run, params, resumed)
        yield run
    except BaseException as err:
        try:
            run.set_tags({"error": f"{type(err).__name__}: {err}"})
        finally:
            _end(run, monitor, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    else:
        _end(run, monitor, "FINISHED")
