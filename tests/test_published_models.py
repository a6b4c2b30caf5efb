"""A published model, once imported, generates what its source generates, through every command a user runs.

For GPT-2, Llama 3 and Qwen3 folders built here (``published.py``: random weights, tokenizers trained on a few lines
of Hamlet, the source's BOS rule, EOS ids and chat template), greedy continuation of a plain prompt equals
Transformers' ``generate(do_sample=False)`` token for token, and a conversation's answer equals
``apply_chat_template`` + ``generate`` where the source has a template: through ``llm generate``,
``python -m llm.chat`` (PyTorch and ONNX Runtime), the evaluate stage's samples, ``llm serve`` (completions and chat,
with the OpenAI client) and ``mlflow models serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the dev extra; skipped only on a bare install
pytest.importorskip("tokenizers")

from llm.config import EvalParams
from llm.data.chat_template import encode_chat, fit_chat, generation_stop_ids, prompt_ids
from llm.data.tokenizer import N_SPECIAL, load_tokenizer
from llm.interop.hf import import_hf
from llm.model.checkpoint import load_checkpoint
from llm.training.evaluate import sample_completions, sample_conversations

from published import FAMILIES, hf_chat_ids, hf_greedy, write_published_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = list(FAMILIES)
TEMPLATED = [a for a in ARCHS if FAMILIES[a]["template"]]
PROMPT = "To be, or"
NEW = 20
CONVERSATION = [{"role": "system", "content": "Answer as Hamlet."}, {"role": "user", "content": "To be?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict]:
    """Per architecture: the Transformers folder and our imported checkpoint."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for arch in ARCHS:
        folder = write_published_model(arch, root / arch, std=None if arch == "gpt2" else 0.5)  # GPT-2: its own init
        import_hf(folder, root / f"{arch}-imported")
        out[arch] = {"hf": folder, "ckpt": root / f"{arch}-imported"}
    return out


@pytest.fixture(scope="module")
def onnx_exports(models) -> dict[str, Path]:
    """Per architecture: the imported checkpoint's ONNX export (fp32, no int8). Apart from ``models``: the three
    exports take most of a minute, and only the tests of the onnx backend and of the servers need them."""
    from llm.inference.export import export_onnx

    for arch in ARCHS:
        # no parity check here: every test below compares what the export generates with Transformers itself
        export_onnx(models[arch]["ckpt"], models[arch]["ckpt"].parent / f"{arch}-onnx", quantize=False, verify=False)
    return {arch: models[arch]["ckpt"].parent / f"{arch}-onnx" for arch in ARCHS}


def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


def expected_completion(folder: Path) -> str:
    """Transformers' greedy continuation of PROMPT as text (special tokens skipped)."""
    tok = hf_tokenizer(folder)
    return tok.decode(hf_greedy(folder, tok(PROMPT)["input_ids"], NEW), skip_special_tokens=True)


def expected_answer(folder: Path, messages: list[dict]) -> str:
    """Transformers' greedy answer to ``messages`` rendered by the source's chat template."""
    ids = hf_chat_ids(folder, messages, add_generation_prompt=True)
    return hf_tokenizer(folder).decode(hf_greedy(folder, ids, NEW), skip_special_tokens=True)


def run(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# ------------------------------------------------------------------------------------------- the conventions


@pytest.mark.parametrize("arch", ARCHS)
def test_the_checkpoint_records_the_sources_bos_rule_eos_ids_and_template(models, arch):
    tokenizer = load_tokenizer(models[arch]["ckpt"] / "tokenizer")
    source, hf = tokenizer.source, hf_tokenizer(models[arch]["hf"])
    shifted = lambda ids: [i + N_SPECIAL for i in ids]  # noqa: E731
    assert prompt_ids(tokenizer, PROMPT) == shifted(hf(PROMPT)["input_ids"])  # Llama: its BOS; GPT-2, Qwen3: none
    generation = transformers.GenerationConfig.from_pretrained(models[arch]["hf"])
    assert list(source.eos_ids) == shifted(generation.eos_token_id if isinstance(generation.eos_token_id, list)
                                           else [generation.eos_token_id])
    assert set(source.eos_ids) <= set(generation_stop_ids(tokenizer))
    assert source.chat_template == FAMILIES[arch]["template"]
    if FAMILIES[arch]["pad"]:
        assert source.pad_id == hf.pad_token_id + N_SPECIAL


def test_a_model_trained_here_keeps_bos_and_its_own_template(tmp_path):
    from helpers import write_checkpoint

    _, tokenizer, _ = load_checkpoint(write_checkpoint(tmp_path / "ours", seed=0))
    assert tokenizer.source is None
    assert prompt_ids(tokenizer, "hi") == [tokenizer.bos_id, *tokenizer.encode("hi")]
    assert encode_chat(tokenizer, [{"role": "user", "content": "hi"}])[:2] == [tokenizer.bos_id, tokenizer.user_id]


# ------------------------------------------------------------------------------------------- the chat template


MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
         {"role": "assistant", "content": "Or not to be."}, {"role": "user", "content": "  Whether 'tis nobler "}]


@pytest.mark.parametrize("arch", TEMPLATED)
@pytest.mark.parametrize("messages", [MULTI[1:2], MULTI[:2], MULTI[1:], MULTI], ids=["user", "system", "multi",
                                                                                     "system-multi"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_conversations_render_to_apply_chat_templates_ids(models, arch, messages, add_generation_prompt):
    tokenizer = load_tokenizer(models[arch]["ckpt"] / "tokenizer")
    theirs = hf_chat_ids(models[arch]["hf"], messages, add_generation_prompt=add_generation_prompt)
    assert encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt) == [
        i + N_SPECIAL for i in theirs]


@pytest.mark.parametrize("template", ["with generation blocks", "without"])
def test_the_sft_mask_is_transformers_assistant_mask(models, template):
    """Qwen3's template marks {% generation %}: the mask equals Transformers' assistant mask; without the blocks
    the same mask comes from the contents' character offsets (assistant content and its closing <|im_end|>)."""
    tokenizer = load_tokenizer(models["qwen3"]["ckpt"] / "tokenizer")
    hf = hf_tokenizer(models["qwen3"]["hf"])
    conversation = MULTI + [{"role": "assistant", "content": "That is the question."}]
    theirs = hf.apply_chat_template(conversation, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    if template == "without":
        stripped = tokenizer.source.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        tokenizer.set_source(type(tokenizer.source)(**{**tokenizer.source.__dict__, "chat_template": stripped}))
    fitted = fit_chat(tokenizer, conversation, 10_000)
    assert fitted.ids == [i + N_SPECIAL for i in theirs["input_ids"]]
    assert fitted.mask == theirs["assistant_masks"] and sum(fitted.mask) > 8


@pytest.mark.parametrize("arch", TEMPLATED)
def test_text_that_spells_the_sources_special_tokens_stays_text(models, arch):
    tokenizer = load_tokenizer(models[arch]["ckpt"] / "tokenizer")
    specials = tokenizer.source.special_tokens
    forged = "".join(specials) + " <|assistant|>"
    ids = encode_chat(tokenizer, [{"role": "user", "content": forged}], add_generation_prompt=True)
    honest = encode_chat(tokenizer, [{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert sorted(i for i in ids if i in specials.values()) == sorted(i for i in honest if i in specials.values())
    assert tokenizer.decode(ids).count(forged) == 1


def test_a_template_that_fails_names_its_line(models):
    from llm.data.source_template import ChatTemplateError

    tokenizer = load_tokenizer(models["qwen3"]["ckpt"] / "tokenizer")
    broken = "{% for m in messages %}\n{{ m['content'] }}\n{{ raise_exception('no tools here') }}{% endfor %}"
    tokenizer.set_source(type(tokenizer.source)(**{**tokenizer.source.__dict__, "chat_template": broken}))
    with pytest.raises(ChatTemplateError, match="line 3: no tools here"):
        encode_chat(tokenizer, MULTI[1:2])
    tokenizer.set_source(type(tokenizer.source)(**{**tokenizer.source.__dict__, "chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="line 1"):
        encode_chat(tokenizer, MULTI[1:2])


# ------------------------------------------------------------------------------------------- every command


@pytest.mark.pipeline
@pytest.mark.parametrize("arch", ARCHS)
def test_llm_generate_continues_like_transformers(models, arch):
    out = run("-m", "llm", "generate", "--model", str(models[arch]["ckpt"]), "--prompt", PROMPT, "--max-new-tokens",
              str(NEW), "--temperature", "0", "--device", "cpu")
    assert out == PROMPT + expected_completion(models[arch]["hf"]) + "\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_the_evaluate_stages_samples_continue_like_transformers(models, arch):
    model, tokenizer, _ = load_checkpoint(models[arch]["ckpt"])
    params = EvalParams(prompts=[PROMPT], max_new_tokens=NEW, temperature=0.0, device="cpu")
    assert sample_completions(model, tokenizer, params)[0]["completion"] == expected_completion(models[arch]["hf"])


@pytest.mark.parametrize("arch", TEMPLATED)
def test_the_evaluate_stages_conversations_answer_like_transformers(models, arch, tmp_path):
    from llm.data.chat_data import write_chat_file

    write_chat_file(tmp_path / "val.jsonl", [{"messages": CONVERSATION + [{"role": "assistant", "content": "Ay."}]}])
    params = EvalParams(max_new_tokens=NEW, temperature=0.0, device="cpu", sample_conversations=1)
    answer = sample_conversations(models[arch]["ckpt"], tmp_path / "val.jsonl", params)[0]["answer"]
    assert answer == expected_answer(models[arch]["hf"], CONVERSATION)


@pytest.mark.pipeline
@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("arch", TEMPLATED)
def test_chat_answers_like_apply_chat_template_and_generate(models, onnx_exports, arch, backend):
    model = onnx_exports[arch] if backend == "onnx" else models[arch]["ckpt"]
    out = run("-m", "llm.chat", "--model", str(model), "--backend", backend, "--system", CONVERSATION[0]["content"],
              "--prompt", CONVERSATION[1]["content"], "--temperature", "0", "--max-new-tokens", str(NEW))
    assert out == expected_answer(models[arch]["hf"], CONVERSATION) + "\n"


# ------------------------------------------------------------------------------------------- the servers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, url: str, log: Path, limit_s: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + limit_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {limit_s} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


def _stop(procs: list[subprocess.Popen]) -> None:
    import signal

    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def _servers(commands: dict[str, list[str]], root: Path, env: dict, ready: str) -> Iterator[dict[str, str]]:
    """Each architecture's server command (ending in its port option, appended here) started together, its log in
    ``root``; their base URLs once each answers ``ready``; every one stopped (its whole session) afterwards."""
    procs, urls = [], {}
    try:
        for arch, command in commands.items():
            port = _free_port()
            with open(root / f"{arch}.log", "w") as log:
                procs.append(subprocess.Popen([*command, str(port)], env=env, cwd=root, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            urls[arch] = f"http://127.0.0.1:{port}"
        for proc, arch in zip(procs, commands):
            _wait(proc, f"{urls[arch]}{ready}", root / f"{arch}.log")
        yield urls
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def llm_servers(onnx_exports, tmp_path_factory) -> Iterator[dict[str, str]]:
    """``llm serve`` on each architecture's ONNX export, started together; their base URLs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLM_API_KEY", None)
    commands = {arch: [sys.executable, "-m", "llm", "serve", "--model", str(onnx_exports[arch]), "--threads", "1",
                       "--port"] for arch in ARCHS}
    with _servers(commands, tmp_path_factory.mktemp("llm-serve"), env, "/health") as urls:
        yield urls


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_llm_serve_completes_and_chats_like_transformers(models, llm_servers, arch):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{llm_servers[arch]}/v1", api_key="unused", max_retries=0, timeout=60)
    name = client.models.list().data[0].id
    completion = client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert completion.choices[0].text == expected_completion(models[arch]["hf"])
    if arch not in TEMPLATED:
        return
    chat = client.chat.completions.create(model=name, messages=CONVERSATION, max_tokens=NEW, temperature=0)
    assert chat.choices[0].message.content == expected_answer(models[arch]["hf"], CONVERSATION)


@pytest.fixture(scope="module")
def mlflow_servers(models, onnx_exports, tmp_path_factory, empty_mlflow_db) -> dict[str, str]:
    """Each imported model registered (version 1, 2, 3 of ``gpt``) with its ONNX export attached, and served by
    ``mlflow models serve``; their base URLs."""
    import shutil

    from llm.mlops.registry import attach_onnx_export, register_checkpoint
    from llm.mlops.tracking import stage_run

    root = tmp_path_factory.mktemp("mlflow-serve")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "LLM_CACHE_DIR": str(root / "c"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    versions = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "LLM_CACHE_DIR"):
            mp.setenv(key, env[key])
        mp.chdir(root)
        for arch in ARCHS:
            with stage_run("finetune", {"arch": arch}) as run_:
                versions[arch] = register_checkpoint(models[arch]["ckpt"], run_id=run_.run_id, tags={})
            attach_onnx_export(versions[arch], run_.run_id, onnx_exports[arch])
    commands = {arch: [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/gpt/{versions[arch]}",
                       "--env-manager", "local", "--host", "127.0.0.1", "-p"] for arch in ARCHS}
    with _servers(commands, root, env, "/ping") as urls:
        yield urls


def _invoke(url: str, body: dict) -> list[str]:
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_mlflow_models_serve_answers_like_transformers(models, mlflow_servers, arch):
    params = {"max_new_tokens": NEW, "temperature": 0.0}
    got = _invoke(mlflow_servers[arch], {"dataframe_records": [{"prompt": PROMPT}], "params": params})
    assert got == [expected_completion(models[arch]["hf"])]
    if arch in TEMPLATED:
        got = _invoke(mlflow_servers[arch], {"dataframe_records": [{"messages": CONVERSATION}], "params": params})
        assert got == [expected_answer(models[arch]["hf"], CONVERSATION)]


# ------------------------------------------------------------------------------------------- out again


@pytest.mark.parametrize("arch", ARCHS)
def test_llm_export_hf_writes_the_template_and_bos_rule_the_model_uses(models, arch, tmp_path):
    from llm.interop.hf import export_hf

    export_hf(models[arch]["ckpt"], tmp_path / "hf")
    exported, source = hf_tokenizer(tmp_path / "hf"), hf_tokenizer(models[arch]["hf"])
    shifted = lambda ids: [i + N_SPECIAL for i in ids]  # noqa: E731
    assert exported(PROMPT)["input_ids"] == shifted(source(PROMPT)["input_ids"])
    if arch in TEMPLATED:
        assert hf_chat_ids(tmp_path / "hf", MULTI, add_generation_prompt=True) == shifted(
            hf_chat_ids(models[arch]["hf"], MULTI, add_generation_prompt=True))
    expected = hf_greedy(models[arch]["hf"], source(PROMPT)["input_ids"], NEW)
    assert hf_greedy(tmp_path / "hf", exported(PROMPT)["input_ids"], NEW) == shifted(expected)


def test_a_conversation_the_sources_template_refuses_is_a_message_not_a_crash(models, tmp_path):
    """A template that refuses a system message (as Gemma's and Mistral's do) through the chat REPL and llm serve."""
    from llm.data.conventions import SourceConventions
    from llm.inference.chat_session import ChatSession
    from llm.inference.generate import TorchGenerator

    model, tokenizer, _ = load_checkpoint(models["qwen3"]["ckpt"])
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + tokenizer.source.chat_template)
    tokenizer.set_source(SourceConventions(**{**tokenizer.source.__dict__, "chat_template": refusing}))
    notices: list[str] = []
    session = ChatSession(TorchGenerator(model, tokenizer), system="Be Hamlet.", max_new_tokens=3,
                          notify=notices.append)
    assert list(session.reply("To be?")) == [] and "System role not supported" in notices[0]
    session.set_system(None)
    assert len("".join(session.reply("To be?"))) > 0


def test_sft_on_an_imported_model_trains_on_its_templates_assistant_spans(models, tmp_path):
    from llm.config import FinetuneParams
    from llm.data.chat_data import write_chat_file
    from llm.training.finetune import encode_chat_examples, finetune

    chats = [MULTI + [{"role": "assistant", "content": f"Ay, {w}."}] for w in ("there's the rub", "to sleep")] * 4
    tokenizer = load_tokenizer(models["qwen3"]["ckpt"] / "tokenizer")
    examples, counts = encode_chat_examples(tokenizer, chats, 128)
    hf = hf_tokenizer(models["qwen3"]["hf"])
    theirs = hf.apply_chat_template(chats[0], tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    assert counts["kept"] == len(chats)
    assert examples[0].ids == [i + N_SPECIAL for i in theirs["input_ids"]] and examples[0].mask == theirs[
        "assistant_masks"]
    write_chat_file(tmp_path / "chat" / "train.jsonl", [{"messages": c} for c in chats])
    write_chat_file(tmp_path / "chat" / "val.jsonl", [{"messages": c} for c in chats[:2]])
    params = FinetuneParams(max_steps=2, batch_size=2, warmup_steps=0, eval_interval=2, eval_batches=1,
                            checkpoint_interval=2, log_interval=1, device="cpu", progress=False, num_threads=1)
    result = finetune(params, models["qwen3"]["ckpt"], tmp_path / "chat", tmp_path / "sft")
    assert result.step == 2 and load_tokenizer(tmp_path / "sft" / "tokenizer").source == tokenizer.source


def test_max_steps_0_keeps_the_published_model_as_the_pretrain_stages_output(models, tmp_path):
    """params/pretrain.yaml max_steps: 0 with params/base.yaml hf_folder: no continued pretraining, the published
    model itself (evaluated) is the pretrain stage's checkpoint, so finetuning starts from it unchanged."""
    from llm.config import BaseParams, DataParams, ModelConfig, PretrainParams, TokenizerParams
    from llm.stages import clean_stage, pretrain_stage, tokenize_stage, tokenizer_stage

    from helpers import write_corpus

    base = BaseParams(hf_folder=str(models["llama"]["hf"]))
    clean_stage(DataParams(min_doc_chars=100, val_fraction=0.3), write_corpus(tmp_path / "corpus", 4),
                tmp_path / "clean", track=False)
    tokenizer_stage(TokenizerParams(), tmp_path / "clean", tmp_path / "tok", base=base, track=False)
    tokenize_stage(tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", track=False)
    params = PretrainParams(max_steps=0, batch_size=2, eval_batches=1, device="cpu", progress=False, num_threads=1)
    result = pretrain_stage(params, ModelConfig(), tmp_path / "tokens", tmp_path / "tok", tmp_path / "pretrain",
                            track=False, base=base)
    assert result["step"] == 0 and result["val/loss"] > 0
    kept, _, _ = load_checkpoint(tmp_path / "pretrain")
    imported, _, _ = load_checkpoint(models["llama"]["ckpt"])
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), imported.state_dict().values()))
    with pytest.raises(ValueError, match="max_steps: 0 keeps the start model as it is, which needs one"):
        pretrain_stage(params, ModelConfig(), tmp_path / "tokens", tmp_path / "tok", tmp_path / "p2", track=False)


def test_a_llama_2_style_tokenizer_with_byte_fallback_imports_and_generates_like_transformers(tmp_path):
    """TinyLlama's tokenizer is Llama 2's (BPE with <0xNN> byte pieces, U+2581 for spaces, <s> in front): imported,
    its prompts, greedy continuation and Zephyr-template conversations are Transformers' ids."""
    from llm.inference.decoding import SamplingParams
    from llm.inference.generate import TorchGenerator

    from published import write_tinyllama_model

    folder = write_tinyllama_model(tmp_path / "tinyllama")
    import_hf(folder, tmp_path / "ours")
    model, tokenizer, _ = load_checkpoint(tmp_path / "ours")
    hf, shifted = hf_tokenizer(folder), lambda ids: [i + N_SPECIAL for i in ids]  # noqa: E731
    assert tokenizer.kind == "sentencepiece_bpe"
    text = "To be, or not to be: café\n"
    assert prompt_ids(tokenizer, text) == shifted(hf(text)["input_ids"])  # <s> in front, é as <0xC3><0xA9>
    assert tokenizer.decode(tokenizer.encode(text)) == " " + text  # the prepended space, which HF's decoder strips
    ids = list(TorchGenerator(model, tokenizer).stream_generate(prompt_ids(tokenizer, PROMPT), SamplingParams(
        max_new_tokens=NEW, temperature=0.0, stop_ids=generation_stop_ids(tokenizer))))
    assert ids == shifted(hf_greedy(folder, hf(PROMPT)["input_ids"], NEW)) and len(ids) >= 5
    for messages in (MULTI[1:2], MULTI):
        assert encode_chat(tokenizer, messages, add_generation_prompt=True) == shifted(
            hf_chat_ids(folder, messages, add_generation_prompt=True))
