"""The ``export`` flow: ONNX export of the chat model ``artifacts/finetune`` into ``artifacts/onnx``, with the
parity report, and with ``hf: true`` a Transformers folder ``artifacts/hf``; the flow fails when ONNX Runtime
or Transformers does not match PyTorch."""

from __future__ import annotations

from prefect import flow, task

from flows.params import Overrides, read_params
from flows.policies import TRAINING_TASK
from flows.reports import publish_parity
from llm import stages
from llm.stages import Layout

# not retried: an export that fails parity would fail the same way again
export_task = task(stages.export_stage, **TRAINING_TASK)


@flow(name="export")
def export(overrides: Overrides = None, checkpoint: str = "finetune") -> dict:
    """Export ``artifacts/<checkpoint>`` with ``params/export.yaml`` (plus ``overrides``) to ``artifacts/onnx``
    (and ``artifacts/hf``). Returns the export summary (files, opset, dynamic axes, parity), which is also a
    markdown artifact (key ``onnx-parity``) on the flow run in the Prefect UI."""
    layout = Layout()
    params = read_params("export", overrides)
    summary = export_task(params, layout.artifact(checkpoint), layout.artifact("onnx"), hf_dir=layout.artifact("hf"))
    publish_parity(summary)
    return summary
