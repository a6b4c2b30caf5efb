"""Specification of dvc.yaml: ``dvc repro`` runs every stage's Prefect flow once, reruns only what a change
touches, and exposes the metrics, the loss curve, experiments and the default remote.

Runs the real ``dvc`` of the virtualenv in a throwaway git repository holding a copy of the code, tiny params
and a synthetic corpus tracked by ``data.dvc``. The stages report to one local Prefect server started for the
module (``PREFECT_API_URL``), which spares each stage a temporary server of its own; MLflow tracking is off
(``LLM_TRACKING=0``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_flows import make_tiny_project
from tests.test_prefect_server import prefect_env, prefect_server

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STAGES = ["clean", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate", "export"]


def run(cwd: Path, env: dict, *args: str, stdout_only: bool = False) -> str:
    """Run a command in ``cwd``; return its output, or fail the test showing it."""
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
    return proc.stdout if stdout_only else output


def run_json(cwd: Path, env: dict, *args: str):
    return json.loads(run(cwd, env, *args, "--json", stdout_only=True))


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    root = make_tiny_project(tmp_path_factory.mktemp("dvc") / "project", with_code=True)
    home = root.parent / "prefect-home"
    with prefect_server(home) as api_url:
        env = {
            # PATH puts this virtualenv first: dvc.yaml's `python` is its python
            **{k: v for k, v in prefect_env(home, api_url).items() if not k.startswith("DVC_")},
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        }
        init_repo(root, env)
        yield root, env


def init_repo(root: Path, env: dict) -> None:
    """git and dvc repositories around the tiny project, with data/ tracked by data.dvc and committed."""
    run(root, env, "git", "init", "-q")
    run(root, env, "dvc", "init", "-q")
    shutil.copy2(Path(__file__).resolve().parents[1] / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(Path(__file__).resolve().parents[1] / ".dvc" / "plots", root / ".dvc" / "plots")  # its template
    with (root / ".gitignore").open("a") as gitignore:
        gitignore.write("/.dvcstore/\n")  # the default remote lives in the checkout, outside git
    run(root, env, "dvc", "add", "-q", "data")
    run(root, env, "git", "add", "-A")
    run(root, env, "git", "commit", "-q", "-m", "tiny project")


def test_repro_runs_every_stage_then_nothing(repo):
    root, env = repo
    first = run(root, env, "dvc", "repro")
    assert ran_stages(first) == STAGES
    for out in ("clean/train.txt", "tokenizer", "tokens/train.bin", "pretrain/model.safetensors",
                "pretrain/metrics.json", "pretrain/curve/train.csv", "pretrain/curve/val.csv", "eval/metrics.json",
                "eval/samples.md"):
        assert (root / "artifacts" / out).exists(), out
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    assert "Data and pipelines are up to date" in run(root, env, "dvc", "status")
    second = run(root, env, "dvc", "repro")
    assert ran_stages(second) == []
    assert all(f"Stage '{s}' didn't change, skipping" in second for s in STAGES)
    run(root, env, "git", "add", "-A")
    run(root, env, "git", "commit", "-q", "-m", "reproduced")


def test_llm_demo_runs_in_the_project_without_make_or_an_activated_venv(repo):
    """The README's path without make ends in `llm demo`: here in the reproduced tiny project, with the corpus it
    has (--no-fetch: no network), and MLflow off, so the chat step answers with the finetuned folder. The venv is
    not on PATH: every step runs with this interpreter."""
    root, env = repo
    bare = {**env, "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)}
    output = run(root, bare, sys.executable, "-m", "llm", "demo", "--no-fetch", "--chat-model", "artifacts/finetune")
    steps = ["run the pipeline: python -m dvc repro", "show the metrics: python -m dvc metrics show",
             "sample the pretrained model: python -m llm generate --model artifacts/pretrain --prompt ROMEO.",
             "ask the chat model: python -m llm.chat --model artifacts/finetune --seed 1 --prompt"]
    positions = [output.index(f"==> {step}") for step in steps]
    assert positions == sorted(positions)
    assert "fetch the corpus" not in output
    assert all(f"Stage '{s}' didn't change, skipping" in output for s in STAGES)
    assert "val/bpb" in output  # dvc metrics show
    assert "\nROMEO." in output  # the sample starts with its prompt
    assert "Chat with the model:             python -m llm.chat --model artifacts/finetune" in output
    assert "Data and pipelines are up to date" in run(root, env, "dvc", "status")


def test_metrics_show_lists_val_loss_and_bits_per_byte(repo):
    root, env = repo
    shown = run_json(root, env, "dvc", "metrics", "show")
    files = next(iter(shown.values()))["data"]
    for path in ("artifacts/pretrain/metrics.json", "artifacts/eval/metrics.json"):
        metrics = files[path]["data"]
        assert metrics["val/loss"] > 0 and metrics["val/bpb"] > 0, path
    table = run(root, env, "dvc", "metrics", "show")
    assert "val/loss" in table and "val/bpb" in table


def test_plots_show_renders_the_train_and_val_loss_curves(repo):
    root, env = repo
    run(root, env, "dvc", "plots", "show", "-o", "plots")
    html = (root / "plots" / "index.html").read_text()
    assert "train_loss" in html and "val_loss" in html
    assert "vegaEmbed" in html and "cdn.jsdelivr.net" not in html  # the project's template: Vega inlined, no CDN
    assert not re.findall(r"<script\b[^>]*\bsrc\s*=", html)
    steps = (root / "artifacts" / "pretrain" / "curve" / "train.csv").read_text().splitlines()
    assert len(steps) == 1 + yaml.safe_load((root / "params" / "pretrain.yaml").read_text())["max_steps"]
    shutil.rmtree(root / "plots")


def test_push_sends_the_cache_to_the_default_local_remote(repo):
    root, env = repo
    run(root, env, "dvc", "push")
    store = root / ".dvcstore"
    assert store.is_dir() and any(p.is_file() for p in store.rglob("*"))


def test_a_pretrain_param_change_marks_only_pretrain_changed(repo):
    root, env = repo
    params_file = root / "params" / "pretrain.yaml"
    original = params_file.read_text()
    params_file.write_text(original.replace("batch_size: 4", "batch_size: 2"))
    try:
        status = run(root, env, "dvc", "status")
        assert "pretrain:" in status and "params/pretrain.yaml" in status and "batch_size" in status
        assert not any(f"{s}:" in status for s in ("clean", "tokenizer", "tokenize", "evaluate"))
    finally:
        params_file.write_text(original)
    assert "Data and pipelines are up to date" in run(root, env, "dvc", "status")


def test_exp_run_with_a_pretrain_param_reruns_pretrain_and_evaluate_only(repo):
    root, env = repo
    output = run(root, env, "dvc", "exp", "run", "-n", "longer", "-S", "params/pretrain.yaml:max_steps=6")
    assert ran_stages(output) == ["pretrain", "finetune", "evaluate", "export"]
    assert all(f"Stage '{s}' didn't change, skipping" in output for s in ("clean", "tokenizer", "tokenize"))
    # the training outputs persist across runs of their stage, and the kept checkpoints are of other runs now
    assert "artifacts/pretrain holds the checkpoint of another run (params.max_steps 4 -> 6)" in output
    assert "artifacts/finetune holds the checkpoint of another run (inputs.base_model.weights_sha256 changed" in output
    assert json.loads((root / "artifacts" / "pretrain" / "metrics.json").read_text())["step"] == 6
    assert json.loads((root / "artifacts" / "finetune" / "config.json").read_text())["parent"]["step"] == 6
    experiments = {e["name"]: e["revs"][0]["data"] for commit in run_json(root, env, "dvc", "exp", "show")
                   for e in commit.get("experiments") or []}
    longer = experiments["longer"]
    assert longer["params"]["params/pretrain.yaml"]["data"]["max_steps"] == 6
    assert longer["metrics"]["artifacts/pretrain/metrics.json"]["data"]["step"] == 6


def test_one_repro_lora_finetunes_a_published_model_on_my_chat_data(repo, tmp_path):
    """The README's "LoRA-finetune a published model on my chat data": a Transformers folder named in
    params/base.yaml, no continued pretraining (max_steps: 0), method: lora, conversations in data/chat/*.jsonl.
    One `dvc repro` imports the tokenizer, keeps the published model, trains adapters on the chat data, evaluates
    and exports the merged model to ONNX, whose greedy answer is the adapter checkpoint's."""
    from llm.data.chat_data import write_chat_file

    from published import write_published_model

    _, env = repo
    root = make_tiny_project(tmp_path / "project", with_code=True)
    write_published_model("qwen3", root / "models" / "hf" / "qwen3")  # outside data/: DVC does not version it
    chats = [{"messages": [{"role": "user", "content": f"Who is {n}?"}, {"role": "assistant", "content": f"{n}!"}]}
             for n in ("Hamlet", "Ophelia", "Horatio", "Laertes")] * 3
    write_chat_file(root / "data" / "chat" / "train.jsonl", chats)
    params = {"base": {"hf_folder": "models/hf/qwen3", "context_length": 64},
              "pretrain": {**yaml.safe_load((root / "params" / "pretrain.yaml").read_text()), "max_steps": 0},
              "finetune": {**yaml.safe_load((root / "params" / "finetune.yaml").read_text()), "method": "lora",
                           "learning_rate": 0.01, "lora": {"rank": 4, "alpha": 8, "targets": ["all"]}}}
    for name, values in params.items():
        (root / "params" / f"{name}.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    with (root / ".gitignore").open("a") as gitignore:
        gitignore.write("/models/\n")
    init_repo(root, env)
    output = run(root, env, "dvc", "repro")
    assert ran_stages(output) == STAGES
    finetuned = root / "artifacts" / "finetune"
    assert (finetuned / "adapter.safetensors").is_file() and not (finetuned / "model.safetensors").exists()
    adapter = json.loads((finetuned / "adapter_config.json").read_text())
    assert adapter["base"]["path"] == str((root / "artifacts" / "pretrain").resolve())
    assert json.loads((root / "artifacts" / "pretrain" / "metrics.json").read_text())["step"] == 0
    assert json.loads((root / "artifacts" / "onnx" / "parity.json").read_text())["passed"]
    answer = run(root, env, str(BIN / "python"), "-m", "llm.chat", "--model", "artifacts/onnx", "--backend", "onnx",
                 "--prompt", "Who is Hamlet?", "--temperature", "0", "--max-new-tokens", "8", stdout_only=True)
    torch_answer = run(root, env, str(BIN / "python"), "-m", "llm.chat", "--model", "artifacts/finetune",
                       "--prompt", "Who is Hamlet?", "--temperature", "0", "--max-new-tokens", "8", stdout_only=True)
    assert answer == torch_answer and answer.strip()
