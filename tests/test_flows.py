"""Specification of the Prefect flows: each stage flow writes its stage's outputs, overrides are validated
against the params files, nothing is cached, and only transient errors are retried.

The flows run in this process against a temporary Prefect API (``prefect_test_harness``), in a tiny project:
params files with small values and a synthetic corpus under a temporary working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.config import ParamsError

from helpers import write_corpus

REPO = Path(__file__).resolve().parents[1]

# A model and a run small enough for a few seconds on one CPU core.
TINY_PARAMS = {
    "data": {"val_fraction": 0.3, "min_doc_chars": 100},
    "tokenizer": {"kind": "char"},
    # room for a system prompt, a speech and a reply in the chat examples of the finetune stage
    "model": {"context_length": 256, "n_layer": 1, "n_head": 2, "d_model": 32},
    "pretrain": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 2,
                 "checkpoint_interval": 4, "log_interval": 1, "device": "cpu", "progress": False},
    "finetune": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_interval": 3, "eval_batches": 1,
                 "checkpoint_interval": 3, "log_interval": 1, "device": "cpu", "progress": False},
    "evaluate": {"batch_size": 4, "max_batches": 2, "max_new_tokens": 8, "prompts": ["ROMEO."], "device": "cpu",
                 "max_conversations": 8, "sample_conversations": 1},
    "export": {"quantize": False},
    "base": {"hf_folder": None},
}


def make_tiny_project(root: Path, *, with_code: bool = False) -> Path:
    """A project root with tiny ``params/*.yaml`` and ``data/corpus/*.txt``; ``with_code`` also copies the
    code that stages and deployments run (``llm/``, ``flows/``, ``dvc.yaml``, ``.dvcignore``)."""
    (root / "params").mkdir(parents=True, exist_ok=True)
    for name, values in TINY_PARAMS.items():
        (root / "params" / f"{name}.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    write_corpus(root / "data" / "corpus", n_docs=6)
    if with_code:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for folder in ("llm", "flows"):
            shutil.copytree(REPO / folder, root / folder, ignore=ignore)
        for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
            shutil.copy2(REPO / name, root / name)
        shutil.copytree(REPO / "params" / "presets", root / "params" / "presets")
    return root


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLM_TRACKING", "0")
    root = make_tiny_project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def test_prepare_then_pretrain_flows_write_every_stage_output(prefect_api, project):
    from flows.data import prepare
    from flows.pretrain import pretrain

    prepared = prepare(tokenizer_overrides={"kind": "byte"})
    assert prepared["tokenizer"]["kind"] == "byte"  # the override reached the stage
    assert prepared["clean"]["train_docs"] >= 1 and prepared["clean"]["val_docs"] >= 1
    for path in ("clean/train.txt", "clean/val.txt", "clean/stats.json", "tokenizer", "tokens/train.bin",
                 "tokens/val.bin", "tokens/meta.json"):
        assert (project / "artifacts" / path).exists(), path

    result = pretrain(overrides={"max_steps": 3}, model_overrides={"n_layer": 2})
    assert result["step"] == 3
    out = project / "artifacts" / "pretrain"
    for name in ("model.safetensors", "config.json", "metrics.json", "curve/train.csv", "curve/val.csv"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["model"]["n_layer"] == 2
    assert json.loads((out / "metrics.json").read_text())["step"] == 3
    assert (out / "curve" / "train.csv").read_text().splitlines()[0] == "step,train_loss,lr"


def test_evaluate_flow_scores_the_checkpoint_without_tracking(prefect_api, project):
    from flows.data import prepare
    from flows.evaluate import evaluate
    from flows.pretrain import pretrain

    prepare()
    pretrain(overrides={"max_steps": 2})
    result = evaluate()
    metrics = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())
    assert metrics["val/bpb"] == pytest.approx(result["val/bpb"]) and metrics["val/bpb"] > 0
    assert result["promotion"]["promoted"] is False  # LLM_TRACKING=0: there is no registry to promote in
    assert (project / "artifacts" / "eval" / "samples.md").read_text().strip()

    from prefect.artifacts import Artifact

    from flows.reports import EVALUATION_KEY

    shown = Artifact.get(EVALUATION_KEY)  # on the flow run in the Prefect UI: the scores and the decision
    assert shown.type == "markdown" and shown.flow_run_id is not None
    assert f"| val/bpb | {result['val/bpb']:.4f} |" in shown.data
    assert "## Promotion: not promoted" in shown.data and "tracking disabled" in shown.data


def test_a_misspelt_override_fails_the_flow_run_naming_file_and_key(prefect_api, project):
    from flows.pretrain import pretrain

    with pytest.raises(ParamsError, match=r"params/pretrain\.yaml: max_stepz: unknown key"):
        pretrain(overrides={"max_stepz": 3})
    state = pretrain(model_overrides={"n_head": 0}, return_state=True)
    assert state.is_failed()
    assert "params/model.yaml: n_head" in state.message
    assert not (project / "artifacts" / "pretrain").exists()


def test_pipeline_checks_every_params_file_before_the_first_stage(prefect_api, project):
    from flows.pipeline import pipeline

    with pytest.raises(ParamsError, match=r"params/evaluate\.yaml: temperatur: unknown key"):
        pipeline(evaluate_overrides={"temperatur": 0.5})
    assert not (project / "artifacts").exists()  # nothing was cleaned, let alone trained


def test_a_missing_params_file_fails_the_pipeline_before_the_first_stage(prefect_api, project):
    from flows.pipeline import pipeline

    (project / "params" / "export.yaml").unlink()
    with pytest.raises(ParamsError, match=r"params/export\.yaml: params file not found"):
        pipeline()
    assert not (project / "artifacts").exists()  # the defaults did not stand in for the missing file


@pytest.mark.parametrize(("flow_name", "until_step"), [("pretrain", 0), ("finetune", -1)])
def test_until_step_below_one_fails_a_training_flow_before_any_work(prefect_api, project, flow_name, until_step):
    from flows import all_flows

    with pytest.raises(ParamsError, match=rf"until_step={until_step}: must be a step number of at least 1"):
        all_flows()[flow_name](until_step=until_step)
    assert not (project / "artifacts").exists()


def test_no_task_caches_and_only_io_tasks_retry():
    from prefect.cache_policies import NO_CACHE

    from flows.data import clean_shard_task, fetch_task, tokenize_shard_task, tokenizer_task
    from flows.evaluate import evaluate_task
    from flows.pretrain import pretrain_task

    for io_task in (fetch_task, clean_shard_task, tokenizer_task, tokenize_shard_task, evaluate_task):
        assert io_task.cache_policy is NO_CACHE, io_task.name
        assert io_task.retries == 2, io_task.name
    assert pretrain_task.cache_policy is NO_CACHE
    assert pretrain_task.retries == 0


@pytest.mark.parametrize(
    ("error", "retried"),
    [(ConnectionResetError("peer reset"), True), (TimeoutError("read timed out"), True),
     (FileNotFoundError("data/corpus"), False), (ValueError("bad data"), False),
     (ParamsError("params/data.yaml: x: unknown key"), False)],
)
def test_only_transient_errors_are_retried(error, retried):
    from prefect.states import Failed

    from flows.policies import is_transient

    assert is_transient(None, None, Failed(data=error)) is retried


def test_an_io_task_retries_a_dropped_connection_twice_but_not_bad_input(prefect_api):
    from prefect import flow, task

    from flows.policies import IO_TASK

    calls = []

    def read(kind: str) -> None:
        calls.append(kind)
        raise {"network": ConnectionResetError, "input": ValueError}[kind](kind)

    read_task = task(read, **{**IO_TASK, "retry_delay_seconds": 0})

    @flow
    def reading(kind: str):
        return read_task(kind, return_state=True)

    for kind in ("network", "input"):
        assert reading(kind, return_state=True).is_failed()
    assert calls == ["network"] * 3 + ["input"]


def test_set_options_map_to_the_overrides_of_each_params_file():
    from flows.__main__ import flow_arguments

    assert flow_arguments("pretrain", ["max_steps=5", "model:n_layer=2", "params/pretrain.yaml:learning_rate=0.01",
                                       "batch_size="], ["resume=false"]) == {
        "overrides": {"max_steps": 5, "learning_rate": 0.01},  # batch_size= (empty) overrides nothing
        "model_overrides": {"n_layer": 2},
        "resume": False,
    }
    assert flow_arguments("pipeline", ["pretrain:max_steps=5", "tokenizer:kind=bpe"], []) == {
        "pretrain_overrides": {"max_steps": 5}, "tokenizer_overrides": {"kind": "bpe"}}


@pytest.mark.parametrize(
    ("flow", "sets", "message"),
    [("pipeline", ["max_steps=5"], "reads several params files"),
     ("clean", ["model:n_layer=1"], "does not read params/model.yaml"),
     ("tokenize", ["nosuch:key=1"], "unknown params file"),
     ("clean", ["no_equals_sign"], "expected name=value"),
     ("finetune", ["chat_data={max_turns: 2, max_turns: 3}"], r"line 1: duplicate key 'max_turns'")],
)
def test_set_options_that_name_nothing_the_flow_reads_are_refused(flow, sets, message):
    import typer

    from flows.__main__ import flow_arguments

    with pytest.raises(typer.BadParameter, match=message):
        flow_arguments(flow, sets, [])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_param_until_step_below_one_is_refused_before_the_flow_starts(value):
    import typer

    from flows.__main__ import flow_arguments

    with pytest.raises(typer.BadParameter, match=rf"--param 'until_step={value}': until_step={value}: must be a step"):
        flow_arguments("pretrain", [], [f"until_step={value}"])


def test_set_options_naming_the_same_key_apply_in_order():
    from flows.__main__ import flow_arguments

    sets = ["chat_data.max_turns=3", "chat_data={max_turns: 1, val_fraction: 0.2}", "chat_data.max_turns=4"]
    assert flow_arguments("finetune", sets, []) == {"overrides": {"chat_data": {"max_turns": 4, "val_fraction": 0.2}}}


@pytest.mark.parametrize("item", ["chat_data.max_turns=3", "finetune:chat_data={max_turns: 3}"])
def test_set_of_a_nested_key_keeps_the_files_other_keys(tmp_path, item):
    from flows.__main__ import flow_arguments
    from flows.params import read_params
    from llm.stages import Layout

    root = make_tiny_project(tmp_path)
    finetune_yaml = root / "params" / "finetune.yaml"
    values = yaml.safe_load(finetune_yaml.read_text())
    finetune_yaml.write_text(yaml.safe_dump({**values, "chat_data": {"max_turns": 1, "max_speech_chars": 123}}))

    arguments = flow_arguments("finetune", [item], [])
    params = read_params("finetune", arguments["overrides"], Layout(root))

    assert params.chat_data.max_turns == 3
    assert params.chat_data.max_speech_chars == 123  # kept from the file, not reset to the default
    assert params.max_steps == values["max_steps"]


def test_every_flow_is_registered_under_its_deployment_name():
    from flows import all_flows

    assert list(all_flows()) == ["fetch", "clean", "tokenizer", "tokenize", "prepare", "pretrain", "finetune",
                                 "evaluate", "export", "pipeline"]


def test_flows_import_no_model_code_at_module_level():
    """flows/ is orchestration: importing it must not pull in torch (the stages import it when they run)."""
    import subprocess
    import sys

    code = "import sys, flows; flows.all_flows(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_python_m_flows_help_imports_no_prefect_mlflow_or_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True)
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "flows.params" in imported and "Usage: python -m flows" in out.stdout
    assert not {"prefect", "mlflow", "torch"} & imported


@pytest.mark.parametrize("collector_on", [False, True])
def test_a_stage_process_imports_its_modules_during_start_up_then_freezes_them_and_collects_again(collector_on):
    """``python -m flows`` starts up with the collector off; finish_start_up (called before the flow runs) imports
    what the stage will, freezes it and turns the collector on. Called with the collector on (from Python), it
    does nothing."""
    code = ("import gc, sys\n"
            f"{'' if collector_on else 'gc.disable()'}\n"
            "from flows.__main__ import finish_start_up\n"
            "finish_start_up('tokenizer')\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 0, 'llm.data.tokenizer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "LLM_TRACKING": "0"})
    assert out.stdout.split() == (["True", "False", "False"] if collector_on else ["True", "True", "True"])


def test_pool_deployments_import_each_flow_by_module_path_in_the_workers_checkout_with_heartbeats(tmp_path):
    from flows.work_pool import HEARTBEAT_SECONDS, pool_deployments

    deployments = {d.flow_name: d for d in pool_deployments("gpu", tmp_path)}
    assert list(deployments) == ["fetch", "clean", "tokenizer", "tokenize", "prepare", "pretrain", "finetune",
                                 "evaluate", "export", "pipeline"]
    pretrain = deployments["pretrain"]
    assert (pretrain.name, pretrain.work_pool_name) == ("gpu", "gpu")
    assert pretrain.entrypoint == "flows.pretrain.pretrain"  # no code upload: the worker's checkout has it
    assert pretrain.storage is None
    assert pretrain.job_variables["working_dir"] == str(tmp_path)
    assert pretrain.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS) == "30"


@pytest.mark.parametrize(("setting", "expected"), [(None, "30"), ("120", "120")])
def test_every_flow_run_of_the_project_sends_heartbeats_often_enough_for_the_crash_automation(setting, expected):
    # a dvc stage on a server where `flows.work_pool` created the automation (crash after 90 s without a heartbeat)
    # must not be marked crashed while it trains: Prefect's own default is one heartbeat every 180 s
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}
    if setting:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = setting  # the user's own choice wins
    code = ("import flows\nfrom prefect.settings import get_current_settings\n"
            "print(get_current_settings().flows.heartbeat_frequency)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == expected


DATA_OUTPUTS = ("clean/train.txt", "clean/val.txt", "clean/stats.json", "tokens/train.bin", "tokens/val.bin",
                "tokens/meta.json")


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in DATA_OUTPUTS}


@pytest.mark.pipeline
def test_clean_and_tokenize_flows_on_a_dask_cluster_write_what_the_local_run_and_the_cli_write(
    prefect_api, project, monkeypatch
):
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.data import clean, tokenize, tokenizer

    # several shard tasks for each flow, even on a tiny corpus
    monkeypatch.setattr("llm.data.clean.SHARD_BYTES_MIN", 1)
    monkeypatch.setattr("llm.data.tokenize.SHARD_BYTES_MIN", 1)
    write_corpus(project / "data" / "corpus", n_docs=12)
    clean()
    tokenizer()
    tokenize()
    local = _outputs(project / "artifacts")
    shutil.move(project / "artifacts", project / "local")

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        stats = clean.with_options(task_runner=runner)()
        shutil.copytree(project / "local" / "tokenizer", project / "artifacts" / "tokenizer")
        tokenize.with_options(task_runner=runner)()
        ran_on_dask = sorted(cluster.scheduler.task_prefixes)
    assert stats["files_read"] == 12
    assert _outputs(project / "artifacts") == local

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = project / "cli"
    for args in (["clean", "--corpus", "data/corpus", "--out", f"{cli}/clean", "--params", "params/data.yaml"],
                 ["tokenize", "--clean", f"{cli}/clean", "--tokenizer", "local/tokenizer", "--out", f"{cli}/tokens"]):
        subprocess.run([sys.executable, "-m", "llm.cli", *args], check=True, env=env, capture_output=True)
    assert _outputs(cli) == local
    assert ran_on_dask == ["run_shard"]  # the shard tasks ran on the cluster (Dask names them by their function)


@pytest.mark.pipeline
@pytest.mark.parametrize("module", ["flows.deployments", "flows.work_pool", "flows"])
def test_python_m_flows_modules_print_help_and_serve_nothing(module, tmp_path):
    """`python -m flows.deployments --help` printed nothing and started serving every deployment (issue 22, item 9)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing there
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Usage: python -m {module}" in result.stdout
