"""The params files as flows take them: ``params/<name>.yaml`` plus a dict of overrides, validated.

A flow takes one overrides dict per params file it reads (``overrides`` for its own file, ``model_overrides``
for ``params/model.yaml``, ...) so a deployment run can change any key, and a bad key fails the run with the
file and key named (``llm.config.ParamsError``). An override changes only the keys it names:
``{"chat_data.max_turns": 3}`` and ``{"chat_data": {"max_turns": 3}}`` both keep the file's other ``chat_data``
keys. A params file that is missing fails the run too; it never stands for the defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from llm.config import (
    BaseParams,
    DataParams,
    EvalParams,
    ExportParams,
    FinetuneParams,
    ModelConfig,
    PretrainParams,
    TokenizerParams,
    load_params,
    read_preset,
)
from llm.stages import Layout

# params file name (params/<name>.yaml) -> the model that validates it; finetune and export go here too
PARAMS_MODELS: dict[str, type[BaseModel]] = {
    "data": DataParams,
    "tokenizer": TokenizerParams,
    "model": ModelConfig,
    "pretrain": PretrainParams,
    "finetune": FinetuneParams,
    "evaluate": EvalParams,
    "export": ExportParams,
    "base": BaseParams,
}

Overrides = dict[str, Any] | None


def read_params(name: str, overrides: Overrides = None, layout: Layout | None = None, *,
                preset: str | None = None) -> Any:
    """``params/<name>.yaml`` with the ``<name>`` section of the recipe ``params/presets/<preset>.yaml`` (the
    ``preset`` of params/base.yaml) and then ``overrides`` applied on top (``llm.config.apply_overrides``),
    validated by its pydantic model.

    Raises ParamsError naming the file when it is missing or holds a key twice, and the file and the key when
    a key is unknown or a value invalid.
    """
    layout = layout or Layout()
    return load_params(PARAMS_MODELS[name], layout.params / f"{name}.yaml", overrides,
                       preset=read_preset(layout.params, preset, name))
