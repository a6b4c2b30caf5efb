"""The ``evaluate`` flow: score a checkpoint into ``artifacts/eval`` and promote it if it beats Production."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import IO_TASK
from flows.reports import publish_evaluation
from llm import stages
from llm.stages import Layout

# retried like I/O: scoring is deterministic, and the failures worth a retry are the registry's network calls
evaluate_task = task(stages.evaluate_stage, **IO_TASK)


@flow(name="evaluate")
def evaluate(overrides: Overrides = None, candidate: str | None = None, promote: bool = True) -> dict:
    """Evaluate ``artifacts/<candidate>`` with ``params/evaluate.yaml`` (plus ``overrides``); the candidate is
    ``finetune`` when that folder exists, else ``pretrain``.

    Writes ``metrics.json``, ``samples.md`` and ``promotion.json`` into ``artifacts/eval``; with ``promote``
    the candidate becomes Production when it beats the current Production model (bits per byte for base
    models, held-out assistant-token loss for chat models). The scores and the decision are also a markdown
    artifact (key ``evaluation``) on the flow run in the Prefect UI. Returns the metrics and the promotion decision.
    """
    layout = Layout()
    params = read_params("evaluate", overrides)
    if candidate is None:
        candidate = "finetune" if (layout.artifact("finetune") / "config.json").exists() else "pretrain"
    result = evaluate_task(params, layout.artifact(candidate), layout.artifact("tokens"), layout.artifact("clean"),
                           layout.artifact("eval"), chat_dir=layout.artifact("chat"), promote=promote)
    publish_evaluation(result, str(layout.artifact(candidate)))
    return result
