"""Serve every flow as a Prefect deployment named after it: ``pretrain/pretrain``, ``pipeline/pipeline``, ...

    export PREFECT_API_URL=$(python -m flows server start)   # the pipeline's server, or any Prefect server
    python -m flows.deployments                                     # in the project root: waits for runs
    prefect deployment run pretrain/pretrain --param overrides='{"max_steps": 50}'

Runs execute on this machine, in the directory this process was started from (the project root). For workers
on other machines, deploy to a work pool instead: ``python -m flows.work_pool`` (flows/work_pool.py).
"""

from __future__ import annotations

import typer
from prefect import serve

from flows import all_flows


def main() -> None:
    """Serve every flow as a deployment <flow>/<flow> (pretrain/pretrain, pipeline/pipeline, ...) on the Prefect
    server of PREFECT_API_URL, and run them here, in this folder, one flow run at a time, until Ctrl-C.
    Then: prefect deployment run pretrain/pretrain --param overrides='{"max_steps": 50}'"""
    deployments = [f.to_deployment(name=f.name) for f in all_flows().values()]
    # One run at a time: every stage writes a fixed folder under artifacts/, so two runs would overwrite
    # each other's outputs; later runs wait in the queue.
    serve(*deployments, limit=1)


if __name__ == "__main__":
    typer.run(main)  # --help prints the above and serves nothing
