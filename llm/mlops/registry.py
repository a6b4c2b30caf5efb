"""The model registry: checkpoints as versions of the pyfunc model ``gpt``, promotion, and resolving URIs.

A version is a pyfunc model logged from code (``llm/mlops/pyfunc.py``, no pickled objects) whose artifact
``checkpoint`` is the checkpoint folder without ``train_state/``, with the ``llm`` package as its code.
MLflow 3 stores a logged model's files under the experiment, not the run:
``<experiment artifact location>/models/<model id>/artifacts/`` (with the default SQLite store,
``mlruns/llm/models/m-.../artifacts/``), the checkpoint in ``artifacts/checkpoint/`` inside that (the
MLmodel file records the path). ``runs:/<run id>/model`` is resolved through the run's logged models.

A version's description (``version_description``) says what it was trained from, on which data, and its
validation scores. The evaluate stage's promotion decision is taken here (``promote_if_better``): a decision
recorded before is kept, else the candidate's score is compared with Production's on the same text, the
scores coming from ``llm.training.evaluate`` through the callable the stage passes.

Promotion moves a version to the ``Production`` stage (archiving the previous one) *and* points the
alias ``production`` at it, so both ``models:/gpt/Production`` and ``models:/gpt@production`` resolve.
Stages are deprecated in MLflow 3 but still work; their FutureWarning is silenced here.

Idempotent: a version records the sha256 of its checkpoint's weights (tag ``checkpoint.weights_sha256``), and
registering a checkpoint that a version already holds returns that version instead of a new one (a rerun
stage, a Prefect retry). A promotion decision is recorded on the candidate (tag ``promotion.decision``)
before it is carried out, and deciding on the same candidate again returns that decision (and finishes a
promotion that was interrupted) instead of comparing anew. Registration tries again with backoff while the
store does not answer, then raises RegistrationError saying how to register the finished checkpoint later.

Finding versions and resolving ONNX exports (``resolve_onnx``, re-exported here) need no torch and live in
``llm.mlops.lookup``. ``resolve_model`` downloads a version's checkpoint into a cache, ``$LLM_CACHE_DIR/models``
(default ``$XDG_CACHE_HOME/llm/models``, i.e. ``~/.cache/llm/models``): ``<name>/<version>-<id>/`` for registry
versions and ``runs/<run id>/<path>/`` for run models, where ``<id>`` is a short hash of the storage
location, so two databases that both hold a "gpt version 1" never share a cache entry.

LoRA: a version registered from an adapter checkpoint stores the adapters alone (a few hundred KB) and records
its base in tags: ``lora.base_version`` (the version holding the base's weights, ``none`` when unregistered),
``lora.base_weights_sha256``, ``lora.base_path``, and the adapter's rank, alpha and targets. ``resolve_model``
gives such a version as a merged plain checkpoint (``<cache entry>-merged/``): the base is the recorded path
when it still holds those weights, else the registered version that holds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH

from llm.io import replace_folder, temporary_folder_beside
from llm.mlops.lookup import (
    MODEL_NAME,
    ONNX_ARTIFACT,
    ONNX_TAG,
    RegistryError,
    all_versions,
    cache_root,
    find_version,
    not_found,
    registry_client,
    registry_location,
    without_stage_warning,
)
from llm.mlops.lookup import resolve_onnx as resolve_onnx  # its home was here: existing callers import it from here
from llm.mlops.tracking import (
    LINEAGE_KEYS,
    configure_mlflow,
    retry_unavailable,
    set_uris,
    store_unavailable,
    tracking_uri,
)
from llm.model.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointConfig,
    CheckpointError,
    copy_without_train_state,
    merge_checkpoint,
    read_adapter_config,
    read_manifest,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

PRODUCTION_STAGE = "Production"
PRODUCTION_ALIAS = "production"
CHECKPOINT_ARTIFACT = "checkpoint"
PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
PACKAGE_DIR = Path(__file__).parents[1]  # the whole llm package, logged as code
# what the serving code imports; pinned to the versions installed where the model was logged
SERVING_REQUIREMENTS = (
    "onnxruntime", "torch", "numpy", "safetensors", "sentencepiece", "pydantic", "pyyaml", "pandas"
)
WEIGHTS_SHA_TAG = "checkpoint.weights_sha256"  # what makes two registrations the same checkpoint
DECISION_TAG = "promotion.decision"  # the JSON of compare_and_promote's decision on this candidate
DECISION_HEADING = "**Promotion decision**"  # starts the paragraph that evaluation writes into a version's description
MODEL_DESCRIPTION = """\
A GPT language model trained from scratch by this project's pipeline: clean, tokenizer, tokenize, pretrain,
finetune, evaluate, export (`dvc repro`, or one Prefect flow per stage).

Every finished pretraining and finetuning registers a version, described in a few lines (what it was trained
from, on which data version, its validation scores) and tagged with its lineage (git commit, DVC data hash,
params hash, the training run). The evaluate stage then scores the candidate and the current Production version
on the same validation data (bits per byte of the validation text for base models, loss on the assistant tokens
of held-out conversations for chat models) and promotes the candidate (stage `Production`, alias `production`)
only when it scores strictly better. The decision and both scores are added to the candidate's description.

Load the promoted model with `models:/gpt/Production` or `models:/gpt@production`
(`python -m llm.chat --model models:/gpt/Production`, `llm serve --model models:/gpt/Production`)."""
REGISTER_ATTEMPTS = 5  # tries while the store does not answer, waiting 2, 4, 8, 16 s between them
REGISTER_FIRST_DELAY_S = 2.0


class RegistrationError(RegistryError):
    """The store did not answer while registering a checkpoint; the checkpoint is complete and the message
    says how to register it later."""


# ---------------------------------------------------------------------------------------------- helpers


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text[:MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH]


def _requirements() -> list[str]:
    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            version = metadata.version(name).split("+", 1)[0]  # drop local tags such as +cpu
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version}")
    return pins


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    # sampling fields are typed Any: a column that some rows leave out holds NaN, which a "long" rejects;
    # the model validates them itself (llm.inference.generate.SamplingParams) and answers 400 with the reason
    optional = [ColSpec(AnyType(), name, required=False)
                for name in ("messages", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed")]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt", required=False), *optional]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", None),
            ParamSpec("min_new_tokens", "long", None),
            ParamSpec("temperature", "double", None),
            ParamSpec("top_k", "long", None),
            ParamSpec("top_p", "double", None),
            ParamSpec("seed", "long", None),
        ]),
    )


def _stage_for_logging(checkpoint_dir: Path, staging: Path) -> tuple[Path, Path]:
    """Copies of the checkpoint (without train_state/, manifest rewritten to match) and of the package."""
    checkpoint = copy_without_train_state(checkpoint_dir, staging / CHECKPOINT_ARTIFACT)
    code = staging / "code" / PACKAGE_DIR.name
    shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return checkpoint, code


# ---------------------------------------------------------------------------------------------- register


def checkpoint_weights_sha256(checkpoint_dir: str | Path) -> str:
    """The sha256 of the checkpoint's weights (of its adapters, for an adapter checkpoint), as its
    ``manifest.json`` records it: the key that says two registrations are the same checkpoint. Raises
    RegistryError when the manifest records none."""
    manifest_path = Path(checkpoint_dir) / MANIFEST_FILE
    try:
        weights_sha256 = read_manifest(checkpoint_dir).weights_sha256
    except CheckpointError as err:
        raise RegistryError(f"{manifest_path}: no sha256 of {WEIGHTS_FILE} in it ({err})") from None
    if not weights_sha256:
        raise RegistryError(f"{manifest_path}: no sha256 of {WEIGHTS_FILE} in it")
    return weights_sha256


def _adapter_tags(client: MlflowClient, checkpoint_dir: Path) -> dict[str, Any]:
    """The tags that tie a version of an adapter checkpoint to its base (none for a plain checkpoint)."""
    adapter = read_adapter_config(checkpoint_dir)
    if adapter is None:
        return {}
    base = _version_holding(client, adapter["base"]["weights_sha256"])
    lora = adapter["lora"]
    return {"finetune.method": "lora", "lora.base_version": base.version if base is not None else "none",
            "lora.base_weights_sha256": adapter["base"]["weights_sha256"], "lora.base_path": adapter["base"]["path"],
            "lora.rank": lora["rank"], "lora.alpha": lora["alpha"], "lora.targets": ",".join(lora["targets"])}


def _version_holding(client: MlflowClient, weights_sha256: str) -> ModelVersion | None:
    holding = [v for v in all_versions(client, MODEL_NAME) if v.tags.get(WEIGHTS_SHA_TAG) == weights_sha256]
    return min(holding, key=lambda v: int(v.version)) if holding else None


def register_checkpoint(
    checkpoint_dir: str | Path,
    *,
    run_id: str,
    tags: dict[str, str],
    description: str | None = None,
    artifact_path: str = "model",
    attempts: int | None = None,
    first_delay_s: float | None = None,
) -> str:
    """Log ``checkpoint_dir`` as a pyfunc model from code in run ``run_id`` and register it as a version of
    ``gpt``; returns the version number as a string. A version that already holds these weights (tag
    ``checkpoint.weights_sha256``) is returned instead of registering a duplicate.

    The version is tagged with the run's lineage tags (``git.commit``, ``dvc.data_hash``,
    ``params.hash``, ``stage``), ``run_id``, ``checkpoint.step``, ``tokenizer.kind``, the weights sha256,
    then ``tags`` (which win), and described by ``description`` (markdown, shown on the registry page); the
    registered model gets ``MODEL_DESCRIPTION`` while it has none. ``train_state/`` is left out. While the
    store does not answer it tries
    again, ``attempts`` times (``REGISTER_ATTEMPTS``) with doubling waits from ``first_delay_s``.

    Raises CheckpointError for an incomplete checkpoint, RegistryError for a missing database or run, and
    RegistrationError (naming the way to register later) when the store never answered.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = verify_checkpoint(checkpoint_dir)
    weights_sha256 = checkpoint_weights_sha256(checkpoint_dir)
    attempts = REGISTER_ATTEMPTS if attempts is None else attempts
    first_delay_s = REGISTER_FIRST_DELAY_S if first_delay_s is None else first_delay_s
    logged: list = []  # the logged model survives a failed try: the next one only registers it

    def register_once() -> str:
        configure_mlflow()
        client = registry_client()
        found = _version_holding(client, weights_sha256)
        if found is not None:
            log.info("%s is already registered as %s version %s: reusing it", checkpoint_dir, MODEL_NAME,
                     found.version)
            client.set_tag(run_id, "registered_model.version", f"{MODEL_NAME}/{found.version}")
            return str(found.version)
        version_tags = {**_version_tags(client, checkpoint_dir, run_id, config, weights_sha256), **tags}
        if not logged:
            logged.append(_log_model(checkpoint_dir, run_id, artifact_path))
        version = mlflow.register_model(
            logged[0].model_uri, MODEL_NAME, tags={k: _tag_value(v) for k, v in version_tags.items()}
        )
        if description:
            client.update_model_version(MODEL_NAME, str(version.version), description=description)
        if not client.get_registered_model(MODEL_NAME).description:  # a description the user wrote stays
            client.update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
        client.set_tag(run_id, "registered_model.version", f"{MODEL_NAME}/{version.version}")
        log.info("registered %s as %s version %s (%s)", checkpoint_dir, MODEL_NAME, version.version,
                 logged[0].model_uri)
        return str(version.version)

    try:
        return retry_unavailable(register_once, what=f"registering {checkpoint_dir}", attempts=attempts,
                                 first_delay_s=first_delay_s)
    except Exception as err:
        if not store_unavailable(err):
            raise
        raise _registration_error(checkpoint_dir, run_id, config, err, attempts, first_delay_s) from err


def _version_tags(client: MlflowClient, checkpoint_dir: Path, run_id: str, config: CheckpointConfig,
                  weights_sha256: str) -> dict[str, Any]:
    """A new version's tags: the lineage tags of run ``run_id``, the run, the checkpoint's step, tokenizer kind,
    model config and weights sha256, and for an adapter checkpoint its base. Raises RegistryError for a run that
    is not in the store."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if not not_found(err):
            raise
        raise RegistryError(f"no run {run_id} in the tracking store at {tracking_uri()} to register "
                            f"{checkpoint_dir} under (`llm register --run-id` names another)") from None
    version_tags = {k: v for k, v in run.data.tags.items() if k in LINEAGE_KEYS}
    version_tags.update({
        "run_id": run_id,
        "checkpoint.step": config.get("step", 0),
        "tokenizer.kind": config.tokenizer.get("kind", "unknown"),
        "model.config": config.model,
        WEIGHTS_SHA_TAG: weights_sha256, **_adapter_tags(client, checkpoint_dir),  # LoRA: its base
    })
    return version_tags


def _registration_error(checkpoint_dir: Path, run_id: str, config: CheckpointConfig, err: BaseException,
                        attempts: int, first_delay_s: float) -> RegistrationError:
    """What registration raises when the store never answered: how long it tried, and how to finish later."""
    waited = first_delay_s * (2 ** (attempts - 1) - 1)
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return RegistrationError(
        f"could not register {checkpoint_dir} as a version of {MODEL_NAME}: {registry_location()} did not answer "
        f"in {attempts} tries over {waited:.0f} s ({reason}). The checkpoint is complete (step "
        f"{config.get('step', '?')}); once the store is back, register it with "
        f"`llm register --model {checkpoint_dir}` (it reuses run {run_id} from registration.json)"
    )


def version_description(stage: str, logged: Mapping[str, Any], metrics: Mapping[str, float],
                        tags: Mapping[str, str], *, run_name: str | None = None) -> str:
    """The registry page's description of a version that a training stage registers (markdown): what it was
    trained from, on which data, its key metrics. Evaluation adds its promotion decision below it."""
    model, tok, train = logged.get("model", {}), logged.get("tokenizer", {}), logged.get("train", {})
    layers = model.get("n_layer")
    kv = f" ({model['n_kv_head']} key/value)" if model.get("n_kv_head") else ""
    shape = (f"{layers} layer{'' if layers == 1 else 's'} x {model.get('d_model')} wide, {model.get('n_head')} "
             f"heads{kv}, context {model.get('context_length')}")
    size = f"{metrics['params'] / 1e6:.2f}M parameters" if "params" in metrics else "unknown size"
    if stage == "finetune":
        parent = tags.get("llm.parent_version", "none")
        origin = (f"Chat model finetuned from **gpt version {parent}**" if parent != "none"
                  else "Chat model finetuned from an unregistered base checkpoint")
        origin += f" (run `{tags.get('llm.parent_run_id', 'none')}`) on chat conversations"
        if train.get("method") == "lora":
            lora = train.get("lora") or {}
            origin += (f", as LoRA adapters (rank {lora.get('rank')} on {', '.join(lora.get('targets', []))}): the "
                       "version stores the adapters and its base's identity, and loads merged")
    else:
        origin = "Base model pretrained from scratch on the corpus"
    data = tags.get("dvc.data_hash", "none")
    lines = [
        f"{origin}: {shape}; {tok.get('kind')} tokenizer of {tok.get('vocab_size')} tokens; {size}.",
        "",
        f"- Trained: {int(metrics.get('step', train.get('max_steps', 0)))} steps, batch {train.get('batch_size')}, "
        f"learning rate {train.get('learning_rate')}, in {metrics.get('wall_time_s', float('nan')):.0f} s"
        + (f" (run `{run_name}`)" if run_name else ""),
        f"- Data: version `{data[:12]}` ({tags.get('dvc.data_source', 'unknown')}), "
        f"code at git `{tags.get('git.commit', 'unknown')[:12]}`"
        + (" (with uncommitted changes)" if tags.get("git.dirty") == "true" else ""),
        "- Validation: " + ", ".join(f"{key} {metrics[key]:.4f}" for key in ("val/bpb", "val/loss", "val/ppl")
                                     if key in metrics),
    ]
    return "\n".join(lines)


def _log_model(checkpoint_dir: Path, run_id: str, artifact_path: str):
    """Log the checkpoint as a pyfunc model from code in run ``run_id``; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="llm-register-") as tmp, _validated_with_torch():
        checkpoint, code = _stage_for_logging(checkpoint_dir, Path(tmp))
        # what mlflow.pyfunc.log_model does, plus run_id: the run need not be the active one
        return Model.log(
            artifact_path=None,
            name=artifact_path,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run_id,
            python_model=str(PYFUNC_FILE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(code)],
            pip_requirements=_requirements(),
            signature=_signature(),
            input_example=pd.DataFrame({"prompt": ["Once upon a time"], "max_new_tokens": [8], "seed": [0]}),
        )


@contextmanager
def _validated_with_torch() -> Iterator[None]:
    """MLflow loads a model it logs to check its input example; the export is attached later, so that load
    would look for one and warn that it serves with PyTorch. It uses PyTorch without looking (the served
    model's ``LLM_SERVE_ENGINE``); a value the user set is kept."""
    if os.environ.get("LLM_SERVE_ENGINE"):
        yield
        return
    os.environ["LLM_SERVE_ENGINE"] = "torch"
    try:
        yield
    finally:
        os.environ.pop("LLM_SERVE_ENGINE", None)


def attach_onnx_export(version: str, run_id: str, export_dir: str | Path) -> None:
    """Store the ONNX export in ``export_dir`` with version ``version`` of ``gpt``: as artifacts ``onnx/`` of
    ``run_id`` (the run that registered it), named by the version's tag ``onnx.artifact_uri``, which
    ``resolve_onnx`` reads. Raises RegistryError for a missing database or version."""
    configure_mlflow()
    client = registry_client()
    find_version(client, MODEL_NAME, str(version), alias=False)
    client.log_artifacts(run_id, str(export_dir), ONNX_ARTIFACT)
    client.set_model_version_tag(MODEL_NAME, str(version), ONNX_TAG, f"runs:/{run_id}/{ONNX_ARTIFACT}")


HF_ARTIFACT = "hf"  # the Transformers export's folder among the artifacts of the run that registered the version
HF_TAG = "hf.artifact_uri"  # the version tag that names it


def attach_hf_export(version: str, run_id: str, hf_dir: str | Path) -> None:
    """Store the Transformers export in ``hf_dir`` with version ``version`` of ``gpt``, as the ONNX export is:
    artifacts ``hf/`` of ``run_id``, named by the version's tag ``hf.artifact_uri`` (``mlflow artifacts
    download -u <that uri>`` fetches a folder ``from_pretrained`` reads). Raises RegistryError for a missing
    database or version."""
    configure_mlflow()
    client = registry_client()
    find_version(client, MODEL_NAME, str(version), alias=False)
    client.log_artifacts(run_id, str(hf_dir), HF_ARTIFACT)
    client.set_model_version_tag(MODEL_NAME, str(version), HF_TAG, f"runs:/{run_id}/{HF_ARTIFACT}")


# ---------------------------------------------------------------------------------------------- resolve


def _checkpoint_subpath(model_root: str) -> str:
    """Where the model's MLmodel file says the ``checkpoint`` artifact lies (``artifacts/checkpoint``)."""
    with tempfile.TemporaryDirectory(prefix="llm-mlmodel-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_root}/MLmodel", dst_path=tmp)
        except (MlflowException, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RegistryError(f"{model_root}: no MLmodel file here ({reason}); not a model logged by llm?") from None
        mlmodel = yaml.safe_load(Path(local).read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise RegistryError(f"{model_root}: this model has no '{CHECKPOINT_ARTIFACT}' artifact (not logged by llm)")
    return artifacts[CHECKPOINT_ARTIFACT]["path"]


def _download_checkpoint(model_root: str, target: Path) -> Path:
    """Download the model's checkpoint folder into ``target`` (atomically: temp sibling, then rename)."""
    subpath = _checkpoint_subpath(model_root)
    try:
        with temporary_folder_beside(target) as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_root}/{subpath}", dst_path=str(tmp))
            if not (Path(local) / MANIFEST_FILE).is_file():
                raise RegistryError(f"{model_root}/{subpath}: downloaded, but it is not a checkpoint folder")
            replace_folder(local, target)
    except MlflowException as err:
        reason = str(err.message).splitlines()[0]
        raise RegistryError(f"{model_root}/{subpath}: cannot download the checkpoint: {reason}") from None
    return target


def _place(model_root: str, cache_key: Path, dst: Path | None) -> Path:
    if dst is None:
        target = cache_root() / cache_key
        if (target / MANIFEST_FILE).is_file():  # versions never change: a complete copy is reusable
            return target
        return _download_checkpoint(model_root, target)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not (dst / MANIFEST_FILE).is_file():
        raise RegistryError(f"{dst}: exists and is not a checkpoint folder; pick a new or empty folder")
    return _download_checkpoint(model_root, dst)


def _run_model_root(client: MlflowClient, run_id: str, path: str) -> str:
    """Storage location of the model named ``path`` that run ``run_id`` logged."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if not_found(err):
            raise RegistryError(f"no run {run_id} in the tracking store at {tracking_uri()}") from None
        raise
    models = [client.get_logged_model(o.model_id) for o in (run.outputs.model_outputs if run.outputs else []) or []]
    named = [m for m in models if m.name == path]
    if named:  # logged twice under one name: the latest, as MLflow's own runs:/ resolution does
        return max(named, key=lambda m: m.creation_timestamp).artifact_location
    # MLflow 2 kept models among the run's artifacts
    if any(f.path == f"{path}/MLmodel" for f in client.list_artifacts(run_id, path)):
        return f"{run.info.artifact_uri}/{path}"
    logged = ", ".join(sorted({m.name for m in models})) or "none"
    raise RegistryError(f"run {run_id} logged no model named '{path}' (its models: {logged})")


def resolve_model(uri: str | Path, dst: str | Path | None = None) -> Path:
    """A local checkpoint folder for a model reference.

    ``uri`` is ``models:/gpt/<version>``, ``models:/gpt/latest``, ``models:/gpt/<stage>`` (e.g.
    ``Production``), ``models:/gpt@<alias>``, ``models:/<logged model id>``, ``runs:/<run id>/<path>``, or
    a local checkpoint folder (returned as is). Downloads go into ``dst`` when given, else into the
    cache described in this module's docstring (reused on later calls).

    Raises RegistryError (one line naming what to run) for a missing tracking database, model, version,
    alias, stage or run, or a local path that does not exist.
    """
    text = str(uri)
    if not text.startswith(("models:/", "runs:/")):
        path = Path(text)
        if not path.exists():
            raise RegistryError(f"{path}: no such checkpoint folder, and not a models:/ or runs:/ URI")
        return path
    set_uris()
    client = registry_client()
    if text.startswith("runs:/"):
        run_id, _, path = text.removeprefix("runs:/").strip("/").partition("/")
        if not run_id or not path:
            raise RegistryError(f"{text}: expected runs:/<run id>/<model path>, e.g. runs:/<run id>/model")
        root = _run_model_root(client, run_id, path)
        return _merged(client, _place(root, Path("runs") / run_id / path, dst))
    ref = text.removeprefix("models:/").strip("/")
    if "/" not in ref and "@" not in ref and ref.startswith("m-"):  # a logged model id
        try:
            root = client.get_logged_model(ref).artifact_location
        except MlflowException:
            raise RegistryError(f"no logged model {ref} in the tracking store at {tracking_uri()}") from None
        return _merged(client, _place(root, Path("logged") / ref, dst))
    if "@" in ref:
        name, alias_name = ref.split("@", 1)
        version = find_version(client, name, alias_name, alias=True)
    elif "/" in ref:
        name, selector = ref.split("/", 1)
        version = find_version(client, name, selector, alias=False)
    else:
        raise RegistryError(f"{text}: expected models:/<name>/<version|stage|latest> or models:/<name>@<alias>")
    root = client.get_model_version_download_uri(version.name, version.version)
    key = hashlib.sha256(root.encode()).hexdigest()[:12]
    return _merged(client, _place(root, Path(version.name) / f"{version.version}-{key}", dst))


def _merged(client: MlflowClient, folder: Path) -> Path:
    """``folder`` for a plain checkpoint; for an adapter checkpoint, its merge with its base in the sibling
    ``<folder>-merged`` (made once, then reused). Raises RegistryError when the base is neither at its recorded
    path nor a registered version."""
    adapter = read_adapter_config(folder)
    if adapter is None:
        return folder
    merged = folder.with_name(f"{folder.name}-merged")
    if not (merged / MANIFEST_FILE).is_file():
        merge_checkpoint(folder, merged, base=_adapter_base(client, folder, adapter))
    return merged


def _adapter_base(client: MlflowClient, folder: Path, adapter: dict[str, Any]) -> Path:
    """The base checkpoint of the adapters in ``folder``: the recorded path while it holds the recorded weights,
    else the registered version that holds them (resolved like any version)."""
    recorded, sha = Path(adapter["base"]["path"]), adapter["base"]["weights_sha256"]
    try:
        if read_manifest(recorded).plain_weights_sha256 == sha:
            return recorded
    except CheckpointError:
        pass  # moved or deleted: look for it in the registry
    holder = _version_holding(client, sha)
    if holder is None:
        raise RegistryError(f"{folder}: the base of these adapters (weights sha256 {sha[:12]}..., trained at "
                            f"{recorded}) is neither there nor a registered version of {MODEL_NAME}; put the base "
                            f"back, or register it (`llm register --model BASE`)")
    return resolve_model(f"models:/{MODEL_NAME}/{holder.version}")


# ---------------------------------------------------------------------------------------------- promote


def production_version() -> ModelVersion | None:
    """The version that alias ``production`` (else stage ``Production``) names; None if there is none,
    or no model ``gpt``, or no tracking database yet. Compare ``str(v.version)``: a SQL store gives
    ints, a tracking server strings."""
    client = registry_client(must_exist=False)
    if client is None:
        return None
    try:
        found = [client.get_model_version_by_alias(MODEL_NAME, PRODUCTION_ALIAS)]
    except MlflowException:
        try:
            found = without_stage_warning(client.get_latest_versions, MODEL_NAME, stages=[PRODUCTION_STAGE])
        except MlflowException as err:
            if not_found(err):
                return None
            raise
    return found[0] if found else None


def promote(version: str, *, reason: str, scores: dict[str, float]) -> None:
    """Make ``version`` of ``gpt`` the Production model: stage ``Production`` (the previous Production
    version is archived) and alias ``production``. The decision is kept as version tags
    ``promotion.reason``, ``promotion.score.<name>``, ``promotion.previous`` and ``promotion.time``.

    Raises RegistryError for a missing database, model or version.
    """
    set_uris()
    client = registry_client()
    version = str(version)
    find_version(client, MODEL_NAME, version, alias=False)
    previous = production_version()
    if previous is not None and str(previous.version) == version:
        previous = None  # promoted again: nothing is replaced
    without_stage_warning(
        client.transition_model_version_stage, MODEL_NAME, version, PRODUCTION_STAGE, archive_existing_versions=True
    )
    client.set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version)
    tags = {
        "promotion.promoted": "true",
        "promotion.reason": reason,
        "promotion.time": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.previous": str(previous.version) if previous is not None else "none",
        **{f"promotion.score.{name}": repr(float(value)) for name, value in scores.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, key, _tag_value(value))
    if previous is not None:
        client.set_model_version_tag(MODEL_NAME, str(previous.version), "promotion.replaced_by", version)
    log.info("promoted %s version %s to Production: %s", MODEL_NAME, version, reason)


def decide(
    candidate: str,
    candidate_score: float | None,
    production: str | None,
    production_score: float | None,
    *,
    metric: str,
    lower_is_better: bool = True,
    incomparable: str | None = None,
) -> tuple[bool, str]:
    """Whether ``candidate`` should replace ``production`` on ``metric``, and why (pure; touches no store).

    Yes if it scores strictly better, or if there is no Production version. A tie, a missing or NaN
    candidate score, a Production version without a score, scores that cannot be compared
    (``incomparable`` says why: another kind of model, other text), or the candidate already being
    Production: no; the reason of an incomparable one says how to promote it by hand.
    """
    better = "lower" if lower_is_better else "higher"
    if candidate_score is None or math.isnan(candidate_score):
        return False, f"candidate has no valid {metric} score ({candidate_score}); not promoting it"
    if production is None:
        return True, f"no Production version yet; {metric} {candidate_score:.4f}"
    if production == candidate:
        return False, f"version {candidate} is already Production"
    if incomparable:
        return False, (f"{metric} {candidate_score:.4f} not compared with Production version {production}: "
                       f"{incomparable}; Production unchanged (to promote version {candidate} anyway: "
                       f"`llm promote {candidate}`)")
    if production_score is None or math.isnan(production_score):
        return False, f"no {metric} score for Production version {production} to compare with; keeping it"
    beats = candidate_score < production_score if lower_is_better else candidate_score > production_score
    verdict = "beats" if beats else "does not beat"
    return beats, (f"{metric} {candidate_score:.4f} {verdict} Production version {production} "
                   f"({production_score:.4f}; {better} is better)")


def recorded_decision(candidate_version: str) -> dict | None:
    """The promotion decision already taken on ``candidate_version`` of ``gpt`` (what ``compare_and_promote``
    returned then), or None when it was never decided. Raises RegistryError for a missing version."""
    client = registry_client()
    find_version(client, MODEL_NAME, str(candidate_version), alias=False)  # RegistryError if it is not there
    return _recorded_decision(client.get_model_version(MODEL_NAME, str(candidate_version)))


def _recorded_decision(version: ModelVersion) -> dict | None:
    raw = version.tags.get(DECISION_TAG)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("version %s has an unreadable %s tag; deciding again", version.version, DECISION_TAG)
        return None


def _finish_interrupted_promotion(client: MlflowClient, decision: dict) -> None:
    """A decision to promote is recorded before it is carried out: carry it out if it never was (the
    version is not Production and no later version replaced it)."""
    if not decision.get("promoted"):
        return
    version = str(decision["candidate"])
    current = production_version()
    replaced_by = client.get_model_version(MODEL_NAME, version).tags.get("promotion.replaced_by")
    if replaced_by or (current is not None and str(current.version) == version):
        return
    log.info("version %s was decided Production but not promoted (interrupted): promoting it now", version)
    promote(version, reason=decision["reason"], scores=_decision_scores(decision))


def _decision_scores(decision: dict) -> dict[str, float]:
    metric = decision["metric"]
    scores = {metric: decision["candidate_score"]} if decision.get("candidate_score") is not None else {}
    if decision.get("production_score") is not None:
        scores[f"baseline.{metric}"] = decision["production_score"]
    return scores


def decision_markdown(decision: dict, *, lower_is_better: bool = True) -> str:
    """The promotion decision as the paragraph a version's description ends with: the verdict, the metric
    with the candidate's and the Production version's scores, and the reason."""

    def score(value: float | None) -> str:
        return "none" if value is None else f"{value:.4f}"

    verdict = "promoted to Production" if decision["promoted"] else "not promoted (Production unchanged)"
    production = decision.get("production")
    baseline = (f"Production version {production}: {score(decision.get('production_score'))}" if production
                else "no Production version before it")
    return (f"{DECISION_HEADING}: {verdict}.\n\n"
            f"- {decision['metric']} ({'lower' if lower_is_better else 'higher'} is better): this version "
            f"{score(decision.get('candidate_score'))}; {baseline}\n"
            + (f"- Scored on: {decision['text']}\n" if decision.get("text") else "")
            + f"- Reason: {decision['reason']}")


def _describe_decision(client: MlflowClient, decision: dict, lower_is_better: bool) -> None:
    """Put the decision paragraph at the end of the candidate's description (replacing an earlier one)."""
    version = str(decision["candidate"])
    before = client.get_model_version(MODEL_NAME, version).description or ""
    kept = before.split(DECISION_HEADING, 1)[0].rstrip()
    paragraph = decision_markdown(decision, lower_is_better=lower_is_better)
    client.update_model_version(MODEL_NAME, version, description=f"{kept}\n\n{paragraph}" if kept else paragraph)


def compare_and_promote(
    candidate_version: str,
    candidate_score: float,
    production_score: float | None,
    *,
    metric: str,
    lower_is_better: bool = True,
    incomparable: str | None = None,
    text: str | None = None,
) -> dict:
    """Promote ``candidate_version`` if it scores strictly better than Production on ``metric``, or if
    there is no Production version yet (``decide``; ``incomparable`` says why the two scores cannot be
    compared, and then it is not promoted). Returns the decision: ``{promoted, candidate, production, metric,
    candidate_score, production_score, reason}`` and ``text``, what both were scored on; the candidate gets
    the tags ``promotion.score.<metric>`` (and ``promotion.score.baseline.<metric>``, Production's), and a
    rejected one ``promotion.promoted=false`` and ``promotion.reason``.

    A candidate is decided once: the decision is recorded on it (tag ``promotion.decision``) before it is
    carried out, and a later call for the same candidate (a rerun stage, a retried task) returns the
    recorded decision unchanged, whatever the scores now, after finishing a promotion that was interrupted.
    Raises RegistryError for a missing version.
    """
    candidate_version = str(candidate_version)
    client = registry_client()
    found = find_version(client, MODEL_NAME, candidate_version, alias=False)  # RegistryError if it is not there
    decided = _recorded_decision(client.get_model_version(MODEL_NAME, str(found.version)))
    if decided is not None:
        _finish_interrupted_promotion(client, decided)
        log.info("version %s was already decided (%s): keeping that decision", candidate_version, decided["reason"])
        return _with_production_now(decided)
    current = production_version()
    production = str(current.version) if current is not None else None
    promoted, reason = decide(candidate_version, candidate_score, production, production_score, metric=metric,
                              lower_is_better=lower_is_better, incomparable=incomparable)
    decision = {
        "promoted": promoted,
        "candidate": candidate_version,
        "production": production,
        "metric": metric,
        "candidate_score": None if candidate_score is None else float(candidate_score),
        "production_score": None if production_score is None else float(production_score),
        "reason": reason,
        **({"text": text} if text else {}),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if production == candidate_version:  # nothing was decided: it holds the tags of its own promotion
        log.info("kept Production %s: %s", production, reason)
        return decision
    client.set_model_version_tag(MODEL_NAME, candidate_version, DECISION_TAG, _tag_value(decision))
    _describe_decision(client, decision, lower_is_better)
    if promoted:
        promote(candidate_version, reason=reason, scores=_decision_scores(decision))
    else:
        scores = {f"promotion.score.{name}": repr(float(value)) for name, value in _decision_scores(decision).items()}
        for key, value in {"promotion.promoted": "false", "promotion.reason": reason, **scores}.items():
            client.set_model_version_tag(MODEL_NAME, candidate_version, key, _tag_value(value))
        log.info("kept Production %s: %s", production, reason)
    return decision


def promote_if_better(
    candidate_version: str,
    comparable: Mapping[str, Any],
    compare: Callable[[Path, str], dict[str, Any]],
    *,
    on_production_score: Callable[[str, float], None] | None = None,
) -> dict:
    """Decide whether ``candidate_version`` of ``gpt`` replaces Production, and carry it out: the evaluate stage's
    promotion. ``comparable`` is the candidate's score (``llm.training.evaluate.comparable_score``: ``metric``,
    ``score``, ``text``); ``compare(production_checkpoint, "Production version N")`` scores Production on the same
    text (``llm.training.evaluate.compare_with``). A decision recorded on the candidate before is kept, and a
    candidate that is Production already is left so; else ``compare_and_promote`` decides (lower is better).
    ``on_production_score(metric, score)`` hears Production's score when it was measured. Returns the decision.
    Raises RegistryError for a missing version."""
    version, metric, score = str(candidate_version), comparable["metric"], comparable["score"]
    current = production_version()
    if recorded_decision(version) is not None:  # decided once (a rerun, a retry): kept
        return compare_and_promote(version, score, None, metric=metric)
    if current is not None and str(current.version) == version:
        return {"promoted": False, "metric": metric, "candidate_score": score, "candidate": version,
                "reason": f"version {version} is already Production"}
    compared: dict[str, Any] = {"candidate_score": score, "text": comparable["text"]}
    if current is not None:
        production_dir = resolve_model(f"models:/{MODEL_NAME}/{current.version}")
        compared = compare(production_dir, f"Production version {current.version}")
        if compared.get("production_score") is not None and on_production_score is not None:
            on_production_score(metric, compared["production_score"])
    return compare_and_promote(version, compared.get("candidate_score", score), compared.get("production_score"),
                               metric=metric, lower_is_better=True, incomparable=compared.get("incomparable"),
                               text=compared.get("text", comparable["text"]))


def promote_by_hand(version: str, *, why: str = "") -> dict:
    """Promote ``version`` of ``gpt`` whatever the scores (``llm promote``): the decision recorded on it says
    it was promoted by hand, so a later evaluation of it keeps it. Returns that decision. Raises
    RegistryError for a missing version."""
    version = str(version)
    client = registry_client()
    find_version(client, MODEL_NAME, version, alias=False)
    current = production_version()
    reason = "promoted by hand (llm promote)" + (f": {why}" if why else "")
    decision = {"promoted": True, "candidate": version,
                "production": str(current.version) if current is not None else None,
                "metric": "by hand", "candidate_score": None, "production_score": None, "reason": reason,
                "time": datetime.now(UTC).isoformat(timespec="seconds")}
    client.set_model_version_tag(MODEL_NAME, version, DECISION_TAG, _tag_value(decision))
    _describe_decision(client, decision, True)
    promote(version, reason=reason, scores={})
    return decision


def _with_production_now(decision: dict) -> dict:
    """A recorded decision as returned again: when Production has changed since, its reason says which
    version is Production now (the recorded one names the Production of that time)."""
    current = production_version()
    now = str(current.version) if current is not None else None
    if now == decision.get("production") or now == str(decision.get("candidate")):
        return decision
    when = decision.get("time") or "earlier"
    return {**decision, "production_now": now,
            "reason": f"{decision['reason']} (decided {when}; Production is now version {now or 'none'})"}
