"""Finding registered versions and downloading their ONNX export, without PyTorch.

What a torch-free process (the ``llm serve`` server) needs to turn a URI into a local ONNX export folder:
the MLflow client on the configured stores, the version a ``models:/`` URI names, the download cache, and
``resolve_onnx``. ``llm.mlops.registry`` (which needs torch for checkpoints) builds on these; an
import-linter contract keeps this module free of torch.

Downloads go into the cache ``$LLM_CACHE_DIR/models`` (default ``$XDG_CACHE_HOME/llm/models``, i.e.
``~/.cache/llm/models``): ``<name>/<version>-onnx-<id>/`` for a registered version's export and
``runs/<run id>/<path>/`` for a run's, ``<id>`` being a short hash of the storage location.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from llm.io import replace_folder, temporary_folder_beside
from llm.mlops.tracking import registry_uri, set_uris, sqlite_path, tracking_uri

# downloads of a few small files need no progress bars on the terminal (they garble the chat's output)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_NAME = "gpt"
STAGES = ("None", "Staging", "Production", "Archived")
ONNX_ARTIFACT = "onnx"  # the export's folder among the artifacts of the run that registered the version
ONNX_TAG = "onnx.artifact_uri"  # the version tag that names it
EXPORT_CONFIG = "generation_config.json"  # present in every complete export folder
FIRST_STEP_HINT = "run `dvc repro` or `llm pretrain` first"
PROMOTE_HINT = "run `dvc repro` (the evaluate stage promotes) or `llm evaluate`"


class RegistryError(ValueError):
    """A model, version, run or tracking database cannot be found; the message says what to run."""


def not_found(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def registry_location() -> str:
    return f"the registry at {registry_uri()}"


def registry_client(*, must_exist: bool = True) -> MlflowClient | None:
    """A client on the configured stores. A missing SQLite database is a RegistryError (``must_exist``)
    or None, never a new empty database."""
    for uri in {tracking_uri(), registry_uri()}:
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            if not must_exist:
                return None
            raise RegistryError(f"no MLflow tracking database at {db} ({uri}); {FIRST_STEP_HINT}")
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=registry_uri())


def without_stage_warning(fn: Callable[..., Any], *args, **kwargs) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # registry stages: deprecated, still supported
        return fn(*args, **kwargs)


def cache_root() -> Path:
    if os.environ.get("LLM_CACHE_DIR"):
        return Path(os.environ["LLM_CACHE_DIR"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm" / "models"


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return list(client.search_model_versions(f"name='{name}'"))


def find_version(client: MlflowClient, name: str, ref: str, *, alias: bool) -> ModelVersion:
    """The version that ``models:/<name>/<ref>`` (a number, ``latest`` or a stage) or ``models:/<name>@<ref>``
    names. Raises RegistryError (one line naming what to run) when there is none."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not_found(err):
            raise RegistryError(f"no model '{name}' in {registry_location()}; {FIRST_STEP_HINT}") from None
        raise
    try:
        if alias:
            return client.get_model_version_by_alias(name, ref)
        if ref.isdigit():
            return client.get_model_version(name, ref)
    except MlflowException as err:
        if not not_found(err) and "not found" not in str(err).lower():
            raise
        if alias:
            where = registry_location()
            raise RegistryError(f"model '{name}' has no alias '{ref}' in {where}; {PROMOTE_HINT}") from None
        known = ", ".join(str(v) for v in sorted(int(v.version) for v in all_versions(client, name))) or "none"
        where = registry_location()
        raise RegistryError(f"model '{name}' has no version {ref} in {where} (versions: {known})") from None
    if ref.lower() == "latest":
        versions = all_versions(client, name)
        if not versions:
            raise RegistryError(f"model '{name}' has no versions in {registry_location()}; {FIRST_STEP_HINT}")
        return max(versions, key=lambda v: int(v.version))
    stage = next((s for s in STAGES if s.lower() == ref.lower()), None)
    if stage is None:
        raise RegistryError(
            f"models:/{name}/{ref}: '{ref}' is not a version number, 'latest' or a stage ({', '.join(STAGES)}); "
            f"for an alias write models:/{name}@{ref}"
        )
    found = without_stage_warning(client.get_latest_versions, name, stages=[stage])
    if not found:
        raise RegistryError(f"model '{name}' has no version in stage {stage} in {registry_location()}; {PROMOTE_HINT}")
    return found[0]


def resolve_onnx(uri: str) -> Path:
    """A local ONNX export folder for a registry URI, downloaded into the cache (reused on later calls).

    ``uri`` is ``models:/gpt/<version|stage|latest>`` or ``models:/gpt@<alias>`` (the export attached to
    that version: its tag ``onnx.artifact_uri``, set by ``attach_onnx_export``), or ``runs:/<run id>``
    (that run's ``onnx`` artifact folder; ``runs:/<run id>/<path>`` names another folder of the run).

    Raises RegistryError (one line) for a missing database, model, version or run, a version that carries
    no export, or a run folder that is not an export.
    """
    text = str(uri)
    set_uris()
    client = registry_client()
    if text.startswith("runs:/"):
        run_id, _, path = text.removeprefix("runs:/").strip("/").partition("/")
        return _run_export(client, run_id, path.strip("/") or ONNX_ARTIFACT)
    ref = text.removeprefix("models:/").strip("/")
    if not text.startswith("models:/") or ("@" not in ref and "/" not in ref):
        raise RegistryError(f"{uri}: expected models:/<name>/<version|stage>, models:/<name>@<alias> or "
                            "runs:/<run id>")
    name, sep, selector = ref.partition("@") if "@" in ref else ref.partition("/")
    found = find_version(client, name, selector, alias=sep == "@")
    version = client.get_model_version(found.name, str(found.version))  # stage look-ups come without tags
    artifact = version.tags.get(ONNX_TAG)
    if not artifact:
        raise RegistryError(f"{uri}: version {version.version} carries no ONNX export; run the export stage "
                            "(`dvc repro` or `llm export onnx`)")
    key = hashlib.sha256(artifact.encode()).hexdigest()[:12]
    return _download_export(artifact, cache_root() / version.name / f"{version.version}-onnx-{key}")


def _run_export(client: MlflowClient, run_id: str, path: str) -> Path:
    """The export folder ``path`` among the artifacts of run ``run_id``, downloaded into the cache."""
    if not run_id:
        raise RegistryError("runs:/: expected runs:/<run id> (its onnx folder) or runs:/<run id>/<folder>")
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if not_found(err):
            raise RegistryError(f"no run {run_id} in the tracking store at {tracking_uri()}") from None
        raise
    if not any(f.path == f"{path}/{EXPORT_CONFIG}" for f in client.list_artifacts(run_id, path)):
        raise RegistryError(f"runs:/{run_id}/{path}: no ONNX export there (no {EXPORT_CONFIG}); run the export "
                            "stage (`dvc repro` or `llm export onnx`)")
    return _download_export(f"runs:/{run_id}/{path}", cache_root() / "runs" / run_id / path)


def _download_export(artifact_uri: str, target: Path) -> Path:
    """Download an export folder into ``target`` (atomically: temp sibling, then rename) unless it is there."""
    if (target / EXPORT_CONFIG).is_file():  # versions and runs never change: a complete copy is reusable
        return target
    try:
        with temporary_folder_beside(target) as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp))
            replace_folder(local, target)
    except MlflowException as err:
        reason = str(err.message).splitlines()[0]
        raise RegistryError(f"{artifact_uri}: cannot download the ONNX export: {reason}") from None
    return target
