"""The ``evaluate`` flow: score a checkpoint into ``artifacts/eval`` and promote it if it beats Production."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import IO_TASK
from llm import stages
from llm.stages import Layout

# retried like I/O: scoring is deterministic, and the failures worth a retry are the registry's network calls
evaluate_task = task(stages.evaluate_stage, **IO_TASK)


@flow(name="evaluate")
def evaluate(overrides: Overrides = None, candidate: str = "pretrain", promote: bool = True) -> dict:
    """Evaluate ``artifacts/<candidate>`` with ``params/evaluate.yaml`` (plus ``overrides``).

    Writes ``metrics.json``, ``samples.md`` and ``promotion.json`` into ``artifacts/eval``; with ``promote``
    the candidate becomes Production when its bits per byte beat the current Production model's. Returns the
    metrics and the promotion decision.
    """
    layout = Layout()
    params = read_params("evaluate", overrides)
    return evaluate_task(params, layout.artifact(candidate), layout.artifact("tokens"), layout.artifact("clean"),
                         layout.artifact("eval"), promote=promote)
