"""Prefect flows: the pipeline stages as flows of tasks that call ``llm.stages``, and nothing more.

One flow per stage (``fetch``, ``clean``, ``tokenizer``, ``tokenize``, ``pretrain``, ``evaluate``), plus
``prepare`` (clean, tokenizer, tokenize) and ``pipeline`` (prepare, pretrain, evaluate). The model and data
logic live in ``llm``; a flow reads its params file with the overrides it was given, then calls the stage.
Paths are those of ``llm.stages.Layout`` relative to the working directory, which is the project root.

Four ways in: ``python -m flows <flow> --set key=value`` runs one flow in this process (``dvc repro`` does
this), ``python -m flows.deployments`` serves every flow as a deployment ``<flow>/<flow>``, ``python -m flows.work_pool
--pool NAME`` deploys them to a work pool as ``<flow>/<NAME>`` for workers on other machines, and the functions
can be called from Python like any Prefect flow. Without PREFECT_API_URL the runs go to the pipeline's own local
Prefect server (``python -m flows server status|stop``, flows/prefect_server.py).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect import Flow

# The library logs through the standard ``logging`` module under ``llm``; this makes Prefect attach its
# handlers to that logger, so its records (stage summaries, training progress) reach the flow run's logs in
# the UI. It must be set before Prefect configures logging (on import), hence here.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llm")
# no usage reports to the outside: the pipeline runs offline and on private data
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Every flow run of the project sends a heartbeat this often (Prefect's default is 180 s), whoever starts it
# (`dvc repro`, `flows.deployments`, a work pool's worker): the automation that `python -m flows.work_pool` creates on a
# server marks a run CRASHED when its heartbeats stop for 90 s, and with 180 s between them a stage that
# trains for longer than 270 s on that server would be marked crashed while it runs.
HEARTBEAT_SECONDS = 30  # Prefect sends none more often (flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
logging.getLogger("llm").setLevel(logging.INFO)


def all_flows() -> dict[str, Flow]:
    """Every flow of the project by name, in pipeline order."""
    from flows.data import clean, fetch, prepare, tokenize, tokenizer
    from flows.evaluate import evaluate
    from flows.export import export
    from flows.finetune import finetune
    from flows.pipeline import pipeline
    from flows.pretrain import pretrain

    return {f.name: f for f in (fetch, clean, tokenizer, tokenize, prepare, pretrain, finetune, evaluate, export,
                                pipeline)}
