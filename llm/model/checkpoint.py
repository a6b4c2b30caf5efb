"""Checkpoint folders: safetensors weights, JSON config, tokenizer files and an exact-resume train state.

Layout of a checkpoint folder::

    config.json          model config, tokenizer kind, step, metadata
    model.safetensors    weights (never pickle)
    tokenizer/           files written by Tokenizer.save
    train_state/         optimizer.safetensors + state.json (step, RNG states, data position, history)
    manifest.json        size and sha256 of every file above, written last

A folder is written whole into a temporary sibling, synced, and swapped in by rename (``llm.io``), so a
crash leaves either the previous checkpoint or the new one, never a mix. ``manifest.json`` catches truncation
and corruption. Readers (``verify_checkpoint``, ``load_checkpoint``: chat, evaluation, serving) never modify
a folder: a crash between the two renames of a swap is put right by the next writer
(``recover_checkpoint_folder``, called by the training loop), and a reader that meets one says so.
"""

from __future__ import annotations

import json
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
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_DIR = "train_state"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the path."""


@dataclass
class TrainState:
    """Everything beyond the weights that exact resume needs."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


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
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically and return the path.

    ``tokenizer`` is any object with ``kind`` and ``save(folder)``. ``extra_files`` maps file names to text
    written beside the checkpoint (metrics, curves), so they are swapped in together with the weights.
    An existing folder at ``path`` is replaced only after the new one is complete and on disk.
    Raises CheckpointError, writing nothing, when a weight is NaN or infinite.
    """
    path = Path(path)
    # tied weights share storage; safetensors refuses shared tensors, so store each name once
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen[ptr] = name
        state[name] = tensor.detach().cpu().contiguous()
    non_finite = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if non_finite:
        raise CheckpointError(f"{path}: not written: weights {', '.join(non_finite[:5])} hold NaN or infinite values")
    with atomic_folder(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "llm"})
        tokenizer.save(tmp / TOKENIZER_DIR)
        config = {
            "format_version": FORMAT_VERSION,
            "model": model_config.model_dump(),
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            **(metadata or {}),
        }
        _write_json(tmp / CONFIG_FILE, config)
        if train_state is not None:
            ts = tmp / TRAIN_STATE_DIR
            ts.mkdir()
            _optimizer_to_files(train_state.optimizer, ts)
            save_file({k: v.cpu() for k, v in train_state.rng.items()}, str(ts / "rng.safetensors"))
            _write_json(ts / "state.json", {"step": train_state.step, **train_state.extra})
        for name, text in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, text)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
        _write_json(tmp / MANIFEST_FILE, manifest)
    return path


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
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
        return json.loads((path / CONFIG_FILE).read_text())
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
    """Load ``model.safetensors`` from a checkpoint folder into ``model`` (strict, tied weights restored)."""
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


def load_train_state(path: str | Path) -> TrainState:
    """Read ``train_state/`` of a checkpoint folder. Raises CheckpointError if absent or unreadable."""
    folder = Path(path) / TRAIN_STATE_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no train state in this checkpoint, so it cannot be resumed")
    try:
        meta = json.loads((folder / "state.json").read_text())
        optimizer = _optimizer_from_files(folder)
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder}: unreadable train state: {err}") from None
    step = meta.pop("step")
    return TrainState(step=step, optimizer=optimizer, rng=rng, extra=meta)


class LoadedCheckpoint(NamedTuple):
    """A checkpoint folder as ``load_checkpoint`` returns it."""

    model: GPT  # in eval mode
    tokenizer: Tokenizer
    config: dict[str, Any]  # config.json


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint folder: returns ``(model, tokenizer, config_dict)`` with the model in eval mode.

    Raises CheckpointError for a missing, truncated or corrupt folder.
    """
    from llm.data.tokenizer import load_tokenizer
    from llm.model.gpt import GPT

    path = Path(path)
    config = verify_checkpoint(path)
    model_config = ModelConfig.model_validate(config["model"])
    model = GPT(model_config)
    load_weights(path, model)
    model.to(device).eval()
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    return LoadedCheckpoint(model, tokenizer, config)
