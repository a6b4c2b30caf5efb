"""What a pipeline stage hands its results to: the ``Tracker`` interface, its MLflow implementation and an untracked
stand-in.

A stage function in ``llm.stages`` loads its inputs, calls the library and hands what came out to a ``Tracker``
(``stage_tracker(track)``):

- ``run(stage, params)``: the stage's run, a context manager yielding a ``Run`` (metrics, params, tags, artifacts:
  the methods of ``llm.mlops.tracking.StageRun``);
- ``training_run(stage, logged)``: a ``TrainingRun`` that the training loop opens (``TrainingRun.start``) once it
  has decided whether to resume, with the tracking run that the resumed checkpoint records, so a resumed training
  continues its run and the loop alone decides;
- ``finish_training(run, result, out_dir)``: the summary metrics and files of a finished training, its registration
  as a version of ``gpt`` (with its description, ``llm.mlops.registry.version_description``) and
  ``registration.json``;
- ``promote(run, registration, ...)``: the evaluate stage's promotion (``llm.mlops.registry.promote_if_better``);
- ``log_on_training_run(registration, metrics)``: evaluation's scores on the training run of the model it scored;
- ``attach_export(checkpoint_dir, export_dir)``: an ONNX or Transformers export on the checkpoint's version.

``MlflowTracker`` does it with MLflow; ``Untracked`` does nothing (it still writes ``registration.json``, naming no
run). This module imports no MLflow: ``MlflowTracker`` imports ``llm.mlops.tracking`` and ``llm.mlops.registry``
when it is used, so the stages run untracked where MLflow is not installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llm.io import atomic_write_json

if TYPE_CHECKING:
    from llm.training.loop import TrainResult

log = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"
NO_REGISTRY = "tracking disabled: no registry to promote in"
CHAT_SCORES = ("chat/assistant_loss", "chat/assistant_bpb")  # evaluation's scores that go on the training run too


class Run(Protocol):
    """A stage's run: what ``llm.mlops.tracking.StageRun`` offers (``UntrackedRun`` does nothing)."""

    run_id: str | None
    run_name: str | None

    @property
    def enabled(self) -> bool: ...
    def flush(self) -> None: ...
    def callback(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_loss_curve(self, history: list[dict[str, float]], path_name: str = "loss_curve.png") -> None: ...


class UntrackedRun:
    """Stands in for the tracked run (``llm.mlops.tracking.StageRun``) when tracking is off: the same public
    methods, each doing nothing."""

    run_id = None
    run_name = None
    enabled = False

    def flush(self) -> None:
        pass

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_loss_curve(self, history: list[dict[str, float]], path_name: str = "loss_curve.png") -> None:
        pass


class TrainingRun:
    """The run of a training stage (``stage``, logging ``logged``), opened by the training loop once it has
    decided whether to resume: ``start`` (``llm.training.loop.StartTracking``) gets the tracking run that the
    resumed checkpoint records and returns the run that new checkpoints record; ``callback`` is the loop's."""

    def __init__(self, stage: str, logged: Mapping[str, Any],
                 open_run: Callable[[Mapping[str, Any] | None], Run]):
        self.stage, self.logged = stage, logged
        self._open = open_run
        self.run: Run | None = None

    @property
    def started(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def start(self, resumed: Mapping[str, Any] | None) -> dict[str, Any]:
        """Open the run: the one that ``resumed`` (the config of the checkpoint the loop resumes, None when it
        starts over) records, continued when the store has it, else a new one. Returns what new checkpoints
        record about it: the run id (``TRACKING_RUN_KEY``) and the other loggers' runs, if any."""
        from llm.model.checkpoint import TRACKING_RUN_KEY  # here: torch is loaded only where training runs

        self.run = self._open(resumed)
        return {TRACKING_RUN_KEY: self.run.run_id, **getattr(self.run, "checkpoint_metadata", {})}

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.callback(step, metrics)


class Tracker(Protocol):
    """What every stage hands its results to (see the module docstring)."""

    enabled: bool

    def run(self, stage: str, params: Mapping[str, Any], *,
            run_name: str | None = None) -> AbstractContextManager[Run]: ...

    def training_run(self, stage: str, logged: Mapping[str, Any], *, base_version: str | None = None,
                     tags: Mapping[str, str] | None = None,
                     artifacts: tuple[Path, ...] = ()) -> AbstractContextManager[TrainingRun]: ...

    def finish_training(self, run: TrainingRun, result: TrainResult, out_dir: Path, *, register: bool,
                        tags: Mapping[str, str] | None = None,
                        registration: Mapping[str, Any] | None = None) -> dict[str, Any]: ...

    def promote(self, run: Run, registration: Mapping[str, Any], candidate_dir: Path, comparable: Mapping[str, Any],
                compare: Callable[[Path, str], dict[str, Any]], *, enabled: bool = True) -> dict[str, Any]: ...

    def log_on_training_run(self, registration: Mapping[str, Any], metrics: Mapping[str, float], *,
                            step: int) -> None: ...

    def attach_export(self, checkpoint_dir: Path, export_dir: Path, kind: str = "onnx") -> str | None: ...


# ---------------------------------------------------------------------------------------------- shared


def main_process() -> bool:
    """False in the extra processes of a ``torchrun`` job (``llm.training.distributed.process_rank``, asked only
    under torchrun, where torch is loaded anyway): only rank 0 tracks, registers and writes files."""
    if "RANK" not in os.environ:
        return True
    from llm.training.distributed import process_rank

    return process_rank() == 0


def tracking_enabled(track: bool | None) -> bool:
    """``track`` if given, else on unless the environment sets ``LLM_TRACKING=0``; always off outside rank 0."""
    if not main_process():
        return False
    if track is not None:
        return track
    return os.environ.get("LLM_TRACKING", "1").lower() not in ("0", "false", "no", "off")


def stage_tracker(track: bool | None, loggers: Sequence[str] = ("mlflow",)) -> Tracker:
    """The tracker of a stage's ``tracking`` setting (``loggers``) while tracking is on (``tracking_enabled``):
    ``MlflowTracker`` with ``mlflow`` among them, else ``Untracked``, wrapped in ``llm.mlops.loggers.LoggingTracker``
    when ``tensorboard``, ``wandb`` or ``csv`` are too. ``Untracked`` when tracking is off."""
    if not tracking_enabled(track):
        return Untracked()
    inner: Tracker = MlflowTracker() if "mlflow" in loggers else Untracked()
    others = [name for name in loggers if name != "mlflow"]
    if not others:
        return inner
    from llm.mlops.loggers import LoggingTracker

    return LoggingTracker(inner, others)


def training_params(stage_params: Any, model: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict[str, Any]:
    """What a training run logs, under the same names for pretraining and finetuning so that the MLflow
    compare view and ``mlflow.search_runs`` line runs up: ``model.*`` (the shape; a finetune's is its base's),
    ``train.*`` (the optimiser and loop settings: ``train.learning_rate``, ``train.batch_size``, ...) and
    ``tokenizer.kind`` / ``tokenizer.vocab_size``."""
    return {"model": dict(model), "train": stage_params.model_dump(exclude={"tracking"}),
            "tokenizer": {"kind": tokenizer.get("kind"), "vocab_size": tokenizer.get("vocab_size")}}


def training_run_name(stage: str, logged: Mapping[str, Any], *, base_version: str | None = None) -> str:
    """``pretrain 4x256 bpe2048 500 steps (3f2a1c)``: the stage, then layers x width, tokenizer, steps (and the
    base version of a finetune), then the first 6 hex digits of the run's ``params.hash`` tag, so runs with
    different params never share a name."""
    from llm.mlops.tracking import params_hash

    model, train, tok = logged["model"], logged["train"], logged["tokenizer"]
    parts = [stage, f"{model.get('n_layer')}x{model.get('d_model')}", f"{tok.get('kind')}{tok.get('vocab_size') or ''}",
             f"{train['max_steps']} steps"]
    if base_version:
        parts.append(f"from v{base_version}")
    return " ".join(parts) + f" ({params_hash(logged)[:6]})"


SUMMARY_KEYS = {"val/best_loss": "val/best_loss", "params": "model/parameters", "wall_time_s": "perf/wall_time_s",
                "step": "train/steps"}


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The training summary's values that no step logged, under the keys a run shows: ``val/best_loss``,
    ``model/parameters``, ``perf/wall_time_s`` (training time, evaluation and checkpoints left out) and
    ``train/steps``."""
    return {key: float(metrics[name]) for name, key in SUMMARY_KEYS.items() if name in metrics}


def read_registration(checkpoint_dir: Path) -> dict:
    """What the training stage recorded in ``checkpoint_dir/registration.json`` (run id, model version);
    empty when it has none (an untracked run, or a folder from elsewhere)."""
    path = Path(checkpoint_dir) / REGISTRATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_registration(out_dir: Path, registration: dict) -> dict:
    """Write ``registration.json`` into ``out_dir`` (main process only); returns ``registration``."""
    if main_process():
        atomic_write_json(Path(out_dir) / REGISTRATION_FILE, registration, sort_keys=True)
    return registration


def not_promoted(comparable: Mapping[str, Any], reason: str = NO_REGISTRY) -> dict[str, Any]:
    """The decision of an evaluation that promotes nothing."""
    return {"promoted": False, "metric": comparable["metric"], "candidate_score": comparable["score"],
            "reason": reason}


def _record_decision(run: Run, decision: Mapping[str, Any]) -> None:
    run.set_tags({"promotion.promoted": str(decision["promoted"]).lower()})
    run.log_text(json.dumps(decision, indent=2), "promotion.json")


# ---------------------------------------------------------------------------------------------- untracked


class Untracked:
    """The ``Tracker`` of a stage that runs untracked: runs that log nothing, no registry."""

    enabled = False

    def run(self, stage: str, params: Mapping[str, Any], *, run_name: str | None = None):
        return contextlib.nullcontext(UntrackedRun())

    @contextmanager
    def training_run(self, stage: str, logged: Mapping[str, Any], *, base_version: str | None = None,
                     tags: Mapping[str, str] | None = None, artifacts: tuple[Path, ...] = ()) -> Iterator[TrainingRun]:
        yield TrainingRun(stage, logged, lambda resumed: UntrackedRun())

    def finish_training(self, run: TrainingRun, result: TrainResult, out_dir: Path, *, register: bool,
                        tags: Mapping[str, str] | None = None,
                        registration: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Writes ``registration.json`` naming no run; the summary metrics go to the run's other loggers, if any."""
        if run.started:
            run.run.log_metrics(summary_metrics(result.metrics), step=result.step)
        return write_registration(out_dir, {"run_id": None, "model_version": None, "stage": run.stage,
                                            **(registration or {})})

    def promote(self, run: Run, registration: Mapping[str, Any], candidate_dir: Path, comparable: Mapping[str, Any],
                compare: Callable[[Path, str], dict[str, Any]], *, enabled: bool = True) -> dict[str, Any]:
        return not_promoted(comparable)

    def log_on_training_run(self, registration: Mapping[str, Any], metrics: Mapping[str, float], *,
                            step: int) -> None:
        pass

    def attach_export(self, checkpoint_dir: Path, export_dir: Path, kind: str = "onnx") -> str | None:
        return None


# ---------------------------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """The ``Tracker`` that logs to MLflow (``llm.mlops.tracking``) and registers in its model registry
    (``llm.mlops.registry``)."""

    enabled = True

    def run(self, stage: str, params: Mapping[str, Any], *, run_name: str | None = None):
        from llm.mlops.tracking import stage_run

        return stage_run(stage, params, run_name=run_name)

    @contextmanager
    def training_run(self, stage: str, logged: Mapping[str, Any], *, base_version: str | None = None,
                     tags: Mapping[str, str] | None = None, artifacts: tuple[Path, ...] = ()) -> Iterator[TrainingRun]:
        """A ``TrainingRun`` whose MLflow run opens when the loop starts it (named ``training_run_name``, with
        ``tags`` and ``artifacts``) and ends with the block: FINISHED, or FAILED with the error. A failure before
        the loop started it still gets a run of its own, marked FAILED."""
        from llm.mlops.tracking import stage_run

        name = training_run_name(stage, logged, base_version=base_version)
        with ExitStack() as stack:
            def open_run(resumed: Mapping[str, Any] | None) -> Run:
                from llm.model.checkpoint import TRACKING_RUN_KEY

                resumed_run_id = (resumed or {}).get(TRACKING_RUN_KEY)
                run = stack.enter_context(stage_run(stage, logged, resume_run_id=resumed_run_id, run_name=name))
                run.set_tags(dict(tags or {}))
                for artifact in artifacts:
                    run.log_artifact(artifact)
                return run

            training = TrainingRun(stage, logged, open_run)
            try:
                yield training
            except GeneratorExit:
                raise
            except BaseException:
                if not training.started:
                    training.start(None)
                raise

    def finish_training(self, run: TrainingRun, result: TrainResult, out_dir: Path, *, register: bool,
                        tags: Mapping[str, str] | None = None,
                        registration: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Log a finished training run's summary and files; with ``register``, register the checkpoint as a
        version of ``gpt`` tagged with its lineage, ``llm.stage`` and ``tags`` (the version that already holds it,
        if any). Writes and returns ``registration.json``: run, version (None if not registered), stage and
        ``registration``.

        The files are also in ``out_dir``: a tracking store that does not answer costs the run its copies, with a
        warning. Registration tries again with backoff, then raises RegistrationError; the checkpoint is complete
        and ``registration.json`` names the run and tags, so ``llm register --model <out_dir>`` finishes it later.
        """
        if not run.started:
            run.start(None)
        stage_run = run.run
        # the step-wise metrics went through the callback (their last values are the final ones: the last step
        # validates and measures throughput); the summary adds what has no step of its own
        stage_run.log_metrics(summary_metrics(result.metrics), step=result.step)
        _log_training_files(stage_run, result, out_dir)
        version = self._register(run, result, out_dir, {"llm.stage": run.stage, **(tags or {})}) if register else None
        return write_registration(out_dir, {"run_id": stage_run.run_id, "model_version": version,
                                            "stage": run.stage, **(registration or {})})

    def _register(self, run: TrainingRun, result: TrainResult, out_dir: Path, tags: dict[str, str]) -> str:
        from llm.mlops.registry import RegistrationError, register_checkpoint, version_description
        from llm.mlops.tracking import lineage_tags

        version_tags = {**lineage_tags(run.stage, run.logged), **tags}
        description = version_description(run.stage, run.logged, result.metrics, version_tags,
                                          run_name=run.run.run_name)
        try:
            return register_checkpoint(out_dir, run_id=run.run_id, tags=version_tags, description=description)
        except RegistrationError:
            write_registration(out_dir, {"run_id": run.run_id, "model_version": None, "stage": run.stage,
                                         "tags": version_tags})
            raise

    def promote(self, run: Run, registration: Mapping[str, Any], candidate_dir: Path, comparable: Mapping[str, Any],
                compare: Callable[[Path, str], dict[str, Any]], *, enabled: bool = True) -> dict[str, Any]:
        """Promote the registered candidate if it beats Production (``llm.mlops.registry.promote_if_better``)
        unless ``enabled`` is off; the decision goes on ``run`` (tag ``promotion.promoted``, ``promotion.json``)."""
        decision = not_promoted(comparable)
        if enabled and registration.get("model_version"):
            from llm.mlops.registry import promote_if_better

            decision = promote_if_better(str(registration["model_version"]), comparable, compare,
                                         on_production_score=lambda metric, score: run.log_metrics(
                                             {f"production/{metric}": score}))
        elif enabled:
            decision["reason"] = (f"{Path(candidate_dir) / REGISTRATION_FILE} names no registered version "
                                  "(run the training stage tracked)")
        _record_decision(run, decision)
        return decision

    def log_on_training_run(self, registration: Mapping[str, Any], metrics: Mapping[str, float], *,
                            step: int) -> None:
        """``metrics`` (a chat model's scores) beside the metrics of the training run that ``registration`` names."""
        if not (registration.get("run_id") and metrics):
            return
        from llm.mlops.tracking import log_final_metrics

        log_final_metrics(registration["run_id"], metrics, step=step)

    def attach_export(self, checkpoint_dir: Path, export_dir: Path, kind: str = "onnx") -> str | None:
        """Attach the export in ``export_dir`` (``kind``: ``onnx`` or ``hf``) to the registered version of
        ``checkpoint_dir`` (named in its ``registration.json``). Returns the version, or None (with a warning)
        when there is none."""
        registration = read_registration(checkpoint_dir)
        version, run_id = registration.get("model_version"), registration.get("run_id")
        if not version or not run_id:
            log.warning("%s names no registered version: the %s export is not attached to one",
                        Path(checkpoint_dir) / REGISTRATION_FILE, "ONNX" if kind == "onnx" else "Transformers")
            return None
        from llm.mlops.registry import attach_hf_export, attach_onnx_export

        (attach_onnx_export if kind == "onnx" else attach_hf_export)(str(version), run_id, export_dir)
        return str(version)


def _log_training_files(run: Run, result: TrainResult, out_dir: Path) -> None:
    """config.json, metrics.json, curve/ and the loss curve plot as the run's artifacts, while the store answers."""
    from llm.mlops.tracking import retry_unavailable, store_unavailable

    def log_files() -> None:
        run.log_artifact(out_dir / "config.json")
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifacts(out_dir / "curve", "curve")
        run.log_loss_curve(result.history)

    try:
        retry_unavailable(log_files, what=f"logging the files of run {run.run_id}", attempts=3, first_delay_s=2.0)
    except Exception as err:
        if not store_unavailable(err):
            raise
        log.warning("run %s lacks its files (config.json, metrics.json, curve/, loss curve): the tracking store "
                    "did not answer (%s); they are in %s", run.run_id, str(err).splitlines()[0][:300], out_dir)
