"""The ``finetune`` flow: chat data (``data/chat/*.jsonl`` or derived from the plays) and supervised finetuning
of ``artifacts/pretrain`` into the chat model ``artifacts/finetune``."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import TRAINING_TASK
from llm import stages
from llm.stages import Layout

finetune_task = task(stages.finetune_stage, **TRAINING_TASK)


@flow(name="finetune")
def finetune(overrides: Overrides = None, resume: bool = True, until_step: int | None = None) -> dict:
    """Finetune with ``params/finetune.yaml`` (plus ``overrides``). Chat data is validated from ``data/chat``
    when present, else derived from the cleaned plays, into ``artifacts/chat``. Returns the final metrics,
    MLflow run id and registered model version (tagged finetuned, with its parent pretraining run).
    """
    layout = Layout()
    params = read_params("finetune", overrides)
    return finetune_task(params, layout.artifact("pretrain"), layout.artifact("clean"), layout.chat_data,
                         layout.artifact("chat"), layout.artifact("finetune"), resume=resume, until_step=until_step)
