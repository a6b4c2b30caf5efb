"""``python -m flows <flow> [--set [file:]key=value ...] [--param name=value ...]``: run one flow in this process.

This is the command of every ``dvc.yaml`` stage. ``--set`` overrides a key of a params file, like
``dvc exp run -S``: a bare ``key`` is in the flow's own file (``params/pretrain.yaml`` for ``pretrain``),
``model:n_layer=2`` or ``params/model.yaml:n_layer=2`` names the file. ``--param`` sets any other flow
parameter, like ``prefect deployment run --param``. Values are read as YAML (``5``, ``true``, ``null``,
``[a, b]``). A dotted key (``finetune:chat_data.max_turns=3``) or a mapping value (``chat_data={max_turns: 3}``)
changes only the keys it names, keeping the file's other keys. An empty value (``--set max_steps=``) overrides
nothing, so wrappers such as ``MLproject`` can pass optional settings through.

With ``PREFECT_API_URL`` set the run is recorded by that Prefect server; without it, by the pipeline's own local
server, started on first use and shared by every later stage (``python -m flows server status|stop``, see
``flows/prefect_server.py``). A training stopped by SIGINT or SIGTERM exits with 130 or 143 and one line saying where
its checkpoint is and how to resume.

Under ``dvc repro`` (``DVC_STAGE`` is set) the stage stops itself, as on SIGTERM, when dvc dies, so a killed
``dvc repro`` leaves no stage running on without it.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from flows import all_flows
from flows.params import PARAMS_MODELS
from llm.config import ParamsError, apply_overrides, check_until_step, parse_yaml
from llm.stages import stage_modules

# the params file that a bare ``--set key=value`` refers to, for flows that have one of their own
OWN_PARAMS_FILE = {"clean": "data", "tokenizer": "tokenizer", "pretrain": "pretrain", "finetune": "finetune",
                   "evaluate": "evaluate", "export": "export"}

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def _split_assignment(item: str, option: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise typer.BadParameter(f"{option} {item!r}: expected name=value")
    return name.strip(), value


def _yaml_value(text: str, where: str) -> Any:
    try:
        return parse_yaml(text, where)
    except ParamsError as err:
        raise typer.BadParameter(str(err)) from None


def _params_file(spec: str) -> str:
    """``pretrain`` or ``params/pretrain.yaml`` -> ``pretrain``."""
    name = Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec
    if name not in PARAMS_MODELS:
        raise typer.BadParameter(f"--set: unknown params file {spec!r}; known: {', '.join(PARAMS_MODELS)}")
    return name


def flow_arguments(flow_name: str, sets: list[str], params: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``flow_name`` that ``--set`` and ``--param`` options describe."""
    accepted = inspect.signature(all_flows()[flow_name].fn).parameters
    arguments: dict[str, Any] = {}
    for item in params:
        name, value = _split_assignment(item, "--param")
        if name not in accepted:
            raise typer.BadParameter(f"--param {item!r}: the {flow_name} flow takes {', '.join(accepted) or 'none'}")
        arguments[name] = _yaml_value(value, f"--param {item}")
        if name == "until_step":  # refused now, before Prefect starts the run
            try:
                check_until_step(arguments[name])
            except ParamsError as err:
                raise typer.BadParameter(f"--param {item!r}: {err}") from None
    for item in sets:
        target, value = _split_assignment(item, "--set")
        if value == "":
            continue
        file_spec, _, key = target.rpartition(":")
        if file_spec:
            file_name = _params_file(file_spec)
        elif flow_name in OWN_PARAMS_FILE:
            file_name = OWN_PARAMS_FILE[flow_name]
        else:
            raise typer.BadParameter(f"--set {item!r}: the {flow_name} flow reads several params files; name one, "
                                     f"e.g. --set pretrain:{key}=...")
        argument = "overrides" if OWN_PARAMS_FILE.get(flow_name) == file_name else f"{file_name}_overrides"
        if argument not in accepted:
            raise typer.BadParameter(f"--set {item!r}: the {flow_name} flow does not read params/{file_name}.yaml")
        # merged as they come (a later item wins); load_params then changes only the keys they name
        try:
            arguments[argument] = apply_overrides(arguments.get(argument) or {},
                                                  {key: _yaml_value(value, f"--set {item}")}, f"--set {item}")
        except ParamsError as err:
            raise typer.BadParameter(str(err)) from None
    return arguments


# the shells dvc may run a stage's command in (``$SHELL -c``, else ``/bin/sh -c``); dash stays as the parent
_SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"})


def stage_launcher() -> psutil.Process | None:
    """The process that started this stage: the first ancestor that is not the shell running its command.

    Under ``dvc repro`` that is dvc. ``None`` when the chain is already broken (an ancestor has exited).
    """
    try:
        process = psutil.Process().parent()
        while process is not None and process.name() in _SHELLS:
            process = process.parent()
    except psutil.NoSuchProcess:
        return None
    return process


def _alive(process: psutil.Process) -> bool:
    try:  # is_running() compares the start time too, so a reused pid does not count as alive
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_when_parent_dies(poll_s: float = 1.0) -> threading.Thread | None:
    """Send this process SIGTERM (the signal for "checkpoint and stop") once the process that launched it is gone.

    A SIGKILL of ``dvc repro`` kills dvc alone; the stage it started would train on for hours, unseen, with its
    result thrown away. The launcher is dvc itself, not the shell between: ``/bin/sh -c`` (dash) waits for its
    command, so it outlives dvc. Returns the daemon thread that watches, or ``None`` when the launcher was gone
    before this process got here (the SIGTERM is then sent at once).
    """
    launcher = stage_launcher()
    if launcher is None or launcher.pid == 1 or not _alive(launcher):  # already reparented to init
        os.kill(os.getpid(), signal.SIGTERM)
        return None

    def watch() -> None:
        while _alive(launcher):
            time.sleep(poll_s)
        typer.secho(f"the process that started this stage ({launcher.pid}, dvc) is gone: stopping this stage",
                    fg="yellow", err=True)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, name="stop-when-parent-dies", daemon=True)
    watcher.start()
    return watcher


# Garbage collection. A stage's start-up imports Prefect, and the stage MLflow and torch: millions of objects that
# live as long as the process. The collector would walk them again and again while they are imported, and once more
# at exit (about 2 s at the end of every stage; bench/stage_overhead.py measures it). So `python -m flows` starts up
# with the collector off, imports the modules that the stage will, freezes every object so far (gc.freeze: left out
# of all later collections) and turns the collector on for the flow run; at exit it freezes everything again.
def finish_start_up(flow_name: str) -> None:
    """In a ``python -m flows`` process, which starts up with the collector off: import the modules that the stage
    ``flow_name`` imports when it runs (``llm.stages.stage_modules``), freeze every object so far and turn the
    collector on. Does nothing when the collector is on (``main`` called from Python, as the tests do).

    A module that fails to import is left for the stage, which imports it inside its flow run, where the error is
    reported and recorded.
    """
    if gc.isenabled():
        return
    for module in stage_modules(flow_name):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the stage raises it again, inside the flow run
            continue
    gc.freeze()
    gc.enable()


@app.command(help=__doc__.partition("\n\n")[2])
def main(
    flow: Annotated[str, typer.Argument(help="the flow to run: fetch, clean, tokenizer, tokenize, prepare, "
                                             "pretrain, finetune, evaluate, export or pipeline")],
    sets: Annotated[list[str] | None,
                    typer.Option("--set", metavar="[FILE:]KEY=VALUE", help="override a params key")] = None,
    params: Annotated[list[str] | None,
                      typer.Option("--param", metavar="NAME=VALUE", help="set a flow parameter")] = None,
) -> None:
    if os.environ.get("DVC_STAGE"):
        stop_when_parent_dies()
    flows = all_flows()
    if flow not in flows:
        raise typer.BadParameter(f"unknown flow {flow!r}; choose one of {', '.join(flows)}", param_hint="FLOW")
    arguments = flow_arguments(flow, sets or [], params or [])
    from flows.prefect_server import ServerError, pipeline_api

    finish_start_up(flow)
    try:
        with pipeline_api():
            flows[flow](**arguments)
    except ServerError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as err:
        loop = sys.modules.get("llm.training.loop")  # imported only by the flows that train (torch is slow to load)
        if loop is None or not isinstance(err, loop.TrainingInterrupted):
            raise
        # SIGINT or SIGTERM: training stopped at a step boundary with a checkpoint
        advice = "again (or `dvc repro`) to resume" if err.checkpoint is not None else "to start it again"
        typer.secho(f"interrupted: {err}; run `python -m flows {flow}` {advice}", fg="yellow", err=True)
        raise typer.Exit(err.exit_code) from None
    except Exception as err:  # noqa: BLE001 - any failure; Prefect has logged its traceback with the failed run
        typer.secho(f"error: the {flow} flow failed: {err}", fg="red", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:  # `python -m flows server start|status|stop`
        from flows.prefect_server import app as server_app

        server_app(args=sys.argv[2:], prog_name="python -m flows server")
    else:
        gc.disable()  # during the start-up; finish_start_up turns it on (see "Garbage collection" above it)
        try:
            app(prog_name="python -m flows")
        finally:
            gc.freeze()  # nothing left worth a last collection of every object at exit
