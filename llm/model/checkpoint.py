"""Checkpoint folders: safetensors weights, JSON config, tokenizer files and an exact-resume train state.

Layout of a checkpoint folder::

    config.json          model config, tokenizer kind, step, metadata
    model.safetensors    weights (never pickle)
    tokenizer/           files written by Tokenizer.save
    train_state/         optimizer.safetensors + state.json (step, RNG states, data position, history); a
                         sharded run (strategy: fsdp) has sharded/ instead of the optimizer files: weights and
                         optimizer state as torch.distributed.checkpoint wrote them, one file per process
    manifest.json        size and sha256 of every file above, written last

A LoRA run's folder (an *adapter checkpoint*) holds ``adapter.safetensors`` (the adapters alone, ``llm.model.lora``)
and ``adapter_config.json`` (rank, alpha, dropout, targets, and its base: the base checkpoint's path and the
sha256 of its ``model.safetensors``) instead of ``model.safetensors``. ``load_checkpoint`` loads such a folder as
the base with the adapters merged in, refusing a base whose weights are not the ones it was trained on, so every
command that takes a checkpoint takes it unchanged; ``merge_checkpoint`` writes the merged model as a plain one.

This module is the only reader and writer of a checkpoint's ``config.json`` and ``manifest.json``: others read
them through ``CheckpointConfig`` (``verify_checkpoint``, ``peek_config``: the step, stage, params, run identity,
tracking run, parent) and ``Manifest`` (``read_manifest``: the weights' and tokenizer files' sha256), and
``has_checkpoint`` / ``copy_without_train_state`` answer for the folder as a whole.

A folder is written whole into a temporary sibling, synced, and swapped in by rename (``llm.io``), so a
crash leaves either the previous checkpoint or the new one, never a mix. ``manifest.json`` catches truncation
and corruption. Readers (``verify_checkpoint``, ``load_checkpoint``: chat, evaluation, serving) never modify
a folder: a crash between the two renames of a swap is put right by the next writer
(``recover_checkpoint_folder``, called by the training loop), and a reader that meets one says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llm.config import ModelConfig
from llm.io import (
    atomic_folder,
    atomic_write_json,
    atomic_write_text,
    give_default_mode,
    interrupted_swap,
    recover_interrupted_swap,
    remove_stale_temp_files,
    sha256_file,
)

if TYPE_CHECKING:
    from llm.data.tokenizer import Tokenizer
    from llm.model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_DIR = "train_state"
SHARDED_DIR = "sharded"  # in train_state/: a torch.distributed.checkpoint folder
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
TRACKING_RUN_KEY = "tracking_run_id"  # in config.json: the tracking run that trains the checkpoint (None: untracked)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the path."""


@dataclass
class TrainState:
    """Everything beyond the weights that exact resume needs."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    sharded: Path | None = None  # a torch.distributed.checkpoint folder (weights, optimizer) instead of ``optimizer``


class CheckpointConfig(dict):
    """A checkpoint's ``config.json`` as parsed (a dict, so old readers keep working), with typed accessors for
    the keys that code outside this module asks about. A key that an older checkpoint lacks reads as None."""

    @property
    def step(self) -> int | None:
        return self.get("step")

    @property
    def stage(self) -> str | None:
        """``pretrain`` or ``finetune`` (None for a checkpoint written outside a training stage)."""
        return self.get("stage")

    @property
    def max_steps(self) -> int | None:
        return (self.get("params") or {}).get("max_steps")

    @property
    def model(self) -> dict[str, Any]:
        return self.get("model") or {}

    @property
    def tokenizer(self) -> dict[str, Any]:
        """``{"kind", "vocab_size"}`` of the checkpoint's tokenizer."""
        return self.get("tokenizer") or {}

    @property
    def run_identity(self) -> str | None:
        """The digest of the run that wrote it (``llm.training.loop.run_identity``)."""
        return self.get("run_identity")

    @property
    def identity(self) -> dict[str, Any] | None:
        return self.get("identity")

    @property
    def tracking_run_id(self) -> str | None:
        return self.get(TRACKING_RUN_KEY) or None

    @property
    def parent_path(self) -> Path | None:
        """The base checkpoint a finetuned one was trained from."""
        parent = self.get("parent") or {}
        return Path(parent["path"]) if parent.get("path") else None


class Manifest(dict):
    """A checkpoint's ``manifest.json``: ``{relative path: {"bytes", "sha256"}}`` of every file it holds."""

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the weights: ``adapter.safetensors`` in an adapter checkpoint, else ``model.safetensors``."""
        entry = self.get(ADAPTER_FILE if ADAPTER_FILE in self else WEIGHTS_FILE) or {}
        return entry.get("sha256")

    @property
    def plain_weights_sha256(self) -> str | None:
        """The sha256 of ``model.safetensors`` (None in an adapter checkpoint)."""
        return (self.get(WEIGHTS_FILE) or {}).get("sha256")

    @property
    def tokenizer_sha256(self) -> dict[str, str]:
        """The sha256 of each tokenizer file, by its path inside ``tokenizer/``."""
        prefix = f"{TOKENIZER_DIR}/"
        return {k.removeprefix(prefix): v["sha256"] for k, v in sorted(self.items()) if k.startswith(prefix)}


def read_manifest(path: str | Path) -> Manifest:
    """The ``manifest.json`` of the checkpoint folder ``path`` (not checked against the files: see
    ``verify_checkpoint``). Raises CheckpointError naming the file when it is missing or unreadable."""
    file = Path(path) / MANIFEST_FILE
    try:
        return Manifest(json.loads(file.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable: {err}") from None


def peek_config(path: str | Path) -> CheckpointConfig:
    """The ``config.json`` of ``path`` without verifying the folder, empty when there is none or it is unreadable
    (for what a caller logs before training, which says itself what is wrong with a folder)."""
    try:
        return CheckpointConfig(json.loads((Path(path) / CONFIG_FILE).read_text()))
    except (OSError, ValueError):
        return CheckpointConfig()


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds (part of) a checkpoint: its ``config.json`` or its ``manifest.json``."""
    return (Path(path) / CONFIG_FILE).exists() or (Path(path) / MANIFEST_FILE).exists()


def copy_without_train_state(path: str | Path, dst: str | Path) -> Path:
    """Copy the checkpoint folder ``path`` to ``dst`` without ``train_state/`` (and hidden files), its manifest
    rewritten to match: what a registered version carries. Returns ``dst``."""
    shutil.copytree(path, dst, ignore=shutil.ignore_patterns(TRAIN_STATE_DIR, ".*"))
    manifest = read_manifest(dst)
    _write_json(Path(dst) / MANIFEST_FILE, {k: v for k, v in manifest.items()
                                            if not k.startswith(f"{TRAIN_STATE_DIR}/")})
    return Path(dst)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, sort_keys=True)


def _optimizer_to_files(state_dict: dict[str, Any], folder: Path) -> None:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON): no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    give_default_mode(folder / "optimizer.safetensors")
    _write_json(folder / "optimizer.json", {"param_groups": state_dict["param_groups"], "scalars": scalars})


def _optimizer_from_files(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    model_config: ModelConfig,
    tokenizer: Any,
    *,
    train_state: TrainState | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically and return the path.

    ``weights`` stand for ``model``'s own tensors (a sharded model's, gathered whole). ``train_state.sharded``
    names a folder written by ``torch.distributed.checkpoint``: it is moved into ``train_state/sharded``.

    ``tokenizer`` is any object with ``kind`` and ``save(folder)``. ``extra_files`` maps file names to text
    written beside the checkpoint (metrics, curves), so they are swapped in together with the weights.
    ``metadata["adapter"]`` (a LoRA run: its ``lora`` settings and ``base`` identity) makes it an adapter
    checkpoint: the model's adapters go to ``adapter.safetensors`` and that entry to ``adapter_config.json``.
    An existing folder at ``path`` is replaced only after the new one is complete and on disk.
    Raises CheckpointError, writing nothing, when a weight is NaN or infinite.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    adapter = metadata.pop("adapter", None)
    state = _adapter_tensors(model) if adapter is not None else weights or _weight_tensors(model)
    non_finite = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if non_finite:
        raise CheckpointError(f"{path}: not written: weights {', '.join(non_finite[:5])} hold NaN or infinite values")
    with atomic_folder(path) as tmp:
        if adapter is not None:
            save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "llm-lora"})
            give_default_mode(tmp / ADAPTER_FILE)  # safetensors writes 0600; every other file is 0644
            _write_json(tmp / ADAPTER_CONFIG_FILE, adapter)
        else:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "llm"})
            give_default_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600; every other file is 0644
        tokenizer.save(tmp / TOKENIZER_DIR)
        config = {
            "format_version": FORMAT_VERSION,
            "model": model_config.model_dump(),
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            **metadata,
        }
        _write_json(tmp / CONFIG_FILE, config)
        if train_state is not None:
            ts = tmp / TRAIN_STATE_DIR
            ts.mkdir()
            if train_state.sharded is not None:
                Path(train_state.sharded).rename(ts / SHARDED_DIR)
            else:
                _optimizer_to_files(train_state.optimizer, ts)
            save_file({k: v.cpu() for k, v in train_state.rng.items()}, str(ts / "rng.safetensors"))
            give_default_mode(ts / "rng.safetensors")
            _write_json(ts / "state.json", {"step": train_state.step, **train_state.extra})
        for name, text in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
        _write_json(tmp / MANIFEST_FILE, manifest)
    return path


def _weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.state_dict()``, each storage once: safetensors refuses tensors that share it (tied)."""
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen[ptr] = name
        state[name] = tensor.detach().cpu().contiguous()
    return state


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from llm.model.lora import adapter_state, has_adapters

    if not has_adapters(model):
        raise CheckpointError("an adapter checkpoint was asked for a model without adapters (llm.model.lora)")
    return adapter_state(model)


def verify_checkpoint(path: str | Path) -> CheckpointConfig:
    """Check every file against ``manifest.json``; return the parsed ``config.json``.

    Reads only. Raises CheckpointError naming the folder and the first missing, truncated or altered file,
    and when a crash between the two renames of a checkpoint write left the previous checkpoint aside.
    """
    path = Path(path)
    aside = interrupted_swap(path)
    if aside is not None:
        raise CheckpointError(
            f"{path}: a checkpoint write was interrupted between its two renames and left the previous checkpoint "
            f"at {aside}; run the training that writes it again (`llm pretrain`, `llm finetune` or `dvc repro`: it "
            f"puts it back and resumes), or put it back yourself: mv {aside} {path}"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder here (train one first, e.g. `llm pretrain`)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: not a complete checkpoint ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: corrupt manifest: {err}") from None
    for rel, entry in manifest.items():
        file = path / rel
        if not file.exists():
            raise CheckpointError(f"{file}: missing from checkpoint")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: truncated or altered ({size} bytes, expected {entry['bytes']})")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: contents do not match the manifest checksum (corrupt)")
    try:
        return CheckpointConfig(json.loads((path / CONFIG_FILE).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable: {err}") from None


def recover_checkpoint_folder(path: str | Path) -> bool:
    """For the writer of the checkpoint folder ``path`` only (the training loop, before it resumes or writes):
    put back the checkpoint that a crash between the two renames of a write left aside, and delete the
    temporary folders of writes that were killed. Returns True when a checkpoint was put back."""
    path = Path(path)
    remove_stale_temp_files(path)
    return recover_interrupted_swap(path)


def load_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a checkpoint folder (verifies the folder first)."""
    return ModelConfig.model_validate(verify_checkpoint(path)["model"])


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` from a checkpoint folder into ``model`` (strict, tied weights restored); from
    an adapter checkpoint, its ``adapter.safetensors`` into the adapters of ``model`` (which must have the same).
    Raises CheckpointError naming the file when it is unreadable or its tensors do not match the model."""
    if (Path(path) / ADAPTER_FILE).is_file():
        _load_adapter_weights(Path(path) / ADAPTER_FILE, model)
        return
    file = Path(path) / WEIGHTS_FILE
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: cannot read weights: {err}") from None
    own = model.state_dict()
    # restore names dropped at save time because they shared storage with another tensor
    stored_name = {t.data_ptr(): n for n, t in own.items() if n in state}
    for name, tensor in own.items():
        if name not in state and tensor.data_ptr() in stored_name:
            state[name] = state[stored_name[tensor.data_ptr()]]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.load_state_dict(state)


def _load_adapter_weights(file: Path, model: torch.nn.Module) -> None:
    from llm.model.lora import has_adapters, load_adapter_state

    if not has_adapters(model):
        raise CheckpointError(f"{file}: an adapter checkpoint (LoRA), but the model has no adapters to load it into")
    try:
        load_adapter_state(model, load_file(str(file)), str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(str(err) if isinstance(err, ValueError) else f"{file}: cannot read: {err}") from None


def read_adapter_config(path: str | Path) -> dict[str, Any] | None:
    """``adapter_config.json`` of a checkpoint folder (``lora`` settings, ``base`` identity), None for a plain
    checkpoint. Raises CheckpointError when it is unreadable."""
    file = Path(path) / ADAPTER_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable: {err}") from None


def base_identity(base: str | Path) -> dict[str, str]:
    """What an adapter checkpoint records of its base: its absolute path and the sha256 of its weights (from its
    manifest). Raises CheckpointError for a folder that is not a plain, verified checkpoint."""
    base = Path(base)
    verify_checkpoint(base)
    weights_sha256 = read_manifest(base).plain_weights_sha256
    if weights_sha256 is None:
        raise CheckpointError(f"{base}: an adapter checkpoint cannot be the base of another; merge it first "
                              f"(`llm merge --model {base} --out DIR`) and train on DIR")
    return {"path": str(base.resolve()), "weights_sha256": weights_sha256}


def check_adapter_base(adapter_dir: str | Path, base: str | Path) -> None:
    """Refuse to put the adapters of ``adapter_dir`` on ``base`` unless its weights are the ones they were trained
    on. Raises CheckpointError naming both folders and both hashes."""
    recorded = (read_adapter_config(adapter_dir) or {}).get("base", {})
    if not Path(base).is_dir():
        raise CheckpointError(f"{adapter_dir}: its base checkpoint {base} is not there (weights sha256 "
                              f"{recorded.get('weights_sha256')}); put it back, or merge the adapter where it is")
    found = base_identity(base)["weights_sha256"]
    if found != recorded.get("weights_sha256"):
        raise CheckpointError(
            f"{adapter_dir}: its adapters were trained on a base whose weights have sha256 "
            f"{recorded.get('weights_sha256')} (at {recorded.get('path')}), but {base} holds weights with sha256 "
            f"{found}: refused, as the adapters mean nothing on another base")


def load_train_state(path: str | Path) -> TrainState:
    """Read ``train_state/`` of a checkpoint folder. Raises CheckpointError if absent or unreadable."""
    folder = Path(path) / TRAIN_STATE_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no train state in this checkpoint, so it cannot be resumed")
    try:
        meta = json.loads((folder / "state.json").read_text())
        sharded = folder / SHARDED_DIR if (folder / SHARDED_DIR).is_dir() else None
        optimizer = _optimizer_from_files(folder) if sharded is None else {}
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder}: unreadable train state: {err}") from None
    step = meta.pop("step")
    return TrainState(step=step, optimizer=optimizer, rng=rng, extra=meta, sharded=sharded)


class LoadedCheckpoint(NamedTuple):
    """A checkpoint folder as ``load_checkpoint`` returns it."""

    model: GPT  # in eval mode
    tokenizer: Tokenizer
    config: CheckpointConfig  # config.json


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    base: str | Path | None = None) -> LoadedCheckpoint:
    """Load a checkpoint folder: returns ``(model, tokenizer, config_dict)`` with the model in eval mode.

    An adapter checkpoint loads as its base (``base``, else the path it records) with the adapters merged in: a
    plain GPT. Raises CheckpointError for a missing, truncated or corrupt folder, and for a base that is missing or
    is not the one the adapters were trained on.
    """
    from llm.data.tokenizer import load_tokenizer
    from llm.model.gpt import GPT

    path = Path(path)
    config = verify_checkpoint(path)
    model_config = ModelConfig.model_validate(config["model"])
    model = GPT(model_config)
    adapter = read_adapter_config(path)
    if adapter is not None:
        _load_merged(path, model, adapter, Path(base) if base is not None else Path(adapter["base"]["path"]))
    else:
        load_weights(path, model)
    model.to(device).eval()
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    return LoadedCheckpoint(model, tokenizer, config)


def _load_merged(path: Path, model: GPT, adapter: dict[str, Any], base: Path) -> None:
    """Load ``base``'s weights into ``model``, the adapters of ``path`` on top, and merge them (in place)."""
    from llm.config import LoRAParams
    from llm.model.lora import apply_lora, merge_lora

    check_adapter_base(path, base)
    load_weights(base, model)
    apply_lora(model, LoRAParams.model_validate(adapter["lora"]))
    load_weights(path, model)
    merge_lora(model)


def merge_checkpoint(adapter_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None) -> Path:
    """Write the adapter checkpoint ``adapter_dir`` merged into its base as a plain checkpoint folder ``out_dir``
    (no train state; ``config.json`` keeps the run's metadata and adds ``merged_from``). Returns ``out_dir``.
    Raises CheckpointError as ``load_checkpoint`` does, and for a folder that holds no adapters."""
    adapter = read_adapter_config(adapter_dir)
    if adapter is None:
        raise CheckpointError(f"{adapter_dir}: not an adapter checkpoint (no {ADAPTER_CONFIG_FILE}): nothing to merge")
    model, tokenizer, config = load_checkpoint(adapter_dir, base=base)
    kept = {k: v for k, v in config.items() if k not in ("format_version", "model", "tokenizer", "run_identity",
                                                          "identity")}
    merged_from = {"path": str(Path(adapter_dir).resolve()), **adapter}
    return save_checkpoint(out_dir, model, model.config, tokenizer, metadata={**kept, "merged_from": merged_from})
