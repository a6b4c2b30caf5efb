"""The tracked stages end to end: runs compare in MLflow, the registry keeps the better model in Production,
finetuned versions carry their lineage, and the registry URIs work from the command line."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient

from llm.config import EvalParams, ExportParams, FinetuneParams, ModelConfig, PretrainParams
from llm.stages import evaluate_stage, export_stage, finetune_stage, pretrain_stage

ROOT = Path(__file__).resolve().parents[1]
# room for a system prompt, a speech and a reply in the finetuning examples
MODEL = ModelConfig(context_length=256, n_layer=1, n_head=2, d_model=32)
EVAL = EvalParams(batch_size=8, max_batches=4, max_new_tokens=8, prompts=["ROMEO."], device="cpu",
                  max_conversations=8, sample_conversations=1)


def pretrain_params(max_steps: int) -> PretrainParams:
    return PretrainParams(max_steps=max_steps, batch_size=4, learning_rate=3e-3, warmup_steps=1, eval_interval=5,
                          eval_batches=4, checkpoint_interval=100, log_interval=1, device="cpu", progress=False)


@pytest.fixture
def tracked(tmp_path, monkeypatch, empty_mlflow_db, prepared) -> Path:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                 "LLM_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.pipeline
def test_two_pretrainings_compare_in_mlflow_and_the_better_one_is_production(tracked, prepared):
    p = prepared
    short = pretrain_stage(pretrain_params(2), MODEL, p["tokens"], p["tokenizer"], tracked / "short")
    first = evaluate_stage(EVAL, tracked / "short", p["tokens"], p["clean"], tracked / "eval_short")
    assert first["promotion"]["promoted"] and short["model_version"] == "1"

    long = pretrain_stage(pretrain_params(30), MODEL, p["tokens"], p["tokenizer"], tracked / "long")
    second = evaluate_stage(EVAL, tracked / "long", p["tokens"], p["clean"], tracked / "eval_long")
    decision = second["promotion"]
    assert decision["promoted"] and decision["metric"] == "val/bpb"
    assert decision["candidate_score"] < decision["production_score"]  # both scored on the same val text

    # a worse candidate is scored against Production and left out
    worse = pretrain_stage(pretrain_params(1), MODEL, p["tokens"], p["tokenizer"], tracked / "worse")
    third = evaluate_stage(EVAL, tracked / "worse", p["tokens"], p["clean"], tracked / "eval_worse")
    assert not third["promotion"]["promoted"]

    client = MlflowClient()
    runs = [client.get_run(r["run_id"]) for r in (short, long, worse)]
    keys = [{k for k in r.data.metrics if not k.startswith("system/")} for r in runs]  # sampled every 10 s
    assert keys[0] == keys[1] == keys[2]  # the same metric keys: comparable side by side in the UI
    assert {"train/loss", "val/loss", "val/bpb", "val/ppl", "perf/tokens_per_s", "perf/mfu"} <= keys[0]
    assert len(client.get_metric_history(runs[1].info.run_id, "train/loss")) == 30  # step-wise
    assert {"git.commit", "dvc.data_hash", "params.hash", "stage"} <= set(runs[1].data.tags)
    versions = client.search_model_versions("name='gpt'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    production = client.get_model_version_by_alias("gpt", "production")
    assert str(production.version) == "2" and production.current_stage == "Production"
    assert float(production.tags["promotion.score.val/bpb"]) == pytest.approx(decision["candidate_score"])

    # at a glance: names say what differs, the summary is on every run, versions say what they are and how good
    names = [r.info.run_name for r in runs]
    vocab = runs[0].data.params["tokenizer.vocab_size"]
    assert [n.rsplit(" (", 1)[0] for n in names] == [f"pretrain 1x32 char{vocab} {steps} steps" for steps in (2, 30, 1)]
    assert len(set(names)) == 3
    assert runs[1].data.metrics["model/parameters"] == long["params"]
    assert runs[1].data.metrics["perf/wall_time_s"] == pytest.approx(long["wall_time_s"])
    assert runs[1].data.metrics["val/bpb"] == pytest.approx(long["val/bpb"])  # the final value is the latest
    assert client.get_registered_model("gpt").description.startswith("A GPT language model trained from scratch")
    described = client.get_model_version("gpt", "2").description
    assert described.startswith("Base model pretrained from scratch on the corpus: 1 layer x 32 wide")
    assert f"val/bpb {long['val/bpb']:.4f}" in described and f"run `{names[1]}`" in described
    assert "**Promotion decision**: promoted to Production." in described
    assert (f"this version {decision['candidate_score']:.4f}; Production version 1: "
            f"{decision['production_score']:.4f}") in described
    assert "not promoted (Production unchanged)" in client.get_model_version("gpt", "3").description

    from llm.mlops.runs import version_rows

    rows = {row.version: row for row in version_rows()}
    assert rows["2"].where == "Production (@production)" and rows["2"].decision == "promoted"
    assert rows["2"].score == f"{decision['candidate_score']:.4f}" and rows["2"].run_name == names[1]
    assert rows["3"].decision == "not promoted" and rows["3"].baseline.endswith("(v2)")

    proc = cli("llm", "generate", "--model", "models:/gpt/Production", "--prompt", "ROMEO.", "--max-new-tokens",
               "12", "--seed", "1", cwd=tracked)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO.") and len(proc.stdout.strip()) > len("ROMEO.")


@pytest.mark.pipeline
def test_finetuned_version_records_its_parent_and_is_promoted_on_assistant_loss(tracked, prepared):
    p = prepared
    base = pretrain_stage(pretrain_params(20), MODEL, p["tokens"], p["tokenizer"], tracked / "pretrain")
    ft_params = FinetuneParams(max_steps=10, batch_size=4, learning_rate=1e-3, warmup_steps=1, eval_interval=5,
                               eval_batches=1, checkpoint_interval=100, log_interval=1, device="cpu", progress=False)
    tuned = finetune_stage(ft_params, tracked / "pretrain", p["clean"], None, tracked / "chat", tracked / "finetune")
    version = MlflowClient().get_model_version("gpt", tuned["model_version"])
    assert version.tags["llm.finetuned"] == "true"
    assert version.tags["llm.parent_run_id"] == base["run_id"]
    assert version.description.startswith(f"Chat model finetuned from **gpt version {base['model_version']}**")
    base_run, tuned_run = (MlflowClient().get_run(r["run_id"]) for r in (base, tuned))
    assert tuned_run.info.run_name.startswith(f"finetune 1x32 char{base_run.data.params['tokenizer.vocab_size']} "
                                              f"10 steps from v{base['model_version']} (")
    shared = {k for k in base_run.data.params if k.startswith(("model.", "train.", "tokenizer."))}
    assert "train.learning_rate" in shared and shared <= set(tuned_run.data.params)  # the same names, compared
    for key in ("model.d_model", "model.vocab_size", "tokenizer.vocab_size"):
        assert tuned_run.data.params[key] == base_run.data.params[key] != "None"

    result = evaluate_stage(EVAL, tracked / "finetune", p["tokens"], p["clean"], tracked / "eval",
                            chat_dir=tracked / "chat")
    assert result["promotion"]["metric"] == "chat/assistant_bpb" and result["promotion"]["promoted"]
    assert result["chat/assistant_loss"] < result["chat/base_assistant_loss"]
    # the chat score is also on the finetuning run, beside its val/loss
    assert MlflowClient().get_run(tuned["run_id"]).data.metrics["chat/assistant_loss"] == pytest.approx(
        result["chat/assistant_loss"])
    assert "# Conversations (held-out validation)" in (tracked / "eval" / "samples.md").read_text()

    proc = cli("llm.chat", "--model", "models:/gpt@production", "--prompt", "Good morrow", "--max-new-tokens", "8",
               "--seed", "1", cwd=tracked)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != ""
    assert json.loads((tracked / "eval" / "promotion.json").read_text())["promoted"] is True

    exported = export_stage(ExportParams(quantize=False), tracked / "finetune", tracked / "onnx")
    assert exported["parity"]["passed"] and exported["model_version"] == tuned["model_version"]
    client = MlflowClient()
    tagged = client.get_model_version("gpt", tuned["model_version"]).tags["onnx.artifact_uri"]
    assert tagged == f"runs:/{tuned['run_id']}/onnx"
    assert "onnx/model.onnx" in {a.path for a in client.list_artifacts(tuned["run_id"], "onnx")}

    # the registered version's export serves the chat without PyTorch
    onnx_answer = cli("llm.chat", "--model", "models:/gpt/Production", "--backend", "onnx", "--prompt", "Good morrow",
                      "--max-new-tokens", "8", "--temperature", "0", cwd=tracked)
    torch_answer = cli("llm.chat", "--model", "models:/gpt/Production", "--prompt", "Good morrow",
                       "--max-new-tokens", "8", "--temperature", "0", cwd=tracked)
    assert onnx_answer.returncode == 0, onnx_answer.stderr
    assert onnx_answer.stdout == torch_answer.stdout


@pytest.mark.slow  # two tokenizers, two pretrainings, two finetunes: about 40 s
def test_the_readme_char_tokenizer_sequence_leaves_the_better_bpe_model_in_production(tracked, prepared):
    """Issue 22, item 1: after a BPE chat model, the README's `llm tokenizer --set kind=char`, `llm tokenize`,
    `llm pretrain`, `llm finetune`, `llm evaluate --model artifacts/finetune` promoted the char model on a lower
    loss in nats per token, each model under its own tokenizer. Promotion compares bits per byte of the same
    held-out assistant answers instead, records both, and keeps the BPE model."""
    from llm.config import TokenizerParams
    from llm.stages import tokenize_stage, tokenizer_stage

    p = prepared
    ft_params = FinetuneParams(max_steps=10, batch_size=4, learning_rate=1e-3, warmup_steps=1, eval_interval=5,
                               eval_batches=1, checkpoint_interval=100, log_interval=1, device="cpu", progress=False)
    scores = {}
    for kind, steps in (("bpe", 30), ("char", 30)):
        tokenizer_stage(TokenizerParams(kind=kind, vocab_size=512), p["clean"], tracked / kind / "tokenizer")
        tokenize_stage(p["clean"], tracked / kind / "tokenizer", tracked / kind / "tokens")
        pretrain_stage(pretrain_params(steps), MODEL, tracked / kind / "tokens", tracked / kind / "tokenizer",
                       tracked / kind / "pretrain")
        finetune_stage(ft_params.model_copy(update={"max_steps": max(2, steps // 3)}), tracked / kind / "pretrain",
                       p["clean"], None, tracked / "chat", tracked / kind / "finetune")
        scores[kind] = evaluate_stage(EVAL, tracked / kind / "finetune", tracked / kind / "tokens", p["clean"],
                                      tracked / kind / "eval", chat_dir=tracked / "chat")
    bpe, char = scores["bpe"], scores["char"]
    assert bpe["promotion"]["promoted"]
    decision = char["promotion"]
    assert not decision["promoted"] and decision["metric"] == "chat/assistant_bpb"
    assert decision["production"] == bpe["promotion"]["candidate"]
    assert decision["candidate_score"] == pytest.approx(char["chat/assistant_bpb"])
    assert decision["production_score"] == pytest.approx(bpe["chat/assistant_bpb"])  # the same text, re-scored
    assert decision["candidate_score"] > decision["production_score"]
    assert "final assistant answers of 8 conversations" in decision["text"]
    production = MlflowClient().get_model_version_by_alias("gpt", "production")
    assert str(production.version) == bpe["promotion"]["candidate"]
    rejected = MlflowClient().get_model_version("gpt", decision["candidate"])
    assert float(rejected.tags["promotion.score.chat/assistant_bpb"]) == pytest.approx(decision["candidate_score"])
    assert float(rejected.tags["promotion.score.baseline.chat/assistant_bpb"]) == pytest.approx(
        decision["production_score"])
    # what the old comparison ranked on: fewer nats per (character) token, though more bits per byte of text
    assert char["chat/assistant_loss"] < bpe["chat/assistant_loss"]


def test_untracked_stand_in_offers_exactly_the_tracked_runs_public_methods():
    from llm.mlops.stage_tracking import MlflowTracker, Untracked, UntrackedRun
    from llm.mlops.tracking import StageRun

    def public(obj) -> dict:
        return {name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")}

    # and the untracked tracker offers what the MLflow one does, with the same parameters
    trackers = public(Untracked()), public(MlflowTracker())
    assert trackers[0].keys() == trackers[1].keys()
    for name, member in trackers[1].items():
        if callable(member):
            assert list(inspect.signature(trackers[0][name]).parameters) == list(inspect.signature(member).parameters)
    stand_in, real = public(UntrackedRun()), public(StageRun(None))
    assert stand_in.keys() == real.keys()
    for name, member in real.items():  # same parameters: a call that works tracked works untracked
        if callable(member):
            assert list(inspect.signature(stand_in[name]).parameters) == list(inspect.signature(member).parameters)
    with pytest.raises(AttributeError):
        UntrackedRun().log_metric({"val/loss": 1.0})  # misspelt: log_metrics


@pytest.mark.pipeline
def test_a_registration_the_store_refuses_leaves_a_complete_checkpoint_that_llm_register_finishes(
    tracked, prepared, monkeypatch
):
    from mlflow.exceptions import MlflowException

    from llm.mlops import registry
    from llm.mlops.registry import RegistrationError
    from llm.mlops.stage_tracking import read_registration
    from llm.model.checkpoint import verify_checkpoint

    p, register_model = prepared, mlflow.register_model

    def store_down(*args, **kwargs):
        raise MlflowException("API request to http://tracking:5000/api/2.0/mlflow/model-versions/create failed "
                              "with exception Connection refused")

    monkeypatch.setattr(registry, "REGISTER_FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(mlflow, "register_model", store_down)
    with pytest.raises(RegistrationError, match=r"llm register --model .*pretrain"):
        pretrain_stage(pretrain_params(3), MODEL, p["tokens"], p["tokenizer"], tracked / "pretrain")
    assert verify_checkpoint(tracked / "pretrain")["step"] == 3  # training's work is complete and kept
    pending = read_registration(tracked / "pretrain")
    assert pending["model_version"] is None and pending["tags"]["llm.stage"] == "pretrain"
    client = MlflowClient()
    failed = client.get_run(pending["run_id"])
    assert failed.info.status == "FAILED" and "llm register" in failed.data.tags["error"]
    assert len(client.get_metric_history(pending["run_id"], "train/loss")) == 3

    monkeypatch.setattr(mlflow, "register_model", register_model)  # the store is back
    proc = cli("llm", "register", "--model", str(tracked / "pretrain"), cwd=tracked)
    assert proc.returncode == 0, proc.stderr
    registered = read_registration(tracked / "pretrain")
    assert registered == {"run_id": pending["run_id"], "model_version": "1", "stage": "pretrain"}
    version = client.get_model_version("gpt", "1")
    assert version.run_id == pending["run_id"] and version.tags["llm.stage"] == "pretrain"
    assert version.tags["params.hash"] == pending["tags"]["params.hash"]

    # rerunning the finished stage (dvc repro after the failure) trains nothing and registers nothing new
    rerun = pretrain_stage(pretrain_params(3), MODEL, p["tokens"], p["tokenizer"], tracked / "pretrain")
    assert rerun["model_version"] == "1"
    assert [str(v.version) for v in client.search_model_versions("name='gpt'")] == ["1"]


@pytest.mark.pipeline
def test_llm_register_refuses_an_unfinished_checkpoint_unless_forced(tracked, prepared):
    """`llm register --model artifacts/pretrain` registered a checkpoint stopped at step 25 of 300 without a word
    (issue 22, item 10): it names step N of M and --force; forced, it registers."""
    p = prepared
    stopped = pretrain_stage(pretrain_params(6), MODEL, p["tokens"], p["tokenizer"], tracked / "pretrain",
                             until_step=2)
    assert stopped["model_version"] is None  # the stage registers only a finished training
    refused = cli("llm", "register", "--model", str(tracked / "pretrain"), cwd=tracked)
    assert refused.returncode == 1
    assert "training stopped at step 2 of 6" in refused.stderr and "llm register --force" in refused.stderr
    assert not MlflowClient().search_model_versions("name='gpt'")
    forced = cli("llm", "register", "--model", str(tracked / "pretrain"), "--force", cwd=tracked)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["model_version"] == "1"


def test_rerunning_a_decided_evaluation_keeps_its_decision_and_production(tracked, prepared):
    p = prepared
    pretrain_stage(pretrain_params(2), MODEL, p["tokens"], p["tokenizer"], tracked / "short")
    first = evaluate_stage(EVAL, tracked / "short", p["tokens"], p["clean"], tracked / "eval_short")
    first_json = (tracked / "eval_short" / "promotion.json").read_text()
    pretrain_stage(pretrain_params(20), MODEL, p["tokens"], p["tokenizer"], tracked / "long")
    second = evaluate_stage(EVAL, tracked / "long", p["tokens"], p["clean"], tracked / "eval_long")
    assert second["promotion"]["promoted"]

    # the short model's evaluation runs again (a rerun stage, a Prefect retry): its decision stands, no flip
    again = evaluate_stage(EVAL, tracked / "short", p["tokens"], p["clean"], tracked / "eval_short")
    kept = {k: v for k, v in again["promotion"].items() if k not in ("reason", "production_now")}
    assert kept == {k: v for k, v in first["promotion"].items() if k != "reason"} and kept["promoted"]
    # the recorded reason named the Production of its time: the decision says which version is Production now
    assert again["promotion"]["reason"] == (f"{first['promotion']['reason']} (decided {first['promotion']['time']}; "
                                            "Production is now version 2)")
    assert json.loads((tracked / "eval_short" / "promotion.json").read_text()) == again["promotion"]
    assert json.loads(first_json) == first["promotion"]
    production = MlflowClient().get_model_version_by_alias("gpt", "production")
    assert str(production.version) == "2"


def test_a_resumed_training_continues_its_mlflow_run_and_a_new_run_starts_a_new_one(tracked, prepared):
    p, out = prepared, tracked / "pretrain"
    paused = pretrain_stage(pretrain_params(6), MODEL, p["tokens"], p["tokenizer"], out, until_step=3)
    finished = pretrain_stage(pretrain_params(6), MODEL, p["tokens"], p["tokenizer"], out)
    assert finished["run_id"] == paused["run_id"] and finished["model_version"] == "1"
    client = MlflowClient()
    assert client.get_run(finished["run_id"]).info.run_name.startswith("pretrain 1x32 char")  # kept its name
    steps = [m.step for m in client.get_metric_history(finished["run_id"], "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # one continuous curve, each step once
    assert client.get_run(finished["run_id"]).info.status == "FINISHED"
    # other params are another run: a new MLflow run, and training starts over
    longer = pretrain_stage(pretrain_params(8), MODEL, p["tokens"], p["tokenizer"], out)
    assert longer["run_id"] != finished["run_id"] and longer["step"] == 8


def test_evaluating_a_chat_model_loads_it_once_for_all_its_scores_and_samples(prepared, tmp_path, monkeypatch):
    from collections import Counter

    from llm.model import checkpoint
    from llm.training.finetune import assistant_loss

    p = prepared
    pretrain_stage(pretrain_params(2), MODEL, p["tokens"], p["tokenizer"], tmp_path / "pretrain", track=False)
    ft_params = FinetuneParams(max_steps=2, batch_size=4, warmup_steps=1, eval_interval=2, eval_batches=1,
                               checkpoint_interval=100, log_interval=1, device="cpu", progress=False)
    finetune_stage(ft_params, tmp_path / "pretrain", p["clean"], None, tmp_path / "chat", tmp_path / "finetune",
                   track=False)
    verified, verify = Counter(), checkpoint.verify_checkpoint  # every load verifies the folder first

    def counted(path):
        verified[Path(path).name] += 1
        return verify(path)

    monkeypatch.setattr(checkpoint, "verify_checkpoint", counted)
    result = evaluate_stage(EVAL, tmp_path / "finetune", p["tokens"], p["clean"], tmp_path / "eval",
                            chat_dir=tmp_path / "chat", track=False)
    assert verified == {"finetune": 1, "pretrain": 1}  # the candidate once (was 4 times), its base once
    monkeypatch.setattr(checkpoint, "verify_checkpoint", verify)
    # the same scores as the candidate loaded on its own
    val = tmp_path / "chat" / "val.jsonl"
    alone = assistant_loss(tmp_path / "finetune", None, val, device="cpu", max_conversations=EVAL.max_conversations)
    assert result["chat/assistant_loss"] == pytest.approx(alone, abs=1e-6)
    assert "# Conversations (held-out validation)" in (tmp_path / "eval" / "samples.md").read_text()


def test_stage_modules_name_each_stages_library_and_mlflow_only_when_the_stage_tracks():
    import importlib.util

    from llm.stages import stage_modules

    stages = ("fetch", "clean", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate", "export")
    for stage in stages:
        tracked_modules = stage_modules(stage, track=True)
        assert all(importlib.util.find_spec(name) is not None for name in tracked_modules), stage
        assert "llm.mlops.tracking" in tracked_modules
        assert not any(name.startswith(("llm.mlops", "mlflow")) for name in stage_modules(stage, track=False))
    assert "llm.mlops.registry" in stage_modules("pretrain", track=True)
    assert "llm.mlops.registry" not in stage_modules("clean", track=True)  # registers nothing
    assert stage_modules("pipeline") == stage_modules("prepare") == ()  # flows of several stages: none up front


def test_an_untracked_stage_imports_no_mlflow(tmp_path):
    """The untracked stand-in (``llm.mlops.stage_tracking.Untracked``) lets a stage run where MLflow is absent."""
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from llm.config import DataParams\n"
            "from llm.stages import clean_stage\n"
            f"corpus = Path({str(tmp_path)!r}) / 'corpus'\n"
            "corpus.mkdir()\n"
            "(corpus / 'a.txt').write_text('ROMEO. Hello there.\\n\\n' * 50)\n"
            "(corpus / 'b.txt').write_text('JULIET. Good night.\\n\\n' * 50)\n"
            "clean_stage(DataParams(), corpus, corpus.parent / 'clean', track=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
