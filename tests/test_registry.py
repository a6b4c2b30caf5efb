"""Specification of llm.mlops.registry and llm.mlops.pyfunc: versions of ``gpt``, promotion, URIs, the pyfunc model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from llm.config import ModelConfig, TokenizerParams
from llm.data.tokenizer import train_tokenizer
from llm.mlops.registry import (
    MODEL_NAME,
    ONNX_ARTIFACT,
    ONNX_TAG,
    RegistrationError,
    RegistryError,
    attach_onnx_export,
    checkpoint_weights_sha256,
    compare_and_promote,
    decide,
    production_version,
    promote,
    recorded_decision,
    register_checkpoint,
    resolve_model,
)
from llm.mlops.tracking import configure_mlflow, stage_run
from llm.model.checkpoint import TrainState, save_checkpoint, verify_checkpoint
from llm.model.gpt import GPT


def tiny_checkpoint(path: Path, seed: int, step: int, *, with_train_state: bool = False) -> Path:
    tokenizer = train_tokenizer(TokenizerParams(kind="byte"), [])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=16)
    torch.manual_seed(seed)
    model = GPT(config)
    state = None
    if with_train_state:
        optimizer = torch.optim.AdamW(model.parameters())
        state = TrainState(step=step, optimizer=optimizer.state_dict(), rng={"cpu": torch.get_rng_state()})
    return save_checkpoint(path, model, config, tokenizer, train_state=state, metadata={"step": step})


def _use_db(monkeypatch, db: Path, cwd: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_CACHE_DIR", str(cwd / "cache"))
    monkeypatch.chdir(cwd)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, empty_mlflow_db) -> dict:
    """A database holding versions 1 and 2 of ``gpt``, registered from two tiny checkpoints."""
    root = tmp_path_factory.mktemp("registered")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    out: dict = {"db": root / "mlflow.db", "checkpoints": [], "runs": []}
    with pytest.MonkeyPatch.context() as mp:
        _use_db(mp, root / "mlflow.db", root)
        for i in (1, 2):
            ckpt = tiny_checkpoint(root / f"ckpt{i}", seed=i, step=10 * i, with_train_state=True)
            with stage_run("pretrain", {"seed": i}) as run:
                version = register_checkpoint(ckpt, run_id=run.run_id, tags={"llm.stage": "pretrain", "extra": "x"})
            assert version == str(i)
            out["checkpoints"].append(ckpt)
            out["runs"].append(run.run_id)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, empty_mlflow_db) -> dict:
    """A database of its own holding version 1 of ``gpt`` with an ONNX export attached (fp32 and int8).
    Attaching writes into the run's artifacts, which ``registered`` shares between its tests: hence a second one."""
    from llm.inference.export import export_onnx

    root = tmp_path_factory.mktemp("exported")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        _use_db(mp, root / "mlflow.db", root)
        ckpt = tiny_checkpoint(root / "ckpt", seed=3, step=30)
        with stage_run("finetune", {"seed": 3}) as run:
            version = register_checkpoint(ckpt, run_id=run.run_id, tags={"llm.stage": "finetune"})
        export_onnx(ckpt, root / "onnx", quantize=True, verify=False)  # parity is test_export's business
        attach_onnx_export(version, run.run_id, root / "onnx")
    return {"db": root / "mlflow.db", "root": root, "onnx": root / "onnx", "run": run.run_id, "version": version}


@pytest.fixture
def with_export(exported, tmp_path, monkeypatch) -> dict:
    """``exported``, with a copy of its database of the test's own."""
    shutil.copy(exported["db"], tmp_path / "mlflow.db")
    _use_db(monkeypatch, tmp_path / "mlflow.db", tmp_path)
    return exported


@pytest.fixture
def registry(registered, tmp_path, monkeypatch) -> dict:
    """Each test gets its own copy of the database (artifacts are shared read-only)."""
    shutil.copy(registered["db"], tmp_path / "mlflow.db")
    _use_db(monkeypatch, tmp_path / "mlflow.db", tmp_path)
    return registered


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_registered_versions_carry_lineage_tags_and_the_run(registry):
    client = MlflowClient()
    version = client.get_model_version(MODEL_NAME, "2")
    assert version.run_id == registry["runs"][1]
    tags = version.tags
    assert tags["stage"] == "pretrain" and tags["llm.stage"] == "pretrain" and tags["extra"] == "x"
    assert {"git.commit", "dvc.data_hash", "params.hash", "run_id", "checkpoint.step"} <= set(tags)
    assert tags["run_id"] == registry["runs"][1]
    assert tags["checkpoint.step"] == "20"
    assert client.get_run(registry["runs"][1]).data.tags["registered_model.version"] == "gpt/2"


def test_registering_the_same_checkpoint_again_reuses_its_version(registry):
    checkpoint = registry["checkpoints"][0]
    with stage_run("pretrain", {"seed": 1}) as rerun:  # a rerun stage or a retried task: a new run
        again = register_checkpoint(checkpoint, run_id=rerun.run_id, tags={"llm.stage": "pretrain"})
    assert again == "1"
    client = MlflowClient()
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")) == ["1", "2"]
    assert client.get_model_version(MODEL_NAME, "1").tags["checkpoint.weights_sha256"] == \
        checkpoint_weights_sha256(checkpoint) == json.loads((checkpoint / "manifest.json").read_text())[
            "model.safetensors"]["sha256"]
    assert client.get_run(rerun.run_id).data.tags["registered_model.version"] == "gpt/1"


def test_registration_tries_again_while_the_store_does_not_answer(registry, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt3", seed=3, step=30)
    refused, register_model = [], mlflow.register_model

    def unavailable_twice(*args, **kwargs):
        if len(refused) < 2:
            refused.append(1)
            raise MlflowException("API request to http://tracking:5000/api/2.0/mlflow/model-versions/create "
                                  "failed with exception Connection refused")
        return register_model(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", unavailable_twice)
    with stage_run("pretrain", {"seed": 3}) as run:
        version = register_checkpoint(checkpoint, run_id=run.run_id, tags={}, first_delay_s=0.01)
    assert version == "3" and len(refused) == 2
    client = MlflowClient()
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")) == ["1", "2", "3"]
    assert len(client.get_run(run.run_id).outputs.model_outputs) == 1  # logged once, registered on the third try


def test_registration_that_never_reaches_the_store_says_how_to_register_later(tmp_path, monkeypatch):
    import socket

    checkpoint = tiny_checkpoint(tmp_path / "pretrain", seed=1, step=10, with_train_state=True)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each try fails at once
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with pytest.raises(RegistrationError) as err:
        register_checkpoint(checkpoint, run_id="0123456789abcdef0123456789abcdef", tags={}, attempts=3,
                            first_delay_s=0.01)
    message = str(err.value)
    assert "\n" not in message and f"http://127.0.0.1:{port}" in message and "3 tries" in message
    assert "The checkpoint is complete (step 10)" in message
    assert f"`llm register --model {checkpoint}`" in message
    assert verify_checkpoint(checkpoint)["step"] == 10


def test_resolved_checkpoint_is_complete_and_leaves_out_train_state(registry):
    folder = resolve_model("models:/gpt/1")
    assert not (folder / "train_state").exists()
    assert verify_checkpoint(folder) == _config(registry["checkpoints"][0])
    assert resolve_model("models:/gpt/1") == folder  # cached


def test_every_uri_form_resolves_to_the_promoted_checkpoint(registry, tmp_path):
    first, second = (_config(c) for c in registry["checkpoints"])
    assert first != second
    promote("2", reason="better", scores={"val/bpb": 1.5})

    for uri in ("models:/gpt/Production", "models:/gpt@production", "models:/gpt/2", "models:/gpt/latest",
                f"runs:/{registry['runs'][1]}/model"):
        assert _config(resolve_model(uri)) == second, uri
    assert _config(resolve_model("models:/gpt/1")) == first
    assert _config(resolve_model(f"runs:/{registry['runs'][0]}/model")) == first
    assert _config(resolve_model("models:/gpt/1", dst=tmp_path / "here")) == first
    assert resolve_model(registry["checkpoints"][0]) == registry["checkpoints"][0]

    tags = MlflowClient().get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.reason"] == "better"
    assert float(tags["promotion.score.val/bpb"]) == 1.5


def test_promote_archives_the_previous_production_version(registry):
    promote("1", reason="first", scores={})
    promote("2", reason="second", scores={})
    client = MlflowClient()
    assert client.get_model_version(MODEL_NAME, "1").current_stage == "Archived"
    assert client.get_model_version(MODEL_NAME, "2").current_stage == "Production"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "production").version) == "2"
    assert str(production_version().version) == "2"
    assert client.get_model_version(MODEL_NAME, "2").tags["promotion.previous"] == "1"


def test_compare_and_promote_keeps_the_better_model(registry):
    assert production_version() is None
    first = compare_and_promote("1", 2.0, None, metric="val/bpb")
    assert first["promoted"] and first["production"] is None and str(production_version().version) == "1"

    better = compare_and_promote("2", 1.5, 2.0, metric="val/bpb")
    assert better == {"promoted": True, "candidate": "2", "production": "1", "metric": "val/bpb",
                      "candidate_score": 1.5, "production_score": 2.0, "reason": better["reason"],
                      "time": better["time"]}
    assert str(production_version().version) == "2"
    tags = MlflowClient().get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.promoted"] == "true" and float(tags["promotion.score.baseline.val/bpb"]) == 2.0
    assert json.loads(tags["promotion.decision"]) == better
    assert MlflowClient().get_model_version(MODEL_NAME, "1").tags["promotion.replaced_by"] == "2"
    with pytest.raises(RegistryError, match="no version 7"):
        compare_and_promote("7", 0.1, 1.5, metric="val/bpb")
    with pytest.raises(RegistryError, match="no version 7"):
        promote("7", reason="x", scores={})


def test_decide_promotes_only_a_strictly_better_candidate():
    assert decide("2", 1.5, "1", 2.0, metric="val/bpb") == (
        True, "val/bpb 1.5000 beats Production version 1 (2.0000; lower is better)")
    assert decide("2", 2.0, "1", 2.0, metric="val/bpb")[0] is False  # a tie keeps Production
    assert decide("2", 2.5, "1", 2.0, metric="val/bpb")[0] is False
    assert decide("2", 1.0, "1", None, metric="val/bpb")[0] is False  # nothing to compare with
    assert decide("2", float("nan"), None, None, metric="val/bpb")[0] is False
    assert decide("2", 3.0, None, None, metric="val/bpb")[0] is True  # no Production yet
    assert decide("2", 0.5, "1", 0.9, metric="acc", lower_is_better=False)[0] is False
    assert decide("2", 0.95, "1", 0.9, metric="acc", lower_is_better=False)[0] is True
    assert decide("1", 0.1, "1", 0.5, metric="val/bpb") == (False, "version 1 is already Production")


def test_scores_that_cannot_be_compared_never_promote_and_say_how_to_promote_by_hand(registry):
    """Issue 22, item 1: another kind of model or other text is not compared; the reason names `llm promote`."""
    why = "Production version 1 is a chat model and this one a base model"
    assert decide("2", 0.5, "1", None, metric="val/bpb", incomparable=why) == (
        False, f"val/bpb 0.5000 not compared with Production version 1: {why}; Production unchanged (to promote "
               "version 2 anyway: `llm promote 2`)")
    assert decide("2", 0.5, None, None, metric="val/bpb", incomparable=why)[0] is True  # nothing to compare with

    compare_and_promote("1", 2.0, None, metric="chat/assistant_bpb")
    kept = compare_and_promote("2", 0.5, None, metric="val/bpb", incomparable=why, text="the val split")
    assert not kept["promoted"] and kept["text"] == "the val split" and str(production_version().version) == "1"
    tags = MlflowClient().get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.promoted"] == "false" and float(tags["promotion.score.val/bpb"]) == 0.5
    assert "`llm promote 2`" in tags["promotion.reason"]
    assert "- Scored on: the val split" in MlflowClient().get_model_version(MODEL_NAME, "2").description

    from typer.testing import CliRunner

    from llm.cli import app

    by_hand = CliRunner().invoke(app, ["promote", "2", "--why", "the BPE one"])
    assert by_hand.exit_code == 0, by_hand.output
    assert str(production_version().version) == "2"
    assert recorded_decision("2")["reason"] == "promoted by hand (llm promote): the BPE one"
    again = compare_and_promote("2", 0.5, None, metric="val/bpb")  # a later evaluation keeps it
    assert again["promoted"] and again["reason"].startswith("promoted by hand")


def test_a_recorded_decision_returned_again_names_the_production_of_now(registry):
    """Issue 22, item 12: an old decision message named an outdated Production version."""
    compare_and_promote("1", 2.0, None, metric="val/bpb")
    rejected = compare_and_promote("2", 2.5, 2.0, metric="val/bpb")
    assert compare_and_promote("2", 2.5, 2.0, metric="val/bpb") == rejected  # Production unchanged: as recorded
    promote("2", reason="by hand", scores={})
    again = compare_and_promote("1", 2.0, None, metric="val/bpb")
    assert again["reason"].endswith("; Production is now version 2)") and again["production_now"] == "2"
    assert recorded_decision("1")["reason"] == "no Production version yet; val/bpb 2.0000"  # the record stays


def test_a_decided_candidate_keeps_its_decision_when_evaluated_again(registry):
    promoted = compare_and_promote("1", 2.0, None, metric="val/bpb")
    rejected = compare_and_promote("2", 2.5, 2.0, metric="val/bpb")
    assert not rejected["promoted"] and str(production_version().version) == "1"
    assert MlflowClient().get_model_version(MODEL_NAME, "2").tags["promotion.promoted"] == "false"

    # a rerun stage or a retried task scores again, maybe differently: the decision taken stands
    assert compare_and_promote("2", 1.0, 2.0, metric="val/bpb") == rejected
    assert compare_and_promote("1", 9.0, 1.0, metric="val/bpb") == promoted  # not "already Production"
    assert recorded_decision("2") == rejected and recorded_decision("1") == promoted
    assert str(production_version().version) == "1"
    versions = MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]


def test_a_promotion_interrupted_after_its_decision_is_carried_out_by_the_retry(registry):
    compare_and_promote("1", 2.0, None, metric="val/bpb")
    decision = {"promoted": True, "candidate": "2", "production": "1", "metric": "val/bpb",
                "candidate_score": 1.5, "production_score": 2.0, "reason": "val/bpb 1.5000 beats 1"}
    # the state a crash leaves between recording the decision and promoting
    MlflowClient().set_model_version_tag(MODEL_NAME, "2", "promotion.decision", json.dumps(decision))
    assert str(production_version().version) == "1"

    assert compare_and_promote("2", 1.5, 2.0, metric="val/bpb") == decision
    assert str(production_version().version) == "2"
    assert MlflowClient().get_model_version(MODEL_NAME, "2").current_stage == "Production"
    assert compare_and_promote("2", 1.5, 2.0, metric="val/bpb") == decision  # and only once


def test_missing_database_model_and_version_are_one_line_registry_errors(registry, tmp_path, monkeypatch,
                                                                         empty_mlflow_db):
    def message(uri: str) -> str:
        with pytest.raises(RegistryError) as err:
            resolve_model(uri)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "no version 9" in message("models:/gpt/9") and "versions: 1, 2" in message("models:/gpt/9")
    assert "stage Production" in message("models:/gpt/Production")
    assert "no alias 'production'" in message("models:/gpt@production")
    assert "no run" in message("runs:/0123456789abcdef0123456789abcdef/model")
    assert "no model named 'other'" in message(f"runs:/{registry['runs'][0]}/other")
    assert "no such checkpoint folder" in message(str(tmp_path / "nowhere"))

    shutil.copy(empty_mlflow_db, tmp_path / "empty.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert "no model 'gpt' in the registry at sqlite:///" in message("models:/gpt/1")
    assert "dvc repro" in message("models:/gpt/1")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
    text = message("models:/gpt/Production")
    assert "no MLflow tracking database" in text and "llm pretrain" in text
    assert not (tmp_path / "absent.db").exists()
    assert production_version() is None


def test_pyfunc_model_generates_strings_from_prompts_and_messages(registry):
    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    out = model.predict(pd.DataFrame({"prompt": ["hi"], "max_new_tokens": [5]}))
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)

    greedy = pd.DataFrame({"prompt": ["hello", "bye"], "max_new_tokens": [4, None], "temperature": [0.0, 0.0]})
    assert model.predict(greedy) == model.predict(greedy)
    chat = [{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3, "seed": 1}, {"prompt": "x"}]
    assert all(isinstance(s, str) for s in model.predict(chat, params={"max_new_tokens": 2}))


def _greedy_text(generator, prompt: str, max_new_tokens: int) -> str:
    """What a served model should answer for ``prompt`` with greedy decoding through ``generator``."""
    from llm.data.chat_template import generation_stop_ids
    from llm.inference.decoding import SamplingParams, stream_text

    tok = generator.tokenizer
    stop = generation_stop_ids(tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop)
    return "".join(stream_text(generator.stream_generate([tok.bos_id, *tok.encode(prompt)], params), tok, stop))


def test_pyfunc_generates_with_onnx_runtime_when_an_export_is_attached(with_export):
    from llm.inference.onnx_runtime import OnnxGenerator

    configure_mlflow()
    assert MlflowClient().get_model_version(MODEL_NAME, "1").tags[ONNX_TAG].endswith(f"/{ONNX_ARTIFACT}")
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    served = model.unwrap_python_model()
    assert served.engine == "onnx" and isinstance(served.generator, OnnxGenerator)
    assert served.generator.model_path.name == "model.int8.onnx"  # the export has an int8 model: it is used
    expected = [_greedy_text(OnnxGenerator(with_export["onnx"], int8=True), p, 6) for p in ("hi", "Once upon")]
    request = pd.DataFrame({"prompt": ["hi", "Once upon"], "max_new_tokens": [6, 6], "temperature": [0.0, 0.0]})
    assert model.predict(request) == expected


def test_rows_and_concurrent_requests_of_the_onnx_pyfunc_decode_together(with_export):
    """The scoring server runs predict in threads: the rows of requests answered at once share the batch."""
    from concurrent.futures import ThreadPoolExecutor

    from llm.inference.onnx_runtime import OnnxGenerator

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    prompts = [["hi", "Once upon", "the", "a"], ["to be", "or not", "x", "y z"]]
    generator = OnnxGenerator(with_export["onnx"], int8=True)
    expected = [[_greedy_text(generator, p, 12) for p in request] for request in prompts]
    frames = [pd.DataFrame({"prompt": request, "max_new_tokens": [12] * 4, "temperature": [0.0] * 4})
              for request in prompts]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(model.predict, frames)) == expected
    sizes = model.unwrap_python_model().batch_engine.batch_sizes
    assert max(sizes) >= 4  # at least one request's rows decoded in one batch


def test_min_new_tokens_reaches_the_pyfunc_through_its_signature(with_export):
    """A column the signature lacks is dropped by MLflow before predict sees it."""
    from llm.data.chat_template import generation_stop_ids
    from llm.inference.decoding import SamplingParams
    from llm.inference.onnx_runtime import OnnxGenerator

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    generator = OnnxGenerator(with_export["onnx"], int8=True)
    tok = generator.tokenizer
    stop = generation_stop_ids(tok)
    params = SamplingParams(max_new_tokens=30, min_new_tokens=30, temperature=0.0, stop_ids=stop)
    ids = generator.generate([tok.bos_id, *tok.encode("hi")], params)
    request = pd.DataFrame({"prompt": ["hi"], "max_new_tokens": [30], "min_new_tokens": [30], "temperature": [0.0]})
    assert len(ids) == 30 and model.predict(request) == [tok.decode(ids, skip_special=True)]
    assert "min_new_tokens" in model.metadata.get_input_schema().input_names()
    assert "min_new_tokens" in [p.name for p in model.metadata.get_params_schema().params]


def test_the_pyfunc_looks_for_the_export_where_the_registry_attaches_it():
    from llm.inference import onnx_runtime
    from llm.mlops import pyfunc, registry

    # pyfunc.py repeats these names: importing the registry would import torch on the ONNX path
    assert (pyfunc.MODEL_NAME, pyfunc.ONNX_TAG, pyfunc.ONNX_ARTIFACT) == (MODEL_NAME, ONNX_TAG, ONNX_ARTIFACT)
    assert pyfunc.GENERATION_CONFIG == onnx_runtime.CONFIG_FILE
    pinned = {r.split("==")[0] for r in registry._requirements()}
    assert {"pyyaml", "onnxruntime"} <= pinned  # serving reads the MLmodel file; generates with ONNX Runtime


def test_pyfunc_engine_can_be_forced_and_an_export_folder_named(with_export, registry, monkeypatch):
    configure_mlflow()
    monkeypatch.setenv("LLM_SERVE_ENGINE", "onnx")
    with pytest.raises(MlflowException, match="LLM_SERVE_ENGINE=onnx, but no ONNX export"):
        mlflow.pyfunc.load_model("models:/gpt/1")  # ``registry``'s version 1 has none
    monkeypatch.setenv("LLM_SERVE_ONNX_DIR", str(with_export["onnx"]))
    served = mlflow.pyfunc.load_model("models:/gpt/1").unwrap_python_model()
    assert served.engine == "onnx" and served.export_dir == with_export["onnx"]
    monkeypatch.setenv("LLM_SERVE_ENGINE", "torch")
    assert mlflow.pyfunc.load_model("models:/gpt/1").unwrap_python_model().engine == "torch"


def test_the_pyfunc_says_on_stderr_which_engine_serves(with_export, registry, capfd, monkeypatch):
    """`mlflow models serve` showed no INFO line, so it never said ONNX Runtime or PyTorch (issue 22, item 12)."""
    import logging

    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    configure_mlflow()
    monkeypatch.setenv("LLM_SERVE_ONNX_DIR", str(with_export["onnx"]))
    mlflow.pyfunc.load_model("models:/gpt/1")
    assert f"llm: serving with ONNX Runtime: {with_export['onnx']}" in capfd.readouterr().err
    monkeypatch.setenv("LLM_SERVE_ENGINE", "torch")
    mlflow.pyfunc.load_model("models:/gpt/1")
    assert "llm: serving with PyTorch: " in capfd.readouterr().err


def test_pyfunc_falls_back_to_torch_with_one_line_saying_why(registry, caplog):
    from llm.inference.generate import TorchGenerator

    configure_mlflow()
    with caplog.at_level("WARNING"):
        model = mlflow.pyfunc.load_model("models:/gpt/1")
    served = model.unwrap_python_model()
    assert served.engine == "torch" and isinstance(served.generator, TorchGenerator)
    why = [r.getMessage() for r in caplog.records if "serving with PyTorch" in r.getMessage()]
    assert len(why) == 1 and "no ONNX export" in why[0] and "\n" not in why[0]
    request = pd.DataFrame({"prompt": ["hi"], "max_new_tokens": [5], "temperature": [0.0]})
    assert model.predict(request) == [_greedy_text(served.generator, "hi", 5)]


def test_the_onnx_path_of_the_pyfunc_never_imports_torch(with_export, tmp_path):
    import os
    import subprocess
    import sys

    script = (
        "import sys, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is hidden in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model('models:/gpt/1')\n"
        "assert model.unwrap_python_model().engine == 'onnx'\n"
        "print(model.predict([{'prompt': 'hi', 'max_new_tokens': 3}]))\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.pipeline
def test_chat_with_the_onnx_backend_resolves_the_production_export_without_torch(with_export, tmp_path):
    """The README's `python -m llm.chat --model models:/gpt/Production --backend onnx` on a box without
    PyTorch (issue 22, item 3): torch is hidden from the subprocess; the answer comes from onnxruntime."""
    import os
    import subprocess
    import sys

    promote(with_export["version"], reason="test", scores={})
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError('torch is hidden in this test', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(repo)])}
    command = [sys.executable, "-m", "llm.chat", "--model", "models:/gpt/Production", "--backend", "onnx",
               "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith("\n") and "error" not in result.stderr  # an answer line (a random model's)
    torch_path = subprocess.run([*command[:3], "--model", "models:/gpt/Production", "--prompt", "hi"], env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert torch_path.returncode == 1 and "install torch" in torch_path.stderr  # the torch backend names torch


def test_requests_beyond_the_row_and_size_limits_get_short_400s(with_export, monkeypatch):
    from mlflow.pyfunc.scoring_server import invocations

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    with pytest.raises(MlflowException, match=r"17 rows, above this server's limit of 16 .*LLM_SERVE_MAX_ROWS") as err:
        model.predict(pd.DataFrame({"prompt": ["hi"] * 17, "max_new_tokens": [1] * 17}))
    assert err.value.get_http_status_code() == 400
    huge = "Sonnet " * 1_000_000  # 7 MB
    for request in (pd.DataFrame({"prompt": [huge]}), [{"messages": [{"role": "user", "content": huge}]}]):
        with pytest.raises(MlflowException, match="LLM_SERVE_MAX_PROMPT_BYTES") as err:
            model.predict(request)
        assert err.value.get_http_status_code() == 400
        assert len(err.value.message) < 300 and "Sonnet" not in err.value.message
    # the scoring server puts the whole input into the message of an MlflowException: not into these
    schema = model.metadata.get_input_schema()
    for body in ({"inputs": {"prompt": [huge]}}, {"dataframe_records": [{"prompt": huge}]},
                 {"dataframe_records": [{"prompt": "hi", "max_new_tokens": 1}] * 2000}):
        with pytest.raises(MlflowException) as err:
            invocations(json.dumps(body), "application/json", model, schema)
        answer = err.value.serialize_as_json()
        assert err.value.get_http_status_code() == 400 and len(answer) < 400, answer[:500]
        assert "Sonnet" not in answer and "stack_trace" not in answer
    monkeypatch.setenv("LLM_SERVE_MAX_ROWS", "2000")
    monkeypatch.setenv("LLM_SERVE_MAX_PROMPT_BYTES", str(10**8))
    wide = mlflow.pyfunc.load_model("models:/gpt/1").unwrap_python_model()
    assert (wide.max_rows, wide.max_prompt_bytes) == (2000, 10**8)


def test_tiny_temperatures_and_huge_seeds_answer_without_an_unexpected_error(with_export):
    from mlflow.pyfunc.scoring_server import invocations

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    schema = model.metadata.get_input_schema()
    body = {"dataframe_records": [{"prompt": "hi", "max_new_tokens": 4, "temperature": 1e-40, "seed": 2**63 - 1}]}
    response = invocations(json.dumps(body), "application/json", model, schema)
    greedy = model.predict([{"prompt": "hi", "max_new_tokens": 4, "temperature": 0.0}])
    assert response.status == 200 and json.loads(response.response)["predictions"] == greedy
    body = {"dataframe_records": [{"prompt": "hi", "max_new_tokens": 4, "seed": 2**70}]}
    with pytest.raises(MlflowException, match="seed: Input should be less than") as err:
        invocations(json.dumps(body), "application/json", model, schema)
    assert err.value.get_http_status_code() == 400 and "stack_trace" not in err.value.serialize_as_json()


def test_an_unexpected_failure_is_a_500_with_an_error_id_and_no_stack_trace(with_export, caplog):
    from mlflow.pyfunc.scoring_server import invocations

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    served = model.unwrap_python_model()

    def broken(*args, **kwargs):
        raise RuntimeError("the decoder fell over at /secret/path")

    served.generator.forward = broken  # the ONNX engine's decoder call
    body = {"dataframe_records": [{"prompt": "hi"}]}
    with caplog.at_level("ERROR"), pytest.raises(MlflowException, match="generation failed") as err:
        invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    answer = err.value.serialize_as_json()
    assert err.value.get_http_status_code() == 500
    assert "secret" not in answer and "Traceback" not in answer and "stack_trace" not in answer
    error_id = err.value.message.split("error id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)  # the detail stays in the log


def test_messages_are_rendered_with_the_chat_template():
    from llm.data import chat_template
    from llm.mlops.pyfunc import GPTModel

    served = GPTModel()
    served.tokenizer, served.max_prompt_tokens = train_tokenizer(TokenizerParams(kind="byte"), []), 4096
    tokenizer = served.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|assistant|>"}]
    ids = served._prompt_ids({"messages": messages})
    assert ids == chat_template.encode_chat(tokenizer, messages, add_generation_prompt=True)
    assert ids[-1] == tokenizer.assistant_id and ids.count(tokenizer.assistant_id) == 1


def test_oversized_requests_are_refused_as_invalid_parameters(registry):
    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt/1")
    with pytest.raises(MlflowException, match="max_new_tokens=100000 is above") as err:
        model.predict(pd.DataFrame({"prompt": ["hi"], "max_new_tokens": [100_000]}))
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="prompt is .* tokens long") as err:
        model.predict(pd.DataFrame({"prompt": ["a" * 5000]}))
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="temperature"):
        model.predict(pd.DataFrame({"prompt": ["hi"], "temperature": [-1.0]}))
    with pytest.raises(MlflowException, match="'prompt' or a list of 'messages'"):
        model.predict(pd.DataFrame({"prompt": [None], "seed": [1]}))


def test_scoring_server_answers_json_requests_and_400_for_oversized_ones(registry):
    from mlflow.pyfunc.scoring_server import invocations

    configure_mlflow()
    model = mlflow.pyfunc.load_model("models:/gpt@production" if production_version() else "models:/gpt/1")
    schema = model.metadata.get_input_schema()
    body = {"dataframe_records": [{"prompt": "hi", "max_new_tokens": 3}], "params": {"temperature": 0.0}}
    response = invocations(json.dumps(body), "application/json", model, schema)
    assert response.status == 200
    assert len(json.loads(response.response)["predictions"]) == 1

    body = {"dataframe_records": [{"prompt": "hi", "max_new_tokens": 4096}]}
    with pytest.raises(MlflowException, match="above this server's limit") as err:
        invocations(json.dumps(body), "application/json", model, schema)
    assert err.value.get_http_status_code() == 400


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http_with_onnx_runtime_and_refuses_bad_requests_briefly(with_export,
                                                                                                 tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    promote("1", reason="served by the test", scores={})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gpt/Production",
             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the scoring server did not start in 120 s"
                time.sleep(0.5)
        status, answer = post({"dataframe_records": [{"prompt": "hi", "max_new_tokens": 3}]})
        assert status == 200 and isinstance(answer["predictions"][0], str)
        status, answer = post({"dataframe_records": [{"messages": [{"role": "user", "content": "hey"}]}],
                               "params": {"max_new_tokens": 2, "temperature": 0.0}})
        assert status == 200 and len(answer["predictions"]) == 1
        status, answer = post({"dataframe_records": [{"prompt": "hi", "max_new_tokens": 100_000}]})
        assert status == 400
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and "limit of 512" in answer["message"]
        status, answer = post({"dataframe_records": [{"prompt": "x" * 5000, "max_new_tokens": 1}]})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        status, answer = post({"dataframe_records": [{"prompt": "hi", "max_new_tokens": 1}] * 2000})
        assert status == 400 and "LLM_SERVE_MAX_ROWS" in answer["message"] and len(json.dumps(answer)) < 400
        status, answer = post({"inputs": {"prompt": ["Sonnet " * 1_000_000]}})  # 7 MB
        assert status == 400 and "LLM_SERVE_MAX_PROMPT_BYTES" in answer["message"]
        assert len(json.dumps(answer)) < 400 and "Sonnet" not in answer["message"]
        status, answer = post({"dataframe_records": [{"prompt": "hi", "max_new_tokens": 2, "temperature": 1e-40}]})
        assert status == 200 and len(answer["predictions"]) == 1
        status, answer = post({"dataframe_records": [{"prompt": "hi", "max_new_tokens": 2, "seed": 2**70}]})
        assert status == 400 and "seed" in answer["message"] and "stack_trace" not in answer
        assert "serving with PyTorch" not in (tmp_path / "serve.log").read_text()  # it fell back to torch otherwise
    finally:
        os.killpg(server.pid, 15)  # the server runs uvicorn in a child: end its whole session
        server.wait(timeout=30)


def test_a_lora_version_records_its_base_and_resolves_to_the_merged_model(registry, tmp_path):
    from llm.config import LoRAParams
    from llm.model.checkpoint import base_identity, load_checkpoint
    from llm.model.lora import apply_lora

    base_copy = tmp_path / "base"  # version 1's weights, at a path that will be gone when the version is resolved
    shutil.copytree(registry["checkpoints"][0], base_copy)
    model, tokenizer, _ = load_checkpoint(base_copy)
    lora = LoRAParams(rank=2, targets=["attention"])
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.5)
    adapter_dir = save_checkpoint(tmp_path / "sft", model, model.config, tokenizer, metadata={
        "step": 5, "stage": "finetune", "adapter": {"lora": lora.model_dump(), "base": base_identity(base_copy)}})
    expected = load_checkpoint(adapter_dir).model(torch.arange(8)[None]).logits
    with stage_run("finetune", {"seed": 9}) as run:
        version = register_checkpoint(adapter_dir, run_id=run.run_id, tags={"llm.stage": "finetune"})
    tags = MlflowClient().get_model_version(MODEL_NAME, version).tags
    assert tags["lora.base_version"] == "1" and tags["finetune.method"] == "lora" and tags["lora.rank"] == "2"
    assert tags["lora.base_weights_sha256"] == base_identity(base_copy)["weights_sha256"]
    assert (adapter_dir / "adapter.safetensors").stat().st_size < (base_copy / "model.safetensors").stat().st_size

    shutil.rmtree(base_copy)
    folder = resolve_model(f"models:/gpt/{version}")  # the base comes from version 1 now
    assert (folder / "model.safetensors").is_file() and folder.name.endswith("-merged")
    with torch.no_grad():
        logits = load_checkpoint(folder).model(torch.arange(8)[None]).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    assert resolve_model(f"models:/gpt/{version}") == folder  # made once
