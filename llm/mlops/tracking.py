"""MLflow tracking for the pipeline stages: one run per stage with params, lineage tags and metrics.

Where runs go:

- the tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project root>/mlflow.db``, the
  project root being the current working directory (where ``dvc repro`` and the ``llm`` CLI run);
  the registry URI is ``MLFLOW_REGISTRY_URI`` when set, else the tracking URI;
- the experiment is ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME`` when set, else ``llm``. When
  this module creates it in a SQLite database, its artifacts go in ``mlruns/<experiment name>/`` beside
  the database file: run artifacts in ``<run id>/artifacts/``, logged models (MLflow 3 keeps them apart
  from runs) in ``models/<model id>/artifacts/``. With a tracking server, the server decides.

``stage_run`` is the one entry point the stages use. Metric keys are logged exactly as given
(``train/loss``, ``val/bpb``, ...) so runs line up in the MLflow UI. This module imports MLflow at the
top: only code that tracks imports it, never the model or the training loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "llm"
DB_FILE = "mlflow.db"
LINEAGE_KEYS = ("git.commit", "git.dirty", "dvc.data_hash", "dvc.data_source", "params.hash", "stage")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite database ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / DB_FILE}"


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


def _ensure_experiment(client: MlflowClient) -> str:
    """Id of the experiment named by ``experiment_name()``, created (or restored) if needed."""
    handed_over = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run` creates the run; start_run adopts it
    if handed_over:
        try:
            return client.get_run(handed_over).info.experiment_id
        except MlflowException:
            pass
    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_path(client.tracking_uri)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
        location = (db.resolve().parent / "mlruns" / folder).as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
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


class StageRun:
    """Handle on the MLflow run of one stage. With ``run_id`` None (tracking disabled) all methods do nothing.

    Metrics are buffered and sent with ``log_batch``: when ``flush_every`` points have piled up, when
    ``flush_seconds`` have passed since the last send (so a slow run still shows progress), and at the
    end of the run. Calling ``callback`` on every training step is cheap.
    """

    def __init__(
        self,
        run_id: str | None,
        client: MlflowClient | None = None,
        *,
        flush_every: int = 500,
        flush_seconds: float = 15.0,
    ):
        self.run_id = run_id
        self._client = client
        self._buffer: list[Metric] = []
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _add(self, metrics: Mapping[str, Any], step: int | None) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
                continue  # text is not a metric
            self._buffer.append(Metric(key=key, value=float(value), timestamp=now, step=int(step or 0)))

    def flush(self) -> None:
        """Send the buffered metrics now."""
        if self.enabled and self._buffer:
            batch, self._buffer = self._buffer, []
            self._client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        """Training callback ``(step, metrics)``: buffers the step's metrics under their own keys."""
        if not self.enabled:
            return
        self._add(metrics, step)
        if len(self._buffer) >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics now (after any buffered ones), at ``step`` (0 when None)."""
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
        if not self.enabled or not tags:
            return
        run_tags = [RunTag(str(k), _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        self._client.log_batch(self.run_id, tags=run_tags)

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


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    enabled: bool = True,
) -> Iterator[StageRun]:
    """Run the body of a pipeline stage inside an MLflow run and yield its ``StageRun``.

    The run gets ``params`` (flattened), ``lineage_tags`` plus MLflow's ``mlflow.source.git.commit``,
    and system metrics (CPU, memory, disk; GPU when pynvml is present) sampled by MLflow when psutil is
    installed. It is nested under ``parent_run_id``, or under the active run if there is one. It ends
    FINISHED, or FAILED (KILLED on Ctrl-C) if the body raises, with the error in the tag ``error``.
    Buffered metrics are flushed either way. ``enabled=False`` yields a ``StageRun`` that does nothing.
    """
    if not enabled:
        yield StageRun(None)
        return
    client, experiment_id = _configure()
    tags = lineage_tags(stage, params)
    if tags["git.commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["git.commit"]
    # under `mlflow run`, MLFLOW_RUN_ID names the project's run: each stage becomes its child rather than
    # taking it over (start_run would otherwise resume it and rename it after the first stage)
    handed_over = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name or stage,
            nested=mlflow.active_run() is not None or handed_over is not None,
            parent_run_id=parent_run_id or (handed_over if mlflow.active_run() is None else None),
            tags=tags,
            log_system_metrics=_system_metrics_available(),
        )
    finally:
        if handed_over is not None:
            os.environ["MLFLOW_RUN_ID"] = handed_over
    run = StageRun(active.info.run_id, client)
    try:
        run.log_params(params)
        yield run
    except BaseException as err:
        try:
            run.set_tags({"error": f"{type(err).__name__}: {err}"})
            run.flush()
        except Exception:  # the original error matters more than a failed tag
            log.exception("could not record the error on run %s", run.run_id)
        finally:
            mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    else:
        try:
            run.flush()
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")
