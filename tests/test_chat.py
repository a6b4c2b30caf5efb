"""Specification of ``python -m llm.chat``: piped sessions, commands, context truncation, Ctrl-C, errors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm.chat import COMMANDS, HELP, run_repl
from llm.config import ModelConfig
from llm.data.tokenizer import ByteTokenizer
from llm.inference.chat_session import ChatSession
from llm.model.checkpoint import save_checkpoint
from llm.model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]


def constant_checkpoint(path: Path, context_length: int, answer: str = "x") -> Path:
    """A tiny GPT that always predicts ``answer``: every answer is ``answer * max_new_tokens``, whatever the prompt.

    Blocks add nothing and every token embeds to the same vector, so the final hidden state is one fixed
    vector h; the untied head scores only ``answer``, with logit 10 * |h| (about 40).
    """
    tokenizer = ByteTokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, n_layer=1, n_head=2,
                         d_model=16, tie_weights=False)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        v = torch.randn(16)
        model.wte.weight.copy_(v.expand_as(model.wte.weight))
        h = model.norm_f(v)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode(answer)[0]] = 10 * h / h.norm()
    return save_checkpoint(path, model, config, tokenizer, metadata={"stage": "finetune"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return constant_checkpoint(tmp_path_factory.mktemp("chat") / "model", context_length=128)


def chat(*args: str, input: str = "", cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llm.chat", *args], input=input, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


@pytest.mark.pipeline
def test_piped_session_answers_each_line_and_obeys_commands(checkpoint):
    lines = ["hello", "/history", "/system You are BOB.", "how are you", "/history", "/reset", "/history", "/bogus",
             "/help", "/exit", "never read"]
    result = chat("--model", str(checkpoint), "--max-new-tokens", "4", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "xxxx",  # hello
        "user: hello", "assistant: xxxx",
        "xxxx",  # how are you
        "system: You are BOB.", "user: hello", "assistant: xxxx", "user: how are you", "assistant: xxxx",
        "system: You are BOB.",  # /reset keeps only the system prompt
    ]
    assert result.stderr.splitlines() == [
        "[system prompt set: You are BOB.]",
        "[conversation cleared]",
        "[unknown command /bogus; commands: /help, /reset, /system TEXT, /history, /exit]",
        *HELP.splitlines(),
    ]


def test_help_lists_every_command_and_each_listed_command_is_known():
    err, out = io.StringIO(), io.StringIO()
    lines = iter(["/help", "/exit"])
    run_repl(None, lambda: next(lines, None), out, err, interactive=True)  # /help never touches the session
    assert out.getvalue() == "" and err.getvalue() == HELP
    listed = [line.split()[0] for line in HELP.splitlines()[1:]]
    assert listed == [c.split()[0] for c in COMMANDS.split(", ")] == ["/help", "/reset", "/system", "/history", "/exit"]
    for command in listed[1:-1]:  # each one listed does something other than "unknown command"
        err, out = io.StringIO(), io.StringIO()
        script = iter([command, "/exit"])
        session = SimpleNamespace(reset=lambda: None, set_system=lambda text: None, system=None, history=[])
        run_repl(session, lambda script=script: next(script, None), out, err, interactive=False)
        assert "unknown command" not in err.getvalue(), command


@pytest.mark.pipeline
def test_oldest_turns_are_dropped_when_the_context_is_full(tmp_path):
    small = constant_checkpoint(tmp_path / "small", context_length=32)
    lines = ["first message", "second message", "third message", "/history"]
    result = chat("--model", str(small), "--max-new-tokens", "4", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["xxxx", "xxxx", "xxxx", "user: third message", "assistant: xxxx"]
    assert result.stderr.splitlines() == ["[context full: dropped the 2 oldest message(s)]"] * 2


@pytest.mark.pipeline
def test_prompt_flag_answers_once_with_sampling_flags(checkpoint):
    result = chat("--model", str(checkpoint), "--prompt", "Speak!", "--system", "You are JULIET.",
                  "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "6",
                  input="ignored\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "xxxxxx\n"


@pytest.mark.pipeline
def test_ctrl_c_stops_the_answer_and_keeps_the_session(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "input.txt").write_text("go on forever\n/history\n/exit\n")
    with open(tmp_path / "input.txt") as stdin:
        proc = subprocess.Popen([sys.executable, "-m", "llm.chat", "--model", str(checkpoint), "--max-new-tokens",
                                 "1000000"], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout.read(1) == "x"  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[interrupted]" in err and "Traceback" not in err
    lines = out.splitlines()
    assert lines[1] == "user: go on forever"
    assert lines[2].startswith("assistant: x") and set(lines[2].removeprefix("assistant: ")) == {"x"}


def test_interrupted_answer_is_kept_as_far_as_it_went():
    tokenizer = ByteTokenizer()

    def stream(ids, sampling):
        yield from tokenizer.encode("Good")
        raise KeyboardInterrupt

    session = ChatSession(SimpleNamespace(tokenizer=tokenizer, context_length=64, stream_generate=stream),
                          max_new_tokens=8)
    lines = iter(["hi", "again"])
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, lambda: next(lines, None), out, err, interactive=False)
    assert out.getvalue() == "Good\nGood\n" and err.getvalue() == "[interrupted]\n" * 2
    assert [m["content"] for m in session.history] == ["hi", "Good", "again", "Good"]


@pytest.mark.pipeline
def test_missing_model_is_one_line_that_says_what_to_run(tmp_path):
    result = chat("--model", str(tmp_path / "nowhere"), input="hi\n")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: no model at {tmp_path / 'nowhere'}") and "`llm finetune`" in result.stderr


@pytest.mark.pipeline
def test_corrupt_checkpoint_is_one_line(tmp_path):
    broken = constant_checkpoint(tmp_path / "broken", context_length=32)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = chat("--model", str(broken), input="hi\n")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "model.safetensors: truncated" in result.stderr


@pytest.mark.pipeline
def test_registry_uri_without_tracking_database_is_one_line(tmp_path):
    result = chat("--model", "models:/gpt/Production", input="hi\n", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: cannot resolve models:/gpt/Production") and "`" in result.stderr


@pytest.mark.pipeline
def test_onnx_backend_answers_like_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("llm.inference.export")
    model = constant_checkpoint(tmp_path / "model", context_length=32, answer="o")
    export.export_onnx(model, tmp_path / "onnx", verify=False)
    lines = "one\ntwo\n/history\n"
    onnx = chat("--model", str(tmp_path / "onnx"), "--backend", "onnx", "--max-new-tokens", "3", "--temperature", "0",
                input=lines)
    torch_result = chat("--model", str(model), "--max-new-tokens", "3", "--temperature", "0", input=lines)
    assert onnx.returncode == 0, onnx.stderr
    assert onnx.stdout == torch_result.stdout and onnx.stdout.startswith("ooo\nooo\n")
    missing = chat("--model", str(model), "--backend", "onnx", input="hi\n")
    assert missing.returncode == 1 and "no ONNX export" in missing.stderr and "`llm export`" in missing.stderr
