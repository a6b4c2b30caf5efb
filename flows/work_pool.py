"""Deploy every flow to a Prefect work pool, as ``<flow>/<pool>``, for workers on the machines that hold the data.

    prefect work-pool create gpu --type process                 # once
    python -m flows.work_pool --pool gpu --working-dir /srv/llm    # deployments pretrain/gpu, pipeline/gpu, ...
    prefect worker start --pool gpu --type process --limit 1    # on the machine with /srv/llm (and its data)
    prefect deployment run pretrain/gpu --param overrides='{"max_steps": 2000}'

A worker runs each flow run in a subprocess of its own, with the worker's Python, in ``--working-dir`` (default:
the folder this command runs in), the project checkout on the worker's machine: the flows are imported from it by
module path (``flows.pretrain.pretrain``), so no image and no code upload is needed, and the stages read and
write ``data/``, ``params/`` and ``artifacts/`` there. ``--limit 1`` runs one flow run at a time, as
``flows.deployments`` does: every stage writes a fixed folder under ``artifacts/``.

A machine that dies (or a worker killed with its flow run) leaves the run RUNNING: nothing is left to report its
end. So flow runs of these deployments send a heartbeat every 30 s (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, whose
minimum is 30; ``flows`` sets it for every run of the project, the stages of ``dvc repro`` too), and this
command also creates the automation of Prefect's "detect zombie flows" guide: a run whose heartbeats stop for
``--crash-after`` seconds is marked CRASHED. Running its deployment again resumes
training from the stage's last checkpoint in ``artifacts/``.

Without ``PREFECT_API_URL`` the deployments go to the pipeline's local server (``flows/prefect_server.py``), for workers
on this machine; for other machines, run ``prefect server start --host 0.0.0.0`` where they can reach it and set
``PREFECT_API_URL`` here and on every worker.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated
from uuid import UUID

import typer

from flows import HEARTBEAT_SECONDS, all_flows

CRASH_AUTOMATION = "llm: crash flow runs whose heartbeats stopped"


def pool_deployments(pool: str, working_dir: Path, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> list:
    """The deployment ``<flow>/<pool>`` of every flow (``RunnerDeployment`` objects, not yet sent to the API): run
    by ``pool``'s workers in ``working_dir``, importing the flow by module path, with heartbeats."""
    from prefect.deployments.runner import EntrypointType

    # the llm logger's records (training progress, "resuming from ... at step N") belong in the run's logs
    job_variables = {"working_dir": str(working_dir),
                     "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds),
                             "PREFECT_LOGGING_EXTRA_LOGGERS": "llm"}}
    return [flow.to_deployment(name=pool, entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool,
                               job_variables=job_variables)
            for flow in all_flows().values()]


def deploy_flows(pool: str, working_dir: Path, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> list[UUID]:
    """Create or update ``pool_deployments(...)`` in the Prefect API; returns the deployment ids.

    Raises ValueError (from Prefect) when the work pool does not exist.
    """
    from prefect import deploy

    return deploy(*pool_deployments(pool, working_dir, heartbeat_seconds), work_pool_name=pool, build=False,
                  push=False, print_next_steps_message=False, ignore_warnings=True)


def ensure_crash_automation(crash_after_s: float) -> UUID:
    """Create (or update) the automation that marks a flow run CRASHED when it has sent a heartbeat and then
    none for ``crash_after_s`` seconds, the way Prefect's guide "detect zombie flows" does; returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    wanted = Automation(
        name=CRASH_AUTOMATION,
        description="A flow run whose heartbeats stopped (machine or worker died) is marked CRASHED.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {crash_after_s:.0f} s: the machine or its worker "
                                            "died; run the deployment again to resume from the checkpoint")],
    )
    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:  # Prefect's "not found"
        return wanted.create().id
    updated = wanted.model_copy(update={"id": existing.id})
    updated.update()
    return existing.id


def main(
    pool: Annotated[str, typer.Option(help="the work pool (create it first: prefect work-pool create NAME "
                                           "--type process)")],
    working_dir: Annotated[Path | None, typer.Option(
        help="the project folder on the workers' machines (default: this folder)")] = None,
    crash_after: Annotated[float, typer.Option(
        min=2 * HEARTBEAT_SECONDS, help="seconds without a heartbeat after which a flow run is marked crashed")] = 90,
) -> None:
    """Deploy every flow to POOL as <flow>/<pool> and create the automation that marks dead runs crashed."""
    from flows.prefect_server import ServerError, pipeline_api

    try:
        with pipeline_api() as local_api:
            ids = deploy_flows(pool, (working_dir or Path.cwd()).resolve())
            ensure_crash_automation(crash_after)
    except (ServerError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"deployed {len(ids)} flows to work pool {pool!r}: " + ", ".join(f"{name}/{pool}" for name in
                                                                                 all_flows()))
    if local_api:
        typer.echo(f"on the pipeline's local server: export PREFECT_API_URL={local_api} for the worker and "
                   "`prefect deployment run`")


if __name__ == "__main__":
    typer.run(main)
