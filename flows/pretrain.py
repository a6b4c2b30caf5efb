"""The ``pretrain`` flow: train the GPT on ``artifacts/tokens`` into the checkpoint folder ``artifacts/pretrain``."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import TRAINING_TASK
from llm import stages
from llm.stages import Layout

pretrain_task = task(stages.pretrain_stage, **TRAINING_TASK)


@flow(name="pretrain")
def pretrain(
    overrides: Overrides = None,
    model_overrides: Overrides = None,
    resume: bool = True,
    until_step: int | None = None,
    base_overrides: Overrides = None,
) -> dict:
    """Pretrain with ``params/pretrain.yaml`` and ``params/model.yaml`` (each with its overrides), from random
    weights or from the model that ``params/base.yaml`` names; its ``preset`` (a recipe in params/presets/)
    overrides both files' values.

    With ``resume`` a checkpoint already in ``artifacts/pretrain`` is continued exactly when it is of the same
    run (same data, tokenizer, code and params; another run starts over); ``until_step`` stops early, to be
    resumed later. Returns the final metrics, MLflow run id and registered model version.
    """
    layout = Layout()
    base = read_params("base", base_overrides)
    params = read_params("pretrain", overrides, preset=base.preset)
    model_config = read_params("model", model_overrides, preset=base.preset)
    return pretrain_task(params, model_config, layout.artifact("tokens"), layout.artifact("tokenizer"),
                         layout.artifact("pretrain"), resume=resume, until_step=until_step, base=base)
